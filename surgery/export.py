"""Export a fine-tune as a ``torch.export`` program (for ``torch.compile``, AOTInductor, serving).

Adapters stay their own nodes (``lora_A`` / ``lora_B`` matmuls under the adapted module in each
node's ``nn_module_stack``) or, with ``merge=True``, are folded into dense weights first.
bitsandbytes layers cannot be captured: their weights carry ``CB``/``SCB``/``quant_state``
attributes that export's fake tensors do not have. A fine-tune over a quantized base therefore
exports with ``merge=True`` (dequantized, dense) or not at all, and the error says so.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import RewriteError
from .merge import merge as merge_finetune
from .rewrite import finetune_info
from .trace import quantized_storage


class ExportError(RewriteError):
    """A fine-tune that torch.export cannot capture as asked."""


def export_graph(finetune: nn.Module, example_inputs: dict[str, torch.Tensor] | torch.Tensor, *,
                 merge: bool = False, dynamic: bool = True) -> torch.export.ExportedProgram:
    """A ``torch.export`` program of the fine-tune whose outputs equal the eager fine-tune's.

    ``example_inputs``: ``input_ids`` or a dict of keyword tensors; batch and sequence length stay
    dynamic unless ``dynamic=False``. ``merge=True`` exports ``surgery.merge(finetune)`` instead.
    """
    if finetune_info(finetune) is None:
        raise ExportError(f"a {type(finetune).__name__} that is not a fine-tune; export_graph takes a fine-tune")
    quantized = [path for path, m in finetune.named_modules()
                 if quantized_storage(m) and not getattr(m, "is_surgery_adapter", False)]
    if quantized and not merge:
        raise ExportError(f"{quantized[0]} (and {len(quantized) - 1} more) are bitsandbytes layers, which "
                          "torch.export cannot capture; export with merge=True for a dense program, or export a "
                          "fine-tune of an unquantized base")
    model = _LogitsOf(merge_finetune(finetune) if merge else finetune)
    inputs = {"input_ids": example_inputs} if isinstance(example_inputs, torch.Tensor) else dict(example_inputs)
    unknown = sorted(set(inputs) - {"input_ids", "attention_mask"})
    if unknown or "input_ids" not in inputs:
        raise ExportError(f"example_inputs takes input_ids and optionally attention_mask, not {unknown or 'nothing'}")
    if dynamic:  # export specialises a dimension of size 1; capture with 2 so batch and length stay free
        inputs = {k: _at_least_two(v) for k, v in inputs.items()}
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    length = torch.export.Dim("length", min=1, max=1 << 20)
    shapes = {k: {0: batch, 1: length} if dynamic else None for k in inputs}
    try:
        with torch.no_grad():
            return torch.export.export(model, (), inputs, dynamic_shapes=shapes, strict=False)
    except Exception as exc:
        raise ExportError(f"torch.export could not capture this {type(finetune).__name__}: {type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}") from exc


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
