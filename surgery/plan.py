"""The plan: a pure function of (graph, rules) that decides every module and checks every constraint.

Nothing is mutated here. Each decision names the rule (file:line) that made it; every violation
of C1-C7 is collected and raised together as one PlanError before any model is touched. Memory is
computed per tensor, exactly as bitsandbytes will store it, so a tie that keeps a full-precision
copy alive is counted and a tensor quantized once for two modules is counted once.
"""

from __future__ import annotations

import difflib
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from torch import nn

from .errors import PlanError, Violation
from .rules import ADAPTABLE_KINDS, LoraConfig, QuantConfig, Rule, RuleSet, load_rules, pattern_matches
from .trace import ModelGraph, ModuleInfo, trace

QUANTIZABLE_KINDS = ("linear", "conv1d", "embedding")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1, "uint8": 1}


@dataclass(frozen=True)
class Decision:
    """What happens to one module: action, weight storage, trainability, adapter, and the deciding rule."""

    path: str
    kind: str
    action: str
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

    def check(self) -> "Plan":
        """Raise PlanError listing every violation; return self when there is none."""
        if self.violations:
            raise PlanError(self.violations)
        return self

    def total_bytes(self, finetunes: int | None = None) -> int:
        """Base after quantization plus ``finetunes`` fine-tunes."""
        n = self.finetunes if finetunes is None else finetunes
        return self.base_bytes_after + n * self.finetune_bytes

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
            "model": self.graph.name, "model_class": self.graph.model_class, "rules": self.rules.source,
            "ok": self.ok, "finetunes": self.finetunes,
            "memory": {"base_bytes_now": self.base_bytes_now, "base_bytes_after": self.base_bytes_after,
                       "finetune_bytes": self.finetune_bytes, "total_bytes": self.total_bytes(),
                       "full_copies_bytes": self.full_copies_bytes()},
            "trainable_params_per_finetune": self.trainable_params,
            "decisions": [{"module": d.path, "kind": d.kind, "action": d.action, "storage": d.storage,
                           "trainable": d.trainable, "rule": d.rule.index if d.rule else None,
                           "decided_by": d.decided_by, "lora": d.lora.to_dict() if d.lora else None,
                           "adapter_params": d.adapter_params} for d in self.decisions.values()],
            "ties": [{"names": list(t.names), "message": t.message, "extra_base_bytes": t.extra_base_bytes,
                      "extra_finetune_bytes": t.extra_finetune_bytes} for t in self.ties],
            "violations": [{"constraint": v.constraint, "module": v.module, "message": v.message}
                           for v in self.violations],
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
        return (f"Plan({self.graph.model_class}, {self.rules.name}, {dict(counts)}, "
                f"base {self.base_bytes_now:,} -> {self.base_bytes_after:,} B, "
                f"+{self.finetune_bytes:,} B per fine-tune, {len(self.violations)} violations)")


# ------------------------------------------------------------------------------------------ plan

def _settings_differ(wanted: QuantConfig, held: QuantConfig, kind: str) -> str:
    """The settings ``wanted`` writes explicitly that differ from how the base holds a module ('' if none).

    Settings a rule file leaves out follow the base as held.
    """
    pairs = [("threshold", wanted.threshold, held.threshold)] if wanted.scheme == "int8" and kind != "embedding" else \
        [("double_quant", wanted.double_quant, held.double_quant), ("blocksize", wanted.blocksize, held.blocksize),
         ("compute_dtype", wanted.compute_dtype, held.compute_dtype)] if wanted.scheme != "int8" else []
    return ", ".join(f"{name}: {a} (held: {b})" for name, a, b in pairs
                     if name in wanted.given and a != b and not (name == "compute_dtype" and b is None))


def _held_text(held: QuantConfig) -> str:
    return ", ".join(f"{k}: {v}" for k, v in held.to_dict().items() if v is not None)


def plan(model_or_graph: nn.Module | ModelGraph, rules: RuleSet | str, *, finetunes: int = 1,
         check: bool = True) -> Plan:
    """Decide every parametrized module of the model by ``rules`` and check C1-C7.

    Raises PlanError with every violation unless ``check=False`` (then they are in ``plan.violations``).
    """
    graph = model_or_graph if isinstance(model_or_graph, ModelGraph) else trace(model_or_graph)
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
    shadowed = [r.label for r in rules.rules if matched[r.index] and not any(
        d.rule is r for d in decisions.values())]
    tie_notes, tie_violations = _ties(graph, decisions)
    violations += tie_violations
    base_now, base_after = _base_bytes(graph, decisions)
    ft_bytes, trainable = _finetune_cost(graph, decisions)
    result = Plan(graph, rules, decisions, tie_notes, violations, base_now, base_after, ft_bytes, trainable,
                  finetunes, shadowed)
    return result.check() if check else result


def _plannable(graph: ModelGraph) -> list[ModuleInfo]:
    """Modules that hold parameters of their own, excluding the insides of surgery's adapter wrappers."""
    return [m for m in graph.leaves() if not _inside_adapter(m.path, graph)]


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
            problems.append(Violation("C2", (
                f"{where} makes {info.path} plain (trainable, full precision), but the base holds it as "
                f"{info.quantized} and quantized weights cannot be trained; adapt it instead (action: adapt) "
                "or load the base unquantized"), info.path))
        elif action in ("quantize", "adapt") and (not quant.quantizes or quant.scheme != info.quantized):
            target = "unquantized" if not quant.quantizes else f"as {quant.scheme}"
            problems.append(Violation("C1", (
                f"{where} keeps {info.path} {target}, but the base already holds it as {info.quantized}; "
                f"quantized weights cannot be restored or re-quantized — load the base again or drop "
                f"{rule.label if rule else 'the default'}"), info.path))
        elif action in ("quantize", "adapt") and info.held is not None:
            differs = _settings_differ(quant, info.held, info.kind)
            if differs:
                problems.append(Violation("C1", (
                    f"{where} asks for {info.path} as {quant.scheme} with {differs}, but the base already holds it "
                    f"as {info.quantized} with other settings and quantized weights cannot be re-quantized; write "
                    f"the base's settings in the rule file's `quantize:` ({_held_text(info.held)}) or load the "
                    "base again"), info.path))
        storage = info.quantized
    elif wants_quant:
        storage, plan_quant = quant.scheme, quant
    lora, adapter_params, adapter_bytes = None, 0, 0
    if action == "adapt":
        if info.kind not in ADAPTABLE_KINDS or weight is None:
            problems.append(Violation("C3", (
                f"{where} adapts {info.path} ({info.cls.rsplit('.', 1)[-1]}, kind {info.kind}), but LoRA "
                f"supports only {', '.join(ADAPTABLE_KINDS)} layers (a subclass with its own forward, such as "
                "OPT's learned positional embedding, is 'other'); narrow the rule (e.g. `type: linear`)"),
                info.path))
        else:
            lora = rule.lora_for(info.path) if rule else LoraConfig()
            if lora is not None:
                adapter_params = lora_param_count(info.kind, weight.shape, lora)
                adapter_bytes = adapter_params * DTYPE_BYTES[lora.dtype]
    decision = Decision(info.path, info.kind, action, storage, action == "plain", rule, lora, plan_quant,
                        adapter_params, adapter_bytes)
    return decision, problems


def lora_param_count(kind: str, weight_shape: tuple[int, ...], lora: LoraConfig) -> int:
    """Parameters of one LoRA adapter: r*(in+out), plus ``out`` for a trainable adapter bias."""
    in_f, out_f = lora_dims(kind, weight_shape)
    return lora.r * (in_f + out_f) + (out_f if lora.bias else 0)


def lora_dims(kind: str, weight_shape: tuple[int, ...]) -> tuple[int, int]:
    """(in, out) of a layer from its weight: Linear (out, in), Conv1D (in, out), Embedding (num, dim)."""
    if kind == "linear":
        return weight_shape[1], weight_shape[0]
    return weight_shape[0], weight_shape[1]


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
        out.append(Violation("C4", (
            f"{rule.location}: {rule.label} matched no module{typed} of {graph.model_class}{hint} "
            "(add `optional: true` if that is expected)"), None))
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
                    out.append(Violation("C7", (
                        f"{rule.location}: {rule.label} adapts {path} but its lora_by_module has no entry for it "
                        f"(entries: {keys}); add one, or give the rule a `lora:` default"), path))
        for pattern, _ in rule.lora_by_module:
            if not any(pattern_matches(pattern, p) for p in adapted):
                out.append(Violation("C7", (
                    f"{rule.location}: {rule.label} has a lora_by_module entry '{pattern}' that matches none of "
                    "the modules it adapts; remove it or fix the name"), None))
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
            message = (f"{names[0]} is tied to {', '.join(names[1:])}: {p_names} is plain, so each fine-tune "
                       f"trains a private copy (+{fmt_bytes(full_bytes)} per fine-tune) while {f_names} keeps "
                       "the shared base tensor; the tie is split in every fine-tune")
            if accepted:
                notes.append(TieNote(names, message, 0, full_bytes))
            else:
                rule = plain[0][1].rule
                fix = f"add `untie: true` to {rule.label} ({rule.location})" if rule else \
                    "add a plain rule with `untie: true` for it"
                violations.append(Violation("C6", f"{message}; {fix} to accept that, or make all of them plain",
                                            _param_owner(plain[0][0])[0]))
            continue
        forms = {_form(d, _param_owner(n)[1]) for n, d in members}
        if len(forms) == 1:
            storage = members[0][1].storage
            notes.append(TieNote(names, f"{names[0]} and {', '.join(names[1:])} stay one tensor ({storage})"))
            continue
        full = [n for n, d in members if _form(d, _param_owner(n)[1]) == "original"]
        quantized = [(n, d) for n, d in members if _form(d, _param_owner(n)[1]) != "original"]
        if full:
            q = ", ".join(f"{_param_owner(n)[0]} ({d.storage})" for n, d in quantized)
            notes.append(TieNote(names, (
                f"{', '.join(_param_owner(n)[0] for n in full)} is tied to {q}: quantizing keeps the "
                f"{info.dtype if info else ''} weight alive for {', '.join(_param_owner(n)[0] for n in full)} "
                f"(+{fmt_bytes(full_bytes)})"), full_bytes, 0))
        else:
            notes.append(TieNote(names, (
                f"{', '.join(names)} are one tensor quantized in {len(forms)} ways "
                f"({', '.join(sorted(str(f) for f in forms))}): each form is stored")))
    return notes, violations


def _form(decision: Decision, param: str) -> object:
    """How a parameter is stored after quantization: 'original' or the quantization that produces it."""
    if decision.quant is None or param != "weight":
        return "original"
    q = decision.quant
    return (q.scheme,) if q.scheme == "int8" else (q.scheme, q.double_quant, q.blocksize)


# ---------------------------------------------------------------------------------------- memory

def quantized_weight_bytes(kind: str, shape: tuple[int, ...], quant: QuantConfig) -> int:
    """Exact bytes bitsandbytes stores for one weight quantized with ``quant``.

    int8 (LLM.int8): one int8 per element + one float32 scale per output row.
    nf4/fp4: two elements per byte + float32 absmax per block + the 16-entry float32 code; with
    double quantization the absmax is uint8 plus float32 absmax per 256 blocks, a 256-entry float32
    code and a float32 offset.
    """
    numel = math.prod(shape)
    if quant.scheme == "int8":
        rows = shape[1] if kind == "conv1d" else shape[0]
        return numel + 4 * rows
    blocks = math.ceil(numel / quant.blocksize)
    packed = (numel + 1) // 2
    code = 16 * 4
    if quant.double_quant:
        absmax = blocks + 4 * math.ceil(blocks / 256) + 256 * 4 + 4
    else:
        absmax = 4 * blocks
    return packed + absmax + code


def _base_bytes(graph: ModelGraph, decisions: dict[str, Decision]) -> tuple[int, int]:
    """Bytes of the base now and after quantization, counting each tensor once per stored form."""
    canon = graph.canonical_names()
    now: dict[str, int] = {}
    after: dict[str, dict[object, int]] = defaultdict(dict)
    for path, decision in decisions.items():
        info = graph.modules[path]
        for p in info.params:
            full = f"{path}.{p.name}" if path else p.name
            key = canon.get(full, full)
            now[key] = p.nbytes
            form = _form(decision, p.name)
            after[key][form] = p.nbytes if form == "original" else quantized_weight_bytes(
                info.kind, p.shape, decision.quant)
    return sum(now.values()), sum(sum(forms.values()) for forms in after.values())


def _finetune_cost(graph: ModelGraph, decisions: dict[str, Decision]) -> tuple[int, int]:
    """Bytes and trainable parameters one more fine-tune adds: adapters + private copies of plain modules."""
    canon = graph.canonical_names()
    plain: dict[str, tuple[int, int]] = {}
    nbytes = params = 0
    for path, decision in decisions.items():
        nbytes += decision.adapter_bytes
        params += decision.adapter_params
        if decision.action == "plain":
            for p in graph.modules[path].params:
                full = f"{path}.{p.name}" if path else p.name
                plain[canon.get(full, full)] = (p.nbytes, p.numel)
    return nbytes + sum(b for b, _ in plain.values()), params + sum(n for _, n in plain.values())


def fmt_bytes(n: float) -> str:
    """Human-readable bytes (binary units), e.g. 1.3 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
