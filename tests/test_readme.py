"""Every Python block of the README runs as written (each section's blocks in order, in a fresh namespace),
raises no surgery warning, and what its comments claim holds."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

from surgery.errors import SurgeryWarning

README = Path(__file__).resolve().parent.parent / "README.md"
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def sections() -> dict[str, list[str]]:
    """The Python blocks of each ``## `` section, by title."""
    out: dict[str, list[str]] = {}
    for part in re.split(r"^## ", README.read_text(), flags=re.M)[1:]:
        title, _, body = part.partition("\n")
        blocks = re.findall(r"```python\n(.*?)```", body, re.S)
        if blocks:
            out[title.strip()] = blocks
    return out


def run_section(title: str, tmp_path: Path, monkeypatch) -> dict:
    """Run a section's blocks in order in one namespace, in a temporary folder; surgery's warnings are errors."""
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT and transformers chatter
        warnings.simplefilter("error", SurgeryWarning)  # e.g. a SharedBaseWarning means the example is wrong
        for block in sections()[title]:
            exec(compile(block, f"{README} ({title})", "exec"), scope)
    return scope


def test_every_python_block_belongs_to_a_tested_section():
    found = sections()
    assert set(found) == {
        "Quickstart",
        "Adapter files, merge, PEFT, export",
        "Many fine-tunes, one base pass",
        "Using surgery with ...",
    }
    assert sum(len(b) for b in found.values()) == README.read_text().count("```python")


def test_quickstart(tmp_path, monkeypatch):
    scope = run_section("Quickstart", tmp_path, monkeypatch)
    ft1, ft2, model = scope["ft1"], scope["ft2"], scope["model"]
    fc1 = model.model.decoder.layers[0].fc1
    assert type(fc1).__name__ == "Linear8bitLt"
    for ft in (ft1, ft2):  # the same int8 base under both (all_linear_lora adapts fc1 over it)
        layer = ft.model.decoder.layers[0].fc1
        assert getattr(layer, "base_layer", layer).weight is fc1.weight
    assert scope["plan"].ok and scope["ft"] is not None


def test_adapter_files_merge_peft_export(tmp_path, monkeypatch):
    scope = run_section("Adapter files, merge, PEFT, export", tmp_path, monkeypatch)
    ft1, ft3, ft4 = scope["ft1"], scope["ft3"], scope["ft4"]
    with torch.no_grad():
        expected = ft1(scope["input_ids"]).logits
        assert torch.equal(scope["logits"], expected)  # the exported program, as the comment says
        for again in (ft3, ft4):
            assert torch.equal(again(IDS).logits, ft1(IDS).logits)
    assert (tmp_path / "merged" / "config.json").is_file() and (tmp_path / "ft1" / "adapter_config.json").is_file()


def test_many_finetunes_one_base_pass(tmp_path, monkeypatch):
    scope = run_section("Many fine-tunes, one base pass", tmp_path, monkeypatch)
    ft1, ft2, ids = scope["ft1"], scope["ft2"], scope["ids"]
    assert [run.step for run in scope["runs"]] == [10, 10]
    assert len(scope["answers"]) == 3 and all(len(a) == 2 for a in scope["answers"])
    with torch.no_grad():
        for rows, ft in ((slice(0, 4), ft1), (slice(4, 8), ft2)):
            alone = ft.eval()(input_ids=ids[rows]).logits
            assert (scope["logits"][rows] - alone).abs().max() <= 1e-5 * alone.abs().max()


def test_using_surgery_with(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    scope = run_section("Using surgery with ...", tmp_path, monkeypatch)
    ft, twin, again = scope["ft"], scope["twin"], scope["again"]
    with torch.no_grad():
        expected = ft.eval()(IDS).logits  # Trainer leaves it in train mode (dropout)
        for model in (twin, again):  # int8 bases quantized alike: bit for bit
            assert torch.equal(model.eval()(IDS).logits, expected)
    assert (tmp_path / "runs/trainer/adapter.safetensors").is_file()
    assert not (tmp_path / "runs/trainer/config.json").exists()  # never the base model
    assert (tmp_path / "runs/qv-vllm/adapter_config.json").is_file()
