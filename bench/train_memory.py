"""Peak memory and time of one QLoRA training step at long context: surgery's chunked loss, surgery with the full
logits, and PEFT + transformers, on the same base weights and tokens.

The model is SmolLM2-135M's shape (Llama: hidden 576, intermediate 1536, 30 layers, 9 heads, 3 kv heads, vocabulary
49,152, tied embeddings) with random weights, saved once to a temporary folder, unless ``--model DIR`` names a local
checkpoint. Every contender is QLoRA: the decoder's linear layers nf4 with double quantization, LoRA r=16 alpha=16
dropout 0.05 on all of them, embeddings and the tied output layer frozen in full precision, fp32 compute, gradient
checkpointing (non-reentrant) on, AdamW on the adapters:

- ``surgery chunked``: ``surgery.rewrite(base, "qlora_nf4")`` + ``checkpoint_activations``, loss
  ``surgery.training.loss.causal_lm_loss`` (the output layer and loss in chunks of 512 tokens);
- ``surgery full logits``: the same fine-tune, loss ``finetune(**batch).loss``;
- ``peft``: transformers' ``from_pretrained`` with ``BitsAndBytesConfig`` nf4 (double quantization, fp32 compute),
  ``peft.prepare_model_for_kbit_training`` (non-reentrant checkpointing), ``peft.get_peft_model`` with
  ``target_modules="all-linear"``.

Each contender runs in a fresh process: load, one warm-up step of 16 tokens (optimizer state, allocator pools),
then one measured step (forward, backward, optimizer step) over one row of ``--tokens`` tokens. On the CPU the peak
is ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after the step minus the RSS before it (the peak is reset to the
current RSS first, through /proc/self/clear_refs, so loading does not count; glibc maps blocks of 128 KiB and more
directly, ``MALLOC_MMAP_THRESHOLD_``, so that freed tensors leave the RSS: see ``MALLOC``); on CUDA
``torch.cuda.max_memory_allocated`` minus the bytes allocated before the step. Times: the step's wall clock and,
on the CPU, the process's CPU time (all threads), which the shared machine's load disturbs less. Prints a table and
writes JSON (hardware, software versions, the command). Usage:
  python bench/train_memory.py [--tokens 2048 4096 8192] [--model DIR] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

CONTENDERS = ("surgery chunked", "surgery full logits", "peft")
# On the CPU, glibc's malloc keeps freed blocks below its (dynamic, up to 32 MiB) mmap threshold in its heaps, so the
# peak RSS of a step follows the allocator's history more than the tensors alive at once (a first run with the
# default gave the chunked step 3.7 GiB at 2,048 tokens where its tensors peak near 0.6 GiB). Blocks of 128 KiB and
# more are mapped directly instead, and unmapped when freed, for every contender alike.
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072"}
SMOLLM2_135M = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "bos_token_id": 0,
    "eos_token_id": 0,
}


def save_random_model(folder: Path) -> None:
    """SmolLM2-135M's shape with random weights (seed 0), saved as a transformers checkpoint."""
    import torch
    import transformers

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2_135M)).save_pretrained(folder)


def contender(name: str, model_dir: str, device: str):
    """The model to train and its loss function ``loss(ids)``."""
    import torch
    import transformers

    if name == "peft":
        import peft

        quant = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        model = transformers.AutoModelForCausalLM.from_pretrained(
            model_dir, quantization_config=quant, device_map=device, dtype=torch.float32
        )
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
        config = peft.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear")
        model = peft.get_peft_model(model, config)
        return model, lambda ids: model(input_ids=ids, labels=ids, use_cache=False).loss

    import surgery
    from surgery.training.job import checkpoint_activations
    from surgery.training.loss import causal_lm_loss, causal_lm_parts

    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    ft = surgery.rewrite(base, "qlora_nf4")
    checkpoint_activations(ft)
    if name == "surgery full logits":
        return ft, lambda ids: ft(input_ids=ids, labels=ids, use_cache=False).loss
    parts = causal_lm_parts(ft)  # probed once, before the step
    return ft, lambda ids: causal_lm_loss(parts, ids, ids)


def measure(name: str, model_dir: str, tokens: int, device: str) -> dict:
    """One contender, in this process: the measured step's peak memory above what was held before it, its times
    and loss."""
    import gc
    import resource

    import torch

    model, loss_of = contender(name, model_dir, device)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.config.vocab_size

    def step(length: int) -> float:
        ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(length)).to(device)
        loss = loss_of(ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    torch.manual_seed(0)
    step(16)
    gc.collect()
    torch.manual_seed(0)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        wall, cpu = time.perf_counter(), time.process_time()
        loss = step(tokens)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        Path("/proc/self/clear_refs").write_text("5")  # the peak RSS starts again from the current RSS
        before = _rss_bytes()
        wall, cpu = time.perf_counter(), time.process_time()
        loss = step(tokens)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {
        "contender": name,
        "tokens": tokens,
        "peak_step_bytes": peak,
        "step_wall_seconds": time.perf_counter() - wall,
        "step_cpu_seconds": time.process_time() - cpu,
        "loss": loss,
    }


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def environment(device: str) -> dict:
    """Hardware and software versions."""
    import bitsandbytes
    import peft
    import torch
    import transformers

    import surgery

    cpu = next((line.split(":", 1)[1].strip() for line in _lines("/proc/cpuinfo") if line.startswith("model name")), "")
    memory = next((line.split()[1] for line in _lines("/proc/meminfo") if line.startswith("MemTotal")), "0")
    hardware = {
        "machine": platform.machine(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": int(memory) * 1024,
    }
    if device == "cuda":
        hardware["gpu"] = torch.cuda.get_device_name()
    software = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "surgery": surgery.__version__,
    }
    return {"hardware": hardware, "software": software}


def _lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def run_child(name: str, model_dir: str, tokens: int, device: str) -> dict:
    command = [sys.executable, __file__, "--one", name, "--model", model_dir, "--tokens", str(tokens)]
    env = {**os.environ, **MALLOC} if device == "cpu" else None
    out = subprocess.run([*command, "--device", device], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{name} at {tokens} tokens failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def goals(rows: list[dict], tokens: int = 4096) -> dict | None:
    """surgery's chunked step against PEFT's at ``tokens``: peak and time ratios (goal: <= 0.6 and <= 1.05)."""
    at = {r["contender"]: r for r in rows if r["tokens"] == tokens}
    ours, theirs = at.get("surgery chunked"), at.get("peft")
    if ours is None or theirs is None:
        return None
    return {
        "tokens": tokens,
        "peak_ratio": ours["peak_step_bytes"] / theirs["peak_step_bytes"],
        "peak_goal": 0.6,
        "time_ratio_cpu": ours["step_cpu_seconds"] / theirs["step_cpu_seconds"],
        "time_ratio_wall": ours["step_wall_seconds"] / theirs["step_wall_seconds"],
        "time_goal": 1.05,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", nargs="+", type=int, default=[2048, 4096, 8192])
    parser.add_argument("--model", help="a local transformers checkpoint (default: SmolLM2-135M's shape, random)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument("--json", default="bench/results/train_memory.json")
    parser.add_argument("--one", choices=CONTENDERS, help=argparse.SUPPRESS)  # a child process's contender
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.model, args.tokens[0], args.device)))
        return
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model or scratch
        if args.model is None:
            save_random_model(Path(scratch))
        rows = []
        for tokens in args.tokens:
            for name in args.contenders:
                rows.append(run_child(name, model_dir, tokens, args.device))
                print_row(rows[-1], args.device)
    result = {
        "command": " ".join(["python", *sys.argv]),
        "model": args.model or "SmolLM2-135M's shape (LlamaConfig below), random weights (seed 0)",
        "config": SMOLLM2_135M if args.model is None else None,
        "training": "QLoRA nf4 (double quant) all-linear r=16 alpha=16 dropout 0.05, fp32, gradient checkpointing, "
        "AdamW, one row",
        "device": args.device,
        "malloc": MALLOC if args.device == "cpu" else None,
        **environment(args.device),
        "rows": rows,
        "goals": goals(rows),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if result["goals"]:
        g = result["goals"]
        print(
            f"at {g['tokens']} tokens, surgery chunked / peft: peak x{g['peak_ratio']:.2f} (goal <= 0.6), "
            f"CPU time x{g['time_ratio_cpu']:.2f}, wall time x{g['time_ratio_wall']:.2f} (goal <= 1.05)"
        )


def print_row(row: dict, device: str) -> None:
    clock = f"{row['step_cpu_seconds']:>9.1f} s CPU" if device == "cpu" else ""
    print(
        f"{row['tokens']:>6} tokens  {row['contender']:<20}{row['peak_step_bytes'] / 2**20:>9,.0f} MiB"
        f"{row['step_wall_seconds']:>9.1f} s wall{clock}  loss {row['loss']:.4f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
