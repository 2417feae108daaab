"""Measured memory: bytes of unique tensor storage, counting bitsandbytes' quantization state."""

from __future__ import annotations

import torch
from torch import nn

from .trace import quant_state_tensors


def _parameter_tensors(model: nn.Module):
    for module in model.modules():
        for p in module.parameters(recurse=False):
            yield p
            for attr in ("SCB", "CB"):
                extra = getattr(p, attr, None)
                if isinstance(extra, torch.Tensor):
                    yield extra
            state = getattr(p, "quant_state", None)
            if state is not None:
                yield from quant_state_tensors(state)
        state = getattr(module, "state", None)  # Linear8bitLt moves CB/SCB here on first forward
        for attr in ("CB", "SCB"):
            extra = getattr(state, attr, None)
            if isinstance(extra, torch.Tensor):
                yield extra


def storages(model: nn.Module) -> dict[tuple, int]:
    """Unique storages behind a model's parameters (and their quantization state): key -> bytes."""
    out = {}
    for t in _parameter_tensors(model):
        if t.device.type == "meta":
            continue
        s = t.untyped_storage()
        out[(t.device.type, s.data_ptr())] = s.nbytes()
    return out


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of parameter storage held by ``model``, each storage counted once."""
    return sum(storages(model).values())


def extra_bytes(model: nn.Module, *others: nn.Module) -> int:
    """Bytes ``model`` holds that none of ``others`` holds (what a fine-tune adds over its base)."""
    seen = {}
    for other in others:
        seen.update(storages(other))
    return sum(n for key, n in storages(model).items() if key not in seen)
