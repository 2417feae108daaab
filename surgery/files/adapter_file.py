"""Adapter files: a fine-tune's own tensors (adapters, plain modules) as safetensors, checked on load.

The file holds only what the fine-tune does not share with its base, plus metadata that makes it
self-contained: the rules (canonical JSON, so the file alone rebuilds the fine-tune), the base's
name, class and fingerprint, and two sha256 checksums (metadata; tensor names, dtypes, shapes and
bytes). Writes are atomic (temp file in the same folder, fsync, rename). Loading validates the
whole file before touching anything; any failure leaves the base and the target fine-tune as they
were. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..base.fingerprints import Fingerprint, base_fingerprint
from ..base.ownership import own_state, require_finetune
from ..disk import GiB, MiB, atomic_write, check_folder_files, check_user_file, gate_folder
from ..errors import AdapterStateError, SurgeryError, first_line
from ..package import install_hint, version
from ..rules.rule_file import parse_rules
from ..rules.ruleset import MAX_RULE_FILE_BYTES, RuleSet

ADAPTER_FILE = "adapter.safetensors"  # the adapter file's name in folders: save_pretrained, train runs, checkpoints
FORMAT = "surgery-adapter"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 16 * MiB  # tensor entries + rules + fingerprint: kilobytes in practice
MAX_ADAPTER_BYTES = 64 * GiB
MAX_RULES_JSON = MAX_RULE_FILE_BYTES
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass
class AdapterFile:
    """A validated adapter file: its metadata, rules, base fingerprint and tensors."""

    path: Path
    metadata: dict[str, str]
    rules: RuleSet
    fingerprint: Fingerprint
    tensors: dict[str, torch.Tensor]

    @property
    def base_model(self) -> str:
        return self.metadata.get("base_model", "")

    @property
    def base_class(self) -> str:
        return self.metadata.get("base_class", "")

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def __repr__(self) -> str:
        return (
            f"AdapterFile({str(self.path)!r}, base={self.base_model or self.base_class!r}, "
            f"{len(self.tensors)} tensors, {self.nbytes} bytes)"
        )


# ---------------------------------------------------------------------------------------- save


def save_adapter(finetune: nn.Module, path: str | Path) -> Path:
    """Write the fine-tune's own tensors and metadata to ``path`` (safetensors), atomically."""
    path = Path(path)
    if path.is_dir():
        raise AdapterStateError(
            f"{path}: is a directory; give a file name such as {path / ADAPTER_FILE} "
            "(or write a whole adapter folder with ft.save_pretrained)"
        )
    atomic_write(path, adapter_bytes(finetune), error=AdapterStateError)
    return path


def adapter_bytes(finetune: nn.Module, values: dict[str, torch.Tensor] | None = None) -> bytes:
    """The adapter file of a fine-tune, as bytes: its own tensors (or ``values`` for them) and metadata."""
    from safetensors.torch import save

    info = require_finetune(finetune, "saved")
    own = own_state(finetune)
    values = own if values is None else values
    tensors = {name: values[name].detach().to("cpu").contiguous() for name in own}
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "surgery_version": version(),
        "rules": info.rules.to_json(),
        "rules_source": info.rules.source,
        "base_model": base_name(info.base),
        "base_class": type(info.base).__name__,
        "base_fingerprint": base_fingerprint(info.base).to_json(),
    }
    metadata["metadata_sha256"] = _metadata_digest(metadata)
    metadata["tensors_sha256"] = _tensors_digest(tensors)
    return save(tensors, metadata=metadata)


def base_name(base: nn.Module) -> str:
    """The name or path the base was loaded from (``config.name_or_path``), or ''."""
    return str(getattr(getattr(base, "config", None), "name_or_path", "") or "")


# ---------------------------------------------------------------------------------------- read


def read_adapter(path: str | Path) -> AdapterFile:
    """Read and validate an adapter file completely (structure, metadata, checksums); changes nothing.

    The file's size and header are checked first, from a bounded read (a regular file of at most 64 GiB, a header
    of at most 16 MiB), so a file surgery did not write is refused saying what is wrong before its data is touched;
    the metadata and tensors are then read through ``safetensors.safe_open`` and the tensors copied out: the
    AdapterFile keeps no file open or mapped, and a later change to the file cannot change it.

    Args:
        path: the adapter file, or a folder ``save_pretrained`` wrote (or a Trainer checkpoint): its adapter file.

    Returns:
        The validated AdapterFile.

    Raises:
        AdapterStateError: naming the file and what is wrong with it (not a regular file, a pickle, truncated,
            a malformed header, metadata or checksums that do not match, invalid stored rules).
    """
    path = Path(path)
    if path.is_dir() and os.path.lexists(path / ADAPTER_FILE):  # a FIFO there is the gate's to refuse
        check_folder_files(path, error=AdapterStateError)
        gate_folder(path, {ADAPTER_FILE: MAX_ADAPTER_BYTES}, what="adapter folder", error=AdapterStateError)
        path = path / ADAPTER_FILE
    size = _file_size(path)
    text = _header_bytes(path, size)
    header = _parse_header(path, text)
    metadata = _check_metadata(path, header.pop("__metadata__", None))
    _check_entries(path, header, size - 8 - len(text))
    tensors = _read_tensors(path, metadata, set(header))
    if metadata["tensors_sha256"] != _tensors_digest(tensors):
        raise AdapterStateError(
            f"{path}: tensor checksum mismatch: the tensor data or names were changed or "
            "corrupted after saving; save the adapter again"
        )
    try:
        fp = Fingerprint.from_json(metadata["base_fingerprint"])
    except ValueError as exc:
        raise AdapterStateError(f"{path}: unreadable base fingerprint ({exc})") from None
    return AdapterFile(path, metadata, _stored_rules(path, metadata), fp, tensors)


def _file_size(path: Path) -> int:
    """The size of a regular, non-empty file of at most MAX_ADAPTER_BYTES (a folder without one gets a hint)."""
    if path.is_dir():
        hint = (
            " (it holds adapter_config.json: a PEFT adapter; `surgery generate -a` reads it as it is, `surgery "
            "import-peft` or surgery.import_peft make a fine-tune of it)"
            if (path / "adapter_config.json").exists()
            else ""
        )
        raise AdapterStateError(f"{path}: is a directory without {ADAPTER_FILE}, not an adapter file{hint}")
    size = check_user_file(path, what="adapter file", limit=MAX_ADAPTER_BYTES, error=AdapterStateError)
    if not size:
        raise AdapterStateError(f"{path}: is empty; it is not an adapter file (was a save interrupted?)")
    return size


def _header_bytes(path: Path, size: int) -> bytes:
    """The header's JSON bytes, read only as far as they are plausible: never from a pickle, never more than the
    file holds or MAX_HEADER_BYTES."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            _refuse_pickle(path, head)
            if len(head) < 8:
                raise AdapterStateError(f"{path}: is {len(head)} bytes long, too short for a safetensors file")
            (length,) = struct.unpack("<Q", head)
            if length > size - 8:
                raise AdapterStateError(
                    f"{path}: header claims {length} bytes but the file holds only {size - 8} "
                    "after the length field: truncated, or not a safetensors file"
                )
            if length > MAX_HEADER_BYTES:
                raise AdapterStateError(f"{path}: header of {length} bytes is larger than any adapter file writes")
            text = f.read(length)
    except OSError as exc:
        raise AdapterStateError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if len(text) < length:
        raise AdapterStateError(f"{path}: changed while being read; try again once nothing writes to it")
    return text


def _refuse_pickle(path: Path, head: bytes) -> None:
    if head[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") or head[:4] == b"PK\x03\x04":
        raise AdapterStateError(
            f"{path}: is a pickle or torch.save archive, not safetensors; surgery never "
            "unpickles files (they can run code). Convert it to safetensors first"
        )


def _parse_header(path: Path, text: bytes) -> dict:
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise AdapterStateError(
            f"{path}: corrupted header (not valid UTF-8 JSON, or nested too deeply: {first_line(exc)})"
        ) from None
    if not isinstance(header, dict):
        raise AdapterStateError(f"{path}: corrupted header (a JSON {type(header).__name__}, not an object)")
    return header


def _check_metadata(path: Path, metadata) -> dict[str, str]:
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise AdapterStateError(
            f"{path}: a safetensors file without surgery adapter metadata; it was not written "
            "by surgery.save_adapter (for PEFT adapters use surgery.import_peft)"
        )
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise AdapterStateError(f"{path}: corrupted metadata (values must be strings)")
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError:
        raise AdapterStateError(
            f"{path}: corrupted metadata (format_version {metadata.get('format_version')!r} is not a number)"
        ) from None
    if version > FORMAT_VERSION:
        raise AdapterStateError(
            f"{path}: adapter format version {version} is newer than this surgery reads "
            f"({FORMAT_VERSION}); upgrade surgery ({install_hint(upgrade=True)})"
        )
    missing = [k for k in ("rules", "base_fingerprint", "metadata_sha256", "tensors_sha256") if k not in metadata]
    if missing:
        raise AdapterStateError(f"{path}: corrupted metadata (missing {', '.join(missing)})")
    stored = metadata["metadata_sha256"]
    rest = {k: v for k, v in metadata.items() if k not in ("metadata_sha256", "tensors_sha256")}
    if _metadata_digest(rest) != stored:
        raise AdapterStateError(
            f"{path}: metadata checksum mismatch: the metadata was changed or corrupted "
            "after saving; save the adapter again"
        )
    return metadata


def _check_entries(path: Path, header: dict, data_bytes: int) -> None:
    """Every tensor entry of the header checked (dtype, shape, offsets inside the ``data_bytes`` after the header),
    and the entries together: contiguous from 0, no overlap, no gap, nothing after the last."""
    spans = sorted(_span(path, name, entry, data_bytes) for name, entry in header.items())
    if spans and spans[0][0] != 0:
        raise AdapterStateError(f"{path}: corrupted header: {spans[0][0]} unused bytes before the first tensor")
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise AdapterStateError(f"{path}: corrupted header: tensors '{a}' and '{b}' overlap")
        if begin_b > end_a:
            raise AdapterStateError(
                f"{path}: corrupted header: {begin_b - end_a} unused bytes between tensors '{a}' "
                f"and '{b}' (safetensors data is contiguous)"
            )
    if (spans[-1][1] if spans else 0) != data_bytes:
        raise AdapterStateError(
            f"{path}: {data_bytes - (spans[-1][1] if spans else 0)} stray bytes after the "
            "last tensor: not a file save_adapter wrote"
        )


def _span(path: Path, name: str, entry, data_bytes: int) -> tuple[int, int, str]:
    """(begin, end, name) of one tensor entry in the data section, once its dtype, shape and offsets agree."""
    if not isinstance(entry, dict) or entry.get("dtype") not in DTYPES:
        raise AdapterStateError(f"{path}: corrupted header entry for '{name}' (unknown dtype or form)")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (
        isinstance(shape, list)
        and all(isinstance(d, int) and d >= 0 for d in shape)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) for o in offsets)
    ):
        raise AdapterStateError(f"{path}: corrupted header entry for '{name}' (shape or offsets)")
    begin, end = offsets
    if not 0 <= begin <= end or end - begin != ITEMSIZE[entry["dtype"]] * math.prod(shape):
        raise AdapterStateError(
            f"{path}: corrupted header entry for '{name}': offsets {offsets} do not hold a "
            f"{entry['dtype']} tensor of shape {shape}"
        )
    if end > data_bytes:
        raise AdapterStateError(
            f"{path}: truncated: tensor '{name}' needs bytes up to {end} of the data section "
            f"but the file holds {data_bytes}"
        )
    return begin, end, name


def _read_tensors(path: Path, metadata: dict[str, str], names: set[str]) -> dict[str, torch.Tensor]:
    """The file's tensors through ``safe_open``, each copied out of the mapped file (``get_tensor`` returns a view
    of it, which a later write to the file would change); the file as checked (same metadata and names), or an
    error saying it changed meanwhile."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            read_metadata = f.metadata()
            tensors = {name: f.get_tensor(name).clone() for name in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise AdapterStateError(f"{path}: not a readable safetensors file ({first_line(exc)})") from None
    if read_metadata != metadata or set(tensors) != names:
        raise AdapterStateError(f"{path}: changed while being read; try again once nothing writes to it")
    return tensors


def _stored_rules(path: Path, metadata: dict[str, str]) -> RuleSet:
    """The rules the file stores (canonical JSON), parsed as a rule file is."""
    if len(metadata["rules"]) > MAX_RULES_JSON:
        raise AdapterStateError(
            f"{path}: its stored rules are {len(metadata['rules']):,} characters of JSON; rule "
            f"files are at most {MAX_RULES_JSON:,}: not a file save_adapter wrote"
        )
    try:
        return parse_rules(json.loads(metadata["rules"]), source=f"{path}#rules")
    except (ValueError, RecursionError) as exc:
        raise AdapterStateError(f"{path}: its stored rules are not valid JSON ({first_line(exc)})") from None
    except SurgeryError as exc:
        raise AdapterStateError(f"{path}: its stored rules are invalid: {exc}") from None


def _metadata_digest(metadata: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(metadata, sort_keys=True).encode()).hexdigest()


def _tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------- base


def check_base(adapter: AdapterFile, base: nn.Module) -> None:
    """Raise AdapterStateError unless ``base`` is the checkpoint the adapter was saved from."""
    if adapter.base_class and adapter.base_class != type(base).__name__:
        raise AdapterStateError(
            f"{adapter.path}: was saved on a {adapter.base_class} "
            f"({adapter.base_model or 'unnamed'}), not a {type(base).__name__}; "
            "load it onto the model it was trained on"
        )
    why = adapter.fingerprint.mismatch(base_fingerprint(base))
    if why is not None:
        raise AdapterStateError(
            f"{adapter.path}: the base differs from the one it was saved on "
            f"({adapter.base_model or adapter.base_class}): {why}"
        )
