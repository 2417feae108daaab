"""Memory of N fine-tunes: one shared int8 base + adapters (surgery) vs N full copies vs N PEFT models.

OPT-350m shape, random init (no download), qv_lora (LoRA r=8 on q_proj/v_proj over int8).
Bytes are unique parameter storage (quantization scales included), measured in this run. Full
copies and PEFT models are built one at a time (N of them would not fit next to each other on a
24 GiB machine), each measured alone and summed. Prints a table and writes JSON.
Usage: python bench/siblings.py [--model facebook/opt-350m] [--n 8] [--out bench/results/siblings.json]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import time
import warnings
from pathlib import Path

from environment import environment  # bench/environment.py: hardware, versions, command line

warnings.filterwarnings("ignore")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="facebook/opt-350m")
    parser.add_argument("--rules", default="qv_lora")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--out", default="bench/results/siblings.json")
    args = parser.parse_args()

    from surgery.base.loading import load_model
    from surgery.finetune.apply import apply
    from surgery.planning.memory import parameter_bytes

    base = load_model(args.model, random_init=True).model.float()
    loaded = parameter_bytes(base)

    one_copy = parameter_bytes(copy.deepcopy(base))
    gc.collect()
    peft_bytes = peft_model_bytes(base)
    gc.collect()

    start = time.perf_counter()
    applied = apply(base, args.rules, args.n)
    seconds = time.perf_counter() - start
    plan, base_bytes, adapters, ours = applied.plan, applied.base_bytes, list(applied.own_bytes), applied.total_bytes
    assert all(applied.equal_at_init), "a fine-tune differs from the base at init"
    bound = base_bytes + args.n * plan.finetune_bytes
    rows = {
        f"surgery: int8 base + {args.n} fine-tunes": ours,
        f"{args.n} full copies (copy.deepcopy)": args.n * one_copy,
        f"{args.n} PEFT models (get_peft_model on a deep copy)": args.n * peft_bytes if peft_bytes else None,
    }
    print(f"{args.model} (random init, fp32), {args.rules}, N = {args.n}")
    print(f"{'':55} {'bytes':>16} {'GiB':>8}")
    for label, value in rows.items():
        print(f"{label:55} {value:>16,} {value / 2**30:>8.3f}" if value else f"{label:55} {'(peft missing)':>16}")
    print(
        f"base as loaded {loaded:,} B; base int8 {base_bytes:,} B; adapters per fine-tune {adapters[0]:,} B; "
        f"planned {plan.finetune_bytes:,} B"
    )
    print(
        f"check: base + {args.n} fine-tunes <= base + {args.n} x adapter bytes + 1 %: "
        f"{ours <= bound * 1.01} ({ours:,} vs {bound:,}); {args.n} rewrites took {seconds:.1f}s"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "model": args.model,
                "rules": args.rules,
                "n": args.n,
                "base_loaded_bytes": loaded,
                "base_quantized_bytes": base_bytes,
                "adapter_bytes": adapters,
                "planned_finetune_bytes": plan.finetune_bytes,
                "planned_base_bytes": plan.base_bytes_after,
                "rows": rows,
                "within_1_percent": ours <= bound * 1.01,
                "rewrite_seconds": seconds,
                "environment": environment(),
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")


def peft_model_bytes(base) -> int | None:
    """Unique bytes of one PEFT model (same LoRA settings) built on a deep copy of the base."""
    try:
        import peft
    except ImportError:
        return None
    from surgery.planning.memory import parameter_bytes

    cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"])
    model = peft.get_peft_model(copy.deepcopy(base), cfg)
    return parameter_bytes(model)


if __name__ == "__main__":
    main()
