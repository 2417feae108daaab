"""Wall time and peak RSS of `surgery inspect` on big bundled architectures (meta device, no weights).

Each model runs in a fresh process (so peak RSS is that process's own). Prints a table, writes JSON.
Usage: python bench/inspect_big.py [--out bench/results/inspect_big.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from environment import environment  # bench/environment.py: hardware, versions, command line

MODELS = ["facebook/opt-1.3b", "meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-70B"]
CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
from surgery.base.loading import load_model
from surgery.model.tracing import trace
t1 = time.perf_counter()
model = load_model(sys.argv[1], weights=False).model
graph = trace(model)
t2 = time.perf_counter()
assert all(p.device.type == "meta" for p in model.parameters())
print(json.dumps({"import_s": t1 - t0, "build_and_trace_s": t2 - t1, "trace_s": graph.seconds,
                  "method": graph.method, "parameters": graph.numel,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(model: str) -> dict:
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", CHILD, model],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - start
    result["model"] = model
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench/results/inspect_big.json")
    args = parser.parse_args()
    rows = [run(m) for m in MODELS]
    print(f"{'model':28} {'params':>16} {'trace s':>8} {'wall s':>8} {'peak RSS MB':>12}")
    for r in rows:
        print(
            f"{r['model']:28} {r['parameters']:>16,} {r['trace_s']:>8.2f} {r['wall_s']:>8.2f} {r['peak_rss_mb']:>12.0f}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {"machine": platform.platform(), "cpus": os.cpu_count(), "results": rows, "environment": environment()},
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
