"""The files of a model folder that surgery and transformers read, each through the gate of ``surgery.disk``.

A local model folder or HF-cache snapshot is gated once, right before a loader gets it: every file at its top is
a regular file inside the folder (the cache's links into its blobs are its normal layout), those read whole are
bounded, and the shards a checkpoint index names are plain paths inside the folder, each gated as well
(transformers joins an index's names to the folder as they are: ``../x`` or an absolute path would reach out).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..disk import GiB, MiB, check_inside, gate_file, gate_folder, read_user_text
from ..errors import SurgeryError

MAX_CONFIG_BYTES = 16 * MiB  # config.json, generation_config.json, adapter_config.json
MAX_INDEX_BYTES = 64 * MiB  # a safetensors index of a 70B checkpoint is well under 1 MiB
MAX_TOKENIZER_BYTES = 1 * GiB  # the largest vocabularies' tokenizer.json are tens of MiB
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
CHAT_TEMPLATES = "additional_chat_templates"  # a folder of named chat templates transformers reads too
CONFIG_FILES = ("config.json", "generation_config.json", "adapter_config.json")


def read_limits() -> dict[str, int | None]:
    """Name -> the most bytes of each file of a model folder that is read whole."""
    return {
        **dict.fromkeys(CONFIG_FILES, MAX_CONFIG_BYTES),
        **dict.fromkeys(INDEXES, MAX_INDEX_BYTES),
        **dict.fromkeys(TOKENIZER_FILES, MAX_TOKENIZER_BYTES),
    }


def gate_model_folder(folder: Path, *, error: type[SurgeryError]) -> None:
    """Gate a model folder before ``from_pretrained`` reads its config and checkpoint: its files, then the shards
    each index names.

    Args:
        folder: a local model folder or an HF-cache snapshot.
        error: the SurgeryError to raise.

    Raises:
        error: a file is no regular file (a FIFO, a device), larger than it may be, or out of the folder; an index
            is no JSON object with a weight_map, or names a shard out of the folder.
    """
    gate_folder(folder, read_limits(), what="model folder", error=error)
    for index in INDEXES:
        if os.path.lexists(folder / index):
            for shard in sorted(set(weight_map(folder, index, error=error).values())):
                gate_shard(folder, index, shard, error=error)


def gate_tokenizer_folder(folder: Path, *, error: type[SurgeryError]) -> None:
    """Gate a folder before ``AutoTokenizer`` reads it (its named chat templates included).

    Raises:
        error: as ``gate_model_folder``, for the tokenizer's files.
    """
    gate_folder(folder, read_limits(), what="tokenizer folder", error=error)
    templates = check_inside(folder, CHAT_TEMPLATES, error=error)
    if templates.is_dir():
        gate_folder(templates, {}, what="folder of chat templates", error=error)


def weight_map(folder: Path, index: str, *, error: type[SurgeryError]) -> dict[str, str]:
    """Tensor name -> the shard that holds it, as the checkpoint index ``index`` of ``folder`` says.

    Raises:
        error: the index fails the gate, or is not a JSON object whose weight_map maps names to file names.
    """
    path = gate_file(folder, index, what="checkpoint index", error=error, limit=MAX_INDEX_BYTES)
    text = read_user_text(path, what="checkpoint index", limit=MAX_INDEX_BYTES, error=error)
    try:
        mapping = json.loads(text)["weight_map"]
    except (ValueError, KeyError, TypeError, RecursionError):
        mapping = None
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
        raise error(
            f"{path}: not a checkpoint index (a JSON object with a weight_map of tensor names to file names); "
            "save the model again with save_pretrained"
        )
    return mapping


def gate_shard(folder: Path, index: str, shard: str, *, error: type[SurgeryError]) -> Path:
    """The path of the shard ``shard`` that ``index`` names, once it passed the gate (inside, regular)."""
    return gate_file(folder, shard, what="checkpoint shard", error=error, named_by=f"{folder / index} (weight_map)")
