"""Training: one or many fine-tunes on one shared base, in one process or under torchrun (DDP).

A ``Job`` is one fine-tune with its own data, optimizer, scheduler, random state and output
folder. ``train(jobs)`` steps them in turn; each job's random state (dropout, data order) is its
own, so a fine-tune trained beside others ends bit-for-bit where it would alone. Checkpoints are
an adapter file plus a training-state file (safetensors + JSON: optimizer, scheduler, RNG, step,
data position); resuming from one continues exactly. Under torchrun each rank takes its share of
every global batch and only the trainable parameters' gradients are all-reduced; rank 0 alone
writes files and logs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .data import Blocks
from .errors import SurgeryError, first_line
from .files import MiB, atomic_folder, atomic_write, check_user_file, remove_folder
from .finetune import finetune_info
from .state import load_adapter, save_adapter

SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "adamw8bit")
STATE_FILE = "training_state.safetensors"
ADAPTER_FILE = "adapter.safetensors"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".surgery.lock"
MAX_STATE_BYTES = 64 << 30
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.manual_seed accepts


class TrainError(SurgeryError):
    """A training setup that cannot run: bad options, unwritable output, a foreign resume folder."""


@dataclass
class TrainConfig:
    """Optimisation settings of one job (the CLI's options)."""

    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    epochs: int = 1
    max_steps: int | None = None
    warmup: int = 0
    schedule: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    precision: str = "fp32"
    optimizer: str = "adamw"
    eval_steps: int | None = None
    save_steps: int | None = None
    save_total_limit: int | None = None

    def check(self) -> "TrainConfig":
        for name in ("batch_size", "grad_accum", "epochs"):
            if getattr(self, name) < 1:
                raise TrainError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_steps", "save_steps", "save_total_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise TrainError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise TrainError(f"--lr must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise TrainError(f"--weight-decay must be a finite number >= 0, got {self.weight_decay}")
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise TrainError(f"--max-grad-norm must be a finite number > 0 (0 turns clipping off), got "
                             f"{self.max_grad_norm}")
        if self.warmup < 0:
            raise TrainError(f"--warmup must be >= 0, got {self.warmup}")
        if not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise TrainError(f"--seed must be between {SEED_RANGE[0]} and {SEED_RANGE[1]} (torch's range), got "
                             f"{self.seed}")
        for name, allowed in (("schedule", SCHEDULES), ("precision", PRECISIONS), ("optimizer", OPTIMIZERS)):
            if getattr(self, name) not in allowed:
                raise TrainError(f"--{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        return self


@dataclass
class Job:
    """One fine-tune to train: model, data, settings, output folder, and its progress."""

    name: str
    finetune: nn.Module
    data: Blocks
    config: TrainConfig
    out: Path | None = None
    eval_data: Blocks | None = None
    identity: dict = field(default_factory=dict)  # what a resumed run must match (rules, data, model, ...)
    # progress, set by train()
    step: int = 0
    micro: int = 0  # micro-batches consumed (data position)
    total_steps: int = 0
    history: list[dict] = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = field(default=None, repr=False)
    scheduler: object = field(default=None, repr=False)
    rng: torch.Tensor | None = field(default=None, repr=False)
    scaler: object = field(default=None, repr=False)
    order: tuple[int, torch.Tensor] | None = field(default=None, repr=False)  # (epoch, its row permutation)

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps


@dataclass
class World:
    """Where this process sits in a torchrun launch (rank 0 of 1 when alone)."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """Join the process group torchrun / accelerate set up (gloo on CPU, nccl on CUDA), if any."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        _refuse_collapsed_launch()
        return World()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


def _refuse_collapsed_launch() -> None:
    """``accelerate launch --cpu --num_processes N`` starts one plain process: say so instead of training alone."""
    if "WORLD_SIZE" in os.environ or not any(k.startswith("ACCELERATE_") for k in os.environ):
        return
    if os.environ.get("MASTER_ADDR") or os.environ.get("ACCELERATE_NUM_PROCESSES", "1") not in ("", "1"):
        raise TrainError("accelerate launched one process although several were asked for (its --cpu launcher "
                         "ignores --num_processes); use `accelerate launch --multi_gpu --num_processes N` (gloo on "
                         "CPU) or `torchrun --nproc_per_node N`")


# ------------------------------------------------------------------------------------ setup

def prepare(job: Job, where: World, resume: Path | None = None) -> None:
    """Optimizer, scheduler, random state and step count for a job; resume from a checkpoint if given."""
    job.config.check()
    info = finetune_info(job.finetune)
    if info is None:
        raise TrainError(f"job {job.name}: not a fine-tune; train fine-tunes made by surgery.rewrite")
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
    job.total_steps = job.config.max_steps or steps_per_epoch * job.config.epochs
    job.optimizer = _optimizer(job.config, params)
    job.scheduler = _scheduler(job.config, job.optimizer, job.total_steps)
    device_type = params[0].device.type
    job.scaler = torch.amp.GradScaler(device_type, enabled=job.config.precision == "fp16" and device_type == "cuda")
    cuda = device_type == "cuda"
    with torch.random.fork_rng(devices=[params[0].device] if cuda else []):
        torch.manual_seed(rank_seed(job.config.seed, where.rank))
        job.rng = torch.get_rng_state()
        if cuda:
            job.rng = torch.cat([job.rng, torch.cuda.get_rng_state(params[0].device)])
    if where.size > 1:
        _broadcast_trainables(params)
    if resume is not None:
        _resume(job, resume, where)


def rank_seed(seed: int, rank: int) -> int:
    """The dropout seed of one rank: ``seed`` itself on rank 0, an independent stream on every other rank.

    Data order and adapter init use ``seed`` alone, so they stay identical across ranks.
    """
    return seed if rank == 0 else (seed + rank * 0x9E3779B97F4A7C15) % (1 << 64)


def _optimizer(config: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    try:
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(groups, lr=config.lr)
        _probe_8bit_optimizer(params[0].device)
        return optimizer
    except Exception as exc:
        raise TrainError(f"--optimizer adamw8bit is not available here ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); bitsandbytes' 8-bit optimizers do not "
                         "run on this platform — use --optimizer adamw") from None


def _probe_8bit_optimizer(device: torch.device) -> None:
    """bitsandbytes builds 8-bit optimizers anywhere but may fail at the first step: try one on a dummy."""
    import bitsandbytes as bnb

    dummy = nn.Parameter(torch.zeros(4096, device=device))
    opt = bnb.optim.AdamW8bit([dummy], lr=1e-3)
    dummy.grad = torch.ones_like(dummy)
    opt.step()


def _scheduler(config: TrainConfig, optimizer, total: int):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[config.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=config.warmup, num_training_steps=total)


def _broadcast_trainables(params: list[nn.Parameter]) -> None:
    import torch.distributed as dist

    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


# ------------------------------------------------------------------------------------ steps

def _rows(job: Job, micro: int, where: World) -> torch.Tensor:
    """The data rows of this rank's share of micro-batch number ``micro`` (epochs reshuffle, seeded)."""
    global_batch = job.config.batch_size * where.size
    per_epoch = len(job.data) // global_batch
    epoch, index = divmod(micro, per_epoch)
    if job.order is None or job.order[0] != epoch:
        job.order = (epoch, torch.randperm(len(job.data), generator=torch.Generator().manual_seed(job.config.seed + epoch)))
    batch = job.order[1][index * global_batch:(index + 1) * global_batch]
    return batch[where.rank::where.size]


def train_step(job: Job, where: World) -> dict:
    """One optimizer step (grad_accum micro-batches) of one job, in the job's own random state."""
    model, config = job.finetune, job.config
    model.train()
    device = next(p for p in model.parameters() if p.requires_grad).device
    outer = _swap_rng(job.rng, device)  # dropout draws from the job's own stream
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision)
    loss_sum, tokens = 0.0, 0
    start = time.perf_counter()
    for _ in range(config.grad_accum):
        batch = {k: v.to(device) for k, v in job.data.batch(_rows(job, job.micro, where)).items()}
        job.micro += 1
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(**batch, use_cache=False).loss * _rank_weight(batch, where)
        job.scaler.scale(loss / config.grad_accum).backward()
        loss_sum += loss.item()
        tokens += int(batch["attention_mask"].sum())
    params = [p for group in job.optimizer.param_groups for p in group["params"]]
    if where.size > 1:
        loss_sum, tokens = _all_reduce_grads(params, loss_sum, tokens, where)
    job.scaler.unscale_(job.optimizer)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or math.inf))
    if not math.isfinite(loss_sum) or (not math.isfinite(grad_norm) and not job.scaler.is_enabled()):
        job.rng = _swap_rng(outer, device)
        what = f"loss {loss_sum / config.grad_accum}" if not math.isfinite(loss_sum) else f"gradient norm {grad_norm}"
        raise TrainError(f"job {job.name}: step {job.step + 1}: {what} is not finite; training stopped before the "
                         "optimizer step (the last checkpoint and adapter file are kept). Lower --lr, set "
                         "--max-grad-norm, or check the data")
    lr = job.optimizer.param_groups[0]["lr"]
    job.scaler.step(job.optimizer)
    job.scaler.update()
    job.scheduler.step()
    job.optimizer.zero_grad(set_to_none=True)
    job.rng = _swap_rng(outer, device)
    job.step += 1
    seconds = time.perf_counter() - start
    record = {"job": job.name, "step": job.step, "loss": loss_sum / config.grad_accum, "lr": lr,
              "tokens": tokens, "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
              "grad_norm": grad_norm}
    job.history.append(record)
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


def _rank_weight(batch: dict, where: World) -> float:
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


def _all_reduce_grads(params, loss_sum: float, tokens: int, where: World):
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


# ------------------------------------------------------------------------------------ running

def train(jobs: list[Job], *, resume: dict[str, Path] | None = None,
          on_step: Callable[[Job, dict], None] | None = None) -> list[Job]:
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
        for job in jobs:
            prepare(job, where, resume.get(job.name))
        for job in jobs:
            if job.out is not None and where.main:
                remove_leftovers(job.out)
                if job.name in resume:
                    truncate_metrics(job.out, job.step)
        _run(jobs, where, on_step)
    return jobs


def _run(jobs: list[Job], where: World, on_step: Callable[[Job, dict], None] | None) -> None:
    while not all(job.done for job in jobs):
        for job in jobs:
            if job.done:
                continue
            record = train_step(job, where)
            if job.config.eval_steps and job.eval_data is not None and job.step % job.config.eval_steps == 0:
                record.update(evaluate(job.finetune, job.eval_data, job.config.batch_size))
            checkpoint_due = job.config.save_steps and job.step % job.config.save_steps == 0 and not job.done
            rngs = _gathered_rng(job, where) if checkpoint_due and job.out is not None else None
            if where.main and job.out is not None:
                _append_metrics(job.out, record)
                if checkpoint_due:
                    save_checkpoint(job, rngs)
            if on_step is not None:
                on_step(job, record)
    if where.size > 1:
        import torch.distributed as dist

        dist.barrier()
    for job in jobs:
        final = None
        if job.eval_data is not None:
            final = {"job": job.name, "step": job.step, **evaluate(job.finetune, job.eval_data, job.config.batch_size)}
            job.history.append(final)
        if where.main and job.out is not None:
            save_adapter(job.finetune, job.out / ADAPTER_FILE)
            if final is not None:
                _append_metrics(job.out, final)


def check_output_folder(out: Path, *, resume: Path | None = None) -> None:
    """The folder must be writable, and hold no earlier run unless we resume that run."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".surgery-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise TrainError(f"{out}: cannot write there ({exc.strerror or exc}); choose another --out") from None
    earlier = [p.name for p in out.iterdir() if p.name in (ADAPTER_FILE, "metrics.jsonl") or
               p.name.startswith("checkpoint-")]
    if earlier and resume is None:
        raise TrainError(f"{out}: holds an earlier run ({', '.join(sorted(earlier)[:3])}); choose a new --out, "
                         f"or continue it with --resume {out / 'checkpoint-N'}")


def _append_metrics(out: Path, record: dict) -> None:
    """One JSON line per record; non-finite numbers are written as null (metrics.jsonl stays valid JSON)."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    with open(out / METRICS_FILE, "a") as f:
        f.write(json.dumps(clean, allow_nan=False) + "\n")


def truncate_metrics(out: Path, step: int) -> None:
    """Drop the metrics lines a killed run logged after the checkpoint we resume from (and any torn last line)."""
    path = out / METRICS_FILE
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    atomic_write(path, "".join(f"{line}\n" for line in kept).encode(), error=TrainError)


@contextlib.contextmanager
def run_lock(out: Path):
    """Hold an exclusive lock on OUT for the run: a second run on the same folder fails at once.

    The lock is the kernel's (``flock`` on OUT/.surgery.lock), so a crashed run's lock is released with
    its process; the file holds the owner's pid for the message.
    """
    import fcntl

    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise TrainError(f"{out}: cannot write there ({exc.strerror or exc}); choose another --out") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise TrainError(f"{out}: another surgery run (pid {owner}) is writing to this folder; wait for it to "
                             "finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            (out / LOCK_FILE).unlink(missing_ok=True)
    finally:
        os.close(fd)


def remove_leftovers(out: Path) -> None:
    """Temp files and folders a killed run left in OUT (half-written checkpoints, folders being deleted)."""
    for path in Path(out).iterdir():
        name = path.name
        if name.startswith(".") and (name.endswith(".tmp") or ".deleting-" in name or ".old-" in name):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------ checkpoints

def _gathered_rng(job: Job, where: World) -> torch.Tensor:
    """Every rank's random state, one row per rank (each rank draws its own dropout masks)."""
    if where.size == 1:
        return job.rng.unsqueeze(0)
    import torch.distributed as dist

    rows: list = [None] * where.size
    dist.all_gather_object(rows, job.rng)
    return torch.stack([r.cpu() for r in rows])


def save_checkpoint(job: Job, rngs: torch.Tensor | None = None) -> Path:
    """out/checkpoint-STEP/: adapter file + training state; keeps at most save_total_limit of them.

    The folder is written as a temp folder and renamed: it appears complete or not at all.
    """
    from safetensors.torch import save

    path = job.out / f"checkpoint-{job.step}"
    tensors, meta = _flatten_optimizer(job.optimizer.state_dict())
    tensors["rng"] = rngs if rngs is not None else job.rng.unsqueeze(0)
    state = {
        "step": job.step, "micro": job.micro, "total_steps": job.total_steps, "identity": job.identity,
        "config": asdict(job.config), "optimizer": meta, "scheduler": job.scheduler.state_dict(),
        "scaler": job.scaler.state_dict() if job.scaler.is_enabled() else None,
    }
    with atomic_folder(path, overwrite=True, error=TrainError) as tmp:
        save_adapter(job.finetune, tmp / ADAPTER_FILE)
        atomic_write(tmp / STATE_FILE, save(tensors, metadata={"state": json.dumps(state)}), error=TrainError)
    _rotate(job)
    return path


def _rotate(job: Job) -> None:
    limit = job.config.save_total_limit
    if not limit:
        return
    checkpoints = sorted((p for p in job.out.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                         key=lambda p: int(p.name.split("-")[-1]))
    for old in checkpoints[:-limit]:
        remove_folder(old)  # renamed aside first: never seen half deleted


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, plain_state = {}, {}
    for index, values in state["state"].items():
        plain_state[str(index)] = {}
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                plain_state[str(index)][key] = value
    return tensors, {"state": plain_state, "param_groups": state["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {int(i): dict(v) for i, v in meta["state"].items()}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def read_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The JSON state and the tensors of a checkpoint folder; TrainError when it is not one."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file() or not (path / ADAPTER_FILE).is_file():
        raise TrainError(f"{path}: not a checkpoint folder (needs {ADAPTER_FILE} and {STATE_FILE}; checkpoints are "
                         "written as OUT/checkpoint-STEP by --save-steps)")
    check_user_file(state_file, what="training state file", limit=MAX_STATE_BYTES, error=TrainError)
    try:
        tensors = load_file(state_file)
        with safe_open(str(state_file), "pt") as f:
            text = (f.metadata() or {}).get("state")
        state = json.loads(text) if isinstance(text, str) and len(text) <= 16 * MiB else None
    except (SafetensorError, ValueError, RecursionError, OSError) as exc:
        raise TrainError(f"{state_file}: unreadable training state ({first_line(exc)})") from None
    if not isinstance(state, dict):
        raise TrainError(f"{state_file}: no training state in its metadata; not a file surgery wrote")
    return state, tensors


def _checked_state(path: Path, state: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """The parts of a training state that resume uses, each checked for type (a file may be damaged)."""
    where = path / STATE_FILE

    def need(key: str, kind: type | tuple, container: dict = state, label: str = ""):
        value = container.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
            raise TrainError(f"{where}: {label or key} is missing or not a {getattr(kind, '__name__', kind)} "
                             f"(found {type(value).__name__}); the file is damaged — resume from another checkpoint")
        return value

    step, micro = need("step", int), need("micro", int)
    if step < 0 or micro < 0:
        raise TrainError(f"{where}: negative step or data position; the file is damaged")
    optimizer = need("optimizer", dict)
    need("state", dict, optimizer, "optimizer.state")
    need("param_groups", list, optimizer, "optimizer.param_groups")
    need("scheduler", dict)
    rng = tensors.get("rng")
    cpu_size = torch.get_rng_state().numel()
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8 or rng.dim() not in (1, 2) \
            or rng.shape[-1] < cpu_size:
        raise TrainError(f"{where}: the random state 'rng' is missing or not a uint8 tensor of at least {cpu_size} "
                         "bytes per rank; the file is damaged")
    return state


def _check_optimizer_state(where: Path, job: Job, loaded: dict) -> None:
    """Every parameter's optimizer state must have the entries and shapes one step of this optimizer makes."""
    params = [p for group in job.optimizer.param_groups for p in group["params"]]
    stand_ins = [nn.Parameter(torch.zeros_like(p)) for p in params]
    probe = _optimizer(job.config, stand_ins)
    for p in stand_ins:
        p.grad = torch.zeros_like(p)
    probe.step()
    expected = probe.state_dict()["state"]
    state = loaded.get("state", {})
    if set(state) - set(expected):
        raise TrainError(f"{where}: optimizer state for {len(state)} parameters, but this job trains {len(params)}; "
                         "the file is damaged or from another run")
    for index, entries in state.items():
        wanted = expected[index]
        if set(entries) != set(wanted):
            raise TrainError(f"{where}: optimizer state of parameter {index} has entries {sorted(entries)}, "
                             f"{type(job.optimizer).__name__} needs {sorted(wanted)}; the file is damaged")
        for key, value in entries.items():
            if isinstance(wanted[key], torch.Tensor) and (not isinstance(value, torch.Tensor)
                                                          or value.shape != wanted[key].shape):
                raise TrainError(f"{where}: optimizer state '{index}.{key}' is not a tensor of shape "
                                 f"{tuple(wanted[key].shape)}; the file is damaged")


def _check_rng_state(state: torch.Tensor) -> None:
    """Raise RuntimeError unless torch accepts ``state`` as a CPU random state (changes nothing)."""
    saved = torch.get_rng_state()
    try:
        torch.set_rng_state(state[:saved.numel()].contiguous())
    finally:
        torch.set_rng_state(saved)


def _resume(job: Job, path: Path, where: World) -> None:
    state, tensors = read_checkpoint(path)
    if state.get("identity") != job.identity:
        stored = state.get("identity") if isinstance(state.get("identity"), dict) else {}
        differs = sorted(k for k in set(stored) | set(job.identity) if stored.get(k) != job.identity.get(k))
        raise TrainError(f"{path}: a checkpoint of another run (differs in: {', '.join(differs)}); resume only "
                         "with the same rules, model, data and global batch settings")
    state = _checked_state(path, state, tensors)
    rngs = tensors["rng"] if tensors["rng"].dim() == 2 else tensors["rng"].unsqueeze(0)
    optimizer_state = _unflatten_optimizer(tensors, state["optimizer"])
    _check_optimizer_state(path / STATE_FILE, job, optimizer_state)
    try:
        load_adapter(job.finetune, path / ADAPTER_FILE)
        job.optimizer.load_state_dict(optimizer_state)
        job.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") and job.scaler.is_enabled():
            job.scaler.load_state_dict(state["scaler"])
        _check_rng_state(rngs[where.rank % len(rngs)])
    except SurgeryError:
        raise
    except (KeyError, ValueError, TypeError, IndexError, AttributeError, RuntimeError) as exc:
        raise TrainError(f"{path / STATE_FILE}: cannot be resumed ({type(exc).__name__}: {first_line(exc)}); the "
                         "file is damaged or from another optimizer — resume from another checkpoint") from None
    job.rng = rngs[where.rank % len(rngs)].clone()
    job.step, job.micro = state["step"], state["micro"]


# ------------------------------------------------------------------------------------ building jobs

def make_job(base: nn.Module, name: str, rules, data: str | Path, tokenizer, config: TrainConfig, *,
             out: Path | None = None, eval_data: str | Path | None = None, eval_split: float | None = None,
             mode: str = "entries", block_size: int = 128, pad_token_id: int | None = None,
             model_name: str = "") -> Job:
    """Read and check everything a job needs, then make its fine-tune (seeded): errors come first."""
    from .data import DataError, data_path, file_digest, model_max_length, read_examples, tokenize
    from .rewrite import rewrite
    from .rules import load_rules

    config.check()
    rules = load_rules(rules)
    vocab = _vocab_size(base)
    if pad_token_id is not None and vocab is not None and not 0 <= pad_token_id < vocab:
        raise DataError(f"--pad-token-id {pad_token_id} is outside the model's vocabulary (0 to {vocab - 1}); use "
                        f"the tokenizer's EOS id ({getattr(tokenizer, 'eos_token_id', None)}) or another id below {vocab}")
    limit = model_max_length(base)
    if limit is not None and block_size > limit:
        raise DataError(f"--block-size {block_size} is above {model_name or type(base).__name__}'s maximum "
                        f"sequence length ({limit}); use at most {limit}")
    path = data_path(data)
    blocks = tokenize(read_examples(path, mode), tokenizer, block_size=block_size, mode=mode,
                      pad_token_id=pad_token_id, source=str(path))
    held_out = None
    if eval_data is not None:
        eval_path = data_path(eval_data)
        held_out = tokenize(read_examples(eval_path, mode), tokenizer, block_size=block_size, mode=mode,
                            pad_token_id=pad_token_id, source=str(eval_path))
    elif eval_split:
        if not 0 < eval_split < 1:
            raise DataError(f"--eval-split must be between 0 and 1, got {eval_split}")
        blocks, held_out = blocks.split(eval_split, config.seed)
    identity = {"rules": rules.to_json(), "model": model_name, "data": file_digest(path),
                "eval": file_digest(data_path(eval_data)) if eval_data is not None else eval_split,
                "mode": mode, "block_size": block_size,
                "global_batch": config.batch_size * int(os.environ.get("WORLD_SIZE", "1")),
                "grad_accum": config.grad_accum, "seed": config.seed}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        finetune = rewrite(base, rules)
    return Job(name, finetune, blocks, config, Path(out) if out is not None else None, held_out, identity)


def _vocab_size(base: nn.Module) -> int | None:
    embeddings = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    return getattr(embeddings, "num_embeddings", None) or getattr(getattr(base, "config", None), "vocab_size", None)


def latest_checkpoint(folder: Path) -> Path | None:
    """The complete checkpoint-N folder with the highest N in ``folder``, if any (partial ones are skipped)."""
    numbered = [p for p in Path(folder).glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and p.is_dir()]
    for candidate in sorted(numbered, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        if (candidate / ADAPTER_FILE).is_file() and (candidate / STATE_FILE).is_file():
            return candidate
    return None


def plot_losses(jobs: list[Job], path: Path) -> Path | None:
    """A PNG of each job's training (and eval) loss; None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for job in jobs:
        steps = [r["step"] for r in job.history if "loss" in r]
        ax.plot(steps, [r["loss"] for r in job.history if "loss" in r], label=f"{job.name} train")
        evals = [(r["step"], r["eval_loss"]) for r in job.history if "eval_loss" in r]
        if evals:
            ax.plot(*zip(*evals), "o--", label=f"{job.name} eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def adapter_callback(finetune: nn.Module):
    """A ``transformers.TrainerCallback`` that writes ``adapter.safetensors`` into each Trainer checkpoint
    and into ``output_dir`` at the end, so Trainer runs give surgery adapter files (rank 0 only)."""
    from transformers import TrainerCallback

    class SaveAdapter(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                save_adapter(finetune, Path(args.output_dir) / f"checkpoint-{state.global_step}" / ADAPTER_FILE)

        def on_train_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                save_adapter(finetune, Path(args.output_dir) / ADAPTER_FILE)

    return SaveAdapter()
