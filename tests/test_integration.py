"""Training beyond our own loop: transformers.Trainer, torchrun DDP (gloo, 2 processes), the CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import surgery
from surgery.base.tiny import tiny_model
from surgery.base.tokenizer import tiny_tokenizer
from surgery.training.data import read_examples, tokenize
from surgery_cli.app import app

HERE = Path(__file__).resolve().parent


def test_a_finetune_trains_under_hf_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    base = tiny_model("tiny-llama")
    ft = surgery.rewrite(base, "qv_lora_head")
    before = {n: p.detach().clone() for n, p in base.named_parameters()}  # the quantized base
    start = {k: v.detach().clone() for k, v in surgery.base.ownership.own_state(ft).items()}
    blocks = tokenize(read_examples("upper"), tiny_tokenizer(), block_size=24)
    rows = [{k: v[i] for k, v in blocks.batch(torch.arange(len(blocks))).items()} for i in range(len(blocks))]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=4,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = Trainer(model=ft, args=args, train_dataset=rows)
    result = trainer.train()
    trainer.save_model()
    assert (tmp_path / "checkpoint-4" / "adapter.safetensors").exists()
    final = surgery.load_adapter(base, tmp_path)
    assert all(
        torch.equal(p, surgery.base.ownership.own_state(ft)[k])
        for k, p in surgery.base.ownership.own_state(final).items()
    )
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in surgery.base.ownership.own_state(ft).values()}  # adapters + plain lm_head only
    assert all(
        not torch.equal(start[k], p) for k, p in surgery.base.ownership.own_state(ft).items() if k.endswith("lora_B")
    )
    assert all(torch.equal(before[n], p) for n, p in base.named_parameters())
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert losses[-1] < losses[0] and result.global_step == 8


def test_load_state_dict_on_a_finetune_never_writes_the_shared_base():
    base = tiny_model("tiny-opt")
    ft = surgery.rewrite(base, "finetuna_default")
    full = {n: torch.zeros_like(p) for n, p in ft.named_parameters() if p.dtype.is_floating_point}
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    result = ft.load_state_dict(full, strict=False)
    assert all(torch.equal(before[n], p) for n, p in base.named_parameters())
    assert all(float(p.abs().sum()) == 0 for p in surgery.base.ownership.own_state(ft).values())  # own tensors loaded
    assert result.unexpected_keys == []
    with pytest.raises(surgery.AdapterStateError, match="missing"):
        ft.load_state_dict({}, strict=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["alone", "batched"])
def test_ddp_with_two_gloo_processes_equals_one_process_with_the_same_global_batch(tmp_path, mode):
    """Batched: the job shares its passes with a second job (other rules, batch, length, accumulation)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(HERE / "ddp_worker.py"),
        str(tmp_path),
        "4",
        mode,
    ]
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    single = subprocess.run(
        [sys.executable, str(HERE / "ddp_worker.py"), str(tmp_path), "8"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    suffix = "-batched" if mode == "batched" else ""
    rank0 = load_file(tmp_path / f"rank0-of-2{suffix}.safetensors")
    rank1 = load_file(tmp_path / f"rank1-of-2{suffix}.safetensors")
    alone = load_file(tmp_path / "rank0-of-1.safetensors")
    assert rank0.keys() == rank1.keys() == alone.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
        assert torch.allclose(rank0[key], alone[key], rtol=1e-5, atol=1e-5), key


def test_accelerate_launch_multi_gpu_on_cpu_runs_the_same_training_as_torchrun(tmp_path):
    pytest.importorskip("accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    runs = {}
    for name, launcher in {
        "torchrun": [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "1",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
        ],
        "accelerate": [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(_free_port()),
        ],
    }.items():
        (tmp_path / name).mkdir()
        done = subprocess.run(
            [*launcher, str(HERE / "ddp_worker.py"), str(tmp_path / name), "4"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, (name, done.stderr[-3000:])
        runs[name] = load_file(tmp_path / name / "rank0-of-2.safetensors")
    assert runs["torchrun"].keys() == runs["accelerate"].keys()
    assert all(torch.equal(runs["torchrun"][k], runs["accelerate"][k]) for k in runs["torchrun"])


runner = CliRunner()


def test_cli_train_many_jobs_then_generate(tmp_path):
    out = tmp_path / "runs"
    result = runner.invoke(
        app,
        [
            "train",
            "--model",
            "tiny-opt",
            "--out",
            str(out),
            "--job",
            "up=qv_lora_head,upper",
            "--job",
            "caps=lora_plus_head,capitals",
            "--max-steps",
            "30",
            "--lr",
            "1e-2",
            "--block-size",
            "40",
            "--eval-split",
            "0.1",
            "--save-steps",
            "10",
            "--save-total-limit",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "training summary" in result.stdout
    for name in ("up", "caps"):
        files = sorted(p.name for p in (out / name).iterdir())
        assert files == ["adapter.safetensors", "checkpoint-30", "metrics.jsonl"]  # the last step's checkpoint
    again = runner.invoke(
        app,
        [
            "train",
            "--model",
            "tiny-opt",
            "--out",
            str(out),
            "--job",
            "up=qv_lora_head,upper",
            "--job",
            "caps=lora_plus_head,capitals",
            "--max-steps",
            "40",
            "--lr",
            "1e-2",
            "--block-size",
            "40",
            "--eval-split",
            "0.1",
            "--resume",
            str(out),
        ],
    )
    assert again.exit_code == 0, again.output  # continue both jobs from checkpoint-30 to step 40
    assert "resuming up from" in again.output and "checkpoint-30" in again.output
    records = [json.loads(line) for line in (out / "up" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, 41))  # each step once: the first run's 1-30, this one's 31-40
    assert [r["step"] for r in records if "eval_loss" in r] == [30, 40]  # each run's final evaluation
    other = runner.invoke(
        app,
        [
            "train",
            "--model",
            "tiny-opt",
            "--out",
            str(out),
            "--job",
            "up=qv_lora_head,upper",
            "--job",
            "caps=lora_plus_head,capitals",
            "--max-steps",
            "50",
            "--seed",
            "1",
            "--block-size",
            "40",
            "--eval-split",
            "0.1",
            "--resume",
            str(out),
        ],
    )
    assert other.exit_code == 2 and "another run (differs in: seed)" in other.output
    result = runner.invoke(
        app,
        [
            "generate",
            "owl ->",
            "--adapter",
            str(out / "up" / "adapter.safetensors"),
            "--adapter",
            str(out / "caps" / "adapter.safetensors"),
            "--base",
            "-n",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "one batched pass" in result.stdout and result.stdout.count("owl ->") == 3  # two fine-tunes + the base
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("owl ->\ncat ->\n")
    result = runner.invoke(
        app,
        [
            "generate",
            "--prompts",
            str(prompts),
            "--adapter",
            str(out / "up" / "adapter.safetensors"),
            "--base",
            "-n",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["model"] == "base", r["prompt"]) for r in lines] == [
        (False, "owl ->"),
        (False, "cat ->"),
        (True, "owl ->"),
        (True, "cat ->"),
    ]


def test_cli_train_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{oops\n')
    result = runner.invoke(app, ["train", "qv_lora", "--data", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and f"{bad}:2: not valid JSON" in result.output and "Traceback" not in result.output


def test_demo_runs_offline_and_verifies_its_files(tmp_path):
    result = runner.invoke(app, ["demo", "--steps", "40", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "3 full fp32 copies" in result.stdout and "bit for bit" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["capitals", "reverse", "upper"]


def test_demo_runs_on_a_model_folder_with_rule_files_for_a_pretrained_model(tmp_path):
    folder = tmp_path / "my-model"
    tiny_model("tiny-llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    result = runner.invoke(app, ["demo", "--model", str(folder), "--steps", "6", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "rule files for pretrained, under 3B parameters models" in result.stdout
    assert "reverse=all_linear_lora, capitals=qv_lora, upper=all_linear_lora" in result.stdout
    assert "bit for bit" in result.stdout
    for task in ("capitals", "reverse", "upper"):  # LoRA only: no lm_head among the adapter's tensors
        tensors = surgery.read_adapter(tmp_path / "out" / task / "adapter.safetensors").tensors
        assert tensors and not any("lm_head" in name for name in tensors)
