"""Merge a fine-tune into a plain model: LoRA folded into dense weights, no surgery wrappers.

``merge(ft)`` returns a new model of the base's class (base and fine-tune untouched): quantized
layers are dequantized, each adapter adds ``scaling * B @ A`` (and its bias) to its layer's weight,
and everything is cast to the base's original dtype, so ``save_pretrained`` output reloads with
plain transformers. ``requantize=True`` quantizes the merged weights again as the base held them;
``output_error`` measures what that (or the merge itself) changes.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..base.ownership import require_finetune
from ..base.quantize import quantized_layer
from ..base.shared_base import refuse_sharded
from ..errors import MergeError
from ..layers.bnb import dense_weight, quantized_storage
from ..layers.extra_tokens import ExtraTokenHead, ExtraTokenLayer, extra_token_layers
from ..layers.lora import LoraLayer
from ..model.tracing import find_ties, replace_submodule
from ..rules.ruleset import EMBEDDING_KINDS, QuantConfig
from .rewriting import detached_copy


def merge(finetune: nn.Module, dtype: torch.dtype | None = None, *, requantize: bool = False) -> nn.Module:
    """A new plain model of the base's class with every adapter folded in (see module docstring)."""
    info = require_finetune(finetune, "merged", MergeError)
    refuse_sharded(
        finetune,
        "merge",
        "merge in one process without --fsdp, from the adapter file the run saved (`surgery merge ADAPTER --out DIR`)",
    )
    target = dtype or original_dtype(info.base)
    kinds = {path: d.kind for path, d in info.plan.decisions.items()}
    _check_mergeable(finetune, kinds)
    memo: dict[int, object] = {}
    extra = dict(extra_token_layers(finetune))
    with torch.no_grad():
        for path, module in finetune.named_modules():
            owner = next((p for p in extra if path.startswith(p + ".")), None)
            if owner is not None:  # inside an extra-token layer: merged with it (_dense_extra_token_layer)
                continue
            if isinstance(module, ExtraTokenLayer):
                memo[id(module)] = _dense_extra_token_layer(module, kinds[path], target)
            elif isinstance(module, LoraLayer):
                memo[id(module)] = _dense_layer(module.base_layer, kinds[path], target, module)
            elif quantized_storage(module) and path in kinds:  # not an adapter's own base_layer
                memo[id(module)] = _dense_layer(module, kinds[path], target)
        _keep_tied(list(extra.values()), memo)
        merged = detached_copy(finetune, memo)
    for p in merged.parameters():
        p.requires_grad_(False)
    if dtype is not None:
        merged.to(dtype)
    _untie_broken_ties(merged, info.base)
    if requantize:
        _requantize(merged, info)
    return merged.eval()


def original_dtype(base: nn.Module) -> torch.dtype:
    """The dtype the base's unquantized floating-point parameters are held in (float32 if none)."""
    for module in base.modules():
        if quantized_storage(module):
            continue
        for p in module.parameters(recurse=False):
            if p.is_floating_point():
                return p.dtype
    return torch.float32


def output_error(reference: nn.Module, other: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Max absolute and relative difference of two models' logits on ``inputs`` (relative to the reference)."""
    with torch.no_grad():
        a = reference(**inputs).logits.float()
        b = other(**inputs).logits.float()
    diff = (a - b).abs().max().item()
    return {"max_abs": diff, "max_rel": diff / max(a.abs().max().item(), 1e-12)}


def _check_mergeable(finetune: nn.Module, kinds: dict[str, str]) -> None:
    """Every refusal before any work: a LoRA bias needs a bias in the layer it folds into."""
    for path, module in finetune.named_modules():
        if not isinstance(module, LoraLayer) or module.lora_bias is None:
            continue
        if kinds[path] in EMBEDDING_KINDS or getattr(module.base_layer, "bias", None) is None:
            raise MergeError(
                f"{path}: its adapter has a bias but the {type(module.base_layer).__name__} it adapts "
                "has none, so a plain model of this class cannot hold the merged result; "
                "train with `bias: false` in the rule's lora settings, or serve the fine-tune unmerged"
            )


def _dense_layer(layer: nn.Module, kind: str, dtype: torch.dtype, adapter: nn.Module | None = None) -> nn.Module:
    """A plain layer equal to ``layer`` (dequantized) plus the adapter's update, in ``dtype``."""
    weight = dense_weight(layer, kind)  # (out, in) for linear/conv1d, (num, dim) for embedding
    bias = getattr(layer, "bias", None)
    bias = None if bias is None else bias.detach().float()
    if adapter is not None:
        weight = adapter.merged_weight(weight)
        if adapter.lora_bias is not None:
            bias = bias + adapter.lora_bias.float()
    device = weight.device
    if kind == "positional":  # the layer's own class (it computes its rows), holding the merged weight
        out = type(layer).__new__(type(layer))
        nn.Module.__init__(out)
        out.__dict__.update({k: v for k, v in layer.__dict__.items() if not k.startswith("_")})  # offset, sizes
        out.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    elif kind == "embedding":
        out = nn.Embedding(*weight.shape, padding_idx=getattr(layer, "padding_idx", None), device=device, dtype=dtype)
        out.weight.copy_(weight)
    elif kind == "conv1d":
        from transformers.pytorch_utils import Conv1D

        out = Conv1D(weight.shape[0], weight.shape[1]).to(device=device, dtype=dtype)
        out.weight.copy_(weight.t())
    else:
        out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=device, dtype=dtype)
        out.weight.copy_(weight)
    if bias is not None:
        out.bias.copy_(bias)
    return out.requires_grad_(False)


def _dense_extra_token_layer(layer: ExtraTokenLayer, kind: str, dtype: torch.dtype) -> nn.Module:
    """The plain embedding or output layer of the fine-tune's whole vocabulary: the wrapped layer merged, its rows
    spliced in (a head's bias, if any, is zero for the new ids)."""
    inner = layer.base_layer
    adapter = inner if isinstance(inner, LoraLayer) else None
    dense = _dense_layer(adapter.base_layer if adapter is not None else inner, kind, dtype, adapter)
    weight = layer.dense(dense.weight.t() if kind == "conv1d" else dense.weight)
    if isinstance(dense, nn.Embedding):
        out = nn.Embedding(*weight.shape, padding_idx=dense.padding_idx, device=weight.device, dtype=dtype)
    else:
        out = nn.Linear(
            weight.shape[1], weight.shape[0], bias=dense.bias is not None, device=weight.device, dtype=dtype
        )
        if dense.bias is not None:
            out.bias.zero_()[: dense.bias.shape[0]] = dense.bias
    out.weight.copy_(weight)
    return out.requires_grad_(False)


def _keep_tied(layers: list[ExtraTokenLayer], memo: dict[int, object]) -> None:
    """A tied base's output layer and embedding with the same new rows merge into one tensor, as the base holds one
    (unless an adapter made the two differ: then they stay apart and the config says so)."""
    for head in layers:
        embedding = next((e for e in layers if e is not head and e.extra_rows is head.extra_rows), None)
        if isinstance(head, ExtraTokenHead) and embedding is not None:
            if torch.equal(memo[id(head)].weight, memo[id(embedding)].weight):
                memo[id(head)].weight = memo[id(embedding)].weight


def _untie_broken_ties(merged: nn.Module, base: nn.Module) -> None:
    """If a tie of the base no longer holds (one side adapted or plain), say so in the config."""
    params = dict(merged.named_parameters(remove_duplicate=False))
    for names in find_ties(base):
        objects = {id(params[n]) for n in names if n in params}
        if len(objects) > 1 and getattr(merged, "config", None) is not None:
            merged.config.tie_word_embeddings = False


def _requantize(merged: nn.Module, info) -> None:
    """Quantize again every module the base held quantized, with the base's settings."""
    shared: dict = {}
    for path, decision in info.plan.decisions.items():
        held = quantized_storage(info.base.get_submodule(path)) if _has(info.base, path) else None
        if held is None:
            continue
        quant = info.rules.quant_for(decision.rule)
        if quant.scheme != held:
            quant = QuantConfig(held)
        layer = quantized_layer(merged.get_submodule(path), dataclasses.replace(decision, quant=quant), shared)
        replace_submodule(merged, path, layer)


def _has(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False
