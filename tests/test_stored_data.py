"""Data as the datasets library stores it (save_to_disk folders, .parquet, .arrow, the local datasets cache) and
field mappings: the same rows give the same token blocks as the JSONL they came from; mistakes name the source."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from surgery.base.tiny import tiny_model
from surgery.base.tokenizer import tiny_tokenizer
from surgery.errors import DataError
from surgery.training.config import DataConfig
from surgery.training.data import Fields, bundled_data, read_examples, tokenize
from surgery.training.job import TrainConfig, make_job
from surgery.training.loop import train_jobs as train

datasets = pytest.importorskip("datasets")
TOK = tiny_tokenizer()
QA = Fields(prompt="question", completion="answer")


def capitals_rows() -> list[dict]:
    """The bundled capitals set's rows with other column names (question, answer)."""
    rows = [json.loads(line) for line in bundled_data()["capitals"].read_text().splitlines() if line.strip()]
    return [{"question": r["prompt"], "answer": r["completion"]} for r in rows]


def blocks_of(spec, fields=QA, split="train"):
    return tokenize(read_examples(spec, fields=fields, split=split), TOK, block_size=40)


def assert_same_blocks(a, b) -> None:
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.attention_mask, b.attention_mask) and len(a) > 0


@pytest.fixture()
def stored(tmp_path):
    """The capitals rows as a DatasetDict folder (train + validation halves), a Dataset folder, parquet, arrow."""
    rows = capitals_rows()
    full = datasets.Dataset.from_list(rows)
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:16]), "validation": datasets.Dataset.from_list(rows[16:])}
    ).save_to_disk(tmp_path / "dict")
    full.save_to_disk(tmp_path / "one")
    full.to_parquet(str(tmp_path / "caps.parquet"))
    shutil.copy(next((tmp_path / "one").glob("*.arrow")), tmp_path / "caps.arrow")
    return tmp_path


def test_parquet_arrow_and_saved_folders_give_the_jsonl_blocks(stored):
    reference = blocks_of("capitals", fields=Fields())
    for spec in ("caps.parquet", "caps.arrow", "one"):
        assert_same_blocks(blocks_of(stored / spec), reference)
    train_rows, eval_rows = blocks_of(stored / "dict"), blocks_of(stored / "dict", split="eval")
    assert_same_blocks(train_rows, tokenize(read_examples("capitals")[:16], TOK, block_size=40))
    assert_same_blocks(eval_rows, tokenize(read_examples("capitals")[16:], TOK, block_size=40))


def test_a_dataset_in_the_local_cache_is_read_by_name_without_the_hub(tmp_path, monkeypatch, stored):
    """What datasets.load_dataset leaves in its cache (NAME/CONFIG/VERSION/HASH: arrow files + dataset_info.json),
    made here from a local parquet file, is found by name; the Hub is never asked (no network here)."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    cache = tmp_path / "datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    builder = Parquet(
        data_files={"train": str(stored / "caps.parquet")},
        dataset_name="toy-capitals",
        cache_dir=str(cache),
        hash="0123abc",
    )
    builder.download_and_prepare()
    where = cache / "someone___toy-capitals" / "default" / "0.0.0" / "0123abc"
    where.parent.mkdir(parents=True)
    shutil.move(builder.cache_dir, where)
    monkeypatch.chdir(tmp_path)  # "someone/toy-capitals" is no path here
    assert_same_blocks(blocks_of("someone/toy-capitals"), blocks_of("capitals", fields=Fields()))
    with pytest.raises(
        DataError,
        match=r"someone/absent: no such data file, and no dataset .* local datasets "
        r"cache.*Nothing is downloaded",
    ):
        read_examples("someone/absent")


def test_a_cached_configuration_and_named_splits_are_chosen_as_trl_names_them(tmp_path, monkeypatch, stored):
    """--dataset-config picks a configuration of a cached dataset (NAME/CONFIG/... in the cache), and
    --dataset-train-split / --dataset-test-split any split of a dataset with several; where there is nothing to
    choose the option is refused, naming it."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    from surgery.training.rows import DatasetParts

    cache = tmp_path / "datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    datasets.Dataset.from_list(capitals_rows()[:5]).to_parquet(str(tmp_path / "five.parquet"))
    builder = Parquet(
        data_files={"train": str(stored / "caps.parquet"), "held": str(tmp_path / "five.parquet")},
        dataset_name="toy-capitals",
        config_name="small",
        cache_dir=str(cache),
        hash="0123abc",
    )
    builder.download_and_prepare()
    where = cache / "someone___toy-capitals" / "small" / "0.0.0" / "0123abc"
    where.parent.mkdir(parents=True)
    shutil.move(builder.cache_dir, where)
    monkeypatch.chdir(tmp_path)
    small = DatasetParts(config="small")
    rows = capitals_rows()
    assert read_examples("someone/toy-capitals", fields=QA, parts=small) == read_examples(
        stored / "caps.parquet", fields=QA
    )
    held = read_examples(
        "someone/toy-capitals", fields=QA, split="eval", parts=DatasetParts("small", test_split="held")
    )
    assert [e.completion for e in held] == [r["answer"] for r in rows[:5]]
    with pytest.raises(DataError, match=r"configuration 'large'\): no such data file, and no dataset"):
        read_examples("someone/toy-capitals", fields=QA, parts=DatasetParts(config="large"))
    picked = read_examples(stored / "dict", fields=QA, parts=DatasetParts(train_split="validation"))
    assert [e.completion for e in picked] == [r["answer"] for r in rows[16:]]
    for spec, parts, message in (
        (
            stored / "dict",
            DatasetParts(train_split="dev"),
            r"has no split 'dev' \(--dataset-train-split\); its "
            "splits are train, validation",
        ),
        (stored / "caps.parquet", DatasetParts(train_split="train"), r"holds one split, so --dataset-train-split"),
        (
            stored / "dict",
            DatasetParts(config="small"),
            r"--dataset-config picks a configuration of a dataset in "
            "the local cache",
        ),
        ("capitals", DatasetParts(test_split="x"), r"--dataset-test-split chooses a part of a stored dataset"),
    ):
        with pytest.raises(DataError, match=message):
            read_examples(spec, fields=QA, parts=parts)


def test_field_mappings_apply_to_jsonl_and_csv_too(tmp_path):
    rows = capitals_rows()
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import csv

    with open(tmp_path / "qa.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["question", "answer"])
        writer.writeheader()
        writer.writerows(rows)
    reference = blocks_of("capitals", fields=Fields())
    assert_same_blocks(blocks_of(tmp_path / "qa.jsonl"), reference)
    assert_same_blocks(blocks_of(tmp_path / "qa.csv"), reference)
    (tmp_path / "body.jsonl").write_text(json.dumps({"body": "hello world"}) + "\n")
    assert read_examples(tmp_path / "body.jsonl", fields=Fields(text="body"))[0].completion == "hello world"
    with pytest.raises(DataError, match=r"qa.jsonl:1: needs a string `text`.*--text-field"):
        read_examples(tmp_path / "qa.jsonl")


def test_messages_columns_of_a_stored_dataset_are_conversations(tmp_path):
    talk = [{"role": "user", "content": "Capital of Peru?"}, {"role": "assistant", "content": "Lima"}]
    datasets.Dataset.from_list([{"conversation": talk}]).to_parquet(str(tmp_path / "chat.parquet"))
    (example,) = read_examples(tmp_path / "chat.parquet", fields=Fields(messages="conversation"))
    assert example.messages == (("user", "Capital of Peru?"), ("assistant", "Lima"))


def test_stored_data_mistakes_name_the_source_and_change_nothing(stored, monkeypatch):
    with pytest.raises(DataError, match=r"caps.parquet row 0: needs a string `text`.*--prompt-field"):
        read_examples(stored / "caps.parquet")
    (stored / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"bad.parquet: cannot be read as a dataset"):
        read_examples(stored / "bad.parquet")
    whole = (stored / "caps.parquet").read_bytes()
    (stored / "cut.parquet").write_bytes(whole[: len(whole) // 2] + whole[-8:])  # footer kept, pages cut
    with pytest.raises(DataError, match=r"cut.parquet: cannot be read as a dataset"):
        read_examples(stored / "cut.parquet", fields=QA)
    with pytest.raises(DataError, match=r"missing.arrow: no such data file"):
        read_examples(stored / "missing.arrow")
    datasets.DatasetDict(
        {"a": datasets.Dataset.from_list(capitals_rows()), "b": datasets.Dataset.from_list(capitals_rows())}
    ).save_to_disk(stored / "ab")
    with pytest.raises(DataError, match=r"holds the splits a, b but none named train"):
        read_examples(stored / "ab", fields=QA)
    datasets.Dataset.from_list([{"text": 5}]).to_parquet(str(stored / "numbers.parquet"))
    with pytest.raises(DataError, match=r"numbers.parquet row 0: needs a string `text`"):
        read_examples(stored / "numbers.parquet")
    monkeypatch.setattr("surgery.training.stored_data.MAX_DATA_BYTES", 100)
    with pytest.raises(DataError, match=r"more than .* of text"):
        read_examples(stored / "caps.parquet", fields=QA)
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(DataError, match=r"pip install 'model-surgery\[datasets\]'"):
        read_examples(stored / "caps.parquet", fields=QA)


def test_a_job_on_a_saved_dataset_trains_as_on_its_jsonl(stored):
    """Same rows, same seed: the same losses and eval losses as the bundled JSONL (the reference), and the run
    records the rows' digest for --resume."""
    config = dict(batch_size=8, lr=1e-2, max_steps=3, eval_steps=3, seed=0)

    def run(data, eval_data, fields):
        base = tiny_model("tiny-llama")
        job = make_job(
            base,
            name="j",
            rules="qv_lora_head",
            data=data,
            tokenizer=TOK,
            config=TrainConfig(**config),
            data_config=DataConfig(
                eval_data=eval_data,
                block_size=40,
                text_field=fields.text,
                prompt_field=fields.prompt,
                completion_field=fields.completion,
                messages_field=fields.messages,
            ),
        )
        (trained,) = train([job])
        return job, [
            value for r in trained.history for value in (r["step"], r.get("loss", 0.0), r.get("eval_loss", 0.0))
        ]

    def jsonl(name, rows):
        (stored / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return stored / name

    rows = capitals_rows()
    job, history = run(stored / "dict", stored / "dict", QA)
    reference_job, reference = run(jsonl("train.jsonl", rows[:16]), jsonl("eval.jsonl", rows[16:]), QA)
    assert history == pytest.approx(reference, rel=1e-6) and history[-1] > 0
    assert job.identity["data"].startswith("rows:") and job.identity["eval"].startswith("rows:")
    assert job.identity["data"] != job.identity["eval"]


def test_the_cli_trains_on_a_parquet_file_with_field_options(stored):
    from typer.testing import CliRunner

    from surgery_cli.app import app

    out = stored / "run"
    result = CliRunner().invoke(
        app,
        [
            "train",
            "qv_lora_head",
            "--model",
            "tiny-llama",
            "--data",
            str(stored / "caps.parquet"),
            "--prompt-field",
            "question",
            "--completion-field",
            "answer",
            "--block-size",
            "40",
            "--max-steps",
            "2",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and Path(out / "adapter.safetensors").is_file()
    result = CliRunner().invoke(
        app,
        [
            "train",
            "qv_lora_head",
            "--model",
            "tiny-llama",
            "--data",
            str(stored / "dict"),
            "--dataset-train-split",
            "nope",
            "--prompt-field",
            "question",
            "--completion-field",
            "answer",
            "--out",
            str(stored / "run2"),
        ],
    )
    assert result.exit_code == 2 and "has no split 'nope'" in result.output and not (stored / "run2").exists()
