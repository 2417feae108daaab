"""merge: a plain model of the base's class with LoRA folded in, equal to the fine-tune."""

from __future__ import annotations

import pytest
import torch
import transformers
from test_state import INPUTS, tensors_of, trained

import surgery
from surgery.base.tiny import tiny_model
from surgery.finetune.merging import output_error
from surgery.layers.lora import LoraLayer
from surgery.model.architectures import TINY_MODELS

FP32_ALL = {
    "quantize": "none",
    "default": "freeze",
    "rules": [
        {"match": "*", "type": "linear", "action": "adapt", "lora": {"r": 4, "alpha": 8}},
        {"match": "*", "type": "conv1d", "action": "adapt", "optional": True},
        {"match": "*", "type": "embedding", "action": "adapt", "optional": True, "lora": {"r": 2, "alpha": 4}},
    ],
}


@pytest.mark.parametrize("model", list(TINY_MODELS))
def test_merged_fp32_model_reloads_with_plain_transformers_to_the_same_outputs(tmp_path, model):
    base = tiny_model(model)
    ft = trained(surgery.rewrite(base, FP32_ALL))
    before = tensors_of(base)
    merged = surgery.merge(ft)
    assert type(merged) is type(base)
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    assert surgery.finetune_info(merged) is None
    assert output_error(ft, merged, INPUTS)["max_rel"] <= 1e-5
    merged.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert output_error(ft, reloaded, INPUTS)["max_rel"] <= 1e-5
    after = tensors_of(base)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the base is untouched
    assert merged.config is not base.config


@pytest.mark.parametrize("rules", ["qv_lora", "qlora_nf4", "finetuna_default"])
def test_merging_a_quantized_finetune_dequantizes_and_reports_its_error(tmp_path, rules):
    """Against the quantized fine-tune the merge differs by the activation/weight quantization error (measured)."""
    base = tiny_model("tiny-llama")
    reference = tiny_model("tiny-llama")
    ft = trained(surgery.rewrite(base, rules), scale=0.01)
    merged = surgery.merge(ft)
    assert all(not type(m).__module__.startswith("bitsandbytes") for m in merged.modules())
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    error = output_error(ft, merged, INPUTS)["max_rel"]
    bound = 0.05 if rules != "qlora_nf4" else 0.35  # what the fp32 reference vs the quantized base shows
    assert 0 < error < bound
    assert output_error(reference, base, INPUTS)["max_rel"] > 0  # the quantized base itself differs likewise
    merged.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert output_error(merged, reloaded, INPUTS)["max_abs"] == 0


def test_a_broken_tie_is_written_into_the_config():
    base = tiny_model("tiny-opt")
    assert base.config.tie_word_embeddings
    ft = trained(
        surgery.rewrite(
            base, {"quantize": "none", "default": "freeze", "rules": [{"match": "embed_tokens", "action": "adapt"}]}
        )
    )
    merged = surgery.merge(ft)
    assert merged.config.tie_word_embeddings is False and base.config.tie_word_embeddings
    assert not torch.equal(merged.lm_head.weight, merged.model.decoder.embed_tokens.weight)
    assert torch.equal(merged.lm_head.weight, base.lm_head.weight)


def test_requantize_quantizes_as_the_base_held_and_the_added_error_is_small():
    base = tiny_model("tiny-opt")
    ft = trained(surgery.rewrite(base, "qv_lora"), scale=0.01)
    dense = surgery.merge(ft)
    requantized = surgery.merge(ft, requantize=True)
    held = {n for n, m in base.named_modules() if type(m).__module__.startswith("bitsandbytes")}
    again = {n for n, m in requantized.named_modules() if type(m).__module__.startswith("bitsandbytes")}
    assert held == again and held
    added = output_error(dense, requantized, INPUTS)["max_rel"]
    assert 0 < added < 0.05


def test_merge_to_another_dtype():
    ft = trained(surgery.rewrite(tiny_model("tiny-gpt2"), FP32_ALL))
    merged = surgery.merge(ft, dtype=torch.bfloat16)
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    assert output_error(ft, merged, INPUTS)["max_rel"] < 0.05


def test_a_lora_bias_on_a_bias_free_layer_is_refused_before_any_work():
    ft = surgery.rewrite(
        tiny_model("tiny-llama"),
        {
            "quantize": "none",
            "default": "freeze",
            "rules": [{"match": "q_proj", "action": "adapt", "lora": {"bias": True}}],
        },
    )
    with pytest.raises(surgery.MergeError, match="q_proj: its adapter has a bias"):
        surgery.merge(ft)
    with pytest.raises(surgery.MergeError, match="not a fine-tune"):
        surgery.merge(tiny_model("tiny-llama"))


def test_a_gpt2_fine_tune_of_a_base_quantized_before_it_merges_back_into_conv1d_layers(tmp_path):
    """GPT-2's Conv1D stored as a bitsandbytes Linear stays a conv1d to the plan (it was planned as 'linear' once
    the base was quantized, and the merge wrote nn.Linear weights that transformers could not load)."""
    from transformers.pytorch_utils import Conv1D

    base = tiny_model("tiny-gpt2")
    surgery.rewrite(base, "qlora_nf4")  # the first fine-tune quantizes the base
    ft = trained(surgery.rewrite(base, "qlora_nf4"), scale=0.01)
    assert {d.kind for p, d in surgery.finetune_info(ft).plan.decisions.items() if "attn.c_" in p} == {"conv1d"}
    merged = surgery.merge(ft)
    assert isinstance(merged.get_submodule("transformer.h.0.attn.c_attn"), Conv1D)
    merged.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert output_error(merged, reloaded, INPUTS)["max_abs"] == 0
