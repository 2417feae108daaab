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

import math
import re
from dataclasses import dataclass
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


@dataclass(frozen=True)
class TrainingShape:
    """What sizes a training run's memory besides the model and the rules."""

    batch_size: int
    block_size: int
    gradient_checkpointing: bool = False
    optimizer: OptimizerName = "adamw"
    precision: PrecisionName = "fp32"
    finetunes: int = 1
    world_size: int = 1
    fsdp: bool = False
    attention: Literal["fused", "math"] = "fused"  # fused: SDPA's flash / memory-efficient kernels (no (T, T) scores)


@dataclass(frozen=True)
class TrainingPeak:
    """Predicted peak bytes on one device, by part."""

    base: int
    own: int  # adapters and plain copies, all fine-tunes
    gradients: int
    optimizer: int
    activations: int
    context: int
    gathered: int = 0  # --fsdp: the unsharded copies FSDP2 all-gathers for compute

    @property
    def total(self) -> int:
        return self.base + self.gathered + self.own + self.gradients + self.optimizer + self.activations + self.context

    def rows(self) -> list[tuple[str, int, str]]:
        gathered = [("FSDP2 gathered (exact bytes)", self.gathered, "root group + two decoder layers unsharded")]
        return [
            ("base (exact)", self.base, "the plan's bytes on this device"),
            *(gathered if self.gathered else []),
            ("adapters + plain copies (exact)", self.own, "each training fine-tune's own tensors"),
            ("gradients (exact)", self.gradients, "one per trainable tensor, fp32 for half ones"),
            ("optimizer state (exact)", self.optimizer, "AdamW moments / 8-bit states, fp32 masters"),
            ("activations (estimated)", self.activations, "saved for backward, meta-device forward"),
            ("CUDA context margin", self.context, "context, workspaces, allocator slack"),
        ]

    def advice(self, device_memory: int, shape: TrainingShape, all_4bit: bool = False) -> list[str]:
        """What to change when the run does not fit ``device_memory``, most effective first (``all_4bit``: every
        quantized layer of the plan is 4-bit already)."""
        if self.total <= device_memory:
            return []
        over, tips = self.total - device_memory, []
        if not shape.gradient_checkpointing and self.activations > over / 4:
            tips.append("--gradient-checkpointing (keeps one input per decoder layer instead of its activations)")
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


def training_peak(plan: Plan, model: nn.Module | None, shape: TrainingShape, *, cuda: bool = True) -> TrainingPeak:
    """The predicted peak on one device of a training run of ``plan``; ``model`` is the model on meta (for the
    activation estimate; None leaves activations out)."""
    tensors = trainable_tensors(plan)
    stepped = [(numel, 4 if size == 2 else size) for numel, size in tensors]  # half tensors step an fp32 master
    masters = sum(numel * 4 for numel, size in tensors if size == 2)
    n = shape.finetunes
    activations = activation_bytes(model, plan, shape) if model is not None else 0
    sharded = shape.fsdp and shape.world_size > 1
    return TrainingPeak(
        base=plan.base_bytes_per_rank(shape.world_size, shape.fsdp),
        own=n * plan.finetune_bytes,
        gathered=gathered_bytes(plan) if sharded else 0,
        gradients=n * sum(numel * size for numel, size in stepped),
        optimizer=n * (optimizer_state_bytes(stepped, shape.optimizer) + masters),
        activations=activations,
        context=CUDA_CONTEXT_BYTES if cuda else 0,
    )


def activation_bytes(model: nn.Module, plan: Plan, shape: TrainingShape) -> int:
    """Bytes autograd saves in one micro-batch's forward and loss (each storage once), plus the logits' gradient,
    counted on the meta device for this plan's fine-tune (one job: fine-tunes take turns)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    twin = meta_finetune(model, plan)
    rows, length = shape.batch_size, shape.block_size
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(shape.precision)
    if dtype is not None:  # autocast does not reach meta tensors: compute in the half dtype it would use
        twin.to(dtype)
    layers = _decoder_layers(twin)
    # fake tensors: the model's own data-dependent checks (masks, packing) take their tracing path
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        _fake_parameters(twin, mode)
        saved = SavedBytes(twin)
        per_layer = {id(layer): 0 for layer in layers}
        hooks = [layer.register_forward_pre_hook(_start(saved)) for layer in layers] + [
            layer.register_forward_hook(_stop(saved, per_layer, layer)) for layer in layers
        ]
        ids = torch.zeros(rows, length, dtype=torch.long, device="meta")
        try:
            with saved, _fused_attention(shape.attention == "fused"):
                logits = twin(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, use_cache=False).logits
        finally:
            for hook in hooks:
                hook.remove()
    total = saved.bytes + logits.numel() * 4  # backward starts from the fp32 gradient of the logits
    if shape.gradient_checkpointing and layers:
        inside = sum(per_layer.values())
        hidden = rows * length * _hidden_size(twin) * (2 if dtype is not None else _dtype_bytes(twin))
        total += len(layers) * hidden + max(per_layer.values()) - inside
    return total


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


def _hidden_size(model: nn.Module) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
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


def _start(saved):
    def hook(module, args):
        saved.mark = saved.bytes

    return hook


def _stop(saved, per_layer: dict, layer):
    def hook(module, args, output):
        per_layer[id(layer)] += saved.bytes - saved.mark

    return hook


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
