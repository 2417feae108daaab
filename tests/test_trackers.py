"""Experiment trackers (--report-to): every step's metrics read back with each tracker's own reader equal the
run's metrics.jsonl, one run per job with its rules and plan as config; bad names fail before anything runs."""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import pytest

from surgery.base.tiny import tiny_model
from surgery.base.tokenizer import tiny_tokenizer
from surgery.errors import TrainError
from surgery.training.config import DataConfig, parse_report_to
from surgery.training.job import TrainConfig, make_job
from surgery.training.loop import train_jobs as train
from surgery.training.trackers import metrics_of

TOK = tiny_tokenizer()


def two_jobs(out: Path):
    """Two fine-tunes on one tiny base, 4 steps each, evaluated at steps 2 and 4 (and at the end)."""
    base = tiny_model("tiny-llama")
    config = TrainConfig(batch_size=8, lr=1e-2, max_steps=4, eval_steps=2)
    return [
        make_job(
            base,
            name=name,
            rules=rules,
            data=data,
            tokenizer=TOK,
            config=config,
            data_config=DataConfig(eval_data=data, block_size=40),
            out=out / name,
            model_name="tiny-llama",
        )
        for name, rules, data in (("caps", "lora_plus_head", "capitals"), ("up", "qv_lora", "upper"))
    ]


def expected(out: Path, job: str) -> dict[str, dict[int, float]]:
    """metric -> {step: value} from the job's metrics.jsonl (the run's own record), as trackers name them."""
    series: dict[str, dict[int, float]] = {}
    for line in (out / job / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in metrics_of(record).items():
            series.setdefault(key, {})[record["step"]] = value
    assert {"train/loss", "train/lr", "eval/loss", "eval/perplexity"} <= series.keys()
    return series


def test_tensorboard_event_files_hold_every_metric_of_each_job(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(two_jobs(tmp_path), report_to="tensorboard", log_dir=tmp_path)
    for job in ("caps", "up"):
        events = EventAccumulator(str(tmp_path / "tensorboard" / job), size_guidance={"scalars": 0, "tensors": 0})
        events.Reload()
        want = expected(tmp_path, job)
        assert set(events.Tags()["scalars"]) == want.keys()
        for key, values in want.items():
            got = {e.step: e.value for e in events.Scalars(key)}
            assert got == pytest.approx(values, rel=1e-6), key  # float32 in the event file
        config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
        assert f'"job": "{job}"' in config and '"decisions"' in config and '"lr": 0.01' in config


def wandb_records(path: Path):
    """The records of a W&B transaction log (.wandb: a LevelDB-style log of protobuf Records), read with wandb's
    own Record schema: a 7-byte header, then 32 KiB blocks of chunks (crc, length, type) that join into records."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        if length == 0 and kind == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def test_wandb_offline_runs_hold_every_metric_and_the_config(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "surgery-test")
    train(two_jobs(tmp_path), report_to="wandb", log_dir=tmp_path)
    files = sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2  # one run per job
    seen = set()
    for file in files:
        name, config, history = None, {}, {}
        for record in wandb_records(file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                name = record.run.display_name
                config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "config":
                config.update({i.key: json.loads(i.value_json) for i in record.config.update})
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                step = items.pop("_step", record.history.step.num)
                for key, value in items.items():
                    if not key.startswith("_"):
                        history.setdefault(key, {})[step] = value
        seen.add(name)
        assert history == expected(tmp_path, name)
        assert config["job"] == name and config["train"]["max_steps"] == 4
        assert config["rules"]["rules"] and config["plan"]["decisions"]  # the rule file and the plan
    assert seen == {"caps", "up"}


def test_mlflow_runs_in_a_local_store_hold_every_metric_and_the_config(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    train(two_jobs(tmp_path), report_to="mlflow", log_dir=tmp_path)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("surgery")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert runs.keys() == {"caps", "up"}
    for job, run in runs.items():
        assert run.info.status == "FINISHED" and run.data.params["lr"] == "0.01"
        for key, values in expected(tmp_path, job).items():
            got = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
            assert got == pytest.approx(values, rel=1e-12), key
        config = json.loads(Path(client.download_artifacts(run.info.run_id, "config.json", str(tmp_path))).read_text())
        assert config["job"] == job and config["plan"]["decisions"]


def test_unknown_or_missing_trackers_fail_before_anything_is_written(tmp_path, monkeypatch):
    assert parse_report_to("none") == () and parse_report_to(None) == ()
    jobs = two_jobs(tmp_path)
    with pytest.raises(TrainError, match="unknown tracker.*tensorboard, wandb, mlflow"):
        train(jobs, report_to="tensorbord")
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(TrainError, match=r"pip install 'model-surgery\[wandb\]'"):
        train(jobs, report_to="wandb")
    assert not tmp_path.joinpath("caps").exists() and not tmp_path.joinpath("up").exists()


def test_the_cli_refuses_a_bad_tracker_before_loading(tmp_path):
    from typer.testing import CliRunner

    from surgery_cli.app import app

    result = CliRunner().invoke(
        app,
        [
            "train",
            "qv_lora",
            "--model",
            "tiny-llama",
            "--data",
            "upper",
            "--out",
            str(tmp_path / "run"),
            "--report-to",
            "tensorboard,comet",
        ],
    )
    assert result.exit_code == 2 and "unknown tracker" in result.output and "comet" in result.output
    assert not (tmp_path / "run").exists()


def test_the_cli_prints_the_install_hint_whole(tmp_path):
    """The hint names the distribution and the extra (rich markup would swallow `[wandb]`): a terminal user pastes it
    as printed. Run as a user would, in a fresh process where the wandb package cannot be imported."""
    import subprocess

    fake = tmp_path / "site"
    (fake / "wandb").mkdir(parents=True)
    (fake / "wandb" / "__init__.py").write_text("raise ImportError('wandb is not installed here')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")])}
    args = ["train", "qv_lora", "--model", "tiny-llama", "--data", "upper", "--out", str(tmp_path / "run")]
    code = "import sys; from surgery_cli.app import main; sys.argv = ['surgery', *sys.argv[1:]]; main()"
    done = subprocess.run(
        [sys.executable, "-c", code, *args, "--report-to", "wandb"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "pip install 'model-surgery[wandb]'" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()
