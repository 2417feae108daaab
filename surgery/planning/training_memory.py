"""The peak memory of a training run on each device, predicted before anything is downloaded or loaded.

peak = base (exact, from the plan) + per training fine-tune: its own tensors, their gradients and the
optimizer's state (exact: each half-precision tensor gets an fp32 master with an fp32 gradient;
AdamW keeps two moments in the dtype it steps; bitsandbytes' 8-bit AdamW two uint8 states and a
float32 absmax per 256 elements, or two float32 states under 4096 elements) + activations
(estimated) + a margin for the CUDA context and allocator; under ``--fsdp`` each rank holds its shard
plus what FSDP2 gathers at once (``gathered_bytes``).

Activations are estimated by running the fine-tune's forward and loss on the meta device (no memory,
no weights) and counting every tensor autograd saves for backward, each storage once, plus the
gradient of the logits that backward starts from. Frozen quantized layers are stood in for by frozen
plain layers: bitsandbytes' matmuls save no more for an input gradient than a frozen Linear does.
With activation checkpointing a decoder layer keeps only its input, and one layer's activations
are live again while it is recomputed.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import TYPE_CHECKING, Literal

from .memory import DTYPE_BYTES, base_bytes_by_device, extra_token_tensors, fmt_bytes, lora_dims

if TYPE_CHECKING:
    from torch import nn

    from .decisions import Plan

GiB = 1 << 30
CUDA_CONTEXT_BYTES = GiB  # the CUDA context, cuBLAS workspaces and allocator slack (measured ~0.5-0.9 GiB)
ROOT_GROUP = "root"
OptimizerName = Literal["adamw", "adamw8bit"]
PrecisionName = Literal["fp32", "bf16", "fp16"]


DeviceKind = Literal["cuda", "cpu"]


@dataclass(frozen=True)
class TrainingShape:
    """What sizes a training run's memory besides the model and the rules: ``surgery train``'s options (build it
    from the run's configs with ``from_configs``)."""

    batch_size: int
    block_size: int
    gradient_checkpointing: bool = False
    optimizer: OptimizerName = "adamw"
    precision: PrecisionName = "fp32"
    finetunes: int = 1
    world_size: int = 1
    fsdp: bool = False
    attention: Literal["fused", "math"] = "fused"  # fused: SDPA's flash / memory-efficient kernels (no (T, T) scores)
    loss_chunk_tokens: int = 512  # 0: the model's own loss over the full logits
    offload_activations: bool = False  # with checkpointing on CUDA: the layers' inputs wait in pinned host memory
    device: DeviceKind = "cuda"
    mlp_chunk_tokens: int = 0  # each decoder layer's MLP this many tokens at a time (0: whole)

    def __post_init__(self) -> None:
        for name in ("batch_size", "block_size", "finetunes", "world_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainingShape.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("loss_chunk_tokens", "mlp_chunk_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainingShape.{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def from_configs(
        cls, training, data_config, devices, *, cuda: bool, finetunes: int = 1, world_size: int = 1
    ) -> TrainingShape:
        """The shape of the run ``surgery.train`` makes of these configs (read by attribute, so planning stays
        below training).

        Args:
            training: a ``TrainConfig`` (batch size, checkpointing, optimizer, precision, loss chunks, offloading,
                FSDP).
            data_config: a ``DataConfig`` (block size).
            devices: a ``DeviceConfig`` (attention implementation: eager keeps the (T, T) scores).
            cuda: whether the run computes on CUDA.
            finetunes: fine-tunes trained on the base.
            world_size: processes of the launch.

        Returns:
            The shape.
        """
        return cls(
            batch_size=training.batch_size,
            block_size=data_config.block_size,
            gradient_checkpointing=training.gradient_checkpointing,
            optimizer=training.optimizer,
            precision=training.precision,
            finetunes=finetunes,
            world_size=world_size,
            fsdp=training.fsdp,
            attention="math" if devices.attn_implementation == "eager" else "fused",
            loss_chunk_tokens=training.chunked_loss,
            offload_activations=training.offload_activations,
            device="cuda" if cuda else "cpu",
            mlp_chunk_tokens=training.mlp_chunk_tokens,
        )

    def describe(self) -> str:
        """Where and how the verdict assumes the run computes: 'CUDA, bf16 autocast' or 'the CPU, fp32'."""
        where = "CUDA" if self.device == "cuda" else "the CPU"
        how = "fp32" if self.precision == "fp32" else f"{self.precision} autocast"
        return f"{where}, {how}"


@dataclass(frozen=True)
class TrainingPeak:
    """Predicted peak bytes on one device, by part."""

    base: int
    own: int  # adapters and plain copies, all fine-tunes
    gradients: int
    optimizer: int
    terms: ActivationTerms | None  # None: activations left out (no model given)
    context: int
    gathered: int = 0  # --fsdp: the unsharded copies FSDP2 all-gathers for compute

    @property
    def activations(self) -> int:
        """Activation bytes on the device."""
        return self.terms.device if self.terms is not None else 0

    @property
    def host(self) -> int:
        """Pinned host bytes of offloaded activations."""
        return self.terms.host if self.terms is not None else 0

    @property
    def total(self) -> int:
        return self.base + self.gathered + self.own + self.gradients + self.optimizer + self.activations + self.context

    def rows(self) -> list[tuple[str, int, str]]:
        """(label, bytes on the device, what) per part; offloaded layer inputs are listed at 0 bytes here (their
        host bytes are ``host``)."""
        gathered = [("FSDP2 gathered (exact bytes)", self.gathered, "root group + two decoder layers unsharded")]
        return [
            ("base (exact)", self.base, "the plan's bytes on this device"),
            *(gathered if self.gathered else []),
            ("adapters + plain copies (exact)", self.own, "each training fine-tune's own tensors"),
            ("gradients (exact)", self.gradients, "one per trainable tensor, fp32 for half ones"),
            ("optimizer state (exact)", self.optimizer, "AdamW moments / 8-bit states, fp32 masters"),
            *(_term_rows(self.terms) if self.terms is not None else []),
            *([("CUDA context margin", self.context, "context, workspaces, allocator slack")] if self.context else []),
        ]

    def advice(self, device_memory: int, shape: TrainingShape, all_4bit: bool = False) -> list[str]:
        """What to change when the run does not fit ``device_memory``, most effective first (``all_4bit``: every
        quantized layer of the plan is 4-bit already)."""
        if self.total <= device_memory:
            return []
        over, tips = self.total - device_memory, []
        terms = self.terms
        if not shape.gradient_checkpointing and self.activations > over / 4:
            tips.append("--gradient-checkpointing (keeps one input per decoder layer instead of its activations)")
        if terms is not None and not shape.loss_chunk_tokens and terms.loss > over / 4:
            tips.append("--loss-chunk-tokens 512 (one chunk's logits at a time instead of the full logits)")
        if (
            terms is not None
            and shape.gradient_checkpointing
            and not terms.offloaded
            and shape.device == "cuda"
            and terms.layer_inputs > over / 4
        ):
            tips.append("--offload-activations (the layers' checkpointed inputs wait in pinned host memory)")
        if shape.batch_size > 1 and self.activations > over / 4:
            tips.append("a smaller --batch-size (activations grow with it; --grad-accum keeps the global batch)")
        if self.base > over and not all_4bit:
            tips.append("store the base in nf4 (`quantize: nf4`, e.g. the bundled qlora_nf4)")
        if self.base > over:
            tips.append(
                f"--fsdp over more GPUs (each holds about 1/N of the base; now {shape.world_size})"
                if shape.fsdp
                else "--fsdp over several GPUs (each holds about 1/N of the base)"
            )
        trained = self.own + self.gradients + self.optimizer
        if shape.optimizer == "adamw" and self.optimizer > over / 4:
            tips.append("--optimizer adamw8bit (a quarter of AdamW's state)")
        if trained > over / 2:
            tips.append(
                "a smaller LoRA rank or fewer adapted modules (adapters, gradients and optimizer state: "
                f"{fmt_bytes(trained)})"
            )
        return tips or ["a GPU with more memory"]


def _term_rows(terms: ActivationTerms) -> list[tuple[str, int, str]]:
    inputs = (
        [("checkpointed layer inputs", 0, f"offloaded: {fmt_bytes(terms.layer_inputs)} in pinned host memory")]
        if terms.offloaded
        else [("checkpointed layer inputs", terms.layer_inputs, "one hidden state per decoder layer")]
        if terms.layer_inputs
        else []
    )
    return [
        *inputs,
        (
            "layer activations (estimated)",
            terms.layers,
            ("one layer recomputed in backward" if terms.layer_inputs else "every layer's, saved for backward")
            + (f"; MLP inner {fmt_bytes(terms.mlp)}" if terms.mlp else ""),
        ),
        ("outside the layers (estimated)", terms.outside, "embeddings, final norm: saved for backward"),
        (
            "loss",
            terms.loss,
            "final hidden states + one chunk's logits" if terms.chunked_loss else "full logits + their gradient",
        ),
        ("backward gradients in flight", terms.backward, "one layer's output/input gradients, dq/dk/dv or MLP"),
    ]


MAX_TOKENS = 1 << 30  # the longest block size max_context considers


@dataclass(frozen=True)
class ContextAnswer:
    """The longest block size whose predicted peak fits a device, with the settings that make it fit."""

    tokens: int  # 0: not even one token fits; at most the model's longest sequence
    shape: TrainingShape  # the run at that block size (the asked-for settings plus ``added``)
    peak: TrainingPeak  # the peak at ``tokens`` (fits)
    next_peak: TrainingPeak  # the peak at ``memory_tokens + 1`` (does not fit)
    added: tuple[str, ...]  # memory options beyond the ones asked for, as surgery train spells them
    model_limit: int | None  # the model's longest sequence (train refuses a longer --block-size)
    memory_tokens: int = 0  # the longest block size the memory allows (above ``tokens`` when the model limits)

    @property
    def limited_by_model(self) -> bool:
        """The model's positions, not the memory, end the answer."""
        return self.memory_tokens > self.tokens

    def flags(self) -> str:
        """The ``surgery train`` options of this run."""
        s = self.shape
        out = [f"--batch-size {s.batch_size}", f"--block-size {self.tokens}", f"--precision {s.precision}"]
        out += ["--gradient-checkpointing"] if s.gradient_checkpointing else []
        out += [f"--loss-chunk-tokens {s.loss_chunk_tokens}"]
        out += [f"--mlp-chunk-tokens {s.mlp_chunk_tokens}"] if s.mlp_chunk_tokens else []
        out += ["--offload-activations"] if s.offload_activations else []
        out += [f"--optimizer {s.optimizer}"] if s.optimizer != "adamw" else []
        return " ".join(out)

    def to_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            "model_limit": self.model_limit,
            "memory_tokens": self.memory_tokens,
            "flags": self.flags(),
            "added": list(self.added),
            "device": self.shape.describe(),
            "terms": {label: value for label, value, _ in self.peak.rows()},
            "host_bytes": self.peak.host,
            "total": self.peak.total,
            "next_total": self.next_peak.total,
        }


def max_context(
    plan: Plan,
    model: nn.Module,
    shape: TrainingShape,
    device_memory: int,
    *,
    model_limit: int | None = None,
    explore: bool = True,
) -> ContextAnswer:
    """The longest block size (tokens per row) whose predicted peak fits ``device_memory``, by bisection over the
    plan's peak (every term grows with the tokens, so the answer is exact for the plan: it fits, one more token
    does not).

    Args:
        plan: the plan of the rules on the model.
        model: the model on meta (activations are measured once, then evaluated at each block size).
        shape: the run asked for (its block size is ignored).
        device_memory: bytes of one device.
        model_limit: the model's longest sequence, reported beside the answer.
        explore: also try the memory options not asked for (gradient checkpointing; chunked loss; offloading on
            CUDA) and answer with the longest, naming what it added.

    Returns:
        The answer with its peak, the peak one token past what the memory allows, and the options it added. Where
        the memory allows more than ``model_limit``, the answer is the limit, with the fewest added options that
        reach it (``memory_tokens`` keeps what the memory would allow).
    """
    profile = measure_activations(model, plan, shape)
    tried = [
        (_longest(plan, candidate, profile, device_memory), candidate, added)
        for candidate, added in _settings(shape, explore, profile.mlp(1) > 0)
    ]
    memory_tokens, candidate, added = max(tried, key=lambda t: t[0])  # the first of the longest: fewest additions
    fits, tokens = memory_tokens, memory_tokens
    if model_limit is not None and memory_tokens > model_limit:
        fits, candidate, added = next(t for t in tried if t[0] >= model_limit)
        tokens = model_limit
    at = replace(candidate, block_size=max(tokens, 1))
    after = replace(candidate, block_size=fits + 1)  # one token past what this setting's memory allows
    return ContextAnswer(
        tokens=tokens,
        shape=at,
        peak=training_peak(plan, None, at, profile=profile),
        next_peak=training_peak(plan, None, after, profile=profile),
        added=added,
        model_limit=model_limit,
        memory_tokens=memory_tokens,
    )


def _settings(shape: TrainingShape, explore: bool, has_mlp: bool) -> list[tuple[TrainingShape, tuple[str, ...]]]:
    """The asked-for run, then (``explore``) with each memory option added that it lacks, fewest additions first
    (``has_mlp``: the layers have an ``mlp`` block that --mlp-chunk-tokens can chunk)."""
    out = [(shape, ())]
    if not explore:
        return out
    options = []
    if not shape.gradient_checkpointing:
        options.append(("--gradient-checkpointing", {"gradient_checkpointing": True}))
    if not shape.loss_chunk_tokens or shape.loss_chunk_tokens > SMALL_LOSS_CHUNK:
        options.append((f"--loss-chunk-tokens {SMALL_LOSS_CHUNK}", {"loss_chunk_tokens": SMALL_LOSS_CHUNK}))
    if shape.device == "cuda" and not shape.offload_activations:
        options.append(("--offload-activations", {"offload_activations": True}))
    if has_mlp and not shape.mlp_chunk_tokens:
        options.append((f"--mlp-chunk-tokens {MLP_CHUNK_TOKENS}", {"mlp_chunk_tokens": MLP_CHUNK_TOKENS}))
    for size in range(1, len(options) + 1):
        for chosen in itertools.combinations(options, size):
            changes = {k: v for _, change in chosen for k, v in change.items()}
            candidate = replace(shape, **changes)
            if candidate.offload_activations and not candidate.gradient_checkpointing:
                continue  # offloading moves the checkpointed inputs: it needs checkpointing
            out.append((candidate, tuple(flag for flag, _ in chosen)))
    return out


def _longest(plan: Plan, shape: TrainingShape, profile: ActivationProfile, device_memory: int) -> int:
    """The largest block size whose peak fits (0 when one token does not): doubling, then bisection."""

    def fits(tokens: int) -> bool:
        return training_peak(plan, None, replace(shape, block_size=tokens), profile=profile).total <= device_memory

    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= MAX_TOKENS and fits(high):
        low, high = high, high * 2
    if high > MAX_TOKENS:
        return low
    while high - low > 1:  # fits(low), not fits(high)
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def optimizer_state_bytes(tensors: list[tuple[int, int]], optimizer: OptimizerName) -> int:
    """Exact optimizer state of trainable tensors given as (elements, bytes per element)."""
    total = 0
    for numel, size in tensors:
        if optimizer == "adamw":
            total += 2 * numel * size  # exp_avg, exp_avg_sq: zeros_like(param)
        elif numel < 4096:  # bitsandbytes keeps small tensors' state in 32 bits
            total += 2 * numel * 4
        else:
            total += 2 * numel + 2 * 4 * math.ceil(numel / 256)  # uint8 states + float32 absmax per block
    return total + (2 * 256 * 4 if optimizer == "adamw8bit" and tensors else 0)  # the two quantization maps


def gathered_bytes(plan: Plan) -> int:
    """What FSDP2 holds unsharded at once besides each rank's shard (``sharding.shard_base``'s groups): the
    root group (embeddings, final norm, head; FSDP2 keeps the root gathered from forward into backward) and
    two decoder layers (the one computing and the next, prefetched)."""
    groups = base_bytes_by_device(plan.graph, plan.decisions, layer_group)
    return groups.pop(ROOT_GROUP, 0) + 2 * max(groups.values(), default=0)


def layer_group(path: str) -> str:
    """The decoder layer a module belongs to (its path up to the first index, ``model.layers.3``), else the root."""
    match = re.match(r"(.*?\.\d+)(\.|$)", path)
    return match.group(1) if match else ROOT_GROUP


def trainable_tensors(plan: Plan) -> list[tuple[int, int]]:
    """(elements, bytes per element) of every tensor one fine-tune trains: LoRA A, B, bias, DoRA's magnitude; plain
    copies; new token rows."""
    out: list[tuple[int, int]] = []
    canon, seen = plan.graph.canonical_names(), set()
    for path, decision in plan.decisions.items():
        info = plan.graph.modules[path]
        if decision.action == "adapt" and decision.lora is not None:
            weight = next(p for p in info.params if p.name == "weight")
            in_f, out_f = lora_dims(info.kind, weight.shape)
            size, r = DTYPE_BYTES[decision.lora.dtype], decision.lora.r
            out += [(r * in_f, size), (out_f * r, size)] + ([(out_f, size)] if decision.lora.bias else [])
            out += [(out_f, size)] if decision.lora.use_dora else []  # DoRA's magnitude
        elif decision.action == "plain":
            for p in info.params:
                name = canon.get(f"{path}.{p.name}", f"{path}.{p.name}")
                if name not in seen:
                    seen.add(name)
                    out.append((p.numel, p.nbytes // max(p.numel, 1)))
    extra = plan.rules.extra_tokens
    return out + (extra_token_tensors(plan.graph, plan.decisions, len(extra.tokens)) if extra is not None else [])


def training_peak(
    plan: Plan, model: nn.Module | None, shape: TrainingShape, *, profile: ActivationProfile | None = None
) -> TrainingPeak:
    """The predicted peak on one device of a training run of ``plan``.

    Args:
        plan: the plan of the rules on the model.
        model: the model on meta (for the activation estimate; None leaves activations out unless ``profile``).
        shape: the run.
        profile: activations already measured for this shape's rows, precision and attention (``max_context``
            measures once and evaluates many block sizes).

    Returns:
        The peak by part.
    """
    tensors = trainable_tensors(plan)
    stepped = [(numel, 4 if size == 2 else size) for numel, size in tensors]  # half tensors step an fp32 master
    masters = sum(numel * 4 for numel, size in tensors if size == 2)
    n = shape.finetunes
    if profile is None and model is not None:
        profile = measure_activations(model, plan, shape)
    sharded = shape.fsdp and shape.world_size > 1
    return TrainingPeak(
        base=plan.base_bytes_per_rank(shape.world_size, shape.fsdp),
        own=n * plan.finetune_bytes,
        gathered=gathered_bytes(plan) if sharded else 0,
        gradients=n * sum(numel * size for numel, size in stepped),
        optimizer=n * (optimizer_state_bytes(stepped, shape.optimizer) + masters),
        terms=activation_terms(profile, shape) if profile is not None else None,
        context=CUDA_CONTEXT_BYTES if shape.device == "cuda" else 0,
    )


def activation_bytes(model: nn.Module, plan: Plan, shape: TrainingShape) -> int:
    """Bytes a micro-batch keeps for backward on the device (each storage once), plus the logits' gradient when the
    loss runs over the full logits: ``activation_terms(...).saved``."""
    return activation_terms(measure_activations(model, plan, shape), shape).saved


# block sizes the meta forward runs at: three points fix each term's polynomial in the tokens exactly
PROBE_LENGTHS = (32, 64, 96)


@dataclass(frozen=True)
class Poly:
    """``c0 + c1 * tokens + c2 * tokens**2`` bytes, exact (fractions): what one term of the activations costs at any
    block size, fitted through the meta forward's counts at ``PROBE_LENGTHS``."""

    c0: Fraction
    c1: Fraction
    c2: Fraction

    @classmethod
    def through(cls, points: list[tuple[int, int]]) -> Poly:
        """The polynomial of degree <= 2 through three (tokens, bytes) points (Lagrange's form, exact)."""
        (x0, y0), (x1, y1), (x2, y2) = points
        a = Fraction(y0, (x0 - x1) * (x0 - x2))
        b = Fraction(y1, (x1 - x0) * (x1 - x2))
        c = Fraction(y2, (x2 - x0) * (x2 - x1))
        return cls(
            a * x1 * x2 + b * x0 * x2 + c * x0 * x1,
            -(a * (x1 + x2) + b * (x0 + x2) + c * (x0 + x1)),
            a + b + c,
        )

    def __call__(self, tokens: int) -> int:
        return max(0, math.ceil(self.c0 + self.c1 * tokens + self.c2 * tokens * tokens))


@dataclass(frozen=True)
class ActivationProfile:
    """What one micro-batch of ``rows`` rows saves for backward, as polynomials in the block size, counted on the
    meta device (``measure_activations``) together with the model's sizes the analytic terms need."""

    rows: int
    layers: int
    hidden: int  # the hidden size
    intermediate: int  # the MLP's inner size
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    act_bytes: int  # bytes per activation value (2 under bf16/fp16, else the model's)
    outside: Poly  # saved by the body outside its decoder layers (embeddings, final norm)
    layer: Poly  # saved by the largest decoder layer
    all_layers: Poly  # saved by every decoder layer together
    mlp: Poly  # saved by that layer's MLP (its inner activations)
    head_loss: Poly  # saved by the output layer and the model's own loss over the full logits

    def hidden_bytes(self, tokens: int) -> int:
        """One (rows, tokens, hidden) activation."""
        return self.rows * tokens * self.hidden * self.act_bytes


@dataclass(frozen=True)
class ActivationTerms:
    """The activation memory of one micro-batch at one block size, by term (bytes). ``host`` is what
    ``--offload-activations`` keeps in pinned host memory instead of the device."""

    layer_inputs: int  # --gradient-checkpointing: the input each decoder layer keeps (all layers)
    layers: int  # without checkpointing every layer's saved tensors; with it one layer's, recomputed in backward
    outside: int  # saved outside the decoder layers: embeddings, final norm
    loss: int  # chunked: the final hidden states + one chunk's logits; full: the logits' saved tensors + gradient
    backward: int  # gradients in flight in one layer's backward (its output's and input's, attention's dq/dk/dv)
    offloaded: bool = False
    chunked_loss: bool = True
    mlp: int = 0  # of ``layers``: the MLP's inner activations (the largest share at long context)

    @property
    def device(self) -> int:
        """Bytes on the device."""
        return (0 if self.offloaded else self.layer_inputs) + self.layers + self.outside + self.loss + self.backward

    @property
    def saved(self) -> int:
        """Bytes on the device kept for backward (the gradients in flight left out)."""
        return self.device - self.backward

    @property
    def host(self) -> int:
        """Bytes in pinned host memory (the offloaded layer inputs)."""
        return self.layer_inputs if self.offloaded else 0


def measure_activations(model: nn.Module, plan: Plan, shape: TrainingShape) -> ActivationProfile:
    """Run the plan's fine-tune forward and the model's loss on the meta device at ``PROBE_LENGTHS`` tokens (fake
    tensors: no memory, no weights) and fit each part of what autograd saves as a polynomial in the tokens.

    Args:
        model: the model on the meta device.
        plan: the plan whose fine-tune trains (frozen everywhere, LoRA where adapted, plain copies trainable).
        shape: the run (its rows, precision and attention kernel; the block size does not matter here).

    Returns:
        The profile: ``activation_terms`` gives the bytes of any block size from it.
    """
    twin = meta_finetune(model, plan)
    half = {"bf16": 2, "fp16": 2}.get(shape.precision)
    if half is not None:  # autocast does not reach meta tensors: compute in the half dtype it would use
        import torch

        twin.to(torch.bfloat16 if shape.precision == "bf16" else torch.float16)
    counts = [_saved_parts(twin, shape.batch_size, length, shape.attention == "fused") for length in PROBE_LENGTHS]
    fit = {key: Poly.through([(t, c[key]) for t, c in zip(PROBE_LENGTHS, counts)]) for key in counts[0]}
    config = _text_config(twin)
    hidden, heads = _hidden_size(twin), int(getattr(config, "num_attention_heads", None) or config.n_head)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    return ActivationProfile(
        rows=shape.batch_size,
        layers=len(_decoder_layers(twin)),
        hidden=hidden,
        intermediate=int(getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden),
        heads=heads,
        kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=head_dim,
        vocab=int(config.vocab_size),
        act_bytes=half or _dtype_bytes(twin),
        **fit,
    )


def activation_terms(profile: ActivationProfile, shape: TrainingShape) -> ActivationTerms:
    """The activation terms of ``shape`` (its block size, checkpointing, loss chunking, offloading) from a profile
    measured for its rows, precision and attention.

    Args:
        profile: from ``measure_activations``.
        shape: the run.

    Returns:
        The terms, each in bytes.
    """
    tokens, p = shape.block_size, profile
    mlp_tokens = min(shape.mlp_chunk_tokens or tokens, tokens)
    # a chunked MLP keeps its input (the chunks' views of it) and, at any moment, one chunk's inner activations
    chunked = p.hidden_bytes(tokens) + p.mlp(mlp_tokens) if mlp_tokens < tokens else p.mlp(tokens)
    if shape.gradient_checkpointing and p.layers:
        inputs, layers, mlp = p.layers * p.hidden_bytes(tokens), p.layer(tokens) - p.mlp(tokens) + chunked, chunked
    elif mlp_tokens < tokens:
        per_layer = p.hidden_bytes(tokens)
        inputs, mlp = 0, p.layers * per_layer + p.mlp(mlp_tokens)
        layers = p.all_layers(tokens) - p.layers * p.mlp(tokens) + mlp
    else:
        inputs, layers, mlp = 0, p.all_layers(tokens), p.layers * p.mlp(tokens)
    if shape.loss_chunk_tokens:
        chunk = min(shape.loss_chunk_tokens, p.rows * tokens)
        # the final hidden states (each chunk's checkpoint keeps its view) and, at any moment, one chunk's logits
        # with what the cross-entropy makes of them: head output, fp32 copy, log-softmax, gradient (training/loss.py)
        loss = p.hidden_bytes(tokens) + CHUNK_LOGIT_BYTES * chunk * p.vocab
    else:
        loss = p.head_loss(tokens) + p.rows * tokens * p.vocab * 4  # backward starts from the fp32 logits' gradient
    return ActivationTerms(
        layer_inputs=inputs,
        layers=layers,
        outside=p.outside(tokens),
        loss=loss,
        backward=backward_bytes(p, tokens, mlp_tokens),
        offloaded=shape.offload_activations and shape.gradient_checkpointing and shape.device == "cuda",
        chunked_loss=bool(shape.loss_chunk_tokens),
        mlp=mlp,
    )


SMALL_LOSS_CHUNK = 128  # what max_context tries for --loss-chunk-tokens: a quarter of the default chunk's logits
MLP_CHUNK_TOKENS = 1024  # what max_context tries for --mlp-chunk-tokens: one chunk's inner activations stay small
CHUNK_LOGIT_BYTES = 16  # per token and vocabulary entry of one loss chunk (four fp32 values, tests/test_loss.py)


def backward_bytes(profile: ActivationProfile, tokens: int, mlp_tokens: int | None = None) -> int:
    """Gradients alive at once in one decoder layer's backward, besides the saved tensors: the gradient of the
    layer's output and of its input (the residual stream), and attention's dq, dk, dv with the fused kernels' fp32
    dq accumulator, or the MLP's two inner gradients (of one chunk's ``mlp_tokens`` under --mlp-chunk-tokens),
    whichever is larger."""
    p = profile
    per_token = p.act_bytes * 2 * p.hidden
    attention = p.act_bytes * p.head_dim * (p.heads + 2 * p.kv_heads) + 4 * p.heads * p.head_dim
    mlp = p.act_bytes * 2 * p.intermediate * (tokens if mlp_tokens is None else mlp_tokens)
    return p.rows * (tokens * per_token + max(tokens * attention, mlp))


def _saved_parts(twin: nn.Module, rows: int, length: int, fused: bool) -> dict[str, int]:
    """Bytes autograd saves in one forward + loss of ``twin`` (fake tensors), by part: outside the decoder layers,
    the largest layer, all layers, that layer's MLP, and the output layer with the loss."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    layers = _decoder_layers(twin)
    body = _body(twin)
    # fake tensors: the model's own data-dependent checks (masks, packing) take their tracing path
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        _fake_parameters(twin, mode)
        saved = SavedBytes(twin)
        spans: dict[str, int] = {}
        watched = [("body", body)] + [(f"layer{i}", m) for i, m in enumerate(layers)]
        watched += [(f"mlp{i}", _mlp(m)) for i, m in enumerate(layers) if _mlp(m) is not None]
        hooks = [h for name, module in watched for h in _span_hooks(saved, spans, name, module)]
        ids = torch.zeros(rows, length, dtype=torch.long, device="meta")
        try:
            with saved, _fused_attention(fused):
                twin(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, use_cache=False)
        finally:
            for hook in hooks:
                hook.remove()
    per_layer = [spans.get(f"layer{i}", 0) for i in range(len(layers))]
    largest = max(range(len(layers)), key=per_layer.__getitem__, default=None)
    body_bytes = spans.get("body", saved.bytes)
    return {
        "outside": body_bytes - sum(per_layer),
        "layer": per_layer[largest] if largest is not None else 0,
        "all_layers": sum(per_layer),
        "mlp": spans.get(f"mlp{largest}", 0),
        "head_loss": saved.bytes - body_bytes,
    }


def _span_hooks(saved: SavedBytes, spans: dict[str, int], name: str, module: nn.Module) -> list:
    """Hooks adding what ``saved`` counts during ``module``'s forward to ``spans[name]``."""
    marks: list[int] = []

    def start(module, args):
        marks.append(saved.bytes)

    def stop(module, args, output):
        spans[name] = spans.get(name, 0) + saved.bytes - marks.pop()

    return [module.register_forward_pre_hook(start), module.register_forward_hook(stop)]


def _body(model: nn.Module) -> nn.Module:
    """The model without its output layer (``base_model``, else the decoder), else the model itself."""
    body = getattr(model, "base_model", None)
    if body is None or body is model:
        body = model.get_decoder() if hasattr(model, "get_decoder") else None
    return body if body is not None else model


def _mlp(layer: nn.Module) -> nn.Module | None:
    return getattr(layer, "mlp", None)


class SavedBytes:
    """Counts the bytes of every tensor autograd saves while active, each storage once, parameters left out
    (they exist anyway)."""

    def __init__(self, model: nn.Module, skip=None):
        self.params = {p.untyped_storage()._cdata for p in model.parameters()}
        self.skip = skip or (lambda t: False)
        self.seen: dict[int, object] = {}
        self.bytes = 0
        self.mark = 0

    def pack(self, t):
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.params and key not in self.seen and not self.skip(t):
            self.seen[key] = t  # kept alive, so the key is not reused while counting
            self.bytes += storage.nbytes()
        return t

    def __enter__(self):
        import torch

        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False


def _decoder_layers(model: nn.Module) -> list:
    from ..model.tracing import decoder_layers

    return decoder_layers(model)


def _text_config(model: nn.Module):
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def _hidden_size(model: nn.Module) -> int:
    config = _text_config(model)
    return int(getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or config.d_model)


def _dtype_bytes(model: nn.Module) -> int:
    return next(model.parameters()).element_size()


class _SavedLikeFusedAttention:
    """What SDPA's fused kernels (flash, memory-efficient: what CUDA and the CPU run) keep for backward: query, key,
    value, output and the float32 log-sum-exp, never the (T, T) scores that the meta device's reference path would."""

    function = None

    @classmethod
    def apply(cls, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if cls.function is None:
            import torch

            class Fused(torch.autograd.Function):
                @staticmethod
                def forward(ctx, q, k, v):
                    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
                    ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
                    return out

                @staticmethod
                def backward(ctx, grad):
                    q, k, v, _, _ = ctx.saved_tensors
                    return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)

            cls.function = Fused
        return cls.function.apply(query, key, value)


def _fused_attention(enabled: bool):
    """Within: scaled_dot_product_attention saves what the fused kernels save (see _SavedLikeFusedAttention)."""
    import contextlib
    from unittest import mock

    import torch

    if not enabled:
        return contextlib.nullcontext()
    return mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _SavedLikeFusedAttention.apply)


def _fake_parameters(model: nn.Module, mode) -> None:
    from torch import nn

    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = nn.Parameter(mode.from_tensor(p), requires_grad=p.requires_grad)


def meta_finetune(model: nn.Module, plan: Plan) -> nn.Module:
    """The plan's fine-tune as a meta-device model: frozen everywhere, LoRA where adapted, plain copies trainable."""
    import copy

    from ..layers.adapters import make_adapter
    from ..model.tracing import replace_submodule

    twin = copy.deepcopy(model).to("meta").requires_grad_(False)
    for path, decision in plan.decisions.items():
        module = twin.get_submodule(path)
        if decision.action == "plain":
            module.requires_grad_(True)
        elif decision.action == "adapt" and decision.lora is not None:
            replace_submodule(twin, path, make_adapter(module, decision.kind, decision.lora))
    return twin.train()


def peak_table(peak: TrainingPeak, device_memory: int | None, shape: TrainingShape, title: str):
    """A rich table of the predicted peak, the budget and what to change."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title)
    for col in ("", "bytes", "", "what"):
        table.add_column(col, justify="right" if col == "bytes" or col == "" and table.columns else "left")
    for label, value, what in peak.rows():
        table.add_row(label, f"{value:,}", fmt_bytes(value), what)
    table.add_row(Text("predicted peak", style="bold"), f"{peak.total:,}", fmt_bytes(peak.total), "")
    if device_memory is not None:
        verdict = Text("fits", "green") if peak.total <= device_memory else Text("does not fit", "red")
        table.add_row(
            f"device memory: {verdict}",
            f"{device_memory:,}",
            fmt_bytes(device_memory),
            f"{'headroom' if peak.total <= device_memory else 'short by'} {fmt_bytes(abs(device_memory - peak.total))}",
        )
    return table
