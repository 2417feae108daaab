"""What a fine-tune is: its info, its own tensors, and the guards that keep its base and siblings intact.

A fine-tune (made by ``rewrite``) is a model of the base's class whose frozen tensors are the base's
own objects. Everything a user can do through its public surface must leave the base and every
sibling bit-identical, so a fine-tune carries a few methods of its own (installed per instance, the
class stays the base's): ``_apply`` refuses moves and casts that would copy the base,
``requires_grad_(True)`` refuses to make shared tensors trainable, ``load_state_dict`` loads only its
own tensors; ``rewrite`` adds the copy methods (``copy.deepcopy`` makes an independent fine-tune on
the same base, pickling stores the base plus the fine-tune's own tensors and rebuilds it on load).
Two global guards catch what goes around those methods: an optimizer step over a shared tensor, and FSDP1
flattening a fine-tune.
"""

from __future__ import annotations

import copy
import types
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ..errors import AdapterStateError, RewriteError
from ..layers.bnb import is_state_key
from ..layers.extra_tokens import ExtraTokenLayer
from ..layers.lora import LoraLayer

if TYPE_CHECKING:
    from ..planning.decisions import Plan
    from ..rules.ruleset import RuleSet

SHARED = "_surgery_shared"  # attribute set on every base tensor that fine-tunes share


@dataclass
class FinetuneInfo:
    """What a fine-tune knows of itself: its rules, its plan, and the base it shares."""

    rules: RuleSet
    plan: Plan  # as planned on the base before this rewrite quantized it
    base: nn.Module

    def __repr__(self) -> str:
        return f"FinetuneInfo(rules={self.rules.source!r}, base={type(self.base).__name__})"


def finetune_info(model: nn.Module) -> FinetuneInfo | None:
    """The FinetuneInfo of a fine-tune made by ``rewrite``, or None for any other model."""
    return model.__dict__.get("_surgery")


def require_finetune(model: nn.Module, verb: str, error: type[Exception] = AdapterStateError) -> FinetuneInfo:
    """The model's FinetuneInfo, or ``error`` saying that only fine-tunes can be ``verb``."""
    info = finetune_info(model)
    if info is None:
        raise error(
            f"a {type(model).__name__} that is not a fine-tune cannot be {verb}; make one with "
            "surgery.rewrite or surgery.load_adapter"
        )
    return info


def own_state(finetune: nn.Module) -> dict[str, nn.Parameter]:
    """The fine-tune's own parameters by name: its LoRA tensors, its plain modules' private copies and the rows of
    its extra tokens."""
    info = require_finetune(finetune, "saved or loaded")
    plain = {d.path for d in info.plan.by_action("plain")}
    plain |= {
        f"{path}.base_layer"
        for path, m in finetune.named_modules()  # a plain layer under extra tokens
        if isinstance(m, ExtraTokenLayer) and path in plain
    }
    out: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for path, module in finetune.named_modules():
        if not isinstance(module, (LoraLayer, ExtraTokenLayer)) and path not in plain:
            continue
        for name, p in module.named_parameters(recurse=False):
            if id(p) not in seen:  # a tie kept among plain modules is one tensor, saved once
                seen.add(id(p))
                out[f"{path}.{name}" if path else name] = p
    return out


def mark_shared(base: nn.Module) -> None:
    """Mark every tensor of the base as shared with fine-tunes (checked by the optimizer guard)."""
    for p in base.parameters():
        setattr(p, SHARED, True)


def is_shared(t: torch.Tensor) -> bool:
    return getattr(t, SHARED, False)


def install_guards(finetune: nn.Module, info: FinetuneInfo, copying: dict) -> None:
    """Give a new fine-tune its info and its own methods (bound per instance; the class is the base's).

    ``copying`` holds the ``__deepcopy__`` and ``__reduce_ex__`` methods (they rebuild through rewrite).
    """
    finetune.__dict__["_surgery"] = info
    for name, method in {**_METHODS, **copying}.items():
        finetune.__dict__[name] = types.MethodType(method, finetune)
    finetune.register_forward_pre_hook(_refuse_fsdp1_flattening)


def detached_copy(finetune: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """``copy.deepcopy(finetune, memo)`` as a plain model: without the fine-tune's info and guards."""
    shell = object.__new__(type(finetune))
    shell.__dict__.update({k: v for k, v in finetune.__dict__.items() if k not in _INSTANCE_ATTRS})
    out = copy.deepcopy(shell, memo)
    out._forward_pre_hooks = type(out._forward_pre_hooks)(
        (k, h) for k, h in out._forward_pre_hooks.items() if h is not _refuse_fsdp1_flattening
    )
    return out


# ------------------------------------------------------------------------------ per-instance methods


def guarded_apply(self: nn.Module, fn, *args, **kwargs):
    """Refuse .to()/.cuda()/.half()... that would give a fine-tune its own copy of the shared base."""
    for t in self.parameters():
        probe = torch.empty(0, dtype=t.dtype, device=t.device)
        moved = fn(probe)
        if moved.device != probe.device or moved.dtype != probe.dtype:
            raise RewriteError(
                f"moving or casting a fine-tune (to {moved.device}, {moved.dtype}) would copy the base it "
                "shares and silently break sharing with its siblings; put the base where it should live "
                "(device, dtype) before creating fine-tunes with surgery.rewrite"
            )
    return type(self)._apply(self, fn, *args, **kwargs)


def _requires_grad_(self: nn.Module, requires_grad: bool = True) -> nn.Module:
    """Refuse to make the base's shared tensors trainable (an optimizer would write into every sibling)."""
    if requires_grad:
        own = {id(p) for p in own_state(self).values()}
        shared = next((name for name, p in self.named_parameters() if id(p) not in own), None)
        if shared is not None:
            raise RewriteError(
                f"requires_grad_(True) would make '{shared}', a frozen tensor this fine-tune shares with its base "
                "and siblings, trainable; train a module in full precision with a `plain` rule (it gets a private "
                "copy), or adapt it with LoRA. Its own tensors are trainable already"
            )
    return type(self).requires_grad_(self, requires_grad)


def _load_state_dict(self: nn.Module, state_dict, strict: bool = True, assign: bool = False):
    """``load_state_dict`` for a fine-tune: loads its own tensors only, never the base it shares.

    A full state dict (e.g. a Trainer checkpoint's model.safetensors) may name the base's tensors too;
    writing them through one fine-tune would change the base under every sibling, so they are
    skipped. Missing own tensors fail under ``strict``; a shape mismatch always fails, before any copy.
    """
    own = own_state(self)
    missing = [k for k in own if k not in state_dict]
    if strict and missing:
        raise AdapterStateError(
            f"load_state_dict: missing '{missing[0]}'"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + " of this fine-tune's own tensors"
        )
    for name, p in own.items():
        if name in state_dict and tuple(state_dict[name].shape) != tuple(p.shape):
            raise AdapterStateError(
                f"load_state_dict: '{name}' has shape {tuple(state_dict[name].shape)}, "
                f"the fine-tune needs {tuple(p.shape)}"
            )
    with torch.no_grad():
        for name, p in own.items():
            if name in state_dict:
                p.copy_(state_dict[name])
    known = {n for n, _ in self.named_parameters(remove_duplicate=False)}
    known |= {n for n, _ in self.named_buffers(remove_duplicate=False)}
    unexpected = [k for k in state_dict if k not in known and not is_state_key(k, known)]
    return nn.modules.module._IncompatibleKeys(missing, unexpected)


_METHODS = {"_apply": guarded_apply, "requires_grad_": _requires_grad_, "load_state_dict": _load_state_dict}
COPY_METHODS = ("__deepcopy__", "__reduce_ex__")  # installed by rewrite, which copying goes through
_INSTANCE_ATTRS = ["_surgery", *_METHODS, *COPY_METHODS]


def add_method(name: str, method) -> None:
    """Give every fine-tune a method defined by a layer above this one (``save_pretrained``, which writes files).

    That layer imports this module and registers here; ``surgery/__init__`` imports it, and every
    ``import surgery.<module>`` runs the package init first, so no fine-tune is made without it.
    """
    _METHODS[name] = method
    _INSTANCE_ATTRS.append(name)


# ------------------------------------------------------------------------------ global guards


def _refuse_stepping_shared(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Optimizer pre-step hook: no optimizer may update a tensor that fine-tunes share with their base."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if is_shared(p) and (p.requires_grad or p.grad is not None):
                raise RewriteError(
                    f"{type(optimizer).__name__}.step() would update a {tuple(p.shape)} tensor that fine-tunes share "
                    "with their base (it was made trainable by hand), changing the base and every sibling; "
                    "refused. Give the optimizer only trainable own tensors "
                    "([p for p in ft.parameters() if p.requires_grad]) and use a `plain` rule for modules to train "
                    "in full precision"
                )


def _refuse_fsdp1_flattening(module: nn.Module, args) -> None:
    """Forward pre-hook: FSDP1 rewrites the parameters a fine-tune shares with its base; refuse to run on."""
    info = finetune_info(module)
    shared = info.base.parameters() if info is not None else module.parameters()
    if any(getattr(p, "_fsdp_flattened", False) for p in shared):
        raise RewriteError(
            "this fine-tune was wrapped by FSDP1 (torch.distributed.fsdp.FullyShardedDataParallel, also accelerate's "
            "and Trainer's FSDP setting), which rewrites the tensors it shares with its base and siblings; FSDP1 is "
            "not supported on fine-tunes. Reload the base, and train with DDP (torchrun) or shard the shared base with "
            "FSDP2 (`surgery train --fsdp`, surgery.sharding.shard_base) instead"
        )


register_optimizer_step_pre_hook(_refuse_stepping_shared)
