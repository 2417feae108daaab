"""export_peft --for vllm / lorax: every refusal names what to change, nothing is written, a clean export passes."""

from __future__ import annotations

import json

import pytest
from test_state import trained
from typer.testing import CliRunner

import surgery
from surgery import ExportError
from surgery.base.tiny import tiny_model
from surgery_cli.app import app

runner = CliRunner()


def adapt(match="*_proj", **lora):
    rule = {"match": match, "action": "adapt", "lora": {"r": 8, "alpha": 16, **lora}}
    return {"quantize": "none", "default": "freeze", "rules": [rule]}


REFUSED = [  # (target, model, rules, what the message must say)
    (
        "vllm",
        "tiny-llama",
        {**adapt(), "rules": [*adapt()["rules"], {"match": "lm_head", "action": "plain", "untie": True}]},
        "lm_head: trained in full",
    ),
    ("vllm", "tiny-llama", adapt(bias=True), "has a LoRA bias"),
    ("vllm", "tiny-llama", adapt(r=600, alpha=1200), "rank 600 is above the largest --max-lora-rank"),
    (
        "vllm",
        "tiny-gpt2",
        {**adapt(), "rules": [{"match": "transformer.wpe", "action": "adapt"}]},
        "transformer.wpe: vLLM serves LoRA on",
    ),
    ("vllm", "tiny-gpt2", {**adapt("*c_attn"), "rules": [{"match": "*c_attn", "action": "adapt"}]}, "Conv1D"),
    (
        "vllm",
        "tiny-llama",
        {
            **adapt(),
            "rules": [
                {"match": "*q_proj", "action": "adapt", "lora": {"r": 8, "alpha": 16}},
                {"match": "*v_proj", "action": "adapt", "lora": {"r": 8, "alpha": 8}},
            ],
        },
        "scales its LoRA by 1",
    ),
    ("lorax", "tiny-opt", adapt(), "no LoRA target modules for model type 'opt'"),
    (
        "lorax",
        "tiny-llama",
        {**adapt(), "rules": [{"match": "model.embed_tokens", "action": "adapt"}]},
        "model.embed_tokens: LoRAX adapts only",
    ),
]


@pytest.mark.parametrize(
    "target,model,rules,message",
    REFUSED,
    ids=["plain", "bias", "rank", "target", "conv1d", "scaling", "lorax-arch", "lorax-target"],
)
def test_an_export_a_server_would_refuse_is_refused_before_writing(tmp_path, target, model, rules, message):
    ft = surgery.rewrite(tiny_model(model), rules)
    with pytest.raises(ExportError, match=message):
        surgery.export_peft(ft, tmp_path / "out", target=target)
    assert not (tmp_path / "out").exists()


def test_a_clean_export_passes_for_every_target_and_the_cli_prints_the_vllm_flags(tmp_path):
    ft = trained(surgery.rewrite(tiny_model("tiny-llama"), "qv_lora"))
    for target in ("peft", "vllm", "lorax"):
        surgery.export_peft(ft, tmp_path / target, target=target)
        assert json.loads((tmp_path / target / "adapter_config.json").read_text())["modules_to_save"] is None
    path = surgery.save_adapter(ft, tmp_path / "qv.safetensors")
    result = runner.invoke(app, ["export-peft", str(path), "--out", str(tmp_path / "cli"), "--for", "vllm"])
    assert result.exit_code == 0, result.output
    assert "--enable-lora --max-lora-rank 8" in result.stdout
    refused = runner.invoke(app, ["export-peft", str(path), "--out", str(tmp_path / "x"), "--for", "tgi"])
    assert refused.exit_code == 2 and "unknown export target 'tgi'; choose one of peft, vllm, lorax" in refused.output
    assert not (tmp_path / "x").exists()


def test_launch_hints_round_the_rank_up_to_a_value_vllm_accepts():
    from surgery.files.serving import launch_hints

    assert launch_hints({"r": 12, "rank_pattern": {"a": 2}}, "vllm") == ["--enable-lora", "--max-lora-rank 16"]
    assert launch_hints({"r": 300}, "vllm")[1] == "--max-lora-rank 320"
    assert launch_hints({"r": 8}, "peft") == []
