"""PEFT folders of deep models: imported as a few rules however many layers, read as PEFT itself reads them."""

from __future__ import annotations

import json
import random
import warnings

import pytest
import torch
from test_state import logits, trained
from typer.testing import CliRunner

import surgery
from surgery import AdapterStateError
from surgery.base.loading import build_from_config, config_from_dict
from surgery.layers.lora import LoraLayer
from surgery.rules.ruleset import covering_patterns, pattern_matches

peft = pytest.importorskip("peft")

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SCHEMES = {"none": "none", "int8": "int8", "nf4": {"scheme": "nf4", "double_quant": True}}


def deep(layers: int = 30) -> torch.nn.Module:
    spec = {
        "model_type": "llama",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": layers,
        "vocab_size": 300,
    }
    return build_from_config(config_from_dict(spec), device="cpu", seed=0)


def rules(scheme: str) -> dict:
    """All seven projections adapted; the first 15 layers with another rank and alpha (two settings per position)."""
    return {
        "quantize": SCHEMES[scheme],
        "default": "freeze",
        "rules": [
            {"match": r"re:model\.layers\.(?:[0-9]|1[0-4])\..*_proj", "action": "adapt", "lora": {"r": 2, "alpha": 6}},
            *({"match": p, "action": "adapt", "lora": {"r": 4, "alpha": 8}} for p in PROJECTIONS),
        ],
    }


def rel(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


def adapters(model: torch.nn.Module) -> dict[str, tuple[int, float]]:
    return {p: (m.config.r, m.config.lora_alpha) for p, m in model.named_modules() if isinstance(m, LoraLayer)}


def patterns(ft: torch.nn.Module) -> list[str]:
    return [rule.match for rule in surgery.finetune_info(ft).rules.rules]


def peft_model(base, folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base, folder)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_a_deep_export_loads_in_peft_and_imports_back_with_the_same_outputs(tmp_path, scheme):
    base = deep()
    ft = trained(surgery.rewrite(base, rules(scheme)))
    expected = logits(ft)
    surgery.export_peft(ft, tmp_path / "peft")
    assert len(json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["target_modules"]) == 30 * 7
    twin_base = deep()  # a fresh copy of the plain base, stored as ft's base is (the card's BitsAndBytesConfig)
    if scheme != "none":
        surgery.prepare_base(twin_base, rules(scheme))
    theirs = logits(peft_model(twin_base, tmp_path / "peft"))
    assert torch.equal(theirs, expected) if scheme != "none" else rel(theirs, expected) <= 1e-5
    imported = surgery.import_peft(base, tmp_path / "peft")
    assert torch.equal(logits(imported), expected)
    assert adapters(imported) == adapters(ft) and len(adapters(ft)) == 30 * 7
    # surgery's own export records the rules it was trained with: those come back (the config's are read when the
    # record does not rebuild the folder's adapters, tested with PEFT's own configs below)
    assert patterns(imported) == patterns(ft) and all(len(p) < 200 for p in patterns(imported))
    if scheme != "none":
        info = surgery.finetune_info(imported)
        assert {info.plan.decisions[p].storage for p in adapters(ft)} == {scheme}


def test_the_imported_rules_do_not_grow_with_depth(tmp_path):
    counts = {}
    for layers in (30, 60):
        ft = trained(surgery.rewrite(deep(layers), rules("none")))
        surgery.export_peft(ft, tmp_path / str(layers))
        imported = surgery.import_peft(deep(layers), tmp_path / str(layers))
        assert adapters(imported) == adapters(ft)
        assert rel(logits(imported), logits(ft)) <= 1e-6
        assert all(len(p) < 200 for p in patterns(imported)), patterns(imported)
        counts[layers] = len(patterns(imported))
        path = tmp_path / f"{layers}.safetensors"
        surgery.save_adapter(imported, path)  # the rules travel in the adapter file and read back
        assert torch.equal(logits(surgery.load_adapter(deep(layers), path)), logits(imported))
    assert counts[30] == counts[60] == len(patterns(ft))


PEFT_CONFIGS = {
    "names": {"target_modules": list(PROJECTIONS)},
    "regex": {"target_modules": r".*\.(?:1\d|2[0-3])\.(?:self_attn\.[qv]|mlp\.down)_proj"},
    "layers": {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": [0, 3, 7]},
    "layers-pattern": {"target_modules": ["v_proj"], "layers_to_transform": 12, "layers_pattern": "layers"},
    "rank-alpha": {
        "target_modules": list(PROJECTIONS),
        "rank_pattern": {"down_proj": 2, r"layers\.1\d\.self_attn\.q_proj": 6},
        "alpha_pattern": {"v_proj": 5, r"model\.layers\.2\d\..*": 3},
    },
    "modules-to-save": {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]},
    "exclude": {"target_modules": ["o_proj", "up_proj"], "exclude_modules": r".*\.(?:4|17)\.mlp\.up_proj"},
    "full-paths": {"target_modules": ["model.layers.2.self_attn.k_proj", "model.layers.29.mlp.gate_proj", "up_proj"]},
}


@pytest.mark.parametrize("settings", list(PEFT_CONFIGS.values()), ids=list(PEFT_CONFIGS))
def test_a_folder_peft_wrote_imports_with_peft_s_modules_settings_and_outputs(tmp_path, settings):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(deep(), peft.LoraConfig(r=4, lora_alpha=12, **settings))
    trained(theirs, scale=0.05)
    theirs.save_pretrained(tmp_path)
    expected = logits(theirs)
    ft = surgery.import_peft(deep(), tmp_path)
    assert rel(logits(ft), expected) <= 1e-5
    peft_layers = {
        p.removeprefix("base_model.model."): (m.r["default"], m.lora_alpha["default"])
        for p, m in theirs.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    assert adapters(ft) == peft_layers and peft_layers
    assert len(patterns(ft)) <= 2 * len(PROJECTIONS) and all(len(p) < 200 for p in patterns(ft)), patterns(ft)


def test_a_folder_whose_config_selects_other_modules_than_its_weights_hold_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    ft = trained(surgery.rewrite(deep(), rules("int8")))
    surgery.export_peft(ft, tmp_path / "peft")
    config_file, weights = tmp_path / "peft" / "adapter_config.json", tmp_path / "peft" / "adapter_model.safetensors"
    config = json.loads(config_file.read_text())
    base = deep()
    before = {n: t.clone() for n, t in base.state_dict().items()}

    def refused(message: str) -> None:
        with pytest.raises(AdapterStateError, match=message) as info:
            surgery.import_peft(base, tmp_path / "peft", quantize="int8")
        assert str(info.value).startswith(str(tmp_path / "peft"))
        assert before.keys() == base.state_dict().keys()
        assert all(torch.equal(before[n], t) for n, t in base.state_dict().items())

    fewer = [p for p in config["target_modules"] if p != "model.layers.17.mlp.up_proj"]
    config_file.write_text(json.dumps({**config, "target_modules": fewer}))
    refused(r"holds LoRA weights for 'model\.layers\.17\.mlp\.up_proj', which adapter_config\.json does not select")
    config_file.write_text(json.dumps({**config, "target_modules": [*PROJECTIONS, "lm_head"]}))
    refused(r"selects 'lm_head' for LoRA .* holds no LoRA weights for it")
    config_file.write_text(json.dumps({**config, "target_modules": list(PROJECTIONS), "layers_to_transform": [1]}))
    refused(r"holds LoRA weights for 'model\.layers\.0\.self_attn\.q_proj', which adapter_config\.json does not")
    config_file.write_text(json.dumps(config))
    tensors = load_file(weights)
    save_file({k: t for k, t in tensors.items() if ".layers.9.self_attn.o_proj." not in k}, weights)
    refused(r"selects 'model\.layers\.9\.self_attn\.o_proj' for LoRA .* holds no LoRA weights")
    config_file.write_text(json.dumps({**config, "target_modules": r"(.*)(.*)(.*)(.*)(.*)(.*)(.*)(.*)\1\."}))
    refused(r"target_modules pattern .*catastrophic backtracking")
    config_file.write_text(json.dumps({**config, "layers_to_transform": ["0"]}))
    refused(r"layers_to_transform must be a layer index or a list of them")


@pytest.mark.parametrize("scheme", ["none", "int8"])
def test_deep_adapters_go_through_the_cli_export_peft_then_import_peft(tmp_path, scheme):
    from surgery_cli.app import app

    deep().save_pretrained(tmp_path / "base")
    base = surgery.load_model(str(tmp_path / "base")).model
    ft = trained(surgery.rewrite(base, rules(scheme)))
    surgery.save_adapter(ft, tmp_path / "ft.safetensors")
    runner = CliRunner()
    done = runner.invoke(app, ["export-peft", str(tmp_path / "ft.safetensors"), "--out", str(tmp_path / "peft")])
    assert done.exit_code == 0, done.output
    back = tmp_path / "back.safetensors"
    quantize = ["--quantize", scheme] if scheme != "none" else []  # int8: the whole base, embeddings too
    done = runner.invoke(app, ["import-peft", str(tmp_path / "peft"), "--out", str(back), *quantize])
    assert done.exit_code == 0, done.output
    original, imported = surgery.read_adapter(tmp_path / "ft.safetensors"), surgery.read_adapter(back)
    assert imported.tensors.keys() == original.tensors.keys()
    assert all(torch.equal(imported.tensors[k], original.tensors[k]) for k in original.tensors)
    again = surgery.load_adapter(surgery.load_model(str(tmp_path / "base")).model, back)
    assert adapters(again) == adapters(ft)
    assert len(patterns(again)) <= 14 and all(len(p) < 200 for p in patterns(again))
    if scheme == "none":
        assert torch.equal(logits(again), logits(ft))


def test_covering_patterns_match_exactly_the_paths_among_the_model_s_modules():
    """Random selections of a model with nested indices (experts in layers): the patterns match those, nothing else."""
    every = ["model", "model.layers", "model.norm", "lm_head"]
    for i in range(40):
        every += [f"model.layers.{i}", f"model.layers.{i}.mlp", f"model.layers.{i}.self_attn.q_proj"]
        every += [f"model.layers.{i}.mlp.experts.{e}.down_proj" for e in range(12)]
    rng = random.Random(0)
    for _ in range(100):
        chosen = set(rng.sample(every, rng.randint(1, len(every))))
        found = covering_patterns(sorted(chosen), every)
        assert {p for p in every if any(pattern_matches(f, p) for f in found)} == chosen
        assert all(len(f) <= 500 for f in found)
    layers = [f"model.layers.{i}.self_attn.q_proj" for i in range(40)]
    assert covering_patterns(layers, every) == ["model.layers.*.self_attn.q_proj"]
    assert covering_patterns(layers[:3], every) == [r"re:model\.layers\.(?:0|1|2)\.self_attn\.q_proj"]
    assert covering_patterns(layers[1:], every) == [r"re:model\.layers\.(?!0\b)\d+\.self_attn\.q_proj"]
