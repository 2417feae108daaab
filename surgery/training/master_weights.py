"""fp32 master weights for trainable tensors held in half precision.

A ``plain`` module on a bf16 base is a bf16 copy: AdamW's updates smaller than 2^-8 of a weight
round away, and gradients summed over micro-batches in bf16 lose their low bits. As in mixed-precision
training (apex's O2, DeepSpeed's bf16 optimizer), the optimizer steps an fp32 master of each such
tensor, gradients accumulate into the master's fp32 gradient as backward produces them, and the
module's tensor is the master rounded once after every step. LoRA tensors are fp32 by default and
need none; fp32 tensors are their own masters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

HALF = (torch.bfloat16, torch.float16)


@dataclass
class MasterWeights:
    """The (module tensor, fp32 master) pairs of one run, and the hooks that move gradients to the masters."""

    pairs: list[tuple[nn.Parameter, nn.Parameter]] = field(default_factory=list)
    hooks: list = field(default_factory=list)

    @classmethod
    def of(cls, params: list[nn.Parameter]) -> tuple[list[nn.Parameter], MasterWeights]:
        """The tensors the optimizer steps (an fp32 master in place of each half tensor) and their masters."""
        masters = cls()
        stepped = []
        for p in params:
            if p.dtype not in HALF:
                stepped.append(p)
                continue
            master = nn.Parameter(p.detach().float(), requires_grad=True)
            masters.pairs.append((p, master))
            masters.hooks.append(p.register_post_accumulate_grad_hook(_into(master)))
            stepped.append(master)
        return stepped, masters

    def write_back(self) -> None:
        """Round every master into its module tensor (after an optimizer step)."""
        with torch.no_grad():
            for p, master in self.pairs:
                p.copy_(master)

    def reload(self, saved: list[torch.Tensor] | None = None) -> None:
        """Masters from ``saved`` (a checkpoint's fp32 masters, in order) or else from the module's tensors."""
        with torch.no_grad():
            for index, (p, master) in enumerate(self.pairs):
                master.copy_(saved[index] if saved is not None else p)

    def close(self) -> None:
        """Remove the hooks: after the run the module's tensors get their gradients as usual."""
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()

    @property
    def bytes(self) -> int:
        return sum(master.numel() * master.element_size() for _, master in self.pairs)


def _into(master: nn.Parameter):
    """A post-accumulate hook that adds the half gradient to the master's fp32 one and frees it."""

    def hook(p: torch.Tensor) -> None:
        master.grad = p.grad.float() if master.grad is None else master.grad.add_(p.grad)
        p.grad = None

    return hook
