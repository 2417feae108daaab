"""Memory of one training step with and without --gradient-checkpointing (surgery's job, fp32, CPU or CUDA).

Each setting runs in a fresh process: build the model (random init), make a fine-tune (LoRA r=8 on
q_proj/v_proj of an fp32 base), run one small warm-up step (optimizer state, allocator pools), then one
measured step at batch x sequence. On CPU the peak is the process's peak RSS minus its RSS before
the measured step; on CUDA, torch.cuda.max_memory_allocated minus the allocated bytes before it. The
time is the measured step's (CPU time on CPU, per-process, so the shared machine's load matters less).
Prints a table and writes JSON. Usage:
  python bench/gradient_checkpointing.py [--model facebook/opt-125m] [--batch 4] [--seq 512] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

from environment import environment  # bench/environment.py: hardware, versions, command line

RULES = {
    "quantize": "none",
    "default": "freeze",
    "rules": [{"match": "re:.*(q_proj|v_proj)", "action": "adapt", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}],
}


def measure(model: str, batch: int, seq: int, device: str, checkpointing: bool) -> dict:
    """One setting, in this process: the step's peak memory above what was held before it, and its time."""
    import resource
    import time
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    import surgery
    from surgery.base.loading import load_model
    from surgery.training.job import checkpoint_activations

    base = load_model(model, random_init=True).model.float().to(device)
    torch.manual_seed(0)
    ft = surgery.rewrite(base, RULES)
    if checkpointing:
        checkpoint_activations(ft)
    ft.train()
    optimizer = torch.optim.AdamW([p for p in ft.parameters() if p.requires_grad], lr=1e-4)
    vocab = base.config.vocab_size

    def step(rows: int, length: int) -> None:
        ids = torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(0)).to(device)
        ft(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(1, 16)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        step(batch, seq)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() - before
    else:
        before = _rss_bytes()
        start = time.process_time()
        step(batch, seq)
        seconds = time.process_time() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"checkpointing": checkpointing, "peak_step_bytes": peak, "step_seconds": seconds}


def _rss_bytes() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="facebook/opt-125m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", "--json", default="bench/results/gradient_checkpointing.json")
    parser.add_argument("--one", choices=["on", "off"], help=argparse.SUPPRESS)  # a child process's setting
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.model, args.batch, args.seq, args.device, args.one == "on")))
        return
    rows = []
    for setting in ("off", "on"):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--model",
                args.model,
                "--batch",
                str(args.batch),
                "--seq",
                str(args.seq),
                "--device",
                args.device,
                "--one",
                setting,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    off, on = rows
    saving = 1 - on["peak_step_bytes"] / off["peak_step_bytes"]
    print(f"{args.model}, LoRA r=8 q/v, fp32, batch {args.batch} x {args.seq} tokens, {args.device}")
    print(f"{'--gradient-checkpointing':<26}{'step peak above held':>22}{'step time':>12}")
    for row in rows:
        clock = "s GPU" if args.device == "cuda" else "s CPU"
        print(
            f"{'on' if row['checkpointing'] else 'off':<26}{row['peak_step_bytes'] / 2**20:>18,.0f} MiB"
            f"{row['step_seconds']:>10.1f} {clock}"
        )
    print(f"saving: {saving:.0%} of the step's peak; time x{on['step_seconds'] / off['step_seconds']:.2f}")
    result = {
        "model": args.model,
        "batch": args.batch,
        "seq": args.seq,
        "device": args.device,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "rows": rows,
        "saving": saving,
        "environment": environment(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
