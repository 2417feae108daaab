"""DoRA (`use_dora: true`): outputs and gradients equal PEFT's own DoRA layer over fp32, int8 and nf4 bases, both
ways through PEFT's format; a new adapter is the base; merge, files, batching and the shared base hold; servers that
cannot load it are refused."""

from __future__ import annotations

import warnings

import pytest
import torch

import surgery
from surgery.base.ownership import own_state
from surgery.base.tiny import tiny_model
from surgery.errors import ExportError, PlanError, RuleFileError
from surgery.files.peft_format import export_peft
from surgery.finetune.batched import batched, route
from surgery.finetune.loading import import_peft
from surgery.rules.rule_file import parse_rules

peft = pytest.importorskip("peft")
IDS = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(3))
STORAGES = ["none", "int8", "nf4"]


def rules(storage: str, model: str = "tiny-llama", **lora) -> dict:
    """DoRA on the attention projections (their base stored as ``storage``), everything else frozen as loaded."""
    match = "re:.*(c_attn|c_proj)" if model == "tiny-gpt2" else "re:.*(q_proj|v_proj)"
    return {
        "quantize": storage,
        "default": "freeze",
        "rules": [
            {
                "match": match,
                "action": "adapt",
                "type": "conv1d" if model == "tiny-gpt2" else "linear",
                "lora": {"r": 4, "alpha": 8, "use_dora": True, **lora},
            }
        ],
    }


def nudged(ft, scale: float = 0.1):
    """Every trainable tensor (A, B and the magnitude) moved off its start, deterministically."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in own_state(ft).values():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.abs().mean().clamp(min=0.1))
    return ft


def logits(model, train: bool = False) -> torch.Tensor:
    model.train(train)
    with torch.no_grad():
        return model(input_ids=IDS).logits


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def peft_on(storage: str, folder, model: str = "tiny-llama"):
    base = tiny_model(model)
    if storage != "none":
        surgery.prepare_base(base, rules(storage, model))  # the same layers quantized the same way
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base, folder, is_trainable=True)


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_dora_logits_and_gradients_equal_peft_s_dora_layer(tmp_path, storage, model):
    ft = nudged(surgery.rewrite(tiny_model(model), rules(storage, model)))
    export_peft(ft, tmp_path / "dora")
    theirs = peft_on(storage, tmp_path / "dora", model)
    assert theirs.peft_config["default"].use_dora
    assert rel(logits(ft), logits(theirs)) <= 1e-5  # eval: the base output reused, as PEFT does
    if storage == "int8":
        return  # PEFT's own DoRA over an int8 base fails in training on the CPU (bitsandbytes' int8 state lost)
    for m in (ft, theirs):  # eval mode: the models' own dropout off, so both see the same computation
        m.eval()
        m(input_ids=IDS, labels=IDS).loss.backward()
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for name, p in own_state(ft).items():
        key = "base_model.model." + name.replace("lora_magnitude", "lora_magnitude_vector.default.weight").replace(
            "lora_A", "lora_A.default.weight"
        ).replace("lora_B", "lora_B.default.weight")
        assert rel(p.grad, grads[key]) <= 1e-4, name  # the norm detached alike: no gradient through it


@pytest.mark.parametrize("storage", STORAGES)
def test_a_peft_dora_adapter_imports_with_peft_s_outputs(tmp_path, storage):
    base = tiny_model("tiny-llama")
    if storage != "none":
        surgery.prepare_base(base, rules(storage))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(
            base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)
        )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    theirs.save_pretrained(tmp_path / "peft")
    reference = logits(theirs)
    ours_base = tiny_model("tiny-llama")
    if storage != "none":
        surgery.prepare_base(ours_base, rules(storage))  # held as PEFT's base was: import keeps it so
    ours = import_peft(ours_base, tmp_path / "peft")
    assert rel(logits(ours), reference) <= 1e-5


def test_a_new_dora_adapter_is_the_base_and_merges_save_and_batch_like_lora(tmp_path, digest):
    base = tiny_model("tiny-llama")
    before = digest(base)
    fresh = surgery.rewrite(base, rules("none"))
    assert rel(logits(fresh), logits(base)) <= 1e-6  # m = ||W|| and B = 0
    ft = nudged(surgery.rewrite(base, rules("none")))
    assert rel(logits(surgery.merge(ft)), logits(ft)) <= 1e-5
    path = surgery.save_adapter(ft, tmp_path / "dora.safetensors")
    assert torch.equal(logits(surgery.load_adapter(base, path)), logits(ft))
    view = batched(base, [ft, None, fresh])
    route(view, [2, 2, 2])
    with torch.no_grad():
        together = view(input_ids=torch.cat([IDS, IDS, IDS])).logits
    alone = torch.cat([logits(ft), logits(base), logits(fresh)])
    assert rel(together, alone) <= 1e-5
    assert digest(base) == before  # the base is only read


def test_dora_mistakes_are_refused_before_anything_changes(tmp_path, write_rules):
    base = tiny_model("tiny-llama")
    with pytest.raises(RuleFileError, match="use_dora must be true or false"):
        parse_rules(rules("none", use_dora="yes"))
    with pytest.raises(RuleFileError, match="use_dora with bias: DoRA with a LoRA bias is not supported"):
        parse_rules(rules("none", bias=True))
    on_embeddings = {
        "quantize": "none",
        "rules": [{"match": "*", "type": "embedding", "action": "adapt", "lora": {"r": 4, "use_dora": True}}],
    }
    with pytest.raises(PlanError, match=r"\[C3\].*embed_tokens with use_dora.*linear and conv1d layers only"):
        surgery.rewrite(base, on_embeddings)
    plan = surgery.plan(base, rules("none"))
    q = plan.decisions["model.layers.0.self_attn.q_proj"]
    assert q.adapter_params == 4 * (64 + 64) + 64  # A, B and the magnitude (one per output)
    assert q.adapter_params == sum(
        p.numel()
        for n, p in own_state(surgery.rewrite(base, rules("none"))).items()
        if n.startswith("model.layers.0.self_attn.q_proj.")
    )
    ft = surgery.rewrite(base, rules("none"))
    for target, why in (("vllm", "vLLM does not yet support DoRA"), ("lorax", "LoRAX reads LoRA A/B weights only")):
        with pytest.raises(ExportError, match=why):
            export_peft(ft, tmp_path / target, target=target)
        assert not (tmp_path / target).exists()


def test_under_bf16_autocast_dora_reads_the_base_in_bf16_and_matches_peft(tmp_path):
    """A bf16 step dequantizes W in bf16 (no float32 copy of each weight), as PEFT's DoRA does: the two agree to
    bf16 rounding, and both stay near the fp32 outputs."""
    ft = nudged(surgery.rewrite(tiny_model("tiny-llama"), rules("nf4")))
    export_peft(ft, tmp_path / "dora")
    theirs = peft_on("nf4", tmp_path / "dora")
    fp32 = logits(ft)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours_bf16, theirs_bf16 = logits(ft).float(), logits(theirs).float()
    assert rel(ours_bf16, theirs_bf16) <= 1e-3 and rel(ours_bf16, fp32) <= 3e-2  # same ops; bf16 vs fp32
