"""Adapter files: a fine-tune's own tensors (adapters, plain modules) as safetensors, checked on load.

The file holds only what the fine-tune does not share with its base, plus metadata that makes it
self-contained: the rules (canonical JSON, so the file alone rebuilds the fine-tune), the base's
name, class and fingerprint, and two sha256 checksums (metadata; tensor names, dtypes, shapes and
bytes). Writes are atomic (temp file in the same folder, fsync, rename). Loading validates the
whole file before touching anything; any failure leaves the base and the target fine-tune as they
were. Nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import AdapterStateError, PlanError, SurgeryError
from .fingerprint import Fingerprint, fingerprint
from .plan import plan as make_plan
from .rewrite import base_graph, finetune_info, rewrite
from .rules import QuantConfig, RuleSet, parse_rules

FORMAT = "surgery-adapter"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 100 << 20
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
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
        return (f"AdapterFile({str(self.path)!r}, base={self.base_model or self.base_class!r}, "
                f"{len(self.tensors)} tensors, {self.nbytes} bytes)")


# ---------------------------------------------------------------------------------------- save

def own_state(finetune: nn.Module) -> dict[str, nn.Parameter]:
    """The fine-tune's own parameters by name: its LoRA tensors and its plain modules' private copies."""
    info = _require_finetune(finetune)
    plain = {d.path for d in info.plan.by_action("plain")}
    out: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for path, module in finetune.named_modules():
        if getattr(module, "is_surgery_adapter", False):
            params = [(n, p) for n, p in module.named_parameters(recurse=False)]
        elif path in plain:
            params = list(module.named_parameters(recurse=False))
        else:
            continue
        for name, p in params:
            if id(p) not in seen:  # a tie kept among plain modules is one tensor, saved once
                seen.add(id(p))
                out[f"{path}.{name}" if path else name] = p
    return out


def save_adapter(finetune: nn.Module, path: str | Path) -> Path:
    """Write the fine-tune's own tensors and metadata to ``path`` (safetensors), atomically."""
    from safetensors.torch import save

    info = _require_finetune(finetune)
    path = Path(path)
    if path.is_dir():
        raise AdapterStateError(f"{path}: is a directory; give a file name such as {path / 'adapter.safetensors'}")
    tensors = {name: p.detach().to("cpu").contiguous() for name, p in own_state(finetune).items()}
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "surgery_version": _version(),
        "rules": info.rules.to_json(),
        "rules_source": info.rules.source,
        "base_model": str(getattr(getattr(info.base, "config", None), "name_or_path", "") or ""),
        "base_class": type(info.base).__name__,
        "base_fingerprint": base_fingerprint(info.base).to_json(),
    }
    metadata["metadata_sha256"] = _metadata_digest(metadata)
    metadata["tensors_sha256"] = _tensors_digest(tensors)
    atomic_write(path, save(tensors, metadata=metadata))
    return path


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder: the old file survives any failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise AdapterStateError(f"{path}: could not be written ({exc.strerror or exc}); "
                                    "the previous file, if any, is unchanged") from exc
        raise
    _fsync_folder(path.parent)


@contextlib.contextmanager
def atomic_folder(path: str | Path, *, overwrite: bool = False):
    """Yield a temp folder beside ``path``; on success it becomes ``path``, on failure it is removed.

    An existing non-empty ``path`` is refused unless ``overwrite``; then it is replaced only once the
    new folder is complete.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise AdapterStateError(f"{path}: exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise AdapterStateError(f"{path}: exists and is not empty; choose a new folder or pass --overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------- read

def read_adapter(path: str | Path) -> AdapterFile:
    """Read and validate an adapter file completely (structure, metadata, checksums); changes nothing."""
    path = Path(path)
    data = _read_bytes(path)
    header, data_start = _parse_header(path, data)
    metadata = _check_metadata(path, header.pop("__metadata__", None))
    tensors = _tensors(path, header, data, data_start)
    if metadata["tensors_sha256"] != _tensors_digest(tensors):
        raise AdapterStateError(f"{path}: tensor checksum mismatch: the tensor data or names were changed or "
                                "corrupted after saving; save the adapter again")
    try:
        fp = Fingerprint.from_json(metadata["base_fingerprint"])
    except (ValueError, TypeError, KeyError) as exc:
        raise AdapterStateError(f"{path}: unreadable base fingerprint ({exc})") from exc
    try:
        rules = parse_rules(json.loads(metadata["rules"]), source=f"{path}#rules")
    except (ValueError, SurgeryError) as exc:
        raise AdapterStateError(f"{path}: its stored rules are invalid: {exc}") from exc
    return AdapterFile(path, metadata, rules, fp, tensors)


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise AdapterStateError(f"{path}: no such adapter file")
    if path.is_dir():
        hint = " (it holds adapter_config.json: a PEFT adapter; use surgery.import_peft)" \
            if (path / "adapter_config.json").exists() else ""
        raise AdapterStateError(f"{path}: is a directory, not an adapter file{hint}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AdapterStateError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    if not data:
        raise AdapterStateError(f"{path}: is empty; it is not an adapter file (was a save interrupted?)")
    if data[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") or data[:4] == b"PK\x03\x04":
        raise AdapterStateError(f"{path}: is a pickle or torch.save archive, not safetensors; surgery never "
                                "unpickles files (they can run code). Convert it to safetensors first")
    if len(data) < 8:
        raise AdapterStateError(f"{path}: is {len(data)} bytes long, too short for a safetensors file")
    return data


def _parse_header(path: Path, data: bytes) -> tuple[dict, int]:
    (length,) = struct.unpack("<Q", data[:8])
    if length > len(data) - 8:
        raise AdapterStateError(f"{path}: header claims {length} bytes but the file holds only {len(data) - 8} "
                                "after the length field: truncated, or not a safetensors file")
    if length > MAX_HEADER_BYTES:
        raise AdapterStateError(f"{path}: header of {length} bytes is larger than any adapter file writes")
    try:
        header = json.loads(data[8:8 + length].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise AdapterStateError(f"{path}: corrupted header (not valid UTF-8 JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise AdapterStateError(f"{path}: corrupted header (a JSON {type(header).__name__}, not an object)")
    return header, 8 + length


def _check_metadata(path: Path, metadata) -> dict[str, str]:
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise AdapterStateError(f"{path}: a safetensors file without surgery adapter metadata; it was not written "
                                "by surgery.save_adapter (for PEFT adapters use surgery.import_peft)")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise AdapterStateError(f"{path}: corrupted metadata (values must be strings)")
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError:
        raise AdapterStateError(f"{path}: corrupted metadata (format_version "
                                f"{metadata.get('format_version')!r} is not a number)") from None
    if version > FORMAT_VERSION:
        raise AdapterStateError(f"{path}: adapter format version {version} is newer than this surgery reads "
                                f"({FORMAT_VERSION}); upgrade surgery (pip install -U surgery)")
    missing = [k for k in ("rules", "base_fingerprint", "metadata_sha256", "tensors_sha256") if k not in metadata]
    if missing:
        raise AdapterStateError(f"{path}: corrupted metadata (missing {', '.join(missing)})")
    stored = metadata["metadata_sha256"]
    rest = {k: v for k, v in metadata.items() if k not in ("metadata_sha256", "tensors_sha256")}
    if _metadata_digest(rest) != stored:
        raise AdapterStateError(f"{path}: metadata checksum mismatch: the metadata was changed or corrupted "
                                "after saving; save the adapter again")
    return metadata


def _tensors(path: Path, header: dict, data: bytes, start: int) -> dict[str, torch.Tensor]:
    """Every tensor entry checked (dtype, shape, offsets inside the file, no overlap), then read."""
    end_of_data = len(data) - start
    tensors, spans = {}, []
    for name, entry in header.items():
        if not isinstance(entry, dict) or entry.get("dtype") not in DTYPES:
            raise AdapterStateError(f"{path}: corrupted header entry for '{name}' (unknown dtype or form)")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
                and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise AdapterStateError(f"{path}: corrupted header entry for '{name}' (shape or offsets)")
        begin, end = offsets
        size = ITEMSIZE[entry["dtype"]] * math.prod(shape)
        if not 0 <= begin <= end or end - begin != size:
            raise AdapterStateError(f"{path}: corrupted header entry for '{name}': offsets {offsets} do not hold a "
                                    f"{entry['dtype']} tensor of shape {shape}")
        if end > end_of_data:
            raise AdapterStateError(f"{path}: truncated: tensor '{name}' needs bytes up to {end} of the data section "
                                    f"but the file holds {end_of_data}")
        spans.append((begin, end, name))
        raw = bytearray(data[start + begin:start + end])
        tensors[name] = torch.frombuffer(raw, dtype=DTYPES[entry["dtype"]]).reshape(shape) if size else \
            torch.empty(shape, dtype=DTYPES[entry["dtype"]])
    spans.sort()
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise AdapterStateError(f"{path}: corrupted header: tensors '{a}' and '{b}' overlap")
    if (spans[-1][1] if spans else 0) != end_of_data:
        raise AdapterStateError(f"{path}: {end_of_data - (spans[-1][1] if spans else 0)} stray bytes after the "
                                "last tensor: not a file save_adapter wrote")
    return tensors


def _metadata_digest(metadata: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(metadata, sort_keys=True).encode()).hexdigest()


def _tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------- load

def load_adapter(model: nn.Module, path: str | Path | AdapterFile) -> nn.Module:
    """Load an adapter file: onto a base (a new fine-tune from the file's rules) or into a fine-tune.

    Loading is strict (every key present, none extra, same shapes and dtypes) and atomic: on any
    AdapterStateError the base and the target fine-tune are exactly as before. ``path`` may be an
    AdapterFile already read with ``read_adapter``.
    """
    adapter = path if isinstance(path, AdapterFile) else read_adapter(path)
    info = finetune_info(model)
    base = info.base if info is not None else model
    check_base(adapter, base)
    if info is not None:
        if info.rules.to_json() not in (adapter.rules.to_json(), held_storage_rules(adapter.rules, base).to_json()):
            raise AdapterStateError(f"{adapter.path}: was saved from a fine-tune with other rules than this one "
                                    f"({info.rules.source}); load it onto the base instead to rebuild it")
        _copy_into(model, adapter)
        return model
    try:
        return rewrite(base, held_storage_rules(adapter.rules, base), finish=lambda ft: _copy_into(ft, adapter))
    except PlanError as exc:
        raise AdapterStateError(f"{adapter.path}: its rules do not plan on this base: {exc}") from exc


_FINGERPRINTS: "weakref.WeakKeyDictionary[nn.Module, Fingerprint]" = weakref.WeakKeyDictionary()


def base_fingerprint(base: nn.Module) -> Fingerprint:
    """The base's fingerprint, computed once per base object (a frozen base keeps its weights).

    Computed on first use, perhaps before quantization: a fingerprint of one checkpoint matches it in
    every form it is held in, so the cached one stays valid when the base is quantized later.
    """
    cached = _FINGERPRINTS.get(base)
    if cached is None:
        cached = _FINGERPRINTS[base] = fingerprint(base)
    return cached


def held_storage_rules(rules: RuleSet, base: nn.Module) -> RuleSet:
    """The rules with their storage following the base where it is already quantized.

    Adapter tensors do not depend on how the base is stored, so a file saved on an fp32 base loads
    onto the same checkpoint held as int8 or nf4: a rule (or the default) whose only conflict is that
    it keeps an already-quantized module unquantized (C1) takes the scheme the base holds.
    """
    graph = base_graph(base)
    trial = make_plan(graph, rules, check=False)
    if not trial.violations or any(v.constraint != "C1" for v in trial.violations):
        return rules
    by_rule: dict[int, set[str]] = {}
    for v in trial.violations:
        decision = trial.decisions[v.module]
        by_rule.setdefault(decision.rule.index if decision.rule else 0, set()).add(graph.modules[v.module].quantized)
    if any(len(schemes) > 1 for schemes in by_rule.values()):
        return rules
    held = {index: QuantConfig(schemes.pop()) for index, schemes in by_rule.items()}
    new_rules = tuple(dataclasses.replace(r, quantize=held[r.index]) if r.index in held else r for r in rules.rules)
    return dataclasses.replace(rules, rules=new_rules, quantize=held.get(0, rules.quantize))


def check_base(adapter: AdapterFile, base: nn.Module) -> None:
    """Raise AdapterStateError unless ``base`` is the checkpoint the adapter was saved from."""
    if adapter.base_class and adapter.base_class != type(base).__name__:
        raise AdapterStateError(f"{adapter.path}: was saved on a {adapter.base_class} "
                                f"({adapter.base_model or 'unnamed'}), not a {type(base).__name__}; "
                                "load it onto the model it was trained on")
    why = adapter.fingerprint.mismatch(base_fingerprint(base))
    if why is not None:
        raise AdapterStateError(f"{adapter.path}: the base differs from the one it was saved on "
                                f"({adapter.base_model or adapter.base_class}): {why}")


def _copy_into(finetune: nn.Module, adapter: AdapterFile) -> None:
    """Check every key, shape and dtype first, then copy: a mismatch changes nothing."""
    own = own_state(finetune)
    unexpected = sorted(set(adapter.tensors) - set(own))
    missing = [name for name in own if name not in adapter.tensors]
    if unexpected or missing:
        parts = [f"{what} key '{keys[0]}'" + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else "")
                 for what, keys in (("unexpected", unexpected), ("missing", missing)) if keys]
        raise AdapterStateError(f"{adapter.path}: {'; '.join(parts)} — the file does not match the fine-tune its "
                                "rules build")
    for name, p in own.items():
        t = adapter.tensors[name]
        if tuple(t.shape) != tuple(p.shape):
            raise AdapterStateError(f"{adapter.path}: '{name}' has shape {tuple(t.shape)} but the fine-tune needs "
                                    f"{tuple(p.shape)}")
        if t.dtype != p.dtype:
            raise AdapterStateError(f"{adapter.path}: '{name}' is {t.dtype} but the fine-tune holds {p.dtype}")
    with torch.no_grad():
        for name, p in own.items():
            p.copy_(adapter.tensors[name])


def _require_finetune(model: nn.Module):
    info = finetune_info(model)
    if info is None:
        raise AdapterStateError(f"a {type(model).__name__} that is not a fine-tune; adapter state belongs to "
                                "fine-tunes made by surgery.rewrite or surgery.load_adapter")
    return info


def _version() -> str:
    from . import __version__

    return __version__


def own_load_state_dict(finetune: nn.Module):
    """``load_state_dict`` for a fine-tune: loads its own tensors only, never the base it shares.

    A full state dict (e.g. a Trainer checkpoint's model.safetensors) may name the base's tensors too;
    writing them through one fine-tune would change the base under every sibling, so they are
    skipped. Missing own tensors fail under ``strict``; a shape mismatch always fails, before any copy.
    """

    def load_state_dict(state_dict, strict: bool = True, assign: bool = False):
        own = own_state(finetune)
        missing = [k for k in own if k not in state_dict]
        if strict and missing:
            raise AdapterStateError(f"load_state_dict: missing '{missing[0]}'"
                                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                                    + " of this fine-tune's own tensors")
        for name, p in own.items():
            if name in state_dict and tuple(state_dict[name].shape) != tuple(p.shape):
                raise AdapterStateError(f"load_state_dict: '{name}' has shape {tuple(state_dict[name].shape)}, "
                                        f"the fine-tune needs {tuple(p.shape)}")
        with torch.no_grad():
            for name, p in own.items():
                if name in state_dict:
                    p.copy_(state_dict[name])
        known = {n for n, _ in finetune.named_parameters(remove_duplicate=False)}
        known |= {n for n, _ in finetune.named_buffers(remove_duplicate=False)}
        unexpected = [k for k in state_dict if k not in known and not _bnb_state_key(k, known)]
        return nn.modules.module._IncompatibleKeys(missing, unexpected)

    return load_state_dict


def _bnb_state_key(key: str, known: set[str]) -> bool:
    """bitsandbytes' extra state-dict entries (weight.SCB, weight.quant_state..., absmax, ...) of a known weight."""
    owner = key.split(".weight.", 1)[0] + ".weight" if ".weight." in key else None
    return owner in known
