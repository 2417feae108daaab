"""One job's optimizer step: its micro-batches (its share under DDP), then clip, check and step.

``train_step`` runs a job's micro-batches through its own fine-tune; ``batched_train`` runs the
micro-batches of several jobs through one base pass and ends each job's step with the same
``optimizer_step``. A non-finite loss or gradient stops the run before the optimizer step.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch

from ..devices import input_device
from ..distributed import World, all_reduce_grads, rank_weight
from ..errors import TrainError
from ..random_state import swap_rng
from .data import TOKENS
from .job import Run, TrainConfig
from .offload import offloaded_activations


def micro_batch(run: Run, where: World, device: torch.device) -> dict[str, torch.Tensor]:
    """The job's next micro-batch (this rank's share of it), on ``device`` (copied without waiting: the rows
    are pinned first on CUDA); advances the data position. Its token count is ``tokens(batch)``, read on the
    host."""
    job = run.job
    global_batch = job.config.batch_size * where.size
    epoch, index = divmod(run.micro, len(job.data) // global_batch)
    if run.order is None or run.order[0] != epoch:  # epochs reshuffle, seeded
        generator = torch.Generator().manual_seed(job.config.seed + epoch)
        run.order = (epoch, torch.randperm(len(job.data), generator=generator))
    rows = run.order[1][index * global_batch : (index + 1) * global_batch][where.rank :: where.size]
    run.micro += 1
    host = job.data.batch(rows)
    if device.type != "cuda":
        return host
    moved = {k: v.pin_memory().to(device, non_blocking=True) for k, v in host.items() if k != TOKENS}
    moved[TOKENS] = tokens(host)
    return moved


def tokens(batch: dict) -> int:
    """Real (unpadded) tokens of a micro-batch made by ``micro_batch``."""
    count = batch.get(TOKENS)
    return count if count is not None else int(batch["attention_mask"].sum())


def model_inputs(batch: dict) -> dict:
    """The micro-batch as the model takes it."""
    return {k: v for k, v in batch.items() if k != TOKENS}


def autocast(config: TrainConfig, device: torch.device) -> torch.autocast:
    """The job's mixed precision (a disabled autocast for fp32)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def offloaded(config: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """With --offload-activations, what the forward saves for backward waits in pinned host memory (CUDA)."""
    return offloaded_activations(device) if config.offload_activations else contextlib.nullcontext()


def trainable_device(run: Run) -> torch.device:
    """Where a job's micro-batches go: its fine-tune's input embedding (the first GPU of a split base)."""
    return input_device(run.job.finetune)


def train_step(run: Run, where: World) -> dict:
    """One optimizer step (grad_accum micro-batches) of one job, in the job's own random state."""
    job, config = run.job, run.job.config
    job.finetune.train()
    device = trainable_device(run)
    loss_sum, count = 0.0, 0
    start = time.perf_counter()
    outer = swap_rng(run.rng, device)  # dropout draws from the job's own stream
    try:
        for _ in range(config.grad_accum):
            batch = micro_batch(run, where, device)
            with autocast(config, device), offloaded(config, device):
                loss = job.loss(model_inputs(batch)) * rank_weight(batch, where)
            run.scaler.scale(loss / config.grad_accum).backward()
            loss_sum = loss_sum + loss.detach()  # read once per step (optimizer_step), not per micro-batch
            count += tokens(batch)
    finally:
        run.rng = swap_rng(outer, device)
    return optimizer_step(run, where, loss_sum, count, time.perf_counter() - start)


def optimizer_step(run: Run, where: World, loss_sum: float | torch.Tensor, tokens: int, seconds: float) -> dict:
    """End a step whose gradients are accumulated: all-reduce, clip, check, step; the step's metrics record."""
    job, config = run.job, run.job.config
    loss_sum = float(loss_sum)  # the step's one wait for the device
    params = [p for group in run.optimizer.param_groups for p in group["params"]]
    if where.size > 1:
        loss_sum, tokens = all_reduce_grads(params, loss_sum, tokens, where)
    run.scaler.unscale_(run.optimizer)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or math.inf))
    if not math.isfinite(loss_sum) or (not math.isfinite(grad_norm) and not run.scaler.is_enabled()):
        what = f"loss {loss_sum / config.grad_accum}" if not math.isfinite(loss_sum) else f"gradient norm {grad_norm}"
        raise TrainError(
            f"job {job.name}: step {run.step + 1}: {what} is not finite; training stopped before the "
            "optimizer step (the last checkpoint and adapter file are kept). Lower --lr, set "
            "--max-grad-norm, or check the data"
        )
    lr = run.optimizer.param_groups[0]["lr"]
    run.scaler.step(run.optimizer)
    run.masters.write_back()
    run.scaler.update()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    record = {
        "job": job.name,
        "step": run.step,
        "loss": loss_sum / config.grad_accum,
        "lr": lr,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
        "grad_norm": grad_norm,
    }
    run.history.append(record)
    return record
