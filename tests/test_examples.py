"""Every script in examples/ runs (tiny models, CPU) and shows what it claims."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.py"))


def test_there_are_examples():
    assert {p.stem for p in EXAMPLES} >= {"finetuna_loop", "qlora_walkthrough", "many_finetunes", "trainer"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs(path, capsys):
    scope = runpy.run_path(str(path), run_name="__main__")
    printed = capsys.readouterr().out
    if path.stem == "finetuna_loop":
        losses = [float(line.split()[-1]) for line in printed.splitlines() if line.startswith("step")]
        assert losses[-1] < losses[0] / 2
    if path.stem == "qlora_walkthrough":
        assert "int8  base" in printed and "nf4   base" in printed and "r * (in + out)" in printed
    if path.stem == "many_finetunes":
        assert printed.count("adapter file") == 2
    if path.stem == "trainer":
        assert Path(scope["out"], "adapter.safetensors").exists()
