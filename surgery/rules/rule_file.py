"""Rule files from YAML (or an equivalent dict) into a RuleSet: read safely, validated with file:line (C5).

Reading is bounded (a regular file of at most 1 MiB; alias/merge-key expansion, nesting depth and
key types checked before anything is built) and every problem is one RuleFileError naming the
file and line, what is wrong and what to do.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from pathlib import Path
from typing import Any

import yaml

from ..disk import read_user_file
from ..errors import RuleFileError, first_line
from .ruleset import (
    ACTIONS,
    ADAPTABLE_KINDS,
    BLOCKSIZES,
    DTYPES,
    FORMAT_VERSION,
    KINDS,
    MAX_PATTERN_CHARS,
    MAX_RULE_FILE_BYTES,
    MAX_RULES,
    MAX_YAML_DEPTH,
    MAX_YAML_NODES,
    SCHEMES,
    STORAGES,
    ExtraTokens,
    LoraConfig,
    LoraValueError,
    QuantConfig,
    Rule,
    RuleSet,
    bundled_rules,
    compile_regex,
)

MAX_EXTRA_TOKENS, MAX_TOKEN_CHARS, MAX_VOCAB = 65_536, 256, 2**31 - 1
PEFT_LORA_KEYS = (
    "init_lora_weights",
    "loftq_config",
)  # read (or refused with the reason) under PEFT's LoraConfig name (besides use_rslora, use_dora)
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "eva")  # PEFT inits that change the base's weights
INITS = ("kaiming", "gaussian", "loftq")
LEGACY_RSLORA = "rslora"  # the old spelling of use_rslora, still read (adapter files written before carry it)


def load_rules(spec: str | Path | RuleSet | dict) -> RuleSet:
    """Load a rule file by path or bundled name; a RuleSet passes through, a dict is parsed as a file would be."""
    if isinstance(spec, RuleSet):
        return spec
    if isinstance(spec, dict):
        return parse_rules(spec, source="<dict>")
    path = Path(spec).expanduser()
    if not path.exists():
        bundled = bundled_rules()
        stem = str(spec).removesuffix(".yaml").removesuffix(".yml")
        if stem in bundled:
            return parse_rules(_read_yaml(bundled[stem]), source=f"rules/{bundled[stem].name}")
        else:
            close = difflib.get_close_matches(stem, list(bundled), n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise RuleFileError(
                f"{spec}: no such rule file, and no bundled rule file of that name{hint} "
                f"(bundled: {', '.join(bundled)})"
            )
    return parse_rules(_read_yaml(path), source=str(path))


def _read_yaml(path: Path) -> Any:
    raw = read_user_file(path, what="rule file", limit=MAX_RULE_FILE_BYTES, error=RuleFileError)
    if b"\x00" in raw:
        raise RuleFileError(f"{path}: is a binary file, not a YAML rule file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise RuleFileError(f"{path}:{line}: is not UTF-8 text (byte {exc.start}); a rule file is YAML text") from None
    if not text.strip():
        raise RuleFileError(f"{path}: is empty; a rule file needs at least `rules:` (see `surgery rules list`)")
    try:
        return yaml.load(text, Loader=_LineLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as exc:
        raise RuleFileError(f"{path}:{exc.line}: duplicate key '{exc.key}'; each key may appear once") from None
    except _Refused as exc:
        raise RuleFileError(f"{path}:{exc.line}: {exc}") from None
    except RecursionError:
        raise RuleFileError(
            f"{path}: nested too deeply (at most {MAX_YAML_DEPTH} levels); a rule file is a short, shallow document"
        ) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        context = f" ({exc.context} at line {exc.context_mark.line + 1})" if exc.context and exc.context_mark else ""
        raise RuleFileError(f"{where}: not valid YAML: {exc.problem or exc.context}{context}") from None
    except yaml.YAMLError as exc:
        raise RuleFileError(f"{path}: not valid YAML: {first_line(exc)}") from None


class _Refused(Exception):
    """A YAML document refused before construction (too large once aliases expand, too deep, bad key)."""

    def __init__(self, message: str, line: int):
        super().__init__(message)
        self.line = line


def _check_size(root: yaml.Node) -> None:
    """Refuse alias/merge-key bombs and deep nesting: count the nodes as if every alias were expanded."""
    expanded: dict[int, int] = {}

    def count(node: yaml.Node, depth: int) -> int:
        if depth > MAX_YAML_DEPTH:
            raise _Refused(
                f"nested deeper than {MAX_YAML_DEPTH} levels; a rule file is a short, shallow document",
                node.start_mark.line + 1,
            )
        if id(node) in expanded:  # an alias: the same node again, counted again (that is what expansion costs)
            return expanded[id(node)]
        if isinstance(node, yaml.MappingNode):
            total = 1 + sum(count(k, depth + 1) + count(v, depth + 1) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            total = 1 + sum(count(v, depth + 1) for v in node.value)
        else:
            total = 1
        if total > MAX_YAML_NODES:
            raise _Refused(
                f"more than {MAX_YAML_NODES:,} values once anchors and aliases are expanded; a rule "
                "file is small (alias bombs are refused)",
                node.start_mark.line + 1,
            )
        expanded[id(node)] = total
        return total

    count(root, 0)


class _DuplicateKey(Exception):
    def __init__(self, key, line):
        super().__init__(key)
        self.key, self.line = key, line


class _Mapping(dict):
    """A YAML mapping that remembers its line and the line of each key."""

    line: int = 0
    key_lines: dict


class _LineLoader(yaml.SafeLoader):
    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _check_size(node)
        return node

    def construct_mapping(self, node, deep=False):
        self.flatten_mapping(node)
        result = _Mapping()
        result.line, result.key_lines = node.start_mark.line + 1, {}
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise _Refused(
                    f"a mapping key must be a plain value, not {_kind(key)}", key_node.start_mark.line + 1
                ) from None
            if key in result:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
            result[key] = self.construct_object(value_node, deep=True)
            result.key_lines[key] = key_node.start_mark.line + 1
        return result


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _LineLoader.construct_mapping)


# ------------------------------------------------------------------------------------- parsing


class _Where:
    """Builds 'file:line: rule N: ...' messages for one mapping of the file."""

    def __init__(self, source: str, node: Any, prefix: str = ""):
        self.source, self.node, self.prefix = source, node, prefix

    def line(self, key: str | None = None) -> int | None:
        lines = getattr(self.node, "key_lines", {})
        return lines.get(key) or getattr(self.node, "line", None)

    def error(self, message: str, key: str | None = None) -> RuleFileError:
        line = self.line(key)
        where = f"{self.source}:{line}" if line else self.source
        return RuleFileError(f"{where}: {self.prefix}{message}")


def parse_rules(data: Any, source: str = "<rules>") -> RuleSet:
    """Validate parsed YAML (or an equivalent dict) into a RuleSet; every problem is a RuleFileError."""
    top = _Where(source, data)
    if not isinstance(data, dict):
        raise top.error(f"the top level must be a mapping with `rules:`, not {_kind(data)}")
    _check_keys(data, {"version", "description", "model", "quantize", "default", "rules", "extra_tokens"}, top)
    version = data.get("version", FORMAT_VERSION)
    if not isinstance(version, int) or isinstance(version, bool):
        raise top.error(f"version must be an integer, not {_kind(version)}", "version")
    if version > FORMAT_VERSION:
        raise top.error(
            f"version {version} is newer than this surgery reads ({FORMAT_VERSION}); upgrade surgery", "version"
        )
    if version < 1:
        raise top.error(f"version must be {FORMAT_VERSION}", "version")
    quant = _parse_quant(data.get("quantize", "none"), top, "quantize")
    default = data.get("default", "quantize")
    if default not in ACTIONS:
        raise top.error(_unknown("default action", default, ACTIONS), "default")
    if default == "adapt":
        raise top.error("default cannot be 'adapt'; adapt modules with explicit rules", "default")
    model = _optional_str(data, "model", top)
    description = _optional_str(data, "description", top)
    raw_rules = data.get("rules", [])
    if raw_rules is None:
        raw_rules = []
    if not isinstance(raw_rules, list):
        raise top.error(f"`rules` must be a list of rules (`- match: ...`), not {_kind(raw_rules)}", "rules")
    if len(raw_rules) > MAX_RULES:
        raise top.error(f"{len(raw_rules):,} rules; a rule file has at most {MAX_RULES:,}", "rules")
    rules = tuple(_parse_rule(i + 1, raw, source, top) for i, raw in enumerate(raw_rules))
    extra = _parse_extra_tokens(data["extra_tokens"], top) if data.get("extra_tokens") is not None else None
    return RuleSet(rules, quant, default, model, description, source, version, extra)


def read_extra_tokens(path: str | Path) -> list[str]:
    """The tokens of an ``--extra-tokens`` file: one per line (as trl's --extra_tokens_file), blank lines skipped,
    checked as a rule file's ``extra_tokens:`` is (each error names the file)."""
    from ..disk import read_user_text

    text = read_user_text(
        path, what="extra tokens file", limit=MAX_EXTRA_TOKENS * (MAX_TOKEN_CHARS + 1), error=RuleFileError
    )
    tokens = [line for line in text.splitlines() if line.strip()]
    parse_rules({"version": 1, "extra_tokens": tokens}, source=str(path))  # the same checks, naming the file
    return tokens


def with_extra_tokens(rules: RuleSet, tokens: list[str], source: str) -> RuleSet:
    """The rules with ``tokens`` as their extra tokens (``--extra-tokens``); a file that has its own is refused."""
    if rules.extra_tokens is not None:
        raise RuleFileError(
            f"{rules.source} already lists extra_tokens; give them there or with --extra-tokens {source}, not both"
        )
    return dataclasses.replace(rules, extra_tokens=ExtraTokens(tuple(tokens), where=source))


def _parse_extra_tokens(raw: Any, top: _Where) -> ExtraTokens:
    """``extra_tokens: [tok, ...]`` or ``{tokens: [...], first_id: N}``: distinct non-empty strings."""
    where = _Where(top.source, raw if getattr(raw, "line", None) else top.node, top.prefix)
    first_id = None
    if isinstance(raw, dict):
        _check_keys(raw, {"tokens", "first_id"}, where, what="extra_tokens option")
        first_id = raw.get("first_id")
        if first_id is not None and (not _is_int(first_id) or not 0 <= first_id <= MAX_VOCAB):
            raise where.error(
                f"extra_tokens first_id must be an integer from 0 to {MAX_VOCAB:,}, got {first_id!r}", "first_id"
            )
        raw = raw.get("tokens")
    if not isinstance(raw, list) or not raw:
        raise top.error(
            "`extra_tokens` must be a non-empty list of token strings (or {tokens: [...], first_id: N})", "extra_tokens"
        )
    if len(raw) > MAX_EXTRA_TOKENS:
        raise top.error(f"{len(raw):,} extra tokens; a rule file adds at most {MAX_EXTRA_TOKENS:,}", "extra_tokens")
    for token in raw:
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS:
            raise top.error(
                f"extra token {str(token)[:40]!r} must be a non-empty string of at most {MAX_TOKEN_CHARS} characters",
                "extra_tokens",
            )
    repeated = next((t for t in raw if raw.count(t) > 1), None)
    if repeated is not None:
        raise top.error(f"extra token {repeated!r} is listed twice", "extra_tokens")
    line = top.line("extra_tokens")
    return ExtraTokens(tuple(raw), first_id, f"{top.source}:{line}" if line else top.source)


def _parse_rule(index: int, raw: Any, source: str, top: _Where) -> Rule:
    where = _Where(source, raw if isinstance(raw, dict) else top.node, f"rule {index}: ")
    if not isinstance(raw, dict):
        raise where.error(f"must be a mapping like `- match: q_proj`, not {_kind(raw)}", "rules")
    _check_keys(raw, {"match", "type", "action", "lora", "lora_by_module", "quantize", "optional", "untie"}, where)
    match = raw.get("match")
    if not isinstance(match, str) or not match.strip():
        raise where.error("needs `match:`, a module-name pattern such as 'q_proj' or 're:.*proj'", "match")
    if len(match) > MAX_PATTERN_CHARS:
        raise where.error(f"match pattern of {len(match):,} characters; at most {MAX_PATTERN_CHARS}", "match")
    if match.startswith("re:"):
        try:
            compile_regex(match[3:])
        except Exception as exc:  # regex.error, OverflowError (huge repeat counts), RecursionError, ...
            raise where.error(f"bad regex in match '{match}': {first_line(exc)}", "match") from None
    action = raw.get("action")
    if action not in ACTIONS:
        raise where.error(_unknown("action", action, ACTIONS), "action")
    kind = raw.get("type")
    if kind is not None and kind not in KINDS:
        raise where.error(_unknown("type", kind, KINDS), "type")
    if action == "adapt" and kind is not None and kind not in ADAPTABLE_KINDS:
        raise where.error(f"adapt cannot apply to type '{kind}'; LoRA supports {', '.join(ADAPTABLE_KINDS)}", "type")
    for key in ("lora", "lora_by_module"):
        if key in raw and action != "adapt":
            raise where.error(f"`{key}:` is only allowed on an adapt rule (this one is '{action}')", key)
    lora = _parse_lora(raw["lora"], where, "lora") if raw.get("lora") is not None else None
    by_module = raw.get("lora_by_module") or {}
    if not isinstance(by_module, dict):
        raise where.error("`lora_by_module` must map module-name patterns to LoRA settings", "lora_by_module")
    if len(by_module) > MAX_RULES:
        raise where.error(f"{len(by_module):,} patterns in lora_by_module; at most {MAX_RULES:,}", "lora_by_module")
    for pattern in by_module:
        if not isinstance(pattern, str) or len(pattern) > MAX_PATTERN_CHARS:
            raise where.error(
                f"lora_by_module keys must be module-name patterns of at most {MAX_PATTERN_CHARS} characters",
                "lora_by_module",
            )
        if pattern.startswith("re:"):
            try:
                compile_regex(pattern[3:])
            except Exception as exc:
                raise where.error(
                    f"bad regex in lora_by_module '{pattern}': {first_line(exc)}", "lora_by_module"
                ) from None
    lora_by_module = tuple((str(p), _parse_lora(c, where, "lora_by_module")) for p, c in by_module.items())
    quant = None
    if "quantize" in raw:
        if action not in ("quantize", "adapt"):
            raise where.error(
                f"`quantize:` is only allowed on quantize and adapt rules (this one is '{action}')", "quantize"
            )
        quant = _parse_quant(raw["quantize"], where, "quantize")
    for flag in ("optional", "untie"):
        if not isinstance(raw.get(flag, False), bool):
            raise where.error(f"{flag} must be true or false, not {_kind(raw[flag])}", flag)
    if raw.get("untie") and action != "plain":
        raise where.error(f"`untie:` is only allowed on a plain rule (this one is '{action}')", "untie")
    return Rule(
        index,
        match,
        action,
        kind,
        lora,
        lora_by_module,
        quant,
        raw.get("optional", False),
        raw.get("untie", False),
        source,
        where.line(),
    )


LORA_KEYS = {  # rule-file key -> LoraConfig field (PEFT's names and the short ones)
    "r": "r",
    "alpha": "lora_alpha",
    "lora_alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "lora_dropout": "lora_dropout",
    "bias": "bias",
    "use_rslora": "use_rslora",
    LEGACY_RSLORA: "use_rslora",
    "dtype": "dtype",
    "use_dora": "use_dora",
}


def _parse_lora(raw: Any, where: _Where, key: str) -> LoraConfig:
    if not isinstance(raw, dict):
        raise where.error(f"`{key}` must be a mapping like {{r: 8, alpha: 16}}, not {_kind(raw)}", key)
    inner = _Where(where.source, raw if getattr(raw, "line", None) else where.node, where.prefix)
    _check_keys(raw, {*LORA_KEYS, "init", *PEFT_LORA_KEYS}, inner, what="LoRA option")
    values: dict[str, Any] = {}
    for name, value in raw.items():
        field_name = LORA_KEYS.get(name)
        if field_name is None:
            continue
        if field_name in values:
            first = next(k for k in raw if LORA_KEYS.get(k) == field_name)
            prefer = {"use_rslora": "use_rslora", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout"}
            raise inner.error(
                f"give `{prefer.get(field_name, first)}` only (`{first}` and `{name}` are two "
                "spellings of one setting; files written before read either)",
                name,
            )
        values[field_name] = value
    init = _init_of(raw, inner)
    if init is not None:
        values["init_lora_weights"] = init
    try:
        return LoraConfig(**values)
    except LoraValueError as exc:
        spelled = next((k for k in raw if LORA_KEYS.get(k, k) == LORA_KEYS.get(exc.key, exc.key)), exc.key)
        raise inner.error(str(exc), spelled) from None


def _init_of(raw: dict, inner: _Where) -> bool | str | None:
    """The adapter's start from ``init`` or PEFT's ``init_lora_weights`` (true or kaiming; gaussian; loftq), None
    when neither is written."""
    if "init" in raw and "init_lora_weights" in raw:
        raise inner.error("give `init` or PEFT's `init_lora_weights`, not both", "init_lora_weights")
    if "loftq_config" in raw:
        raise inner.error(
            "loftq_config is not needed: LoftQ here takes its bits from the rule file's `quantize:` and "
            "makes one pass (PEFT's loftq_iter: 1, as its replace_lora_weights_loftq), because further "
            "passes re-quantize the base and this base is shared; write init_lora_weights: loftq alone",
            "loftq_config",
        )
    if "init_lora_weights" not in raw:
        if "init" not in raw:
            return None
        init = raw["init"]
        if init not in INITS:
            raise inner.error(_unknown("lora init", init, INITS), "init")
        return True if init == "kaiming" else init
    value = raw["init_lora_weights"]
    if value is True or value in ("gaussian", "loftq"):
        return value
    if isinstance(value, str) and value.split("_")[0] in BASE_REWRITING_INITS:
        raise inner.error(
            f"init_lora_weights {value!r} is not supported: in PEFT it moves part of the base's weights "
            "into the adapter and subtracts it from the base (PiSSA and OLoRA, also CorDA and EVA's "
            "rewrites), but here one base is shared by every fine-tune and stays untouched; use true "
            "(kaiming, the default), gaussian, or loftq (which starts from the base's quantization "
            "error and leaves the base as it is)",
            "init_lora_weights",
        )
    raise inner.error(_unknown("init_lora_weights", value, ("true", "gaussian", "loftq")), "init_lora_weights")


def _parse_quant(raw: Any, where: _Where, key: str) -> QuantConfig:
    if raw is None or raw is False:
        return QuantConfig("none")
    if isinstance(raw, str):
        raw = {"scheme": raw}
    if not isinstance(raw, dict):
        raise where.error(f"`{key}` must be a scheme ({', '.join(SCHEMES)}) or a mapping with `scheme:`", key)
    scheme = raw.get("scheme")
    if scheme not in SCHEMES:
        raise where.error(_unknown("quantization scheme", scheme, SCHEMES), key)
    four_bit = {"scheme", "double_quant", "compute_dtype", "blocksize", "storage"}
    allowed = {"int8": {"scheme", "threshold"}, "none": {"scheme"}}.get(scheme, four_bit)
    inner = _Where(where.source, raw if getattr(raw, "line", None) else where.node, where.prefix)
    _check_keys(raw, allowed, inner, what=f"{scheme} option")
    threshold = raw.get("threshold", 6.0)
    if not _is_number(threshold) or not math.isfinite(threshold) or threshold < 0:
        raise inner.error(f"int8 threshold must be a finite number >= 0, got {threshold!r}", "threshold")
    double_quant = raw.get("double_quant", False)
    if not isinstance(double_quant, bool):
        raise inner.error(f"double_quant must be true or false, got {double_quant!r}", "double_quant")
    compute_dtype = raw.get("compute_dtype")
    if compute_dtype is not None and compute_dtype not in DTYPES:
        raise inner.error(_unknown("compute_dtype", compute_dtype, DTYPES), "compute_dtype")
    blocksize = raw.get("blocksize", 64)
    if blocksize not in BLOCKSIZES or not _is_int(blocksize):
        raise inner.error(f"blocksize must be one of {', '.join(map(str, BLOCKSIZES))}, got {blocksize!r}", "blocksize")
    storage = raw.get("storage", "uint8")
    if storage not in STORAGES:
        raise inner.error(_unknown("4-bit storage", storage, STORAGES), "storage")
    return QuantConfig(
        scheme,
        float(threshold),
        double_quant,
        compute_dtype,
        int(blocksize),
        storage,
        given=frozenset(k for k in raw if k != "scheme"),
    )


def _check_keys(raw: dict, allowed: set, where: _Where, what: str = "key") -> None:
    for key in raw:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f" (allowed: {', '.join(sorted(allowed))})"
            raise where.error(f"unknown {what} '{key}'{hint}", key)


def _optional_str(data: dict, key: str, where: _Where) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise where.error(f"`{key}` must be a string, not {_kind(value)}", key)
    return value


def _unknown(what: str, value: Any, allowed: tuple) -> str:
    if value is None:
        return f"missing {what}; one of {', '.join(allowed)}"
    close = difflib.get_close_matches(str(value), allowed, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown {what} {value!r}{hint} (one of {', '.join(allowed)})"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _kind(x: Any) -> str:
    return {list: "a list", dict: "a mapping", str: "a string", type(None): "nothing"}.get(type(x), type(x).__name__)
