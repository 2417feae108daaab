"""Reading an adapter file through safetensors.safe_open: the tensors are copies (no file kept open or mapped, a later
write to the file changes nothing loaded), and every malformed header is refused with surgery's own message,
naming the file, before safetensors sees it."""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import pytest
import torch

import surgery
from surgery.base.ownership import own_state
from surgery.base.tiny import tiny_model
from surgery.errors import AdapterStateError


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A fine-tune with non-zero adapters, its own tensors as saved, and its adapter file."""
    ft = surgery.rewrite(tiny_model("tiny-opt"), "qv_lora")
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in ft.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator))
    tensors = {k: v.detach().clone() for k, v in own_state(ft).items()}
    return tensors, surgery.save_adapter(ft, tmp_path_factory.mktemp("saved") / "good.safetensors")


def _parts(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def _crafted(path: Path, header: dict, body: bytes) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)
    return path


def _opened_by_this_process(path: Path) -> list[str]:
    """Mappings and open descriptors of ``path`` in this process (Linux /proc)."""
    real = str(path.resolve())
    maps = [line for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith(real)]
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == real:
                fds.append(fd)
        except OSError:
            pass
    return maps + fds


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc (Linux)")
def test_a_read_adapter_holds_copies_no_file_and_a_later_write_changes_nothing(saved, tmp_path):
    tensors, good = saved
    path = tmp_path / "a.safetensors"
    path.write_bytes(good.read_bytes())
    adapter = surgery.read_adapter(path)
    assert adapter.tensors.keys() == tensors.keys()
    assert all(torch.equal(adapter.tensors[k], tensors[k]) for k in tensors)
    assert _opened_by_this_process(path) == []
    (length,) = struct.unpack("<Q", path.read_bytes()[:8])
    with open(path, "r+b") as f:  # in place, as a careless tool would: same inode, every data byte changed
        f.seek(8 + length)
        f.write(b"\xff" * (path.stat().st_size - 8 - length))
    assert all(torch.equal(adapter.tensors[k], tensors[k]) for k in tensors)
    with pytest.raises(AdapterStateError, match="checksum mismatch"):  # the file itself is now corrupt
        surgery.read_adapter(path)


def _overlap(header):
    a, b = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])[:2]
    begin, end = header[b]["data_offsets"]
    header[b]["data_offsets"] = [begin - 4, end - 4]
    return header


def _first(header) -> str:
    return min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _retyped(header):
    name = _first(header)
    entry = header[name]
    entry["dtype"], entry["shape"] = "F8_E4M3", [entry["shape"][0] * 4, *entry["shape"][1:]]  # safetensors reads it
    return header


def _shifted(header):  # every tensor 4 bytes later, the first 4 bytes of the data section unused
    for name, entry in header.items():
        if name != "__metadata__":
            entry["data_offsets"] = [o + 4 for o in entry["data_offsets"]]
    return header


CASES = {
    "overlapping offsets": (_overlap, lambda body: body, "tensors '.*' and '.*' overlap"),
    "offsets beyond the file": (_shifted, lambda body: body, "truncated: tensor '.*' needs bytes up to"),
    "unused bytes first": (_shifted, lambda body: b"\0" * 4 + body, "4 unused bytes before the first tensor"),
    "stray bytes": (lambda h: h, lambda body: body + b"junk", "4 stray bytes after the last tensor"),
    "a dtype surgery never writes": (_retyped, lambda body: body, "corrupted header entry for .*unknown dtype or form"),
    "a shape the offsets do not hold": (
        lambda h: h[_first(h)].__setitem__("shape", [1]) or h,
        lambda body: body,
        "offsets .* do not hold a F32 tensor of shape \\[1\\]",
    ),
    "a header that is a list": (lambda h: [h], lambda body: body, "a JSON list, not an object"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_malformed_header_gets_surgerys_message_naming_the_file(saved, tmp_path, case):
    change_header, change_body, message = CASES[case]
    _, good = saved
    header, body = _parts(good)
    path = _crafted(tmp_path / "bad.safetensors", change_header(header), change_body(body))
    with pytest.raises(AdapterStateError, match=message) as info:
        surgery.read_adapter(path)
    assert str(path) in str(info.value)


def test_a_header_beyond_the_limit_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "huge-header.safetensors"
    length = 17 << 20
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", length) + b"{")
        f.truncate(8 + length)  # holes: the file holds every byte the header claims
    with pytest.raises(
        AdapterStateError, match=f"{re.escape(str(path))}: header of {length} bytes is larger than any adapter"
    ):
        surgery.read_adapter(path)


def test_what_safetensors_itself_refuses_is_still_an_adapter_error_naming_the_file(saved, tmp_path, monkeypatch):
    """Past surgery's header checks (skipped here), safetensors' own refusal becomes an AdapterStateError too."""
    import surgery.files.adapter_file as adapter_file

    _, good = saved
    header, body = _parts(good)
    path = _crafted(tmp_path / "overlap.safetensors", _overlap(header), body)
    monkeypatch.setattr(adapter_file, "_check_entries", lambda *args: None)
    with pytest.raises(AdapterStateError, match="not a readable safetensors file .*invalid offset") as info:
        surgery.read_adapter(path)
    assert str(info.value).startswith(f"{path}: ")
