"""A run's files: the output folder (lock, leftovers), metrics.jsonl, and checkpoints.

A checkpoint is OUT/checkpoint-STEP/ with an adapter file and a training-state file (safetensors
tensors + JSON: optimizer, scheduler, every rank's random state, step, data position; nothing
pickled). It is written as a temp folder and renamed, so it appears complete or not at all; old
ones are renamed aside before deletion; resume checks every part of a state file before use.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ..base.loading import TOKENIZER_FILES
from ..base.ownership import own_state
from ..disk import MiB, atomic_folder, atomic_write, gate_folder, remove_folder
from ..distributed import World
from ..errors import SurgeryError, TrainError, first_line
from ..files.adapter_file import ADAPTER_FILE, save_adapter
from ..finetune.loading import load_adapter
from .job import Job, Run, build_optimizer

STATE_FILE = "training_state.safetensors"
BEST = "early_stopping.best."  # key prefix of early stopping's best weights in the state file
MASTER = "master."  # key prefix of the fp32 masters of half-precision trainable tensors

METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".surgery.lock"
MAX_STATE_BYTES = 64 << 30
MAX_METRICS_BYTES = 1 << 30  # metrics.jsonl, read whole on resume: a line per step, ~200 bytes each


def earlier_run(out: Path) -> list[str]:
    """The names of what an earlier run left in OUT (adapter file, metrics, checkpoints), sorted."""
    out = Path(out)
    if not out.is_dir():
        return []
    return sorted(
        p.name for p in out.iterdir() if p.name in (ADAPTER_FILE, METRICS_FILE) or p.name.startswith("checkpoint-")
    )


# what the CLI (rules.yaml, loss.png) and the experiment trackers (trackers.py) write into OUT besides the run's own
# files, and the tokenizer with a fine-tune's extra tokens (what tokenizer.save_pretrained writes)
RUN_FILES = (
    "rules.yaml",
    "loss.png",
    "tensorboard",
    "wandb",
    "mlflow.db",
    "mlruns",
    *TOKENIZER_FILES,
)


def _not_a_run(out: Path) -> list[str]:
    """Entries of OUT that no surgery run writes (a user's own files), sorted."""
    if not out.is_dir():
        return []
    return sorted(
        p.name
        for p in out.iterdir()
        if not (
            p.name in (ADAPTER_FILE, METRICS_FILE, LOCK_FILE, *RUN_FILES)
            or p.name.startswith(".")
            or p.name.startswith("checkpoint-")
            or (p.is_dir() and earlier_run(p))
        )
    )


def check_output_folder(out: Path, *, resume: Path | None = None, overwrite: bool = False) -> None:
    """OUT must be writable (or creatable) and hold no earlier run unless we resume it or may move it aside.

    Creates nothing, so the CLI checks every --out before loading a model.
    """
    out = Path(out)
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise TrainError(f"{out}: cannot write there ({existing} is not a folder); choose another --out")
    try:
        probe = existing / f".surgery-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise TrainError(f"{out}: cannot write there ({exc.strerror or exc}); choose another --out") from None
    if resume is not None and out.is_dir():  # the run goes on in OUT: its metrics are read whole and appended to
        gate_folder(out, {METRICS_FILE: MAX_METRICS_BYTES}, what="run folder", error=TrainError)
    earlier = earlier_run(out)
    foreign = _not_a_run(out)
    if overwrite and foreign:
        shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
        raise TrainError(
            f"{out}: holds files that are not a surgery run ({shown}); --overwrite moves only an "
            "earlier run aside, so nothing was moved: choose a new --out"
        )
    if earlier and resume is None and not overwrite:
        shown = ", ".join(earlier[:4]) + (f" and {len(earlier) - 4} more" if len(earlier) > 4 else "")
        has_checkpoint = any(name.startswith("checkpoint-") for name in earlier)
        advice = f"continue it with --resume {out}, " if has_checkpoint else "it has no checkpoint to resume from; "
        raise TrainError(
            f"{out}: holds an earlier run ({shown}); {advice}choose a new --out, or pass --overwrite "
            f"to move it aside (to {aside_path(out)}; nothing is deleted)"
        )


def aside_path(out: Path) -> Path:
    """Where --overwrite moves an earlier run: the first free OUT.replaced-N beside it."""
    n = 1
    while out.with_name(f"{out.name}.replaced-{n}").exists():
        n += 1
    return out.with_name(f"{out.name}.replaced-{n}")


def move_aside(out: Path) -> Path | None:
    """Rename OUT, if it holds an earlier run, to OUT.replaced-N in one atomic step; where it went, or None."""
    out = Path(out)
    if not earlier_run(out):
        return None
    target = aside_path(out)
    try:
        os.rename(out, target)
    except OSError as exc:
        raise TrainError(
            f"{out}: cannot move the earlier run aside to {target} ({exc.strerror or exc}); move or remove it yourself"
        ) from None
    return target


def append_metrics(out: Path, record: dict) -> None:
    """One JSON line per record; non-finite numbers are written as null (metrics.jsonl stays valid JSON)."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    with open(out / METRICS_FILE, "a") as f:
        f.write(json.dumps(clean, allow_nan=False) + "\n")


def truncate_metrics(out: Path, step: int) -> list[dict]:
    """Drop the metrics lines a killed run logged after the checkpoint we resume from (and any torn last line).

    Returns:
        The records kept (the run's log up to ``step``), oldest first; none when OUT has no metrics file.
    """
    path = out / METRICS_FILE
    if not path.is_file():
        return []
    kept, records = [], []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
            records.append(record)
    atomic_write(path, "".join(f"{line}\n" for line in kept).encode(), error=TrainError)
    return records


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
            raise TrainError(
                f"{out}: another surgery run (pid {owner}) is writing to this folder; wait for it to "
                "finish or choose another --out"
            ) from None
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
        if not (name.startswith(".") and (name.endswith(".tmp") or ".deleting-" in name or ".old-" in name)):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def save_checkpoint(run: Run, rngs: torch.Tensor | None = None) -> Path:
    """out/checkpoint-STEP/: adapter file + training state; keeps at most save_total_limit of them.

    The folder is written as a temp folder and renamed: it appears complete or not at all.
    """
    from safetensors.torch import save

    job = run.job
    path = job.out / f"checkpoint-{run.step}"
    tensors, meta = _flatten_optimizer(run.optimizer.state_dict())
    tensors["rng"] = rngs if rngs is not None else run.rng.unsqueeze(0)
    tensors.update(
        {
            f"{MASTER}{index}": master.detach().to("cpu").contiguous()
            for index, (_, master) in enumerate(run.masters.pairs)
        }
    )
    state = {
        "step": run.step,
        "micro": run.micro,
        "total_steps": run.total_steps,
        "identity": job.identity,
        "config": asdict(job.config),
        "optimizer": meta,
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
    }
    if run.early is not None:  # early stopping's record and best weights, so a resumed run stops alike
        early = run.early
        state["early_stopping"] = {
            "best_loss": early.best_loss if math.isfinite(early.best_loss) else None,
            "best_step": early.best_step,
            "evals_since_best": early.evals_since_best,
        }
        tensors.update({f"{BEST}{name}": t.detach().to("cpu").contiguous() for name, t in early.best_weights.items()})
    with atomic_folder(path, overwrite=True, error=TrainError) as tmp:
        save_adapter(job.finetune, tmp / ADAPTER_FILE)
        atomic_write(tmp / STATE_FILE, save(tensors, metadata={"state": json.dumps(state)}), error=TrainError)
    _rotate(job)
    return path


def _rotate(job: Job) -> None:
    limit = job.config.save_total_limit
    if not limit:
        return
    checkpoints = sorted(
        (p for p in job.out.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
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
    if path.is_dir():  # a FIFO or a link out of the folder is refused as such, before any file is opened
        gate_folder(path, {STATE_FILE: MAX_STATE_BYTES}, what="checkpoint folder", error=TrainError)
    if not state_file.is_file() or not (path / ADAPTER_FILE).is_file():
        raise TrainError(
            f"{path}: not a checkpoint folder (needs {ADAPTER_FILE} and {STATE_FILE}; checkpoints are "
            "written as OUT/checkpoint-STEP by --save-steps)"
        )
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
            raise TrainError(
                f"{where}: {label or key} is missing or not a {getattr(kind, '__name__', kind)} "
                f"(found {type(value).__name__}); the file is damaged — resume from another checkpoint"
            )
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
    if (
        not isinstance(rng, torch.Tensor)
        or rng.dtype != torch.uint8
        or rng.dim() not in (1, 2)
        or rng.shape[-1] < cpu_size
    ):
        raise TrainError(
            f"{where}: the random state 'rng' is missing or not a uint8 tensor of at least {cpu_size} "
            "bytes per rank; the file is damaged"
        )
    return state


def _check_optimizer_state(where: Path, run: Run, loaded: dict) -> None:
    """Every parameter's optimizer state must have the entries and shapes one step of this optimizer makes."""
    params = [p for group in run.optimizer.param_groups for p in group["params"]]
    stand_ins = [nn.Parameter(torch.zeros_like(p)) for p in params]
    probe = build_optimizer(run.job.config, stand_ins)
    for p in stand_ins:
        p.grad = torch.zeros_like(p)
    probe.step()
    expected = probe.state_dict()["state"]
    state = loaded.get("state", {})
    if set(state) - set(expected):
        raise TrainError(
            f"{where}: optimizer state for {len(state)} parameters, but this job trains {len(params)}; "
            "the file is damaged or from another run"
        )
    for index, entries in state.items():
        wanted = expected[index]
        if set(entries) != set(wanted):
            raise TrainError(
                f"{where}: optimizer state of parameter {index} has entries {sorted(entries)}, "
                f"{type(run.optimizer).__name__} needs {sorted(wanted)}; the file is damaged"
            )
        for key, value in entries.items():
            if isinstance(wanted[key], torch.Tensor) and (
                not isinstance(value, torch.Tensor) or value.shape != wanted[key].shape
            ):
                raise TrainError(
                    f"{where}: optimizer state '{index}.{key}' is not a tensor of shape "
                    f"{tuple(wanted[key].shape)}; the file is damaged"
                )


def _check_rng_state(state: torch.Tensor) -> None:
    """Raise RuntimeError unless torch accepts ``state`` as a CPU random state (changes nothing)."""
    saved = torch.get_rng_state()
    try:
        torch.set_rng_state(state[: saved.numel()].clone())  # a copy: a view into a bigger tensor crashes it
    finally:
        torch.set_rng_state(saved)


def resume(run: Run, path: Path, where: World) -> None:
    """Continue ``run`` from a checkpoint folder: TrainError naming the file for anything wrong or foreign."""
    job = run.job
    state, tensors = read_checkpoint(path)
    if state.get("identity") != job.identity:
        stored = state.get("identity") if isinstance(state.get("identity"), dict) else {}
        differs = sorted(k for k in set(stored) | set(job.identity) if stored.get(k) != job.identity.get(k))
        raise TrainError(
            f"{path}: a checkpoint of another run (differs in: {', '.join(differs)}); resume only "
            "with the same rules, model, data and global batch settings"
        )
    state = _checked_state(path, state, tensors)
    rngs = tensors["rng"] if tensors["rng"].dim() == 2 else tensors["rng"].unsqueeze(0)
    optimizer_state = _unflatten_optimizer(tensors, state["optimizer"])
    _check_optimizer_state(path / STATE_FILE, run, optimizer_state)
    masters = _checked_masters(path / STATE_FILE, run, tensors)
    try:
        load_adapter(job.finetune, path / ADAPTER_FILE)
        run.masters.reload(masters)
        run.optimizer.load_state_dict(optimizer_state)
        run.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") and run.scaler.is_enabled():
            run.scaler.load_state_dict(state["scaler"])
        _check_rng_state(rngs[where.rank % len(rngs)])
    except SurgeryError:
        raise
    except (KeyError, ValueError, TypeError, IndexError, AttributeError, RuntimeError) as exc:
        raise TrainError(
            f"{path / STATE_FILE}: cannot be resumed ({type(exc).__name__}: {first_line(exc)}); the "
            "file is damaged or from another optimizer — resume from another checkpoint"
        ) from None
    if run.early is not None and "early_stopping" in state:
        _resume_early_stopping(run, path / STATE_FILE, state["early_stopping"], tensors)
    run.rng = rngs[where.rank % len(rngs)].clone()
    run.step, run.micro = state["step"], state["micro"]


def _checked_masters(where: Path, run: Run, tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The checkpoint's fp32 masters, one per half trainable tensor of this run, each of its shape."""
    saved = [tensors.get(f"{MASTER}{index}") for index in range(len(run.masters.pairs))]
    if sum(name.startswith(MASTER) for name in tensors) > len(saved):
        raise TrainError(
            f"{where}: more fp32 masters than this run's {len(saved)} half-precision trainable "
            "tensors; the file is from another run — resume from another checkpoint"
        )
    for index, ((p, _), master) in enumerate(zip(run.masters.pairs, saved)):
        if not isinstance(master, torch.Tensor) or master.dtype != torch.float32 or master.shape != p.shape:
            raise TrainError(
                f"{where}: the fp32 master '{MASTER}{index}' of a half-precision trainable tensor of "
                f"shape {tuple(p.shape)} is missing or is not float32 of that shape; the file is damaged "
                "or from another run — resume from another checkpoint"
            )
    return saved


def _resume_early_stopping(run: Run, where: Path, saved, tensors: dict[str, torch.Tensor]) -> None:
    """Early stopping's best loss, step, count and weights from a checkpoint, each checked."""
    ok = isinstance(saved, dict) and (saved.get("best_loss") is None or _is_number(saved.get("best_loss")))
    counts = [saved.get(k) if isinstance(saved, dict) else None for k in ("best_step", "evals_since_best")]
    if not ok or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
        raise TrainError(
            f"{where}: early_stopping is not {{best_loss, best_step, evals_since_best}}; the file is "
            "damaged — resume from another checkpoint"
        )
    own = own_state(run.job.finetune)
    best = {name[len(BEST) :]: t for name, t in tensors.items() if name.startswith(BEST)}
    if best and (best.keys() != own.keys() or any(best[k].shape != own[k].shape for k in own)):
        raise TrainError(
            f"{where}: the best weights kept for early stopping do not match this fine-tune's "
            "tensors; the file is damaged or from another run"
        )
    run.early.best_loss = math.inf if saved["best_loss"] is None else float(saved["best_loss"])
    run.early.best_step, run.early.evals_since_best = counts
    run.early.best_weights = {name: t.to(own[name].device, own[name].dtype) for name, t in best.items()}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def latest_checkpoint(folder: Path) -> Path | None:
    """The complete checkpoint-N folder with the highest N in ``folder``, if any (partial ones are skipped)."""
    numbered = [p for p in Path(folder).glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and p.is_dir()]
    for candidate in sorted(numbered, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        if (candidate / ADAPTER_FILE).is_file() and (candidate / STATE_FILE).is_file():
            return candidate
    return None


def resume_points(resume: Path | None, jobs: dict[str, Path | None], named: bool = False) -> dict[str, Path]:
    """Where each job resumes: ``resume`` itself when it is a checkpoint folder (one job), else each job's newest
    checkpoint in the --out ``resume`` of an earlier run (OUT for one job, OUT/NAME for each of --job ``named``).

    Args:
        resume: --resume, or None.
        jobs: the jobs' names (and output folders).
        named: the jobs came from --job (each has its own subfolder).

    Returns:
        The checkpoint folder of each job.

    Raises:
        TrainError: a folder that is not there, or a job without a checkpoint, in one line naming it.
    """
    if resume is None:
        return {}
    if not resume.exists():
        raise TrainError(
            f"--resume {resume}: no such folder; give a checkpoint-N folder or the --out of an earlier run"
        )
    if not resume.is_dir():
        raise TrainError(f"--resume {resume}: is a file; give a checkpoint-N folder or the --out of an earlier run")
    if (resume / STATE_FILE).exists():
        if len(jobs) > 1:
            raise TrainError(f"--resume {resume}: a checkpoint of one job; with several jobs give the run's --out")
        return {next(iter(jobs)): resume}
    out = {}
    for name in jobs:
        folder = resume / name if named else resume
        found = latest_checkpoint(folder) if folder.is_dir() else None
        if found is None:
            raise TrainError(f"--resume {resume}: no checkpoint-N folder for job {name} in {folder}")
        out[name] = found
    return out
