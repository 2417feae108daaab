"""What a fine-tune is (``Finetune``) and how one is made (``rewrite``): a copy of the base that shares its tensors.

``rewrite(base, rules)`` plans (all errors first), quantizes the base in place once where the plan needs it,
then builds a fine-tune: every module object is new (own hooks, own training flag) but every frozen parameter
and buffer is the base's own tensor; quantized layers are shared as they are; adapted layers are wrapped in
LoRA; ``plain`` modules get a private trainable copy. Siblings therefore cost only their adapters and plain
copies.

A fine-tune is a ``Finetune``: its class is a subclass of the base's own class, made once per base class
(``finetune_class``), so ``generate``, ``Trainer`` and ``isinstance(ft, LlamaForCausalLM)`` keep working, and
``isinstance(ft, surgery.Finetune)`` says what is a fine-tune. Everything a user can do through its public
surface leaves the base and every sibling bit-identical: ``_apply`` refuses moves and casts that would copy
the base, ``requires_grad_(True)`` refuses to make shared tensors trainable, ``load_state_dict`` loads only its
own tensors, ``save_pretrained`` writes an adapter folder (never the base), ``copy.deepcopy`` makes an
independent fine-tune of the same base, pickling stores the base plus the fine-tune's own tensors. The shared
tensors carry their own guard (``base.ownership.mark_shared``); a fine-tune wrapped by FSDP1 refuses to
run.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..base.fingerprints import outside_quantization_error
from ..base.full_weights import full_weight_reader
from ..base.ownership import (
    INFO,
    FinetuneInfo,
    finetune_info,
    mark_shared,
    own_state,
    refuse_copying_move,
    refuse_training_shared,
)
from ..base.quantize import float_weight, quantize_base
from ..base.shared_base import (
    RECORD,
    base_graph,
    base_record,
    holds_tensors,
    restored_on_failure,
    run_through_root,
    settle_base,
    warn_if_quantizing_under_finetunes,
)
from ..base.sources import full_weights_of
from ..errors import AdapterStateError, RewriteError, ShardingError
from ..files.adapter_folder import write_adapter_folder
from ..layers.adapters import make_adapter
from ..layers.bnb import dense_weight, held_quant_config, is_state_key, own_class, quantized_storage
from ..layers.notices import notices_once
from ..model.tracing import replace_submodule
from ..planning.decisions import Decision, Plan
from ..planning.decisions import plan as make_plan
from ..random_state import forked_rng
from ..rules.rule_file import load_rules
from ..rules.ruleset import QuantConfig, RuleSet
from .vocabulary import add_extra_tokens, first_extra_id


class NoticesOnce(nn.Module):
    """A model of surgery's (a fine-tune, a batched view) whose calls show bitsandbytes' notices once each, not once
    per layer call."""

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            return super().__call__(*args, **kwargs)
        with notices_once():
            return super().__call__(*args, **kwargs)


class Finetune(NoticesOnce):
    """A fine-tune of a shared base: a model of the base's own class over the base's frozen tensors, plus tensors
    of its own (LoRA, private copies of ``plain`` modules, new token rows).

    Made by ``surgery.rewrite`` (and ``load_adapter``, ``import_peft``, ``finetuna.new_finetuned``), never
    constructed directly. ``type(ft)`` is ``Finetune<BaseClass>``, a subclass of both ``Finetune`` and the base's
    class.
    """

    @property
    def surgery_info(self) -> FinetuneInfo:
        """The rules this fine-tune was made from, their plan, and the base it shares."""
        return self.__dict__[INFO]

    def own_state(self) -> dict[str, nn.Parameter]:
        """The fine-tune's own tensors by state-dict name (what adapter files hold)."""
        return own_state(self)

    def _apply(self, fn, *args, **kwargs):
        """Refuse ``.to()``/``.cuda()``/``.half()``... that would give the fine-tune its own copy of the shared base
        (moves that change nothing, as ``Trainer`` makes them, pass)."""
        refuse_copying_move(self, fn, "a fine-tune")
        return super()._apply(fn, *args, **kwargs)

    def requires_grad_(self, requires_grad: bool = True) -> Finetune:
        """Refuse to make the base's shared tensors trainable (an optimizer would write into every sibling)."""
        if requires_grad:
            own = {id(p) for p in own_state(self).values()}
            shared = next((name for name, p in self.named_parameters() if id(p) not in own), None)
            if shared is not None:
                raise RewriteError(
                    f"requires_grad_(True) would make '{shared}', a frozen tensor this fine-tune shares with its base "
                    "and siblings, trainable; train a module in full precision with a `plain` rule (it gets a "
                    "private copy), or adapt it with LoRA. Its own tensors are trainable already"
                )
        return super().requires_grad_(requires_grad)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load this fine-tune's own tensors only, never the base it shares.

        A full state dict (e.g. a Trainer checkpoint's model.safetensors) may name the base's tensors too; writing
        them through one fine-tune would change the base under every sibling, so they are skipped. Missing own
        tensors fail under ``strict``; a shape mismatch always fails, before any copy.
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

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> Path:
        """Write the fine-tune's adapter folder (PEFT's layout where PEFT can hold it, surgery's adapter file, the
        Trainer link, a model card); the base is never written. Takes transformers' keywords (``is_main_process``,
        ``state_dict``, ...); see ``surgery.files.adapter_folder.write_adapter_folder``.

        Returns:
            The folder.
        """
        return write_adapter_folder(self, save_directory, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> Finetune:
        """An independent fine-tune on the same base (or on the base's copy, when the base is copied too)."""
        info = self.surgery_info
        base = memo.get(id(info.base), info.base)
        own = {name: p.detach().clone() for name, p in own_state(self).items()}
        return rebuild(base, info.rules, own, [m.training for m in self.modules()])

    def __reduce_ex__(self, protocol: int):
        """Pickle as (base, rules, own tensors, training flags): unpickling rebuilds a fine-tune of that base."""
        info = self.surgery_info
        own = {name: p.detach().to("cpu").clone() for name, p in own_state(self).items()}
        return rebuild, (info.base, info.rules, own, [m.training for m in self.modules()])


_CLASSES: dict[tuple[type, type], type] = {}  # (surgery's type, base class) -> their subclass, made once


def finetune_class(base_class: type) -> type:
    """The fine-tune class of a base class: ``Finetune<BaseClass>(Finetune, BaseClass)``, made once and reused."""
    return subclass_of(Finetune, base_class)


def subclass_of(kind: type, base_class: type) -> type:
    """``<kind><BaseClass>(kind, BaseClass)``: one of surgery's model types (a fine-tune, a batched view) over a
    base's own class, made once per pair; ``cls.base_class`` is the base's class."""
    cls = _CLASSES.get((kind, base_class))
    if cls is None:
        name = f"{kind.__name__}{base_class.__name__}"
        cls = type(name, (kind, base_class), {"__module__": kind.__module__, "__qualname__": name})
        cls.base_class = base_class
        _CLASSES[(kind, base_class)] = cls
    return cls


def detached_copy(finetune: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """``copy.deepcopy(finetune, memo)`` as a plain model of the base's class: no fine-tune info, type or guards."""
    cls = getattr(type(finetune), "base_class", type(finetune))
    shell = object.__new__(cls)
    shell.__dict__.update({k: v for k, v in finetune.__dict__.items() if k != INFO})
    out = copy.deepcopy(shell, memo)
    out._forward_pre_hooks = type(out._forward_pre_hooks)(
        (k, h) for k, h in out._forward_pre_hooks.items() if h is not _guard_forward
    )
    return out


def _become_finetune(model: nn.Module, info: FinetuneInfo) -> Finetune:
    """Make a structural copy of the base into a fine-tune: its type, its info, its FSDP1 guard."""
    model.__class__ = finetune_class(type(model))
    model.__dict__[INFO] = info
    model.register_forward_pre_hook(_guard_forward)
    return model


def _guard_forward(finetune: nn.Module, args) -> None:
    """Forward pre-hook of a fine-tune: no shared tensor may train, and FSDP1 must not have flattened the base."""
    refuse_training_shared(finetune)
    _refuse_fsdp1_flattening(finetune)


def _refuse_fsdp1_flattening(module: nn.Module) -> None:
    """FSDP1 rewrites the parameters a fine-tune shares with its base; refuse to run on."""
    if any(getattr(p, "_fsdp_flattened", False) for p in module.surgery_info.base.parameters()):
        raise RewriteError(
            "this fine-tune was wrapped by FSDP1 (torch.distributed.fsdp.FullyShardedDataParallel, also accelerate's "
            "and Trainer's FSDP setting), which rewrites the tensors it shares with its base and siblings; FSDP1 is "
            "not supported on fine-tunes. Reload the base, and train with DDP (torchrun) or shard the shared base "
            "with FSDP2 (`surgery train --fsdp`, surgery.shard_base) instead"
        )


def rewrite(
    model: nn.Module,
    rules: RuleSet | str,
    *,
    progress: Callable | None = None,
    finish: Callable[[nn.Module], None] | None = None,
) -> nn.Module:
    """A new fine-tune of ``model`` by ``rules``; quantizes the base first where the plan needs it.

    Raises PlanError before anything changes. If anything fails later, including ``finish(finetune)``
    (used to load saved state into the new fine-tune), the base is restored exactly. Adapters with
    ``init_lora_weights: loftq`` start from the base's quantization error, unless ``finish`` loads them.
    """
    if finetune_info(model) is not None:
        raise RewriteError(
            "this model is itself a fine-tune; rewrite its base instead (surgery.finetune_info(ft).base)"
        )
    meta = next((name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta), None)
    if meta is not None:
        raise RewriteError(
            f"'{meta}' is on the meta device (no weights): a fine-tune needs real weights. Load the "
            "model with weights (or --random-init); plan and inspect work on meta models"
        )
    rules = load_rules(rules)
    the_plan = make_plan(base_graph(model), rules)
    warn_if_quantizing_under_finetunes(model, the_plan)
    loftq, full = _loftq_starts(model, the_plan, loading=finish is not None)
    first_id = _first_extra_id(model, rules)
    with restored_on_failure(model, "rewrite"):
        quantize_base(model, the_plan, progress)
        settle_base(model)
        finetune = _structural_copy(model, the_plan)
        if loftq:
            _start_from_quantization_error(finetune, loftq, full)
        if first_id is not None:
            add_extra_tokens(finetune, rules.extra_tokens, first_id)
        finetune = _become_finetune(finetune, FinetuneInfo(as_stored(rules, model, the_plan), the_plan, model))
        if finish is not None:
            finish(finetune)
    mark_shared(model)
    base_record(model).finetunes.add(finetune)
    return finetune


STORAGE_SETTINGS = {"int8": ("threshold",), "nf4": ("double_quant", "blocksize", "storage")}


def as_stored(rules: RuleSet, base: nn.Module, the_plan: Plan) -> RuleSet:
    """The rules with the storage settings they leave out written as the base holds what they quantize.

    A rule file that says ``quantize: nf4`` on a base a sibling quantized with double quantization follows the
    base; the fine-tune's recorded rules (its adapter file, its PEFT card) then say what it was trained on, so it
    loads onto that storage again and beside that sibling. Settings the file writes stay as written (they already
    match the base, or the plan refused them); the compute dtype stays as written (bitsandbytes sets a held one
    from the first input).
    """
    stored: dict[int, set[QuantConfig]] = {}  # per rule index (0: the default), the settings as held
    for decision in the_plan.decisions.values():
        held = held_quant_config(base.get_submodule(decision.path))
        rule = decision.rule
        written = decision.quant or (rule.quantize if rule is not None and rule.quantize else rules.quantize)
        if held is None or not written.quantizes:
            continue
        if held.scheme != written.scheme:
            return rules
        names = STORAGE_SETTINGS["int8" if held.scheme == "int8" else "nf4"]
        changes = {
            n: getattr(held, n) for n in names if n not in written.given and getattr(held, n) != getattr(written, n)
        }
        config = dataclasses.replace(written, **changes, given=written.given | set(changes))
        stored.setdefault(rule.index if rule is not None and rule.quantize else 0, set()).add(config)
    if any(len(configs) != 1 for configs in stored.values()):
        return rules  # one setting's modules held in several ways: keep what the file says
    as_written = {r.index: r.quantize for r in rules.rules} | {0: rules.quantize}
    chosen = {i: c for i, configs in stored.items() for c in configs if c.given != as_written[i].given}
    if not chosen:
        return rules  # stored as written
    new_rules = tuple(dataclasses.replace(r, quantize=chosen[r.index]) if r.index in chosen else r for r in rules.rules)
    return dataclasses.replace(rules, rules=new_rules, quantize=chosen.get(0, rules.quantize))


def shared_copy(base: nn.Module) -> nn.Module:
    """A copy of the base with new module objects (own flags, hooks, LLM.int8 state) over the base's tensors.

    On a sharded base the modules that hold tensors are the base's own objects (FSDP2's hooks live on
    them) and the copy's forward runs through FSDP2's root (see sharding).
    """
    root = base_record(base).sharded
    memo: dict[int, Any] = {}
    for module in base.modules():
        if root is not None and holds_tensors(module):
            memo[id(module)] = module
            continue
        if quantized_storage(module):
            memo[id(module)] = _own_quantized_leaf(module)
            continue
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            memo[id(t)] = t
    memo.pop(id(base), None)
    if root is not None:
        memo[id(root)] = root  # the base's own forward goes through the root too
    out = copy.deepcopy(base, memo)
    out.__dict__.pop(RECORD, None)  # the base's record stays the base's
    if root is not None:
        run_through_root(out, root)
    return out


def _structural_copy(base: nn.Module, the_plan: Plan) -> nn.Module:
    """New module objects, the base's own tensors; then LoRA wrappers and private plain copies."""
    dora = next((p for p, d in the_plan.decisions.items() if d.lora is not None and d.lora.use_dora), None)
    if dora is not None and base_record(base).sharded is not None:
        raise ShardingError(
            f"{dora}: use_dora (DoRA) reads the layer's whole weight in every forward, and this base "
            "is sharded with FSDP2; make DoRA fine-tunes of an unsharded base, or drop use_dora"
        )
    finetune = shared_copy(base)
    private: dict[int, nn.Parameter] = {}
    for path, decision in the_plan.decisions.items():
        if decision.action == "plain":
            module = finetune.get_submodule(path)
            if base_record(base).sharded is not None:  # the leaf is the base's own: the copy gets its own module
                module = _unsharded_module(module)
                replace_submodule(finetune, path, module)
            for name, p in list(module.named_parameters(recurse=False)):
                if id(p) not in private:
                    private[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=True)
                setattr(module, name, private[id(p)])
        elif decision.action == "adapt" and decision.lora is not None:
            try:
                adapter = make_adapter(finetune.get_submodule(path), decision.kind, decision.lora)
            except RewriteError as exc:
                raise RewriteError(f"{decision.decided_by} adapts {path}: {exc}") from None
            replace_submodule(finetune, path, adapter)
    return finetune


def _loftq_starts(model: nn.Module, the_plan: Plan, *, loading: bool) -> tuple[list[Decision], Any]:
    """The LoftQ decisions and a reader of their full-precision weights, checked before anything changes; none when
    saved adapters are loaded (``loading``: they overwrite any start)."""
    loftq = (
        []
        if loading
        else [d for d in the_plan.decisions.values() if d.lora is not None and d.lora.init_lora_weights == "loftq"]
    )
    if not loftq:
        return [], None
    if base_record(model).sharded is not None:
        raise ShardingError(
            f"{loftq[0].path}: init_lora_weights: loftq reads the layer's whole weight, and this base "
            "is sharded with FSDP2; make LoftQ fine-tunes of an unsharded base"
        )
    return loftq, full_weight_reader(model, [d.path for d in loftq], full_weights_of(model))


def _first_extra_id(model: nn.Module, rules: RuleSet) -> int | None:
    """The first new token's id (None without ``extra_tokens``), checked before anything changes."""
    first_id = first_extra_id(model, rules)
    if first_id is not None and base_record(model).sharded is not None:
        raise ShardingError(
            f"{rules.source}: extra_tokens needs the whole embedding and output layer, and this base "
            "is sharded with FSDP2; add new tokens to fine-tunes of an unsharded base"
        )
    return first_id


def _start_from_quantization_error(finetune: nn.Module, decisions: list[Decision], full) -> None:
    """LoftQ (one pass, the base untouched): each adapter starts as the best rank-r fit of W − deq(Q(W))."""
    with full.reader() as read:
        for decision in decisions:
            adapter = finetune.get_submodule(decision.path)
            device = adapter.lora_A.device
            weight = float_weight(read(decision.path), decision).to(device=device, dtype=torch.float32)
            quantized = dense_weight(adapter.base_layer, decision.kind)
            if weight.shape != quantized.shape:
                raise RewriteError(
                    f"{decision.path}: the full-precision weight LoftQ read has shape "
                    f"{tuple(weight.shape)}, the base's layer {tuple(quantized.shape)}; the checkpoint "
                    "it was loaded from has changed or is another model's"
                )
            _check_quantized_from(weight, adapter.base_layer, decision.path, full)
            adapter.start_from_residual(weight - quantized)


def _check_quantized_from(weight: torch.Tensor, layer: nn.Module, path: str, full) -> None:
    """Refuse a full-precision weight the base's quantized layer was not quantized from (another model's weights of
    the same shape, a file changed since the base loaded): LoftQ would start from a wrong residual."""
    outside = outside_quantization_error(weight, layer)
    if outside is not None:
        index, diff, allowed = outside
        row, col = divmod(index, weight.shape[1])
        raise RewriteError(
            f"{path}: the full-precision weight LoftQ read from {full.origin(path)} is not the one the base's "
            f"quantized layer holds: element ({row}, {col}) differs by {diff:.3g}, more than its quantization error "
            f"({allowed:.3g}); the checkpoint is another model's or changed since the base was loaded: load the base "
            "again from the checkpoint LoftQ should read, or use init_lora_weights: true"
        )


def _unsharded_module(module: nn.Module) -> nn.Module:
    """A module of the leaf's own class (no FSDP) holding the whole tensors: gathered from every rank's shard."""
    cls = own_class(module)
    out = cls.__new__(cls)
    nn.Module.__init__(out)
    out.__dict__.update({k: v for k, v in module.__dict__.items() if not k.startswith("_")})
    for name, p in module.named_parameters(recurse=False):
        whole = p.full_tensor() if hasattr(p, "full_tensor") else p
        out.register_parameter(name, nn.Parameter(whole.detach(), requires_grad=False))
    for name, b in module.named_buffers(recurse=False):
        out.register_buffer(name, b)
    return out


def _own_quantized_leaf(module: nn.Module) -> nn.Module:
    """A bitsandbytes layer of the fine-tune's own (training flag, hooks, matmul state) over the base's tensors.

    Sharing the layer object itself would let ``ft.train()`` on one fine-tune change how its siblings
    and the base compute (LLM.int8 reads the module's training flag).
    """
    state = getattr(module, "state", None)
    if state is not None and getattr(module.weight, "CB", None) is not None:
        module.init_8bit_state()  # what its first forward does: CB/SCB move into the matmul state
    own = copy.copy(module)
    own.__dict__.update(
        {
            name: type(value)(value)
            for name, value in module.__dict__.items()
            if name.startswith("_") and isinstance(value, dict)
        }
    )  # parameters, buffers, hooks
    if state is not None:
        own.state = copy.copy(state)
    return own


def rebuild(base: nn.Module, rules: RuleSet, own: dict[str, torch.Tensor], modes: list[bool]) -> nn.Module:
    """A fine-tune of ``base`` by ``rules`` holding ``own`` tensors, each module in the given training mode."""
    with forked_rng():  # LoRA init is overwritten: draw nothing from the caller's stream
        finetune = rewrite(base, rules, finish=lambda ft: ft.load_state_dict(own))
    for module, training in zip(finetune.modules(), modes):
        module.training = training
    return finetune
