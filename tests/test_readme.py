"""The README's "Using surgery with ..." Python blocks run as written (tiny models, a few steps)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

import surgery
from surgery.data import read_examples, tokenize

README = Path(__file__).resolve().parent.parent / "README.md"


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}")
    return text[start:text.index("\n## ", start + 1)]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_the_using_surgery_with_snippets_run_and_say_true_things(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks(section("Using surgery with ..."))
    assert len(blocks) == 3  # Trainer, PEFT, vLLM
    data = tokenize(read_examples("upper"), surgery.tiny_tokenizer(), block_size=24)
    rows = [{k: v[i] for k, v in data.batch(torch.arange(len(data))).items()} for i in range(len(data))]
    scope = {"rows": rows}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT and transformers chatter; surgery's own warnings would show
        for block in blocks:
            exec(compile(block, str(README), "exec"), scope)
    ft, twin, again = scope["ft"], scope["twin"], scope["again"]
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ft.eval()(ids).logits  # Trainer leaves it in train mode (dropout)
        for model in (twin, again):  # int8 bases quantized alike: bit for bit
            assert torch.equal(model.eval()(ids).logits, expected)
    assert (tmp_path / "runs/trainer/adapter.safetensors").is_file()
    assert not (tmp_path / "runs/trainer/config.json").exists()  # never the base model
    assert (tmp_path / "runs/qv-vllm/adapter_config.json").is_file()
