"""Packing vs one example per row: padding fraction and training tokens per second, interleaved in one process.

For each bundled data set on tiny-llama (qv_lora_head, block 64, batch 4): the fraction of the fed
micro-batches' token slots that are padding, unpacked and packed, and real tokens per CPU second over
the same number of steps, the two runs' steps taken in turns so both see the same machine load.
Prints a table, writes JSON.
Usage: python bench/packing.py [--steps 20] [--out bench/results/packing.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from environment import environment  # bench/environment.py: hardware, versions, command line

from surgery.base.tiny import tiny_model
from surgery.base.tokenizer import tiny_tokenizer
from surgery.distributed import world
from surgery.training.config import DataConfig
from surgery.training.job import TrainConfig, make_job
from surgery.training.loop import prepare
from surgery.training.step import train_step


def padding(blocks, batch_size: int, seed: int = 0) -> float:
    """The fraction of the token slots of the micro-batches training feeds (epoch 0's order, each batch padded
    to its longest row) that hold padding."""
    import torch

    order, slots, real = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed)), 0, 0
    for start in range(0, len(blocks) - batch_size + 1, batch_size):
        lengths = blocks.attention_mask[order[start : start + batch_size]].sum(dim=1)
        slots, real = slots + int(lengths.max()) * batch_size, real + int(lengths.sum())
    return 1 - real / slots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "packing.json")
    args = parser.parse_args()
    tokenizer, where, results = tiny_tokenizer(), world(), {}
    for data in ("capitals", "upper", "reverse"):
        config = TrainConfig(batch_size=4, lr=1e-2, max_steps=args.steps, seed=0)
        runs = {
            packed: prepare(
                make_job(
                    tiny_model("tiny-llama"),
                    name="j",
                    rules="qv_lora_head",
                    data=data,
                    tokenizer=tokenizer,
                    config=config,
                    data_config=DataConfig(block_size=64, packing=packed),
                    model_name="tiny-llama",
                ),
                where,
            )
            for packed in (False, True)
        }
        seconds, tokens = {False: 0.0, True: 0.0}, {False: 0, True: 0}
        for _ in range(args.steps):
            for packed, run in runs.items():  # interleaved
                start = time.process_time()
                record = train_step(run, where)
                seconds[packed] += time.process_time() - start
                tokens[packed] += record["tokens"]
        results[data] = {
            f"{'packed' if p else 'unpacked'}": {
                "rows": len(runs[p].job.data),
                "padding_fraction": padding(runs[p].job.data, 4),
                "tokens_per_cpu_s": tokens[p] / seconds[p],
            }
            for p in (False, True)
        }
    print(f"{'data':10} {'rows':>11} {'padding':>15} {'tokens / CPU s':>19}")
    for data, r in results.items():
        u, p = r["unpacked"], r["packed"]
        print(
            f"{data:10} {u['rows']:>5} -> {p['rows']:<4} {u['padding_fraction']:6.1%} -> {p['padding_fraction']:5.1%}"
            f" {u['tokens_per_cpu_s']:8.0f} -> {p['tokens_per_cpu_s']:<8.0f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "machine": {
                    "python": platform.python_version(),
                    "cpus": os.cpu_count(),
                    "platform": platform.platform(),
                },
                "steps": args.steps,
                "results": results,
                "environment": environment(),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
