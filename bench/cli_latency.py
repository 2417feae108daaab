"""How long `surgery` commands take as a user runs them: whole process, median of N runs.

cold = an empty trace cache (a fresh SURGERY_CACHE folder per run), warm = the same command run
again with the cache the cold run filled. Wall time and the child's CPU time (user + sys, less
noisy on a shared machine) are both reported. Prints a table, writes JSON.
Usage: python bench/cli_latency.py [--runs 5] [--out bench/results/cli_latency.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from environment import environment  # bench/environment.py: hardware, versions, command line

COMMANDS = {  # name -> (arguments, goal in seconds for (cold, warm); None: no goal)
    "surgery --help": (["--help"], (0.3, 0.3)),
    "plan qv_lora --model tiny-opt": (["plan", "qv_lora", "--model", "tiny-opt"], (None, 0.6)),
    "inspect meta-llama/Llama-3.1-70B": (["inspect", "meta-llama/Llama-3.1-70B"], (6.0, 0.6)),
}


def timed(args: list[str], cache: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one `surgery ARGS` process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "surgery_cli.app", *args],
        check=True,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "SURGERY_CACHE": str(cache), "HF_HUB_OFFLINE": "1"},
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def measure(args: list[str], runs: int) -> dict:
    cold, warm = [], []
    for _ in range(runs):  # cold and warm interleaved, so both see the same machine load
        cache = Path(tempfile.mkdtemp(prefix="surgery-bench-cache-"))
        try:
            cold.append(timed(args, cache))
            warm.append(timed(args, cache))
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    median = lambda xs, i: statistics.median(x[i] for x in xs)  # noqa: E731
    return {
        "cold_wall_s": median(cold, 0),
        "cold_cpu_s": median(cold, 1),
        "warm_wall_s": median(warm, 0),
        "warm_cpu_s": median(warm, 1),
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cli_latency.json")
    args = parser.parse_args()
    results = {}
    for name, (argv, goals) in COMMANDS.items():
        results[name] = {**measure(argv, args.runs), "goal_cold_s": goals[0], "goal_warm_s": goals[1]}
    print(f"{'command':36} {'cold wall':>10} {'cold cpu':>9} {'warm wall':>10} {'warm cpu':>9}   goal (cold / warm)")
    for name, r in results.items():
        goal = " / ".join("-" if g is None else f"<= {g:g} s" for g in (r["goal_cold_s"], r["goal_warm_s"]))
        print(
            f"{name:36} {r['cold_wall_s']:9.2f}s {r['cold_cpu_s']:8.2f}s {r['warm_wall_s']:9.2f}s "
            f"{r['warm_cpu_s']:8.2f}s   {goal}"
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
