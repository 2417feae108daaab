"""Where this process sits in a torchrun / accelerate launch, and what ranks exchange.

Each rank takes its share of every global batch; only the trainable parameters' gradients are
all-reduced, each rank's loss weighted by its share of the batch's loss tokens, so the result equals
one process with the same global batch. Dropout differs per rank (``rank_seed``); data order and
adapter init do not.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from .errors import TrainError


@dataclass
class World:
    """Where this process sits in a torchrun launch (rank 0 of 1 when alone)."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """Join the process group torchrun / accelerate set up, if any.

    With CUDA each rank is bound to ``cuda:$LOCAL_RANK`` first (so ``current_device()``, FSDP2's mesh and
    NCCL all use that GPU, not GPU 0) and the group runs CUDA tensors over NCCL and CPU tensors (loss and
    token sums, object collectives, a base kept on the CPU) over gloo; without CUDA everything is gloo.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        _refuse_collapsed_launch()
        return World()
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
            dist.init_process_group("cpu:gloo,cuda:nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return World(dist.get_rank(), dist.get_world_size())


def _refuse_collapsed_launch() -> None:
    """``accelerate launch --cpu --num_processes N`` starts one plain process: say so instead of training alone."""
    if "WORLD_SIZE" in os.environ or not any(k.startswith("ACCELERATE_") for k in os.environ):
        return
    if os.environ.get("MASTER_ADDR") or os.environ.get("ACCELERATE_NUM_PROCESSES", "1") not in ("", "1"):
        raise TrainError(
            "accelerate launched one process although several were asked for (its --cpu launcher "
            "ignores --num_processes); use `accelerate launch --multi_gpu --num_processes N` (gloo on "
            "CPU) or `torchrun --nproc_per_node N`"
        )


def rank_seed(seed: int, rank: int) -> int:
    """The dropout seed of one rank: ``seed`` itself on rank 0, an independent stream on every other rank.

    Data order and adapter init use ``seed`` alone, so they stay identical across ranks.
    """
    return seed if rank == 0 else (seed + rank * 0x9E3779B97F4A7C15) % (1 << 64)


def broadcast_trainables(params: list[nn.Parameter]) -> None:
    import torch.distributed as dist

    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def rank_weight(batch: dict, where: World) -> float:
    """Under DDP, weight this rank's mean loss by its share of the loss tokens of the global batch.

    Ranks' batches can hold different numbers of loss tokens (prompts and padding carry none); with
    this weight the averaged gradient is exactly that of the global batch's token mean.
    """
    if where.size == 1:
        return 1.0
    import torch.distributed as dist

    local = (batch["labels"][:, 1:] != -100).sum().to(torch.float64).cpu()
    total = local.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return float(local * where.size / total) if total > 0 else 1.0


def all_reduce_grads(params, loss_sum: float, tokens: int, where: World):
    """Average the trainable parameters' gradients (and the logged loss) over ranks; sum tokens."""
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(where.size)
    stats = torch.tensor([loss_sum, float(tokens)], dtype=torch.float64)
    dist.all_reduce(stats, op=dist.ReduceOp.SUM)
    return stats[0].item() / where.size, int(stats[1].item())


def gathered_rng(rng: torch.Tensor, where: World) -> torch.Tensor:
    """Every rank's random state, one row per rank (each rank draws its own dropout masks)."""
    if where.size == 1:
        return rng.unsqueeze(0)
    import torch.distributed as dist

    rows: list = [None] * where.size
    dist.all_gather_object(rows, rng)
    return torch.stack([r.cpu() for r in rows])
