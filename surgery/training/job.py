"""A training job: what it trains (``Job``, with its ``TrainConfig``) and its progress (``Run``).

``make_job`` reads and checks everything a job needs (rules, data, options) and only then makes its
fine-tune, so a bad job fails before anything changes. The spec is fixed; everything that changes
while training (step, optimizer, scheduler, random state) lives in the job's ``Run``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..base.shared_base import sharded_root
from ..errors import DataError, TrainError, first_line
from ..random_state import forked_rng
from .config import DataConfig, TrainConfig
from .data import Blocks, DataSource, PackedMask, block_mask, read_data
from .loss import CausalLMParts, causal_lm_parts, model_loss
from .master_weights import MasterWeights


@dataclass(frozen=True)
class Job:
    """One fine-tune to train: the model, its data, settings, output folder and resume identity."""

    name: str
    finetune: nn.Module
    data: Blocks
    config: TrainConfig
    out: Path | None = None
    eval_data: Blocks | None = None
    identity: dict = field(default_factory=dict)  # what a resumed run must match (rules, data, model, ...)
    tokenizer: Any = None  # with the fine-tune's extra tokens added: written beside its adapter file
    loss_parts: CausalLMParts | None = None  # the fine-tune split for the chunked loss (None: the model's own loss)

    def loss(self, batch: dict) -> torch.Tensor:
        """The fine-tune's causal LM loss on one batch (with ``labels``): chunked unless the config says not."""
        return model_loss(self.finetune, batch, self.loss_parts, self.config.chunked_loss)

    def __repr__(self) -> str:
        return (
            f"Job({self.name!r}, {type(self.finetune).__name__}, {len(self.data)} rows, "
            f"out={str(self.out) if self.out else None!r})"
        )


@dataclass
class EarlyStopping:
    """Early stopping on eval loss: the best loss so far, its step and the trainable weights it had, and
    the evaluations since; ``stopped`` once ``early_stopping_patience`` of them brought no improvement."""

    best_loss: float = math.inf
    best_step: int = 0
    evals_since_best: int = 0
    best_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    stopped: bool = False


@dataclass
class Run:
    """A job's progress while it trains: step, data position, optimizer, scheduler, random state, log."""

    job: Job
    total_steps: int
    optimizer: torch.optim.Optimizer
    scheduler: object  # a torch LRScheduler
    scaler: torch.amp.GradScaler
    rng: torch.Tensor  # this rank's random state (dropout), swapped in for the job's steps only
    step: int = 0
    micro: int = 0  # micro-batches consumed (data position)
    history: list[dict] = field(default_factory=list)
    order: tuple[int, torch.Tensor] | None = None  # (epoch, its row permutation)
    early: EarlyStopping | None = None  # with --early-stopping-patience
    masters: MasterWeights = field(default_factory=MasterWeights)  # fp32 masters of half trainable tensors

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps or (self.early is not None and self.early.stopped)

    def __repr__(self) -> str:
        return f"Run({self.job.name!r}, step {self.step}/{self.total_steps})"


def build_optimizer(config: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW (or bitsandbytes' 8-bit AdamW) with weight decay on matrices only."""
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
        raise TrainError(
            f"--optimizer adamw8bit is not available here ({type(exc).__name__}: "
            f"{first_line(exc)}); bitsandbytes' 8-bit optimizers do not "
            "run on this platform — use --optimizer adamw"
        ) from None


def _probe_8bit_optimizer(device: torch.device) -> None:
    """bitsandbytes builds 8-bit optimizers anywhere but may fail at the first step: try one on a dummy."""
    import bitsandbytes as bnb

    dummy = nn.Parameter(torch.zeros(4096, device=device))
    opt = bnb.optim.AdamW8bit([dummy], lr=1e-3)
    dummy.grad = torch.ones_like(dummy)
    opt.step()


def build_scheduler(config: TrainConfig, optimizer, total: int):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[config.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=config.warmup, num_training_steps=total)


def make_job(
    base: nn.Module,
    *,
    name: str,
    rules,
    data: DataSource | str | Path,
    tokenizer,
    config: TrainConfig = TrainConfig(),
    data_config: DataConfig = DataConfig(),
    out: str | Path | None = None,
    model_name: str = "",
) -> Job:
    """Check everything a job needs against the model, then make its fine-tune (seeded): errors come first.

    Args:
        base: the shared base.
        name: the job's name (its folder under a run's --out, its tracker run).
        rules: its rule file (a RuleSet, a path or a bundled name).
        data: its training data: a ``DataSource`` read with ``read_data`` before the model loaded, or a path or
            name to read now (JSONL, CSV, TXT, stored datasets, bundled sets; ``data_config`` says how).
        tokenizer: the base's tokenizer (extended with the rules' extra tokens here).
        config: how it trains.
        data_config: how the data is read and cut into rows.
        out: its output folder (adapter file, metrics, checkpoints), or None.
        model_name: the base's name, for messages and the resume identity.

    Returns:
        The job, its fine-tune made and its data tokenized.

    Raises:
        DataError, TrainError, PlanError: before the fine-tune is made.
    """
    from ..finetune.rewriting import rewrite
    from ..finetune.vocabulary import pinned_to, tokenizer_with
    from ..rules.rule_file import load_rules
    from .data import data_digest, pack, render, tokenize

    source = data if isinstance(data, DataSource) else read_data(data, data_config)
    rules = pinned_to(load_rules(rules), tokenizer)
    if rules.extra_tokens is not None:  # the data reads the new tokens with the ids the fine-tune gives them
        tokenizer = tokenizer_with(rules.extra_tokens, rules.extra_tokens.first_id, tokenizer)
    _check_model(base, config, data_config, tokenizer, model_name)
    keep_apart = _packed_attention(base, model_name or type(base).__name__) if data_config.packing else "positions"
    mode, cut = data_config.mode, dict(block_size=data_config.block_size, pad_token_id=data_config.pad_token_id)
    examples, templated = render(source.examples, tokenizer, data_config.chat_template, str(source.path))
    blocks = tokenize(examples, tokenizer, mode=mode, source=str(source.path), **cut)
    held_out, eval_digest = None, data_config.eval_split
    if source.eval_examples is not None:
        eval_examples, _ = render(source.eval_examples, tokenizer, data_config.chat_template, str(source.eval_path))
        held_out = tokenize(eval_examples, tokenizer, mode=mode, source=str(source.eval_path), **cut)
        eval_digest = data_digest(source.eval_path, source.eval_examples)
    elif data_config.eval_split:
        blocks, held_out = blocks.split(data_config.eval_split, config.seed)
    if data_config.packing:
        blocks = pack(blocks, keep_apart)
    identity = {
        "rules": rules.to_json(),
        "model": model_name,
        "data": data_digest(source.path, source.examples),
        "eval": eval_digest,
        "mode": mode,
        "block_size": data_config.block_size,
        "global_batch": config.batch_size * int(os.environ.get("WORLD_SIZE", "1")),
        "grad_accum": config.grad_accum,
        "seed": config.seed,
        **({"chat_template": tokenizer.chat_template} if templated else {}),
        **({"packing": True} if data_config.packing else {}),
    }
    with forked_rng():
        torch.manual_seed(config.seed)
        finetune = rewrite(base, rules)
    # the chunked loss calls the body and the output layer itself: not on a base FSDP2 shards (its root's forward
    # gathers them), which computes the model's own loss; probed once, before the first step
    chunked = config.chunked_loss and sharded_root(base) is None
    parts = causal_lm_parts(finetune) if chunked else None
    if config.gradient_checkpointing:
        checkpoint_activations(finetune)
    if config.compile:  # the chunked loss calls the body itself: compile what runs
        compile_forward(finetune if parts is None else parts.body, config.backend)
    return Job(
        name,
        finetune,
        blocks,
        config,
        Path(out) if out is not None else None,
        held_out,
        identity,
        tokenizer if rules.extra_tokens is not None else None,
        parts,
    )


def _check_model(base: nn.Module, config: TrainConfig, data_config: DataConfig, tokenizer, model_name: str) -> None:
    """What the job's options ask of this model: checkpointing support, a pad id in its vocabulary, a block size
    within its context."""
    from .data import check_block_size, model_max_length

    if config.gradient_checkpointing and not getattr(base, "supports_gradient_checkpointing", False):
        raise TrainError(
            f"--gradient-checkpointing: {type(base).__name__} does not support transformers' activation "
            "checkpointing; train without it"
        )
    vocab, pad = _vocab_size(base), data_config.pad_token_id
    if pad is not None and vocab is not None and not 0 <= pad < vocab:
        raise DataError(
            f"--pad-token-id {pad} is outside the model's vocabulary (0 to {vocab - 1}); use "
            f"the tokenizer's EOS id ({getattr(tokenizer, 'eos_token_id', None)}) or another id below {vocab}"
        )
    check_block_size(data_config.block_size, model_max_length(base), model_name or type(base).__name__)


def checkpoint_activations(finetune: nn.Module) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them (transformers'
    activation checkpointing, non-reentrant; the dropout masks are replayed), on this fine-tune's own
    module objects: the base and other fine-tunes are untouched."""
    enable = getattr(finetune, "activation_checkpointing_enable", None)
    if enable is not None:
        enable({"use_reentrant": False})
    else:  # transformers before activation_checkpointing_enable
        finetune.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def compile_forward(finetune: nn.Module, backend: str) -> None:
    """torch.compile the fine-tune's forward in place (``nn.Module.compile``: the same object, so its state dict,
    adapter files and shared base are as without), after a probe that the backend works on the fine-tune's device
    (inductor needs a C++ compiler on the CPU, Triton on CUDA): a TrainError before training rather than an error
    deep inside the first step."""
    from ..base.shared_base import refuse_sharded

    refuse_sharded(finetune, "--compile", "train without --compile")
    device = next((p.device for p in finetune.parameters() if p.requires_grad), torch.device("cpu"))  # where steps run
    try:
        probe = torch.compile(lambda x: torch.sin(x) * 2, backend=backend)
        if not torch.equal(probe(torch.zeros(3, device=device)), torch.zeros(3, device=device)):
            raise RuntimeError("the compiled probe gave a wrong answer")
    except Exception as exc:
        raise TrainError(
            f"--compile: torch.compile with backend {backend!r} does not work here ({type(exc).__name__}: "
            f"{first_line(exc)}); train without --compile, or pick another --compile-backend"
        ) from None
    finetune.compile(backend=backend)


def _vocab_size(base: nn.Module) -> int | None:
    embeddings = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    return getattr(embeddings, "num_embeddings", None) or getattr(getattr(base, "config", None), "vocab_size", None)


def _packed_attention(model: nn.Module, name: str) -> PackedMask:
    """How packed rows keep examples apart in this model, probed on six tokens (two examples of three): the second
    example's logits packed must be its logits alone. Restarting position ids first (transformers builds the mask
    from them); under flash attention the same ids over each micro-batch flattened into one row (transformers
    reads packed position ids there only for a batch of one row); for a model whose mask ignores them (OPT), a 4D
    block-diagonal mask of the form its attention takes (boolean for SDPA, additive for eager). Runs before
    anything changes (the training flag is put back)."""
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    positions = torch.tensor([[0, 1, 2, 0, 1, 2]])
    attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
    first: PackedMask = "flattened" if "flash" in str(attention) else "positions"
    forms: list[PackedMask] = [first] + {"sdpa": ["bool"], "eager": ["additive"]}.get(attention, [])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(p.device for p in model.parameters())
            logits = model(input_ids=ids[:, 3:].to(device), use_cache=False).logits
            tolerance = max(1e-3, 4 * torch.finfo(logits.dtype).eps)  # bf16 logits differ by rounding alone
            alone = logits[0].float()
            for form in forms:
                extra = {} if form == first else {"attention_mask": block_mask(positions, form).to(device)}
                packed = (
                    model(input_ids=ids.to(device), position_ids=positions.to(device), use_cache=False, **extra)
                    .logits[0, 3:]
                    .float()
                )  # one row: flattened is the same six tokens
                if (packed - alone).abs().max() <= tolerance * alone.abs().max() + 1e-5:
                    return form
    finally:
        model.train(was_training)
    raise DataError(
        f"--packing: {name} ({type(model).__name__}, {attention} attention) does not keep packed examples "
        "apart, from restarting position ids or from a block-diagonal mask; train it without --packing"
    )
