"""What a training run tells its user: log lines when stdout is no terminal, a summary whose paths are whole,
metrics.jsonl with each step once, and a resumed run's first loss from its whole log."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import subprocess
import sys

import pytest
from rich.console import Console

from surgery.base.tiny import tiny_model
from surgery.base.tokenizer import tiny_tokenizer
from surgery.planning.report import training_summary
from surgery.training.config import DataConfig
from surgery.training.job import TrainConfig, make_job
from surgery.training.loop import train_jobs as train
from surgery_cli import progress

TOK = tiny_tokenizer()
LINE = re.compile(
    r"^\[(?P<job>[^\]]+)\] step (?P<step>\d+)/(?P<total>\d+)  loss (?P<loss>\d+\.\d{4})  lr (?P<lr>\S+)  "
    r"(?P<tps>[\d,]+) tok/s  (?:eval_loss (?P<eval>\d+\.\d{4}) perplexity \S+  )?"
    r"elapsed (?P<elapsed>\d+:\d\d:\d\d)  remaining (?P<remaining>\d+:\d\d:\d\d)$"
)


def _job(out=None, **config):
    settings = {"batch_size": 4, "lr": 1e-2, "max_steps": 4, "seed": 0, **config}
    return make_job(
        tiny_model("tiny-llama"),
        name="job",
        rules="qv_lora_head",
        data="upper",
        tokenizer=TOK,
        config=TrainConfig(**settings),
        data_config=DataConfig(block_size=24),
        out=out,
        model_name="tiny-llama",
    )


def _render(renderable, width: int) -> str:
    out = Console(file=io.StringIO(), width=width, color_system=None)
    out.print(renderable)
    return out.file.getvalue()


def _first_loss_shown(run) -> str:
    """The 'first loss' cell of the summary's row of ``run``."""
    shown = _render(training_summary([run], "adapter.safetensors"), 200)
    row = next(line for line in shown.splitlines() if line.startswith(f"│ {run.job.name} "))
    return row.split("│")[3].strip()


def test_a_run_logged_to_a_file_prints_a_line_per_interval_and_its_path_whole(tmp_path):
    # a path of 120 characters: more than the old table's column had in a log's 160, less than a whole line
    out = tmp_path / ("runs-" + "x" * max(1, 120 - len(str(tmp_path)) - len("/runs-/qv/adapter.safetensors"))) / "qv"
    log = tmp_path / "train.log"
    command = [sys.executable, "-m", "surgery_cli.app", "train", "qv_lora", "--model", "tiny-llama", "--data", "upper"]
    command += ["--out", str(out), "--max-steps", "12", "--logging-steps", "5", "--eval-split", "0.2"]
    command += ["--eval-steps", "6", "--batch-size", "4", "--block-size", "24", "--lr", "1e-2"]
    with open(log, "w") as stdout:  # as nohup or a scheduler runs it: stdout is a file
        done = subprocess.run(
            command,
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            timeout=600,  # a hang guard
        )
    text = log.read_text()
    assert done.returncode == 0, text + done.stderr[-3000:]
    lines = [LINE.match(line) for line in text.splitlines() if line.startswith("[qv_lora] ")]
    assert all(lines), text
    steps = [int(m["step"]) for m in lines]
    assert steps == [1, 5, 6, 10, 12], text  # the first, every 5th, each eval (6, 12) and the last, once each
    assert all(m["total"] == "12" and float(m["lr"]) > 0 and int(m["tps"].replace(",", "")) >= 0 for m in lines)
    assert [m["eval"] is not None for m in lines] == [False, False, True, False, True]
    assert lines[-1]["remaining"] == "0:00:00"
    records = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    for m in lines:  # what a line says is what the run logged for that step
        assert m["loss"] == f"{records[int(m['step'])]['loss']:.4f}"
        assert m["eval"] is None or m["eval"] == f"{records[int(m['step'])]['eval_loss']:.4f}"
    path = str(out / "adapter.safetensors")
    assert "…" not in text and f"adapter file: {path}" in text.replace("\n", "")  # never cut
    assert len(path) > 120 or f"\nadapter file: {path}\n" in text  # and on a line of its own where it fits one


def test_a_terminal_gets_a_bar_and_a_log_gets_lines(monkeypatch):
    monkeypatch.setenv("TERM", "xterm")  # not a dumb terminal, which gets lines too
    for terminal in (True, False):
        screen = Console(file=io.StringIO(), force_terminal=terminal, width=120, color_system=None)
        monkeypatch.setattr(progress, "console", screen)
        (run,) = progress.run_with_progress([_job(max_steps=3)], {}, show=True, logging_steps=2)
        shown = screen.file.getvalue()
        steps = re.findall(r"^\[job\] step (\d+)/3 ", shown, flags=re.M)
        assert steps == ([] if terminal else ["1", "2", "3"]) and run.step == 3, shown
        assert ("━" in shown) is terminal  # the bar


def test_the_summary_never_cuts_a_path_to_fit(tmp_path):
    out = tmp_path / ("runs-" + "x" * 70) / "qv"
    (run,) = train([_job(out=out, max_steps=2)])
    path = str(out / "adapter.safetensors")
    assert 80 < len(path) < 180
    narrow = _render(training_summary([run], "adapter.safetensors"), 80)  # a terminal narrower than the path
    assert "…" not in narrow and path in narrow.replace("\n", ""), narrow  # folded over lines, every character there
    assert f"adapter file: {path}\n" in _render(training_summary([run], "adapter.safetensors"), 200)


def test_metrics_hold_each_step_once_with_the_final_eval_in_the_last_step(tmp_path):
    out = tmp_path / "run"
    job = _job(out=out, max_steps=5, eval_steps=2)
    job = dataclasses.replace(job, eval_data=job.data)
    (run,) = train([job])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 4, 5]
    assert records == json.loads(json.dumps(run.history))  # the run's log is the file, line for line


def test_a_resumed_run_s_summary_starts_at_its_first_logged_loss(tmp_path):
    out = tmp_path / "run"
    (first,) = train([_job(out=out, max_steps=6, save_steps=2)])  # checkpoints at 2 and 4
    (resumed,) = train([_job(out=out, max_steps=6)], resume={"job": out / "checkpoint-4"})
    assert [r["step"] for r in resumed.history] == [1, 2, 3, 4, 5, 6]  # read back, then this process's steps
    assert resumed.history[:4] == json.loads(json.dumps(first.history[:4]))
    assert _first_loss_shown(resumed) == f"{first.history[0]['loss']:.4f}"  # the run's first, not step 5's
    elsewhere = tmp_path / "elsewhere"  # resumed into a new folder: the earlier log is not at hand, and it says so
    (moved,) = train([_job(out=elsewhere, max_steps=6)], resume={"job": out / "checkpoint-4"})
    assert [r["step"] for r in moved.history] == [5, 6]
    assert _first_loss_shown(moved) == f"{moved.history[0]['loss']:.4f} (step 5)"


@pytest.mark.parametrize("bad", ["0", "-3", "x"])
def test_logging_steps_below_one_is_refused(bad, tmp_path):
    from typer.testing import CliRunner

    from surgery_cli.app import app

    args = ["train", "qv_lora", "--model", "tiny-llama", "--data", "upper", "--out", str(tmp_path / "o")]
    done = CliRunner().invoke(app, [*args, "--logging-steps", bad])
    assert done.exit_code == 2 and "--logging-steps" in done.output and not (tmp_path / "o").exists(), done.output
