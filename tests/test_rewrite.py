import copy
import hashlib

import pytest
import torch
from torch import nn

import surgery
from surgery.base.tiny import tiny_model
from surgery.errors import PlanError, RewriteError
from surgery.finetune.apply import apply
from surgery.layers.lora import LoraConv1D, LoraEmbedding, LoraLayer, LoraLinear
from surgery.model.architectures import TINY_MODELS
from surgery.planning.memory import extra_bytes, parameter_bytes
from surgery.rules.ruleset import LoraConfig

RULES = ["qv_lora", "all_linear_lora", "qlora_nf4", "finetuna_default", "full_finetune"]
IDS = torch.tensor([[5, 17, 99, 3, 200, 41, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8]])


def _hashes(model):
    """Content hash of every parameter, buffer and quantization scale of a model."""

    def digest(t):
        return hashlib.sha256(t.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()

    out = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]:
        out[name] = digest(t)
        for extra in ("SCB",):
            if isinstance(getattr(t, extra, None), torch.Tensor):
                out[f"{name}.{extra}"] = digest(getattr(t, extra))
    return out


@pytest.mark.parametrize("rules", RULES)
@pytest.mark.parametrize("model", list(TINY_MODELS))
def test_fresh_finetune_equals_base_and_plan_equals_measurement(model, rules):
    base = tiny_model(model)
    predicted = surgery.plan(base, rules)
    ft = surgery.rewrite(base, rules)
    with torch.no_grad():
        assert torch.equal(ft(IDS).logits, base(IDS).logits)
    assert isinstance(ft, type(base)) and isinstance(ft, surgery.Finetune) and type(ft).base_class is type(base)
    assert parameter_bytes(base) == predicted.base_bytes_after
    assert extra_bytes(ft, base) == predicted.finetune_bytes
    trainable = sum(p.numel() for p in ft.parameters() if p.requires_grad)
    assert trainable == predicted.trainable_params
    assert surgery.finetune_info(ft).rules.name == rules


def test_frozen_tensors_are_the_bases_own_objects():
    base = tiny_model("tiny-llama")
    ft = surgery.rewrite(base, "qv_lora")
    base_ids = {id(p) for p in base.parameters()} | {id(b) for b in base.buffers()}
    for name, p in ft.named_parameters():
        assert (id(p) in base_ids) != p.requires_grad, name
    for name, b in ft.named_buffers():
        assert id(b) in base_ids, name
    assert ft.model.layers[0] is not base.model.layers[0]  # own module objects: hooks are not shared
    ft.model.layers[0].register_forward_hook(lambda *a: None)
    assert not base.model.layers[0]._forward_hooks


def test_siblings_share_one_quantized_base():
    base = tiny_model("tiny-opt")
    fts = [surgery.rewrite(base, "qv_lora") for _ in range(4)]
    before = parameter_bytes(base)
    for ft in fts:
        assert extra_bytes(ft, base) == surgery.finetune_info(ft).plan.finetune_bytes
    assert parameter_bytes(base) == before  # quantized once, not per fine-tune
    base_fc1 = base.model.decoder.layers[0].fc1
    for ft in fts:
        fc1 = ft.model.decoder.layers[0].fc1
        assert fc1 is not base_fc1 and fc1.weight is base_fc1.weight and fc1.state.CB is base_fc1.state.CB


def test_training_one_finetune_leaves_siblings_and_base_untouched():
    base = tiny_model("tiny-opt")
    a = surgery.rewrite(base, "finetuna_default")  # adapters and a plain (untied) lm_head
    b = surgery.rewrite(base, "finetuna_default")
    with torch.no_grad():
        base_out, b_out = base(IDS).logits.clone(), b(IDS).logits.clone()
    hashes = _hashes(base)
    params = [p for p in a.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    a.train()
    for _ in range(20):
        loss = a(IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():  # A stays in training mode: that must not change how B or the base compute
        assert torch.equal(base(IDS).logits, base_out)
        assert torch.equal(b(IDS).logits, b_out)
        assert not torch.equal(a.eval()(IDS).logits, base_out)  # A did learn something
    assert _hashes(base) == hashes


def test_only_adapters_and_plain_modules_get_gradients():
    base = tiny_model("tiny-gpt2")
    ft = surgery.rewrite(base, "finetuna_default")
    ft(IDS, labels=IDS).loss.backward()
    for name, p in ft.named_parameters():
        has_grad = p.grad is not None
        expected = "lora_" in name or name.startswith("lm_head")
        assert has_grad == expected, name
    assert all(p.grad is None for p in base.parameters())


# ------------------------------------------------------------------------- LoRA against fp32 math


def _random_lora(layer):
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    return layer


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_linear_matches_hand_written_reference(rslora):
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    cfg = LoraConfig(r=4, lora_alpha=8, use_rslora=rslora, bias=True)
    lora = _random_lora(LoraLinear(base, cfg))
    with torch.no_grad():
        lora.lora_bias.normal_()
    x = torch.randn(3, 5, 16)
    s = 8 / (2 if rslora else 4)
    ref = x @ base.weight.T + base.bias + s * (x @ lora.lora_A.T @ lora.lora_B.T) + lora.lora_bias
    assert torch.allclose(lora(x), ref, atol=1e-5)
    assert lora.base_layer is base


def test_lora_conv1d_matches_hand_written_reference():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(12, 16)  # nf=out=12, nx=in=16, weight (16, 12)
    lora = _random_lora(LoraConv1D(base, LoraConfig(r=4, lora_alpha=16)))
    x = torch.randn(2, 7, 16)
    ref = x @ base.weight + base.bias + 4.0 * (x @ lora.lora_A.T @ lora.lora_B.T)
    assert torch.allclose(lora(x), ref, atol=1e-5)


def test_lora_embedding_matches_hand_written_reference():
    torch.manual_seed(0)
    base = nn.Embedding(30, 8)
    lora = _random_lora(LoraEmbedding(base, LoraConfig(r=2, lora_alpha=2)))
    ids = torch.tensor([[1, 5, 29], [0, 0, 3]])
    ref = base.weight[ids] + 1.0 * (lora.lora_A.T[ids] @ lora.lora_B.T)
    assert torch.allclose(lora(ids), ref, atol=1e-6)


def test_fresh_adapters_are_exact_no_ops():
    torch.manual_seed(0)
    base = nn.Linear(8, 8)
    lora = LoraLinear(base, LoraConfig(r=2, lora_dropout=0.5)).train()
    x = torch.randn(4, 8)
    assert torch.equal(lora(x), base(x))


def test_dropout_applies_to_the_adapter_input_only_in_training():
    torch.manual_seed(0)
    base = nn.Linear(8, 8)
    lora = _random_lora(LoraLinear(base, LoraConfig(r=2, lora_alpha=2, lora_dropout=0.5)))
    x = torch.randn(4, 8)
    torch.manual_seed(1)
    train_out = lora.train()(x)
    torch.manual_seed(1)
    dropped = torch.nn.functional.dropout(x, 0.5, training=True)
    assert torch.allclose(train_out, base(x) + dropped @ lora.lora_A.T @ lora.lora_B.T, atol=1e-5)
    assert torch.allclose(lora.eval()(x), base(x) + x @ lora.lora_A.T @ lora.lora_B.T, atol=1e-5)


def test_lora_under_autocast_returns_the_base_dtype():
    base = nn.Linear(8, 4)
    lora = _random_lora(LoraLinear(base, LoraConfig(r=2)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lora(torch.randn(2, 8))
        ref = base(torch.randn(2, 8))
    assert out.dtype == ref.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- quantization error


@pytest.mark.parametrize("model", list(TINY_MODELS))
@pytest.mark.parametrize("rules,bound", [("qv_lora", 0.03), ("qlora_nf4", 0.25)])
def test_quantization_error_against_fp32_is_bounded(model, rules, bound):
    """Relative logit error of the quantized base (measured: int8 ~0.01, nf4 ~0.1 on the tiny models)."""
    base = tiny_model(model)
    with torch.no_grad():
        ref = base(IDS).logits
        surgery.rewrite(base, rules)
        err = ((base(IDS).logits - ref).norm() / ref.norm()).item()
    assert 0 < err < bound


# ------------------------------------------------------------------------------------ PEFT parity


def _peft_twin(base, ft, targets, fan_in_fan_out=False):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets, fan_in_fan_out=fan_in_fan_out)
    twin = peft.get_peft_model(copy.deepcopy(base), cfg)
    ours = {n: m for n, m in ft.named_modules() if isinstance(m, LoraLayer)}
    assert ours
    for name, layer in ours.items():
        theirs = twin.base_model.model.get_submodule(name)
        with torch.no_grad():
            layer.lora_B.normal_(std=0.05)
            theirs.lora_A["default"].weight.copy_(layer.lora_A)
            theirs.lora_B["default"].weight.copy_(layer.lora_B)
    return twin.eval()


@pytest.mark.parametrize("quantized", [False, True])
def test_forward_matches_peft_on_linear(quantized):
    base = tiny_model("tiny-llama")
    rules = {
        "quantize": "int8" if quantized else "none",
        "default": "freeze",
        "rules": [{"match": "re:.*(q_proj|v_proj)", "action": "adapt", "lora": {"r": 8, "alpha": 16}}],
    }
    ft = surgery.rewrite(base, rules)
    twin = _peft_twin(base, ft, ["q_proj", "v_proj"])
    with torch.no_grad():
        ours, theirs = ft(IDS).logits, twin(input_ids=IDS).logits
    assert (ours - theirs).abs().max() <= (1e-4 if quantized else 1e-5) * max(1.0, theirs.abs().max())


def test_forward_matches_peft_on_conv1d():
    base = tiny_model("tiny-gpt2")
    ft = surgery.rewrite(
        base,
        {
            "quantize": "none",
            "default": "freeze",
            "rules": [{"match": "c_attn", "action": "adapt", "lora": {"r": 8, "alpha": 16}}],
        },
    )
    twin = _peft_twin(base, ft, ["c_attn"], fan_in_fan_out=True)
    with torch.no_grad():
        assert (ft(IDS).logits - twin(input_ids=IDS).logits).abs().max() <= 1e-5


# ---------------------------------------------------------------------------- failures and moves


def test_plan_errors_come_before_any_change():
    base = tiny_model("tiny-opt")
    types = {n: type(m) for n, m in base.named_modules()}
    with pytest.raises(PlanError):
        surgery.rewrite(base, {"quantize": "int8", "rules": [{"match": "q_projj", "action": "adapt"}]})
    assert {n: type(m) for n, m in base.named_modules()} == types
    assert all(p.requires_grad for p in base.parameters())


def test_failure_midway_restores_the_base(monkeypatch):
    import sys

    rw = sys.modules["surgery.finetune.rewriting"]  # the module, not the function surgery.rewrite

    base = tiny_model("tiny-opt")
    hashes, types = _hashes(base), {n: type(m) for n, m in base.named_modules()}
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected")
        return surgery.layers.lora.make_adapter(*args, **kwargs)

    monkeypatch.setattr(rw, "make_adapter", broken)
    with pytest.raises(RewriteError, match="base was restored"):
        surgery.rewrite(base, "qv_lora")
    assert {n: type(m) for n, m in base.named_modules()} == types
    assert _hashes(base) == hashes and all(p.requires_grad for p in base.parameters())


def test_moving_a_finetune_is_refused_but_no_op_moves_pass():
    base = tiny_model("tiny-opt")
    ft = surgery.rewrite(base, "qv_lora")
    with pytest.raises(RewriteError, match="break sharing"):
        ft.to(torch.float16)
    with pytest.raises(RewriteError):
        ft.half()
    assert ft.to("cpu") is ft and ft.float() is ft
    assert next(base.parameters()).dtype == torch.float32


def test_a_finetune_cannot_be_rewritten():
    ft = surgery.rewrite(tiny_model("tiny-opt"), "qv_lora")
    with pytest.raises(RewriteError, match="itself a fine-tune"):
        surgery.rewrite(ft, "qv_lora")


@pytest.mark.parametrize("model", list(TINY_MODELS))
def test_generate_matches_the_base_at_init(model):
    base = tiny_model(model)
    ft = surgery.rewrite(base, "qv_lora")
    prompt = IDS[:1, :4]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=256)
    assert torch.equal(ft.generate(prompt, **kwargs), base.generate(prompt, **kwargs))


def test_quantizing_twice_is_a_no_op():
    base = tiny_model("tiny-opt")
    surgery.rewrite(base, "qv_lora")
    fc1 = base.model.decoder.layers[0].fc1
    data = fc1.weight.data.clone()
    surgery.rewrite(base, "qv_lora")
    assert base.model.decoder.layers[0].fc1 is fc1 and torch.equal(fc1.weight.data, data)


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_base_loaded_with_bitsandbytes_config_is_recognised(tmp_path, scheme):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_model("tiny-llama").save_pretrained(tmp_path)
    config = (
        BitsAndBytesConfig(load_in_8bit=True)
        if scheme == "int8"
        else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    )
    base = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, device_map="cpu")
    graph = surgery.trace(base)
    assert graph.modules["model.layers.0.self_attn.q_proj"].quantized == scheme
    with pytest.raises(PlanError) as err:
        surgery.plan(graph, {"quantize": "none", "rules": [{"match": "q_proj", "action": "adapt"}]})
    assert set(err.value.constraints) == {"C1"}
    assert {v.module for v in err.value.violations} >= {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"}
    with pytest.raises(PlanError) as err:
        surgery.plan(graph, {"quantize": scheme, "rules": [{"match": "k_proj", "action": "plain"}]})
    assert set(err.value.constraints) == {"C2"}
    ft = surgery.rewrite(
        base, {"quantize": scheme, "default": "freeze", "rules": [{"match": "q_proj", "action": "adapt"}]}
    )
    with torch.no_grad():
        assert torch.equal(ft(IDS).logits, base(IDS).logits)
    assert sum(p.numel() for p in ft.parameters() if p.requires_grad) == 2 * 8 * (64 + 64)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_new_finetune_keeps_the_bases_mode_in_every_module(mode):
    """New adapter modules must not switch dropout on in an eval model (or off in a training one)."""
    base = getattr(tiny_model("tiny-llama"), mode)()
    ft = surgery.rewrite(base, "qv_lora")
    assert {m.training for m in ft.modules()} == {mode == "train"}


def test_quantizing_more_under_existing_finetunes_warns_and_prepare_base_avoids_it(tmp_path):
    import warnings

    base = tiny_model("tiny-opt")
    early = surgery.rewrite(base, "qv_lora_head")  # leaves fc1/fc2/k/out in fp32
    with pytest.warns(surgery.SharedBaseWarning, match="use unquantized"):
        surgery.rewrite(base, "lora_plus_head")  # quantizes them now
    saved = surgery.read_adapter(surgery.save_adapter(early, tmp_path / "early.safetensors"))
    assert all("lora" in k or k.startswith("lm_head") for k in saved.tensors)  # own tensors only

    fresh = tiny_model("tiny-opt")
    surgery.prepare_base(fresh, "qv_lora_head", "lora_plus_head")
    with warnings.catch_warnings():
        warnings.simplefilter("error", surgery.SharedBaseWarning)
        first = surgery.rewrite(fresh, "qv_lora_head")
        surgery.rewrite(fresh, "lora_plus_head")
    assert type(first.model.decoder.layers[0].fc1).__name__ == "Linear8bitLt"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("quantize", ["int8", "{scheme: nf4, compute_dtype: float32}", "nf4"])
def test_plan_is_byte_exact_on_half_precision_bases_before_and_after_forward(dtype, quantize, write_rules):
    """bitsandbytes casts a 4-bit layer's bias to its compute dtype on the first forward: planned, done once."""
    rules = write_rules(
        f"version: 1\nquantize: {quantize}\ndefault: quantize\nrules:\n"
        "  - {match: 're:.*q_proj', action: adapt, lora: {r: 4}}\n"
    )
    base = tiny_model("tiny-opt").to(dtype)
    assert base.model.decoder.layers[0].fc1.bias is not None  # OPT's biases are what bitsandbytes casts
    applied = apply(base, rules, finetunes=2)  # runs each fine-tune and the base once
    assert applied.base_bytes == applied.plan.base_bytes_after
    assert applied.own_bytes == (applied.plan.finetune_bytes,) * 2
    with torch.no_grad():
        applied.finetunes[0](IDS)
    assert parameter_bytes(base) == applied.plan.base_bytes_after
    assert surgery.plan(base, rules).base_bytes_after == applied.plan.base_bytes_after  # nothing left to cast


@pytest.fixture
def notices(caplog):
    """The int8 notice's records, with this process's record of shown notices and any CLI filters cleared."""
    import contextlib
    import logging

    from surgery.layers import notices

    notices._ONCE.seen.clear()  # this process may have shown the notice already
    saved = {name: list(logging.getLogger(name).filters) for name in notices.NOTICES}
    for name, filters in saved.items():  # filters an earlier CLI command in this process left on the loggers
        for f in filters:
            logging.getLogger(name).removeFilter(f)

    @contextlib.contextmanager
    def recorded():
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="bitsandbytes.autograd._functions"):
            found: list[str] = []
            yield found
            found += [r.getMessage() for r in caplog.records if "MatMul8bitLt" in r.getMessage()]

    yield recorded
    for name, filters in saved.items():
        for f in filters:
            logging.getLogger(name).addFilter(f)
    assert all(notices._ONCE not in logging.getLogger(name).filters for name in notices.NOTICES)


ONCE = ["MatMul8bitLt: inputs will be cast from torch.float32 to float16 during quantization"]


def test_bitsandbytes_notices_reach_the_log_once_through_surgery_and_unfiltered_outside(notices):
    from surgery.finetune.batched import batched, route

    base = tiny_model("tiny-llama")
    ft = surgery.rewrite(base, "qv_lora")  # an int8 base: every int8 matmul of fp32 inputs logs a notice
    ids = torch.tensor([[1, 2, 3]])
    with notices() as through_surgery:
        for _ in range(3):
            ft(input_ids=ids)
        ft.generate(ids, max_new_tokens=3, do_sample=False)
        view = batched(base, [ft, None])
        route(view, [1, 1])
        view(input_ids=torch.cat([ids, ids]))
    with notices() as direct:
        base(input_ids=ids)  # not a surgery call: bitsandbytes' own behaviour, a notice per int8 layer
    assert through_surgery == ONCE and len(direct) > 1


def test_training_through_the_library_shows_bitsandbytes_notices_once(notices):
    with notices() as seen:
        surgery.train(
            "tiny-opt",
            "qv_lora",
            data="capitals",
            training=surgery.TrainConfig(max_steps=2, batch_size=4, eval_steps=2),
            data_config=surgery.DataConfig(block_size=40, eval_split=0.2),
        )
    assert seen == ONCE


def test_a_finetune_records_the_storage_its_base_holds_so_siblings_load_together_again(tmp_path):
    """A rule file that says only `quantize: nf4`, on a base a sibling quantized with double quantization, follows
    the base; its adapter file records that storage, so both adapters load onto one fresh base with their outputs."""
    rules = tmp_path / "nf4.yaml"
    rules.write_text("version: 1\nquantize: nf4\ndefault: freeze\nrules:\n  - {match: q_proj, action: adapt}\n")
    base = tiny_model("tiny-llama")
    first, second = surgery.rewrite(base, "qlora_nf4"), surgery.rewrite(base, rules)
    assert surgery.load_rules(rules).quantize.double_quant is False  # as written
    assert second.surgery_info.rules.quantize.double_quant is True  # as trained
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        for ft in (first, second):
            for tensor in ft.own_state().values():
                tensor.add_(torch.randn(tensor.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
        expected = [ft.eval()(input_ids=ids).logits for ft in (first, second)]
    files = []
    for name, ft in (("first", first), ("second", second)):
        files.append(surgery.read_adapter(surgery.save_adapter(ft, tmp_path / f"{name}.safetensors")))
    fresh = surgery.load_model("tiny-llama", rules=[f.rules for f in files]).model
    with torch.no_grad():
        got = [surgery.load_adapter(fresh, f).eval()(input_ids=ids).logits for f in files]
    for g, e in zip(got, expected):
        assert torch.equal(g, e)
