"""finetuna's README and usage-guide examples, on tiny-opt instead of facebook/opt-125m (no download),
with what finetuna documented but never enforced now enforced."""

import pytest
import torch
import transformers
from torch import nn

import surgery
import surgery.finetuna as ft
from surgery.base.tiny import tiny_model
from surgery.errors import PlanError
from surgery.layers.lora import LoraLayer

IDS = torch.tensor([[5, 17, 99, 3, 200, 41, 7, 8], [9, 8, 7, 6, 5, 4, 3, 2]])


def _base():
    return tiny_model("tiny-opt")


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
    assert len(adapted) == 14 and "lm_head" not in adapted  # finetuna adapts the learned positional embedding too
    assert "model.decoder.embed_positions" in adapted
    assert model_1.lm_head.weight.requires_grad and model_1.lm_head.weight is not base_model.lm_head.weight
    layer = model_1.model.decoder.layers[0].self_attn.q_proj
    assert (layer.config.r, layer.config.lora_alpha, layer.config.bias) == (4, 1.0, True)  # finetuna's defaults


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
    assert (attn.v_proj.config.r, attn.v_proj.config.lora_dropout, attn.v_proj.config.bias) == (4, 0.1, True)
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
        "embed_positions",
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


# ------------------------------------------------------------------------ finetuna's own test suite


class _TestNet(nn.Module):
    """The network of finetuna's tests/test_lib.py."""

    def __init__(self):
        super().__init__()
        self.em1 = nn.Embedding(num_embeddings=10, embedding_dim=100)
        self.fc1 = nn.Linear(100, 10)
        self.ln1 = nn.LayerNorm(10)
        self.ac1 = nn.ReLU()
        self.fc2 = nn.Linear(10, 5)
        self.lm_head = nn.Linear(5, 1, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.fc2(self.ac1(self.ln1(self.fc1(self.em1(x))))))


def _net() -> _TestNet:
    torch.manual_seed(0)
    return _TestNet()


def test_version_exists():
    assert ft.__version__ == surgery.__version__ and ft.__version__


def test_quantize_base_names_what_it_quantized():
    net, reference = _net(), _net()
    assert ft.quantize_base_model(net, {"fc2", "lm_head"}) is net
    for name in ("fc1",):
        assert isinstance(getattr(net, name), ft.QuantizedLinear)
        assert not isinstance(getattr(reference, name), ft.QuantizedLinear)
    assert isinstance(net.em1, ft.QuantizedEmbedding) and not isinstance(net.em1, ft.QuantizedLinear)
    for name in ("fc2", "lm_head"):  # modules_not_to_quantize: plain Linear, frozen, weights unchanged
        layer = getattr(net, name)
        assert type(layer) is nn.Linear and not isinstance(layer, ft.QuantizedLinear)
        assert torch.equal(layer.weight, getattr(reference, name).weight) and not layer.weight.requires_grad
    assert type(net.ln1) is nn.LayerNorm and not any(p.requires_grad for p in net.parameters())
    x = torch.tensor([[1, 4, 9], [0, 2, 3]])
    with torch.no_grad():
        got, want = net(x), reference(x)
    assert 0 < (got - want).norm() / want.norm() < 0.05  # int8 fc1 and em1, nothing else


def test_get_adaptable_by_type_as_finetuna():
    net = _net()
    assert ft.get_lora_adaptable_modules(net, [nn.Linear]) == {"fc1", "fc2", "lm_head"}
    assert ft.get_lora_adaptable_modules(net, [nn.Embedding]) == {"em1"}
    assert ft.get_lora_adaptable_modules(net) == {"em1", "fc1", "fc2", "lm_head"}
    ft.quantize_base_model(net)
    assert ft.get_lora_adaptable_modules(net) == {"em1", "fc1", "fc2", "lm_head"}
    assert ft.get_lora_adaptable_modules(net, [ft.QuantizedLinear]) == {"fc1", "fc2"}
    assert ft.get_lora_adaptable_modules(net, [nn.Linear, ft.QuantizedLinear]) == {"fc1", "fc2", "lm_head"}
    assert ft.get_lora_adaptable_modules(net, [ft.QuantizedEmbedding]) == {"em1"}


def test_new_finetuned_on_an_unquantized_net():
    net, reference = _net(), _net()
    new = ft.new_finetuned(net)
    assert isinstance(new.em1, LoraLayer) and isinstance(new.em1, ft.QuantizedEmbedding)
    assert isinstance(new.fc1, LoraLayer) and isinstance(new.fc1, ft.QuantizedLinear)
    assert new.fc1.base_layer.bias is net.fc1.bias and not new.fc1.base_layer.bias.requires_grad  # shared bias
    assert type(new.ln1) is nn.LayerNorm and type(new.ac1) is nn.ReLU
    assert type(new.lm_head) is nn.Linear and new.lm_head.weight.requires_grad  # plain by default
    assert new.lm_head.weight is not net.lm_head.weight and torch.equal(new.lm_head.weight, reference.lm_head.weight)
    x = torch.tensor([[1, 4, 9]])
    with torch.no_grad():
        assert torch.equal(new(x), net(x))  # a new fine-tune starts as the quantized base


def test_new_finetuned_default_on_a_quantized_net():
    net = _net()
    ft.quantize_base_model(net)
    nf1 = ft.new_finetuned(net)
    assert isinstance(nf1.fc1, ft.QuantizedLinear) and isinstance(nf1.fc2, ft.QuantizedLinear)
    assert isinstance(nf1.em1, ft.QuantizedEmbedding)
    assert type(nf1.lm_head) is nn.Linear and not isinstance(nf1.lm_head, ft.QuantizedLinear)


@pytest.mark.parametrize("quantize_first", [False, True])
def test_any_module_without_an_lm_head(quantize_first):
    """finetuna's docs: "a HuggingFace transformer model, or any other nn.Module"."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 20), nn.Linear(20, 1))
    reference = nn.Sequential(nn.Linear(5, 20), nn.Linear(20, 1))
    reference.load_state_dict(net.state_dict())
    x = torch.randn(7, 5)
    if quantize_first:
        assert ft.quantize_base_model(net) is net
        assert all(isinstance(m, ft.QuantizedLinear) for m in net)
    finetuned = ft.new_finetuned(net)
    assert all(isinstance(m, LoraLayer) for m in finetuned)
    with torch.no_grad():
        got, want = finetuned(x), reference(x)
    assert 0 < (got - want).norm() / want.norm() < 0.05
    opt = torch.optim.AdamW([p for p in finetuned.parameters() if p.requires_grad], lr=1e-2)
    loss = finetuned(x).pow(2).mean()
    loss.backward()
    opt.step()
    with torch.no_grad():
        assert torch.equal(net(x), ft.new_finetuned(net)(x))  # the base is untouched by training


def test_a_name_the_user_passes_must_match():
    net = nn.Sequential(nn.Linear(5, 20), nn.Linear(20, 1))
    with pytest.raises(PlanError) as err:
        ft.quantize_base_model(net, {"lm_head"})
    assert err.value.constraints == ["C4"] and "'lm_head' matched no module" in str(err.value)
    with pytest.raises(PlanError) as err:
        ft.new_finetuned(net, plain_layers={"lm_head"})
    assert err.value.constraints == ["C4"]
    assert all(type(m) is nn.Linear for m in net)  # nothing changed


def test_state_dict_saves_only_the_changed_state(tmp_path):
    base_model = _base()
    ft.quantize_base_model(base_model)
    args = dict(adapt_layers={"q_proj", "v_proj", "embed_positions"}, plain_layers={"lm_head"})
    m1 = ft.new_finetuned(base_model, **args)
    step = torch.optim.AdamW([p for p in m1.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        m1(IDS, labels=IDS).loss.backward()
        step.step()
        step.zero_grad()
    state = ft.state_dict(m1)
    shared = {id(t) for t in [*base_model.parameters(), *base_model.buffers()]}
    assert state and not any(id(t) in shared for t in state.values())
    trainable = {n for n, p in m1.named_parameters() if p.requires_grad}
    assert set(state) == trainable  # adapters and the plain head: exactly what training changed
    path = tmp_path / "path_finetuned.pt"
    torch.save(ft.state_dict(m1), path)
    m2 = ft.new_finetuned(base_model, **args)
    with torch.no_grad():
        assert not torch.equal(m2(IDS).logits, m1(IDS).logits)
    result = m2.load_state_dict(torch.load(path), strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    with torch.no_grad():
        assert torch.equal(m2(IDS).logits, m1(IDS).logits)


# ------------------------------------------------------------------ finetuna's two documented errors


def test_modules_not_to_quantize_after_quantize_is_c1(digest):
    base_model = _base()
    ft.quantize_base_model(base_model)
    before = digest(base_model)
    with pytest.raises(PlanError) as err:
        ft.new_finetuned(base_model, adapt_layers={"q_proj"}, modules_not_to_quantize={"fc1"})
    assert err.value.constraints == ["C1"]
    message = str(err.value)
    assert "modules_not_to_quantize names fc1" in message and "already holds it as int8" in message
    assert "load the base again" in message
    assert digest(base_model) == before


def test_modules_not_to_freeze_on_a_quantized_module_is_c2(digest):
    base_model = _base()
    ft.quantize_base_model(base_model)
    before = digest(base_model)
    with pytest.raises(PlanError) as err:
        ft.new_finetuned(
            base_model, adapt_layers={"q_proj"}, modules_not_to_freeze={"fc1"}, modules_not_to_quantize={"fc1"}
        )
    assert set(err.value.constraints) == {"C1", "C2"}
    assert "modules_not_to_freeze names fc1" in str(err.value)
    assert digest(base_model) == before


def test_quantize_base_model_again_cannot_unquantize():
    base_model = _base()
    ft.quantize_base_model(base_model)
    ft.quantize_base_model(base_model)  # the same again: nothing to do
    with pytest.raises(PlanError) as err:
        ft.quantize_base_model(base_model, {"lm_head", "fc1"})
    assert err.value.constraints == ["C1"] and "fc1" in str(err.value)


@pytest.mark.parametrize(
    "rule, default, remedy",
    [
        ("  - match: fc1\n    action: freeze\n", "quantize", "write `action: quantize` in rule 1"),
        ("  - match: fc1\n    action: adapt\n    quantize: none\n", "quantize", "drop rule 1"),
    ],
)
def test_rule_files_asking_for_full_precision_of_a_quantized_module_are_c1(write_rules, digest, rule, default, remedy):
    """freeze keeps a module's original precision: on a module the base already holds quantized that is C1."""
    base_model = _base()
    ft.quantize_base_model(base_model)
    before = digest(base_model)
    path = write_rules(f"quantize: int8\ndefault: {default}\nrules:\n{rule}")
    with pytest.raises(PlanError) as err:
        surgery.rewrite(base_model, path)
    assert set(err.value.constraints) == {"C1"}
    assert str(path) in str(err.value) and "already holds it as int8" in str(err.value) and remedy in str(err.value)
    assert digest(base_model) == before
    ok = surgery.rewrite(base_model, write_rules("quantize: int8\nrules:\n  - match: fc1\n    action: quantize\n"))
    assert _kind(ok, "model.decoder.layers.0.fc1") == "Linear8bitLt"
    # the default action covers what no rule names: `default: freeze` leaves those modules as the base holds them
    settled = digest(base_model)  # the first fine-tune moved LLM.int8's row scales into the layers' state
    rest = surgery.rewrite(
        base_model,
        write_rules(
            "quantize: int8\ndefault: freeze\nrules:\n  - match: q_proj\n    action: adapt\n", name="default.yaml"
        ),
    )
    assert _kind(rest, "model.decoder.layers.0.fc1") == "Linear8bitLt" and digest(base_model) == settled


# ----------------------------------------------------------- LoRA on OPT's learned positional embedding

MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1]])  # the second row left-padded


def _positional_rules(quantize: str = "none") -> dict:
    return {
        "quantize": quantize,
        "default": "freeze" if quantize == "none" else "quantize",
        "rules": [{"match": "embed_positions", "action": "adapt", "lora": {"r": 4, "alpha": 8}}],
    }


def _nonzero_adapter(finetune):
    layer = finetune.model.decoder.embed_positions
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g))
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    return layer


def test_positional_lora_reads_the_rows_opt_computes():
    """Reference: the unmodified model with its positional table replaced by W + scaling·(B·A)ᵀ, in fp32."""
    base = _base()
    finetuned = surgery.rewrite(base, _positional_rules())
    layer = _nonzero_adapter(finetuned)
    assert type(layer).__name__ == "LoraPositionalEmbedding" and layer.lora_A.shape == (4, 256 + 2)
    reference = _base()
    with torch.no_grad():
        delta = (layer.lora_B @ layer.lora_A).t() * layer.scaling
        reference.model.decoder.embed_positions.weight.add_(delta)
        for kwargs in ({}, {"attention_mask": MASK}, {"position_ids": torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10]] * 2)}):
            got, want = finetuned(IDS, **kwargs).logits, reference(IDS, **kwargs).logits
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), kwargs
            assert not torch.allclose(got, base(IDS, **kwargs).logits, atol=1e-3)
    with torch.no_grad():  # generation with a cache: the rows past the cache length
        out = finetuned.generate(IDS[:1, :4], max_new_tokens=4, do_sample=False)
        assert torch.equal(out, reference.generate(IDS[:1, :4], max_new_tokens=4, do_sample=False))


def test_positional_lora_trains_saves_merges_and_batches(tmp_path):
    base = _base()
    ft.quantize_base_model(base)
    finetuned = surgery.rewrite(base, _positional_rules("int8"))
    layer = _nonzero_adapter(finetuned)
    finetuned(IDS, attention_mask=MASK, labels=IDS).loss.backward()
    assert layer.lora_A.grad is not None and layer.lora_A.grad[:, 2:10].abs().sum() > 0
    assert layer.lora_A.grad[:, 11:].abs().sum() == 0  # rows past the 8 positions (+ offset 2) unread
    saved = surgery.save_adapter(finetuned, tmp_path / "pos.safetensors")
    again = surgery.load_adapter(base, saved)
    with torch.no_grad():
        want = finetuned(IDS, attention_mask=MASK).logits
        assert torch.equal(again(IDS, attention_mask=MASK).logits, want)
    fp32 = surgery.rewrite(_base(), _positional_rules())  # merged exactly where the base is not quantized
    _nonzero_adapter(fp32)
    with torch.no_grad():
        merged = surgery.merge(fp32)
        assert type(merged.model.decoder.embed_positions).__name__ == "OPTLearnedPositionalEmbedding"
        exact = fp32(IDS, attention_mask=MASK).logits
        assert torch.allclose(merged(IDS, attention_mask=MASK).logits, exact, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        assert torch.allclose(reloaded(IDS, attention_mask=MASK).logits, exact, atol=1e-5)
    from surgery.finetune.batched import batched, route

    sibling = surgery.rewrite(base, {"quantize": "int8", "rules": [{"match": "q_proj", "action": "adapt"}]})
    view = batched(base, [finetuned, sibling])
    route(view, [1, 1])
    with torch.no_grad():
        together = view(IDS, attention_mask=MASK).logits
        alone = [finetuned(IDS[:1], attention_mask=MASK[:1]).logits, sibling(IDS[1:], attention_mask=MASK[1:]).logits]
    assert torch.allclose(together, torch.cat(alone), atol=1e-4)


def test_positional_lora_in_rule_files_and_finetunas_granular_example():
    base = _base()
    typed = surgery.rewrite(base, {"rules": [{"type": "positional", "match": "*", "action": "adapt"}]})
    assert type(typed.model.decoder.embed_positions).__name__ == "LoraPositionalEmbedding"
    model_2 = ft.new_finetuned(
        _base(),
        adapt_layers={"embed_tokens", "embed_positions", "q_proj", "v_proj"},
        embedding_config=ft.EmbeddingAdapterConfig(r=4, alpha=1),
        linear_config={
            "q_proj": ft.LinearAdapterConfig(r=8, alpha=1, dropout=0.0, bias=False),
            "v_proj": ft.LinearAdapterConfig(r=4, alpha=1, dropout=0.1, bias=True),
        },
    )
    positions = model_2.model.decoder.embed_positions
    assert (positions.config.r, positions.config.lora_alpha) == (4, 1.0)
    with pytest.raises(PlanError, match="C3.*use_dora"):
        surgery.plan(base, {"rules": [{"match": "embed_positions", "action": "adapt", "lora": {"use_dora": True}}]})


def test_positional_lora_export_to_peft_is_refused_with_the_reason(tmp_path):
    finetuned = surgery.rewrite(_base(), _positional_rules())
    with pytest.raises(surgery.AdapterStateError, match="PEFT cannot express.*attention mask"):
        surgery.export_peft(finetuned, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
