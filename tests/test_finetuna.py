"""finetuna's documented usage, with what it documented but never enforced now enforced."""

import pytest
import torch

import surgery
import surgery.finetuna as ft
from surgery.errors import PlanError

IDS = torch.tensor([[5, 17, 99, 3, 200, 41, 7, 8]])


@pytest.fixture()
def base():
    model = surgery.tiny_model("tiny-opt")
    return ft.prepare_base_model(model)


def test_readme_flow_quantize_base_then_two_finetunes(base):
    assert type(base.model.decoder.layers[0].fc1).__name__ == "Linear8bitLt"
    assert type(base.lm_head).__name__ == "Linear"  # modules_not_to_quantize={"lm_head"} by default
    assert not any(p.requires_grad for p in base.parameters())
    a = ft.new_finetuned(base, adapt_layers={"q_proj", "v_proj"}, plain_layers={"lm_head"},
                         linear_config=ft.LinearAdapterConfig(r=8, alpha=16))
    b = ft.new_finetuned(base)  # finetuna's defaults: every adaptable module, lm_head plain
    with torch.no_grad():
        ref = base(IDS).logits
        assert torch.equal(a(IDS).logits, ref) and torch.equal(b(IDS).logits, ref)
    assert a.model.decoder.layers[0].self_attn.q_proj.config.r == 8
    assert b.model.decoder.embed_tokens.config.r == 4 and b.model.decoder.embed_tokens.config.alpha == 1
    assert a.lm_head.weight.requires_grad and a.lm_head.weight is not b.lm_head.weight


def test_adaptable_modules_by_local_name():
    names = ft.get_lora_adaptable_modules(surgery.tiny_model("tiny-opt"))
    assert names == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "embed_tokens", "lm_head"}


def test_readme_typo_is_rejected_with_a_suggestion(base):
    with pytest.raises(PlanError) as err:
        ft.new_finetuned(base, adapt_layers={"q_proj", "embed_tokenz"})
    assert err.value.constraints == ["C4"] and "did you mean 'embed_tokens'" in str(err.value)


def test_plain_and_adapt_layers_must_be_disjoint(base):
    with pytest.raises(PlanError, match="both adapt_layers and"):
        ft.new_finetuned(base, adapt_layers={"q_proj", "lm_head"}, plain_layers={"lm_head"})


def test_dict_configs_must_cover_every_adapted_module(base):
    with pytest.raises(PlanError) as err:
        ft.new_finetuned(base, adapt_layers={"q_proj", "v_proj"},
                         linear_config={"q_proj": ft.LinearAdapterConfig(r=2)})
    assert err.value.constraints == ["C7"] and "v_proj" in str(err.value)
    ok = ft.new_finetuned(base, adapt_layers={"q_proj", "v_proj"}, linear_config={
        "q_proj": ft.LinearAdapterConfig(r=2), "v_proj": ft.LinearAdapterConfig(r=6)})
    assert ok.model.decoder.layers[1].self_attn.v_proj.config.r == 6


def test_no_unquantize_after_quantize_and_no_trainable_int8(base):
    with pytest.raises(PlanError) as err:
        ft.new_finetuned(base, adapt_layers={"q_proj"}, modules_not_to_quantize={"q_proj"})
    assert set(err.value.constraints) == {"C1"}
    with pytest.raises(PlanError) as err:
        ft.new_finetuned(base, adapt_layers={"q_proj"}, modules_not_to_freeze={"fc1"})
    assert set(err.value.constraints) == {"C2"}


def test_defaults_are_not_shared_between_calls(base):
    a = ft.new_finetuned(base, adapt_layers={"q_proj"})
    b = ft.new_finetuned(base, adapt_layers={"v_proj"})
    assert "q_proj" not in repr(surgery.finetune_info(b).rules.to_dict()["rules"])
    assert ft.new_finetuned.__defaults__ == (None, ("lm_head",), None, None, (), ())
    assert surgery.finetune_info(a).rules is not surgery.finetune_info(b).rules
