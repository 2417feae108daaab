"""Make fine-tunes: structural copies of a base that share every frozen tensor with it.

``rewrite(base, rules)`` plans (all errors first), quantizes the base in place once where the plan
needs it, then builds a fine-tune of the same class: every module object is new (own hooks, own
training flag) but every frozen parameter and buffer is the base's own tensor; quantized layers are
shared as they are; adapted layers are wrapped in LoRA; ``plain`` modules get a private trainable
copy. Siblings therefore cost only their adapters and plain copies.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..base.full_weights import full_weight_reader
from ..base.loading import full_weights_of
from ..base.quantize import float_weight, quantize_base
from ..base.shared_base import (
    base_graph,
    base_record,
    holds_tensors,
    restored_on_failure,
    run_through_root,
    settle_base,
    warn_if_quantizing_under_finetunes,
)
from ..errors import RewriteError, ShardingError
from ..layers.adapters import make_adapter
from ..layers.bnb import dense_weight, own_class, quantized_storage
from ..model.tracing import replace_submodule
from ..planning.decisions import Decision, Plan
from ..planning.decisions import plan as make_plan
from ..random_state import forked_rng
from ..rules.rule_file import load_rules
from ..rules.ruleset import RuleSet
from .state import FinetuneInfo, finetune_info, install_guards, mark_shared, own_state
from .vocabulary import add_extra_tokens, first_extra_id


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
        install_guards(finetune, FinetuneInfo(rules, the_plan, model), COPYING)
        if finish is not None:
            finish(finetune)
    mark_shared(model)
    base_record(model).finetunes.add(finetune)
    return finetune


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
    loftq = [] if loading else [d for d in the_plan.decisions.values() if d.lora is not None and d.lora.init == "loftq"]
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
            adapter.start_from_residual(weight - quantized)


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


# ------------------------------------------------------------------------------ copying a fine-tune


def _deepcopy(self: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """An independent fine-tune on the same base (or on the base's copy, when the base is copied too)."""
    info = finetune_info(self)
    base = memo.get(id(info.base), info.base)
    own = {name: p.detach().clone() for name, p in own_state(self).items()}
    return rebuild(base, info.rules, own, [m.training for m in self.modules()])


def _reduce_ex(self: nn.Module, protocol: int):
    """Pickle as (base, rules, own tensors, training flags): unpickling rebuilds a fine-tune of that base."""
    info = finetune_info(self)
    own = {name: p.detach().to("cpu").clone() for name, p in own_state(self).items()}
    return rebuild, (info.base, info.rules, own, [m.training for m in self.modules()])


def rebuild(base: nn.Module, rules: RuleSet, own: dict[str, torch.Tensor], modes: list[bool]) -> nn.Module:
    """A fine-tune of ``base`` by ``rules`` holding ``own`` tensors, each module in the given training mode."""
    with forked_rng():  # LoRA init is overwritten: draw nothing from the caller's stream
        finetune = rewrite(base, rules, finish=lambda ft: ft.load_state_dict(own))
    for module, training in zip(finetune.modules(), modes):
        module.training = training
    return finetune


COPYING = {"__deepcopy__": _deepcopy, "__reduce_ex__": _reduce_ex}
