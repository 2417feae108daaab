"""What a fine-tune knows of its base, what it owns, and the guard on the tensors it shares.

A fine-tune (``surgery.Finetune``, made by ``surgery.rewrite``) carries a ``FinetuneInfo``: the rules it was
made from, their plan, and the base it shares. Its *own* tensors are its LoRA tensors, the private copies of
its ``plain`` modules and the rows of its new tokens; every other tensor is the base's, shared with the base
and every sibling. The stages below the fine-tune type (files, cards, exports) read a fine-tune through these
functions; ``mark_shared`` puts the one guard that works without the fine-tune on the shared tensors
themselves: a gradient can never accumulate in one (the optimizer would otherwise write into every sibling).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import AdapterStateError, RewriteError
from ..layers.extra_tokens import ExtraTokenLayer
from ..layers.lora import LoraLayer

if TYPE_CHECKING:
    from ..planning.decisions import Plan
    from ..rules.ruleset import RuleSet

INFO = "_surgery_info"  # where a fine-tune keeps its FinetuneInfo (its own instance dict)
SHARED = "_surgery_shared"  # set on every base tensor that fine-tunes share


@dataclass(frozen=True)
class FinetuneInfo:
    """What a fine-tune knows of itself: its rules, its plan, and the base it shares."""

    rules: RuleSet
    plan: Plan  # as planned on the base before this fine-tune's rewrite quantized it
    base: nn.Module

    def __repr__(self) -> str:
        return f"FinetuneInfo(rules={self.rules.source!r}, base={type(self.base).__name__})"


def finetune_info(model: nn.Module) -> FinetuneInfo | None:
    """The ``FinetuneInfo`` of a fine-tune, or None for any other model.

    Args:
        model: any module.

    Returns:
        The fine-tune's info, or None when ``model`` is not a fine-tune.
    """
    return model.__dict__.get(INFO) if isinstance(model, nn.Module) else None


def require_finetune(model: nn.Module, verb: str, error: type[Exception] = AdapterStateError) -> FinetuneInfo:
    """The model's ``FinetuneInfo``, or ``error`` saying that only fine-tunes can be ``verb``."""
    info = finetune_info(model)
    if info is None:
        raise error(
            f"a {type(model).__name__} that is not a fine-tune cannot be {verb}; make one with "
            "surgery.rewrite or surgery.load_adapter"
        )
    return info


def own_state(finetune: nn.Module) -> dict[str, nn.Parameter]:
    """A fine-tune's own parameters by state-dict name: its LoRA tensors, its plain modules' private copies and the
    rows of its extra tokens (a tie kept among plain modules is one tensor, named once).

    Raises:
        AdapterStateError: ``finetune`` is not a fine-tune.
    """
    info = require_finetune(finetune, "saved or loaded")
    plain = {d.path for d in info.plan.by_action("plain")}
    plain |= {  # a plain layer under extra tokens
        f"{path}.base_layer" for path, m in finetune.named_modules() if isinstance(m, ExtraTokenLayer) and path in plain
    }
    out: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for path, module in finetune.named_modules():
        if not isinstance(module, (LoraLayer, ExtraTokenLayer)) and path not in plain:
            continue
        for name, p in module.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                out[f"{path}.{name}" if path else name] = p
    return out


def refuse_copying_move(model: nn.Module, fn, what: str) -> None:
    """Refuse a move or cast (``model._apply(fn)``) that would give ``what`` its own copy of the shared base."""
    for t in model.parameters():
        probe = torch.empty(0, dtype=t.dtype, device=t.device)
        moved = fn(probe)
        if moved.device != probe.device or moved.dtype != probe.dtype:
            raise RewriteError(
                f"moving or casting {what} (to {moved.device}, {moved.dtype}) would copy the base it shares and "
                "silently break sharing with its siblings; put the base where it should live (device, dtype) "
                "before creating fine-tunes with surgery.rewrite"
            )


def mark_shared(base: nn.Module) -> None:
    """Mark every tensor of the base as shared with fine-tunes (``refuse_training_shared`` reads the mark)."""
    for p in base.parameters():
        setattr(p, SHARED, True)


def is_shared(t: torch.Tensor) -> bool:
    """True for a tensor a fine-tune shares with its base."""
    return getattr(t, SHARED, False)


def refuse_training_shared(model: nn.Module) -> None:
    """Refuse to compute with ``model`` (a fine-tune or batched view) while a tensor it shares with its base is
    trainable: a gradient there would let any optimizer change the base under every sibling. Checked before each
    forward, so whatever made one trainable (``p.requires_grad = True`` by hand), no gradient ever reaches it."""
    shared = next((name for name, p in model.named_parameters() if p.requires_grad and is_shared(p)), None)
    if shared is not None:
        raise RewriteError(
            f"'{shared}' is a tensor this {type(model).__name__} shares with its base and siblings, and it was made "
            "trainable by hand; a gradient there would let an optimizer change the base and every sibling, so it "
            "does not run. Freeze it again (p.requires_grad_(False)); train a module in full precision with a "
            "`plain` rule (it gets a private copy), or adapt it with LoRA"
        )
