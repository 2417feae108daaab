"""LoftQ (`init_lora_weights: loftq`): an adapter starts as the best rank-r fit of the base's quantization error
W − deq(Q(W)), the shared base untouched; W is read where it still is (the unquantized module, the checkpoint's
safetensors, a tiny model's seed); saved, loaded and exported like any LoRA."""

from __future__ import annotations

import warnings

import pytest
import torch

import surgery
from surgery.base.ownership import own_state
from surgery.base.tiny import tiny_model
from surgery.errors import PlanError, RewriteError
from surgery.files.peft_format import export_peft
from surgery.layers.bnb import dense_weight
from surgery.rules.rule_file import parse_rules

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))
MATCH = {"tiny-llama": ("re:.*_proj", "linear"), "tiny-gpt2": ("re:.*(c_attn|c_fc)", "conv1d")}


def rules(storage, model: str = "tiny-llama", init: str = "loftq", r: int = 4, alpha: float = 8):
    match, kind = MATCH[model]
    quantize = {"scheme": "nf4", "double_quant": False} if storage == "nf4" else storage
    return parse_rules(
        {
            "version": 1,
            "quantize": quantize,
            "default": "freeze",
            "rules": [
                {
                    "match": match,
                    "type": kind,
                    "action": "adapt",
                    "lora": {"r": r, "alpha": alpha, "init_lora_weights": init if init != "true" else True},
                }
            ],
        }
    )


def adapters(ft):
    return {path: m for path, m in ft.named_modules() if hasattr(m, "lora_A")}


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("storage", ["nf4", "int8"])
def test_loftq_starts_each_adapter_at_the_best_rank_r_fit_of_the_quantization_error(model, storage):
    """s·B·A is the truncated SVD of W − deq(Q(W)) (as PEFT's _low_rank_decomposition computes it, the scaling
    divided out), so the remaining error is exactly the residual's trailing singular values (Eckart–Young)."""
    from peft.utils.loftq_utils import _low_rank_decomposition

    reference = tiny_model(model)
    ft = surgery.rewrite(tiny_model(model), rules(storage, model))
    assert adapters(ft)
    for path, adapter in adapters(ft).items():
        kind = MATCH[model][1]
        weight = dense_weight(reference.get_submodule(path), kind)
        residual = weight - dense_weight(adapter.base_layer, kind)
        peft_factors = _low_rank_decomposition(residual, reduced_rank=4)
        torch.testing.assert_close(adapter.delta_weight(), peft_factors["L"] @ peft_factors["R"], rtol=1e-5, atol=1e-6)
        tail = peft_factors["S"][4:]
        left = (weight - adapter.merged_weight(dense_weight(adapter.base_layer, kind))).norm()
        assert left.item() == pytest.approx(tail.square().sum().sqrt().item(), rel=1e-4)
        assert left < residual.norm()  # the start is closer to W than the quantized base alone


def test_with_alpha_equal_to_r_the_factors_are_peft_s():
    """PEFT's LoftQ leaves the scaling out (peft#1982): with alpha = r (scaling 1) both agree factor by factor."""
    from peft.utils.loftq_utils import _low_rank_decomposition

    reference = tiny_model("tiny-llama")
    ft = surgery.rewrite(tiny_model("tiny-llama"), rules("nf4", alpha=4))
    path, adapter = next(iter(adapters(ft).items()))
    residual = reference.get_submodule(path).weight - dense_weight(adapter.base_layer, "linear")
    factors = _low_rank_decomposition(residual.detach(), reduced_rank=4)
    torch.testing.assert_close(adapter.lora_B, factors["L"][:, :4], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(adapter.lora_A, factors["R"][:4], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("storage", ["nf4", "int8"])
def test_a_loftq_fine_tune_is_closer_to_the_full_precision_model_and_leaves_the_base_as_plain_quantization_does(
    storage, digest
):
    want = logits(tiny_model("tiny-llama"))
    base, plain_base = tiny_model("tiny-llama"), tiny_model("tiny-llama")
    loftq = surgery.rewrite(base, rules(storage))
    plain = surgery.rewrite(plain_base, rules(storage, init="true"))
    assert digest(base) == digest(plain_base)  # the same quantized base: LoftQ changes only the adapters
    error = (logits(loftq) - want).norm() / want.norm()
    plain_error = (logits(plain) - want).norm() / want.norm()
    assert error < plain_error
    assert torch.equal(logits(plain), logits(surgery.rewrite(base, rules(storage, init="true"))))


def test_loftq_reads_w_from_the_checkpoint_or_the_seed_when_the_base_loaded_quantized(tmp_path):
    """load_model quantizes while it loads: a later LoftQ fine-tune reads W from the checkpoint's safetensors
    (a tiny model: from its seed) and gets the same adapters as one made from the unquantized model."""
    for model in MATCH:
        the_rules = rules("nf4", model)
        expected = own_state(surgery.rewrite(tiny_model(model), the_rules))
        tiny_model(model).save_pretrained(tmp_path / model)  # GPT-2: Conv1D weights stored (in, out)
        for name in (model, str(tmp_path / model)):
            base = surgery.load_model(name, rules=the_rules).model
            assert any(type(m).__name__ == "Linear4bit" for m in base.modules())
            got = own_state(surgery.rewrite(base, the_rules))
            assert got.keys() == expected.keys()
            assert all(torch.equal(got[k], expected[k]) for k in expected), name


def test_a_model_transformers_loaded_from_a_folder_is_read_back_from_its_checkpoint(tmp_path):
    """As PEFT's replace_lora_weights_loftq finds W: the model's name_or_path, a folder with safetensors."""
    import transformers

    tiny_model("tiny-llama").save_pretrained(tmp_path / "ckpt")
    expected = own_state(surgery.rewrite(tiny_model("tiny-llama"), rules("nf4")))
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    surgery.prepare_base(base, rules("nf4", init="true"))  # quantized in memory: W only in the folder now
    got = own_state(surgery.rewrite(base, rules("nf4")))
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_without_full_precision_weights_loftq_is_refused_before_anything_changes(digest):
    base = tiny_model("tiny-llama")
    surgery.prepare_base(base, rules("nf4", init="true"))  # quantized in memory: W is gone
    before = digest(base)
    with pytest.raises(
        RewriteError,
        match=r"loftq needs the full-precision weight of model.layers.0.self_attn.q_proj "
        r"\(and \d+ more\), but the base holds it quantized",
    ):
        surgery.rewrite(base, rules("nf4"))
    assert digest(base) == before
    with pytest.raises(
        PlanError,
        match="loftq, which starts the adapter from the base's quantization error, but the base keeps it as float32",
    ):
        surgery.plan(tiny_model("tiny-llama"), rules("none"))
    embedding = parse_rules(
        {
            "version": 1,
            "quantize": "nf4",
            "rules": [{"match": "embed_tokens", "action": "adapt", "lora": {"r": 4, "init_lora_weights": "loftq"}}],
        }
    )
    with pytest.raises(PlanError, match="adapts the embedding model.embed_tokens with init_lora_weights: loftq"):
        surgery.plan(tiny_model("tiny-llama"), embedding)


def test_a_loftq_adapter_saves_loads_onto_a_bare_base_and_exports_to_peft(tmp_path, digest):
    """Loading fills the adapters from the file (no W needed); PEFT reads the export as a plain LoRA
    (init_lora_weights true) and computes the same logits."""
    peft = pytest.importorskip("peft")
    ft = surgery.rewrite(tiny_model("tiny-llama"), rules("nf4"))
    surgery.save_adapter(ft, tmp_path / "a.safetensors")
    bare = tiny_model("tiny-llama")
    surgery.prepare_base(bare, rules("nf4", init="true"))  # quantized in memory: no W to read
    loaded = surgery.load_adapter(bare, tmp_path / "a.safetensors")
    assert torch.equal(logits(loaded), logits(ft))
    export_peft(ft, tmp_path / "peft")
    config = (tmp_path / "peft" / "adapter_config.json").read_text()
    assert '"init_lora_weights": true' in config
    base = tiny_model("tiny-llama")
    surgery.prepare_base(base, rules("nf4", init="true"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(base, tmp_path / "peft")
    ours = logits(ft)
    assert ((logits(theirs) - ours).abs().max() / ours.abs().max()).item() <= 1e-5
    back = tiny_model("tiny-llama")
    surgery.prepare_base(back, rules("nf4", init="true"))
    assert torch.equal(logits(surgery.import_peft(back, tmp_path / "peft")), ours)  # and back, as plain LoRA


def test_a_hostile_or_changed_checkpoint_is_refused_and_the_base_restored(tmp_path, digest):
    """The index may only name shards in the folder; a weight of another shape is refused by name."""
    import json

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "ckpt"
    tiny_model("tiny-llama").save_pretrained(folder)
    base = surgery.load_model(str(folder), rules=rules("nf4")).model
    before = digest(base)
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.0.self_attn.q_proj.weight"] = weights["model.layers.0.self_attn.q_proj.weight"][
        :, :8
    ].contiguous()
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RewriteError, match=r"q_proj: the full-precision weight LoftQ read has shape \(64, 8\)"):
        surgery.rewrite(base, rules("nf4"))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.layers.0.self_attn.q_proj.weight": "../elsewhere.safetensors"}})
    )
    with pytest.raises(RewriteError, match="names '../elsewhere.safetensors', a path out of"):
        surgery.rewrite(base, rules("nf4"))
    assert digest(base) == before


def test_the_cli_trains_from_a_loftq_start(tmp_path):
    """--init-lora-weights loftq: the base loads quantized, W comes from the tiny model's seed, and the recorded
    rule file says loftq."""
    from test_cli import run

    result = run(
        "train",
        "--target-modules",
        "q_proj,v_proj",
        "--quantize",
        "nf4",
        "--init-lora-weights",
        "loftq",
        "--lora-r",
        "4",
        "--model",
        "tiny-llama",
        "--data",
        "upper",
        "--max-steps",
        "2",
        "--out",
        str(tmp_path / "run"),
    )
    assert result.exit_code == 0, result.output
    adapter = surgery.read_adapter(tmp_path / "run" / "adapter.safetensors")
    assert {r.lora.init_lora_weights for r in adapter.rules.rules if r.lora} == {"loftq"}
    assert "--init-lora-weights loftq" in (tmp_path / "run" / "rules.yaml").read_text()
