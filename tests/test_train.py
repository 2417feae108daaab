"""Training: data formats, a learnable toy task, exact resume, many fine-tunes = each alone, bad input."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

import surgery
from surgery.base.tiny import tiny_model
from surgery.base.tokenizer import tiny_tokenizer
from surgery.errors import TrainError
from surgery.training.config import DataConfig
from surgery.training.data import IGNORE, DataError, read_examples, tokenize
from surgery.training.job import TrainConfig, make_job
from surgery.training.loop import evaluate
from surgery.training.loop import train_jobs as train

TOK = tiny_tokenizer()


def job(base, name="job", rules="qv_lora_head", data="upper", out=None, block_size=24, **config):
    settings = {"batch_size": 8, "lr": 1e-2, "max_steps": 10, "seed": 0, **config}
    return make_job(
        base,
        name=name,
        rules=rules,
        data=data,
        tokenizer=TOK,
        config=TrainConfig(**settings),
        data_config=DataConfig(block_size=block_size),
        out=out,
        model_name="tiny-llama",
    )


def own(ft) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in surgery.base.ownership.own_state(ft).items()}


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------ data


def test_prompt_tokens_and_padding_carry_no_loss():
    blocks = tokenize(read_examples("upper"), TOK, block_size=16, mode="entries")
    row_ids, row_labels = blocks.input_ids[0].tolist(), blocks.labels[0].tolist()
    prompt = TOK("cat ->", add_special_tokens=False)["input_ids"]
    completion = TOK(" CAT", add_special_tokens=False)["input_ids"]
    n = len(prompt) + len(completion) + 1
    assert row_ids[:n] == prompt + completion + [TOK.eos_token_id]
    assert row_labels[:n] == [IGNORE] * len(prompt) + completion + [TOK.eos_token_id]
    assert row_labels[n:] == [IGNORE] * (16 - n) and row_ids[n:] == [TOK.pad_token_id] * (16 - n)
    assert blocks.attention_mask[0].tolist() == [1] * n + [0] * (16 - n)


def test_micro_batches_are_padded_to_their_longest_row_with_the_same_loss_and_gradients():
    """Dynamic padding: a micro-batch is cut to its longest row; the loss and gradients are those of the
    batch padded to --block-size (the unmodified computation), to fp32 rounding."""
    blocks = tokenize(read_examples("upper"), TOK, block_size=64, mode="entries")
    rows = torch.arange(8)
    batch = blocks.batch(rows)
    longest = int(blocks.attention_mask[rows].sum(dim=1).max())
    assert batch["input_ids"].shape == (8, longest) and longest < 64 // 2
    full = {
        "input_ids": blocks.input_ids[rows],
        "labels": blocks.labels[rows],
        "attention_mask": blocks.attention_mask[rows],
    }
    results = []
    for inputs in (batch, full):
        torch.manual_seed(0)  # the same adapter init for both
        ft = surgery.rewrite(tiny_model("tiny-llama"), "qv_lora_head")
        ft.eval()  # no dropout: the two computations must agree
        loss = ft(**inputs, use_cache=False).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in ft.named_parameters() if p.requires_grad}))
    (short, short_grads), (padded, padded_grads) = results
    torch.testing.assert_close(short, padded, rtol=1e-6, atol=0)
    for name in padded_grads:
        torch.testing.assert_close(short_grads[name], padded_grads[name], rtol=1e-5, atol=1e-7)


def test_corpus_mode_concatenates_with_eos_and_cuts_blocks(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("hello world\nsecond line\n")
    blocks = tokenize(read_examples(path), TOK, block_size=8, mode="corpus")
    stream = (
        TOK("hello world", add_special_tokens=False)["input_ids"]
        + [TOK.eos_token_id]
        + TOK("second line", add_special_tokens=False)["input_ids"]
        + [TOK.eos_token_id]
    )
    assert blocks.input_ids.shape == (len(stream) // 8, 8)
    assert blocks.input_ids.flatten().tolist() == stream[: len(stream) // 8 * 8]
    assert torch.equal(blocks.labels, blocks.input_ids) and bool(blocks.attention_mask.all())


def test_csv_and_jsonl_text_are_read(tmp_path):
    (tmp_path / "a.csv").write_text('id,text\n1,"first, with comma"\n2,second\n')
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"prompt": "p", "completion": "c"}\n')
    assert [e.completion for e in read_examples(tmp_path / "a.csv")] == ["first, with comma", "second"]
    assert read_examples(tmp_path / "b.jsonl")[1] == surgery.training.data.Example("c", "p")


def test_completions_cut_away_by_the_block_size_are_refused_or_counted(tmp_path):
    path = tmp_path / "long.jsonl"
    long_prompt = "describe this at length: " + "x" * 40
    path.write_text(json.dumps({"prompt": long_prompt, "completion": " fine"}) + "\n")
    with pytest.raises(
        DataError,
        match=r"long.jsonl: every example's completion lies beyond --block-size 16 "
        r"\(the longest prompt has 65 tokens\).*--block-size 71",
    ):
        tokenize(read_examples(path), TOK, block_size=16, source=str(path))
    with path.open("a") as f:
        f.write(json.dumps({"prompt": "short ->", "completion": " ok"}) + "\n")
    with pytest.warns(surgery.TruncationWarning, match="1 of 2 examples have no completion token"):
        blocks = tokenize(read_examples(path), TOK, block_size=16, source=str(path))
    assert (blocks.labels[1, 1:] != IGNORE).any() and (blocks.labels[0, 1:] == IGNORE).all()
    assert tokenize(read_examples(path), TOK, block_size=71, source=str(path)).labels[0, -1] == TOK.eos_token_id


def test_examples_without_text_are_named_as_empty_not_as_too_long(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"prompt": "q ->", "completion": ""}) + "\n")
    with pytest.raises(DataError, match=r"blank.jsonl: no example has a token to learn.*give examples with text") as e:
        tokenize(read_examples(path), TOK, block_size=16, source=str(path))
    assert "--block-size" not in str(e.value)
    with path.open("a") as f:
        f.write(json.dumps({"text": "some text"}) + "\n")
    with pytest.warns(surgery.TruncationWarning, match="2 of 3 examples are empty") as seen:
        tokenize(read_examples(path), TOK, block_size=16, source=str(path))
    assert not any("--block-size" in str(w.message) for w in seen)


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("missing.jsonl", None, "no such data file"),
        ("empty.jsonl", "", "is empty"),
        ("cols.csv", "id,body\n1,x\n", "cols.csv:1: a CSV needs a `text` column (found columns: id, body)"),
        ("bad.jsonl", '{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n', "bad.jsonl:3: not valid JSON"),
        ("keys.jsonl", '{"text": "ok"}\n{"input": "x"}\n', "keys.jsonl:2: needs a string `text`"),
        ("data.xlsx", "x", "unknown data format"),
        ("data.parquet", "x", "data.parquet: cannot be read as a dataset"),
    ],
)
def test_bad_data_files_name_the_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)").replace("`", "`")):
        read_examples(path)


def test_bad_setups_fail_before_training_and_keep_the_output_folder(tmp_path):
    base = tiny_model("tiny-llama")
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    with pytest.raises(DataError, match="above tiny-llama's maximum sequence length"):
        make_job(
            base,
            name="j",
            rules="qv_lora_head",
            data="upper",
            tokenizer=TOK,
            config=TrainConfig(),
            data_config=DataConfig(block_size=10_000),
            model_name="tiny-llama",
        )
    assert all(torch.equal(before[n], p) for n, p in base.named_parameters())  # nothing was quantized
    assert not any(type(m).__module__.startswith("bitsandbytes") for m in base.modules())

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("earlier\n")
    with pytest.raises(TrainError, match="holds an earlier run"):
        train([job(base, out=out)])
    assert (out / "metrics.jsonl").read_text() == "earlier\n"

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # running as root: permissions do not bind
            blocker = tmp_path / "file"
            blocker.write_text("x")
            unwritable = blocker / "sub"
        else:
            unwritable = locked / "sub"
        with pytest.raises(TrainError, match="cannot write there"):
            train([job(base, out=unwritable)])
    finally:
        locked.chmod(0o700)

    with pytest.raises(TrainError, match="--lr must be a finite number > 0"):
        job(base, lr=0.0)


def test_overwrite_moves_an_earlier_run_aside_and_the_cli_checks_out_before_loading(tmp_path):
    from typer.testing import CliRunner

    from surgery_cli.app import app

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("earlier\n")  # a killed run: metrics, no checkpoint
    runner = CliRunner()
    refused = runner.invoke(app, ["train", "qv_lora", "--model", "no-such-model", "--data", "upper", "--out", str(out)])
    assert refused.exit_code == 2, refused.output
    assert "holds an earlier run (metrics.jsonl); it has no checkpoint to resume from" in refused.output
    assert "--overwrite" in refused.output and "no-such-model" not in refused.output  # before any model loads
    (run,) = train([job(tiny_model("tiny-llama"), out=out, max_steps=2)], overwrite=True)
    assert (tmp_path / "run.replaced-1" / "metrics.jsonl").read_text() == "earlier\n"  # kept, not deleted
    assert (out / "adapter.safetensors").is_file() and run.step == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    again = runner.invoke(
        app,
        [
            "train",
            "qv_lora",
            "--model",
            "tiny-llama",
            "--data",
            "upper",
            "--out",
            str(out),
            "--max-steps",
            "1",
            "--block-size",
            "24",
            "--overwrite",
        ],
    )
    assert again.exit_code == 0, again.output
    assert (tmp_path / "run.replaced-2" / "adapter.safetensors").is_file()


def test_a_resume_folder_from_another_run_is_refused(tmp_path):
    base = tiny_model("tiny-llama")
    first = job(base, out=tmp_path / "a", save_steps=5)
    train([first])
    other = job(base, data="reverse", out=tmp_path / "b")
    with pytest.raises(TrainError, match="checkpoint of another run.*data"):
        train([other], resume={"job": tmp_path / "a" / "checkpoint-5"})
    assert not (tmp_path / "b" / "adapter.safetensors").exists()
    with pytest.raises(TrainError, match="not a checkpoint folder"):
        train([job(base, out=tmp_path / "c")], resume={"job": tmp_path / "a"})


# ------------------------------------------------------------------------------------ training


def test_a_toy_task_is_learned_and_generation_shows_it():
    base = tiny_model("tiny-llama")
    j = job(base, max_steps=120, warmup=10)
    j = dataclasses.replace(j, eval_data=j.data)
    before = evaluate(j.finetune, j.data)["eval_loss"]
    (run,) = train([j])
    after = evaluate(j.finetune, j.data)["eval_loss"]
    assert after < before / 2, (before, after)
    ids = TOK("owl ->", return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = j.finetune.eval().generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=TOK.pad_token_id)
    assert TOK.decode(out[0, ids.shape[1] :]).startswith(" OWL")
    assert run.history[-1]["eval_loss"] == pytest.approx(after)


def test_resume_is_bit_identical_to_training_straight_through(tmp_path):
    """20 steps straight (saving at step 10) vs a fresh process-like start: resume at 10, train 10 more."""
    straight = job(tiny_model("tiny-llama"), rules="qv_lora", max_steps=20, save_steps=10, out=tmp_path / "straight")
    (first,) = train([straight])  # qv_lora has dropout: the random state must be restored too
    resumed = job(tiny_model("tiny-llama"), rules="qv_lora", max_steps=20, out=tmp_path / "resumed")
    (second,) = train([resumed], resume={"job": tmp_path / "straight" / "checkpoint-10"})
    assert second.step == 20 and [r["step"] for r in second.history] == list(range(11, 21))
    assert_bit_identical(own(straight.finetune), own(resumed.finetune))
    assert [r["loss"] for r in second.history] == [r["loss"] for r in first.history[10:]]


def test_many_finetunes_on_one_base_equal_each_trained_alone():
    """Three rule files that store the base alike (every Linear but lm_head int8), so alone means the same base."""
    specs = [("caps", "lora_plus_head", "capitals"), ("up", "qv_lora", "upper"), ("rev", "all_linear_lora", "reverse")]
    base = tiny_model("tiny-llama")
    together = [job(base, name, rules, data, max_steps=8, block_size=40) for name, rules, data in specs]
    train(together)
    for (name, rules, data), trained in zip(specs, together):
        alone = job(tiny_model("tiny-llama"), name, rules, data, max_steps=8, block_size=40)
        train([alone])
        assert_bit_identical(own(trained.finetune), own(alone.finetune))
    shared = {id(p) for p in base.parameters()}
    for j in together:  # still one base: every frozen tensor is the base's own
        assert all(id(p) in shared for p in j.finetune.parameters() if not p.requires_grad)


def test_files_written_by_a_run(tmp_path):
    base = tiny_model("tiny-llama")
    j = job(base, max_steps=6, save_steps=2, save_total_limit=1, eval_steps=3, out=tmp_path / "run")
    train([dataclasses.replace(j, eval_data=j.data)])
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == ["adapter.safetensors", "checkpoint-6", "metrics.jsonl"]  # the last step's; 2 and 4 rotated out
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # each step once, the final eval in step 6's line
    assert [r["step"] for r in records if "eval_loss" in r] == [3, 6] and all("loss" in r for r in records)
    loaded = surgery.load_adapter(base, tmp_path / "run" / "adapter.safetensors")
    assert_bit_identical(own(loaded), own(j.finetune))


def test_the_8bit_optimizer_trains_with_bitsandbytes_on_this_cpu():
    """bitsandbytes 0.50 runs 8-bit AdamW on the CPU: the run must use it and move the adapters."""
    j = job(tiny_model("tiny-llama"), optimizer="adamw8bit", max_steps=2)
    before = own(j.finetune)
    (run,) = train([j])
    assert type(run.optimizer).__module__.startswith("bitsandbytes") and run.step == 2
    assert any(not torch.equal(before[k], v) for k, v in own(j.finetune).items())


def test_bf16_autocast_computes_in_bf16_and_trains():
    j = job(tiny_model("tiny-llama"), precision="bf16", max_steps=3)
    seen = set()
    projection = next(m for m in j.finetune.modules() if isinstance(m, torch.nn.Linear))
    projection.register_forward_hook(lambda module, args, output: seen.add(output.dtype))
    (run,) = train([j])
    assert seen == {torch.bfloat16}  # the matmuls ran under bf16 autocast
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in run.history)


def test_a_random_state_read_from_a_row_of_saved_states_installs_exactly():
    """A checkpoint keeps one state per rank in one tensor; rank 1's row is a view at an offset."""
    from surgery.random_state import new_rng, swap_rng

    cpu = torch.device("cpu")
    rows = torch.stack([new_rng(0, cpu), new_rng(5, cpu)])
    outer = swap_rng(rows[1], cpu)
    drawn = torch.rand(3)
    swap_rng(outer, cpu)
    torch.manual_seed(5)
    assert torch.equal(drawn, torch.rand(3))


def test_gradient_checkpointing_recomputes_layers_and_trains_the_same():
    """--gradient-checkpointing: each decoder layer runs again in backward; the trained adapter equals the one
    trained without (dropout on: its masks are replayed); the base and other fine-tunes keep their activations."""
    results, calls = [], []
    for checkpointing in (False, True):
        base = tiny_model("tiny-llama")
        the_job = job(base, max_steps=3, gradient_checkpointing=checkpointing)
        sibling = surgery.rewrite(base, "qv_lora_head")
        layer = the_job.finetune.model.layers[0].self_attn  # inside the checkpointed forward: again in backward
        count = [0]
        layer.register_forward_hook(lambda *args, count=count: count.__setitem__(0, count[0] + 1))
        train([the_job])
        results.append(own(the_job.finetune))
        calls.append(count[0])
        for model in (base, sibling):
            assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
            assert not model.get_input_embeddings()._forward_hooks  # transformers' input-grad hook: ours only
    assert calls == [3, 6]  # 3 steps of one micro-batch; with checkpointing each forward runs twice
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_with_batched_training_is_refused_before_loading():
    with pytest.raises(TrainError, match="--batched with --gradient-checkpointing: .*would route wrongly"):
        train([job(tiny_model("tiny-llama"), gradient_checkpointing=True)], batched=True)


# ------------------------------------------------------------------------------------ chat templates

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def chat_tokenizer():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def test_chat_template_puts_the_loss_on_the_assistants_answer_only(tmp_path):
    from surgery.training.data import chat_examples

    path = tmp_path / "chat.jsonl"
    path.write_text(
        json.dumps({"prompt": "cat", "completion": "CAT"})
        + "\n"
        + json.dumps(
            {
                "messages": [
                    {"role": "system", "content": "shout"},
                    {"role": "user", "content": "dog"},
                    {"role": "assistant", "content": "DOG"},
                    {"role": "user", "content": "owl"},
                    {"role": "assistant", "content": "OWL"},
                ]
            }
        )
        + "\n"
    )
    tok = chat_tokenizer()
    examples = chat_examples(read_examples(path), tok, str(path))
    assert [(e.prompt, e.completion) for e in examples] == [
        ("<user>cat</user>\n<assistant>", "CAT</assistant>\n"),
        (
            "<system>shout</system>\n<user>dog</user>\n<assistant>DOG</assistant>\n<user>owl</user>\n<assistant>",
            "OWL</assistant>\n",
        ),
    ]
    blocks = tokenize(examples, tok, block_size=128)
    prompt = tok(examples[1].prompt, add_special_tokens=False)["input_ids"]
    answer = tok(examples[1].completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(prompt) + len(answer)
    assert blocks.input_ids[1, :n].tolist() == prompt + answer
    assert blocks.labels[1, :n].tolist() == [IGNORE] * len(prompt) + answer  # earlier turns carry no loss


@pytest.mark.parametrize(
    "row, message",
    [
        ({"text": "plain"}, "a `text` row has no roles"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "ends with a 'user' turn"),
        ({"messages": [{"role": "user"}]}, "messages[0] needs a string `role` and a string `content`"),
        ({"messages": "hi"}, "`messages` must be a non-empty list"),
        (
            {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]},
            "chat template refused this conversation (TemplateError: no tools here)",
        ),
    ],
)
def test_chat_data_mistakes_name_the_line(tmp_path, row, message):
    from surgery.training.data import chat_examples

    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps(row) + "\n")
    tok = chat_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}"
        "{% endif %}{% endfor %}" + CHAT_TEMPLATE
    )
    with pytest.raises(
        DataError,
        match=f"{path}:2: .*" + message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]"),
    ):
        chat_examples(read_examples(path), tok, str(path))


def test_chat_template_needs_a_tokenizer_with_one():
    from surgery.training.data import chat_examples

    with pytest.raises(DataError, match="the tokenizer has no chat template"):
        chat_examples(read_examples("upper"), TOK, "upper")


# ------------------------------------------------------------------------------------ early stopping


def early_job(base, out=None, **config):
    # a threshold no eval loss can beat: the first evaluation is the best, the next two stop the run
    settings = {
        "max_steps": 20,
        "eval_steps": 2,
        "early_stopping_patience": 2,
        "early_stopping_threshold": 100.0,
        "schedule": "constant",
    }  # the learning rate of a step does not depend on max_steps
    return make_job(
        base,
        name="early",
        rules="qv_lora_head",
        data="upper",
        tokenizer=TOK,
        config=TrainConfig(**{"batch_size": 4, "lr": 1e-2, **settings, **config}),
        data_config=DataConfig(eval_split=0.2, block_size=24),
        out=out,
        model_name="tiny-llama",
    )


def test_early_stopping_stops_and_keeps_the_best_weights(tmp_path):
    (run,) = train([early_job(tiny_model("tiny-llama"), out=tmp_path / "e")])
    assert run.step == 6 and run.early.stopped  # evaluations at 2 (best), 4, 6: two without a better loss
    (reference,) = train([early_job(tiny_model("tiny-llama"), max_steps=2, early_stopping_patience=None)])
    assert_bit_identical(own(run.job.finetune), own(reference.job.finetune))  # the weights of step 2
    lines = [json.loads(line) for line in (tmp_path / "e" / "metrics.jsonl").read_text().splitlines()]
    stop = [line for line in lines if "early_stopping" in line]
    assert stop and stop[0]["early_stopping"] == {
        "stopped_at": 6,
        "best_step": 2,
        "best_eval_loss": lines[1]["eval_loss"],
    }
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]  # each step once: no second line for the end
    saved = surgery.read_adapter(tmp_path / "e" / "adapter.safetensors").tensors
    assert_bit_identical({k: saved[k] for k in saved}, {k: v for k, v in own(reference.job.finetune).items()})


def test_early_stopping_resumes_with_its_best_weights_and_count(tmp_path):
    (straight,) = train([early_job(tiny_model("tiny-llama"))])
    (first,) = train([early_job(tiny_model("tiny-llama"), out=tmp_path / "r", save_steps=4)])
    assert first.step == 6 and (tmp_path / "r" / "checkpoint-4").is_dir()  # evaluations since the best: 1
    resumed_job = early_job(tiny_model("tiny-llama"), out=tmp_path / "r", save_steps=4)
    (resumed,) = train([resumed_job], resume={"early": tmp_path / "r" / "checkpoint-4"})
    assert resumed.step == 6 and resumed.early.best_step == 2
    assert_bit_identical(own(resumed.job.finetune), own(straight.job.finetune))


def test_early_stopping_needs_an_evaluation():
    with pytest.raises(TrainError, match="add --eval-steps N and --eval FILE or --eval-split"):
        job(tiny_model("tiny-llama"), early_stopping_patience=2)
    with pytest.raises(TrainError, match="--early-stopping-patience must be at least 1"):
        early_job(tiny_model("tiny-llama"), early_stopping_patience=0)


@pytest.mark.parametrize("damage", ["count", "weights"])
def test_a_damaged_early_stopping_state_is_refused_on_resume(tmp_path, damage):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    train([early_job(tiny_model("tiny-llama"), out=tmp_path / "r", save_steps=4)])
    state_file = tmp_path / "r" / "checkpoint-4" / "training_state.safetensors"
    tensors = load_file(state_file)
    with safe_open(str(state_file), "pt") as f:
        state = json.loads(f.metadata()["state"])
    if damage == "count":
        state["early_stopping"]["evals_since_best"] = -1
    else:
        tensors = {k: v for k, v in tensors.items() if not k.startswith("early_stopping.best.") or "q_proj" in k}
    save_file(tensors, state_file, metadata={"state": json.dumps(state)})
    resumed = early_job(tiny_model("tiny-llama"), out=tmp_path / "r", save_steps=4)
    message = "early_stopping is not" if damage == "count" else "best weights kept for early stopping do not match"
    with pytest.raises(TrainError, match=message):
        train([resumed], resume={"early": tmp_path / "r" / "checkpoint-4"})
