"""Quantize while loading: a checkpoint loaded with rules is bit-identical to loading it whole and quantizing after,
is never planned wrong, and leaves nothing of transformers' quantizer on the base."""

from __future__ import annotations

import importlib

import pytest
import torch

import surgery
from surgery.base.loading import load_model, tiny_model
from surgery.base.shared_base import prepare_base
from surgery.errors import PlanError
from surgery.layers.bnb import is_bnb_layer, state_tensors
from surgery.model.architectures import TINY_MODELS
from surgery.rules.ruleset import bundled_rules

rewrite_module = importlib.import_module("surgery.base.shared_base")  # where the base is quantized
RULE_FILES = sorted(bundled_rules())
MIXED = """
version: 1
quantize: {scheme: nf4, double_quant: true, blocksize: 128}
default: quantize
rules:
  - match: "*.mlp.*"
    action: quantize
    quantize: {scheme: int8, threshold: 6.0}
  - match: q_proj
    action: adapt
    quantize: {scheme: fp4, compute_dtype: bfloat16, blocksize: 32}
  - match: lm_head
    action: freeze
"""


def exact_digest(model) -> dict:
    """Every parameter, buffer and quantization-state tensor of a model, as bytes by name."""
    out = {}
    for key, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        for i, part in enumerate([t, *state_tensors(t)]):
            out[f"{key}#{i}"] = (
                part.dtype,
                tuple(part.shape),
                part.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes(),
            )
    return out


def checkpoint(tmp_path, name: str, dtype=torch.float32, **save):
    folder = tmp_path / f"{name}-{str(dtype)[6:]}"
    tiny_model(name).to(dtype).save_pretrained(folder, **save)
    return folder


def in_place_paths(monkeypatch) -> list[str]:
    """Record which modules are quantized in place (after loading) rather than while loading."""
    seen: list[str] = []
    real = rewrite_module.quantize_base

    def spy(model, plan, progress=None):
        seen.extend(d.path for d in plan.quantized)
        return real(model, plan, progress)

    monkeypatch.setattr(rewrite_module, "quantize_base", spy)
    return seen


def load_then_quantize(folder, rules):
    base = load_model(str(folder)).model
    prepare_base(base, rules)
    return base


def tied_paths(model) -> set[str]:
    return {name.rpartition(".")[0] for group in surgery.trace(model).ties for name in group}


@pytest.mark.parametrize("rules", RULE_FILES)
@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_quantized_while_loading_equals_loading_then_quantizing(tmp_path, monkeypatch, name, rules):
    folder = checkpoint(tmp_path, name)
    reference = load_then_quantize(folder, rules)
    in_place = in_place_paths(monkeypatch)
    loaded = load_model(str(folder), rules=rules).model
    assert exact_digest(loaded) == exact_digest(reference)
    assert set(in_place) <= tied_paths(tiny_model(name))  # only tied weights wait for transformers' tying
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded(ids).logits, reference(ids).logits)
    assert getattr(loaded, "hf_quantizer", None) is None and not getattr(loaded, "is_quantized", False)
    assert getattr(loaded.config, "quantization_config", None) is None
    ft = surgery.rewrite(loaded, rules)  # a fine-tune of the loaded base quantizes nothing more
    assert exact_digest(loaded) == exact_digest(reference) and ft is not None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rules", ["qlora_nf4", "qv_lora", "finetuna_default"])
def test_fp16_bf16_and_sharded_checkpoints_quantize_alike_while_loading(tmp_path, monkeypatch, dtype, rules):
    folder = checkpoint(tmp_path, "tiny-llama", dtype, max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").is_file()  # several shards and their index
    reference = load_then_quantize(folder, rules)
    in_place = in_place_paths(monkeypatch)
    loaded = load_model(str(folder), rules=rules).model
    assert exact_digest(loaded) == exact_digest(reference)
    assert not in_place  # tiny-llama's embedding and lm_head are not tied
    assert loaded.model.norm.weight.dtype == dtype


def test_one_base_of_int8_nf4_and_fp4_with_other_blocksizes_loads_quantized(tmp_path, write_rules, monkeypatch):
    rules = write_rules(MIXED)
    folder = checkpoint(tmp_path, "tiny-llama", torch.bfloat16)
    reference = load_then_quantize(folder, rules)
    in_place = in_place_paths(monkeypatch)
    loaded = load_model(str(folder), rules=rules).model
    assert exact_digest(loaded) == exact_digest(reference) and not in_place
    layer = loaded.model.layers[0]
    assert type(layer.mlp.up_proj).__name__ == "Linear8bitLt"
    assert layer.self_attn.q_proj.weight.quant_type == "fp4" and layer.self_attn.q_proj.compute_dtype == torch.bfloat16
    assert layer.self_attn.k_proj.weight.quant_state.blocksize == 128
    assert type(loaded.model.embed_tokens).__name__ == "Embedding4bit" and not is_bnb_layer(loaded.lm_head)


def test_a_tied_embedding_quantized_both_ways_matches_after_loading(tmp_path, monkeypatch):
    folder = checkpoint(tmp_path, "tiny-opt")  # OPT ties lm_head to the input embedding
    reference = load_then_quantize(folder, "finetuna_default")
    in_place = in_place_paths(monkeypatch)
    loaded = load_model(str(folder), rules="finetuna_default").model
    assert in_place and set(in_place) <= tied_paths(tiny_model("tiny-opt"))
    assert exact_digest(loaded) == exact_digest(reference)


def test_the_plan_fails_before_any_weight_is_read(tmp_path, write_rules, monkeypatch):
    from transformers import AutoModelForCausalLM

    folder = checkpoint(tmp_path, "tiny-llama")
    bad = write_rules("version: 1\nquantize: nf4\nrules:\n  - match: q_projj\n    action: adapt\n")

    def never(*args, **kwargs):
        raise AssertionError("from_pretrained ran although the plan was refused")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", never)
    with pytest.raises(PlanError, match="q_projj"):
        load_model(str(folder), rules=bad)


def test_the_cpu_repack_stays_off_on_a_base_loaded_quantized(tmp_path):
    folder = checkpoint(tmp_path, "tiny-llama")
    loaded = load_model(str(folder), rules="qlora_nf4").model
    with torch.no_grad():
        loaded(torch.tensor([[1, 2, 3]]))  # an eval-mode forward is where bitsandbytes would repack
    layers = [m for m in loaded.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)


def test_tiny_models_and_several_rule_files_are_quantized_as_prepare_base_does(digest):
    loaded = load_model("tiny-llama", rules=["qv_lora", "lora_plus_head"]).model
    reference = tiny_model("tiny-llama")
    prepare_base(reference, "qv_lora", "lora_plus_head")
    assert digest(loaded) == digest(reference)
    as_data = {"quantize": "nf4", "default": "quantize", "rules": []}  # a rule file given as its content
    loaded = load_model("tiny-llama", rules=as_data).model
    assert type(loaded.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"


def test_a_4bit_base_computes_in_the_rule_files_dtype_or_the_devices_default():
    from surgery.rules.rule_file import load_rules

    assert load_rules("qlora_nf4").with_compute_dtype("bfloat16").quantize.compute_dtype == "bfloat16"
    written = surgery.rules.rule_file.parse_rules({"quantize": {"scheme": "nf4", "compute_dtype": "float32"}})
    assert written.with_compute_dtype("bfloat16").quantize.compute_dtype == "float32"  # the file's own wins
    null = surgery.rules.rule_file.parse_rules({"quantize": {"scheme": "nf4", "compute_dtype": None}})
    assert null.with_compute_dtype("bfloat16").quantize.compute_dtype is None
    open_rules = surgery.rules.shorthand.shorthand_rules(["q_proj"], r=4, alpha=None, dropout=0.0, quantize="nf4")
    assert open_rules.quantize.compute_dtype is None
    assert open_rules.with_compute_dtype("bfloat16").quantize.compute_dtype == "bfloat16"
    loaded = load_model("tiny-llama", rules=open_rules, device="cpu").model  # the CPU keeps the input's dtype
    assert loaded.model.layers[0].self_attn.k_proj.compute_dtype == torch.float32
