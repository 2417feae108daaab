"""Make fine-tunes: structural copies of a base that share every frozen tensor with it.

``rewrite(base, rules)`` plans (all errors first), quantizes the base in place once where the plan
needs it, then builds a fine-tune of the same class: every module object is new (own hooks, own
training flag) but every frozen parameter and buffer is the base's own tensor; quantized layers are
shared as they are; adapted layers are wrapped in LoRA; ``plain`` modules get a private trainable
copy. Siblings therefore cost only their adapters and plain copies.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import types
import weakref
from dataclasses import dataclass, field

import torch
from typing import Any, Callable

from torch import nn

from .lora import make_adapter
from .errors import PlanError, RewriteError, SharedBaseWarning, SurgeryError
from .random_state import forked_rng
from .finetune import FinetuneInfo, finetune_info, install_guards, mark_shared, own_state
from .plan import Plan, plan as make_plan
from .bnb import own_class, quantized_storage, settle_shared_layers
from .quantize import quantize_base
from .rules import RuleSet
from .rule_file import load_rules
from .graph import ModelGraph
from .trace import refresh, replace_submodule, trace


log = logging.getLogger(__name__)
@dataclass
class BaseRecord:
    """What surgery remembers of one base while it lives: its graph, its live fine-tunes, its fingerprint."""

    graph: ModelGraph | None = None
    finetunes: weakref.WeakSet = field(default_factory=weakref.WeakSet)
    fingerprint: tuple | None = None  # (weights key, Fingerprint), see adapter_file.base_fingerprint
    sharded: nn.Module | None = None  # the FSDP2 root once sharding.shard_base ran

    def __repr__(self) -> str:
        return f"BaseRecord(graph={'yes' if self.graph else 'no'}, {len(self.finetunes)} live fine-tunes)"


_BASES: "weakref.WeakKeyDictionary[nn.Module, BaseRecord]" = weakref.WeakKeyDictionary()


def base_record(model: nn.Module) -> BaseRecord:
    """The record of a base (made on first use, dropped with the base)."""
    record = _BASES.get(model)
    if record is None:
        record = _BASES[model] = BaseRecord()
    return record



_BY_STRUCTURE: dict[tuple, ModelGraph] = {}  # a few recent traces, by architecture (see _structure_key)
_BY_STRUCTURE_SIZE = 8


def base_graph(model: nn.Module) -> ModelGraph:
    """The base's graph: traced once, then refreshed from the module tree (quantization changes no calls).

    A second model of exactly the same structure and config (another load of one checkpoint) reuses
    the first one's trace: calls and shapes depend on the architecture, not on the weights.
    """
    record = base_record(model)
    cached = record.graph
    if cached is None:
        key = _structure_key(model)
        cached = _BY_STRUCTURE.get(key)
        log.debug("graph of a %s: %s", type(model).__name__, "traced" if cached is None else
                  "reused from a model of the same structure")
        graph = trace(model) if cached is None else refresh(cached, model)
        _BY_STRUCTURE[key] = graph
        while len(_BY_STRUCTURE) > _BY_STRUCTURE_SIZE:
            _BY_STRUCTURE.pop(next(iter(_BY_STRUCTURE)))
    else:
        graph = refresh(cached, model)
    record.graph = graph
    return graph


def _structure_key(model: nn.Module) -> tuple:
    config = getattr(model, "config", None)
    return (type(model).__qualname__, config.to_json_string() if hasattr(config, "to_json_string") else None,
            tuple((path, type(m).__qualname__, tuple((n, tuple(p.shape), p.dtype) for n, p in
                                                       m.named_parameters(recurse=False)))
                  for path, m in model.named_modules(remove_duplicate=False)))


def rewrite(model: nn.Module, rules: RuleSet | str, *, progress: Callable | None = None,
            finish: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """A new fine-tune of ``model`` by ``rules``; quantizes the base first where the plan needs it.

    Raises PlanError before anything changes. If anything fails later, including ``finish(finetune)``
    (used to load saved state into the new fine-tune), the base is restored exactly.
    """
    if finetune_info(model) is not None:
        raise RewriteError("this model is itself a fine-tune; rewrite its base instead "
                           "(surgery.finetune_info(ft).base)")
    meta = next((name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta), None)
    if meta is not None:
        raise RewriteError(f"'{meta}' is on the meta device (no weights): a fine-tune needs real weights. Load the "
                           "model with weights (or --random-init); plan and inspect work on meta models")
    rules = load_rules(rules)
    the_plan = make_plan(base_graph(model), rules)
    _warn_if_quantizing_under_finetunes(model, the_plan)
    with _restored_on_failure(model, "rewrite"):
        quantize_base(model, the_plan, progress)
        settle_base(model)
        finetune = _structural_copy(model, the_plan)
        install_guards(finetune, FinetuneInfo(rules, the_plan, model), COPYING)
        if finish is not None:
            finish(finetune)
    mark_shared(model)
    base_record(model).finetunes.add(finetune)
    return finetune


def prepare_base(model: nn.Module, *rule_sets: RuleSet | str) -> None:
    """Quantize the base for several rule files before making any fine-tune, so all share one base.

    Each rule file is planned against the base as the previous ones left it (all PlanErrors first is
    not possible across files: a later file is checked after the earlier ones quantized).
    """
    done: list[str] = []
    for rules in map(load_rules, rule_sets):
        try:
            the_plan = make_plan(base_graph(model), rules)
        except PlanError as exc:
            if not done or "C1" not in exc.constraints:
                raise
            raise PlanError(exc.violations, exc.lines, note=(
                f"{rules.source} and {', '.join(done)} (planned first, which quantized the shared base) disagree on "
                "how the base is stored: all fine-tunes of one base need the same quantization, so write the same "
                "`quantize:` in every rule file (or train these jobs on separate bases)")) from None
        if the_plan.quantized:
            done.append(rules.source)
            with _restored_on_failure(model, "quantizing the base"):
                quantize_base(model, the_plan)
                settle_base(model)




def _warn_if_quantizing_under_finetunes(model: nn.Module, the_plan: Plan) -> None:
    live = list(base_record(model).finetunes)
    if live and the_plan.quantized:
        paths = [d.path for d in the_plan.quantized]
        import warnings

        warnings.warn(
            f"{the_plan.rules.source} quantizes {len(paths)} module(s) of the base ({paths[0]}, ...) that "
            f"{len(live)} fine-tune(s) made earlier use unquantized: they keep their own full-precision copy "
            "(memory) and their adapter files will reload onto the quantized base. Quantize first with "
            "surgery.prepare_base(base, *rule_files), or make this fine-tune first.",
            SharedBaseWarning, stacklevel=3)


@contextlib.contextmanager
def _restored_on_failure(model: nn.Module, what: str):
    """Run a change of the base; on any failure put every module and requires_grad flag back."""
    snapshot = _Snapshot(model)
    try:
        yield
    except Exception as exc:
        snapshot.restore()
        if isinstance(exc, SurgeryError):
            raise
        raise RewriteError(f"{what} failed and the base was restored: {type(exc).__name__}: {exc}") from exc


class _Snapshot:
    """Enough of the base to undo a failed rewrite: every module object and every requires_grad flag."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.children = [(parent, name, child) for parent in model.modules()
                         for name, child in parent.named_children()]
        self.flags = [(p, p.requires_grad) for p in model.parameters()]

    def restore(self) -> None:
        for parent, name, child in self.children:
            setattr(parent, name, child)
        for p, flag in self.flags:
            p.requires_grad_(flag)
        base_record(self.model).graph = None


def settle_base(model: nn.Module) -> None:
    """A base that holds quantized layers: every parameter frozen, bitsandbytes' CPU repack off for good."""
    for p in model.parameters():
        p.requires_grad_(False)
    settle_shared_layers(model)


class ShardedBase(nn.Module):
    """FSDP2's root: holds the base; ``root(model, ...)`` runs ``model`` (the base, a fine-tune or a view) through it."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base

    def forward(self, model: nn.Module, *args, **kwargs):
        return type(model).forward(model, *args, **kwargs)


def holds_tensors(module: nn.Module) -> bool:
    """A leaf of sharing: a module with parameters of its own (its children aside)."""
    return next(module.parameters(recurse=False), None) is not None


def run_through_root(model: nn.Module, root: ShardedBase) -> None:
    """Make ``model(...)`` (also HF ``generate``) enter FSDP2's root, which gathers the shards it needs."""
    model.__dict__["forward"] = types.MethodType(_forward_through_root, model)
    model.__dict__["_surgery_root"] = root


def _forward_through_root(self: nn.Module, *args, **kwargs):
    return self.__dict__["_surgery_root"](self, *args, **kwargs)


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
            replace_submodule(finetune, path, make_adapter(finetune.get_submodule(path), decision.kind, decision.lora))
    return finetune


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
    own.__dict__.update({name: type(value)(value) for name, value in module.__dict__.items()
                         if name.startswith("_") and isinstance(value, dict)})  # parameters, buffers, hooks
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


def rebuild(base: nn.Module, rules: "RuleSet", own: dict[str, torch.Tensor], modes: list[bool]) -> nn.Module:
    """A fine-tune of ``base`` by ``rules`` holding ``own`` tensors, each module in the given training mode."""
    with forked_rng():  # LoRA init is overwritten: draw nothing from the caller's stream
        finetune = rewrite(base, rules)
    finetune.load_state_dict(own)
    for module, training in zip(finetune.modules(), modes):
        module.training = training
    return finetune


COPYING = {"__deepcopy__": _deepcopy, "__reduce_ex__": _reduce_ex}
