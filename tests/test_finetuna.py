"""finetuna's README and usage-guide examples, on tiny-opt instead of facebook/opt-125m (no download),
with what finetuna documented but never enforced now enforced."""

import pytest
import torch

import surgery
import surgery.finetuna as ft
from surgery.errors import PlanError
from surgery.layers.lora import LoraLayer

IDS = torch.tensor([[5, 17, 99, 3, 200, 41, 7, 8], [9, 8, 7, 6, 5, 4, 3, 2]])


def _base():
    return surgery.tiny_model("tiny-opt")


def _kind(model, path):
    return type(model.get_submodule(path)).__name__


# ------------------------------------------------------------------------------------------ README


def test_readme_example_quantize_then_finetune():
    base_model = _base()
    with torch.no_grad():
        fp32 = base_model(IDS).logits
    # "If memory constraints require it, you can manually pre-quantize a model"
    assert ft.quantize_base_model(base_model) is base_model
    assert _kind(base_model, "model.decoder.layers.0.self_attn.q_proj") == "Linear8bitLt"
    assert _kind(base_model, "model.decoder.embed_tokens") == "Embedding8bit"
    assert _kind(base_model, "lm_head") == "Linear"  # modules_not_to_quantize={"lm_head"} by default
    assert not any(p.requires_grad for p in base_model.parameters())

    model_1 = ft.new_finetuned(base_model)
    with torch.no_grad():
        quantized = base_model(IDS).logits
        assert torch.equal(model_1(IDS).logits, quantized)
        assert 0 < ((quantized - fp32).norm() / fp32.norm()) < 0.03
    # every Linear/Embedding adapted except lm_head, which is trained directly (a private copy)
    adapted = {n for n, m in model_1.named_modules() if isinstance(m, LoraLayer)}
    assert len(adapted) == 13 and "lm_head" not in adapted
    assert model_1.lm_head.weight.requires_grad and model_1.lm_head.weight is not base_model.lm_head.weight
    layer = model_1.model.decoder.layers[0].self_attn.q_proj
    assert (layer.config.r, layer.config.alpha, layer.config.bias) == (4, 1.0, True)  # finetuna's defaults


def test_readme_example_with_granular_parameters_rejects_its_own_typo():
    base_model = _base()
    kwargs = dict(
        embedding_config=ft.EmbeddingAdapterConfig(r=4, alpha=1),
        linear_config={
            "q_proj": ft.LinearAdapterConfig(r=8, alpha=1, dropout=0.0, bias=False),
            "v_proj": ft.LinearAdapterConfig(r=4, alpha=1, dropout=0.1, bias=True),
        },
    )
    types = {n: type(m) for n, m in base_model.named_modules()}
    with pytest.raises(PlanError) as err:
        ft.new_finetuned(base_model, adapt_layers={"embed_tokens", "embed_posotions", "q_proj", "v_proj"}, **kwargs)
    assert err.value.constraints == ["C4"]
    assert "'embed_posotions' matched no module" in str(err.value)
    assert "did you mean 'embed_positions'" in str(err.value)
    assert {n: type(m) for n, m in base_model.named_modules()} == types  # nothing changed

    model_2 = ft.new_finetuned(base_model, adapt_layers={"embed_tokens", "q_proj", "v_proj"}, **kwargs)
    attn = model_2.model.decoder.layers[1].self_attn
    assert (attn.q_proj.config.r, attn.q_proj.config.bias) == (8, False)
    assert (attn.v_proj.config.r, attn.v_proj.config.dropout, attn.v_proj.config.bias) == (4, 0.1, True)
    assert model_2.model.decoder.embed_tokens.config.r == 4
    assert _kind(model_2, "model.decoder.layers.1.fc1") == "Linear8bitLt"  # not adapted: quantized, frozen


def test_readme_training_loop_under_autocast():
    base_model = _base()
    model_1 = ft.new_finetuned(base_model)
    model_2 = ft.new_finetuned(base_model)
    with torch.no_grad():
        before = model_2(IDS).logits.clone()
    opt = torch.optim.AdamW([p for p in model_1.parameters() if p.requires_grad], lr=1e-2)
    model_1.train()
    losses = []
    for _ in range(5):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            opt.zero_grad()
            loss = model_1(IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with torch.no_grad():
        assert torch.equal(model_2(IDS).logits, before)


# ------------------------------------------------------------------------------------- usage guide


def test_usage_viewing_adaptable_modules():
    base_model = _base()
    ft.prepare_base_model(base_model)
    assert ft.get_lora_adaptable_modules(base_model) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "out_proj",
        "fc1",
        "fc2",
        "embed_tokens",
        "lm_head",
    }


def test_usage_quantizing_the_head_too_makes_plain_lm_head_an_error():
    base_model = _base()
    ft.quantize_base_model(base_model, modules_not_to_quantize=set())
    assert _kind(base_model, "lm_head") == "Linear8bitLt"
    with pytest.raises(PlanError) as err:
        ft.new_finetuned(base_model)  # lm_head plain by default: trainable int8
    assert set(err.value.constraints) == {"C2"} and "lm_head" in str(err.value)
    ok = ft.new_finetuned(base_model, plain_layers=set())
    assert isinstance(ok.lm_head, LoraLayer)


def test_usage_adapt_layers_quantizes_everything_else():
    base_model = _base()
    ft1 = ft.new_finetuned(base_model, adapt_layers={"q_proj", "v_proj"})
    assert _kind(base_model, "model.decoder.layers.0.fc2") == "Linear8bitLt"
    assert _kind(base_model, "model.decoder.embed_tokens") == "Embedding8bit"
    assert _kind(ft1, "model.decoder.layers.0.self_attn.v_proj") == "LoraLinear"
    assert _kind(ft1, "model.decoder.layers.0.self_attn.k_proj") == "Linear8bitLt"
    trainable = sum(p.numel() for p in ft1.parameters() if p.requires_grad)
    assert trainable == 4 * (4 * (64 + 64) + 64) + 260 * 64  # 4 adapters with bias + lm_head


def test_usage_plain_layers_names_that_match_nothing_are_rejected():
    base_model = _base()
    with pytest.raises(PlanError) as err:  # OPT has no module called "layer_norm"
        ft.new_finetuned(
            base_model, adapt_layers={"q_proj", "v_proj"}, plain_layers={"lm_head", "out_proj", "layer_norm"}
        )
    assert err.value.constraints == ["C4"] and "did you mean" in str(err.value)
    ft2 = ft.new_finetuned(
        base_model, adapt_layers={"q_proj", "v_proj"}, plain_layers={"lm_head", "out_proj", "final_layer_norm"}
    )
    out_proj = ft2.model.decoder.layers[0].self_attn.out_proj
    assert type(out_proj).__name__ == "Linear" and out_proj.weight.requires_grad
    assert ft2.model.decoder.layers[0].final_layer_norm.weight.requires_grad
    assert out_proj.weight is not base_model.model.decoder.layers[0].self_attn.out_proj.weight


def test_usage_no_unquantize_after_quantize():
    base_model = _base()
    ft.quantize_base_model(base_model)
    with pytest.raises(PlanError) as err:
        ft.new_finetuned(base_model, adapt_layers={"q_proj"}, modules_not_to_quantize={"q_proj"})
    assert set(err.value.constraints) == {"C1"}


def test_usage_not_to_freeze_needs_not_to_quantize():
    base_model = _base()
    with pytest.raises(PlanError) as err:
        ft.new_finetuned(base_model, adapt_layers={"q_proj"}, modules_not_to_freeze={"fc1"})
    assert err.value.constraints == ["C2"]
    ok = ft.new_finetuned(
        base_model, adapt_layers={"q_proj"}, modules_not_to_freeze={"fc1"}, modules_not_to_quantize={"fc1"}
    )
    assert ok.model.decoder.layers[0].fc1.weight.requires_grad


def test_usage_adapting_a_non_quantized_layer():
    base_model = _base()
    ft1 = ft.new_finetuned(base_model, adapt_layers={"q_proj"}, modules_not_to_quantize={"q_proj"})
    q = ft1.model.decoder.layers[0].self_attn.q_proj
    assert type(q.base_layer).__name__ == "Linear" and not q.base_layer.weight.requires_grad


# --------------------------------------------------------------------- what finetuna never enforced


def test_plain_and_adapt_layers_must_be_disjoint():
    with pytest.raises(PlanError, match="both adapt_layers and plain_layers"):
        ft.new_finetuned(_base(), adapt_layers={"q_proj", "lm_head"}, plain_layers={"lm_head"})


def test_dict_configs_must_cover_every_adapted_module():
    base_model = _base()
    with pytest.raises(PlanError) as err:
        ft.new_finetuned(
            base_model, adapt_layers={"q_proj", "v_proj"}, linear_config={"q_proj": ft.LinearAdapterConfig(r=2)}
        )
    assert err.value.constraints == ["C7"] and "v_proj" in str(err.value)


def test_defaults_are_not_shared_between_calls():
    base_model = _base()
    a = ft.new_finetuned(base_model, adapt_layers={"q_proj"})
    b = ft.new_finetuned(base_model, adapt_layers={"v_proj"}, plain_layers={"lm_head", "final_layer_norm"})
    c = ft.new_finetuned(base_model, adapt_layers={"k_proj"})
    rules = [surgery.finetune_info(m).rules.to_dict()["rules"] for m in (a, b, c)]
    assert any(r["match"] == "final_layer_norm" for r in rules[1])
    assert not any(r["match"] == "final_layer_norm" for r in rules[2])  # b's plain layer did not leak into c
    assert all(not isinstance(d, (set, list, dict)) for d in ft.new_finetuned.__defaults__)
