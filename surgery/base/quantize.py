"""Quantize the base in place, once, with bitsandbytes: the modules a plan marks, nothing else.

Linear and GPT-2's Conv1D become ``Linear8bitLt`` (LLM.int8, frozen int8 weights) or ``Linear4bit``
(nf4/fp4); embeddings become ``Embedding8bit`` / ``Embedding4bit``. Every new layer is built first
and swapped in only when all were built, so a failure leaves the model untouched. A module that
is already a bitsandbytes layer is never quantized again.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers.bnb import FROM_CONV1D
from ..model.tracing import replace_submodule
from ..planning.decisions import Decision, Plan
from ..rules.ruleset import QuantConfig


def quantize_base(model: nn.Module, plan: Plan, progress=None) -> list[str]:
    """Quantize in place every module ``plan`` marks; returns their paths. ``progress(i, n, path)`` is optional."""
    todo = plan.quantized
    built: dict[str, nn.Module] = {}
    shared: dict[tuple, nn.Parameter] = {}
    for i, decision in enumerate(todo):
        module = model.get_submodule(decision.path)
        built[decision.path] = quantized_layer(module, decision, shared)
        if progress is not None:
            progress(i + 1, len(todo), decision.path)
    for path, layer in built.items():
        replace_submodule(model, path, layer)
    return list(built)


def quantized_layer(module: nn.Module, decision: Decision, shared: dict | None = None) -> nn.Module:
    """The bitsandbytes form of ``module`` (weights quantized on the module's own device)."""
    quant = decision.quant
    shared = {} if shared is None else shared
    layer = empty_layer(module, decision)
    bias = getattr(module, "bias", None) if decision.kind != "embedding" else None
    if bias is not None:
        layer.bias = _bias(bias, getattr(layer, "compute_dtype", None))
    key = (id(module.weight), decision.kind == "embedding", quant.scheme, quant.double_quant, quant.blocksize)
    with torch.no_grad():
        if key not in shared:
            shared[key] = quantized_weight(float_weight(module.weight.detach(), decision), quant, layer)
    layer.weight = shared[key]
    return finished_layer(layer, quant).train(module.training)


def empty_layer(module: nn.Module, decision: Decision) -> nn.Module:
    """The bitsandbytes layer that will hold ``module`` quantized, on the meta device, weights not yet set.

    A 4-bit layer's bias is planned in its compute dtype (what bitsandbytes' first forward casts it
    to); an int8 layer's stays in the weight's dtype. A loader that fills the layer casts to these.
    """
    import bitsandbytes as bnb

    quant = decision.quant
    if decision.kind == "embedding":
        return _embedding(module, quant, bnb)
    weight = module.weight
    out_f, in_f = (weight.shape[1], weight.shape[0]) if decision.kind == "conv1d" else weight.shape
    bias = getattr(module, "bias", None)
    layer = _linear(in_f, out_f, bias is not None, quant, weight.dtype, bnb)
    if decision.kind == "conv1d":
        setattr(layer, FROM_CONV1D, True)  # a merge gives back a Conv1D; the plan keeps calling it conv1d
    if bias is not None:
        dtype = getattr(layer, "compute_dtype", None) or bias.dtype
        layer.bias = nn.Parameter(torch.empty(out_f, dtype=dtype, device="meta"), requires_grad=False)
    return layer


def float_weight(weight: torch.Tensor, decision: Decision) -> torch.Tensor:
    """The weight as bitsandbytes quantizes it: (out, in), so a Conv1D's (in, out) is transposed."""
    return weight.t() if decision.kind == "conv1d" else weight


def finished_layer(layer: nn.Module, quant: QuantConfig) -> nn.Module:
    """A layer whose quantized weight is set: frozen, and a 4-bit layer's quantization state on the layer too."""
    if quant.scheme != "int8":
        layer.quant_state = layer.weight.quant_state
        if hasattr(layer, "compute_dtype"):  # bitsandbytes < 0.46 would replace it by the input's dtype otherwise
            layer.compute_type_is_set = True
    return layer.requires_grad_(False)


def _bias(bias: torch.Tensor, compute: torch.dtype | None) -> nn.Parameter:
    """The quantized layer's bias: the same Parameter (fine-tunes made earlier keep sharing it), or a copy
    in a 4-bit layer's compute dtype, the cast bitsandbytes' first forward would make in place."""
    if compute is not None and bias.dtype != compute:
        return nn.Parameter(bias.detach().to(compute), requires_grad=False)
    return bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias.detach(), requires_grad=False)


def _linear(in_f: int, out_f: int, bias: bool, quant: QuantConfig, dtype: torch.dtype, bnb) -> nn.Module:
    if quant.scheme == "int8":
        return bnb.nn.Linear8bitLt(
            in_f, out_f, bias=bias, has_fp16_weights=False, threshold=quant.threshold, device="meta"
        )
    compute = getattr(torch, quant.compute_dtype) if quant.compute_dtype else dtype
    return bnb.nn.Linear4bit(
        in_f,
        out_f,
        bias=bias,
        compute_dtype=compute,
        compress_statistics=quant.double_quant,
        quant_type=quant.scheme,
        quant_storage=getattr(torch, quant.storage),
        device="meta",
    )


def _embedding(module: nn.Embedding, quant: QuantConfig, bnb) -> nn.Module:
    num, dim = module.weight.shape
    if quant.scheme == "int8":
        layer = bnb.nn.Embedding8bit(num, dim, device="meta", dtype=module.weight.dtype)
    else:
        layer = bnb.nn.Embedding4bit(
            num,
            dim,
            quant_type=quant.scheme,
            quant_storage=getattr(torch, quant.storage),
            device="meta",
            dtype=module.weight.dtype,
        )
    layer.padding_idx = module.padding_idx
    return layer


def quantized_weight(weight: torch.Tensor, quant: QuantConfig, layer: nn.Module) -> nn.Parameter:
    """Quantize one (out, in) weight on its own device as bitsandbytes' own ``.to(device)`` would, without a
    device round trip; ``layer`` is the 4-bit layer that will hold it."""
    import bitsandbytes as bnb

    if quant.scheme == "int8":
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(weight.contiguous().to(torch.float16))
        return bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
    packed, state = bnb.functional.quantize_4bit(
        weight.contiguous(),
        blocksize=quant.blocksize,
        compress_statistics=quant.double_quant,
        quant_type=quant.scheme,
        quant_storage=getattr(torch, quant.storage),
    )
    return bnb.nn.Params4bit(
        packed,
        requires_grad=False,
        quant_state=state,
        blocksize=quant.blocksize,
        compress_statistics=quant.double_quant,
        quant_type=quant.scheme,
        quant_storage=packed.dtype,
        module=layer,
        bnb_quantized=True,
    )
