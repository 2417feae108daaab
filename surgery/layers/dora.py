"""DoRA (weight-decomposed LoRA, PEFT's ``use_dora``): a trainable magnitude per output over the direction of W + s·BA.

output = base(x) + (m / ‖W + s·BA‖ − 1) · W·x + (m / ‖W + s·BA‖) · s · B·A·x, the norm taken over each
output's row and detached from the gradient (the DoRA paper's section 4.3, as PEFT computes it); with
dropout active in training, W·x and B·A·x both see the dropped input. m starts at ‖W‖ (B is zero), so a
new adapter returns the base's output. W is the base's weight as it computes, dequantized when stored
int8 or nf4, and only read: the base stays shared.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..rules.ruleset import LoraConfig
from .bnb import dense_weight
from .lora import LoraConv1D, LoraLinear


class DoraLayer:
    """DoRA's part of a LoRA wrapper (mixed in before ``LoraLinear`` or ``LoraConv1D``): the magnitude, the
    rescaled update and the merged weight."""

    kind: str  # the op kind of the base layer, for reading its weight as (out, in)

    def __init__(self, base_layer: nn.Module, config: LoraConfig):
        super().__init__(base_layer, config)
        with torch.no_grad():  # B is zero: the magnitude of W itself
            norm = self.base_weight().norm(dim=1)
        self.lora_magnitude = nn.Parameter(norm.to(device=self.lora_A.device, dtype=self.lora_A.dtype))

    def base_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The base layer's weight W as (out, in) in ``dtype`` (a dequantized copy if quantized): the forward reads
        it in the input's dtype, so a bf16 step holds a bf16 temporary, not a float32 one."""
        return dense_weight(self.base_layer, self.kind, dtype).to(self.lora_A.device)

    def magnitude_scale(self, weight: torch.Tensor) -> torch.Tensor:
        """m / ‖W + s·BA‖ per output, the norm detached (it gets no gradient)."""
        lora_weight = (self.lora_B @ self.lora_A).detach().to(weight.dtype)
        return self.lora_magnitude / (weight + self.scaling * lora_weight).norm(dim=1).detach()

    def update(self, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The base layer's output ``result`` for input ``x``, with DoRA's rescaling and update added."""
        h = self.dropout(x)
        kind = h.device.type
        if not (torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)):
            h = h.to(self.lora_A.dtype)
        weight = self.base_weight(h.dtype)
        scale = self.magnitude_scale(weight)
        lora = F.linear(F.linear(h, self.lora_A), self.lora_B)
        if self.training and not isinstance(self.dropout, nn.Identity):
            base = F.linear(h, weight)  # W·dropout(x): the rescaled part sees the dropped input too
        else:
            bias = getattr(self.base_layer, "bias", None)
            base = result - bias if bias is not None else result
        return (result + (scale - 1) * base + scale * lora * self.scaling).to(result.dtype)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """m / ‖W + ΔW‖ · (W + ΔW), for the base's dense fp32 ``weight`` (out, in)."""
        combined = weight + self.delta_weight().float()
        return (self.lora_magnitude.float() / combined.norm(dim=1)).unsqueeze(1) * combined

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"


class DoraLinear(DoraLayer, LoraLinear):
    """DoRA over nn.Linear or a bitsandbytes Linear8bitLt / Linear4bit."""

    kind = "linear"


class DoraConv1D(DoraLayer, LoraConv1D):
    """DoRA over transformers' Conv1D (GPT-2), whose weight is stored transposed as (in, out)."""

    kind = "conv1d"
