"""Rules: per module-name pattern, whether a module is quantized, frozen, adapted (LoRA) or plain.

The types of a rule file (see docs/rule-files.md; read by ``rule_file``) and how a pattern matches a
module path. Every rule keeps its file and line so that each decision and each error can point at
it; matching a whole model happens in ``plan``.
"""

from __future__ import annotations

import functools
import json
import math
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

import regex

from ..combinations import row
from ..errors import PatternTimeout, RuleFileError

FORMAT_VERSION = 1
MAX_RULE_FILE_BYTES = 1 << 20
MAX_RULES = 1000  # rules per file, and patterns per lora_by_module
MAX_PATTERN_CHARS = 1000
MAX_LORA_RANK = 65536
MAX_YAML_NODES = 100_000  # values in the document once aliases are expanded
MAX_YAML_DEPTH = 32
REGEX_TIMEOUT = 2.0  # CPU seconds one ``re:`` pattern may spend on one module name (benign ones take microseconds)
Action = Literal["quantize", "freeze", "adapt", "plain"]
Scheme = Literal["int8", "nf4", "fp4", "none"]
Kind = Literal["linear", "conv1d", "embedding", "positional", "norm", "other"]
DtypeName = Literal["float32", "float16", "bfloat16"]
ACTIONS: tuple[Action, ...] = ("quantize", "freeze", "adapt", "plain")
SCHEMES: tuple[Scheme, ...] = ("int8", "nf4", "fp4", "none")
KINDS: tuple[Kind, ...] = ("linear", "conv1d", "embedding", "positional", "norm", "other")
# positional: a learned positional embedding that computes its own rows (OPT's): adaptable, never quantized
ADAPTABLE_KINDS: tuple[Kind, ...] = ("linear", "conv1d", "embedding", "positional")
EMBEDDING_KINDS: tuple[Kind, ...] = ("embedding", "positional")  # looked up by row: LoRA A is (r, rows)
DTYPES: tuple[DtypeName, ...] = ("float32", "float16", "bfloat16")
StorageName = Literal["uint8", "float16", "bfloat16"]
STORAGES: tuple[StorageName, ...] = ("uint8", "float16", "bfloat16")  # how packed 4-bit bytes are typed
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclass(frozen=True)
class QuantConfig:
    """How frozen Linear/Conv1D/Embedding weights are stored: int8 (LLM.int8), nf4, fp4 or none."""

    scheme: Scheme = "none"
    threshold: float = 6.0  # int8: outlier threshold of LLM.int8 (0 disables the fp16 outlier path)
    double_quant: bool = False  # 4-bit: quantize the absmax scales too
    compute_dtype: DtypeName | None = None  # 4-bit: dtype of the matmul (default: the input's)
    blocksize: int = 64  # 4-bit: elements per absmax block
    storage: StorageName = "uint8"  # 4-bit: dtype the packed bytes are stored as (FSDP shards float dtypes alike)
    given: frozenset = field(default=frozenset(), compare=False, repr=False)  # settings the file wrote explicitly

    @property
    def quantizes(self) -> bool:
        return self.scheme != "none"

    def to_dict(self) -> dict:
        if self.scheme == "int8":
            return {"scheme": "int8", "threshold": self.threshold}
        if self.scheme in ("nf4", "fp4"):
            return {
                "scheme": self.scheme,
                "double_quant": self.double_quant,
                "compute_dtype": self.compute_dtype,
                "blocksize": self.blocksize,
                **({"storage": self.storage} if self.storage != "uint8" else {}),
            }
        return {"scheme": "none"}


class LoraValueError(RuleFileError):
    """A LoRA setting out of range; ``key`` is the rule-file key it came from (the file parser adds file:line)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


MAX_LORA_ALPHA = 1e6  # alpha / r scales the update; beyond this it overflows half precision at once
InitName = Literal["gaussian", "loftq"]


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """One LoRA adapter's settings, under PEFT's names; scaling is lora_alpha/r, or lora_alpha/sqrt(r) with
    ``use_rslora``. Rule files also read the short names (``alpha``, ``dropout``, ``init``) and write them.

    Args:
        r: the rank.
        lora_alpha: the scaling numerator.
        lora_dropout: dropout on the adapter's input, in [0, 1).
        bias: a trainable adapter bias (added unscaled).
        init_lora_weights: True (A kaiming-uniform, B zero: the fine-tune starts as the base), "gaussian", or
            "loftq" (start from the base's quantization error).
        use_rslora: rank-stabilized LoRA.
        dtype: the adapter tensors' dtype.
        use_dora: DoRA, a trainable magnitude per output over the normalized W + BA.

    Raises:
        LoraValueError: a value out of range, or settings that do not combine (``surgery.combinations``).
    """

    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    bias: bool = False
    init_lora_weights: bool | InitName = True
    use_rslora: bool = False
    dtype: DtypeName = "float32"
    use_dora: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.r, int) and not isinstance(self.r, bool) and 1 <= self.r <= MAX_LORA_RANK):
            raise LoraValueError("r", f"lora r must be an integer from 1 to {MAX_LORA_RANK}, got {self.r!r}")
        alpha = self.lora_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
            raise LoraValueError("alpha", f"lora alpha must be a finite number > 0, got {alpha!r}")
        if alpha > MAX_LORA_ALPHA:
            raise LoraValueError(
                "alpha",
                f"lora alpha {alpha:g} is beyond {MAX_LORA_ALPHA:g}: its scaling would "
                "swamp the base's outputs (alpha is usually r or 2r)",
            )
        dropout = self.lora_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise LoraValueError("dropout", f"lora dropout must be in [0, 1), got {dropout!r}")
        for name in ("bias", "use_rslora", "use_dora"):
            if not isinstance(getattr(self, name), bool):
                raise LoraValueError(name, f"lora {name} must be true or false, got {getattr(self, name)!r}")
        if self.init_lora_weights not in (True, "gaussian", "loftq"):
            raise LoraValueError(
                "init_lora_weights",
                f"init_lora_weights must be true, gaussian or loftq, got {self.init_lora_weights!r}",
            )
        if self.dtype not in DTYPES:
            raise LoraValueError("dtype", f"lora dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for other, on in (("bias", self.bias), ("loftq", self.init_lora_weights == "loftq")):
            if self.use_dora and on:
                found = row("use_dora", other)
                raise LoraValueError("use_dora", f"use_dora with {other}: {found.reason}; {found.remedy}")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (self.r**0.5 if self.use_rslora else self.r)

    def to_dict(self) -> dict:
        """The rule-file form (short names; ``use_dora`` written only when on, so files and run identities from
        before read the same)."""
        out = {
            "r": self.r,
            "alpha": self.lora_alpha,
            "dropout": self.lora_dropout,
            "bias": self.bias,
            "init": "kaiming" if self.init_lora_weights is True else self.init_lora_weights,
            "use_rslora": self.use_rslora,
            "dtype": self.dtype,
        }
        if self.use_dora:
            out["use_dora"] = True
        return out


@dataclass(frozen=True)
class Rule:
    """One rule: which modules it matches, what it does to them, and where it was written."""

    index: int
    match: str
    action: Action
    type: Kind | None = None
    lora: LoraConfig | None = None
    lora_by_module: tuple[tuple[str, LoraConfig], ...] = ()
    quantize: QuantConfig | None = None
    optional: bool = False
    untie: bool = False  # plain rule: accept splitting a tied weight (C6)
    source: str = "<rules>"
    line: int | None = None

    @property
    def location(self) -> str:
        return f"{self.source}:{self.line}" if self.line else f"{self.source} rule {self.index}"

    @property
    def label(self) -> str:
        return f"rule {self.index} '{self.match}'"

    def matches(self, path: str, kind: str) -> bool:
        if self.type is not None and kind != self.type:
            return False
        try:
            return pattern_matches(self.match, path)
        except PatternTimeout as exc:
            raise RuleFileError(f"{self.location}: {exc}") from None

    def lora_for(self, path: str) -> LoraConfig | None:
        """The LoRA settings of a module this rule adapts (per-module form first, then the rule's own)."""
        for pattern, config in self.lora_by_module:
            try:
                found = pattern_matches(pattern, path)
            except PatternTimeout as exc:
                raise RuleFileError(f"{self.location}: {exc}") from None
            if found:
                return config
        return self.lora if self.lora is not None or self.lora_by_module else LoraConfig()

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"match": self.match, "action": self.action}
        if self.type:
            out["type"] = self.type
        if self.lora is not None:
            out["lora"] = self.lora.to_dict()
        if self.lora_by_module:
            out["lora_by_module"] = {p: c.to_dict() for p, c in self.lora_by_module}
        if self.quantize is not None:
            out["quantize"] = self.quantize.to_dict()
        for flag in ("optional", "untie"):
            if getattr(self, flag):
                out[flag] = True
        return out


@dataclass(frozen=True)
class ExtraTokens:
    """Tokens a fine-tune adds to its vocabulary, with rows of its own; ``first_id`` is the first one's id (None:
    the base embedding's row count, i.e. appended; the CLI writes the tokenizer's length)."""

    tokens: tuple[str, ...]
    first_id: int | None = None
    where: str = field(default="", compare=False)  # "file:line" of the list, or the --extra-tokens file, for messages

    def to_dict(self) -> dict:
        return {"tokens": list(self.tokens), **({"first_id": self.first_id} if self.first_id is not None else {})}


@dataclass(frozen=True)
class RuleSet:
    """A whole rule file: storage scheme, default action, ordered rules (first match wins)."""

    rules: tuple[Rule, ...] = ()
    quantize: QuantConfig = field(default_factory=QuantConfig)
    default: Action = "quantize"
    model: str | None = None
    description: str | None = None
    source: str = "<rules>"
    version: int = FORMAT_VERSION
    extra_tokens: ExtraTokens | None = None

    def decide(self, path: str, kind: str) -> Rule | None:
        """The first rule that matches the module, or None (then ``default`` applies)."""
        return next((rule for rule in self.rules if rule.matches(path, kind)), None)

    def quant_for(self, rule: Rule | None) -> QuantConfig:
        return rule.quantize if rule is not None and rule.quantize is not None else self.quantize

    def with_compute_dtype(self, dtype: DtypeName) -> RuleSet:
        """The same rules with ``dtype`` as the compute dtype of every 4-bit setting that leaves it out (a file
        that writes ``compute_dtype:``, null included, keeps its own)."""

        def fill(q: QuantConfig | None) -> QuantConfig | None:
            if q is None or q.scheme not in ("nf4", "fp4") or q.compute_dtype or "compute_dtype" in q.given:
                return q
            return replace(q, compute_dtype=dtype)

        return replace(
            self, quantize=fill(self.quantize), rules=tuple(replace(r, quantize=fill(r.quantize)) for r in self.rules)
        )

    def to_dict(self) -> dict:
        out: dict[str, Any] = {
            "version": self.version,
            "quantize": self.quantize.to_dict(),
            "default": self.default,
            "rules": [r.to_dict() for r in self.rules],
        }
        if self.model:
            out["model"] = self.model
        if self.description:
            out["description"] = self.description
        if self.extra_tokens is not None:
            out["extra_tokens"] = self.extra_tokens.to_dict()
        return out

    def to_json(self) -> str:
        """Canonical JSON: the same rules always give the same text (stored in adapter files)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def name(self) -> str:
        return Path(self.source).stem if self.source.endswith((".yaml", ".yml")) else self.source

    def __repr__(self) -> str:
        return (
            f"RuleSet({self.source!r}, quantize={self.quantize.scheme}, default={self.default}, "
            f"{len(self.rules)} rules)"
        )


# ------------------------------------------------------------------------------------ matching


def pattern_matches(pattern: str, path: str) -> bool:
    """Glob against the full dotted path and each dot-aligned suffix; ``re:`` is a full-match regex.

    A regex may spend REGEX_TIMEOUT seconds of its own CPU time per module name (``fullmatch_bounded``):
    a pattern that backtracks catastrophically raises PatternTimeout instead of hanging (rule files and
    adapter files may come from anywhere), while a busy machine only delays a benign one.
    """
    if pattern.startswith("re:"):
        return fullmatch_bounded(pattern, path)
    parts = path.split(".")
    return any(fnmatchcase(".".join(parts[i:]), pattern) for i in range(len(parts)))


def fullmatch_bounded(pattern: str, path: str, budget: float | None = None) -> bool:
    """Whether the ``re:`` ``pattern`` matches all of ``path``, refused after ``budget`` CPU seconds of this thread.

    The regex package's own timeout counts the CPU time of the whole process, which other threads spend
    too; when it fires before this thread has spent ``budget`` itself, the match runs again with a longer
    limit. So only the work of the match counts: other processes or threads can slow it, never refuse it.

    Args:
        pattern: ``re:`` followed by the regular expression.
        path: the dotted module path.
        budget: CPU seconds of the calling thread (default REGEX_TIMEOUT).

    Returns:
        True when the regex matches the whole path.

    Raises:
        PatternTimeout: the match alone took ``budget`` CPU seconds (catastrophic backtracking).
    """
    budget = REGEX_TIMEOUT if budget is None else budget
    compiled, started, limit = compile_regex(pattern[3:]), time.thread_time(), budget
    for _ in range(_MAX_RETRIES):
        try:
            return compiled.fullmatch(path, timeout=limit) is not None
        except TimeoutError:
            if time.thread_time() - started >= budget:
                break
            limit *= 2  # the process's other threads spent the limit: try again with room for them
    raise PatternTimeout(pattern, budget)


_MAX_RETRIES = 12  # a limit doubled 11 times is 2048 x the budget: only a thread that never runs gets that far
# a backreference or a recursive call, outside a character class: matching with one can take exponential time
_BACKTRACKING = regex.compile(
    r"\[\^?\]?(?:\\.|[^\]\\])*\]"  # a character class (its escapes mean characters): skipped
    r"|(?P<ref>\\(?![0-7]{3})[1-9]|\\g<|\(\?(?:P=|P>|&|R\)|[+-]?\d+\)))"
    r"|\\."  # any other escape: skipped
)


@functools.lru_cache(maxsize=256)
def compile_regex(text: str):
    """A compiled ``re:`` pattern (the ``regex`` package, whose matching takes a timeout).

    Raises:
        ValueError: the pattern refers back to a group or recurses (``\\1``, ``(?P=name)``, ``(?R)``, ...):
            matching with those can backtrack catastrophically, and no module name needs them.
    """
    for found in _BACKTRACKING.finditer(text):
        if found["ref"]:
            raise ValueError(
                f"'{found['ref']}' refers back to a group (a backreference or a recursion), which invites "
                "catastrophic backtracking; module names never need one: write the alternatives out, "
                "e.g. 're:.*\\.(q|v)_proj'"
            )
    return regex.compile(text)


# ------------------------------------------------------------------------------------- bundled


def bundled_rules_dir() -> Path:
    """The folder of bundled rule files: installed as ``surgery/bundled_rules``, or ``rules/`` in a checkout."""
    package = Path(__file__).resolve().parent.parent
    installed = package / "bundled_rules"
    return installed if installed.is_dir() else package.parent / "rules"


def bundled_rules() -> dict[str, Path]:
    """Bundled rule files by bare name (``qv_lora`` -> .../qv_lora.yaml)."""
    return {p.stem: p for p in sorted(bundled_rules_dir().glob("*.yaml"))}


INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")  # a layer index: a dot-separated part of a module path made of digits
PATTERN_BUDGET = MAX_PATTERN_CHARS // 2  # covering_patterns splits an alternation longer than this


def collapse(path: str) -> str:
    """A module path with layer indices replaced by '*', so repeated blocks share one row."""
    return INDEX.sub("*", path)


def grouped(paths: list[str]) -> OrderedDict[str, list[str]]:
    """Paths by their collapsed pattern, in first-seen order."""
    groups: OrderedDict[str, list[str]] = OrderedDict()
    for path in paths:
        groups.setdefault(collapse(path), []).append(path)
    return groups


def covering_patterns(paths: list[str], every: list[str]) -> list[str]:
    """Few ``match:`` patterns that, among the module paths ``every``, match exactly ``paths``.

    Paths are grouped by their collapsed path (``collapse``). A group holding every module of ``every`` with that
    collapsed path becomes the glob itself (``model.layers.*.self_attn.q_proj``) when the glob matches nothing else;
    otherwise one ``re:`` pattern whose layer indices are an alternation (``model\\.layers\\.(?:0|3|7)\\.mlp``) or,
    when shorter, a lookahead that leaves out the other indices. So the count grows with the distinct collapsed paths,
    not with the depth of the model; an alternation longer than PATTERN_BUDGET (several hundred layers) is split.

    Args:
        paths: module paths to match, each one of ``every``.
        every: every module path of the model (the patterns are exact among these, not among all strings).

    Returns:
        The patterns, in the order of the first path of each collapsed group.
    """
    everywhere: dict[str, list[str]] = {}
    for path in every:
        everywhere.setdefault(collapse(path), []).append(path)
    out: list[str] = []
    for shape, members in grouped(sorted(set(paths))).items():
        universe = everywhere.get(shape, [])
        if set(members) == set(universe) and {p for p in every if pattern_matches(shape, p)} == set(members):
            out.append(shape)
        else:
            out += _index_patterns(members, universe)
    return out


def _index_patterns(members: list[str], universe: list[str]) -> list[str]:
    """``re:`` patterns for ``members`` (one collapsed path) among ``universe`` (all modules of that path)."""
    pieces = INDEX.split(members[0])
    chosen = {tuple(INDEX.findall(p)) for p in members}
    pattern = "re:" + re.escape(pieces[0]) + _indices(pieces[1:], chosen, {tuple(INDEX.findall(p)) for p in universe})
    if len(pattern) <= PATTERN_BUDGET or len(members) == 1:
        return [pattern]
    half = len(members) // 2
    return _index_patterns(members[:half], universe) + _index_patterns(members[half:], universe)


def _indices(pieces: list[str], chosen: set[tuple[str, ...]], universe: set[tuple[str, ...]]) -> str:
    """A regex for ``index pieces[0] index pieces[1] ...`` whose index tuples, among ``universe``, are ``chosen``.

    Leading indices with the same set of following tuples share one alternative, so a full product (every expert
    of layers 0-3) stays one alternation per position.
    """
    if not pieces:
        return ""
    following: dict[str, set[tuple[str, ...]]] = {}
    for t in chosen:
        following.setdefault(t[0], set()).add(t[1:])
    heads: dict[frozenset, list[str]] = {}
    for first in sorted(following, key=_index_order):
        heads.setdefault(frozenset(following[first]), []).append(first)
    firsts = {t[0] for t in universe}
    alternatives = []
    for rest, same in heads.items():
        within = {t[1:] for t in universe if t[0] in set(same)}
        alternatives.append(_one_of(same, firsts) + re.escape(pieces[0]) + _indices(pieces[1:], set(rest), within))
    return alternatives[0] if len(alternatives) == 1 else "(?:" + "|".join(alternatives) + ")"


def _one_of(values: list[str], universe: set[str]) -> str:
    """A regex for one index that is one of ``values``, among ``universe``: the values, or the others left out."""
    left_out = sorted(universe - set(values), key=_index_order)
    if not left_out:
        return r"\d+"
    include, exclude = (v[0] if len(v) == 1 else "(?:" + "|".join(v) + ")" for v in (values, left_out))
    return min(include, rf"(?!{exclude}\b)\d+", key=len)


def _index_order(index: str) -> tuple[int, str]:
    return len(index), index
