"""Many fine-tunes, one base pass: the batched view equals each fine-tune run alone."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import surgery
from surgery.base.loading import build_from_config, config_from_dict
from surgery.base.ownership import own_state
from surgery.base.tiny import tiny_model
from surgery.base.tokenizer import tiny_tokenizer
from surgery.errors import DataError, RewriteError, TrainError
from surgery.finetune.batched import batched, generate, route
from surgery.model.architectures import TINY_MODELS
from surgery.training.config import DataConfig
from surgery.training.job import TrainConfig, make_job
from surgery.training.loop import train_jobs as train
from surgery_cli.app import app

TOK = tiny_tokenizer()
FP32 = [
    {"quantize": "none", "default": "freeze", "rules": [{"match": "q_proj", "action": "adapt", "lora": {"r": 8}}]},
    {
        "quantize": "none",
        "default": "freeze",
        "rules": [
            {"match": "v_proj", "action": "adapt", "lora": {"r": 2, "alpha": 4}},
            {"match": "lm_head", "action": "plain", "untie": True},
        ],
    },
]
NF4 = [
    "qlora_nf4",
    {
        "quantize": "nf4",
        "default": "quantize",
        "rules": [
            {"match": "q_proj", "action": "adapt", "lora": {"r": 4}},
            {"match": "lm_head", "action": "plain", "untie": True},
        ],
    },
]
INT8_EXACT = [
    {"quantize": {"scheme": "int8", "threshold": 0.0}, "rules": [{"match": "q_proj", "action": "adapt"}]},
    {"quantize": {"scheme": "int8", "threshold": 0.0}, "rules": [{"match": "v_proj", "action": "adapt"}]},
]


def finetunes(model: str, rules: list) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    """A base and three trained-looking fine-tunes from two rule files (different ranks, a plain lm_head)."""
    base = tiny_model(model)
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
        rules = [
            r
            if isinstance(r, str)
            else {**r, "rules": [{**x, "match": names.get(x["match"], x["match"])} for x in r["rules"]]}
            for r in rules
        ]
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
    loss = sum(
        torch.nn.functional.cross_entropy(
            logits[2 * i : 2 * i + 2, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
        )
        for i in range(3)
    )
    loss.backward()
    for ft, reference in zip(fts, alone):
        for k, p in own_state(ft).items():
            assert torch.allclose(p.grad, reference[k], rtol=1e-5, atol=1e-7), k


def test_lora_dropout_draws_from_each_finetunes_own_stream():
    rules = [
        {
            "quantize": "none",
            "default": "freeze",
            "rules": [{"match": "q_proj", "action": "adapt", "lora": {"dropout": 0.5}}],
        }
    ] * 2
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
            out = (
                (entry or base)
                .eval()
                .generate(
                    **encoded,
                    max_new_tokens=10,
                    do_sample=False,
                    pad_token_id=TOK.pad_token_id,
                    eos_token_id=TOK.eos_token_id,
                )
            )
        assert got == TOK.batch_decode(out[:, encoded.input_ids.shape[1] :], skip_special_tokens=True)


def test_sampled_rows_draw_from_their_own_seed_whatever_shares_the_batch():
    base, fts = finetunes("tiny-llama", FP32)
    prompts = ["owl ->", "The capital of Peru is", "x"]
    options = {"max_new_tokens": 12, "temperature": 0.9, "top_p": 0.9, "top_k": 50}
    together = generate(base, [fts[0], fts[1], None], prompts, TOK, seed=3, **options)
    assert generate(base, [fts[1]], prompts, TOK, seed=3, **options) == [together[1]]
    assert generate(base, [None], prompts[1:], TOK, seed=4, **options) == [together[2][1:]]  # prompt i: seed + i
    assert generate(base, [fts[1]], prompts, TOK, seed=5, **options) != [together[1]]
    greedy = generate(base, fts, prompts, TOK, max_new_tokens=12)
    assert generate(base, fts, prompts, TOK, max_new_tokens=12, temperature=1.0, top_k=1, seed=9) == greedy
    assert generate(base, fts, prompts, TOK, max_new_tokens=12, temperature=1.0, top_p=1e-6, seed=9) == greedy


def test_bad_batches_are_refused():
    base, fts = finetunes("tiny-llama", FP32)
    other_base, other = finetunes("tiny-llama", FP32)
    with pytest.raises(RewriteError, match="fine-tune of another base"):
        batched(base, [fts[0], other[0]])
    with pytest.raises(RewriteError, match="not a fine-tune"):
        batched(base, [base])
    with pytest.raises(DataError, match="no prompts"):
        generate(base, fts, [], TOK)
    for bad, message in (
        ({"temperature": -1.0}, "--temperature"),
        ({"top_p": 0.0}, "--top-p"),
        ({"top_k": -1}, "--top-k"),
        ({"max_new_tokens": 0}, "--max-new-tokens"),
    ):
        with pytest.raises(DataError, match=message):
            generate(base, fts, ["x"], TOK, **bad)
    view = batched(base, fts)
    with pytest.raises(RewriteError, match="one row count per entry"):
        route(view, [1, 1])
    route(view, [1, 1, 1])
    with pytest.raises(RewriteError, match="routed for 3"):
        view(input_ids=torch.zeros(4, 5, dtype=torch.long))


def test_a_finetune_whose_base_was_quantized_again_is_refused():
    base = tiny_model("tiny-llama")
    early = surgery.rewrite(base, FP32[0])
    with pytest.warns(surgery.SharedBaseWarning):
        surgery.rewrite(base, "qlora_nf4")  # quantizes modules the early fine-tune still holds in fp32
    with pytest.raises(RewriteError, match="not the base's tensor any more"):
        batched(base, [early])


# ------------------------------------------------------------------------------------ batched training

NO_DROPOUT = {
    "tiny-opt": {"dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0},
    "tiny-gpt2": {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
}
NAMES = {"tiny-gpt2": {"q_proj": "c_attn", "v_proj": "c_proj"}}


def base_without_dropout(model: str) -> torch.nn.Module:
    """A tiny model whose base has no dropout (tiny-llama has none), so batched and alone draw alike."""
    spec = {**TINY_MODELS[model], **NO_DROPOUT.get(model, {})}
    return build_from_config(config_from_dict(spec), device="cpu", seed=0)


def training_jobs(base, model: str, quantize: str, out=None, **config) -> list:
    """Three jobs that differ in everything batching must cope with: rules (ranks, LoRA dropout, a plain
    lm_head), data, batch size, block size, gradient accumulation and step count (one ends early)."""
    names = NAMES.get(model, {})
    lora = {
        "quantize": quantize,
        "default": "freeze",
        "rules": [{"match": names.get("q_proj", "q_proj"), "action": "adapt", "lora": {"r": 8, "dropout": 0.1}}],
    }
    head = {
        "quantize": quantize,
        "default": "freeze",
        "rules": [
            {"match": names.get("v_proj", "v_proj"), "action": "adapt", "lora": {"r": 2, "alpha": 4}},
            {"match": "lm_head", "action": "plain", "untie": True},
        ],
    }
    specs = [
        ("a", lora, "upper", 4, 1, 5, 24),
        ("b", head, "capitals", 2, 2, 3, 40),
        ("c", lora, "reverse", 3, 1, 4, 16),
    ]
    surgery.prepare_base(base, lora, head)
    return [
        make_job(
            base,
            name=name,
            rules=rules,
            data=data,
            tokenizer=TOK,
            config=TrainConfig(batch_size=batch, grad_accum=accum, lr=1e-2, max_steps=steps, seed=i, **config),
            data_config=DataConfig(block_size=block),
            out=out / name if out else None,
            model_name=model,
        )
        for i, (name, rules, data, batch, accum, steps, block) in enumerate(specs)
    ]


def assert_same_adapters(runs_a, runs_b, rtol: float) -> None:
    """Each trained tensor within ``rtol`` of the other run's, as ||a - b|| / ||b|| (a few elements that rounding
    sends the other way move the norm little; the largest element alone would measure one element's luck)."""
    for a, b in zip(runs_a, runs_b):
        mine, theirs = own_state(a.job.finetune), own_state(b.job.finetune)
        assert mine.keys() == theirs.keys() and mine
        for k in mine:
            assert (mine[k] - theirs[k]).norm() <= rtol * theirs[k].norm(), (a.job.name, k)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-opt", "tiny-gpt2"])
@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_batched_training_equals_taking_turns(model, quantize):
    base = base_without_dropout(model)
    alone = train(training_jobs(base, model, quantize))
    together = train(training_jobs(base, model, quantize), batched=True)
    assert [r.step for r in together] == [5, 3, 4]
    # Turn-taking cuts each micro-batch to its longest row, the pass pads every job's to the longest of all:
    # other matmul shapes, fp32 rounding. Losses agree to 1e-5 (below); the adapters less tightly, because
    # AdamW's first steps move each element of B (0 at init) by about lr whatever its gradient's size, so a
    # gradient element near 0 whose sign rounding flips moves the other way (seen: 1.1e-3 of the largest element
    # on a CPU with AVX512-BF16, 6e-5 in norm).
    # The gradients of one pass are compared to 1e-5 in test_batched_gradients_equal_each_finetune_alone.
    assert_same_adapters(together, alone, rtol=1e-3)
    for a, b in zip(together, alone):
        assert [r["loss"] for r in a.history] == pytest.approx([r["loss"] for r in b.history], rel=1e-5)


def test_base_dropout_makes_batched_training_match_only_statistically():
    """tiny-opt has base dropout 0.1: drawn once over the whole pass, so the adapters differ from turn-taking."""
    alone = train(training_jobs(tiny_model("tiny-opt"), "tiny-opt", "none"))
    together = train(training_jobs(tiny_model("tiny-opt"), "tiny-opt", "none"), batched=True)
    first = [(a.history[0]["loss"], b.history[0]["loss"]) for a, b in zip(together, alone)]
    assert all(x != y and x == pytest.approx(y, rel=0.02) for x, y in first)


def test_a_memory_cap_splits_the_pass_into_sub_groups_with_the_same_result():
    base = base_without_dropout("tiny-llama")
    whole = train(training_jobs(base, "tiny-llama", "none"), batched=True)
    capped = train(training_jobs(base, "tiny-llama", "none"), batched=True, max_batched_tokens=100)  # < 4 x 24
    assert_same_adapters(capped, whole, rtol=1e-3)  # sub-groups pad to their own longest row: see above
    with pytest.raises(TrainError, match="--max-batched-tokens must be at least 1"):
        train(training_jobs(base, "tiny-llama", "none"), batched=True, max_batched_tokens=0)
    with pytest.raises(TrainError, match="add --batched"):
        train(training_jobs(base, "tiny-llama", "none"), max_batched_tokens=100)


def test_a_batched_run_resumes_exactly_and_records_its_grouping(tmp_path):
    base = base_without_dropout("tiny-llama")
    straight = train(training_jobs(base, "tiny-llama", "none", out=tmp_path / "straight", save_steps=2), batched=True)
    checkpoints = {r.job.name: tmp_path / "straight" / r.job.name / "checkpoint-2" for r in straight}
    with pytest.raises(TrainError, match="checkpoint of another run.*batched"):
        train(training_jobs(base, "tiny-llama", "none", out=tmp_path / "alone"), resume=checkpoints)
    resumed = train(
        training_jobs(base, "tiny-llama", "none", out=tmp_path / "resumed"), batched=True, resume=checkpoints
    )
    assert [r.history[0]["step"] for r in resumed] == [3, 3, 3]
    assert_same_adapters(resumed, straight, rtol=1e-6)
    for a, b in zip(resumed, straight):
        assert [r["loss"] for r in a.history] == pytest.approx([r["loss"] for r in b.history[2:]], rel=1e-6)


def test_cli_train_batched_writes_the_adapters_taking_turns_writes(tmp_path):
    args = [
        "train",
        "--model",
        "tiny-llama",
        "--job",
        "caps=lora_plus_head,capitals",
        "--job",
        "up=qv_lora,upper",
        "--max-steps",
        "6",
        "--lr",
        "1e-2",
        "--block-size",
        "40",
    ]
    runner = CliRunner()
    for name, extra in (("turns", []), ("batched", ["--batched", "--max-batched-tokens", "200"])):
        result = runner.invoke(app, [*args, "--out", str(tmp_path / name), *extra])
        assert result.exit_code == 0, result.output
    for job in ("caps", "up"):
        turns, together = (load_file(tmp_path / name / job / "adapter.safetensors") for name in ("turns", "batched"))
        assert turns.keys() == together.keys() and turns
        for k in turns:
            assert torch.allclose(together[k], turns[k], rtol=1e-5, atol=1e-6), (job, k)
    refused = runner.invoke(app, [*args, "--out", str(tmp_path / "x"), "--max-batched-tokens", "64"])
    assert refused.exit_code == 2 and "add --batched" in refused.output and not (tmp_path / "x").exists()
