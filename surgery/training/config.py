"""The configs of a training run: ``TrainConfig`` (schedule, optimizer, evaluation, checkpoints, memory, how the jobs
run), ``DataConfig`` (how the data is read and cut into rows) and ``TrackerConfig`` (experiment trackers).

Frozen, keyword-only dataclasses: each field is an option (``surgery.options.option``) whose metadata holds its
help text and panel, so ``surgery train``'s options, ``surgery.train(...)`` and the docs' option reference all
come from here. Every value is checked in ``__post_init__``, with a message naming the option as the command line
spells it; an option that does nothing without another one is refused, naming the one it needs.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

from ..combinations import check
from ..errors import DataError, TrainError, first_line
from ..options import flag, flags_of, option, set_options
from ..package import install_hint

Schedule = Literal["cosine", "linear", "constant"]
Precision = Literal["fp32", "bf16", "fp16"]
OptimizerName = Literal["adamw", "adamw8bit"]
SCHEDULES: tuple[Schedule, ...] = ("cosine", "linear", "constant")
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16", "fp16")
OPTIMIZERS: tuple[OptimizerName, ...] = ("adamw", "adamw8bit")
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.manual_seed accepts
LOSS_CHUNK_TOKENS = 512  # tokens per chunk of the output layer + cross-entropy: one chunk's logits at a time

SCHEDULE = "Schedule & optimizer"
EVALUATION = "Evaluation & early stopping"
CHECKPOINTS = "Checkpoints"
MEMORY = "Memory"
JOBS = "Several jobs & distributed"
DATA = "Data"
OUTPUT = "Output"


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How each fine-tune trains: schedule, optimizer, evaluation, checkpoints, memory, and how the jobs run."""

    batch_size: int = option(8, help="Rows per micro-batch (per process).", panel=SCHEDULE)
    grad_accum: int = option(1, help="Micro-batches per optimizer step.", panel=SCHEDULE)
    lr: float = option(2e-4, help="Peak learning rate.", panel=SCHEDULE)
    epochs: int = option(1, help="Passes over the data (unless --max-steps).", panel=SCHEDULE)
    max_steps: int | None = option(None, help="Optimizer steps (overrides --epochs).", panel=SCHEDULE)
    warmup: int = option(0, help="Warmup steps.", panel=SCHEDULE)
    schedule: Schedule = option("cosine", help="Learning-rate schedule after warmup.", panel=SCHEDULE)
    weight_decay: float = option(0.0, help="AdamW weight decay (matrices only).", panel=SCHEDULE)
    max_grad_norm: float = option(1.0, help="Gradient clipping (0: off).", panel=SCHEDULE)
    seed: int = option(0, help="Seed of adapter init, data order and dropout.", panel=SCHEDULE)
    precision: Precision = option("fp32", help="Autocast precision of the forward pass.", panel=SCHEDULE)
    optimizer: OptimizerName = option("adamw", help="AdamW, or bitsandbytes' 8-bit AdamW.", panel=SCHEDULE)
    compile: bool = option(
        False,
        help="torch.compile each fine-tune's forward (fp, int8, nf4 bases; the first steps compile).",
        panel=SCHEDULE,
    )
    compile_backend: str | None = option(
        None, help="With --compile: a torch.compile backend (default inductor).", panel=SCHEDULE
    )
    logging_steps: int = option(
        10,
        help="With output to a file or pipe: one progress line per job every N steps (and at the first and last).",
        panel=OUTPUT,
    )
    eval_steps: int | None = option(None, help="Evaluate every N steps.", panel=EVALUATION)
    early_stopping_patience: int | None = option(
        None,
        help="Stop a job after N evaluations (--eval-steps) without a better eval loss; its adapter keeps the best "
        "weights.",
        panel=EVALUATION,
    )
    early_stopping_threshold: float = option(
        0.0, help="How much an eval loss must beat the best to count as better.", panel=EVALUATION
    )
    save_steps: int | None = option(
        None, help="Checkpoint every N steps and at the last (to resume and train longer).", panel=CHECKPOINTS
    )
    save_total_limit: int | None = option(None, help="Keep only the newest N checkpoints.", panel=CHECKPOINTS)
    gradient_checkpointing: bool = option(
        False,
        help="Recompute each decoder layer's activations in backward instead of keeping them: less memory, about a "
        "third more compute.",
        panel=MEMORY,
    )
    loss_chunk_tokens: int = option(
        LOSS_CHUNK_TOKENS,
        help="The loss from the last hidden states, this many tokens at a time: no tokens x vocabulary logits in "
        "memory (0: the model's own loss over the full logits, as always under --fsdp).",
        panel=MEMORY,
    )
    mlp_chunk_tokens: int = option(
        0,
        help="Compute each decoder layer's MLP this many tokens at a time (each chunk recomputed in backward): its "
        "inner activations never exist for the whole sequence (0: off). For long context.",
        panel=MEMORY,
    )
    offload_activations: bool = option(
        False,
        help="With --gradient-checkpointing on CUDA: keep each layer's saved input in pinned host memory until "
        "backward (copied on a side stream); nothing to do on the CPU.",
        panel=MEMORY,
    )
    batched: bool = option(
        False,
        help="Several --job: run every job's micro-batch through one shared base pass per micro-step (same results "
        "as taking turns, faster).",
        panel=JOBS,
    )
    max_batched_tokens: int | None = option(
        None,
        help="With --batched: at most this many padded tokens (rows x length) per pass; jobs beyond it go in further "
        "passes (bounds activation memory).",
        panel=JOBS,
    )
    fsdp: bool = option(
        False,
        help="Under torchrun / accelerate launch: shard the shared base over the processes with FSDP2 (each holds "
        "about 1/N of it); nf4 or unquantized bases.",
        panel=JOBS,
    )

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "epochs", "logging_steps"):
            _at_least_one(self, name, getattr(self, name))
        for name in ("max_steps", "eval_steps", "save_steps", "save_total_limit", "early_stopping_patience"):
            if getattr(self, name) is not None:
                _at_least_one(self, name, getattr(self, name))
        _finite(self, "lr", self.lr, above_zero=True)
        for name in ("weight_decay", "max_grad_norm", "early_stopping_threshold"):
            _finite(self, name, getattr(self, name))
        if self.warmup < 0:
            raise TrainError(f"--warmup must be >= 0, got {self.warmup}")
        if self.mlp_chunk_tokens < 0:
            raise TrainError(f"--mlp-chunk-tokens must be >= 0 (0: off), got {self.mlp_chunk_tokens}")
        if self.loss_chunk_tokens < 0:
            raise TrainError(f"--loss-chunk-tokens must be >= 0 (0: the full logits), got {self.loss_chunk_tokens}")
        if not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise TrainError(
                f"--seed must be between {SEED_RANGE[0]} and {SEED_RANGE[1]} (torch's range), got {self.seed}"
            )
        for name, allowed in (("schedule", SCHEDULES), ("precision", PRECISIONS), ("optimizer", OPTIMIZERS)):
            if getattr(self, name) not in allowed:
                raise TrainError(f"--{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        check(set_options(self), only=flags_of(type(self)))
        if self.compile_backend is not None:
            _check_backend(self.compile_backend)

    @property
    def chunked_loss(self) -> int:
        """Tokens per chunk of the loss this run computes (0: the model's own loss over the full logits). FSDP2
        gathers the output layer in the root module's forward, which the chunked loss goes around: the full loss."""
        return 0 if self.fsdp else self.loss_chunk_tokens

    @property
    def backend(self) -> str:
        """The torch.compile backend --compile uses."""
        return self.compile_backend or "inductor"


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """How the training (and evaluation) data is read and cut into rows."""

    eval_data: str | None = option(
        None,
        flag="--eval",
        help="Evaluation data (any --data form; a dataset with splits gives its validation or test split).",
        panel=EVALUATION,
    )
    eval_split: float | None = option(
        None, help="Hold out this fraction of the training data for evaluation.", panel=EVALUATION
    )
    block_size: int = option(128, help="Tokens per row.", panel=DATA)
    pad_token_id: int | None = option(None, help="For tokenizers without a pad token.", panel=DATA)
    chat_template: bool = option(
        False,
        help="Render prompt/completion rows with the tokenizer's chat template (`messages` rows always are); loss on "
        "the assistant's answer only.",
        panel=DATA,
    )
    group_texts: bool = option(
        False,
        help="Corpus mode: examples (a .txt file whole) joined with EOS and cut into blocks (default: one example per "
        "row, padded).",
        panel=DATA,
    )
    packing: bool = option(
        False,
        help="Fill each row with several whole examples (positions restart, attention never crosses them); eval rows "
        "stay single.",
        panel=DATA,
    )
    text_field: str = option("text", help="Column holding a row's text.", panel=DATA)
    prompt_field: str = option("prompt", help="Column holding the prompt (no loss).", panel=DATA)
    completion_field: str = option("completion", help="Column holding the completion.", panel=DATA)
    messages_field: str = option("messages", help="Column holding a conversation.", panel=DATA)
    dataset_config: str | None = option(
        None, help="A configuration of a dataset named by --data (e.g. wikitext-2-raw-v1), from the cache.", panel=DATA
    )
    dataset_train_split: str | None = option(
        None, help="The split of a stored dataset to train on (default: train).", panel=DATA
    )
    dataset_test_split: str | None = option(
        None, help="The split --eval reads (default: validation, test or eval).", panel=EVALUATION
    )
    extra_tokens: Path | None = option(
        None,
        help="A file of new tokens, one per line: each fine-tune adds them to its tokenizer and trains embedding and "
        "output rows of its own (the base stays as is).",
        panel=DATA,
    )

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise DataError(f"--block-size must be at least 1, got {self.block_size}")
        if self.pad_token_id is not None and self.pad_token_id < 0:
            raise DataError(f"--pad-token-id must be >= 0, got {self.pad_token_id}")
        if self.eval_split is not None and not (math.isfinite(self.eval_split) and 0 < self.eval_split < 1):
            raise DataError(f"--eval-split must be between 0 and 1, got {self.eval_split}")
        check(set_options(self), only=flags_of(type(self)))
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, str) and not value.strip():
                raise DataError(f"{flag(type(self), f.name)} is empty; give a value or leave the option out")

    @property
    def mode(self) -> Literal["corpus", "entries"]:
        """corpus (--group-texts) or entries (one example per row)."""
        return "corpus" if self.group_texts else "entries"


@dataclass(frozen=True, kw_only=True)
class TrackerConfig:
    """Experiment trackers: one run per job, with the rules, plan and settings as its config."""

    report_to: str = option(
        "none",
        help="Experiment trackers, one run per job: tensorboard, wandb, mlflow (comma-separated) or none; runs kept "
        "in OUT.",
        panel=OUTPUT,
    )

    def __post_init__(self) -> None:
        parse_report_to(self.report_to)  # known and installed, or a TrainError naming the extra

    @property
    def trackers(self) -> tuple[str, ...]:
        return parse_report_to(self.report_to)


TrackerName = Literal["tensorboard", "wandb", "mlflow"]
TRACKERS: tuple[TrackerName, ...] = ("tensorboard", "wandb", "mlflow")
# what each one imports (MLflow's local store is SQLite through SQLAlchemy, its schema made by Alembic)
MODULES = {"tensorboard": ("tensorboard",), "wandb": ("wandb",), "mlflow": ("mlflow", "sqlalchemy", "alembic")}


def parse_report_to(value: str | list[str] | tuple[str, ...] | None) -> tuple[TrackerName, ...]:
    """Tracker names from ``--report-to`` (comma-separated, or a list; ``none`` or empty: no tracker), each
    checked to be known and installed: TrainError naming the extra otherwise."""
    names = value.split(",") if isinstance(value, str) else list(value or ())
    names = [n.strip().lower() for n in names if n.strip()]
    if names == ["none"]:
        return ()
    out: list[TrackerName] = []
    for name in names:
        if name not in TRACKERS:
            raise TrainError(
                f"--report-to {name!r}: unknown tracker; use {', '.join(TRACKERS)} or none (several: tensorboard,wandb)"
            )
        if name not in out:
            out.append(name)  # type: ignore[arg-type]
    for name in out:
        _require(name)
    return tuple(out)


def _require(name: TrackerName) -> None:
    try:
        for module in MODULES[name]:
            importlib.import_module(module)
    except ImportError as exc:
        raise TrainError(
            f"--report-to {name} needs the {name} package ({first_line(exc)}); install it with {install_hint(name)}"
        ) from None


def _at_least_one(config, name: str, value: int) -> None:
    if value < 1:
        raise TrainError(f"{flag(type(config), name)} must be at least 1, got {value}")


def _finite(config, name: str, value: float, *, above_zero: bool = False) -> None:
    if not math.isfinite(value) or value < 0 or (above_zero and value == 0):
        bound = "> 0" if above_zero else ">= 0"
        extra = " (0 turns clipping off)" if name == "max_grad_norm" else ""
        raise TrainError(f"{flag(type(config), name)} must be a finite number {bound}{extra}, got {value}")


def _check_backend(backend: str) -> None:
    import torch

    known = torch.compiler.list_backends(exclude_tags=())
    if backend not in known:
        raise TrainError(
            f"--compile-backend must be one of {', '.join(torch.compiler.list_backends())} (or a debug backend such "
            f"as aot_eager), not {backend!r}"
        )
