"""What a checkpoint load must give: every weight the config describes, each of its shape, nothing left over, and
tensors the base owns (never views of a file that may change on disk).

transformers' loader reports missing, unexpected and mismatched weights in a log table and goes on (a missing weight
is left random); surgery turns that report into one ``ModelConfigError`` naming the weights and the file. The
quantizer (``quantizer.PlanQuantizer``) records what transformers does not check for the weights it quantizes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from ..disk import MiB, read_user_text
from ..errors import ModelConfigError, SurgeryError
from .sources import WEIGHT_FILES

SHOWN_KEYS = 3  # weights named in a message before "and N more"
MAX_INDEX_BYTES = 64 * MiB


def check_loading_info(folder: Path, info: dict, quantized: object | None, *, random_init: bool) -> None:
    """Refuse a checkpoint that does not hold exactly the weights its config describes.

    Args:
        folder: the model folder the checkpoint was read from.
        info: ``from_pretrained``'s loading info (``output_loading_info=True``, ``ignore_mismatched_sizes=True``).
        quantized: the ``LoadFindings`` of the plan quantizer the checkpoint loaded with (its quantized weights'
            shape mismatches and weights never read), or None.
        random_init: ``--random-init``: weights the checkpoint lacks may start random.

    Raises:
        ModelConfigError: a weight of another shape than the config gives it, a weight the checkpoint lacks
            (unless ``random_init``, or when the plan quantizes it), or a tensor the model has no place for.
    """
    mismatched = sorted({(k, tuple(found), tuple(want)) for k, found, want in info.get("mismatched_keys", ())})
    mismatched += sorted(getattr(quantized, "mismatched", ()))
    if mismatched:
        key, found, want = mismatched[0]
        raise ModelConfigError(
            f"{weights_file(folder, key)}: {key} has shape {found} in the checkpoint, but config.json "
            f"({folder / 'config.json'}) makes it {want}{_more(len(mismatched))}; the config and the weights "
            "disagree: use the config.json saved with these weights"
        )
    unfilled = sorted(getattr(quantized, "unfilled", ()))
    missing = sorted(set(info.get("missing_keys", ())) - {key for key, _ in unfilled})
    if unfilled:
        raise ModelConfigError(
            f"{weights_file(folder)}: has no tensor for {_named([k for k, _ in unfilled])}, which {unfilled[0][1]} "
            "quantizes; point to a folder whose checkpoint holds every weight, or let the rule file leave the module "
            "unquantized"
        )
    if missing and not random_init:
        raise ModelConfigError(
            f"{weights_file(folder)}: has no tensor for {_named(missing)}, which config.json describes (loading "
            "would leave it random); point to a folder whose checkpoint holds every weight, or pass --random-init "
            "to start the missing weights random"
        )
    unexpected = sorted(info.get("unexpected_keys", ()))
    if unexpected:
        raise ModelConfigError(
            f"{weights_file(folder, unexpected[0])}: holds {_named(unexpected)}, for which the model config.json "
            "describes has no place; the config and the weights disagree: use the config.json saved with these "
            "weights"
        )


def _named(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS])
    return f"{shown} and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else shown


def _more(count: int) -> str:
    return f" ({count - 1} more weight{'s' if count > 2 else ''} disagree alike)" if count > 1 else ""


def weights_file(folder: Path, key: str | None = None) -> Path:
    """The file of ``folder``'s checkpoint that holds ``key`` (its shard, named by the index), else the file
    transformers reads first (the single file or the index)."""
    files = [folder / f for f in WEIGHT_FILES if (folder / f).is_file()]
    first = files[0] if files else folder
    index = next((f for f in files if f.name.endswith(".index.json")), None)
    if key is None or index is None or first.name == "model.safetensors":
        return first
    try:
        shard = json.loads(
            read_user_text(index, what="checkpoint index", limit=MAX_INDEX_BYTES, error=ModelConfigError)
        )["weight_map"][key]
    except (SurgeryError, ValueError, KeyError, TypeError, RecursionError):
        return index
    return folder / shard if isinstance(shard, str) and Path(shard).name == shard else index


def own_file_backed(model: nn.Module, folder: Path) -> int:
    """Copy into the process's own memory every CPU tensor of ``model`` that is a view of a checkpoint file in
    ``folder`` (safetensors loads by memory-mapping: a file changed on disk would change the base).

    Args:
        model: a base just loaded from ``folder``.
        folder: its model folder (files may be links into the HF cache: their targets are matched).

    Returns:
        The bytes copied.
    """
    ranges = _mapped_ranges(folder)
    copied = 0
    with torch.no_grad():
        for tensor in _unique_tensors(model):
            if tensor.device.type != "cpu" or tensor.is_meta:
                continue
            start = tensor.untyped_storage().data_ptr()
            if ranges is None or any(low <= start < high for low, high in ranges):
                tensor.data = tensor.data.clone()
                copied += tensor.numel() * tensor.element_size()
    return copied


def _unique_tensors(model: nn.Module) -> Iterable[torch.Tensor]:
    seen: set[int] = set()
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            yield tensor


def _mapped_ranges(folder: Path) -> list[tuple[int, int]] | None:
    """The address ranges where this process maps a file of ``folder``; None where the maps cannot be read (then
    every CPU tensor counts as mapped)."""
    targets = {os.path.realpath(p) for p in folder.iterdir() if p.is_file()}
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    ranges = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] in targets:
            low, high = parts[0].split("-")
            ranges.append((int(low, 16), int(high, 16)))
    return ranges
