"""Rich tables for everything surgery shows: graphs, plans, apply, adapter files, training (renders only)."""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from ..model.graph import ModelGraph
from ..rules.ruleset import ADAPTABLE_KINDS, grouped
from .memory import fmt_bytes


def render_text(renderable, width: int = 120) -> str:
    console = Console(width=width, record=True, force_terminal=False, color_system=None)
    with console.capture() as capture:
        console.print(renderable)
    return capture.get()


# ------------------------------------------------------------------------------------------ graph


def graph_summary(graph: ModelGraph, memory: dict[str, int]) -> dict:
    """JSON-ready facts of a graph; ``memory`` is bytes by storage scheme (``plan.memory_by_scheme``)."""
    dtypes = sorted({p.dtype for m in graph.leaves() for p in m.params})
    blocks = {path: n for path, (n, _) in graph.reduced.items()} or _block_lengths(graph)
    return {
        "model": graph.name,
        "class": graph.model_class,
        "parameters": graph.numel,
        "layers": max(blocks.values(), default=0),
        "dtypes": dtypes,
        "memory": memory,
        "tied": [list(t) for t in graph.ties],
        "trace": graph.method,
        "trace_seconds": round(graph.seconds, 3),
        "trace_reason": graph.reason,
        "reduced_blocks": {k: {"layers": n, "traced": t} for k, (n, t) in graph.reduced.items()},
        "uncalled": graph.uncalled(),
        "adaptable": adaptable_names(graph),
    }


def _block_lengths(graph: ModelGraph) -> dict[str, int]:
    counts: dict[str, set] = {}
    for path in graph.modules:
        m = re.match(r"(.*?)\.(\d+)(\.|$)", path)
        if m:
            counts.setdefault(m.group(1), set()).add(int(m.group(2)))
    return {k: len(v) for k, v in counts.items()}


def adaptable_names(graph: ModelGraph) -> list[str]:
    """Local names of the modules LoRA can adapt (what finetuna's get_lora_adaptable_modules listed)."""
    return sorted({m.name for m in graph.leaves() if m.kind in ADAPTABLE_KINDS})


def graph_renderable(graph: ModelGraph, memory: dict[str, int], pattern: str | None = None):
    """``surgery inspect``: the graph's facts, then its modules (repeated blocks collapsed)."""
    from ..rules.ruleset import pattern_matches

    s = graph_summary(graph, memory)
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("model", f"{s['model'] or '?'} ({s['class']})")
    head.add_row("parameters", f"{s['parameters']:,}")
    head.add_row("layers", str(s["layers"]))
    head.add_row("dtype", ", ".join(s["dtypes"]))
    head.add_row("memory", "   ".join(f"{k} {fmt_bytes(v)}" for k, v in s["memory"].items()))
    head.add_row("tied", "; ".join(" = ".join(t) for t in s["tied"]) or "none")
    how = f"{graph.method} in {graph.seconds:.2f}s"
    if graph.reduced:
        how += (
            " ("
            + ", ".join(f"{k}: {t} of {n} layers traced, rest carried over" for k, (n, t) in graph.reduced.items())
            + ")"
        )
    if graph.reason:
        how += f" — export failed: {graph.reason}"
    head.add_row("traced by", how)
    if s["uncalled"]:
        head.add_row("never called", ", ".join(s["uncalled"]))

    leaves = [m for m in graph.leaves() if pattern is None or pattern_matches(pattern, m.path)]
    groups = grouped([m.path for m in leaves])
    table = Table(title="modules (repeated blocks collapsed)", show_lines=False)
    add_name_column(table, "module", groups)
    for col, justify in (
        ("×", "right"),
        ("class", "left"),
        ("kind", "left"),
        ("params", "right"),
        ("weight", "left"),
        ("dtype", "left"),
        ("calls", "right"),
        ("input → output", "left"),
    ):
        table.add_column(col, justify=justify)
    for key, paths in groups.items():
        m = graph.modules[paths[0]]
        w = m.param("weight") or (m.params[0] if m.params else None)
        shapes = f"{_shape(m.input_shape)} → {_shape(m.output_shape)}" if m.input_shape else ""
        table.add_row(
            key,
            str(len(paths)),
            m.cls.rsplit(".", 1)[-1],
            m.kind,
            f"{m.numel:,}",
            str(list(w.shape)) if w else "",
            m.quantized or (w.dtype if w else ""),
            str(m.calls) if graph.method == "export" else "-",
            shapes,
        )
    adapt = Text("adaptable modules (LoRA): ", style="bold") + Text(", ".join(s["adaptable"]))
    return Group(head, table, adapt)


def add_name_column(table: Table, header: str, names) -> None:
    """A column of module names (one per line) that is never cut: it keeps the longest name's width while
    the other columns wrap or shorten, and folds a name onto the next line only beyond the console width."""
    table.add_column(header, no_wrap=True, overflow="fold")


def _shape(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")" if shape else "?"


# ------------------------------------------------------------------------------------------- plan


def plan_renderable(plan):
    """A plan as rich tables: decisions grouped by rule, ties, memory (a ``plan.Plan``)."""
    by_rule: OrderedDict[str, list] = OrderedDict()
    for d in plan.decisions.values():
        by_rule.setdefault(d.decided_by, []).append(d)
    table = Table(title=f"plan: {plan.rules.source} on {plan.graph.name or plan.graph.model_class}")
    table.add_column("decided by", overflow="fold")
    table.add_column("action")
    add_name_column(table, "modules", grouped([d.path for d in plan.decisions.values()]))
    for col, justify in (("n", "right"), ("storage", "left"), ("LoRA", "left"), ("trainable / fine-tune", "right")):
        table.add_column(col, justify=justify)
    for who, decisions in by_rule.items():
        names = list(grouped([d.path for d in decisions]))
        shown = "\n".join(names[:4]) + (f"\n… (+{len(names) - 4})" if len(names) > 4 else "")
        storages = ", ".join(sorted({d.storage for d in decisions}))
        loras = sorted({f"r={d.lora.r} α={d.lora.lora_alpha:g}" for d in decisions if d.lora})
        trainable = sum(d.adapter_params for d in decisions) + sum(
            p.numel for d in decisions if d.action == "plain" for p in plan.graph.modules[d.path].params
        )
        table.add_row(
            who, decisions[0].action, shown, str(len(decisions)), storages, ", ".join(loras), f"{trainable:,}"
        )
    parts = [table, memory_table(plan)]
    for note in plan.ties:
        parts.append(Text(f"tie: {note.message}", style="cyan"))
    for label in plan.shadowed:
        parts.append(Text(f"note: {label} only matches modules an earlier rule already decided", style="yellow"))
    if plan.violations:  # what is broken is the command's error, said once at the end
        parts.append(Text("the rules break constraints: see the error below", style="red"))
    return Group(*parts)


def _finetune_label(plan) -> str:
    extra = plan.rules.extra_tokens
    rows = f" + {len(extra.tokens)} new token rows" if extra is not None else ""
    return f"each fine-tune (adapters + plain copies{rows})"


def memory_table(plan, finetunes: int | None = None) -> Table:
    n = plan.finetunes if finetunes is None else finetunes
    table = Table(title=f"memory (planned, exact): base + {n} fine-tune{'s' if n != 1 else ''}")
    table.add_column("what")
    table.add_column("bytes", justify="right")
    table.add_column("", justify="right")
    rows = [
        ("base as loaded", plan.base_bytes_now),
        ("base after quantization", plan.base_bytes_after),
        (_finetune_label(plan), plan.finetune_bytes),
        (f"base + {n} fine-tune{'s' if n != 1 else ''}", plan.total_bytes(n)),
        (f"{n} full cop{'ies' if n != 1 else 'y'} of the model", plan.full_copies_bytes(n)),
    ]
    for label, value in rows:
        table.add_row(label, f"{value:,}", fmt_bytes(value))
    table.add_row("trainable parameters per fine-tune", f"{plan.trainable_params:,}", "")
    return table


def per_device(plan, world_size: int, fsdp: bool, finetunes: int | None = None) -> dict[str, int]:
    """Bytes on each device of a launch: the base (whole, or an FSDP2 shard) and each training fine-tune.

    A training fine-tune holds its own tensors, their gradients and AdamW's two moments (4 x), all replicated.
    """
    n = plan.finetunes if finetunes is None else finetunes
    base = plan.base_bytes_per_rank(world_size, fsdp)
    return {
        "world_size": world_size,
        "fsdp": fsdp,
        "base_bytes": base,
        "finetune_bytes": plan.finetune_bytes,
        "finetune_training_bytes": 4 * plan.finetune_bytes,
        "total_training_bytes": base + n * 4 * plan.finetune_bytes,
    }


def per_device_table(plan, world_size: int, fsdp: bool) -> Table:
    facts = per_device(plan, world_size, fsdp)
    how = "sharded with FSDP2 (--fsdp)" if fsdp else "a whole copy on each (DDP)"
    table = Table(title=f"memory per device: {world_size} devices, base {how}")
    table.add_column("what")
    table.add_column("bytes", justify="right")
    table.add_column("", justify="right")
    n = plan.finetunes
    for label, key in (
        ("base", "base_bytes"),
        (_finetune_label(plan), "finetune_bytes"),
        ("each fine-tune training (+ gradients + AdamW moments)", "finetune_training_bytes"),
        (f"base + {n} fine-tune{'s' if n != 1 else ''} training", "total_training_bytes"),
    ):
        table.add_row(label, f"{facts[key]:,}", fmt_bytes(facts[key]))
    return table


def applied_table(applied, model: str) -> Table:
    """``surgery apply``: measured bytes next to the plan's, for the base and each fine-tune (an ``apply.Applied``)."""
    plan, n = applied.plan, len(applied.finetunes)
    table = Table(
        title=f"{model} + {n} fine-tune{'s' if n != 1 else ''} of {plan.rules.source}: measured (unique "
        "parameter storage) vs planned"
    )
    for col in ("", "measured bytes", "planned bytes", ""):
        table.add_column(col, justify="right" if col else "left")
    rows = [
        ("base as loaded", applied.loaded_bytes, plan.base_bytes_now),
        ("base, quantized and shared", applied.base_bytes, plan.base_bytes_after),
        *[(f"fine-tune {i + 1} (own tensors)", own, plan.finetune_bytes) for i, own in enumerate(applied.own_bytes)],
        (f"base + {n} fine-tunes", applied.total_bytes, plan.total_bytes()),
        (f"{n} full copies", n * applied.loaded_bytes, plan.full_copies_bytes()),
    ]
    for label, measured, planned in rows:
        table.add_row(label, f"{measured:,}", f"{planned:,}", fmt_bytes(measured))
    table.add_row("trainable parameters / fine-tune", f"{applied.trainable:,}", f"{plan.trainable_params:,}", "")
    return table


def training_summary(runs: list, adapter_file: str) -> Group:
    """``surgery train``'s summary: a row per finished run, then each run's adapter file whole on a line of its own.

    A row holds the steps, the run's first and last logged loss (a run resumed without its earlier metrics says
    from which step its first one is) and the eval loss and perplexity of the weights its adapter file holds
    (under early stopping, the best evaluation's). Paths are never cut to fit the table: a user copies them.

    Args:
        runs: finished ``train.job.Run``s, their ``history`` the run's whole log as far as it is known.
        adapter_file: the file name the adapter has in each run's output folder.

    Returns:
        A rich renderable: the table, then one ``adapter file: PATH`` line per run with an output folder.
    """
    table = Table(title="training summary")
    for col in ("job", "steps", "first loss", "last loss", "eval loss", "perplexity"):
        table.add_column(col, justify="left" if col == "job" else "right")
    for run in runs:
        losses = [r for r in run.history if _is_number(r.get("loss"))]
        kept = _kept_eval(run)
        table.add_row(
            run.job.name,
            str(run.step),
            _first_loss(losses[0]) if losses else "-",
            f"{losses[-1]['loss']:.4f}" if losses else "-",
            f"{kept['eval_loss']:.4f}" if kept else "-",
            f"{kept['perplexity']:.2f}" if _is_number(kept.get("perplexity")) else "-",
        )
    named = len(runs) > 1
    paths = [
        Text(f"adapter file{f' of {run.job.name}' if named else ''}: {run.job.out / adapter_file}", overflow="fold")
        for run in runs
        if run.job.out is not None
    ]
    return Group(table, *paths)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _first_loss(record: dict) -> str:
    """The first logged loss; when the log starts after step 1 (resumed, earlier metrics not at hand), at which step."""
    text = f"{record['loss']:.4f}"
    return text if record.get("step") == 1 else f"{text} (step {record.get('step')})"


def _kept_eval(run) -> dict:
    """The eval record of the weights the adapter file holds: the best evaluation's under early stopping, else
    the last evaluation's; empty when there is none."""
    early = getattr(run, "early", None)
    kept = early.best_step if early is not None and early.best_weights else None
    evals = [r for r in run.history if _is_number(r.get("eval_loss")) and kept in (None, r.get("step"))]
    return evals[-1] if evals else {}


def adapter_tables(adapter, show_all: bool = False, limit: int = 40) -> tuple[Table, Table]:
    """``surgery adapter show``: an ``AdapterFile``'s metadata, and its tensors with dtypes, shapes and sizes."""
    meta = Table(title=f"{adapter.path}", show_header=False)
    meta.add_column("field")
    meta.add_column("value")
    for key in ("format", "format_version", "surgery_version", "base_model", "base_class", "rules_source"):
        meta.add_row(key, adapter.metadata.get(key, ""))
    meta.add_row("base fingerprint", repr(adapter.fingerprint))
    meta.add_row("checksums", "metadata and tensors verified")
    return meta, tensors_table(adapter.tensors, show_all, limit)


def peft_tables(folder, show_all: bool = False, limit: int = 40) -> tuple[Table, Table]:
    """``surgery adapter show`` of a PEFT folder: its config's main fields, the base it needs, its tensors."""
    meta = Table(title=f"{folder.path} (PEFT LoRA adapter)", show_header=False)
    meta.add_column("field")
    meta.add_column("value")
    config = folder.config
    targets = config.get("target_modules") or []
    rows = {
        "base_model_name_or_path": str(config.get("base_model_name_or_path") or ""),
        "base class": folder.metadata.get("surgery_base_class", ""),
        "base fingerprint": repr(folder.fingerprint) if folder.fingerprint else "none (not exported by surgery)",
        "base storage": folder.metadata.get("surgery_base_storage", ""),
        "r / lora_alpha": f"{config.get('r')} / {config.get('lora_alpha')}"
        + (" (rsLoRA)" if config.get("use_rslora") else ""),
        "rank_pattern / alpha_pattern": f"{len(config.get('rank_pattern') or {})} / "
        f"{len(config.get('alpha_pattern') or {})} entries",
        "target_modules": f"{len(targets)}: {', '.join(targets[:3])}{', ...' if len(targets) > 3 else ''}"
        if isinstance(targets, list)
        else str(targets),
        "modules_to_save": ", ".join(config.get("modules_to_save") or []) or "none",
        "lora_bias": str(bool(config.get("lora_bias"))),
    }
    for key, value in rows.items():
        meta.add_row(key, value)
    return meta, tensors_table(folder.tensors, show_all, limit)


def tensors_table(tensors: dict, show_all: bool, limit: int) -> Table:
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    table = Table(title=f"{len(tensors)} tensors, {nbytes:,} bytes ({fmt_bytes(nbytes)})")
    names = list(tensors)
    add_name_column(table, "tensor", names)
    for col in ("dtype", "shape", "bytes"):
        table.add_column(col, justify="right" if col == "bytes" else "left")
    for name in names if show_all else names[:limit]:
        t = tensors[name]
        table.add_row(
            name, str(t.dtype).removeprefix("torch."), str(tuple(t.shape)), f"{t.numel() * t.element_size():,}"
        )
    if not show_all and len(names) > limit:
        table.add_row(f"... {len(names) - limit} more (--all)", "", "", "")
    return table


def demo_memory_table(
    base_bytes: int, loaded_bytes: int, own: list[tuple[str, int]], scheme: str = "int8", loaded_dtype: str = "fp32"
) -> Table:
    """The demo's memory: one quantized base, each fine-tune's own tensors, against full copies."""
    table = Table(title=f"2. memory: one {scheme} base shared by {len(own)} fine-tunes (unique parameter storage)")
    table.add_column("")
    table.add_column("bytes", justify="right")
    table.add_column("", justify="right")
    total = base_bytes + sum(n for _, n in own)
    for label, n in [
        (f"base, quantized once ({scheme})", base_bytes),
        *own,
        (Text(f"base + {len(own)} fine-tunes", style="bold"), total),
        (f"{len(own)} full {loaded_dtype} copies", len(own) * loaded_bytes),
    ]:
        table.add_row(label, f"{n:,}", fmt_bytes(n))
    return table


def demo_results_table(rows: list[tuple[str, float, float, str, str, str]]) -> Table:
    """(fine-tune, loss before, loss after, prompt, generated, expected) rows; a fine-tune's losses shown once."""
    table = Table(title="4. loss on each task's data, and what each fine-tune now generates (greedy)")
    for col in ("fine-tune", "loss before", "loss after", "prompt", "generated", "expected"):
        table.add_column(col, justify="right" if "loss" in col else "left")
    shown = set()
    for name, before, after, prompt, generated, expected in rows:
        first = name not in shown
        shown.add(name)
        table.add_row(
            name if first else "",
            f"{before:.3f}" if first else "",
            f"{after:.3f}" if first else "",
            prompt,
            repr(generated),
            repr(expected),
        )
    return table


def demo_files_table(checked: list[tuple[Path, bool]]) -> Table:
    """Each adapter file the demo wrote, its size, and whether reloading it gave the trained fine-tune back."""
    table = Table(title="5. adapter files: written, reloaded onto the base, verified")
    for col in ("file", "bytes", "reloaded == trained"):
        table.add_column(col, justify="right" if col == "bytes" else "left")
    for path, same in checked:
        table.add_row(
            str(path), f"{path.stat().st_size:,}", Text("yes, bit for bit", "green") if same else Text("NO", "red")
        )
    return table
