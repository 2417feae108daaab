"""Memory while loading: a >= 1B-parameter random Llama-shape checkpoint (bf16, 2 shards, written here at bench
time) loaded quantized through surgery (quantized while it loads) and through transformers + BitsAndBytesConfig.

Each load runs in a fresh process that samples its anonymous resident memory (RssAnon: the safetensors pages
are file-backed and would hide the difference in max RSS) every 5 ms; the peak over the imports-only baseline
is what loading added. On CUDA the peak allocated device memory is reported too, next to the goal: the
planned base + the largest single checkpoint tensor + 5 %. Prints a table and writes JSON. Usage:
  python bench/load_memory.py [--device cpu|cuda] [--layers 16] [--out bench/results/load_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from environment import environment  # bench/environment.py: hardware, versions, command line

SHAPE = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}
SKIP = ["lm_head"]  # both loaders leave lm_head unquantized, as the rule files below do
RULES = {
    "nf4": {
        "quantize": {"scheme": "nf4", "double_quant": True, "compute_dtype": "bfloat16"},
        "default": "quantize",
        "rules": [{"match": "lm_head", "action": "freeze"}, {"match": "*", "type": "embedding", "action": "freeze"}],
    },
    "int8": {
        "quantize": {"scheme": "int8", "threshold": 6.0},
        "default": "quantize",
        "rules": [{"match": "lm_head", "action": "freeze"}, {"match": "*", "type": "embedding", "action": "freeze"}],
    },
}


def write_checkpoint(folder: Path, layers: int) -> tuple[int, int]:
    """A random bf16 Llama checkpoint in 2 safetensors shards with an index, one tensor made at a time."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=layers, dtype="bfloat16", **SHAPE)
    config.save_pretrained(folder)
    h, f, kv = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["hidden_size"] // 4
    shapes = {
        "model.embed_tokens.weight": (SHAPE["vocab_size"], h),
        "model.norm.weight": (h,),
        "lm_head.weight": (SHAPE["vocab_size"], h),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (f, h),
                p + "mlp.up_proj.weight": (f, h),
                p + "mlp.down_proj.weight": (h, f),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
        )
    names = list(shapes)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map, generator = {}, torch.Generator().manual_seed(0)
    for i, part in enumerate(halves):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        tensors = {n: (torch.randn(shapes[n], generator=generator) * 0.02).to(torch.bfloat16) for n in part}
        save_file(tensors, folder / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
        del tensors
    total = sum(torch.Size(s).numel() for s in shapes.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 2 * total}, "weight_map": weight_map})
    )
    return total, 2 * max(torch.Size(s).numel() for s in shapes.values())


def rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def child(loader: str, scheme: str, folder: str, device: str) -> dict:
    """One load in this process: anonymous host peak over the imports, device peak, seconds."""
    import torch
    import transformers  # noqa: F401  (imports counted in the baseline)

    import surgery  # noqa: F401

    baseline, peak, done = rss_anon(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon())
            time.sleep(0.005)

    threading.Thread(target=sample, daemon=True).start()
    start = time.perf_counter()
    if loader == "surgery":
        from surgery.base.loading import load_model

        model = load_model(folder, rules=RULES[scheme], device=device).model
    else:
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        config = (
            BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=SKIP)
            if scheme == "int8"
            else BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
                llm_int8_skip_modules=SKIP,
            )
        )
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map={"": device})
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    done.set()
    peak[0] = max(peak[0], rss_anon())
    from surgery.planning.memory import parameter_bytes

    return {
        "loader": loader,
        "scheme": scheme,
        "seconds": seconds,
        "imports_anon_bytes": baseline,
        "peak_anon_bytes": peak[0],
        "loading_anon_bytes": peak[0] - baseline,
        "held_bytes": parameter_bytes(model),
        "device_peak_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
    }


def planned_base(folder: str, scheme: str) -> int:
    from surgery.base.loading import graph_of
    from surgery.planning.decisions import plan

    return plan(graph_of(folder), RULES[scheme]).base_bytes_after


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--layers", type=int, default=16, help="decoder layers (16: 1.1B parameters)")
    parser.add_argument("--schemes", nargs="+", default=["nf4", "int8"], choices=list(RULES))
    parser.add_argument("--out", default="bench/results/load_memory.json")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.device)))
        return
    with tempfile.TemporaryDirectory(prefix="surgery-load-") as tmp:
        folder = Path(tmp)
        params, largest = write_checkpoint(folder, args.layers)
        rows = []
        for scheme in args.schemes:
            for loader in ("surgery", "transformers"):  # alternating, each in a fresh process
                out = subprocess.run(
                    [sys.executable, __file__, "--device", args.device, "--child", loader, scheme, str(folder)],
                    capture_output=True,
                    text=True,
                    env={**os.environ, "HF_HUB_OFFLINE": "1"},
                )
                if out.returncode != 0:
                    raise SystemExit(f"{loader} {scheme} failed:\n{out.stderr[-3000:]}")
                row = json.loads(out.stdout.strip().splitlines()[-1])
                row["planned_base_bytes"] = planned_base(str(folder), scheme)
                row["device_goal_bytes"] = int((row["planned_base_bytes"] + largest) * 1.05)
                rows.append(row)
    import torch

    result = {
        "bench": "load_memory",
        "parameters": params,
        "largest_tensor_bytes": largest,
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "rows": rows,
        "environment": environment(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    mib = 2**20
    gpu = f" ({result['gpu']})" if result["gpu"] else ""
    print(f"{params / 1e9:.2f}B parameters, bf16, 2 shards; device {args.device}{gpu}")
    print(
        f"{'loader':<13}{'scheme':<7}{'imports MiB':>12}{'loading MiB':>12}{'held MiB':>10}{'device MiB':>11}"
        f"{'goal MiB':>10}{'s':>7}"
    )
    for r in rows:
        device = f"{r['device_peak_bytes'] / mib:,.0f}" if r["device_peak_bytes"] is not None else "-"
        print(
            f"{r['loader']:<13}{r['scheme']:<7}{r['imports_anon_bytes'] / mib:>12,.0f}"
            f"{r['loading_anon_bytes'] / mib:>12,.0f}{r['held_bytes'] / mib:>10,.0f}{device:>11}"
            f"{r['device_goal_bytes'] / mib:>10,.0f}{r['seconds']:>7.1f}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
