"""What a training command shows while and after it runs: a rich progress bar per job, the loss curve."""

from __future__ import annotations

from pathlib import Path

from .common import console


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
) -> list:
    """Train the jobs with a rich progress bar per job (shown on rank 0 only); the finished runs."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from surgery.train.loop import train

    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:,.0f} tok/s"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=console, disable=not show) as progress:
        bars = {}

        def on_step(run, record):
            if run.job.name not in bars:
                bars[run.job.name] = progress.add_task(run.job.name, total=run.total_steps, loss=0.0, lr=0.0, tps=0.0)
            progress.update(
                bars[run.job.name], completed=run.step, loss=record["loss"], lr=record["lr"], tps=record["tokens_per_s"]
            )

        return train(
            jobs,
            resume=resume_from,
            on_step=on_step,
            batched=batched,
            max_batched_tokens=max_batched_tokens,
            overwrite=overwrite,
            report_to=report_to,
            log_dir=log_dir,
        )


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
