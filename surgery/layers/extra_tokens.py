"""New tokens private to one fine-tune: rows of the input embedding and of the output layer that only it holds.

A fine-tune that adds n tokens with ids ``first_id .. first_id + n - 1`` wraps its input embedding and its
output layer (whatever they are: plain, quantized or LoRA-wrapped, all the base's) and keeps the n new rows
as its own trainable parameters. Ids are mapped by id, not appended by offset: a tokenizer shorter than the
embedding (padded vocabularies) gives new ids below the row count, whose rows the fine-tune then overrides.
The logits are ``max(rows, first_id + n)`` wide. Where the base ties its output layer to its embedding, the
new rows are tied too (one parameter). The shared embedding and every sibling stay bit-identical.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ExtraTokenLayer(nn.Module):
    """Common part: the wrapped layer (``base_layer``) and the id range this fine-tune owns."""

    def __init__(self, base_layer: nn.Module, first_id: int, rows: nn.Parameter, base_rows: int):
        super().__init__()
        self.base_layer = base_layer
        self.first_id, self.base_rows = first_id, base_rows
        self.extra_rows = rows  # one Parameter in both layers when the base ties its output layer to the embedding

    @property
    def count(self) -> int:
        return self.extra_rows.shape[0]

    @property
    def width(self) -> int:
        """The vocabulary the fine-tune reads and predicts: every base row and every new id."""
        return max(self.base_rows, self.first_id + self.count)

    def extra_repr(self) -> str:
        return f"ids {self.first_id}..{self.first_id + self.count - 1}, vocabulary {self.width}"


class ExtraTokenEmbedding(ExtraTokenLayer):
    """The input embedding: an id in the fine-tune's range reads its own row, every other id the base's."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        own = (ids >= self.first_id) & (ids < self.first_id + self.count)
        base = self.base_layer(torch.where(ids < self.base_rows, ids, torch.zeros_like(ids)))
        extra = F.embedding((ids - self.first_id).clamp(0, self.count - 1), self.extra_rows)
        return torch.where(own.unsqueeze(-1), extra.to(base.dtype), base)

    def dense(self, weight: torch.Tensor) -> torch.Tensor:
        """The (width, dim) embedding matrix over the base's dense ``weight`` (rows, dim)."""
        return _spliced(weight, self.extra_rows, self.first_id, self.width)


class ExtraTokenHead(ExtraTokenLayer):
    """The output layer: the base's logits with the fine-tune's columns spliced in at their ids."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        base = self.base_layer(hidden)
        extra = F.linear(hidden.to(self.extra_rows.dtype), self.extra_rows).to(base.dtype)
        end = self.first_id + self.count
        return torch.cat([base[..., : self.first_id], extra, base[..., end:]], dim=-1)

    def dense(self, weight: torch.Tensor) -> torch.Tensor:
        """The (width, dim) output matrix over the base's dense ``weight`` (rows, dim)."""
        return _spliced(weight, self.extra_rows, self.first_id, self.width)


def _spliced(weight: torch.Tensor, rows: torch.Tensor, first_id: int, width: int) -> torch.Tensor:
    out = torch.zeros(width, weight.shape[1], dtype=weight.dtype, device=weight.device)
    out[: weight.shape[0]] = weight
    out[first_id : first_id + rows.shape[0]] = rows.detach().to(weight)
    return out


def extra_token_layers(model: nn.Module) -> list[tuple[str, ExtraTokenLayer]]:
    """The layers of ``model`` that hold a fine-tune's new token rows, by path."""
    return [(path, m) for path, m in model.named_modules() if isinstance(m, ExtraTokenLayer)]
