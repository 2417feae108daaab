"""What a training command shows while and after it runs: a progress bar or log lines per job, the loss curve."""

from __future__ import annotations

import contextlib
import time
from datetime import timedelta
from pathlib import Path

from .common import console

LOGGING_STEPS = 10  # a log line per job every this many steps (plus the first, the last and every evaluation)


def run_with_progress(
    jobs,
    resume_from: dict,
    *,
    show: bool,
    batched: bool = False,
    max_batched_tokens: int | None = None,
    overwrite: bool = False,
    report_to: tuple[str, ...] = (),
    log_dir: Path | None = None,
    logging_steps: int = LOGGING_STEPS,
) -> list:
    """Train the jobs, showing their progress on rank 0 (``show``); the finished runs.

    On a terminal, a rich progress bar per job. Elsewhere (stdout redirected to a file, a pipe, a scheduler's
    log) a bar would print only at the end, so a plain line per job every ``logging_steps`` steps instead, as
    HF Trainer logs: step, loss, lr, tokens/s, the eval when it runs, elapsed and remaining time.
    """
    from surgery.training.loop import train_jobs as train

    with progress_display(show=show, logging_steps=logging_steps) as shown:
        return train(
            jobs,
            resume=resume_from,
            on_step=shown.on_step if shown is not None else None,
            batched=batched,
            max_batched_tokens=max_batched_tokens,
            overwrite=overwrite,
            report_to=report_to,
            log_dir=log_dir,
        )


def progress_display(*, show: bool, logging_steps: int = LOGGING_STEPS):
    """What shows a run's steps (its ``on_step``), entered as a context: a rich bar per job on a terminal, a plain
    line per job every ``logging_steps`` steps elsewhere (a file, a pipe, a scheduler's log), nothing unless
    ``show`` (the other ranks of a launch)."""
    if not show:
        return contextlib.nullcontext(None)
    if console.is_jupyter or (console.is_terminal and not console.is_dumb_terminal):
        return _Bars()
    return contextlib.nullcontext(_LogLines(logging_steps))


class _Bars:
    """A rich progress bar per job, live on a terminal."""

    def __init__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:,.0f} tok/s"),
            TimeElapsedColumn(),
            console=console,
        )
        self.bars: dict[str, int] = {}

    def __enter__(self) -> _Bars:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def on_step(self, run, record: dict) -> None:
        name = run.job.name
        if name not in self.bars:
            self.bars[name] = self.progress.add_task(name, total=run.total_steps, loss=0.0, lr=0.0, tps=0.0)
        self.progress.update(
            self.bars[name], completed=run.step, loss=record["loss"], lr=record["lr"], tps=record["tokens_per_s"]
        )


class _LogLines:
    """One plain line per job every ``every`` steps, its first and last step and every evaluation (a log file)."""

    def __init__(self, every: int):
        self.every = every
        self.started = time.monotonic()
        self.before: dict[str, int] = {}  # steps each job had done before this process (a resumed run's)

    def on_step(self, run, record: dict) -> None:
        before = self.before.setdefault(run.job.name, run.step - 1)
        if run.step == before + 1 or run.step % self.every == 0 or run.done or "eval_loss" in record:
            console.print(self.line(run, record, run.step - before), markup=False, highlight=False, soft_wrap=True)

    def line(self, run, record: dict, done_here: int) -> str:
        """``[job] step 10/200 loss 2.3456 lr 1.00e-04 1,234 tok/s [eval_loss ... perplexity ...] elapsed 0:00:12
        remaining 0:03:48``; remaining is this process's pace so far times the steps left."""
        elapsed = time.monotonic() - self.started
        remaining = elapsed / done_here * (run.total_steps - run.step)
        parts = [
            f"[{run.job.name}] step {run.step}/{run.total_steps}",
            f"loss {record['loss']:.4f}",
            f"lr {record['lr']:.2e}",
            f"{record['tokens_per_s']:,.0f} tok/s",
        ]
        if "eval_loss" in record:
            parts.append(f"eval_loss {record['eval_loss']:.4f} perplexity {record['perplexity']:.2f}")
        parts += [f"elapsed {_clock(elapsed)}", f"remaining {_clock(remaining)}"]
        return "  ".join(parts)


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


def plot_losses(runs, path: Path) -> Path | None:
    """A PNG of every run's training (and eval) loss by step; None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axes = plt.subplots(figsize=(7, 4))
    for run in runs:
        steps = [(r["step"], r["loss"]) for r in run.history if r.get("loss") is not None]
        evals = [(r["step"], r["eval_loss"]) for r in run.history if r.get("eval_loss") is not None]
        if steps:
            axes.plot(*zip(*steps), label=f"{run.job.name} train")
        if evals:
            axes.plot(*zip(*evals), "o--", label=f"{run.job.name} eval")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
