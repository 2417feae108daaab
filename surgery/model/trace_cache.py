"""Traces cached on disk, so ``plan`` and ``inspect`` of a known architecture build no model at all.

An entry is plain JSON (never pickle) named by the sha256 of its key: the model's config as loading
reads it (``base.sources.config_identity``) and the torch, transformers and surgery versions. It is
written atomically and validated on read: it must parse, carry exactly its own key and match the
graph schema; anything else (corrupted, truncated, another version's, hand-edited) is ignored and
rewritten, never trusted. The folder is ``$SURGERY_CACHE``, else ``$XDG_CACHE_HOME/surgery``, else
``~/.cache/surgery``; traces go in ``traces/``. A cache that cannot be written only costs time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..disk import MiB, atomic_write, read_user_file
from ..errors import SurgeryError
from ..package import version
from .graph import ModelGraph, ModuleInfo, ParamInfo

log = logging.getLogger(__name__)
FORMAT = 2  # 2: OPT's learned positional embedding is kind 'positional' (was 'other')
MAX_ENTRY_BYTES = 64 * MiB


def cache_folder() -> Path:
    """Where surgery caches traces: $SURGERY_CACHE, else $XDG_CACHE_HOME/surgery, else ~/.cache/surgery."""
    if os.environ.get("SURGERY_CACHE"):
        return Path(os.environ["SURGERY_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "surgery"


def cached_graph(identity: dict | None, build: Callable[[], ModelGraph]) -> ModelGraph:
    """The graph cached for ``identity`` (a model's config as plain data, ``base.sources.config_identity``), else
    ``build()``'s, written to the cache; ``identity`` None skips the cache (``--no-cache``, unreadable config)."""
    key = _key(identity) if identity is not None else None
    path = cache_folder() / "traces" / f"{_digest(key)}.json" if key is not None else None
    graph = _read(path, key) if path is not None else None
    if graph is None:
        graph = build()
        if path is not None:
            _write(path, key, graph)
    return graph


def _key(identity: dict) -> dict:
    from importlib.metadata import version as installed

    return {
        "format": FORMAT,
        "model": identity,
        "torch": installed("torch"),
        "transformers": installed("transformers"),
        "surgery": version(),
    }


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _read(path: Path, key: dict) -> ModelGraph | None:
    if not path.exists():
        return None
    try:
        entry = json.loads(read_user_file(path, what="trace cache entry", limit=MAX_ENTRY_BYTES, error=SurgeryError))
        if not isinstance(entry, dict) or entry.get("key") != json.loads(json.dumps(key)):
            raise ValueError("written for another model or version")
        return graph_from_data(entry["graph"])
    except (SurgeryError, ValueError, KeyError, TypeError, RecursionError) as exc:
        log.debug("trace cache entry %s ignored (%s); tracing again", path, exc)
        return None


def _write(path: Path, key: dict, graph: ModelGraph) -> None:
    if any(m.quantized or m.held for m in graph.modules.values()):
        return  # a meta build is never quantized; anything else is not what the cache is for
    data = json.dumps({"key": key, "graph": graph_to_data(graph)}, separators=(",", ":")).encode()
    try:
        atomic_write(path, data, error=SurgeryError)
    except SurgeryError as exc:
        log.debug("trace cache not written (%s)", exc)


# ------------------------------------------------------------------------ graph <-> plain data


def graph_to_data(graph: ModelGraph) -> dict:
    """A ModelGraph as JSON-able data (without the ExportedProgram and the config object)."""
    return {
        "model_class": graph.model_class,
        "ties": [list(t) for t in graph.ties],
        "method": graph.method,
        "seconds": graph.seconds,
        "reason": graph.reason,
        "reduced": {k: list(v) for k, v in graph.reduced.items()},
        "modules": [
            {
                "path": m.path,
                "cls": m.cls,
                "kind": m.kind,
                "calls": m.calls,
                "order": m.order,
                "input_shape": m.input_shape,
                "output_shape": m.output_shape,
                "params": [[p.name, list(p.shape), p.dtype, p.nbytes] for p in m.params],
            }
            for m in graph.modules.values()
        ],
    }


def graph_from_data(data: Any) -> ModelGraph:
    """The ModelGraph of ``graph_to_data``'s output; ValueError on anything that does not fit the schema."""
    _expect(isinstance(data, dict), "graph")
    modules = {}
    for m in _list(data.get("modules")):
        _expect(isinstance(m, dict), "module")
        params = [
            ParamInfo(_str(p[0]), tuple(_int(d) for d in _list(p[1])), _str(p[2]), _int(p[3]))
            for p in _list(m.get("params"))
            if _expect(isinstance(p, list) and len(p) == 4, "param")
        ]
        info = ModuleInfo(
            _str(m.get("path"), empty=True),
            _str(m.get("cls")),
            _str(m.get("kind")),
            params,
            calls=_int(m.get("calls")),
            order=_optional(m.get("order"), _int),
            input_shape=_optional(m.get("input_shape"), _shape),
            output_shape=_optional(m.get("output_shape"), _shape),
        )
        _expect(info.path not in modules, "duplicate module")
        modules[info.path] = info
    ties = [tuple(_str(n) for n in _list(t)) for t in _list(data.get("ties"))]
    reduced = data.get("reduced")
    _expect(isinstance(reduced, dict), "reduced")
    method = data.get("method")
    _expect(method in ("export", "module-tree"), "method")
    return ModelGraph(
        _str(data.get("model_class")),
        modules,
        ties,
        method,
        float(data.get("seconds")),
        _optional(data.get("reason"), _str),
        {_str(k): tuple(_int(n) for n in _list(v)) for k, v in reduced.items()},
    )


def _expect(ok: bool, what: str) -> bool:
    if not ok:
        raise ValueError(f"malformed {what}")
    return True


def _list(value) -> list:
    _expect(isinstance(value, list), "list")
    return value


def _str(value, empty: bool = False) -> str:
    _expect(isinstance(value, str) and (empty or value != ""), "string")
    return value


def _int(value) -> int:
    _expect(isinstance(value, int) and not isinstance(value, bool) and value >= 0, "count")
    return value


def _shape(value) -> tuple:
    return tuple(d if isinstance(d, str) else _int(d) for d in _list(value))


def _optional(value, parse):
    return None if value is None else parse(value)
