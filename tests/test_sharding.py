"""A shared base sharded with FSDP2 (`--fsdp`): 2 gloo processes against one process, bytes per rank, resume,
launchers, and what a sharded base refuses."""

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
from surgery.training.config import DataConfig
from surgery.training.job import TrainConfig, make_job
from surgery.training.loop import train_jobs as train

HERE = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
STEPS = 20
pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str) -> list[str]:
    return [
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
        *args,
    ]


def run(command: list[str]) -> None:
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One process per base kind; two sharded ranks per base kind; a sharded run stopped at 10 and resumed."""
    out = tmp_path_factory.mktemp("fsdp")
    worker = str(HERE / "fsdp_worker.py")
    run([sys.executable, worker, str(out), "fp32,nf4", str(STEPS)])  # one launch each: launches cost most
    run(torchrun(worker, str(out), "fp32,nf4,nf4-bf16", str(STEPS), "shard"))
    stopped = out / "stopped"
    stopped.mkdir()
    run(torchrun(worker, str(stopped), "fp32", str(STEPS), "shard", "stop=10"))
    run(torchrun(worker, str(stopped), "fp32", str(STEPS), "shard", "resume"))
    return out


def result(folder: Path, tag: str) -> dict[str, torch.Tensor]:
    return load_file(folder / f"{tag}.safetensors")


@pytest.mark.parametrize("kind", ["fp32", "nf4", "nf4-bf16"])
def test_two_sharded_ranks_train_two_jobs_like_one_process(runs, kind):
    """nf4-bf16 stores the same packed bits as nf4, so it is held to the same one-process run."""
    rank0, rank1 = result(runs, f"{kind}-sharded-rank0-of-2"), result(runs, f"{kind}-sharded-rank1-of-2")
    alone = result(runs, f"{kind.split('-')[0]}-whole-rank0-of-1")
    assert rank0.keys() == rank1.keys() == alone.keys()
    assert any(k.startswith("a.") for k in alone) and any(k.startswith("b.") for k in alone)
    tolerance = 1e-5 if kind == "fp32" else 1e-4
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
        error = (rank0[key] - alone[key]).norm() / alone[key].norm()
        assert error <= tolerance, (key, float(error))


@pytest.mark.parametrize("kind", ["fp32", "nf4", "nf4-bf16"])
def test_each_rank_holds_half_the_base_exactly_as_planned(runs, kind):
    for rank in (0, 1):
        facts = json.loads((runs / f"{kind}-sharded-rank{rank}-of-2.json").read_text())
        assert facts["resident_bytes"] == facts["planned_bytes"]
        assert 0.45 * facts["whole_bytes"] < facts["resident_bytes"] < 0.56 * facts["whole_bytes"]


def test_resume_under_fsdp_is_exact(runs):
    straight = result(runs, "fp32-sharded-rank0-of-2")
    resumed = result(runs / "stopped", "fp32-sharded-resumed-rank0-of-2")
    for key in (k for k in straight if k.startswith("a.")):
        assert torch.equal(straight[key], resumed[key]), key


@pytest.mark.parametrize("kind", ["fp32", "nf4-bf16"])
def test_adapter_file_saved_under_fsdp_loads_on_an_unsharded_base(runs, kind):
    sharded_logits = result(runs, f"{kind}-sharded-rank0-of-2")["logits"]
    ft = surgery.load_adapter(tiny_model("tiny-llama"), runs / f"{kind}-sharded-a" / "adapter.safetensors")
    with torch.no_grad():
        logits = ft(torch.arange(3, 19).reshape(2, 8)).logits
    torch.testing.assert_close(logits, sharded_logits, rtol=1e-5, atol=1e-5)


def test_accelerate_and_the_cli_shard_the_base_as_torchrun_does(runs, tmp_path):
    pytest.importorskip("accelerate")
    launch = [
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
    ]
    run([*launch, str(HERE / "fsdp_worker.py"), str(tmp_path), "fp32", str(STEPS), "shard"])
    by_accelerate, by_torchrun = result(tmp_path, "fp32-sharded-rank0-of-2"), result(runs, "fp32-sharded-rank0-of-2")
    assert all(torch.equal(by_accelerate[k], by_torchrun[k]) for k in by_torchrun)
    run(
        torchrun(
            "-m",
            "surgery_cli.app",
            "train",
            "qlora_nf4",
            "--model",
            "tiny-llama",
            "--data",
            "upper",
            "--out",
            str(tmp_path / "cli"),
            "--fsdp",
            "--max-steps",
            "3",
            "--batch-size",
            "2",
        )
    )
    assert surgery.read_adapter(tmp_path / "cli" / "adapter.safetensors").rules.quantize.scheme == "nf4"


# ------------------------------------------------------------------ one process: works, warns, refuses

RULES = {
    "quantize": "nf4",
    "default": "quantize",
    "rules": [
        {"match": "lm_head", "action": "freeze"},
        {"match": "*", "type": "embedding", "action": "freeze"},
        {"match": "re:.*(q_proj|v_proj)", "action": "adapt"},
    ],
}


def _job(base, name="job", **config):
    return make_job(
        base,
        name=name,
        rules=RULES,
        data="upper",
        tokenizer=tiny_tokenizer(),
        config=TrainConfig(batch_size=4, lr=1e-2, max_steps=3, seed=0, **config),
        data_config=DataConfig(group_texts=True, block_size=16),
    )


def assert_trained_alike(b: torch.Tensor, a: torch.Tensor, name: str) -> None:
    """Three AdamW steps at lr 1e-2 over the same fp32 math in another order (FSDP's gathers): equal to rounding in
    norm. Elementwise, a near-zero entry can differ by 1e-5 of the largest (seen on a CPU with AVX512-BF16)."""
    assert ((b - a).norm() / a.norm()).item() <= 1e-5, name


@pytest.fixture
def group_of_one():
    """shard_base without a launcher makes a process group of one; later tests must not find it."""
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def test_gradient_checkpointing_on_a_sharded_base_trains_like_an_unsharded_base_without_it(group_of_one):
    (alone,) = train([_job(tiny_model("tiny-llama"))])
    base = tiny_model("tiny-llama")
    surgery.prepare_base(base, RULES)
    with pytest.warns(surgery.ShardingWarning):
        surgery.shard_base(base)
    (sharded,) = train([_job(base, gradient_checkpointing=True)])
    for (name, a), (_, b) in zip(
        sorted(alone.job.finetune.named_parameters()), sorted(sharded.job.finetune.named_parameters())
    ):
        if a.requires_grad:
            assert_trained_alike(b, a, name)


def test_a_base_sharded_over_one_process_warns_and_trains_like_an_unsharded_one(group_of_one):
    reference = tiny_model("tiny-llama")
    (alone,) = train([_job(reference)])
    base = tiny_model("tiny-llama")
    surgery.prepare_base(base, RULES)
    with pytest.warns(surgery.ShardingWarning, match="saves no memory"):
        surgery.shard_base(base)
    (sharded,) = train([_job(base)])
    for (name, a), (_, b) in zip(
        sorted(alone.job.finetune.named_parameters()), sorted(sharded.job.finetune.named_parameters())
    ):
        if a.requires_grad:
            assert_trained_alike(b, a, name)
    ft = sharded.job.finetune
    prompt = torch.arange(3, 11).reshape(1, 8)
    with torch.no_grad():  # greedy generate through FSDP2's root gives what the unsharded fine-tune gives
        assert torch.equal(
            ft.generate(prompt, max_new_tokens=4, do_sample=False),
            alone.job.finetune.generate(prompt, max_new_tokens=4, do_sample=False),
        )
    with pytest.raises(surgery.ShardingError, match="merge needs the whole base"):
        surgery.merge(ft)
    with pytest.raises(surgery.ShardingError, match="export_peft needs the whole base"):
        surgery.export_peft(ft, "unused")
    from surgery.finetune.batched import batched

    with pytest.raises(surgery.ShardingError, match="batched view"):
        batched(base, [ft])
    with pytest.raises(surgery.ShardingError, match="--batched training"):
        train([_job(base, "again")], batched=True)
    dora = {**RULES, "rules": [*RULES["rules"][:2], {**RULES["rules"][2], "lora": {"use_dora": True}}]}
    with pytest.raises(surgery.ShardingError, match="q_proj: use_dora .* is sharded with FSDP2"):
        surgery.rewrite(base, dora)  # DoRA reads whole weights each forward: refused, before anything changes
    from surgery.finetune.sharding import refuse_unshardable

    with pytest.raises(
        surgery.ShardingError, match=r"--fsdp with use_dora \(.*rule 3.*\): DoRA reads each adapted layer"
    ):
        refuse_unshardable(surgery.plan(tiny_model("tiny-llama"), dora))  # --fsdp's check before loading
    loftq = {**RULES, "rules": [*RULES["rules"][:2], {**RULES["rules"][2], "lora": {"init_lora_weights": "loftq"}}]}
    tokens = {**RULES, "extra_tokens": ["<new>"]}
    for rules, message in (
        (loftq, "init_lora_weights: loftq reads the layer's whole weight"),
        (tokens, "extra_tokens needs the whole embedding"),
    ):
        with pytest.raises(surgery.ShardingError, match=message):
            surgery.rewrite(base, rules)
    refused = ((loftq, "--fsdp with loftq .*rule 3.*: a LoftQ start reads"), (tokens, "--fsdp with extra_tokens"))
    for rules, message in refused:
        with pytest.raises(surgery.ShardingError, match=message):
            refuse_unshardable(surgery.plan(tiny_model("tiny-llama"), rules))


def test_sharding_refuses_int8_live_finetunes_and_a_base_on_another_device():
    base = tiny_model("tiny-llama")
    surgery.prepare_base(base, "qv_lora")  # LLM.int8
    with pytest.raises(surgery.ShardingError, match="LLM.int8.*nf4"):
        surgery.shard_base(base)
    base = tiny_model("tiny-llama")
    ft = surgery.rewrite(base, RULES)
    with pytest.raises(surgery.ShardingError, match="1 fine-tune.*shard the base first"):
        surgery.shard_base(base)
    del ft
    base = tiny_model("tiny-llama").to("meta")
    with pytest.raises(surgery.ShardingError, match="is on meta, but rank 0 computes on cpu"):
        surgery.shard_base(base)


def test_cli_refuses_fsdp_with_batched_and_accelerates_fsdp1_config(tmp_path, monkeypatch):
    from surgery_cli.app import app

    runner = CliRunner()
    args = ["train", "qlora_nf4", "--model", "tiny-llama", "--data", "upper", "--out", str(tmp_path / "o")]
    done = runner.invoke(app, [*args, "--fsdp", "--batched"])
    assert done.exit_code != 0 and "a batched pass does not run on a sharded base" in done.output
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    done = runner.invoke(app, args)
    assert done.exit_code != 0 and "pass --fsdp to shard the base with FSDP2" in done.output
    assert not (tmp_path / "o").exists()


def test_plan_per_device_and_the_storage_option(tmp_path):
    from surgery_cli.app import app

    done = CliRunner().invoke(
        app, ["plan", "qlora_nf4", "--model", "tiny-llama", "--world-size", "2", "--fsdp", "--json"]
    )
    assert done.exit_code == 0, done.output
    facts = json.loads(done.output)["per_device"]
    planned = surgery.plan(surgery.trace(tiny_model("tiny-llama")), "qlora_nf4")
    assert facts["base_bytes"] == planned.base_bytes_per_rank(2, fsdp=True) < planned.base_bytes_after
    assert facts["total_training_bytes"] == facts["base_bytes"] + 4 * planned.finetune_bytes
    memory = json.loads(CliRunner().invoke(app, ["inspect", "tiny-llama", "--json"]).output)["memory"]
    everything_nf4 = surgery.plan(surgery.trace(tiny_model("tiny-llama")), {"quantize": "nf4", "default": "quantize"})
    assert memory["nf4 FSDP2/4"] == everything_nf4.base_bytes_per_rank(4, fsdp=True) < memory["nf4"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("quantize:\n  scheme: nf4\n  storage: int4\n")
    with pytest.raises(surgery.RuleFileError, match="bad.yaml:3.*storage"):
        surgery.load_rules(bad)


QUANTIZED_EMBEDDING = (
    "version: 1\nquantize: {scheme: nf4, storage: bfloat16}\ndefault: quantize\nrules:\n"
    "  - match: q_proj\n    action: adapt\n"
)


def test_a_4bit_embedding_is_refused_for_sharding_with_its_rule_and_the_remedy(write_rules):
    from surgery.base.loading import graph_of
    from surgery.finetune.sharding import refuse_unshardable

    rules = write_rules(QUANTIZED_EMBEDDING)
    with pytest.raises(surgery.ShardingError, match=r"rules.yaml.*default.*embed_tokens.*embedding.*type: embedding"):
        refuse_unshardable(surgery.plan(graph_of("tiny-llama"), rules))
    base = tiny_model("tiny-llama")
    surgery.prepare_base(base, rules)
    with pytest.raises(surgery.ShardingError, match="'model.embed_tokens' is a 4-bit embedding.*type: embedding"):
        surgery.shard_base(base)


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_fsdp_with_a_quantized_embedding_is_refused_before_loading_under_both_launchers(
    write_rules, tmp_path, launcher
):
    rules = write_rules(QUANTIZED_EMBEDDING)
    args = [
        "-m",
        "surgery_cli.app",
        "train",
        str(rules),
        "--model",
        "tiny-llama",
        "--data",
        "upper",
        "--out",
        str(tmp_path / "run"),
        "--fsdp",
        "--max-steps",
        "2",
    ]
    if launcher == "torchrun":
        command = torchrun(*args)
    else:
        command = [
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
            *args,
        ]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "FSDP2 cannot shard" in done.stderr + done.stdout and "internal error" not in done.stderr + done.stdout
    assert not (tmp_path / "run").exists()
