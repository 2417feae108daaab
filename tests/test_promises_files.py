"""What surgery promises about the files it is given: FIFOs and other special files are refused at once, nothing is
read from outside what was given, and no input (a file, a name, a tracker's address) makes it wait without bound.

One case per attack. Each asserts one clear SurgeryError naming the file (and the entry that named it) or the option,
and what to do; from the CLI, exit code 2 and one line without a traceback; nothing written and the inputs as they
were. A hang is the failure mode of most of these, so each call runs under the ``no_hang`` guard; FIFOs are made with
``os.mkfifo`` and never opened by the tests themselves.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

import surgery
from surgery.base.full_weights import CheckpointWeights
from surgery.base.tiny import tiny_model
from surgery.base.tokenizer import load_tokenizer, tiny_tokenizer
from surgery.disk import gate_file, gate_folder
from surgery.errors import AdapterStateError, DataError, ModelConfigError, RewriteError, TrainError
from surgery.files.adapter_file import ADAPTER_FILE
from surgery.training.checkpoint import read_checkpoint
from surgery.training.data import read_examples
from surgery.training.trackers import check_trackers
from surgery_cli.app import app

datasets = pytest.importorskip("datasets")
runner = CliRunner()
ARROW = "data-00000-of-00001.arrow"
SHARD_1, SHARD_2, INDEX = (
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
)


def listing(folder: Path) -> dict[str, tuple]:
    """What a folder holds, from lstat alone (a FIFO in it is never opened): name -> (kind, size, mtime)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        info = path.lstat()
        out[str(path.relative_to(folder))] = (info.st_mode >> 12, info.st_size, info.st_mtime_ns)
    return out


def fifo(path: Path) -> Path:
    """Replace the file at ``path`` by a FIFO (no writer ever comes: opening it to read blocks for good)."""
    path.unlink()
    os.mkfifo(path)
    return path


def sparse(path: Path, size: int) -> Path:
    """Replace the file at ``path`` by one of ``size`` bytes of holes (no disk used)."""
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def one_line_error(result, *needles: str) -> str:
    """The CLI refused with exit code 2 and one line naming each of ``needles``, no traceback."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    text = " ".join(lines)
    assert "Traceback" not in result.output and all(n in text for n in needles), result.output
    return text


@pytest.fixture()
def saved(tmp_path) -> Path:
    """A ``save_to_disk`` Dataset folder of 8 text rows."""
    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(8)]}).save_to_disk(str(folder))
    return folder


@pytest.fixture()
def saved_dict(tmp_path) -> Path:
    """A ``save_to_disk`` DatasetDict folder (train and test splits)."""
    folder = tmp_path / "saved_dict"
    rows = datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(8)]})
    datasets.DatasetDict({"train": rows, "test": rows}).save_to_disk(str(folder))
    return folder


@pytest.fixture()
def sharded(tmp_path) -> Path:
    """A tiny model saved in two safetensors shards and an index, with its tokenizer."""
    folder = tmp_path / "model"
    tiny_model("tiny-llama").save_pretrained(folder, max_shard_size=250_000)
    tiny_tokenizer().save_pretrained(folder)
    assert {SHARD_1, SHARD_2, INDEX} <= {p.name for p in folder.iterdir()}
    return folder


# ============================================================================ 1. saved datasets (--data DIR)


@pytest.mark.parametrize("name", [ARROW, "state.json", "dataset_info.json"])
def test_a_fifo_in_a_saved_dataset_is_refused_at_once(saved, name, no_hang):
    fifo(saved / name)
    before = listing(saved)
    with pytest.raises(DataError, match=f"{name}: is a FIFO, not a regular file") as info:
        no_hang(read_examples, saved)
    assert "Traceback" not in str(info.value) and listing(saved) == before


def test_a_fifo_as_a_split_listing_or_a_splits_data_is_refused(saved_dict, no_hang):
    fifo(saved_dict / "test" / ARROW)
    with pytest.raises(DataError, match=f"test/{ARROW}: is a FIFO"):
        no_hang(read_examples, saved_dict)
    fifo(saved_dict / "dataset_dict.json")
    with pytest.raises(DataError, match="dataset_dict.json: is a FIFO"):
        no_hang(read_examples, saved_dict)


def test_the_cli_refuses_a_saved_dataset_with_a_fifo_before_the_model_loads(saved, tmp_path, no_hang):
    fifo(saved / ARROW)
    out = tmp_path / "out"
    args = ["train", "qv_lora", "--model", "no-such-model", "--data", str(saved), "--out", str(out)]
    text = one_line_error(no_hang(runner.invoke, app, args), f"{saved / ARROW}: is a FIFO")
    assert "no-such-model" not in text and not out.exists()  # refused before the model is looked for


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_a_state_json_naming_a_data_file_outside_its_folder_is_refused(saved, tmp_path, where, no_hang):
    """Before: the file out there was read and trained on (exit 0)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(saved / ARROW, elsewhere / "x.arrow")
    name = "../elsewhere/x.arrow" if where == "relative" else str(elsewhere / "x.arrow")
    state = json.loads((saved / "state.json").read_text())
    state["_data_files"] = [{"filename": name}]
    (saved / "state.json").write_text(json.dumps(state))
    before = listing(tmp_path)
    with pytest.raises(DataError, match=r"state.json \(_data_files\): names '.*x.arrow', a path out of .*saved"):
        no_hang(read_examples, saved)
    assert listing(tmp_path) == before


def test_a_data_file_linked_out_of_a_saved_dataset_is_refused(saved, tmp_path, no_hang):
    outside = tmp_path / "outside.arrow"
    shutil.move(saved / ARROW, outside)
    (saved / ARROW).symlink_to(outside)
    with pytest.raises(DataError, match=f"{ARROW}: is a link to .*outside.arrow, outside its folder"):
        no_hang(read_examples, saved)


def test_a_split_listing_naming_a_folder_outside_is_refused(saved_dict, saved, no_hang):
    listing_file = saved_dict / "dataset_dict.json"
    listing_file.write_text(json.dumps({"splits": ["train", "../saved"]}))
    with pytest.raises(DataError, match=r"dataset_dict.json \(splits\): names '../saved', a path out of"):
        no_hang(read_examples, saved_dict)


def test_a_huge_state_json_is_refused_by_its_size(saved, no_hang):
    sparse(saved / "state.json", 1 << 30)
    with pytest.raises(DataError, match=r"state.json: is 1,073,741,824 bytes; a file of a saved dataset is at most"):
        no_hang(read_examples, saved)


@pytest.mark.parametrize("suffix", [".arrow", ".parquet"])
def test_a_fifo_given_as_an_arrow_or_parquet_file_is_refused(tmp_path, suffix, no_hang):
    path = tmp_path / f"data{suffix}"
    os.mkfifo(path)
    with pytest.raises(DataError, match=f"data{suffix}: is a FIFO, not a regular file; a data file must be"):
        no_hang(read_examples, path)


# ============================================================================ 2. --data names


@pytest.mark.parametrize("name", ["text", "json", "csv", "parquet", "arrow", "webdataset", "imagefolder"])
def test_a_datasets_builder_name_is_refused_not_run_on_the_working_folder(tmp_path, monkeypatch, name, no_hang):
    """Before: ``--data text`` in a folder of notes trained on every file under it."""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "private.txt").write_text("a note that is nobody's training data\n")
    monkeypatch.chdir(notes)
    before = listing(tmp_path)
    with pytest.raises(DataError, match=f"--data {name}: names a file format of the datasets library.*Pass the file"):
        no_hang(read_examples, name)
    assert listing(tmp_path) == before


def test_the_cli_refuses_a_builder_name_in_one_line(tmp_path, monkeypatch, no_hang):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("private\n")
    out = tmp_path / "out"
    result = no_hang(runner.invoke, app, ["train", "qv_lora", "--data", "text", "--out", str(out)])
    one_line_error(result, "--data text: names a file format", "Pass the file or folder")
    assert not out.exists()


@pytest.mark.parametrize("name", ["owner/..", "a--b", "owner/.hidden.."])
def test_a_name_no_dataset_could_have_is_refused(tmp_path, monkeypatch, name, no_hang):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=f"--data {name}: no such data file, and not a dataset name"):
        no_hang(read_examples, name)


def test_a_fifo_in_the_datasets_cache_is_refused_before_load_dataset_opens_it(tmp_path, monkeypatch, no_hang):
    """A dataset name is read from the local cache; a cached file that is a FIFO is refused, not opened."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    data = tmp_path / "rows.parquet"
    datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(8)]}).to_parquet(str(data))
    cache = tmp_path / "datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    builder = Parquet(data_files={"train": str(data)}, dataset_name="rows", cache_dir=str(cache), hash="0123abc")
    builder.download_and_prepare()
    where = cache / "someone___rows" / "default" / "0.0.0" / "0123abc"
    where.parent.mkdir(parents=True)
    shutil.move(builder.cache_dir, where)
    monkeypatch.chdir(tmp_path)
    assert len(no_hang(read_examples, "someone/rows")) == 8  # the reference: the cached dataset reads
    arrow = next(p for p in where.iterdir() if p.suffix == ".arrow")
    fifo(arrow)
    with pytest.raises(DataError, match=f"{arrow.name}: is a FIFO, not a regular file; a file of a cached dataset"):
        no_hang(read_examples, "someone/rows")


# ============================================================================ 3. model folders (--model DIR)


@pytest.mark.parametrize("name", [SHARD_2, INDEX, "config.json", "generation_config.json"])
def test_a_fifo_in_a_model_folder_is_refused_before_transformers_opens_it(sharded, name, no_hang):
    """Before: a FIFO shard named by the index blocked ``surgery apply qlora_nf4 --model DIR`` for good."""
    fifo(sharded / name)
    before = listing(sharded)
    with pytest.raises(ModelConfigError, match=f"{name}: is a FIFO, not a regular file"):
        no_hang(surgery.load_model, str(sharded))
    assert listing(sharded) == before


def test_the_cli_refuses_a_fifo_shard_in_one_line(sharded, tmp_path, no_hang):
    fifo(sharded / SHARD_1)
    out = tmp_path / "adapter"
    result = no_hang(runner.invoke, app, ["apply", "qlora_nf4", "--model", str(sharded), "--out", str(out)])
    one_line_error(result, f"{sharded / SHARD_1}: is a FIFO")
    assert not out.exists()


@pytest.mark.parametrize("where", ["relative", "absolute", "linked"])
def test_a_shard_outside_the_model_folder_is_refused(sharded, tmp_path, where, no_hang):
    outside = tmp_path / "x.safetensors"
    shutil.move(sharded / SHARD_2, outside)
    if where == "linked":
        (sharded / SHARD_2).symlink_to(outside)
        message = f"{SHARD_2}: is a link to .*x.safetensors, outside its folder"
    else:
        index = json.loads((sharded / INDEX).read_text())
        name = "../x.safetensors" if where == "relative" else str(outside)
        index["weight_map"] = {k: name if v == SHARD_2 else v for k, v in index["weight_map"].items()}
        (sharded / INDEX).write_text(json.dumps(index))
        message = rf"{INDEX} \(weight_map\): names '.*x.safetensors', a path out of"
    with pytest.raises(ModelConfigError, match=message):
        no_hang(surgery.load_model, str(sharded))


def test_a_huge_index_is_refused_by_its_size(sharded, no_hang):
    sparse(sharded / INDEX, 1 << 30)
    with pytest.raises(ModelConfigError, match=f"{INDEX}: is 1,073,741,824 bytes; a file of a model folder is at"):
        no_hang(surgery.load_model, str(sharded))


def test_an_index_that_is_no_index_is_refused(sharded, no_hang):
    (sharded / INDEX).write_text(json.dumps({"weight_map": {"a.weight": 7}}))
    with pytest.raises(ModelConfigError, match=f"{INDEX}: not a checkpoint index"):
        no_hang(surgery.load_model, str(sharded))


def test_a_loftq_start_reads_shards_through_the_same_gate(sharded, tmp_path, no_hang):
    """LoftQ reads the checkpoint's shards again once the base is quantized (base/full_weights.py)."""
    weights = CheckpointWeights(sharded)
    assert no_hang(weights.missing, ["model.layers.0.self_attn.q_proj"]) == []  # the reference: a whole checkpoint
    fifo(sharded / SHARD_1)
    with pytest.raises(RewriteError, match=f"{SHARD_1}: is a FIFO, not a regular file; a checkpoint shard"):
        no_hang(weights.missing, ["model.layers.0.self_attn.q_proj"])
    (sharded / SHARD_1).unlink()
    (sharded / SHARD_1).symlink_to(tmp_path / "nowhere")
    with pytest.raises(RewriteError, match=f"{SHARD_1}: is a link that leads nowhere"):
        no_hang(weights.missing, ["model.layers.0.self_attn.q_proj"])


def test_a_fifo_as_the_hf_caches_ref_of_a_model_is_refused(tmp_path, monkeypatch, no_hang):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    refs = tmp_path / "hub" / "models--org--tiny" / "refs"
    refs.mkdir(parents=True)
    os.mkfifo(refs / "main")
    with pytest.raises(ModelConfigError, match="refs/main: is a FIFO, not a regular file"):
        no_hang(surgery.load_model, "org/tiny")


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_a_fifo_or_a_link_out_in_a_tokenizer_folder_is_refused(sharded, tmp_path, name, no_hang):
    assert no_hang(load_tokenizer, str(sharded)) is not None  # the reference: the folder's tokenizer loads
    outside = tmp_path / f"outside-{name}"
    shutil.copy(sharded / name, outside)
    (sharded / name).unlink()
    (sharded / name).symlink_to(outside)
    with pytest.raises(ModelConfigError, match=f"{name}: is a link to .*outside its folder"):
        no_hang(load_tokenizer, str(sharded))
    (sharded / name).unlink()
    os.mkfifo(sharded / name)
    with pytest.raises(ModelConfigError, match=f"{name}: is a FIFO, not a regular file; a file of a tokenizer"):
        no_hang(load_tokenizer, str(sharded))


# ============================================================================ 4. adapter and checkpoint folders


def test_a_fifo_as_an_adapter_file_is_refused(tmp_path, no_hang):
    ft = surgery.rewrite(tiny_model("tiny-opt"), "qv_lora")
    folder = tmp_path / "adapter"
    folder.mkdir()
    surgery.save_adapter(ft, folder / ADAPTER_FILE)
    assert no_hang(surgery.read_adapter, folder) is not None  # the reference: the folder's adapter reads
    fifo(folder / ADAPTER_FILE)
    with pytest.raises(AdapterStateError, match=f"{ADAPTER_FILE}: is a FIFO, not a regular file"):
        no_hang(surgery.read_adapter, folder)


def test_a_fifo_as_a_peft_weights_file_is_refused(tmp_path, no_hang):
    folder = tmp_path / "peft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["q"]}))
    os.mkfifo(folder / "adapter_model.safetensors")
    with pytest.raises(AdapterStateError, match="adapter_model.safetensors: is a FIFO"):
        no_hang(surgery.import_peft, tiny_model("tiny-opt"), folder)


def test_a_fifo_as_a_checkpoints_training_state_is_refused(tmp_path, no_hang):
    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    (folder / "adapter.safetensors").write_bytes(b"")
    os.mkfifo(folder / "training_state.safetensors")
    with pytest.raises(TrainError, match="training_state.safetensors: is a FIFO, not a regular file"):
        no_hang(read_checkpoint, folder)


# ============================================================================ 5. trackers


@pytest.mark.parametrize("tracker,entry", [("tensorboard", "tensorboard"), ("wandb", "wandb"), ("mlflow", "mlruns")])
def test_a_tracker_folder_that_is_a_file_is_refused_before_anything_runs(tmp_path, monkeypatch, tracker, entry):
    pytest.importorskip(tracker)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    check_trackers((tracker,), tmp_path)  # the reference: an empty OUT is fine
    (tmp_path / entry).write_text("not a folder\n")
    with pytest.raises(TrainError, match=f"--report-to {tracker}: .*{entry} is not a folder"):
        check_trackers((tracker,), tmp_path)


def test_an_mlflow_database_that_is_a_fifo_is_refused(tmp_path, monkeypatch, no_hang):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    os.mkfifo(tmp_path / "mlflow.db")
    with pytest.raises(TrainError, match="mlflow.db is not a regular file"):
        no_hang(check_trackers, ("mlflow",), tmp_path)


def test_an_unreachable_mlflow_server_fails_before_the_model_loads(tmp_path, monkeypatch, no_hang):
    """Before: MLflow's client retried for about 5 minutes, after the model had loaded."""
    pytest.importorskip("mlflow")
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "out"
    args = ["train", "qv_lora", "--model", "no-such-model", "--data", "upper", "--out", str(out)]
    text = one_line_error(no_hang(runner.invoke, app, [*args, "--report-to", "mlflow"]), f"MLFLOW_TRACKING_URI={uri}")
    assert "does not answer" in text and "no-such-model" not in text and not out.exists()


def test_a_tracking_server_that_never_answers_is_given_one_bounded_request(tmp_path, monkeypatch, no_hang):
    """A server that accepts the connection and never answers: one request, bounded by the timeout."""
    monkeypatch.setattr("surgery.training.trackers.REACH_SECONDS", 0.2)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)  # the kernel accepts the connection; nobody ever reads or answers
        uri = f"http://127.0.0.1:{server.getsockname()[1]}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        with pytest.raises(TrainError, match=f"MLFLOW_TRACKING_URI={uri} does not answer.*timed out"):
            no_hang(check_trackers, ("mlflow",), tmp_path)
        monkeypatch.delenv("WANDB_MODE", raising=False)
        monkeypatch.setenv("WANDB_BASE_URL", uri)
        with pytest.raises(TrainError, match=f"WANDB_BASE_URL={uri} does not answer.*WANDB_MODE=offline"):
            no_hang(check_trackers, ("wandb",), tmp_path)


# ============================================================================ 6. the gate itself


def test_the_gate_accepts_a_folders_own_files_and_links_inside_it(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.json").write_text("{}")
    (tmp_path / "b.json").symlink_to(tmp_path / "sub" / "a.json")
    assert gate_folder(tmp_path, {"sub/a.json": 10}, what="folder", error=DataError) == tmp_path
    assert gate_file(tmp_path, "b.json", what="file", error=DataError, limit=10) == tmp_path / "b.json"
    with pytest.raises(DataError, match="b.json: is 2 bytes; a file is at most 1 bytes"):
        gate_file(tmp_path, "b.json", what="file", error=DataError, limit=1)


def test_the_gate_refuses_a_subfolder_linked_out_of_the_folder(tmp_path):
    folder, outside = tmp_path / "folder", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    (outside / "x.arrow").write_text("x")
    (folder / "split").symlink_to(outside)
    with pytest.raises(DataError, match="split/x.arrow: is a link to .*outside/x.arrow, outside its folder"):
        gate_file(folder, "split/x.arrow", what="file", error=DataError)
    with pytest.raises(DataError, match="split: is a link to .*outside, outside its folder"):
        gate_folder(folder, what="folder", error=DataError)
