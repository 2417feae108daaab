"""Export a fine-tune as a ``torch.export`` program (for ``torch.compile``, AOTInductor, serving).

Adapters stay their own nodes (``lora_A`` / ``lora_B`` matmuls) or, with ``merge=True``, are folded
into dense weights first. bitsandbytes layers cannot be captured as they are (their weights carry
``CB``/``SCB``/``quant_state`` attributes that export's fake tensors lack), so the exported copy
swaps each one for a small module that computes the same thing from the same tensors with
bitsandbytes' registered ops (``int8_vectorwise_quant`` + ``int8_mixed_scaled_mm`` for LLM.int8,
``dequantize_4bit`` + ``linear`` for 4-bit): the program stays quantized and shares the base's
tensors; the fine-tune itself is not touched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..base.ownership import require_finetune
from ..base.shared_base import refuse_sharded
from ..errors import ExportError, first_line
from ..layers.bnb import quantized_storage, standard_layout
from ..layers.lora import LoraLayer
from .merging import merge as merge_finetune
from .rewriting import detached_copy


def export_graph(
    finetune: nn.Module,
    example_inputs: dict[str, torch.Tensor] | torch.Tensor,
    *,
    merge: bool = False,
    dynamic: bool = True,
) -> torch.export.ExportedProgram:
    """A ``torch.export`` program of the fine-tune whose outputs equal the eager fine-tune's.

    ``example_inputs``: ``input_ids`` or a dict of keyword tensors; batch and sequence length stay
    dynamic unless ``dynamic=False``. ``merge=True`` exports ``surgery.merge(finetune)`` instead.
    Quantized layers stay quantized (see module docstring).
    """
    require_finetune(finetune, "exported with export_graph", ExportError)
    refuse_sharded(
        finetune,
        "export_graph",
        "load the adapter file the run saved onto an unsharded base in one process and export that fine-tune",
    )
    inputs = {"input_ids": example_inputs} if isinstance(example_inputs, torch.Tensor) else dict(example_inputs)
    unknown = sorted(set(inputs) - {"input_ids", "attention_mask"})
    if unknown or "input_ids" not in inputs:
        raise ExportError(f"example_inputs takes input_ids and optionally attention_mask, not {unknown or 'nothing'}")
    model = _LogitsOf(merge_finetune(finetune) if merge else exportable_copy(finetune))
    if dynamic:  # export specialises a dimension of size 1; capture with 2 so batch and length stay free
        inputs = {k: _at_least_two(v) for k, v in inputs.items()}
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    length = torch.export.Dim("length", min=1, max=1 << 20)
    shapes = {k: {0: batch, 1: length} if dynamic else None for k in inputs}
    try:
        with torch.no_grad():
            return torch.export.export(model, (), inputs, dynamic_shapes=shapes, strict=False)
    except Exception as exc:
        raise ExportError(
            f"torch.export could not capture this {type(finetune).__name__}: {type(exc).__name__}: "
            f"{first_line(exc, 300)}"
        ) from exc


class _LogitsOf(nn.Module):
    """forward(input_ids, attention_mask=None) -> logits, without a KV cache: what a serving graph needs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def _at_least_two(t: torch.Tensor) -> torch.Tensor:
    for dim in (0, 1):
        if t.shape[dim] == 1:
            t = torch.cat([t, t], dim=dim)
    return t


def exportable_copy(finetune: nn.Module) -> nn.Module:
    """The fine-tune with every bitsandbytes layer swapped for an export-friendly twin over the same tensors."""
    memo: dict[int, object] = {}
    for path, module in finetune.named_modules():
        if quantized_storage(module) and not isinstance(module, LoraLayer):
            memo[id(module)] = _twin(path, module)
    for t in [*finetune.parameters(), *finetune.buffers()]:
        memo[id(t)] = t  # share, never copy
    return detached_copy(finetune, memo)


def _twin(path: str, layer: nn.Module) -> nn.Module:
    standard_layout(layer)  # a weight bitsandbytes repacked for its AVX512-BF16 CPU kernel is read as usual
    if isinstance(layer, nn.Embedding):
        return _Int8Embedding(layer) if quantized_storage(layer) == "int8" else _FourBitEmbedding(layer)
    return _Int8Linear(layer) if quantized_storage(layer) == "int8" else _FourBitLinear(layer)


class _Int8Linear(nn.Module):
    """LLM.int8 as Linear8bitLt computes it (activations quantized per row, fp16 outlier columns)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        state = layer.state
        self.register_buffer("CB", state.CB if state.CB is not None else layer.weight.data, persistent=False)
        self.register_buffer("SCB", state.SCB if state.SCB is not None else layer.weight.SCB, persistent=False)
        self.bias, self.threshold = layer.bias, float(state.threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x.reshape(-1, x.shape[-1])
        ca, sca, outliers = torch.ops.bitsandbytes.int8_vectorwise_quant(a.to(torch.float16), self.threshold)
        if self.threshold > 0:
            out, _ = torch.ops.bitsandbytes.int8_mixed_scaled_mm(a, ca, self.CB, sca, self.SCB, outliers, self.bias)
        else:
            out = torch.ops.bitsandbytes.int8_scaled_mm(ca, self.CB, sca, self.SCB, bias=self.bias, dtype=a.dtype)
        return out.reshape(*x.shape[:-1], self.CB.shape[0])


class _FourBitWeight(nn.Module):
    """The packed 4-bit weight and its (de-nested) absmax, dequantized on each call as bitsandbytes does."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        qs = layer.weight.quant_state
        absmax = qs.absmax
        if qs.nested:
            absmax = (
                torch.ops.bitsandbytes.dequantize_blockwise(
                    qs.absmax, qs.state2.absmax, qs.state2.code, qs.state2.blocksize, torch.float32
                )
                + qs.offset
            )
        self.register_buffer("packed", layer.weight.data, persistent=False)
        self.register_buffer("absmax", absmax, persistent=False)
        self.blocksize, self.quant_type, self.shape, self.dtype = qs.blocksize, qs.quant_type, list(qs.shape), qs.dtype

    def weight(self) -> torch.Tensor:
        return torch.ops.bitsandbytes.dequantize_4bit(
            self.packed, self.absmax, self.blocksize, self.quant_type, self.shape, self.dtype
        )


class _FourBitLinear(_FourBitWeight):
    def __init__(self, layer: nn.Module):
        super().__init__(layer)
        self.bias, self.compute_dtype = layer.bias, layer.compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute = self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(compute)
        return F.linear(x.to(compute), self.weight().to(compute), bias).to(x.dtype)


class _FourBitEmbedding(_FourBitWeight):
    def __init__(self, layer: nn.Module):
        super().__init__(layer)
        self.out_dtype = layer.dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight()).to(self.out_dtype)


class _Int8Embedding(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.register_buffer("CB", layer.weight.data, persistent=False)
        self.register_buffer("SCB", layer.weight.SCB, persistent=False)
        self.out_dtype = layer.dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.CB)
        scales = F.embedding(ids, self.SCB.view(-1, 1))
        return (rows * (scales / 127.0)).to(self.out_dtype)
