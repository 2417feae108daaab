"""The training loop: one or many fine-tunes on one shared base, in one process or under torchrun (DDP).

``train(jobs)`` prepares a ``Run`` per job and steps them in turn; each run's random state (dropout,
data order) is its own, so a fine-tune trained beside others ends bit-for-bit where it would alone.
A non-finite loss or gradient stops the run before the optimizer step. Files (metrics,
checkpoints, the final adapter) are written by rank 0 through ``checkpoint``.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .adapter_file import save_adapter
from .checkpoint import (ADAPTER_FILE, append_metrics, check_output_folder, remove_leftovers, resume as resume_run,
                         run_lock, save_checkpoint, truncate_metrics)
from .data import Blocks
from .distributed import (World, all_reduce_grads, broadcast_trainables, gathered_rng, rank_seed, rank_weight,
                          world)
from .errors import TrainError
from .finetune import require_finetune
from .job import Job, Run, build_optimizer, build_scheduler

StepCallback = Callable[[Run, dict], None]


def prepare(job: Job, where: World, resume: Path | None = None) -> Run:
    """A job's Run: optimizer, scheduler, random state and step count; continued from a checkpoint if given."""
    job.config.check()
    info = require_finetune(job.finetune, "trained", TrainError)
    params = [p for p in job.finetune.parameters() if p.requires_grad]
    if not params:
        raise TrainError(f"job {job.name}: the fine-tune has no trainable parameters (rules {info.rules.source} "
                         "adapt nothing and make nothing plain)")
    global_batch = job.config.batch_size * where.size
    if len(job.data) < global_batch:
        raise TrainError(f"job {job.name}: {len(job.data)} training rows are fewer than one global batch "
                         f"({job.config.batch_size} x {where.size} processes); lower --batch-size or add data")
    micro_per_epoch = len(job.data) // global_batch
    steps_per_epoch = max(1, micro_per_epoch // job.config.grad_accum)
    total_steps = job.config.max_steps or steps_per_epoch * job.config.epochs
    optimizer = build_optimizer(job.config, params)
    device = params[0].device
    scaler = torch.amp.GradScaler(device.type, enabled=job.config.precision == "fp16" and device.type == "cuda")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(rank_seed(job.config.seed, where.rank))
        rng = torch.get_rng_state()
        if device.type == "cuda":
            rng = torch.cat([rng, torch.cuda.get_rng_state(device)])
    run = Run(job, total_steps, optimizer, build_scheduler(job.config, optimizer, total_steps), scaler, rng)
    if where.size > 1:
        broadcast_trainables(params)
    if resume is not None:
        resume_run(run, resume, where)
    return run


def _rows(run: Run, micro: int, where: World) -> torch.Tensor:
    """The data rows of this rank's share of micro-batch number ``micro`` (epochs reshuffle, seeded)."""
    job = run.job
    global_batch = job.config.batch_size * where.size
    epoch, index = divmod(micro, len(job.data) // global_batch)
    if run.order is None or run.order[0] != epoch:
        generator = torch.Generator().manual_seed(job.config.seed + epoch)
        run.order = (epoch, torch.randperm(len(job.data), generator=generator))
    batch = run.order[1][index * global_batch:(index + 1) * global_batch]
    return batch[where.rank::where.size]


def train_step(run: Run, where: World) -> dict:
    """One optimizer step (grad_accum micro-batches) of one job, in the job's own random state."""
    job = run.job
    model, config = job.finetune, job.config
    model.train()
    device = next(p for p in model.parameters() if p.requires_grad).device
    outer = _swap_rng(run.rng, device)  # dropout draws from the job's own stream
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision)
    loss_sum, tokens = 0.0, 0
    start = time.perf_counter()
    for _ in range(config.grad_accum):
        batch = {k: v.to(device) for k, v in job.data.batch(_rows(run, run.micro, where)).items()}
        run.micro += 1
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(**batch, use_cache=False).loss * rank_weight(batch, where)
        run.scaler.scale(loss / config.grad_accum).backward()
        loss_sum += loss.item()
        tokens += int(batch["attention_mask"].sum())
    params = [p for group in run.optimizer.param_groups for p in group["params"]]
    if where.size > 1:
        loss_sum, tokens = all_reduce_grads(params, loss_sum, tokens, where)
    run.scaler.unscale_(run.optimizer)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or math.inf))
    if not math.isfinite(loss_sum) or (not math.isfinite(grad_norm) and not run.scaler.is_enabled()):
        run.rng = _swap_rng(outer, device)
        what = f"loss {loss_sum / config.grad_accum}" if not math.isfinite(loss_sum) else f"gradient norm {grad_norm}"
        raise TrainError(f"job {job.name}: step {run.step + 1}: {what} is not finite; training stopped before the "
                         "optimizer step (the last checkpoint and adapter file are kept). Lower --lr, set "
                         "--max-grad-norm, or check the data")
    lr = run.optimizer.param_groups[0]["lr"]
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.rng = _swap_rng(outer, device)
    run.step += 1
    seconds = time.perf_counter() - start
    record = {"job": job.name, "step": run.step, "loss": loss_sum / config.grad_accum, "lr": lr,
              "tokens": tokens, "tokens_per_s": tokens / seconds if seconds > 0 else 0.0, "grad_norm": grad_norm}
    run.history.append(record)
    return record


def _swap_rng(state: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Install a random state (CPU, plus the CUDA device's when training there); return the one it replaced.

    The state is one uint8 tensor: the CPU state, followed by the CUDA state on CUDA devices.
    """
    cpu_size = torch.get_rng_state().numel()
    previous = torch.get_rng_state()
    if device.type == "cuda":
        previous = torch.cat([previous, torch.cuda.get_rng_state(device)])
        if state.numel() > cpu_size:
            torch.cuda.set_rng_state(state[cpu_size:], device)
    torch.set_rng_state(state[:cpu_size])
    return previous


def evaluate(model: nn.Module, data: Blocks, batch_size: int = 8) -> dict:
    """Token-weighted mean loss and perplexity on ``data`` (eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            batch = {k: v.to(device) for k, v in data.batch(torch.arange(start, min(start + batch_size, len(data)))).items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            if n == 0:
                continue
            total += model(**batch, use_cache=False).loss.item() * n
            count += n
    model.train(was_training)
    loss = total / max(count, 1)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def train(jobs: list[Job], *, resume: dict[str, Path] | None = None,
          on_step: StepCallback | None = None) -> list[Run]:
    """Train every job to its end, stepping them in turn; checkpoints, eval and files as configured."""
    where = world()
    names = [job.name for job in jobs]
    if len(set(names)) != len(names):
        raise TrainError(f"job names must be unique: {', '.join(names)}")
    resume = resume or {}
    with contextlib.ExitStack() as locks:
        for job in jobs:  # every folder first, then every job: a bad one stops all before anything is written
            if job.out is not None and where.main:
                locks.enter_context(run_lock(job.out))
                check_output_folder(job.out, resume=resume.get(job.name))
        runs = [prepare(job, where, resume.get(job.name)) for job in jobs]
        for run in runs:
            if run.job.out is not None and where.main:
                remove_leftovers(run.job.out)
                if run.job.name in resume:
                    truncate_metrics(run.job.out, run.step)
        _run(runs, where, on_step)
    return runs


def _run(runs: list[Run], where: World, on_step: StepCallback | None) -> None:
    while not all(run.done for run in runs):
        for run in runs:
            if not run.done:
                _step_and_record(run, where, on_step)
    if where.size > 1:
        import torch.distributed as dist

        dist.barrier()
    for run in runs:
        job, final = run.job, None
        if job.eval_data is not None:
            final = {"job": job.name, "step": run.step, **evaluate(job.finetune, job.eval_data, job.config.batch_size)}
            run.history.append(final)
        if where.main and job.out is not None:
            save_adapter(job.finetune, job.out / ADAPTER_FILE)
            if final is not None:
                append_metrics(job.out, final)


def _step_and_record(run: Run, where: World, on_step: StepCallback | None) -> None:
    """One step of one run, then its eval, metrics line and checkpoint when they are due."""
    job, config = run.job, run.job.config
    record = train_step(run, where)
    if config.eval_steps and job.eval_data is not None and run.step % config.eval_steps == 0:
        record.update(evaluate(job.finetune, job.eval_data, config.batch_size))
    checkpoint_due = config.save_steps and run.step % config.save_steps == 0 and not run.done
    rngs = gathered_rng(run.rng, where) if checkpoint_due and job.out is not None else None
    if where.main and job.out is not None:
        append_metrics(job.out, record)
        if checkpoint_due:
            save_checkpoint(run, rngs)
    if on_step is not None:
        on_step(run, record)
