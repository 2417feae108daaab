"""Many fine-tunes, one base pass: batched vs one after another, for generation and for training.

OPT-125m shape (random init, fp32 compute), LoRA r=8 (no dropout) on every decoder Linear. On the
CPU: one thread, CPU time per process (``time.process_time``); with ``--device cuda``: wall time
after ``torch.cuda.synchronize``. The contenders alternate repetition by repetition in one process,
so drift hits both alike; medians and the spread (min-max) are reported.
"One after another" is measured as one fine-tune's call or step: the N calls of a turn-taking run
are the same work on the same shapes, so their throughput (tokens/s) is that of one call.

- generate: N fine-tunes answer one prompt (5 tokens) with NEW greedy tokens each: one
  ``surgery.finetune.batched.generate`` over N rows vs one call with a single fine-tune (the same code path).
- train: N jobs, per-job micro-batch 1 x 128 random tokens, AdamW: one batched micro-step
  (``batched_train.micro_step``: every job's optimizer steps) vs one job's ``train_step``.
  Activation memory is the bytes autograd saves for backward in one pass (one job's pass when
  taking turns, the group's pass when batched); on CUDA also the peak allocated during a step.

Usage: python bench/batched.py [--quick] [--device cpu|cuda] [--n 1 2 4 8] [--repeats 10] [--new-tokens 64]
``--quick``: N = 1 and 8 only, 24 new tokens, 2 repetitions for generation and 3 for training.
Writes bench/results/batched.json (--out; bench/results/batched_cuda.json with --device cuda).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
import warnings
from pathlib import Path

from environment import environment  # bench/environment.py: hardware, versions, command line

from surgery.base.tokenizer import tiny_tokenizer

warnings.filterwarnings("ignore")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # a cast notice on every int8 call

MODEL = "facebook/opt-125m"
LINEARS = r"re:.*layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|fc1|fc2)"


def rules_for(base: str) -> dict:
    quantize = {"fp32": "none", "int8": "int8", "nf4": "nf4"}[base]
    return {
        "quantize": quantize,
        "default": "freeze" if base == "fp32" else "quantize",
        "rules": [
            {"match": "lm_head", "action": "freeze"},
            {"match": "*", "type": "embedding", "action": "freeze"},
            {"match": LINEARS, "action": "adapt", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        ],
    }


def finetunes(base_kind: str, n: int, device: str):
    """A base of MODEL's shape stored as ``base_kind`` and ``n`` fine-tunes with distinct (nonzero) adapters."""
    import torch

    import surgery
    from surgery.base.loading import load_model
    from surgery.base.ownership import own_state

    base = load_model(MODEL, random_init=True).model.float().to(device)  # the config says fp16: slow on a CPU
    rules = rules_for(base_kind)
    surgery.prepare_base(base, rules)
    fts = []
    for i in range(n):
        torch.manual_seed(i)
        ft = surgery.rewrite(base, rules)
        with torch.no_grad():
            for name, p in own_state(ft).items():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        fts.append(ft)
    return base, fts


def seconds(work, device: str) -> float:
    """CPU seconds of ``work`` on the CPU; wall seconds until the GPU is done on CUDA."""
    import torch

    if device == "cpu":
        start = time.process_time()
        work()
        return time.process_time() - start
    torch.cuda.synchronize()
    start = time.perf_counter()
    work()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def alternate(contenders: dict, repeats: int, device: str, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each repetition of each contender; they take turns repetition by repetition."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for i in range(warmup + repeats):
        for name, work in contenders.items():
            took = seconds(work, device)
            if i >= warmup:
                times[name].append(took)
    return times


def bench_generate(base_kind: str, ns: list[int], repeats: int, new_tokens: int, device: str) -> list[dict]:
    from surgery.finetune.batched import generate

    base, fts = finetunes(base_kind, max(ns), device)
    tokenizer = tiny_tokenizer()
    prompt = ["the quick brown fox jumps"]
    rows = []
    for n in ns:
        times = alternate(
            {
                "alone": lambda: generate(base, fts[:1], prompt, tokenizer, max_new_tokens=new_tokens),
                "batched": lambda n=n: generate(base, fts[:n], prompt, tokenizer, max_new_tokens=new_tokens),
            },
            repeats,
            device,
        )
        rows.append(summarise("generate", base_kind, n, times, new_tokens, device, {"new_tokens": new_tokens}))
    return rows


def bench_train(base_kind: str, ns: list[int], repeats: int, seq: int, device: str) -> list[dict]:
    import torch

    from surgery.distributed import World
    from surgery.training.batched_train import make_group, micro_step
    from surgery.training.data import Blocks
    from surgery.training.job import Job, TrainConfig
    from surgery.training.loop import prepare
    from surgery.training.step import train_step

    where = World()
    _, fts = finetunes(base_kind, 1 + max(ns), device)
    steps = repeats + 3

    def run_for(i: int):
        ids = torch.randint(3, 20000, (steps, seq), generator=torch.Generator().manual_seed(i))
        data = Blocks(ids, ids.clone(), torch.ones_like(ids), f"random tokens {i}")
        config = TrainConfig(batch_size=1, lr=1e-4, max_steps=steps, max_grad_norm=0.0, seed=i)
        return prepare(Job(f"job{i}", fts[i], data, config), where)

    rows = []
    for n in ns:
        alone = run_for(0)
        group = make_group([run_for(i) for i in range(1, n + 1)])
        step_alone = lambda alone=alone: train_step(alone, where)  # noqa: E731
        step_batched = lambda group=group: micro_step(group, where, None)  # noqa: E731
        times = alternate({"alone": step_alone, "batched": step_batched}, repeats, device)
        memory = {"activation_mib_alone": saved_mib(step_alone), "activation_mib_batched": saved_mib(step_batched)}
        if device == "cuda":
            memory |= {"peak_mib_alone": peak_mib(step_alone), "peak_mib_batched": peak_mib(step_batched)}
        rows.append(summarise("train", base_kind, n, times, seq, device, {"seq": seq, **memory}))
    return rows


def saved_mib(work) -> float:
    """MiB of distinct tensors autograd saves for backward while ``work`` runs its forward passes."""
    import torch

    seen: dict[int, int] = {}

    def pack(t):
        if not t.is_leaf:  # activations (and weights dequantized for the pass), not parameters or inputs
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        work()
    return sum(seen.values()) / 2**20


def peak_mib(work) -> float:
    """MiB of GPU memory allocated at the peak of ``work`` (everything held, models included)."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    work()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def summarise(mode: str, base_kind: str, n: int, times: dict, tokens_alone: int, device: str, extra: dict) -> dict:
    """One row: throughput of one fine-tune alone (tokens_alone per call) vs n batched (n x as many)."""
    alone, together = statistics.median(times["alone"]), statistics.median(times["batched"])
    per_s_alone, per_s_batched = tokens_alone / alone, n * tokens_alone / together
    return {
        "mode": mode,
        "n": n,
        "base": base_kind,
        "device": device_name(device),
        "model": MODEL,
        "speedup": per_s_batched / per_s_alone,
        "tokens_per_s_alone": per_s_alone,
        "tokens_per_s_batched": per_s_batched,
        "s_one_alone": times["alone"],
        "s_batched": times["batched"],
        "repeats": len(times["alone"]),
        **extra,
    }


def device_name(device: str) -> str:
    import torch

    return "cpu (1 thread)" if device == "cpu" else torch.cuda.get_device_name()


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N = 1 and 8, fewer repetitions")
    parser.add_argument("--n", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--modes", nargs="+", default=["generate", "train"], choices=["generate", "train"])
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch

    if args.device == "cpu":
        torch.set_num_threads(1)
    ns = args.n or ([1, 8] if args.quick else [1, 2, 4, 8])
    new_tokens = args.new_tokens or (24 if args.quick else 64)
    rows = []
    for mode in args.modes:
        repeats = args.repeats or ((2 if mode == "generate" else 3) if args.quick else 10)
        for base_kind in ["fp32", "int8", "nf4"] if mode == "generate" else ["fp32", "nf4"]:
            found = (
                bench_generate(base_kind, ns, repeats, new_tokens, args.device)
                if mode == "generate"
                else bench_train(base_kind, ns, repeats, args.seq, args.device)
            )
            for row in found:
                print(
                    f"{mode:8s} {base_kind:4s} N={row['n']}: {row['speedup']:.2f}x (one alone "
                    f"{spread(row['s_one_alone'])} s, batched {spread(row['s_batched'])} s)",
                    flush=True,
                )
            rows += found
    print()
    print(
        f"{'mode':8s} {'base':4s} {'N':>2s} {'alone tok/s':>11s} {'batched tok/s':>13s} {'speedup':>7s} "
        f"{'one alone s':>14s} {'spread batched s':>16s} {'act. MiB alone/batched':>22s}"
        + (f" {'peak MiB alone/batched':>22s}" if args.device == "cuda" else "")
    )
    for r in rows:
        memory = (
            f"{r['activation_mib_alone']:.0f} / {r['activation_mib_batched']:.0f}"
            if "activation_mib_alone" in r
            else "-"
        )
        peak = f" {r['peak_mib_alone']:.0f} / {r['peak_mib_batched']:.0f}" if "peak_mib_alone" in r else ""

        print(
            f"{r['mode']:8s} {r['base']:4s} {r['n']:2d} {r['tokens_per_s_alone']:11.1f} "
            f"{r['tokens_per_s_batched']:13.1f} {r['speedup']:6.2f}x {spread(r['s_one_alone']):>14s} "
            f"{spread(r['s_batched']):>16s} {memory:>22s}{peak}"
        )
    out = Path(
        args.out or ("bench/results/batched.json" if args.device == "cpu" else "bench/results/batched_cuda.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "quick": args.quick,
                "environment": environment(),
                "machine": platform.platform(),
                "torch": torch.__version__,
                "device": device_name(args.device),
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
