"""The training loop: one or many fine-tunes on one shared base, in one process or under torchrun (DDP).

``train(jobs)`` prepares a ``Run`` per job and steps them in turn (``step.train_step``); each run's
random state (dropout, data order) is its own, so a fine-tune trained beside others ends bit-for-bit
where it would alone. ``train(jobs, batched=True)`` runs the jobs' micro-batches through one base
pass instead (``batched_train``). Files (metrics, checkpoints, the final adapter) are written by
rank 0 through ``checkpoint``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..base.ownership import finetune_info, own_state, require_finetune
from ..base.shared_base import refuse_sharded
from ..combinations import check
from ..devices import input_device
from ..distributed import World, broadcast_trainables, gathered_rng, rank_seed, world
from ..errors import TrainError
from ..files.adapter_file import save_adapter
from ..layers.notices import notices_once
from ..random_state import new_rng
from .batched_train import check_batching, group_jobs, run_batched
from .checkpoint import (
    ADAPTER_FILE,
    append_metrics,
    check_output_folder,
    move_aside,
    remove_leftovers,
    run_lock,
    save_checkpoint,
    truncate_metrics,
)
from .checkpoint import (
    resume as resume_run,
)
from .config import parse_report_to
from .data import TOKENS, Blocks
from .job import EarlyStopping, Job, Run, build_optimizer, build_scheduler
from .master_weights import MasterWeights
from .mlp_chunks import chunked_mlps
from .step import train_step
from .trackers import Trackers

StepCallback = Callable[[Run, dict], None]
Report = Callable[[str, dict], None]  # (job name, step record) to the experiment trackers
logger = logging.getLogger(__name__)


def prepare(job: Job, where: World, resume: Path | None = None) -> Run:
    """A job's Run: optimizer, scheduler, random state and step count; continued from a checkpoint if given."""
    info = require_finetune(job.finetune, "trained", TrainError)
    params = [p for p in job.finetune.parameters() if p.requires_grad]
    if not params:
        raise TrainError(
            f"job {job.name}: the fine-tune has no trainable parameters (rules {info.rules.source} "
            "adapt nothing and make nothing plain)"
        )
    global_batch = job.config.batch_size * where.size
    if len(job.data) < global_batch:
        raise TrainError(
            f"job {job.name}: {len(job.data)} training rows are fewer than one global batch "
            f"({job.config.batch_size} x {where.size} processes); lower --batch-size or add data"
        )
    micro_per_epoch = len(job.data) // global_batch
    steps_per_epoch = max(1, micro_per_epoch // job.config.grad_accum)
    total_steps = job.config.max_steps or steps_per_epoch * job.config.epochs
    if where.size > 1:
        broadcast_trainables(params)
    stepped, masters = MasterWeights.of(params)
    try:
        optimizer = build_optimizer(job.config, stepped)
        device = params[0].device
        scaler = torch.amp.GradScaler(device.type, enabled=job.config.precision == "fp16" and device.type == "cuda")
        rng = new_rng(rank_seed(job.config.seed, where.rank), device)
        run = Run(
            job,
            total_steps,
            optimizer,
            build_scheduler(job.config, optimizer, total_steps),
            scaler,
            rng,
            early=EarlyStopping() if job.config.early_stopping_patience else None,
            masters=masters,
        )
        if resume is not None:
            resume_run(run, resume, where)
    except BaseException:
        masters.close()  # a run that does not start leaves the fine-tune as it was
        raise
    return run


def evaluate(
    model: nn.Module, data: Blocks, batch_size: int = 8, loss: Callable[[dict], torch.Tensor] | None = None
) -> dict:
    """Token-weighted mean loss and perplexity on ``data`` (eval mode, no gradients).

    Args:
        model: the fine-tune.
        data: the rows.
        batch_size: rows per forward.
        loss: a batch's loss (``Job.loss``: chunked); default the model's own.

    Returns:
        ``{"eval_loss": ..., "perplexity": ...}``.
    """
    loss = loss or (lambda batch: model(**batch, use_cache=False).loss)
    was_training = model.training
    model.eval()
    device = input_device(model)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            rows = torch.arange(start, min(start + batch_size, len(data)))
            batch = {k: v.to(device) for k, v in data.batch(rows).items() if k != TOKENS}  # packed rows carry a count
            n = int((batch["labels"][:, 1:] != -100).sum())
            if n == 0:
                continue
            total += loss(batch).item() * n
            count += n
    model.train(was_training)
    loss = total / max(count, 1)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def train_jobs(
    jobs: list[Job],
    *,
    resume: dict[str, Path] | None = None,
    on_step: StepCallback | None = None,
    batched: bool = False,
    max_batched_tokens: int | None = None,
    overwrite: bool = False,
    report_to: str | tuple[str, ...] | None = None,
    log_dir: Path | None = None,
) -> list[Run]:
    """Train every job to its end; checkpoints, eval and files as configured.

    Jobs take turns, one step each; with ``batched=True`` the micro-batches of jobs on one base share
    each base pass (at most ``max_batched_tokens`` padded tokens per pass; more go in sub-groups).
    ``overwrite=True`` moves an earlier run in a job's folder aside (OUT.replaced-N) once every job
    is ready to start; nothing is deleted. ``report_to``: experiment trackers (``tensorboard``,
    ``wandb``, ``mlflow``), one run per job, kept under ``log_dir`` (default: the jobs' common folder).
    """
    where = world()
    names = [job.name for job in jobs]
    if len(set(names)) != len(names):
        raise TrainError(f"job names must be unique: {', '.join(names)}")
    trackers = parse_report_to(report_to)
    if trackers and log_dir is None:
        log_dir = _common_folder(jobs)
    check_batching(
        batched,
        max_batched_tokens,
        any(job.config.gradient_checkpointing for job in jobs),
        any(job.config.compile for job in jobs),
        [info.rules for job in jobs if (info := finetune_info(job.finetune)) is not None],
    )
    if batched:
        for job in jobs:
            refuse_sharded(job.finetune, "--batched training", "train without --batched (the jobs take turns)")
            if job.config.mlp_chunk_tokens:
                check({"--mlp-chunk-tokens": f"job {job.name}", "--batched": "--batched"})
            if job.data.position_ids is not None:
                raise TrainError(
                    f"job {job.name}: --packing with --batched is not supported (a shared base pass "
                    "pads every job's rows to one mask); train packed jobs without --batched"
                )
        jobs = group_jobs(jobs, max_batched_tokens)
    resume = resume or {}
    with contextlib.ExitStack() as locks:
        locks.enter_context(notices_once())  # bitsandbytes' notices once each (the loss calls the body directly)
        for job in jobs:  # every folder first, then every job: a bad one stops all before anything is written
            if job.out is not None and where.main:
                locks.enter_context(run_lock(job.out))
                check_output_folder(job.out, resume=resume.get(job.name), overwrite=overwrite)
        runs = []
        for job in jobs:
            runs.append(prepare(job, where, resume.get(job.name)))
            locks.callback(runs[-1].masters.close)  # the fine-tune's tensors get their own gradients again
            locks.enter_context(chunked_mlps(job.finetune, job.config.mlp_chunk_tokens))
        for job in jobs:
            if overwrite and job.out is not None and where.main and job.name not in resume:
                moved = move_aside(job.out)  # our lock moves with it; the fresh folder gets its own
                if moved is not None:
                    logger.warning("moved the earlier run in %s aside to %s", job.out, moved)
                    locks.enter_context(run_lock(job.out))
        for run in runs:
            if run.job.out is not None and where.main:
                remove_leftovers(run.job.out)
                if run.job.name in resume:  # the run's log so far: steps up to the checkpoint, as logged then
                    run.history[:0] = truncate_metrics(run.job.out, run.step)
        report = None
        if trackers and where.main:
            opened = Trackers(trackers, [run.job for run in runs], log_dir)
            locks.callback(opened.close)
            report = opened.report
        after_step = functools.partial(_record_step, where=where, on_step=on_step, report=report)
        if batched:
            run_batched(runs, where, max_batched_tokens, after_step)
        else:
            while not all(run.done for run in runs):
                for run in runs:
                    if not run.done:
                        after_step(run, train_step(run, where))
        _finish(runs, where)
    return runs


def _common_folder(jobs: list[Job]) -> Path:
    """Where trackers keep their runs when no log_dir is given: the folder every job's output lies in."""
    outs = [job.out for job in jobs if job.out is not None]
    if len(outs) != len(jobs):
        raise TrainError("report_to: a job without an output folder needs log_dir= for its tracker runs")
    if len(outs) == 1:
        return outs[0]
    return Path(os.path.commonpath([str(o.resolve()) for o in outs]))


def _finish(runs: list[Run], where: World) -> None:
    """After the last step (whose record holds the final eval): the adapter file of every job.

    With early stopping, the adapter holds the best evaluation's weights, whose eval loss is that step's record.
    """
    if where.size > 1:
        import torch.distributed as dist

        dist.barrier()
    for run in runs:
        job = run.job
        if run.early is not None and run.early.best_weights:
            _restore_best(run)
        if where.main and job.out is not None:
            save_adapter(job.finetune, job.out / ADAPTER_FILE)
            if job.tokenizer is not None:  # the fine-tune's own tokens: AutoTokenizer.from_pretrained(out) has them
                job.tokenizer.save_pretrained(job.out)


def _watch_eval_loss(run: Run, record: dict) -> None:
    """Early stopping: keep the trainable weights of the best eval loss; stop after ``patience`` evaluations
    without beating it by more than the threshold (the record says so)."""
    config, early = run.job.config, run.early
    if record["eval_loss"] < early.best_loss - config.early_stopping_threshold:
        early.best_loss, early.best_step, early.evals_since_best = record["eval_loss"], run.step, 0
        early.best_weights = {name: t.detach().clone() for name, t in own_state(run.job.finetune).items()}
        return
    early.evals_since_best += 1
    if early.evals_since_best >= config.early_stopping_patience:
        early.stopped = True
        record["early_stopping"] = {
            "stopped_at": run.step,
            "best_step": early.best_step,
            "best_eval_loss": early.best_loss,
        }
        logger.warning(
            "job %s: no better eval loss in %d evaluations; stopped at step %d, keeping step %d's weights",
            run.job.name,
            early.evals_since_best,
            run.step,
            early.best_step,
        )


def _restore_best(run: Run) -> None:
    """Put the best eval loss's trainable weights back (what the final adapter file then holds)."""
    with torch.no_grad():
        for name, tensor in own_state(run.job.finetune).items():
            tensor.copy_(run.early.best_weights[name])
    run.masters.reload()


def _record_step(run: Run, record: dict, where: World, on_step: StepCallback | None, report: Report | None) -> None:
    """After one step of one run: its eval, metrics line (and tracker entries) and checkpoint when they are due.

    The last step is always evaluated (when there is eval data): the final eval is part of the last step's
    record, so metrics.jsonl and the trackers hold each step once.
    """
    job, config = run.job, run.job.config
    eval_due = run.done or (config.eval_steps and run.step % config.eval_steps == 0)
    if eval_due and job.eval_data is not None:
        record.update(evaluate(job.finetune, job.eval_data, config.batch_size, job.loss))
        if run.early is not None:
            _watch_eval_loss(run, record)
    stopped_early = run.early is not None and run.early.stopped  # its final files hold the best step's weights
    # the last step too (as transformers' Trainer saves at the end): a later run can resume from it to train longer
    checkpoint_due = config.save_steps and (run.step % config.save_steps == 0 or run.done) and not stopped_early
    rngs = gathered_rng(run.rng, where) if checkpoint_due and job.out is not None else None
    if where.main and job.out is not None:
        append_metrics(job.out, record)
    if report is not None:
        report(job.name, record)
    if where.main and job.out is not None:
        if checkpoint_due:
            save_checkpoint(run, rngs)
    if on_step is not None:
        on_step(run, record)
