"""The benchmarks page and its pictures, generated from ``bench/results/*.json`` only.

Each table names the JSON it comes from, the command that wrote it, and the hardware and software versions the
JSON records; a figure no JSON holds is not shown. ``python docs/generate.py`` writes ``docs/benchmarks.md`` with
``page()`` and the pictures under ``docs/img/`` with ``pictures()``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 2**20

INTRO = """# Benchmarks

Every table and picture on this page is generated from a JSON file in `bench/results/` by `bench/report.py`
(`python docs/generate.py` writes this page; a test checks it is up to date). Each names the command that wrote its
JSON and the hardware and software it ran on. Timings on a shared CPU machine are noisy: read ratios of a few
percent as parity. A benchmark without a JSON file in the repository has no figure here.
"""


def load(name: str) -> dict | None:
    """The JSON of one benchmark, or None when the repository holds none."""
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def source(name: str, data: dict) -> str:
    """Where a table's figures come from: the file, the command, the hardware and the software versions."""
    env = data.get("environment")
    if env is None and "software" in data:  # train_memory.json records its own fields
        hw, sw = data.get("hardware", {}), data["software"]
        env = {"command": data.get("command"), "cpu": hw.get("cpu"), "cpu_count": hw.get("cpu_count"), **sw}
    if env is None:
        return f"*Source: `bench/results/{name}.json`; command, hardware and versions not recorded in it.*\n"
    names = ("python", "torch", "transformers", "bitsandbytes", "peft")
    versions = ", ".join(f"{k} {env[k]}" for k in names if env.get(k))
    gpu = f", {env['gpu']}" if env.get("gpu") else ""
    hardware = f"{env.get('cpu') or 'CPU'} ({env.get('cpu_count')} cores){gpu}"
    command = f"`{env['command']}`" if env.get("command") else "command not recorded"
    return f"*Source: `bench/results/{name}.json`, written by {command} on {hardware}; {versions}.*\n"


def table(header: list[str], rows: list[list], right: int = 1) -> str:
    """A markdown table; columns from ``right`` on are right-aligned."""
    align = ["---" if i < right else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def siblings(data: dict) -> str:
    n = data["n"]
    rows = [[label, f"{value:,}", f"{value / 2**30:.2f}"] for label, value in data["rows"].items() if value]
    return (
        f"## Fine-tunes on one base\n\n`bench/siblings.py`: {data['model']} shape (random weights, fp32), "
        f"`{data['rules']}`, {n} fine-tunes; unique parameter storage measured in one run (full copies and PEFT "
        f"models built and measured one at a time, then summed). Each fine-tune holds "
        f"{data['adapter_bytes'][0]:,} bytes of its own, as the plan predicts ({data['planned_finetune_bytes']:,}).\n\n"
        + table([f"{n} fine-tunes as", "bytes", "GiB"], rows)
        + "\n![memory of N fine-tunes](img/siblings.png)\n\n"
    )


def batched(data: dict) -> str:
    rows = []
    for r in data["rows"]:
        generating = r["mode"] == "generate"
        mode = f"generate, {r['new_tokens']} new tokens" if generating else f"train, 1 x {r['seq']} per job"
        memory = ""
        if "activation_mib_alone" in r:
            memory = f"{r['activation_mib_alone']:.0f} / {r['activation_mib_batched']:.0f} MiB"
        rows.append(
            [mode, r["base"], r["n"], f"{r['tokens_per_s_alone']:.1f}", f"{r['tokens_per_s_batched']:.1f}",
             f"{r['speedup']:.2f}x", memory]
        )  # fmt: skip
    header = ["mode", "base", "N", "alone tok/s", "batched tok/s", "speedup", "activations alone / batched"]
    return (
        "## Batched against one after another\n\n`bench/batched.py`: OPT-125m shape (random weights, fp32 compute), "
        "LoRA r=8 on every decoder Linear, one thread, CPU time per process, the two contenders alternating. "
        '"Alone" is one fine-tune\'s call or step, which is what each of N turn-taking calls costs. Decoding reads '
        "the base once per token for all N fine-tunes; training at one short row per job is compute-bound on a CPU "
        "thread, so sharing the pass gains little there; the saved activations grow with N (bound them with "
        "`--max-batched-tokens`).\n\n"
        + table(header, rows, right=2)
        + "\n![batched against one after another](img/batched.png)\n\n"
    )


def demo_loss(data: dict) -> str:
    rows = [[job, f"{c['loss'][0]:.3f}", f"{c['loss'][-1]:.3f}", c["step"][-1]] for job, c in data["jobs"].items()]
    return (
        f"## The demo's training curves\n\n`surgery demo` on {data['model']}: three fine-tunes with three rule files "
        "trained together on one int8 base, each job's loss per step from its `metrics.jsonl` "
        f"(`bench/demo_loss.py`; the whole demo took {data['wall_s']:.0f} s in this run).\n\n"
        + table(["job", "first loss", "last loss", "steps"], rows)
        + "\n![the demo's loss curves](img/demo_loss.png)\n\n"
    )


def train_step(data: dict) -> str:
    rows = [
        [r["model"], r["storage"], f"{r['ms_per_step_surgery']:,.1f}", f"{r['ms_per_step_peft']:,.1f}",
         f"{r['tokens_per_s_surgery']:,.0f}", f"{r['tokens_per_s_peft']:,.0f}", f"{r['ratio']:.2f}"]
        for r in data["rows"]
    ]  # fmt: skip
    first = data["rows"][0]
    return (
        "## One training step against PEFT\n\n`bench/train_step.py`: forward with labels, backward and AdamW step of "
        "a surgery fine-tune and of a PEFT model on the same base (a fresh copy, quantized the same way), LoRA r=8 "
        f"alpha=16 on q_proj/v_proj, batch {first['batch']} x {first['seq']} random tokens, fp32 compute; the two take "
        f"turns step by step, median of {data['steps']} timed steps after {data['warmup']} warmup. Both run the same "
        "bitsandbytes and torch kernels; a tiny model's step takes milliseconds, where a loaded shared machine's noise "
        "dominates, so only the larger rows say anything about speed.\n\n"
        + table(["model", "base", "surgery ms/step", "PEFT ms/step", "surgery tok/s", "PEFT tok/s", "ratio"], rows, 2)
    )


def merge_error(data: dict) -> str:
    rows = [
        [r["model"], r["rules"], f"{r['merged_vs_finetune']:.1e}", f"{r['requantized_vs_merged']:.1e}",
         f"{r['requantized_vs_finetune']:.1e}"]
        for r in data["rows"]
    ]  # fmt: skip
    return (
        "## What merging changes\n\n`bench/merge_error.py`: `merge` and `merge(requantize=True)` on fine-tunes of "
        f"quantized bases (random weights; every trainable tensor nudged by N(0, {data['scale']}²) as a stand-in for "
        "training); max |Δlogits| relative to the largest logit on 2 x 64 random tokens. On an nf4 base the merge is "
        "exact to fp32 rounding (bitsandbytes computes 4-bit layers as dequantize + matmul); on int8 the difference "
        "is LLM.int8's activation quantization, which the dense merged model no longer does. Requantizing re-rounds "
        "every weight of the adapted layers.\n\n"
        + table(["model", "rules", "merged vs fine-tune", "requantized vs merged", "requantized vs fine-tune"], rows, 2)
    )


def packing(data: dict) -> str:
    rows = []
    for name, r in data["results"].items():
        u, p = r["unpacked"], r["packed"]
        rows.append(
            [name, f"{u['rows']} -> {p['rows']}", f"{u['padding_fraction']:.1%} -> {p['padding_fraction']:.1%}",
             f"{u['tokens_per_cpu_s']:,.0f} -> {p['tokens_per_cpu_s']:,.0f}"]
        )  # fmt: skip
    return (
        f"## Packing\n\n`bench/packing.py`: tiny-llama, `--packing` against one example per row, {data['steps']} "
        "steps interleaved; rows fed, the share of fed slots that is padding, and real tokens per CPU second.\n\n"
        + table(["data", "rows", "padding", "tokens per CPU s"], rows)
    )


def gradient_checkpointing(data: dict) -> str:
    rows = [
        ["on" if r["checkpointing"] else "off", f"{r['peak_step_bytes'] / MIB:,.0f} MiB", f"{r['step_seconds']:.1f} s"]
        for r in data["rows"]
    ]
    return (
        f"## Gradient checkpointing\n\n`bench/gradient_checkpointing.py`: one training step of {data['model']} shape, "
        f"LoRA r=8 on q/v, fp32, batch {data['batch']} x {data['seq']}, on {data['device']}, a fresh process per "
        f"setting: the step's peak above what was held before it, and its time. Saving: {data['saving']:.0%} of the "
        "step's peak.\n\n" + table(["`--gradient-checkpointing`", "step peak", "step time"], rows)
    )


def load_memory(data: dict) -> str:
    rows = [
        [r["loader"], r["scheme"], f"{r['loading_anon_bytes'] / MIB:,.0f} MiB", f"{r['held_bytes'] / MIB:,.0f} MiB",
         f"{r['seconds']:.1f}"]
        for r in data["rows"]
    ]  # fmt: skip
    return (
        "## Memory while loading\n\n`bench/load_memory.py`: a random Llama-shape checkpoint of "
        f"{data['parameters']:,} parameters (bf16, 2 shards) loaded in a fresh process per row, surgery "
        "(`load_model(folder, rules=...)`) against transformers + `BitsAndBytesConfig` with the same settings; peak "
        "anonymous memory above what the imports take, and the model's bytes held after.\n\n"
        + table(["loader", "scheme", "loading peak", "held after", "seconds"], rows, 2)
    )


def inspect_big(data: dict) -> str:
    rows = [
        [r["model"], f"{r['parameters']:,}", f"{r['trace_s']:.1f} s", f"{r['wall_s']:.1f} s",
         f"{r['peak_rss_mb']:,.0f} MB"]
        for r in data["results"]
    ]  # fmt: skip
    return (
        "## Tracing big architectures\n\n`bench/inspect_big.py`: build + trace of bundled architectures on the meta "
        "device, each in a fresh process (no weights).\n\n"
        + table(["model", "parameters", "trace", "wall (with imports)", "peak RSS"], rows)
    )


def cli_latency(data: dict) -> str:
    rows = []
    for name, r in data["results"].items():
        goals = " / ".join("-" if g is None else f"<= {g:g} s" for g in (r["goal_cold_s"], r["goal_warm_s"]))
        rows.append([f"`surgery {name}`" if name != "surgery --help" else f"`{name}`", f"{r['cold_wall_s']:.2f} s",
                     f"{r['warm_wall_s']:.2f} s", goals])  # fmt: skip
    return (
        "## CLI latency\n\n`bench/cli_latency.py`: whole process, median of "
        f"{next(iter(data['results'].values()))['runs']}; cold = empty trace cache, warm = the second run. A warm "
        "`plan` or `inspect` imports neither torch nor transformers.\n\n"
        + table(["command", "cold", "warm", "goal (cold / warm)"], rows)
    )


def loftq_init(data: dict) -> str:
    full = next(r["perplexity"] for r in data["rows"] if r["init"] == "-")
    base = {r["scheme"]: r["perplexity"] for r in data["rows"] if r["init"] == "B = 0"}
    rows = []
    for r in data["rows"]:
        closed = ""
        if r["init"] == "loftq":
            closed = f"{(base[r['scheme']] - r['perplexity']) / (base[r['scheme']] - full):.0%}"
        rows.append([r["scheme"], r["init"], r["r"] or "-", f"{r['perplexity']:.2f}", closed, f"{r['seconds']:.1f} s"])
    return (
        f"## LoftQ at initialization\n\n`bench/loftq_init.py`: perplexity at initialization of {data['model']} on "
        f"the first {data['tokens']:,} tokens of `{data['text']}` in windows of {data['window']}: full precision, its "
        "quantized base with plain LoRA (B = 0) and LoftQ, LoRA on every decoder linear layer (alpha = r). LoftQ "
        "always lowers the weight error; whether one pass lowers perplexity depends on the rank.\n\n"
        + table(["base", "init", "r", "perplexity", "share of the gap closed", "rewrite"], rows, 2)
    )


def train_memory(data: dict) -> str:
    rows = [
        [r["contender"], f"{r['tokens']:,}", f"{r['peak_step_bytes'] / MIB:,.0f} MiB", f"{r['step_cpu_seconds']:.1f} s"]
        for r in data["rows"]
    ]
    model = data["model"].replace(" (LlamaConfig below)", "")
    return (
        f"## Training memory at long context\n\n`bench/train_memory.py`: {model}; {data['training']}; one "
        "step's peak and CPU time per contender.\n\n"
        + table(["contender", "tokens", "step peak", "step CPU time"], rows, 1)
    )


def max_context(data: dict) -> str:
    rows = [
        [
            f"{r['device_memory_gib']} GiB",
            f"{r['loss_chunk_tokens']:,}",
            f"{r['tokens']:,}",
            f"{r.get('memory_tokens', r['tokens']):,}",
            f"{r['host_bytes'] / 2**30:.1f} GiB",
            " ".join(f"`{a}`" for a in r["added"]) or "-",
        ]
        for r in data["rows"]
    ]
    header = ["device memory", "loss chunks asked", "longest block size", "the memory allows", "pinned host memory"]
    first = min(data["rows"], key=lambda r: (r["device_memory_gib"], r["loss_chunk_tokens"]))
    terms = [[label, f"{value / 2**30:.2f} GiB"] for label, value in first["terms"].items()]
    limit = f" The model's positions end at {data['model_limit']:,} tokens." if data.get("model_limit") else ""
    return (
        f"## The longest context that fits\n\n`bench/max_context.py`: what `surgery plan {data['rules']} --model "
        f"{data['model']} --batch-size 1 --precision bf16 --gradient-checkpointing --offload-activations "
        f"--device-memory M --max-context` answers ({data['assumes']}; a plan, not a measurement).{limit} Where the "
        "memory allows more, the answer is the model's limit, reached with the fewest added options.\n\n"
        + table([*header, "options added"], rows)
        + f"\nThe terms of the {first['device_memory_gib']} GiB answer ({first['tokens']:,} tokens, "
        f"`{first['flags']}`):\n\n" + table(["term", "bytes"], terms)
    )


SECTIONS: dict[str, Callable[[dict], str]] = {
    "siblings": siblings,
    "batched": batched,
    "demo_loss": demo_loss,
    "train_step": train_step,
    "merge_error": merge_error,
    "packing": packing,
    "gradient_checkpointing": gradient_checkpointing,
    "load_memory": load_memory,
    "train_memory": train_memory,
    "max_context": max_context,
    "loftq_init": loftq_init,
    "inspect_big": inspect_big,
    "cli_latency": cli_latency,
}


def page() -> str:
    """The benchmarks page: one section per JSON in ``bench/results/`` that a section is written for.

    Returns:
        The page's markdown.
    """
    parts = [INTRO]
    for name, section in SECTIONS.items():
        data = load(name)
        if data is not None:
            parts.append("\n" + section(data) + "\n" + source(name, data))
    return "".join(parts)


def pictures(folder: Path) -> list[Path]:
    """Draw the pictures the page shows, from the JSON only, into ``folder``.

    Args:
        folder: where the PNG files go (``docs/img``).

    Returns:
        The files written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.hashsalt": "surgery", "font.size": 10})
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in (("siblings", _draw_siblings), ("batched", _draw_batched), ("demo_loss", _draw_demo_loss)):
        data = load(name)
        if data is None:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
        draw(ax, data)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = folder / f"{name}.png"
        fig.savefig(path, metadata={"Software": None})
        plt.close(fig)
        written.append(path)
    return written


def _draw_siblings(ax, data: dict) -> None:
    n = data["n"]
    peft = next(v for k, v in data["rows"].items() if "PEFT" in k) / n
    ns = list(range(1, n + 1))
    ours = [data["base_quantized_bytes"] + k * data["adapter_bytes"][0] for k in ns]
    ax.plot(ns, [b / 2**30 for b in ours], marker="o", label=f"surgery: one {data['rules']} base + N adapters")
    ax.plot(ns, [k * peft / 2**30 for k in ns], marker="s", label="N PEFT models")
    ax.set(xlabel="fine-tunes N", ylabel="GiB", title=f"Memory of N fine-tunes ({data['model']} shape)")
    ax.legend()


def _draw_batched(ax, data: dict) -> None:
    labels, alone, together = [], [], []
    for r in data["rows"]:
        labels.append(f"{r['mode']}\n{r['base']} N={r['n']}")
        alone.append(r["tokens_per_s_alone"])
        together.append(r["tokens_per_s_batched"])
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], alone, width=0.4, label="one after another")
    ax.bar([x + 0.2 for x in xs], together, width=0.4, label="batched")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set(ylabel="tokens / CPU s", title="Batched against one after another")
    ax.legend()


def _draw_demo_loss(ax, data: dict) -> None:
    for job, curve in data["jobs"].items():
        ax.plot(curve["step"], curve["loss"], label=job)
    ax.set(xlabel="step", ylabel="training loss", title=f"surgery demo: three fine-tunes on one base ({data['model']})")
    ax.legend()


if __name__ == "__main__":
    print(page())
