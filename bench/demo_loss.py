"""The demo's training curves: ``surgery demo`` run once, each fine-tune's loss per step from its metrics.jsonl.

The bundled tiny OPT, three fine-tunes with three rule files trained together on three toy tasks (what
``surgery demo`` prints), offline. Writes the steps and losses of each job with the environment.
Usage: python bench/demo_loss.py [--steps 150] [--out bench/results/demo_loss.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from environment import environment  # bench/environment.py: hardware, versions, command line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "demo_loss.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        command = [sys.executable, "-m", "surgery_cli.app", "demo", "--steps", str(args.steps), "--out", scratch]
        subprocess.run(command, check=True, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        jobs = {}
        for metrics in sorted(Path(scratch).glob("*/metrics.jsonl")):
            lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            steps = [line for line in lines if line.get("loss") is not None and "step" in line]
            jobs[metrics.parent.name] = {"step": [s["step"] for s in steps], "loss": [s["loss"] for s in steps]}
    for name, curve in jobs.items():
        print(f"{name:10} loss {curve['loss'][0]:.3f} -> {curve['loss'][-1]:.3f} in {curve['step'][-1]} steps")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"model": "tiny-opt", "steps": args.steps, "wall_s": seconds, "jobs": jobs, "environment": environment()}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
