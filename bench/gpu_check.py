"""The prepared GPU check: everything surgery promises on CUDA, in one run of under 8 minutes on one GPU.

Run it first whenever a GPU is at hand, commit the JSON it writes (bench/results/gpu_check.json, with the
GPU's name), so every figure quoted from it has its source in the repository. Without CUDA it says so and exits 0.

  python bench/gpu_check.py [--out bench/results/gpu_check.json] [--skip STEP ...]

It needs surgery importable (``pip install -e . --no-deps`` or PYTHONPATH=.:cli), bitsandbytes with its CUDA
kernels, and transformers >= 5 with the quantizer API surgery registers into (a machine without them can be
given wheels; see the device notes). Each step runs in its own process with a time limit and becomes one row:

  cuda_tests     tests/test_cuda.py: quantize-on-load on CUDA vs the CPU, every command with --device cuda,
                 bf16/fp16 training that learns and leaves base and sibling alone, generation, merge, PEFT
                 export loaded by PEFT on CUDA, 8-bit AdamW, LoftQ vs PEFT's own, new tokens on an nf4 base,
                 packing under SDPA and flash attention (flash_attn, where installed)
  batched        bench/batched.py --device cuda --quick (batched vs one-after-another generation and training)
  train_step     bench/train_step.py --device cuda (surgery vs PEFT, same config, interleaved, synchronized)
  load_memory    bench/load_memory.py --device cuda (1.1B bf16 checkpoint: host and device peaks while loading)
  plan_peak      the plan's predicted training peak vs torch.cuda.max_memory_allocated, SmolLM2-135M shape
  plan_context   the plan's longest block size for a 3 GiB budget (SmolLM2-135M shape, nf4 + LoRA, batch 1,
                 checkpointing, chunked loss, with and without offloading): one real step at that length, its
                 max_memory_allocated beside the prediction
  fsdp_smoke     torchrun --nproc_per_node 1 surgery train qlora_nf4 --fsdp --device cuda (nccl, one GPU)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from surgery.base.tokenizer import tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2_135M = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
}


def steps(out: Path) -> dict[str, tuple[list[str], int]]:
    """Each step's command and its time limit in seconds (together under 8 minutes)."""
    py, results = sys.executable, out.parent
    return {
        "cuda_tests": ([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"], 150),
        "batched": (
            [py, "bench/batched.py", "--device", "cuda", "--quick", "--out", str(results / "gpu_batched.json")],
            60,
        ),
        "train_step": (
            [
                py,
                "bench/train_step.py",
                "--device",
                "cuda",
                "--models",
                "facebook/opt-125m",
                "--storage",
                "fp32",
                "nf4",
                "--steps",
                "10",
                "--out",
                str(results / "gpu_train_step.json"),
            ],
            60,
        ),
        "load_memory": (
            [py, "bench/load_memory.py", "--device", "cuda", "--out", str(results / "gpu_load_memory.json")],
            120,
        ),
        "plan_peak": ([py, __file__, "--plan-peak", str(results / "gpu_plan_peak.json")], 45),
        "plan_context": ([py, __file__, "--plan-context", str(results / "gpu_plan_context.json")], 60),
        "fsdp_smoke": (
            [
                py,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                "1",
                "-m",
                "surgery_cli.app",
                "train",
                "qlora_nf4",
                "--model",
                "tiny-llama",
                "--data",
                "upper",
                "--fsdp",
                "--device",
                "cuda",
                "--max-steps",
                "3",
                "--out",
                str(results / "gpu_fsdp_run"),
                "--overwrite",
            ],
            45,
        ),
    }


def _measured_peak(base, name: str, rules: str, text: Path, config, data, folder: Path) -> int:
    """``max_memory_allocated`` over training one job of ``rules`` on ``text`` (the byte-level tiny tokenizer)."""
    import torch

    from surgery.training.job import make_job
    from surgery.training.loop import train_jobs

    job = make_job(
        base,
        name=name,
        rules=rules,
        data=str(text),
        tokenizer=tiny_tokenizer(),
        config=config,
        data_config=data,
        model_name=str(folder),
    )
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    train_jobs([job])
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def plan_peak(out: Path) -> None:
    """Train a few steps of a SmolLM2-135M-shaped random model on CUDA; the predicted peak (without the context
    margin, which max_memory_allocated does not see) next to the measured one, for several settings."""
    import tempfile

    import torch
    from transformers import AutoConfig

    from surgery.base.loading import graph_of, load_model, target_rules
    from surgery.devices import DeviceConfig
    from surgery.planning.decisions import plan
    from surgery.planning.training_memory import TrainingShape, training_peak
    from surgery.rules.rule_file import load_rules
    from surgery.training.config import DataConfig
    from surgery.training.job import TrainConfig

    spec = dict(SMOLLM2_135M)
    folder = Path(tempfile.mkdtemp(prefix="smollm2-shape-"))
    AutoConfig.for_model(spec.pop("model_type"), **spec).save_pretrained(folder)
    text = folder / "corpus.txt"  # byte-level tokens: 40 blocks of 512
    text.write_text(" ".join(f"word{i % 997}" for i in range(4000)))
    rows = []
    for rules, batch, block, checkpointing in (
        ("qlora_nf4", 4, 512, False),
        ("qlora_nf4", 4, 512, True),
        ("qv_lora", 8, 256, False),
    ):
        torch.cuda.empty_cache()
        base = load_model(str(folder), random_init=True, rules=rules, device="cuda").model
        config = TrainConfig(batch_size=batch, max_steps=3, precision="bf16", gradient_checkpointing=checkpointing)
        data = DataConfig(block_size=block, group_texts=True)  # every row a full block, as the plan assumes
        measured = _measured_peak(base, "peak", rules, text, config, data, folder)
        shape = TrainingShape.from_configs(config, data, DeviceConfig(), cuda=True)
        layout = load_model(str(folder), weights=False).model
        peak = training_peak(plan(graph_of(str(folder)), target_rules(load_rules(rules), True)), layout, shape)
        predicted = peak.total - peak.context
        rows.append(
            {
                "rules": rules,
                "batch": batch,
                "block": block,
                "checkpointing": checkpointing,
                "predicted_bytes": predicted,
                "measured_bytes": measured,
                "ratio": predicted / measured,
                "parts": {label: value for label, value, _ in peak.rows()},
            }
        )
        del base
    out.write_text(json.dumps({"model": "SmolLM2-135M shape, random weights", "rows": rows}, indent=2))
    for r in rows:
        print(
            f"{r['rules']:<10} {r['batch']}x{r['block']} ckpt={r['checkpointing']!s:<5} predicted "
            f"{r['predicted_bytes'] / 2**20:,.0f} MiB measured {r['measured_bytes'] / 2**20:,.0f} MiB "
            f"ratio {r['ratio']:.3f}"
        )


CONTEXT_BUDGET = 3 << 30  # small enough that the longest block size of a 135M model stays a short step


def plan_context(out: Path) -> None:
    """The plan's longest block size for CONTEXT_BUDGET on CUDA (SmolLM2-135M shape, random weights, nf4 + LoRA on
    every linear layer, batch 1, bf16, checkpointing, chunked loss; without and with offloading), then one real
    training step at exactly that length: max_memory_allocated beside the prediction (the context margin left out:
    max_memory_allocated does not see it)."""
    import tempfile

    import torch
    from transformers import AutoConfig

    from surgery.base.loading import graph_of, load_model, target_rules
    from surgery.devices import DeviceConfig
    from surgery.planning.decisions import plan
    from surgery.planning.training_memory import TrainingShape, max_context
    from surgery.rules.rule_file import load_rules
    from surgery.training.config import DataConfig
    from surgery.training.job import TrainConfig

    spec = {**SMOLLM2_135M, "max_position_embeddings": 1 << 16}  # rope takes any length; train checks this limit
    folder = Path(tempfile.mkdtemp(prefix="smollm2-context-"))
    AutoConfig.for_model(spec.pop("model_type"), **spec).save_pretrained(folder)
    rules = "qlora_nf4"
    planned = plan(graph_of(str(folder)), target_rules(load_rules(rules), True))
    layout = load_model(str(folder), weights=False).model
    rows = []
    for offload in (False, True):
        config = TrainConfig(
            batch_size=1, max_steps=1, precision="bf16", gradient_checkpointing=True, offload_activations=offload
        )
        asked = TrainingShape.from_configs(config, DataConfig(), DeviceConfig(), cuda=True)
        answer = max_context(planned, layout, asked, CONTEXT_BUDGET, explore=False, model_limit=None)
        block = answer.tokens
        text = folder / f"corpus-{block}.txt"  # byte-level tokens: two full blocks
        text.write_text("".join(f"w{i % 97} " for i in range(block)))
        torch.cuda.empty_cache()
        base = load_model(str(folder), random_init=True, rules=rules, device="cuda").model
        data = DataConfig(block_size=block, group_texts=True)  # every row a full block, as the plan assumes
        measured = _measured_peak(base, "context", rules, text, config, data, folder)
        predicted = answer.peak.total - answer.peak.context
        rows.append(
            {
                "offload_activations": offload,
                "block_size": block,
                "flags": answer.flags(),
                "predicted_bytes": predicted,
                "measured_bytes": measured,
                "ratio": predicted / measured,
                "host_bytes": answer.peak.host,
                "parts": {label: value for label, value, _ in answer.peak.rows()},
            }
        )
        del base
    report = {"model": "SmolLM2-135M shape, random weights", "budget": CONTEXT_BUDGET, "rows": rows}
    out.write_text(json.dumps(report, indent=2))
    for r in rows:
        print(
            f"offload={r['offload_activations']!s:<5} block {r['block_size']:,}: predicted "
            f"{r['predicted_bytes'] / 2**20:,.0f} MiB measured {r['measured_bytes'] / 2**20:,.0f} MiB "
            f"ratio {r['ratio']:.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_check.json"))
    parser.add_argument("--skip", nargs="*", default=[])
    parser.add_argument("--plan-peak", help=argparse.SUPPRESS)
    parser.add_argument("--plan-context", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plan_peak:
        plan_peak(Path(args.plan_peak))
        return
    if args.plan_context:
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device here: the plan_context step needs one")
            return
        plan_context(Path(args.plan_context))
        return
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device here: nothing to check (run this where a GPU is lent)")
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "cli"), os.environ.get("PYTHONPATH", "")]),
    }
    import bitsandbytes
    import transformers

    report = {
        "gpu": torch.cuda.get_device_name(),
        "capability": list(torch.cuda.get_device_capability()),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "steps": [],
    }
    for name, (command, limit) in steps(out).items():
        if name in args.skip:
            continue
        start = time.perf_counter()
        try:
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
            ok, tail = done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        except subprocess.TimeoutExpired as exc:
            ok, tail = False, f"timed out after {limit} s\n" + str(exc.stdout or "")[-2000:]
        row = {"step": name, "ok": ok, "seconds": round(time.perf_counter() - start, 1), "output_tail": tail}
        report["steps"].append(row)
        out.write_text(json.dumps(report, indent=2))  # what ran so far survives a later time-out
        print(f"{name:<12} {'ok' if ok else 'FAILED':<7} {row['seconds']:>6.1f} s", flush=True)
    print(f"{report['gpu']}: {sum(r['ok'] for r in report['steps'])}/{len(report['steps'])} steps ok; wrote {out}")


if __name__ == "__main__":
    main()
