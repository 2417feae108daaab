"""finetuna's API, exactly as finetuna's users wrote it, built on rules: an int8 base and LoRA fine-tunes sharing it.

``import surgery.finetuna as ft`` in place of ``import finetuna as ft``: ``ft.quantize_base_model`` (alias
``prepare_base_model``), ``ft.new_finetuned`` with finetuna's arguments in finetuna's order,
``ft.get_lora_adaptable_modules``, ``ft.LinearAdapterConfig``, ``ft.EmbeddingAdapterConfig``,
``ft.QuantizedLinear`` / ``ft.QuantizedEmbedding`` (``isinstance`` checks), ``ft.state_dict`` (the changed state
only) and ``ft.__version__``, on any ``nn.Module``.

What finetuna documented is enforced by the plan, before anything changes, with one error naming the module and
the remedy: no unquantize after quantize (C1: ``modules_not_to_quantize`` naming a module ``quantize_base_model``
quantized), no trainable quantized module (C2: ``modules_not_to_freeze`` or ``plain_layers`` on one), and, beyond
finetuna, ``plain_layers`` and ``adapt_layers`` disjoint, per-module config dicts covering every adapted module
(C7) and names the user passes that match nothing rejected with close names (C4). The default exemption of
``lm_head`` applies where the model has one. Module names are local names (``q_proj``), as in finetuna.

Differences that remain, each for a reason, are listed in the docs ("Migrating from finetuna").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .base.ownership import own_state, require_finetune
from .base.quantize import quantize_base
from .base.shared_base import base_graph, settle_base
from .errors import PlanError, Violation
from .finetune.rewriting import rewrite
from .layers.bnb import quantized_storage
from .layers.lora import LoraLayer
from .model.tracing import op_kind
from .package import version
from .planning.decisions import plan as make_plan
from .rules.rule_file import parse_rules
from .rules.ruleset import ADAPTABLE_KINDS, EMBEDDING_KINDS, RuleSet

__version__ = version()
SOURCE = "<finetuna>"
DEFAULT_NOT_QUANTIZED = frozenset({"lm_head"})  # finetuna's default: applies where the model has an lm_head
DEFAULT_PLAIN = frozenset({"lm_head"})


@dataclass(frozen=True)
class LinearAdapterConfig:
    """LoRA settings for Linear layers (finetuna's defaults: r=4, alpha=1, dropout 0, a bias)."""

    r: int = 4
    alpha: float = 1.0
    dropout: float = 0.0
    bias: bool = True  # finetuna's default; the bias is trainable and, unlike finetuna's, not scaled

    def as_rule(self) -> dict:
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "bias": self.bias}


@dataclass(frozen=True)
class EmbeddingAdapterConfig:
    """LoRA settings for Embedding layers, learned positional ones included (finetuna's defaults: r=4, alpha=1)."""

    r: int = 4
    alpha: float = 1.0

    def as_rule(self) -> dict:
        return {"r": self.r, "alpha": self.alpha}


class _HeldQuantized(type):
    """``isinstance(layer, cls)``: a layer of one of ``cls.kinds`` the base stores quantized, adapted or not."""

    kinds: tuple[str, ...] = ()

    def __instancecheck__(cls, layer) -> bool:
        inner = layer.base_layer if isinstance(layer, LoraLayer) else layer
        return isinstance(inner, nn.Module) and quantized_storage(inner) is not None and op_kind(inner) in cls.kinds


class QuantizedLinear(metaclass=_HeldQuantized):
    """finetuna's name: ``isinstance(layer, QuantizedLinear)`` holds for every Linear (and GPT-2 Conv1D) stored
    quantized by bitsandbytes (int8, nf4, fp4), and for a LoRA layer over one."""

    kinds = ("linear", "conv1d")


class QuantizedEmbedding(metaclass=_HeldQuantized):
    """finetuna's name: ``isinstance(layer, QuantizedEmbedding)`` holds for every Embedding stored quantized by
    bitsandbytes, and for a LoRA layer over one."""

    kinds = ("embedding",)


AdapterConfigs = (
    LinearAdapterConfig | EmbeddingAdapterConfig | Mapping[str, LinearAdapterConfig | EmbeddingAdapterConfig]
)


def get_lora_adaptable_modules(model: nn.Module, target_modules: Iterable[type] | None = None) -> set[str]:
    """Local names of the modules LoRA can adapt.

    Args:
        model: any ``nn.Module`` (quantized or not).
        target_modules: finetuna's filter: module types (``nn.Linear``, ``nn.Embedding``, ``QuantizedLinear``, ...);
            the names of children that are instances of any of them. Default: every Linear, Conv1D, Embedding and
            learned positional embedding, quantized or not.

    Returns:
        The set of local module names (``q_proj``, ``embed_tokens``, ...).
    """
    if target_modules is not None:
        types = tuple(target_modules)
        return {
            name for parent in model.modules() for name, child in parent.named_children() if isinstance(child, types)
        }
    return {m.name for m in base_graph(model).leaves() if m.kind in ADAPTABLE_KINDS}


def prepare_base_model(model: nn.Module, modules_not_to_quantize: Iterable[str] = DEFAULT_NOT_QUANTIZED) -> nn.Module:
    """Quantize every Linear/Conv1D/Embedding to int8 in place, except the named ones, and freeze the whole model.

    Args:
        model: any ``nn.Module``.
        modules_not_to_quantize: local names kept in full precision; the default (``lm_head``) applies where the
            model has such a module, a name you pass must match one (C4).

    Returns:
        ``model`` itself (changed in place), for convenience.

    Raises:
        PlanError: a name that matches no module (C4), or one the base already holds quantized (C1).
    """
    keep = _names(model, modules_not_to_quantize, DEFAULT_NOT_QUANTIZED)
    problems = _quantized_already(model, keep, "modules_not_to_quantize", "C1")
    if problems:
        raise PlanError(problems)
    rules = parse_rules(
        {"quantize": "int8", "default": "quantize", "rules": [{"match": name, "action": "freeze"} for name in keep]},
        source=SOURCE,
    )
    the_plan = make_plan(base_graph(model), rules)
    quantize_base(model, the_plan)
    settle_base(model)
    return model


quantize_base_model = prepare_base_model


def new_finetuned(
    model: nn.Module,
    adapt_layers: Iterable[str] | None = None,
    plain_layers: Iterable[str] = DEFAULT_PLAIN,
    embedding_config: AdapterConfigs | None = None,
    linear_config: AdapterConfigs | None = None,
    modules_not_to_quantize: Iterable[str] = (),
    modules_not_to_freeze: Iterable[str] = (),
) -> nn.Module:
    """A new fine-tune of ``model`` that shares its frozen weights, as finetuna made it (arguments in its order).

    Linear/Embedding modules not named in ``modules_not_to_quantize`` are stored int8 (the base is quantized on
    first use); ``adapt_layers`` (default: every adaptable module that is not plain) get LoRA; ``plain_layers``
    (added to both ``modules_not_to_quantize`` and ``modules_not_to_freeze``) are trained directly in full
    precision; everything else is frozen and shared.

    Args:
        model: the base, any ``nn.Module``, quantized by ``quantize_base_model`` or not.
        adapt_layers: local names to adapt with LoRA.
        plain_layers: local names trained directly (default ``lm_head``, where the model has one).
        embedding_config: an ``EmbeddingAdapterConfig``, or a dict of them by name covering every adapted embedding.
        linear_config: a ``LinearAdapterConfig``, or a dict of them by name covering every adapted linear layer.
        modules_not_to_quantize: local names kept in full precision.
        modules_not_to_freeze: local names trained directly (they must not be quantized).

    Returns:
        The fine-tune: a model of the base's class; ``model`` and earlier fine-tunes stay as they were.

    Raises:
        PlanError: every broken constraint at once (C1, C2, C4, C5, C7), before anything changes.
    """
    rules = finetuna_rules(
        model,
        adapt_layers,
        plain_layers,
        embedding_config,
        linear_config,
        modules_not_to_quantize,
        modules_not_to_freeze,
    )
    return rewrite(model, rules)


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The changed state of a fine-tune only: its LoRA tensors and plain copies, nothing of the shared base.

    ``torch.save(ft.state_dict(m1), path)``, then ``m2.load_state_dict(torch.load(path), strict=False)`` on a fresh
    ``new_finetuned`` with the same arguments gives ``m2`` the outputs of ``m1``.

    Args:
        model: a fine-tune made by ``new_finetuned`` (or surgery).

    Returns:
        Its own tensors by state-dict key (detached; they share storage with the fine-tune, as ``nn.Module``'s
        ``state_dict`` does).

    Raises:
        AdapterStateError: ``model`` is not a fine-tune.
    """
    require_finetune(model, "saved with ft.state_dict")
    return {name: tensor.detach() for name, tensor in own_state(model).items()}


def finetuna_rules(
    model: nn.Module,
    adapt_layers: Iterable[str] | None = None,
    plain_layers: Iterable[str] = DEFAULT_PLAIN,
    embedding_config: AdapterConfigs | None = None,
    linear_config: AdapterConfigs | None = None,
    modules_not_to_quantize: Iterable[str] = (),
    modules_not_to_freeze: Iterable[str] = (),
) -> RuleSet:
    """The rule set that ``new_finetuned`` applies, checked for finetuna's documented constraints."""
    kinds: dict[str, str] = {}
    for m in base_graph(model).leaves():
        kinds.setdefault(m.name, m.kind)
    plain = _names(model, plain_layers, DEFAULT_PLAIN)
    no_quant = set(modules_not_to_quantize) | plain
    unfrozen = set(modules_not_to_freeze) | plain
    adapt = (
        {n for n, k in kinds.items() if k in ADAPTABLE_KINDS} - unfrozen if adapt_layers is None else set(adapt_layers)
    )
    linear_config = LinearAdapterConfig() if linear_config is None else linear_config
    embedding_config = EmbeddingAdapterConfig() if embedding_config is None else embedding_config
    problems = _quantized_already(model, set(modules_not_to_quantize) - plain, "modules_not_to_quantize", "C1")
    problems += _quantized_already(model, set(modules_not_to_freeze) - plain, "modules_not_to_freeze", "C2")
    problems += _argument_problems(adapt, plain, unfrozen, no_quant, kinds)
    for label, config in (("linear_config", linear_config), ("embedding_config", embedding_config)):
        if isinstance(config, Mapping):
            for key in sorted(set(config) - adapt):
                problems.append(Violation("C7", f"{SOURCE}: {label} has an entry for '{key}', which is not adapted"))
    rules = [{"match": name, "action": "plain", "untie": True} for name in sorted(unfrozen)]
    for name in sorted(adapt - unfrozen):
        embedding = kinds.get(name) in EMBEDDING_KINDS
        label, config = ("embedding_config", embedding_config) if embedding else ("linear_config", linear_config)
        if name not in kinds:
            config = LinearAdapterConfig()  # no such module: the plan reports it (C4) with close names
        elif isinstance(config, Mapping):
            if name not in config:
                entries = ", ".join(sorted(config)) or "none"
                problems.append(
                    Violation(
                        "C7",
                        f"{SOURCE}: {name} is adapted but {label} has no entry for it (entries: {entries}); add one "
                        "or pass a single config",
                        name,
                    )
                )
                continue
            config = config[name]
        rule = {"match": name, "action": "adapt", "lora": config.as_rule()}
        if name in no_quant:
            rule["quantize"] = "none"
        rules.append(rule)
    if problems:
        raise PlanError(problems)
    rules += [{"match": name, "action": "freeze"} for name in sorted(no_quant - adapt - unfrozen)]
    return parse_rules({"quantize": "int8", "default": "quantize", "rules": rules}, source=SOURCE)


def _names(model: nn.Module, given: Iterable[str], default: frozenset) -> set[str]:
    """The names asked for: a default (``lm_head``) only where the model has such a module; a name the caller
    passes is kept, so that one matching nothing is an error (C4)."""
    if given is not default:
        return set(given)
    present = {name for parent in model.modules() for name, _ in parent.named_children()}
    return set(default) & present


def _quantized_already(model: nn.Module, names: set[str], argument: str, constraint: str) -> list[Violation]:
    """C1 (``modules_not_to_quantize``) or C2 (``modules_not_to_freeze``): a name whose modules the base already
    holds quantized, in finetuna's terms."""
    held: dict[str, list[str]] = {}
    for m in base_graph(model).leaves():
        if m.name in names and m.quantized:
            held.setdefault(m.name, []).append(m.path)
    problems = []
    for name, paths in sorted(held.items()):
        storage = next(m.quantized for m in base_graph(model).leaves() if m.path == paths[0])
        where = f"{name} ({len(paths)} module{'s' if len(paths) > 1 else ''}, e.g. {paths[0]})"
        if constraint == "C1":
            message = (
                f"{SOURCE}: {argument} names {where}, but the base already holds it as {storage} "
                "(quantize_base_model quantized it) and quantized weights cannot be restored; leave it out of "
                f"{argument} (it stays {storage}, frozen), or load the base again and pass it to "
                "quantize_base_model's modules_not_to_quantize"
            )
        else:
            message = (
                f"{SOURCE}: {argument} names {where}, but the base holds it as {storage} and quantized weights "
                "cannot be trained directly; adapt it instead (adapt_layers), or load the base again and pass it to "
                "quantize_base_model's modules_not_to_quantize"
            )
        problems.append(Violation(constraint, message, paths[0]))
    return problems


def _argument_problems(
    adapt: set[str], plain: set[str], unfrozen: set[str], no_quant: set[str], kinds: dict[str, str]
) -> list[Violation]:
    """Arguments that contradict each other: adapted and trained directly (C5), trainable but quantized (C2)."""
    problems = []
    for name in sorted(adapt & unfrozen):
        which = "plain_layers" if name in plain else "modules_not_to_freeze"
        problems.append(
            Violation(
                "C5",
                f"{SOURCE}: {name} is in both adapt_layers and {which}; a module is either adapted or trained "
                "directly — pick one",
            )
        )
    for name in sorted(unfrozen - no_quant):
        if kinds.get(name) in ("linear", "conv1d", "embedding"):
            problems.append(
                Violation(
                    "C2",
                    f"{SOURCE}: {name} is in modules_not_to_freeze but not in modules_not_to_quantize, so it would "
                    "be a trainable int8 module; add it to modules_not_to_quantize too (or to plain_layers)",
                    name,
                )
            )
    return problems
