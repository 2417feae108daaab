"""LoRA wrappers: one small class per layer kind, the base layer kept as an attribute, never copied.

output = base(x) + scaling * B(A(dropout(x))) (+ bias), with scaling = alpha / r (alpha / sqrt(r) with
rslora). B starts at zero, so a fresh adapter returns exactly the base's output; with LoftQ
(``start_from_residual``) it starts instead as the best rank-r correction of the base's quantization
error. DoRA's wrappers build on these (``dora``); ``adapters.make_adapter`` picks the class for a layer.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import RewriteError
from ..rules.ruleset import LoraConfig


class LoraLayer(nn.Module):
    """Common part of the LoRA wrappers: the frozen base layer, A, B, optional bias, scaling.

    ``forward(x) == update(base_layer(x), x)``: a batched view computes the base layer once for the
    rows of many fine-tunes and lets each fine-tune's adapter ``update`` its own rows.
    """

    def __init__(self, base_layer: nn.Module, config: LoraConfig, in_features: int, out_features: int):
        super().__init__()
        self.base_layer = base_layer
        self.config = config
        self.in_features, self.out_features = in_features, out_features
        self.scaling = config.scaling
        dtype = getattr(torch, config.dtype)
        device = _device_of(base_layer)
        self.lora_A = nn.Parameter(torch.empty(config.r, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, config.r, dtype=dtype, device=device))
        self.lora_bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if config.bias else None
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.reset_lora()

    def reset_lora(self) -> None:
        """A random, B zero: the adapter starts as a no-op."""
        with torch.no_grad():
            if self.config.init_lora_weights == "gaussian":
                nn.init.normal_(self.lora_A, std=1 / self.config.r)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    @torch.no_grad()
    def start_from_residual(self, residual: torch.Tensor) -> None:
        """LoftQ's start: scaling·B·A = the best rank-r approximation of ``residual`` = W − deq(Q(W)) (out, in).

        With R = U·S·Vᵀ (truncated SVD), B = U_r·√S_r / √scaling and A = √S_r·V_rᵀ / √scaling, so the
        wrapped layer computes deq(Q(W)) + U_r·S_r·V_rᵀ, the closest it can get to W at rank r (Eckart–Young).
        Unlike PEFT's LoftQ (peft#1982), the scaling is divided out, so any alpha gives that start.
        """
        u, s, vh = torch.linalg.svd(residual.float(), full_matrices=False)
        k = min(self.config.r, s.numel())
        root = (s[:k] / self.scaling).sqrt()
        self.lora_B.zero_()
        self.lora_A.zero_()
        self.lora_B[:, :k] = (u[:, :k] * root).to(self.lora_B)
        self.lora_A[:k] = (root.unsqueeze(1) * vh[:k]).to(self.lora_A)

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        """scaling * B A h (+ bias) for an input already mapped through dropout."""
        out = F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling
        return out + self.lora_bias if self.lora_bias is not None else out

    def delta_weight(self) -> torch.Tensor:
        """The dense update scaling * B @ A, shaped (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The base's dense fp32 ``weight`` (out, in) with this adapter merged in: W + scaling * B @ A."""
        return weight + self.delta_weight().float()

    def extra_repr(self) -> str:
        c = self.config
        return f"r={c.r}, alpha={c.lora_alpha:g}, scaling={self.scaling:.4g}, dropout={c.lora_dropout:g}, bias={c.bias}"


class LoraLinear(LoraLayer):
    """LoRA over nn.Linear or a bitsandbytes Linear8bitLt / Linear4bit."""

    def __init__(self, base_layer: nn.Module, config: LoraConfig):
        super().__init__(base_layer, config, base_layer.in_features, base_layer.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.update(self.base_layer(x), x)

    def update(self, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The base layer's output ``result`` for input ``x``, with this adapter's part added."""
        h = self.dropout(x)
        kind = h.device.type
        if not (torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)):
            h = h.to(self.lora_A.dtype)
        return (result + self.delta(h)).to(result.dtype)  # add in the wider dtype, round once (as PEFT)


class LoraConv1D(LoraLayer):
    """LoRA over transformers' Conv1D (GPT-2), whose weight is stored transposed as (in, out)."""

    def __init__(self, base_layer: nn.Module, config: LoraConfig):
        in_f, out_f = base_layer.weight.shape
        super().__init__(base_layer, config, in_f, out_f)

    forward = LoraLinear.forward
    update = LoraLinear.update


class LoraEmbedding(LoraLayer):
    """LoRA over nn.Embedding or a bitsandbytes Embedding8bit / Embedding4bit: A is (r, num), B is (dim, r)."""

    def __init__(self, base_layer: nn.Module, config: LoraConfig):
        super().__init__(base_layer, config, base_layer.num_embeddings, base_layer.embedding_dim)

    def reset_lora(self) -> None:
        with torch.no_grad():  # as PEFT: A zero, B normal, so the product starts at zero
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The base's (num, dim) embedding with this adapter merged in (the update is (dim, num))."""
        return weight + self.delta_weight().float().t()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.update(self.base_layer(ids), ids)

    def update(self, result: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The base embedding's output ``result`` for ``ids``, with this adapter's part added."""
        h = F.embedding(ids, self.lora_A.t())
        out = F.linear(h, self.lora_B) * self.scaling
        if self.lora_bias is not None:
            out = out + self.lora_bias
        return (result + out).to(result.dtype)


class LoraPositionalEmbedding(LoraEmbedding):
    """LoRA over a learned positional embedding that computes its own rows (OPT's: positions from the attention
    mask or ``position_ids``, plus OPT's offset of 2, cut by the cache length).

    The adapter reads exactly the rows the base layer reads: ``rows(...)`` runs the base layer's own forward over
    a table whose row i holds i, so positions, offset, left padding and cache length are whatever the layer
    computes. Construction checks, on a probe, that the layer is such a lookup (its output equals its weight's
    rows at the indices it computes); anything else is refused.
    """

    MAX_ROWS = 1 << 24  # row indices travel as float32 through the layer's lookup: exact below 2**24

    def __init__(self, base_layer: nn.Module, config: LoraConfig):
        super().__init__(base_layer, config)
        self._check_lookup()

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.update(self.base_layer(*args, **kwargs), self.rows(*args, **kwargs))

    def rows(self, *args, **kwargs) -> torch.Tensor:
        """The row indices the base layer looks up for these inputs, from its own forward over an index table."""
        layer = self.base_layer
        table = torch.arange(layer.num_embeddings, device=layer.weight.device, dtype=torch.float32).unsqueeze(1)
        shadow = copy.copy(layer)  # the layer's settings (offset, padding_idx) over the table instead of its weight
        shadow.__dict__["_parameters"] = {"weight": table}
        return type(layer).forward(shadow, *args, **kwargs).squeeze(-1).round().long()

    def _check_lookup(self) -> None:
        layer = self.base_layer
        name = type(layer).__name__
        refuse = f"surgery's LoRA for learned positional embeddings cannot adapt this {name}"
        if layer.num_embeddings >= self.MAX_ROWS or layer.max_norm is not None:
            raise RewriteError(f"{refuse}: it needs fewer than 2**24 rows and no max_norm; do not adapt it")
        probe = torch.ones(2, 5, dtype=torch.long, device=layer.weight.device)
        try:
            with torch.no_grad():
                found, expected = F.embedding(self.rows(probe), layer.weight), layer(probe)
        except Exception as exc:  # a forward that takes other inputs than a (batch, seq) mask or ids
            raise RewriteError(
                f"{refuse}: its forward does not take a (batch, seq) tensor ({exc}); do not adapt it"
            ) from None
        if found.shape != expected.shape or not torch.equal(found, expected):
            raise RewriteError(f"{refuse}: its output is not a lookup of the rows it computes; do not adapt it")


def _device_of(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    return torch.device("cpu")
