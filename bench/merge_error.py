"""What merging (and requantizing the merged weights) changes, on fine-tunes of quantized bases.

For each model and rule file: a fine-tune whose adapters get a seeded nudge (as a few training
steps would), merged into a plain fp32 model, and merged then requantized as the base held it.
Reported: max |Δlogits| relative to the largest logit of the reference, on a fixed batch of random
token ids. Random-weight models (no download), so this measures the mechanics, not a real
checkpoint's sensitivity. Prints a table and writes JSON.
Usage: python bench/merge_error.py [--models tiny-opt tiny-llama tiny-gpt2 facebook/opt-125m]
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

from environment import environment  # bench/environment.py: hardware, versions, command line

warnings.filterwarnings("ignore")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["tiny-opt", "tiny-llama", "tiny-gpt2", "facebook/opt-125m"])
    parser.add_argument("--rules", nargs="+", default=["qv_lora", "qlora_nf4"])
    parser.add_argument("--scale", type=float, default=0.01, help="std of the nudge given to every trainable tensor")
    parser.add_argument("--out", default="bench/results/merge_error.json")
    args = parser.parse_args()

    import torch

    import surgery
    from surgery.base.loading import load_model
    from surgery.finetune.merging import output_error

    rows = []
    for name in args.models:
        for rules in args.rules:
            base = load_model(name, random_init=True).model.float()
            ft = surgery.rewrite(base, rules)
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for p in ft.parameters():
                    if p.requires_grad:
                        p.add_(torch.randn(p.shape, generator=g) * args.scale)
            ids = torch.randint(0, min(ft.config.vocab_size, 256), (2, 64), generator=g)
            inputs = {"input_ids": ids}
            merged = surgery.merge(ft)
            requantized = surgery.merge(ft, requantize=True)
            rows.append(
                {
                    "model": name,
                    "rules": rules,
                    "merged_vs_finetune": output_error(ft, merged, inputs)["max_rel"],
                    "requantized_vs_merged": output_error(merged, requantized, inputs)["max_rel"],
                    "requantized_vs_finetune": output_error(ft, requantized, inputs)["max_rel"],
                }
            )
            del base, ft, merged, requantized
    print(f"{'model':20s} {'rules':10s} {'merged vs ft':>13s} {'requant vs merged':>18s} {'requant vs ft':>14s}")
    for r in rows:
        print(
            f"{r['model']:20s} {r['rules']:10s} {r['merged_vs_finetune']:13.2e} {r['requantized_vs_merged']:18.2e} "
            f"{r['requantized_vs_finetune']:14.2e}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"scale": args.scale, "rows": rows, "environment": environment()}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
