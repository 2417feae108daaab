"""Many fine-tunes, one base pass: the batched view equals each fine-tune run alone."""

from __future__ import annotations

import pytest
import torch

import surgery
from surgery.batched import batched, generate, route
from surgery.errors import DataError, RewriteError
from surgery.finetune import own_state

TOK = surgery.tiny_tokenizer()
FP32 = [{"quantize": "none", "default": "freeze", "rules": [{"match": "q_proj", "action": "adapt", "lora": {"r": 8}}]},
        {"quantize": "none", "default": "freeze", "rules": [
            {"match": "v_proj", "action": "adapt", "lora": {"r": 2, "alpha": 4}},
            {"match": "lm_head", "action": "plain", "untie": True}]}]
NF4 = ["qlora_nf4", {"quantize": "nf4", "default": "quantize", "rules": [
    {"match": "q_proj", "action": "adapt", "lora": {"r": 4}}, {"match": "lm_head", "action": "plain", "untie": True}]}]
INT8_EXACT = [{"quantize": {"scheme": "int8", "threshold": 0.0}, "rules": [{"match": "q_proj", "action": "adapt"}]},
              {"quantize": {"scheme": "int8", "threshold": 0.0}, "rules": [{"match": "v_proj", "action": "adapt"}]}]


def finetunes(model: str, rules: list) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    """A base and three trained-looking fine-tunes from two rule files (different ranks, a plain lm_head)."""
    base = surgery.tiny_model(model)
    surgery.prepare_base(base, *rules)
    fts = [surgery.rewrite(base, r) for r in (rules[0], rules[1], rules[0])]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for ft in fts:
            for p in own_state(ft).values():
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return base, fts


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-opt", "tiny-gpt2"])
@pytest.mark.parametrize("rules", [FP32, NF4, INT8_EXACT], ids=["fp32", "nf4", "int8-threshold-0"])
def test_batched_logits_equal_each_finetune_alone(model, rules):
    if model == "tiny-gpt2":  # GPT-2 names its projections c_attn / c_proj
        names = {"q_proj": "c_attn", "v_proj": "c_proj"}
        rules = [r if isinstance(r, str) else {**r, "rules": [{**x, "match": names.get(x["match"], x["match"])}
                                                              for x in r["rules"]]} for r in rules]
    base, fts = finetunes(model, rules)
    entries = [fts[0], None, fts[1], fts[2]]
    view = batched(base, entries)
    assert not any(p.requires_grad for p in view.parameters())  # the fine-tunes own every trainable tensor
    ids = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(1))
    counts = [2, 1, 3, 2]
    rows = torch.cat([ids[:n] for n in counts])
    route(view, counts)
    with torch.no_grad():
        together = view(input_ids=rows).logits
        alone = torch.cat([(m or base)(input_ids=ids[:n]).logits for m, n in zip(entries, counts)])
    assert (together - alone).abs().max() <= 1e-5 * alone.abs().max()


def test_batched_gradients_equal_each_finetune_alone():
    base, fts = finetunes("tiny-llama", FP32)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(2))
    alone = []
    for ft in fts:
        ft.zero_grad()
        ft(input_ids=ids, labels=ids).loss.backward()
        alone.append({k: p.grad.clone() for k, p in own_state(ft).items()})
        ft.zero_grad()
    view = batched(base, fts)
    route(view, [2, 2, 2])
    logits = view(input_ids=ids.repeat(3, 1)).logits
    loss = sum(torch.nn.functional.cross_entropy(logits[2 * i:2 * i + 2, :-1].reshape(-1, logits.shape[-1]),
                                                 ids[:, 1:].reshape(-1)) for i in range(3))
    loss.backward()
    for ft, reference in zip(fts, alone):
        for k, p in own_state(ft).items():
            assert torch.allclose(p.grad, reference[k], rtol=1e-5, atol=1e-7), k


def test_lora_dropout_draws_from_each_finetunes_own_stream():
    rules = [{"quantize": "none", "default": "freeze",
              "rules": [{"match": "q_proj", "action": "adapt", "lora": {"dropout": 0.5}}]}] * 2
    base, fts = finetunes("tiny-llama", rules)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(3))
    alone = []
    for seed, ft in enumerate(fts):
        ft.train()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            alone.append(ft(input_ids=ids).logits)
    view = batched(base, fts)
    route(view, [2, 2, 2], rngs=[torch.Generator().manual_seed(s).get_state() for s in range(3)])
    together = view.train()(input_ids=ids.repeat(3, 1)).logits
    assert torch.allclose(together, torch.cat(alone), rtol=1e-5, atol=1e-6)


def test_llm_int8_outliers_make_rows_depend_on_their_batch_within_a_bound():
    rules = [{"quantize": "int8", "rules": [{"match": "q_proj", "action": "adapt"}]}] * 2
    base, fts = finetunes("tiny-llama", rules)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(4))
    view = batched(base, fts)
    route(view, [2, 2, 2])
    with torch.no_grad():
        together = view(input_ids=ids.repeat(3, 1)).logits
        alone = torch.cat([ft(input_ids=ids).logits for ft in fts])
    assert (together - alone).abs().max() <= 0.05 * alone.abs().max()


@pytest.mark.parametrize("rules", [FP32, NF4], ids=["fp32", "nf4"])
def test_batched_generation_equals_each_finetunes_own_greedy_generate(rules):
    base, fts = finetunes("tiny-llama", rules)
    prompts = ["owl ->", "The capital of Peru is", "x"]
    entries = [*fts, None]
    answers = generate(base, entries, prompts, TOK, max_new_tokens=10)
    encoded = TOK(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    for entry, got in zip(entries, answers):
        with torch.no_grad():
            out = (entry or base).eval().generate(**encoded, max_new_tokens=10, do_sample=False,
                                                   pad_token_id=TOK.pad_token_id, eos_token_id=TOK.eos_token_id)
        assert got == TOK.batch_decode(out[:, encoded.input_ids.shape[1]:], skip_special_tokens=True)


def test_bad_batches_are_refused():
    base, fts = finetunes("tiny-llama", FP32)
    other_base, other = finetunes("tiny-llama", FP32)
    with pytest.raises(RewriteError, match="fine-tune of another base"):
        batched(base, [fts[0], other[0]])
    with pytest.raises(RewriteError, match="not a fine-tune"):
        batched(base, [base])
    with pytest.raises(DataError, match="no prompts"):
        generate(base, fts, [], TOK)
    view = batched(base, fts)
    with pytest.raises(RewriteError, match="one row count >= 0 per entry"):
        route(view, [1, 1])
    route(view, [1, 1, 1])
    with pytest.raises(RewriteError, match="routed for 3"):
        view(input_ids=torch.zeros(4, 5, dtype=torch.long))


def test_a_finetune_whose_base_was_quantized_again_is_refused():
    base = surgery.tiny_model("tiny-llama")
    early = surgery.rewrite(base, FP32[0])
    with pytest.warns(surgery.SharedBaseWarning):
        surgery.rewrite(base, "qlora_nf4")  # quantizes modules the early fine-tune still holds in fp32
    with pytest.raises(RewriteError, match="not the base's tensor any more"):
        batched(base, [early])
