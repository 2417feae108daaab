"""The plan's longest context: the block size `surgery plan --max-context` answers for a model, rules and GPU memory.

Bundled architecture (config only, on the meta device: nothing is downloaded), batch 1, bf16, gradient checkpointing,
checkpoints offloaded, and the other memory options as `max_context` adds them; one row per device memory and loss
chunk size, with every term of the answer. A plan, not a measurement: `bench/gpu_check.py` measures a real step at
the plan's answer where a GPU is present.
Usage: python bench/max_context.py [--model meta-llama/Llama-3.1-8B] [--rules qlora_r32]
    [--memory 16 24 48 80] [--loss-chunks 512] [--out bench/results/max_context.json]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from environment import environment  # bench/environment.py: hardware, versions, command line

GiB = 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="meta-llama/Llama-3.1-8B")
    parser.add_argument("--rules", default="qlora_r32")
    parser.add_argument("--memory", type=int, nargs="+", default=[16, 24, 48, 80], help="GiB of one GPU")
    parser.add_argument("--loss-chunks", type=int, nargs="+", default=[512], help="as asked (the plan may add 128)")
    parser.add_argument("--out", default="bench/results/max_context.json")
    args = parser.parse_args()

    from surgery.base.loading import graph_of, load_model, target_rules
    from surgery.planning.decisions import plan
    from surgery.planning.training_memory import TrainingShape, max_context
    from surgery.rules.rule_file import load_rules
    from surgery.training.data import model_max_length

    planned = plan(graph_of(args.model), target_rules(load_rules(args.rules), True))
    layout = load_model(args.model, weights=False).model
    limit = model_max_length(layout)
    shape = TrainingShape(1, 1, gradient_checkpointing=True, precision="bf16", offload_activations=True)
    rows = []
    for chunk in args.loss_chunks:
        for gib in args.memory:
            answer = max_context(planned, layout, replace(shape, loss_chunk_tokens=chunk), gib * GiB, model_limit=limit)
            rows.append({"device_memory_gib": gib, "loss_chunk_tokens": chunk, **answer.to_dict()})
            print(f"{gib:>4} GiB, loss chunks {chunk:>4}: {answer.tokens:>9,} tokens  {answer.flags()}")
    result = {
        "model": args.model,
        "rules": args.rules,
        "assumes": shape.describe(),
        "model_limit": limit,
        "rows": rows,
        "environment": environment(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
