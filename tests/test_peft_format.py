"""PEFT's adapter format both ways, checked against PEFT itself."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from test_state import logits, trained

import surgery
from surgery import AdapterStateError
from surgery.base.tiny import tiny_model
from surgery.files.model_card import CPU_KERNEL_LINE
from surgery.model.architectures import TINY_MODELS

peft = pytest.importorskip("peft")

MIXED = {
    "quantize": "none",
    "default": "freeze",
    "rules": [
        {
            "match": "re:.*(layers|h)\\.0\\..*(q_proj|c_attn)",
            "action": "adapt",
            "lora": {"r": 4, "alpha": 8, "bias": True},
        },
        {
            "match": "*",
            "type": "linear",
            "action": "adapt",
            "optional": True,
            "lora": {"r": 8, "alpha": 16, "bias": True},
        },
        {"match": "lm_head", "action": "plain", "untie": True},
        {
            "match": "*",
            "type": "conv1d",
            "action": "adapt",
            "optional": True,
            "lora": {"r": 2, "alpha": 3, "bias": True},
        },
    ],
}
WITH_EMBEDDING = {
    "quantize": "none",
    "default": "freeze",
    "rules": [
        {
            "match": "*",
            "type": "embedding",
            "action": "adapt",
            "optional": True,
            "lora": {"r": 2, "alpha": 3, "use_rslora": True},
        },
        {
            "match": "*",
            "type": "linear",
            "action": "adapt",
            "optional": True,
            "lora": {"r": 8, "alpha": 16, "use_rslora": True},
        },
        {
            "match": "*",
            "type": "conv1d",
            "action": "adapt",
            "optional": True,
            "lora": {"r": 8, "alpha": 16, "use_rslora": True},
        },
    ],
}


def peft_model(base, folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base, folder)


@pytest.mark.parametrize("rules", [MIXED, WITH_EMBEDDING], ids=["ranks-bias-plain", "embedding-rslora"])
@pytest.mark.parametrize("model", list(TINY_MODELS))
def test_export_loads_in_peft_with_the_same_outputs_and_imports_back(tmp_path, model, rules):
    ft = trained(surgery.rewrite(tiny_model(model), rules))
    surgery.export_peft(ft, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == model
    twin = peft_model(tiny_model(model), tmp_path / "peft")
    expected = logits(ft)
    got = logits(twin)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    twin.save_pretrained(tmp_path / "peft-saved")  # PEFT's own writing, read back by us
    back = surgery.import_peft(tiny_model(model), tmp_path / "peft-saved")
    assert (logits(back) - got).abs().max() <= 1e-5 * got.abs().max()


@pytest.mark.parametrize("rules", ["qv_lora", "qlora_nf4"])
def test_export_and_import_on_a_quantized_base_match_peft_on_that_base(tmp_path, rules):
    base = tiny_model("tiny-opt")
    ft = trained(surgery.rewrite(base, rules))
    surgery.export_peft(ft, tmp_path / "peft")
    expected = logits(ft)
    other = tiny_model("tiny-opt")
    surgery.rewrite(other, rules)  # the same checkpoint, quantized the same way, for PEFT to wrap in place
    twin = peft_model(other, tmp_path / "peft")
    assert torch.equal(logits(twin), expected)
    imported = surgery.import_peft(base, tmp_path / "peft")
    assert torch.equal(logits(imported), expected)
    info = surgery.finetune_info(imported)
    assert info.plan.decisions["model.decoder.layers.0.self_attn.q_proj"].storage == (
        "int8" if rules == "qv_lora" else "nf4"
    )


@pytest.mark.parametrize("rules", ["qv_lora", "qlora_nf4", MIXED], ids=["int8", "nf4", "unquantized"])
def test_the_exports_card_says_how_to_load_the_base_for_the_same_outputs_in_transformers(tmp_path, rules):
    """The README's from_pretrained call (BitsAndBytesConfig included), run as written, then PEFT: equal logits."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_model("tiny-opt").save_pretrained(tmp_path / "base")
    base = surgery.load_model(str(tmp_path / "base")).model
    ft = trained(surgery.rewrite(base, rules))
    ft.eval()
    surgery.export_peft(ft, tmp_path / "peft")
    card = (tmp_path / "peft" / "README.md").read_text()
    call = re.search(r"^base = (AutoModelForCausalLM\.from_pretrained\(.*\))$", card, re.M).group(1)
    assert ("quantization_config" in call) == (rules is not MIXED)
    loaded = eval(
        call, {"AutoModelForCausalLM": AutoModelForCausalLM, "BitsAndBytesConfig": BitsAndBytesConfig, "torch": torch}
    )
    if "load_in_4bit" in call:  # the card's next line: bitsandbytes' CPU repack (AVX512-BF16) off, as surgery has it
        assert CPU_KERNEL_LINE in card
        exec(CPU_KERNEL_LINE, {"base": loaded})
    assert torch.equal(logits(peft_model(loaded, tmp_path / "peft")), logits(ft))
    if rules is not MIXED:  # the same adapter on the base loaded unquantized: other outputs, as the card says
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
        assert not torch.allclose(logits(peft_model(plain, tmp_path / "peft")), logits(ft), atol=1e-3)
        assert "differ by the quantization error" in card


def test_import_of_a_peft_trained_adapter_matches_peft(tmp_path):
    """An adapter made by PEFT itself (its own init, per-module rank), not by our export."""
    base = tiny_model("tiny-llama")
    config = peft.LoraConfig(
        r=4,
        lora_alpha=12,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"down_proj": 2},
        alpha_pattern={"v_proj": 5},
        init_lora_weights="gaussian",
        modules_to_save=["lm_head"],
    )
    twin = peft.get_peft_model(tiny_model("tiny-llama"), config)
    trained(twin)  # lora_B leaves zero, as training would
    twin.save_pretrained(tmp_path)
    expected = logits(twin)
    ft = surgery.import_peft(base, tmp_path)
    assert (logits(ft) - expected).abs().max() <= 1e-5 * expected.abs().max()
    down = ft.model.layers[0].mlp.down_proj
    assert down.config.r == 2 and ft.model.layers[0].self_attn.v_proj.config.lora_alpha == 5


@pytest.mark.parametrize(
    "field,value,message",
    [
        (
            "use_dora",
            True,
            "sets use_dora but .* has no lora_magnitude_vector",
        ),  # DoRA reads; a folder without its magnitudes does not
        ("use_qalora", True, "QA-LoRA"),
        ("peft_type", "IA3", "'IA3' is not supported"),
        ("bias", "all", "bias='all'"),
        ("layer_replication", [[0, 1]], "layer replication"),
    ],
)
def test_unsupported_peft_features_are_refused(tmp_path, field, value, message):
    ft = trained(surgery.rewrite(tiny_model("tiny-opt"), "qv_lora"))
    surgery.export_peft(ft, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config[field] = value
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    base = tiny_model("tiny-opt")
    with pytest.raises(AdapterStateError, match=message):
        surgery.import_peft(base, tmp_path)
    assert not any(type(m).__module__.startswith("bitsandbytes") for m in base.modules())


def test_unknown_tensors_in_a_peft_folder_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    ft = trained(surgery.rewrite(tiny_model("tiny-opt"), "qv_lora"))
    surgery.export_peft(ft, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(64)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(AdapterStateError, match="lora_magnitude_vector"):
        surgery.import_peft(tiny_model("tiny-opt"), tmp_path)


def test_exports_peft_cannot_express_are_refused(tmp_path):
    ft = surgery.rewrite(
        tiny_model("tiny-opt"),
        {
            "quantize": "none",
            "default": "freeze",
            "rules": [
                {"match": "q_proj", "action": "adapt", "lora": {"bias": True}},
                {"match": "embed_tokens", "action": "adapt"},
            ],
        },
    )
    with pytest.raises(AdapterStateError, match="lora_bias is one switch"):
        surgery.export_peft(ft, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_base_transformers_cannot_store_the_same_way_is_loaded_with_surgery():
    from surgery.layers.bnb import base_loading

    base = tiny_model("tiny-opt")
    surgery.rewrite(
        base,
        {
            "quantize": {"scheme": "nf4", "blocksize": 128},
            "default": "quantize",
            "rules": [{"match": "q_proj", "action": "adapt"}],
        },
    )
    loading = base_loading(base)
    assert loading.schemes == ("nf4",) and loading.quantization_config is None and not loading.from_pretrained("x")
    note = loading.note("tiny-opt")
    assert "surgery.load_model('tiny-opt')" in note
    assert "quantized embeddings" in note and "block size other than 64" in note


def test_surgery_s_own_export_imports_onto_the_storage_it_was_trained_on(tmp_path):
    """qlora_nf4 (double quantization, lm_head frozen in full precision) exported, then imported onto a fresh
    unquantized base without --quantize: the base is stored as the fine-tune's was, and the logits are the same."""
    import surgery
    from surgery.base.tiny import tiny_model

    ft = surgery.rewrite(tiny_model("tiny-llama"), "qlora_nf4")
    with torch.no_grad():
        for tensor in ft.own_state().values():
            tensor.add_(torch.randn(tensor.shape, generator=torch.Generator().manual_seed(2)) * 0.05)
    surgery.export_peft(ft, tmp_path / "peft")
    fresh = tiny_model("tiny-llama")
    back = surgery.import_peft(fresh, tmp_path / "peft")
    assert back.surgery_info.rules.to_json() == ft.surgery_info.rules.to_json()
    assert fresh.model.layers[0].self_attn.q_proj.weight.quant_state.nested  # double quantization, as trained
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(back.eval()(input_ids=ids).logits, ft.eval()(input_ids=ids).logits)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    config["lora_alpha"] = config["lora_alpha"] * 2  # edited after export: the config is read, not the record
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config))
    edited = surgery.import_peft(tiny_model("tiny-llama"), tmp_path / "peft")
    assert edited.surgery_info.rules.to_json() != ft.surgery_info.rules.to_json()
