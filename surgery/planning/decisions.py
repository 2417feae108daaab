"""The plan: a pure function of (graph, rules) that decides every module and checks every constraint.

Nothing is mutated here. Each decision names the rule (file:line) that made it; every violation
of C1-C7 is collected and raised together as one PlanError before any model is touched. Memory is
computed per tensor, exactly as bitsandbytes will store it, so a tie that keeps a full-precision
copy alive is counted and a tensor quantized once for two modules is counted once.
"""

from __future__ import annotations

import difflib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import PlanError, Violation
from ..model.graph import ModelGraph, ModuleInfo
from ..rules.rule_file import load_rules, parse_rules
from ..rules.ruleset import (
    ADAPTABLE_KINDS,
    EMBEDDING_KINDS,
    Action,
    Kind,
    LoraConfig,
    QuantConfig,
    Rule,
    RuleSet,
    grouped,
    pattern_matches,
)
from .memory import DTYPE_BYTES, base_bytes, extra_token_cost, finetune_cost, fmt_bytes, lora_param_count

if TYPE_CHECKING:
    from torch import nn

QUANTIZABLE_KINDS = ("linear", "conv1d", "embedding")
QUANTIZED_STORAGE = ("int8", "nf4", "fp4")


@dataclass(frozen=True)
class Decision:
    """What happens to one module: action, weight storage, trainability, adapter, and the deciding rule."""

    path: str
    kind: Kind
    action: Action
    storage: str  # float32 / float16 / bfloat16 / int8 / nf4 / fp4
    trainable: bool
    rule: Rule | None  # None: the rule file's default
    lora: LoraConfig | None = None
    quant: QuantConfig | None = None  # set when the plan quantizes this module's weight
    adapter_params: int = 0
    adapter_bytes: int = 0

    @property
    def decided_by(self) -> str:
        return f"{self.rule.location} ({self.rule.label})" if self.rule else "default"

    def stored_form(self, param: str, dtype: str) -> object:
        """How a parameter (local name, dtype now) is stored after quantization.

        'original'; the quantization that produces a weight (an embedding's and a linear layer's are
        stored apart, also for one tied tensor: bitsandbytes' layers keep different state); or
        ("cast", dtype) for a 4-bit layer's bias, which bitsandbytes computes in its compute dtype
        (quantizing casts it once, exactly as bitsandbytes' first forward would, so the plan's bytes
        hold before and after that forward).
        """
        q = self.quant
        if q is None:
            return "original"
        if param == "weight":
            layout = "embedding" if self.kind == "embedding" else "linear"
            return (q.scheme, layout) if q.scheme == "int8" else (q.scheme, layout, q.double_quant, q.blocksize)
        if param == "bias" and q.scheme != "int8" and q.compute_dtype not in (None, dtype):
            return ("cast", q.compute_dtype)
        return "original"

    def __repr__(self) -> str:
        lora = f", lora r={self.lora.r}" if self.lora else ""
        return f"Decision({self.path!r}, {self.action}, {self.storage}{lora}, by {self.decided_by})"


@dataclass(frozen=True)
class TieNote:
    """What the plan does with one tied tensor and what it costs."""

    names: tuple[str, ...]
    message: str
    extra_base_bytes: int = 0
    extra_finetune_bytes: int = 0


@dataclass
class Plan:
    """Every module's decision, the ties, the constraint violations, and exact memory."""

    graph: ModelGraph
    rules: RuleSet
    decisions: dict[str, Decision]
    ties: list[TieNote]
    violations: list[Violation]
    base_bytes_now: int
    base_bytes_after: int
    finetune_bytes: int
    trainable_params: int
    finetunes: int = 1
    shadowed: list[str] = field(default_factory=list)  # rules that match only modules decided earlier

    @property
    def ok(self) -> bool:
        return not self.violations

    def check(self) -> Plan:
        """Raise PlanError listing every violation; return self when there is none."""
        if self.violations:
            raise PlanError(self.violations, violation_lines(self.violations))
        return self

    def total_bytes(self, finetunes: int | None = None) -> int:
        """Base after quantization plus ``finetunes`` fine-tunes."""
        n = self.finetunes if finetunes is None else finetunes
        return self.base_bytes_after + n * self.finetune_bytes

    def base_bytes_per_rank(self, world_size: int, fsdp: bool) -> int:
        """Bytes of the base on each of ``world_size`` devices: a whole copy (DDP), or one FSDP2 shard."""
        return base_bytes(self.graph, self.decisions, world_size)[1] if fsdp else self.base_bytes_after

    def full_copies_bytes(self, finetunes: int | None = None) -> int:
        """The same number of fine-tunes as full copies of the model as it is now."""
        n = self.finetunes if finetunes is None else finetunes
        return n * self.base_bytes_now

    def by_action(self, action: str) -> list[Decision]:
        return [d for d in self.decisions.values() if d.action == action]

    @property
    def quantized(self) -> list[Decision]:
        return [d for d in self.decisions.values() if d.quant is not None]

    def to_dict(self) -> dict:
        """JSON-ready: decisions, ties, violations and memory."""
        return {
            "model": self.graph.name,
            "model_class": self.graph.model_class,
            "rules": self.rules.source,
            "ok": self.ok,
            "finetunes": self.finetunes,
            "memory": {
                "base_bytes_now": self.base_bytes_now,
                "base_bytes_after": self.base_bytes_after,
                "finetune_bytes": self.finetune_bytes,
                "total_bytes": self.total_bytes(),
                "full_copies_bytes": self.full_copies_bytes(),
            },
            "trainable_params_per_finetune": self.trainable_params,
            "decisions": [
                {
                    "module": d.path,
                    "kind": d.kind,
                    "action": d.action,
                    "storage": d.storage,
                    "trainable": d.trainable,
                    "rule": d.rule.index if d.rule else None,
                    "decided_by": d.decided_by,
                    "lora": d.lora.to_dict() if d.lora else None,
                    "adapter_params": d.adapter_params,
                }
                for d in self.decisions.values()
            ],
            "ties": [
                {
                    "names": list(t.names),
                    "message": t.message,
                    "extra_base_bytes": t.extra_base_bytes,
                    "extra_finetune_bytes": t.extra_finetune_bytes,
                }
                for t in self.ties
            ],
            "violations": [
                {"constraint": v.constraint, "module": v.module, "message": v.message} for v in self.violations
            ],
            "shadowed_rules": self.shadowed,
        }

    def __rich__(self):
        from .report import plan_renderable

        return plan_renderable(self)

    def __str__(self) -> str:
        from .report import render_text

        return render_text(self)

    def __repr__(self) -> str:
        counts = Counter(d.action for d in self.decisions.values())
        return (
            f"Plan({self.graph.model_class}, {self.rules.name}, {dict(counts)}, "
            f"base {self.base_bytes_now:,} -> {self.base_bytes_after:,} B, "
            f"+{self.finetune_bytes:,} B per fine-tune, {len(self.violations)} violations)"
        )


# ------------------------------------------------------------------------------------------ plan


def _settings_differ(wanted: QuantConfig, held: QuantConfig, kind: str) -> str:
    """The settings ``wanted`` writes explicitly that differ from how the base holds a module ('' if none).

    Settings a rule file leaves out follow the base as held; ``compute_dtype: null`` (the input's dtype)
    accepts any held compute dtype.
    """
    pairs = (
        [("threshold", wanted.threshold, held.threshold)]
        if wanted.scheme == "int8" and kind != "embedding"
        else [
            ("double_quant", wanted.double_quant, held.double_quant),
            ("blocksize", wanted.blocksize, held.blocksize),
            ("compute_dtype", wanted.compute_dtype, held.compute_dtype),
        ]
        if wanted.scheme != "int8"
        else []
    )
    return ", ".join(
        f"{name}: {a} (held: {b})"
        for name, a, b in pairs
        if name in wanted.given and a != b and not (name == "compute_dtype" and None in (a, b))
    )


def _held_text(held: QuantConfig) -> str:
    return ", ".join(f"{k}: {v}" for k, v in held.to_dict().items() if v is not None)


def plan(
    model_or_graph: nn.Module | ModelGraph, rules: RuleSet | str, *, finetunes: int = 1, check: bool = True
) -> Plan:
    """Decide every parametrized module of the model by ``rules`` and check C1-C7.

    Raises PlanError with every violation unless ``check=False`` (then they are in ``plan.violations``).
    """
    if isinstance(model_or_graph, ModelGraph):
        graph = model_or_graph  # e.g. from the trace cache: planning it needs no torch at all
    else:
        from ..model.tracing import trace

        graph = trace(model_or_graph)
    rules = load_rules(rules)
    violations: list[Violation] = []
    decisions: dict[str, Decision] = {}
    matched: dict[int, list[str]] = defaultdict(list)
    for info in _plannable(graph):
        for rule in rules.rules:
            if rule.matches(info.path, info.kind):
                matched[rule.index].append(info.path)
        rule = rules.decide(info.path, info.kind)
        decision, problems = _decide(info, rule, rules)
        decisions[info.path] = decision
        violations += problems
    violations += _check_unmatched(rules, matched, graph)
    violations += _check_lora_coverage(rules, decisions)
    shadowed = [r.label for r in rules.rules if matched[r.index] and not any(d.rule is r for d in decisions.values())]
    tie_notes, tie_violations = _ties(graph, decisions)
    violations += tie_violations
    base_now, base_after = base_bytes(graph, decisions)
    ft_bytes, trainable = finetune_cost(graph, decisions)
    if rules.extra_tokens is not None:
        extra_bytes, extra_params = extra_token_cost(graph, decisions, len(rules.extra_tokens.tokens))
        ft_bytes, trainable = ft_bytes + extra_bytes, trainable + extra_params
    result = Plan(
        graph, rules, decisions, tie_notes, violations, base_now, base_after, ft_bytes, trainable, finetunes, shadowed
    )
    return result.check() if check else result


def _plannable(graph: ModelGraph) -> list[ModuleInfo]:
    """Modules that hold parameters of their own, excluding the insides of surgery's adapter wrappers."""
    return [m for m in graph.leaves() if not _inside_adapter(m.path, graph)]


def violation_lines(violations: list[Violation]) -> list[str]:
    """One line per constraint and cause: violations that differ only in their module become one line
    naming how many modules and their patterns (repeated blocks collapsed)."""
    causes: dict[tuple[str, str], list[Violation]] = {}
    for v in violations:
        cause = v.message.replace(v.module, "{module}") if v.module else v.message
        causes.setdefault((v.constraint, cause), []).append(v)
    lines = []
    for (constraint, cause), members in causes.items():
        if len(members) == 1:
            lines.append(f"[{constraint}] {members[0].message}")
            continue
        patterns = list(grouped([v.module for v in members]))
        shown = ", ".join(patterns[:3]) + (f" and {len(patterns) - 3} more patterns" if len(patterns) > 3 else "")
        lines.append(f"[{constraint}] " + cause.replace("{module}", f"{len(members)} modules ({shown})"))
    return lines


def _inside_adapter(path: str, graph: ModelGraph) -> bool:
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        parent = graph.modules.get(".".join(parts[:i]))
        if parent is not None and parent.cls.startswith("surgery."):
            return True
    return False


def _decide(info: ModuleInfo, rule: Rule | None, rules: RuleSet) -> tuple[Decision, list[Violation]]:
    action = rule.action if rule else rules.default
    where = f"{rule.location}: {rule.label}" if rule else f"{rules.source}: the default action '{action}'"
    weight = info.param("weight")
    original = weight.dtype if weight else (info.params[0].dtype if info.params else "float32")
    problems: list[Violation] = []
    quant = rules.quant_for(rule)
    wants_quant = action in ("quantize", "adapt") and quant.quantizes and info.kind in QUANTIZABLE_KINDS
    storage, plan_quant = original, None
    if info.quantized:  # already a bitsandbytes layer in the base
        if action == "plain":
            problems.append(
                Violation(
                    "C2",
                    (
                        f"{where} makes {info.path} plain (trainable, full precision), but the base holds it as "
                        f"{info.quantized} and quantized weights cannot be trained; adapt it instead (action: adapt) "
                        "or load the base unquantized"
                    ),
                    info.path,
                )
            )
        elif action in ("quantize", "adapt") and (not quant.quantizes or quant.scheme != info.quantized):
            target = "unquantized" if not quant.quantizes else f"as {quant.scheme}"
            problems.append(
                Violation(
                    "C1",
                    (
                        f"{where} keeps {info.path} {target}, but the base already holds it as {info.quantized}; "
                        f"quantized weights cannot be restored or re-quantized — load the base again or drop "
                        f"{rule.label if rule else 'the default'}"
                    ),
                    info.path,
                )
            )
        elif action == "freeze" and rule is not None:  # the default leaves what no rule names as the base holds it
            problems.append(
                Violation(
                    "C1",
                    (
                        f"{where} keeps {info.path} unquantized (freeze keeps a module's original precision), but the "
                        f"base already holds it as {info.quantized}; quantized weights cannot be restored — write "
                        f"`action: quantize` in {rule.label} to keep it frozen as the base holds it, or load the "
                        "base again"
                    ),
                    info.path,
                )
            )
        elif action in ("quantize", "adapt") and info.held is not None:
            differs = _settings_differ(quant, info.held, info.kind)
            if differs:
                problems.append(
                    Violation(
                        "C1",
                        (
                            f"{where} asks for {info.path} as {quant.scheme} with {differs}, but the base already "
                            f"holds it as {info.quantized} with other settings and quantized weights cannot be "
                            f"re-quantized; write the base's settings in the rule file's `quantize:` "
                            f"({_held_text(info.held)}) or load the base again"
                        ),
                        info.path,
                    )
                )
        storage = info.quantized
    elif wants_quant:
        storage, plan_quant = quant.scheme, quant
    lora, adapter_params, adapter_bytes = None, 0, 0
    if action == "adapt":
        if info.kind not in ADAPTABLE_KINDS or weight is None:
            problems.append(
                Violation(
                    "C3",
                    (
                        f"{where} adapts {info.path} ({info.cls.rsplit('.', 1)[-1]}, kind {info.kind}), but LoRA "
                        f"supports only {', '.join(ADAPTABLE_KINDS)} layers (a subclass with its own forward, such as "
                        "Gemma's scaled word embedding, is 'other'); narrow the rule (e.g. `type: linear`)"
                    ),
                    info.path,
                )
            )
        else:
            lora = rule.lora_for(info.path) if rule else LoraConfig()
            if lora is not None and lora.use_dora and info.kind in EMBEDDING_KINDS:
                problems.append(
                    Violation(
                        "C3",
                        (
                            f"{where} adapts the embedding {info.path} with use_dora, but DoRA here covers linear and "
                            "conv1d layers only; narrow the rule (e.g. `type: linear`) or drop use_dora for it"
                        ),
                        info.path,
                    )
                )
            if lora is not None and lora.init_lora_weights == "loftq":
                problems += _loftq_problems(info, where, storage)
            if lora is not None:
                adapter_params = lora_param_count(info.kind, weight.shape, lora)
                adapter_bytes = adapter_params * DTYPE_BYTES[lora.dtype]
    decision = Decision(
        info.path, info.kind, action, storage, action == "plain", rule, lora, plan_quant, adapter_params, adapter_bytes
    )
    return decision, problems


def _loftq_problems(info: ModuleInfo, where: str, storage: str) -> list[Violation]:
    """LoftQ starts the adapter from the base's quantization error: a linear or conv1d layer stored quantized."""
    if info.kind in EMBEDDING_KINDS:
        return [
            Violation(
                "C3",
                (
                    f"{where} adapts the embedding {info.path} with init_lora_weights: loftq, but LoftQ "
                    "here covers linear and conv1d layers only; narrow the rule (e.g. `type: linear`) or "
                    "use init true for it"
                ),
                info.path,
            )
        ]
    if storage not in QUANTIZED_STORAGE:
        return [
            Violation(
                "C3",
                (
                    f"{where} adapts {info.path} with init_lora_weights: loftq, which starts the adapter "
                    f"from the base's quantization error, but the base keeps it as {storage} (no error "
                    "to start from); quantize it (`quantize: nf4` or int8) or use init true"
                ),
                info.path,
            )
        ]
    return []


def _check_unmatched(rules: RuleSet, matched: dict[int, list[str]], graph: ModelGraph) -> list[Violation]:
    """C4: a rule that matches no module is an error (unless optional), with close names suggested."""
    out = []
    names = Counter()
    for info in _plannable(graph):
        parts = info.path.split(".")
        for i in range(len(parts)):
            suffix = ".".join(p if not p.isdigit() else "*" for p in parts[i:])
            names[suffix] += 1
    for rule in rules.rules:
        if matched[rule.index] or rule.optional:
            continue
        target = rule.match[3:] if rule.match.startswith("re:") else rule.match
        close = difflib.get_close_matches(target, list(names), n=3, cutoff=0.6)
        hint = ("; did you mean " + ", ".join(f"'{c}' ({names[c]} modules)" for c in close) + "?") if close else ""
        typed = f" of type {rule.type}" if rule.type else ""
        out.append(
            Violation(
                "C4",
                (
                    f"{rule.location}: {rule.label} matched no module{typed} of {graph.model_class}{hint} "
                    "(add `optional: true` if that is expected)"
                ),
                None,
            )
        )
    return out


def _check_lora_coverage(rules: RuleSet, decisions: dict[str, Decision]) -> list[Violation]:
    """C7: a per-module LoRA mapping must cover every module its rule adapts, and each entry must be used."""
    out = []
    for rule in rules.rules:
        if rule.action != "adapt" or not rule.lora_by_module:
            continue
        adapted = [d.path for d in decisions.values() if d.rule is rule and d.kind in ADAPTABLE_KINDS]
        if rule.lora is None:
            for path in adapted:
                if rule.lora_for(path) is None:
                    keys = ", ".join(p for p, _ in rule.lora_by_module)
                    out.append(
                        Violation(
                            "C7",
                            (
                                f"{rule.location}: {rule.label} adapts {path} but its lora_by_module has no entry "
                                f"for it (entries: {keys}); add one, or give the rule a `lora:` default"
                            ),
                            path,
                        )
                    )
        for pattern, _ in rule.lora_by_module:
            if not any(pattern_matches(pattern, p) for p in adapted):
                out.append(
                    Violation(
                        "C7",
                        (
                            f"{rule.location}: {rule.label} has a lora_by_module entry '{pattern}' that matches "
                            "none of the modules it adapts; remove it or fix the name"
                        ),
                        None,
                    )
                )
    return out


# ------------------------------------------------------------------------------------------ ties


def _param_owner(name: str) -> tuple[str, str]:
    path, _, local = name.rpartition(".")
    return path, local


def _ties(graph: ModelGraph, decisions: dict[str, Decision]) -> tuple[list[TieNote], list[Violation]]:
    """C6: state what happens to each tied tensor; splitting one by a plain rule needs ``untie: true``."""
    notes, violations = [], []
    for group in graph.ties:
        members = [(name, decisions.get(_param_owner(name)[0])) for name in group]
        members = [(n, d) for n, d in members if d is not None]
        if len(members) < 2:
            continue
        info = graph.modules[_param_owner(members[0][0])[0]].param(_param_owner(members[0][0])[1])
        full_bytes = info.nbytes if info else 0
        plain = [(n, d) for n, d in members if d.action == "plain"]
        frozen = [(n, d) for n, d in members if d.action != "plain"]
        names = tuple(n for n, _ in members)
        if plain and frozen:
            accepted = all(d.rule is not None and d.rule.untie for _, d in plain)
            p_names = ", ".join(_param_owner(n)[0] for n, _ in plain)
            f_names = ", ".join(_param_owner(n)[0] for n, _ in frozen)
            message = (
                f"{names[0]} is tied to {', '.join(names[1:])}: {p_names} is plain, so each fine-tune "
                f"trains a private copy (+{fmt_bytes(full_bytes)} per fine-tune) while {f_names} keeps "
                "the shared base tensor; the tie is split in every fine-tune"
            )
            if accepted:
                notes.append(TieNote(names, message, 0, full_bytes))
            else:
                rule = plain[0][1].rule
                fix = (
                    f"add `untie: true` to {rule.label} ({rule.location})"
                    if rule
                    else "add a plain rule with `untie: true` for it"
                )
                violations.append(
                    Violation(
                        "C6",
                        f"{message}; {fix} to accept that, or make all of them plain",
                        _param_owner(plain[0][0])[0],
                    )
                )
            continue
        dtype = info.dtype if info else ""
        forms = {d.stored_form(_param_owner(n)[1], dtype) for n, d in members}
        if len(forms) == 1:
            storage = members[0][1].storage
            notes.append(TieNote(names, f"{names[0]} and {', '.join(names[1:])} stay one tensor ({storage})"))
            continue
        full = [n for n, d in members if d.stored_form(_param_owner(n)[1], dtype) == "original"]
        quantized = [(n, d) for n, d in members if d.stored_form(_param_owner(n)[1], dtype) != "original"]
        if full:
            q = ", ".join(f"{_param_owner(n)[0]} ({d.storage})" for n, d in quantized)
            notes.append(
                TieNote(
                    names,
                    (
                        f"{', '.join(_param_owner(n)[0] for n in full)} is tied to {q}: quantizing keeps the "
                        f"{info.dtype if info else ''} weight alive for {', '.join(_param_owner(n)[0] for n in full)} "
                        f"(+{fmt_bytes(full_bytes)})"
                    ),
                    full_bytes,
                    0,
                )
            )
        else:
            shown = ", ".join(sorted(f"{form[0]} as {form[1]}" for form in forms))
            notes.append(
                TieNote(
                    names,
                    (
                        f"{', '.join(names)} are one tensor quantized in {len(forms)} ways ({shown}): "
                        "each form is stored"
                    ),
                )
            )
    return notes, violations


def memory_by_scheme(graph: ModelGraph) -> dict[str, int]:
    """Bytes of the model with every Linear/Conv1D/Embedding weight stored as float32, float16, int8, nf4.

    float32/float16 count every parameter at that width; int8/nf4 are the plan's exact bytes for
    quantizing those weights (everything else as stored).
    """
    out = {"float32": graph.numel * 4, "float16": graph.numel * 2}
    for scheme in ("int8", "nf4"):
        rules = parse_rules({"quantize": scheme, "default": "quantize"}, source=f"<all {scheme}>")
        found = plan(graph, rules, check=False)
        out[scheme] = found.base_bytes_after
        if scheme == "nf4":
            for world_size in (2, 4, 8):  # what --fsdp would hold per device
                out[f"nf4 FSDP2/{world_size}"] = found.base_bytes_per_rank(world_size, fsdp=True)
    return out
