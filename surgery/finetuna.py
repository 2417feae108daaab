"""finetuna's documented API, built on rules: an int8 base and LoRA fine-tunes that share it.

Differences from finetuna, on purpose: LLM.int8 (bitsandbytes ``Linear8bitLt``) instead of
blockwise 8-bit storage; the LoRA bias is not scaled; OPT's learned positional embedding cannot be
adapted (C3); the arguments after ``plain_layers`` are keyword-only, so that no call depends on
the order of the two ``modules_not_to_*`` sets.

What finetuna documented but never enforced is enforced here, by the plan, before anything
changes: no unquantize after quantize (C1), no trainable quantized module (C2), ``plain_layers``
and ``adapt_layers`` disjoint, per-module config dicts covering every adapted module (C7), and
names that match nothing rejected with a suggestion (C4). Module names are local names
(``q_proj``), as in finetuna. No argument has a shared mutable default.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from torch import nn

from .base.quantize import quantize_base
from .base.shared_base import base_graph
from .errors import PlanError, Violation
from .finetune.rewriting import rewrite
from .planning.decisions import plan as make_plan
from .rules.rule_file import parse_rules
from .rules.ruleset import ADAPTABLE_KINDS, RuleSet

SOURCE = "<finetuna>"


@dataclass(frozen=True)
class LinearAdapterConfig:
    """LoRA settings for Linear layers (finetuna's defaults: r=4, alpha=1)."""

    r: int = 4
    alpha: float = 1.0
    dropout: float = 0.0
    bias: bool = True  # finetuna's default; the bias is trainable and, unlike finetuna's, not scaled

    def as_rule(self) -> dict:
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "bias": self.bias}


@dataclass(frozen=True)
class EmbeddingAdapterConfig:
    """LoRA settings for Embedding layers (finetuna's defaults: r=4, alpha=1)."""

    r: int = 4
    alpha: float = 1.0

    def as_rule(self) -> dict:
        return {"r": self.r, "alpha": self.alpha}


AdapterConfigs = (
    LinearAdapterConfig | EmbeddingAdapterConfig | Mapping[str, LinearAdapterConfig | EmbeddingAdapterConfig]
)


def get_lora_adaptable_modules(model: nn.Module) -> set[str]:
    """Local names of the modules LoRA can adapt (Linear, Conv1D, Embedding and their quantized forms)."""
    return {m.name for m in base_graph(model).leaves() if m.kind in ADAPTABLE_KINDS}


def prepare_base_model(model: nn.Module, modules_not_to_quantize: Iterable[str] = ("lm_head",)) -> nn.Module:
    """Quantize every Linear/Conv1D/Embedding to int8 (except the named ones) and freeze the whole model."""
    keep = sorted(set(modules_not_to_quantize))
    rules = parse_rules(
        {"quantize": "int8", "default": "quantize", "rules": [{"match": name, "action": "freeze"} for name in keep]},
        source=SOURCE,
    )
    the_plan = make_plan(base_graph(model), rules)
    quantize_base(model, the_plan)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


quantize_base_model = prepare_base_model


def new_finetuned(
    base: nn.Module,
    adapt_layers: Iterable[str] | None = None,
    plain_layers: Iterable[str] = ("lm_head",),
    *,
    embedding_config: AdapterConfigs | None = None,
    linear_config: AdapterConfigs | None = None,
    modules_not_to_quantize: Iterable[str] = (),
    modules_not_to_freeze: Iterable[str] = (),
) -> nn.Module:
    """A new fine-tune of ``base``, as finetuna made it.

    Linear/Embedding modules not named in ``modules_not_to_quantize`` are stored int8 (the base is
    quantized on first use); ``adapt_layers`` (default: every adaptable module that is not plain) get
    LoRA; ``plain_layers`` (added to both ``modules_not_to_quantize`` and ``modules_not_to_freeze``)
    are trained directly in full precision; everything else is frozen and shared.
    """
    return rewrite(
        base,
        finetuna_rules(
            base,
            adapt_layers,
            plain_layers,
            embedding_config=embedding_config,
            linear_config=linear_config,
            modules_not_to_quantize=modules_not_to_quantize,
            modules_not_to_freeze=modules_not_to_freeze,
        ),
    )


def finetuna_rules(
    base: nn.Module,
    adapt_layers: Iterable[str] | None = None,
    plain_layers: Iterable[str] = ("lm_head",),
    *,
    embedding_config: AdapterConfigs | None = None,
    linear_config: AdapterConfigs | None = None,
    modules_not_to_quantize: Iterable[str] = (),
    modules_not_to_freeze: Iterable[str] = (),
) -> RuleSet:
    """The rule set that ``new_finetuned`` applies, checked for finetuna's documented constraints."""
    graph = base_graph(base)
    plain = set(plain_layers)
    no_quant = set(modules_not_to_quantize) | plain
    unfrozen = set(modules_not_to_freeze) | plain
    kinds: dict[str, str] = {}
    for m in graph.leaves():
        kinds.setdefault(m.name, m.kind)
    adapt = (
        {n for n, k in kinds.items() if k in ADAPTABLE_KINDS} - unfrozen if adapt_layers is None else set(adapt_layers)
    )
    problems = []
    for name in sorted(adapt & unfrozen):
        which = "plain_layers" if name in plain else "modules_not_to_freeze"
        problems.append(
            Violation(
                "C5",
                (
                    f"{SOURCE}: {name} is in both adapt_layers and {which}; a module is either adapted or trained "
                    "directly — pick one"
                ),
            )
        )
    for name in sorted(unfrozen - no_quant):
        if kinds.get(name) in ADAPTABLE_KINDS:
            problems.append(
                Violation(
                    "C2",
                    (
                        f"{SOURCE}: {name} is in modules_not_to_freeze but not in modules_not_to_quantize, so it would "
                        "be a trainable int8 module; add it to modules_not_to_quantize too (or to plain_layers)"
                    ),
                    name,
                )
            )
    linear_config = LinearAdapterConfig() if linear_config is None else linear_config
    embedding_config = EmbeddingAdapterConfig() if embedding_config is None else embedding_config
    for label, config in (("linear_config", linear_config), ("embedding_config", embedding_config)):
        if isinstance(config, Mapping):
            for key in sorted(set(config) - adapt):
                problems.append(Violation("C7", f"{SOURCE}: {label} has an entry for '{key}', which is not adapted"))
    rules = [{"match": name, "action": "plain", "untie": True} for name in sorted(unfrozen)]
    for name in sorted(adapt - unfrozen):
        label, config = (
            ("embedding_config", embedding_config)
            if kinds.get(name) == "embedding"
            else ("linear_config", linear_config)
        )
        if name not in kinds:
            config = LinearAdapterConfig()  # no such module: the plan reports it (C4) with close names
        elif isinstance(config, Mapping):
            if name not in config:
                problems.append(
                    Violation(
                        "C7",
                        (
                            f"{SOURCE}: {name} is adapted but {label} has no entry for it "
                            f"(entries: {', '.join(sorted(config)) or 'none'}); add one or pass a single config"
                        ),
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
