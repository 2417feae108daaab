"""Where a MODEL argument comes from: a bundled tiny model, a local directory, a snapshot in the local HF cache, or
a bundled architecture; and where a base's full-precision weights can be read again.

Never touches the network: a hub id is looked up in the local HF cache through huggingface_hub's cache functions
(``snapshot_download(local_files_only=True)``, ``scan_cache_dir``), which read only the disk. Nothing here imports
torch or transformers, so ``plan`` and ``inspect`` answer from the trace cache without them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ..disk import gate_file, gate_folder, read_user_file
from ..errors import ModelConfigError, ModelNotFoundError, SurgeryError
from ..model.architectures import ARCHITECTURES, TINY_MODELS
from .folder import MAX_CONFIG_BYTES

if TYPE_CHECKING:
    from torch import nn

    from .full_weights import FullWeights

Source = Literal["tiny", "directory", "file", "hub-cache", "bundled", "missing"]

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


@dataclass(frozen=True)
class LoadedModel:
    """A resolved model and where it came from (``source``: directory, hub-cache, bundled, tiny)."""

    model: nn.Module
    name: str
    source: Literal["directory", "hub-cache", "bundled", "tiny"]
    has_weights: bool

    def __repr__(self) -> str:
        weights = "weights" if self.has_weights else "no weights"
        return f"LoadedModel({self.name!r}, {type(self.model).__name__}, from {self.source}, {weights})"


def bundled_names() -> list[str]:
    """Names of every bundled model: tiny models first, then architectures."""
    return [*TINY_MODELS, *ARCHITECTURES]


def locate(name: str) -> tuple[Source, Path | None]:
    """Where MODEL comes from, in the order ``load_model`` tries them.

    Args:
        name: a bundled tiny model, a local path, a hub id, or a bundled architecture.

    Returns:
        (source, folder): source is tiny, directory, file (an error for loading), hub-cache, bundled, or missing
        (found nowhere); folder is the directory or the HF-cache snapshot, else None.
    """
    if name in TINY_MODELS:
        return "tiny", None
    path = Path(name).expanduser()
    if path.is_dir():
        return "directory", path
    if path.exists():
        return "file", path
    cached = hub_snapshot(name)
    if cached is not None:
        return "hub-cache", cached
    return ("bundled", None) if name in ARCHITECTURES else ("missing", None)


def resolve(name: str) -> tuple[Source, Path | None]:
    """``locate``, for a MODEL that must be loaded or built.

    Raises:
        ModelNotFoundError: ``name`` is a file, or found nowhere (with close bundled names suggested).
    """
    source, folder = locate(name)
    if source == "file":
        raise ModelNotFoundError(f"{name}: is a file, not a model directory; pass the folder holding config.json")
    if source == "missing":
        raise ModelNotFoundError(not_found_message(name))
    return source, folder


def hub_cache() -> Path:
    """The HF hub cache folder, read from the environment now as huggingface_hub resolves it at import (HF_HUB_CACHE,
    HUGGINGFACE_HUB_CACHE, HF_HOME/hub, XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub), so a variable set
    after ``huggingface_hub`` was imported still counts."""
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    hub = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(hub)))


def hub_snapshot(name: str) -> Path | None:
    """The snapshot of hub id ``name`` in the local HF cache, never contacting the hub.

    Args:
        name: a hub id (``org/name`` or ``name``); anything else is never in the cache.

    Returns:
        The snapshot folder ``refs/main`` names (one huggingface_hub knows to be incomplete too: loading then says
        what is missing), else the newest cached snapshot, else None.
    """
    cache = hub_cache()
    repository = cache / ("models--" + name.replace("/", "--"))
    if not repository.is_dir():
        return None  # nothing cached under that name: answered without importing huggingface_hub's client
    if (repository / "refs").is_dir():  # huggingface_hub reads refs/main whole: a FIFO there would block it
        gate_folder(repository / "refs", {"main": 4096}, what="folder of HF cache refs", error=ModelConfigError)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, IncompleteSnapshotError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, cache_dir=cache, local_files_only=True))
    except HFValidationError:
        return None  # not a hub id (a path that does not exist, a name with spaces, ...)
    except IncompleteSnapshotError as exc:
        return Path(exc.snapshot_path)
    except (LocalEntryNotFoundError, OSError):
        return _newest_snapshot(name, cache)


def _newest_snapshot(name: str, cache: Path) -> Path | None:
    """The most recently modified snapshot of ``name`` in the cache (no ``refs/main``, or one naming no snapshot)."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        repos = scan_cache_dir(cache).repos
    except (CacheNotFound, OSError, ValueError):  # the cache vanished meanwhile, or is a file
        return None
    revisions = [r for repo in repos if repo.repo_type == "model" and repo.repo_id == name for r in repo.revisions]
    return max(revisions, key=lambda r: r.last_modified).snapshot_path if revisions else None


def config_identity(name: str) -> dict | None:
    """What ``load_model(name, weights=False)`` builds from, as plain JSON data, read without transformers.

    The trace cache keys on it.

    Args:
        name: a MODEL argument.

    Returns:
        {"tiny"|"bundled": spec} or {"config.json": the folder's config}; None when the name does not resolve to a
        readable config (loading then reports why).
    """
    source, folder = locate(name)
    if source in ("tiny", "bundled"):
        return {source: (TINY_MODELS if source == "tiny" else ARCHITECTURES)[name]}
    if folder is None or source == "file":
        return None
    try:
        path = gate_file(folder, "config.json", what="model config", limit=MAX_CONFIG_BYTES, error=ModelConfigError)
        config = json.loads(read_user_file(path, what="model config", limit=MAX_CONFIG_BYTES, error=ModelConfigError))
    except (SurgeryError, ValueError, RecursionError):
        return None
    return {"config.json": config} if isinstance(config, dict) else None


def full_weights_of(model: nn.Module) -> FullWeights | None:
    """Where a base's full-precision weights can be read again (LoftQ reads them once the base is quantized).

    Args:
        model: a base, loaded by ``load_model`` or by transformers.

    Returns:
        What ``load_model`` recorded, else the safetensors checkpoint in the folder or HF-cache snapshot the model's
        ``name_or_path`` names (as PEFT's ``replace_lora_weights_loftq`` finds it); None when neither is there.
    """
    from .full_weights import CheckpointWeights
    from .shared_base import base_record

    recorded = base_record(model).full_weights
    if recorded is not None:
        return recorded
    name = str(getattr(model, "name_or_path", "") or "")
    where, folder = locate(name) if name else ("missing", None)
    safetensors = where in ("directory", "hub-cache") and any((folder / f).is_file() for f in WEIGHT_FILES[:2])
    return CheckpointWeights.of(folder, model) if safetensors else None


def not_found_message(name: str) -> str:
    """Why MODEL ``name`` was found nowhere, with close bundled names and what to pass instead."""
    import difflib

    close = difflib.get_close_matches(name, bundled_names(), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return (
        f"model '{name}' is not a local directory, not in the local HF cache (no network is used) and not "
        f"bundled.{hint} Use a local path, a bundled name (`surgery models` lists them: "
        f"{', '.join(TINY_MODELS)}, {', '.join(list(ARCHITECTURES)[:3])}, ...), "
        "or pass --random-init with a bundled architecture."
    )
