"""A MODEL's layout without its weights: its config, the model built from it on the meta device, and its graph
(read from the trace cache when there, else traced on meta). ``plan`` and ``inspect`` need nothing more."""

from __future__ import annotations

from pathlib import Path

from ..disk import gate_file
from ..errors import ModelConfigError, ModelNotFoundError, first_line
from .folder import MAX_CONFIG_BYTES
from .sources import WEIGHT_FILES, LoadedModel, config_identity, resolve
from .tiny import build_from_config, bundled_config, tiny_model


def read_config(folder: Path):
    """The transformers config of a model folder (a local directory or an HF-cache snapshot), read offline.

    Args:
        folder: the folder holding ``config.json``.

    Returns:
        The config ``AutoConfig`` reads from it.

    Raises:
        ModelNotFoundError: the folder has no config.json.
        ModelConfigError: config.json is not a regular file of at most 16 MiB inside the folder, or not a config
            transformers reads.
    """
    from transformers import AutoConfig

    if not (folder / "config.json").exists():
        raise ModelNotFoundError(f"{folder}: no config.json in this directory; is it a HuggingFace model folder?")
    gate_file(folder, "config.json", what="model config", limit=MAX_CONFIG_BYTES, error=ModelConfigError)
    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True)
    except (Exception, RecursionError) as exc:  # transformers raises ValueError/OSError/KeyError for bad configs
        raise ModelConfigError(
            f"{folder / 'config.json'}: cannot be read as a transformers config: {first_line(exc)}"
        ) from None


def model_layout(name: str) -> LoadedModel:
    """MODEL without its weights: built on the meta device from its config (a tiny model is built whole: it is
    small and its weights are seeded).

    Args:
        name: a MODEL argument (tiny, directory, hub id in the local cache, bundled architecture).

    Returns:
        The model and where it came from; ``has_weights`` says whether loading it would find weights.

    Raises:
        ModelNotFoundError: the name is found nowhere, is a file, or is a folder without config.json.
        ModelConfigError: the config cannot be read or builds no model.
    """
    source, folder = resolve(name)
    if source == "tiny":
        return LoadedModel(tiny_model(name), name, "tiny", True)
    if source == "bundled":
        return LoadedModel(build_from_config(bundled_config(name), device="meta"), name, "bundled", False)
    has_weights = any((folder / f).is_file() for f in WEIGHT_FILES)
    return LoadedModel(build_from_config(read_config(folder), device="meta"), name, source, has_weights)


def graph_of(name: str, *, use_cache: bool = True):
    """The graph of MODEL as ``plan`` and ``inspect`` need it (built on meta, no weights).

    Args:
        name: a MODEL argument.
        use_cache: read and write the trace cache (``--no-cache``: False).

    Returns:
        The ``ModelGraph``, from the trace cache when it holds this config, else traced (and cached).
    """
    from ..model.trace_cache import cached_graph

    def traced():
        from ..model.tracing import trace  # only on a cache miss: a cached graph needs neither torch nor a model

        return trace(model_layout(name).model)

    graph = cached_graph(config_identity(name) if use_cache else None, traced)
    graph.name = name
    return graph
