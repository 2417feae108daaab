"""Training-step speed: a surgery fine-tune vs PEFT on the same base, LoRA settings, data, dtype, optimizer.

For each model shape and base storage: LoRA r=8 alpha=16 (no dropout) on q_proj/v_proj, AdamW lr 1e-4,
batch x sequence of random token ids, fp32 compute. One step = forward with labels, backward,
optimizer step, zero_grad. Warmup steps are not timed; the two take turns step by step; the median step is reported.
PEFT wraps its own fresh copy of the base (quantized the same way), ours is a fine-tune of another.
With --compile, a third contender: another fine-tune whose forward is torch.compiled (inductor; its compile
happens in the warmup steps), i.e. `surgery train --compile` against eager.
Prints a table and writes JSON. Usage:
  python bench/train_step.py [--models tiny-opt facebook/opt-125m] [--storage fp32 int8] [--steps 10] [--compile]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

from environment import environment  # bench/environment.py: hardware, versions, command line

warnings.filterwarnings("ignore")


def rules_for(storage: str) -> dict:
    return {
        "quantize": "none" if storage == "fp32" else storage,
        "default": "quantize" if storage != "fp32" else "freeze",
        "rules": [
            {"match": "lm_head", "action": "freeze"},
            {"match": "*", "type": "embedding", "action": "freeze"},
            {"match": "re:.*(q_proj|v_proj)", "action": "adapt", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        ],
    }


def fresh_base(name: str, storage: str, device: str):
    import surgery
    from surgery.base.loading import load_model

    base = load_model(name, random_init=True).model.float().to(device)
    if storage != "fp32":
        surgery.prepare_base(base, rules_for(storage))
    return base


def time_steps(models: list, ids, steps: int, warmup: int) -> list[list[float]]:
    """Per model, the seconds of each timed step; the models take turns step by step, so drift hits all alike."""
    import torch

    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for m in models]
    times: list[list[float]] = [[] for _ in models]
    for m in models:
        m.train()
    for i in range(warmup + steps):
        for k, (model, optimizer) in enumerate(zip(models, optimizers)):
            if ids.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ids.is_cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times[k].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["tiny-opt", "facebook/opt-125m"])
    parser.add_argument("--storage", nargs="+", default=["fp32", "int8"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--compile", action="store_true", help="also time a torch.compiled fine-tune")
    parser.add_argument("--out", default="bench/results/train_step.json")
    args = parser.parse_args()

    import peft
    import torch

    import surgery

    rows = []
    for name in args.models:
        for storage in args.storage:
            torch.manual_seed(0)
            ours = surgery.rewrite(fresh_base(name, storage, args.device), rules_for(storage))
            theirs = peft.get_peft_model(
                fresh_base(name, storage, args.device),
                peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]),
            )
            contenders = [ours, theirs]
            if args.compile:
                torch._dynamo.reset()
                compiled = surgery.rewrite(fresh_base(name, storage, args.device), rules_for(storage))
                compiled.compile()
                contenders.append(compiled)
            vocab = ours.config.vocab_size
            ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
            ids = ids.to(args.device)
            medians = [statistics.median(t) for t in time_steps(contenders, ids, args.steps, args.warmup)]
            t_ours, t_peft = medians[:2]
            tokens = args.batch * args.seq
            row = {
                "model": name,
                "storage": storage,
                "device": args.device,
                "batch": args.batch,
                "seq": args.seq,
                "ms_per_step_surgery": 1000 * t_ours,
                "ms_per_step_peft": 1000 * t_peft,
                "tokens_per_s_surgery": tokens / t_ours,
                "tokens_per_s_peft": tokens / t_peft,
                "ratio": t_ours / t_peft,
            }
            if args.compile:
                row.update(ms_per_step_compiled=1000 * medians[2], compiled_speedup=t_ours / medians[2])
            rows.append(row)
            del contenders, ours, theirs
    print(
        f"{'model':20s} {'base':5s} {'device':6s} {'surgery ms':>11s} {'PEFT ms':>9s} {'surgery tok/s':>14s} "
        f"{'PEFT tok/s':>11s} {'ratio':>6s}" + (f" {'compiled ms':>12s} {'speedup':>8s}" if args.compile else "")
    )
    for r in rows:
        print(
            f"{r['model']:20s} {r['storage']:5s} {r['device']:6s} {r['ms_per_step_surgery']:11.1f} "
            f"{r['ms_per_step_peft']:9.1f} {r['tokens_per_s_surgery']:14,.0f} {r['tokens_per_s_peft']:11,.0f} "
            f"{r['ratio']:6.2f}"
            + (f" {r['ms_per_step_compiled']:12.1f} {r['compiled_speedup']:8.2f}" if args.compile else "")
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": platform.platform(),
                "torch": torch.__version__,
                "peft": peft.__version__,
                "steps": args.steps,
                "warmup": args.warmup,
                "rows": rows,
                "environment": environment(),
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
