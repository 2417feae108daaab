"""Packing: several examples per row, positions restarting, attention never crossing examples, so each
example's loss in a packed row equals its loss alone (every bundled tiny architecture)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import surgery
from surgery.base.tiny import tiny_model
from surgery.base.tokenizer import tiny_tokenizer
from surgery.errors import DataError, TrainError
from surgery.training.config import DataConfig
from surgery.training.data import IGNORE, TOKENS, Example, pack, tokenize
from surgery.training.job import TrainConfig, _packed_attention, make_job
from surgery.training.loop import train_jobs as train

TOK = tiny_tokenizer()
EXAMPLES = [
    Example("Paris", "France ->"),
    Example("LIMA", "lima ->"),
    Example("an owl", ""),
    Example("Tokyo is far", "Japan ->"),
    Example("x", "y"),
]


def unpacked() -> surgery.training.data.Blocks:
    return tokenize(EXAMPLES, TOK, block_size=32)


def test_rows_hold_whole_examples_in_order_with_restarting_positions():
    blocks = unpacked()
    packed = pack(blocks)
    lengths = blocks.attention_mask.sum(dim=1).tolist()
    assert len(packed) < len(blocks) and int(packed.attention_mask.sum()) == sum(lengths)
    real = packed.input_ids[packed.attention_mask.bool()]
    assert torch.equal(real, blocks.input_ids[blocks.attention_mask.bool()])  # every token, in order
    starts = (packed.position_ids == 0) & packed.attention_mask.bool()
    assert int(starts.sum()) == len(EXAMPLES)  # one restart per example
    assert (packed.labels[starts] == IGNORE).all()  # nothing predicts an example's first token
    batch = packed.batch(torch.arange(len(packed)))
    assert "attention_mask" not in batch and batch[TOKENS] == sum(lengths)


def packed_and_alone_losses(model, keep_apart) -> tuple[torch.Tensor, torch.Tensor]:
    """Each example's mean token loss inside packed rows, and its loss alone (an unpacked row), on the model's
    device."""
    device = next(model.parameters()).device
    blocks, packed = unpacked(), pack(unpacked(), keep_apart)
    with torch.no_grad():
        batch = packed.batch(torch.arange(len(packed)))
        assert ("attention_mask" in batch) == (keep_apart in ("bool", "additive"))
        inputs = {k: v.to(device) for k, v in batch.items() if k not in (TOKENS, "labels")}
        logits = model(**inputs, use_cache=False).logits.float().cpu()
        token_loss = F.cross_entropy(
            logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE, reduction="none"
        )
        example = torch.cumsum((batch["position_ids"] == 0).long(), dim=1)[:, 1:]  # which example each target is in
        got = []
        for row in range(batch["input_ids"].shape[0]):  # flattened: one row
            for k in example[row].unique().tolist():
                chosen = (example[row] == k) & (batch["labels"][row, 1:] != IGNORE)
                if chosen.any():
                    got.append(token_loss[row][chosen].mean())
        expected = []
        for row in range(len(blocks)):
            alone = {k: v.to(device) for k, v in blocks.batch(torch.tensor([row])).items() if k != TOKENS}
            expected.append(model(**alone, use_cache=False).loss.float().cpu())
    assert len(got) == len(expected) == len(EXAMPLES)
    return torch.stack(got), torch.stack(expected)


@pytest.mark.parametrize(
    "name,attention,keep_apart",
    [
        ("tiny-llama", "sdpa", "positions"),
        ("tiny-gpt2", "sdpa", "positions"),
        ("tiny-opt", "sdpa", "bool"),
        ("tiny-opt", "eager", "additive"),
    ],
)  # OPT's mask ignores position ids
def test_each_examples_loss_in_a_packed_row_is_its_loss_alone(name, attention, keep_apart):
    model = tiny_model(name).eval()  # fp32: LLM.int8's outlier columns depend on what else is in the batch
    model.config._attn_implementation = attention
    assert _packed_attention(model, name) == keep_apart  # the probe picks what keeps examples apart
    got, expected = packed_and_alone_losses(model, keep_apart)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_micro_batch_flattened_into_one_row_keeps_each_example_s_loss():
    """The form flash attention gets (transformers reads packed position ids only for a batch of one row): the
    rows of a micro-batch joined into one, each row's padded tail a segment of its own; checked here with SDPA,
    which reads the same position ids."""
    model = tiny_model("tiny-llama").eval()
    packed = pack(unpacked(), "flattened")
    batch = packed.batch(torch.arange(len(packed)))
    assert batch["input_ids"].shape[0] == 1 and len(packed) > 1 and "attention_mask" not in batch
    got, expected = packed_and_alone_losses(model, "flattened")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    model.config._attn_implementation = "flash_attention_2"
    calls = []
    original = model.forward

    def recorded(*args, **kwargs):  # no flash kernels here: the probe's call is answered by SDPA, as on one row
        calls.append(kwargs["input_ids"].shape)
        model.config._attn_implementation = "sdpa"
        try:
            return original(*args, **kwargs)
        finally:
            model.config._attn_implementation = "flash_attention_2"

    model.forward = recorded
    assert _packed_attention(model, "tiny-llama") == "flattened" and calls


def packed_job(**options):
    config = TrainConfig(batch_size=4, lr=1e-2, max_steps=15, seed=0)
    data_config = DataConfig(block_size=96, **options)
    return make_job(
        tiny_model("tiny-llama"),
        name="packed",
        rules="qv_lora_head",
        data="upper",
        tokenizer=TOK,
        config=config,
        data_config=data_config,
        model_name="tiny-llama",
    )


def test_a_packed_run_learns_and_its_eval_rows_stay_single():
    job = packed_job(packing=True, eval_split=0.2)
    assert job.data.position_ids is not None and job.eval_data.position_ids is None
    (run,) = train([job])
    losses = [r["loss"] for r in run.history if "loss" in r]
    assert losses[-1] < 0.7 * losses[0]


def test_an_opt_run_packs_with_a_block_diagonal_mask():
    config = TrainConfig(batch_size=4, lr=1e-2, max_steps=12, seed=0)
    job = make_job(
        tiny_model("tiny-opt"),
        name="opt",
        rules="qv_lora_head",
        data="upper",
        tokenizer=TOK,
        config=config,
        data_config=DataConfig(block_size=96, packing=True),
        model_name="tiny-opt",
    )
    assert job.data.packed_mask == "bool" and job.identity["packing"]
    (run,) = train([job])
    losses = [r["loss"] for r in run.history if "loss" in r]
    assert losses[-1] < 0.8 * losses[0]


def test_packing_refuses_what_it_cannot_mean(monkeypatch):
    opt = tiny_model("tiny-opt")
    attend_everywhere = lambda positions, form: torch.ones(1, 1, 6, 6, dtype=torch.bool)  # noqa: E731
    monkeypatch.setattr("surgery.training.job.block_mask", attend_everywhere)  # as a model that ignores both ways
    with pytest.raises(
        DataError, match="tiny-opt .OPTForCausalLM, sdpa attention. does not keep packed examples apart"
    ):
        make_job(
            opt,
            name="j",
            rules="qv_lora",
            data="upper",
            tokenizer=TOK,
            config=TrainConfig(),
            data_config=DataConfig(packing=True),
            model_name="tiny-opt",
        )
    assert not any(type(m).__name__.startswith("Linear8bit") for m in opt.modules())  # nothing changed
    monkeypatch.undo()
    with pytest.raises(DataError, match="--group-texts already concatenates"):
        packed_job(packing=True, group_texts=True)
    with pytest.raises(TrainError, match="--packing with --batched"):
        train([packed_job(packing=True)], batched=True)


def test_evaluating_packed_rows_gives_the_unpacked_token_mean():
    from surgery.training.loop import evaluate

    model = tiny_model("tiny-llama")
    packed, alone = evaluate(model, pack(unpacked()), batch_size=2), evaluate(model, unpacked(), batch_size=2)
    assert packed["eval_loss"] == pytest.approx(alone["eval_loss"], rel=1e-5)
