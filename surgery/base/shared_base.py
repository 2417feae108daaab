"""What surgery knows of a base while it lives, and the one place the base changes: quantized for rule files.

A base's record holds its graph (traced once, refreshed after quantization), its live fine-tunes,
its fingerprint, where its full-precision weights can be read again and, once sharded, FSDP2's root.
``prepare_base`` quantizes the base for rule files before fine-tunes are made, and restores every module and
flag if anything fails midway.
"""

from __future__ import annotations

import contextlib
import logging
import types
import weakref
from dataclasses import dataclass, field

from torch import nn

from ..errors import PlanError, RewriteError, ShardingError, SharedBaseWarning, SurgeryError
from ..layers.bnb import settle_shared_layers
from ..model.graph import ModelGraph
from ..model.tracing import refresh, trace
from ..planning.decisions import Plan
from ..planning.decisions import plan as make_plan
from ..rules.rule_file import load_rules
from ..rules.ruleset import RuleSet
from .full_weights import FullWeights
from .ownership import finetune_info
from .quantize import quantize_base

log = logging.getLogger(__name__)


@dataclass
class BaseRecord:
    """What surgery remembers of one base while it lives: its graph, its live fine-tunes, its fingerprint."""

    graph: ModelGraph | None = None
    finetunes: weakref.WeakSet = field(default_factory=weakref.WeakSet)
    fingerprint: tuple | None = None  # (weights key, Fingerprint), see adapter_file.base_fingerprint
    sharded: nn.Module | None = None  # the FSDP2 root once sharding.shard_base ran
    full_weights: FullWeights | None = None  # where its full-precision weights can be read again (LoftQ)

    def __repr__(self) -> str:
        return f"BaseRecord(graph={'yes' if self.graph else 'no'}, {len(self.finetunes)} live fine-tunes)"

    def __deepcopy__(self, memo) -> BaseRecord:
        """A copied base is another base: it keeps the graph (plain data) and nothing else of this one."""
        return BaseRecord(graph=self.graph)

    def __reduce__(self):
        return BaseRecord, ()  # a pickled base comes back with a fresh record


RECORD = "_surgery_base"  # the attribute of a base that holds its record


def base_record(model: nn.Module) -> BaseRecord:
    """The record of a base, kept on the base itself (made on first use, gone with the base)."""
    record = model.__dict__.get(RECORD)
    if record is None:
        record = model.__dict__[RECORD] = BaseRecord()
    return record


def sharded_root(model: nn.Module) -> nn.Module | None:
    """The FSDP2 root of a sharded base (or of the base a fine-tune or batched view shares), else None."""
    info = finetune_info(model)
    view = model.__dict__.get("_surgery_batched")
    base = info.base if info is not None else view.base if view is not None else model
    record = base.__dict__.get(RECORD)
    return record.sharded if record is not None else None


def refuse_sharded(model: nn.Module, what: str, remedy: str) -> None:
    """``what`` cannot run on a sharded base: say so, and what to do instead."""
    root = sharded_root(model)
    if root is not None:
        raise ShardingError(
            f"{what} needs the whole base, which is sharded with FSDP2 over {root.world_size} processes here; {remedy}"
        )


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
        log.debug(
            "graph of a %s: %s",
            type(model).__name__,
            "traced" if cached is None else "reused from a model of the same structure",
        )
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
    return (
        type(model).__qualname__,
        config.to_json_string() if hasattr(config, "to_json_string") else None,
        tuple(
            (
                path,
                type(m).__qualname__,
                tuple((n, tuple(p.shape), p.dtype) for n, p in m.named_parameters(recurse=False)),
            )
            for path, m in model.named_modules(remove_duplicate=False)
        ),
    )


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
            raise PlanError(
                exc.violations,
                exc.lines,
                note=(
                    f"{rules.source} and {', '.join(done)} (planned first, which quantized the shared base) "
                    "disagree on how the base is stored: all fine-tunes of one base need the same quantization, so "
                    "write the same `quantize:` in every rule file, or use them on separate bases (separate `surgery "
                    "train` or `surgery generate` runs)"
                ),
            ) from None
        if the_plan.quantized:
            done.append(rules.source)
            with restored_on_failure(model, "quantizing the base"):
                quantize_base(model, the_plan)
                settle_base(model)


def warn_if_quantizing_under_finetunes(model: nn.Module, the_plan: Plan) -> None:
    live = list(base_record(model).finetunes)
    if live and the_plan.quantized:
        paths = [d.path for d in the_plan.quantized]
        import warnings

        warnings.warn(
            f"{the_plan.rules.source} quantizes {len(paths)} module(s) of the base ({paths[0]}, ...) that "
            f"{len(live)} fine-tune(s) made earlier use unquantized: they keep their own full-precision copy "
            "(memory) and their adapter files will reload onto the quantized base. Quantize first with "
            "surgery.prepare_base(base, *rule_files), or make this fine-tune first.",
            SharedBaseWarning,
            stacklevel=3,
        )


@contextlib.contextmanager
def restored_on_failure(model: nn.Module, what: str):
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
        self.children = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()]
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
    """FSDP2's root: holds the base; ``root(model, ...)`` runs ``model`` (the base, a fine-tune, a view) through it."""

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
