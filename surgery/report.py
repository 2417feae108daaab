"""Rich tables for graphs and plans: what ``print(plan)`` and the CLI show."""

from __future__ import annotations

import re
from collections import OrderedDict

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from .plan import Plan, fmt_bytes, plan
from .rules import ADAPTABLE_KINDS, parse_rules
from .trace import ModelGraph


def collapse(path: str) -> str:
    """A module path with layer indices replaced by '*', so repeated blocks share one row."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", path)


def grouped(paths: list[str]) -> "OrderedDict[str, list[str]]":
    groups: OrderedDict[str, list[str]] = OrderedDict()
    for path in paths:
        groups.setdefault(collapse(path), []).append(path)
    return groups


def render_text(renderable, width: int = 120) -> str:
    console = Console(width=width, record=True, force_terminal=False, color_system=None)
    with console.capture() as capture:
        console.print(renderable)
    return capture.get()


# ------------------------------------------------------------------------------------------ graph

def memory_at(graph: ModelGraph, scheme: str) -> int:
    """Bytes of the model with every Linear/Conv1D/Embedding weight stored as ``scheme``.

    float32/float16 count every parameter at that width; int8/nf4 are the plan's exact bytes for
    quantizing those weights (everything else as stored).
    """
    if scheme in ("float32", "float16"):
        return graph.numel * (4 if scheme == "float32" else 2)
    rules = parse_rules({"quantize": scheme, "default": "quantize"}, source=f"<all {scheme}>")
    return plan(graph, rules, check=False).base_bytes_after


def graph_summary(graph: ModelGraph) -> dict:
    dtypes = sorted({p.dtype for m in graph.leaves() for p in m.params})
    blocks = {path: n for path, (n, _) in graph.reduced.items()} or _block_lengths(graph)
    return {
        "model": graph.name, "class": graph.model_class, "parameters": graph.numel,
        "layers": max(blocks.values(), default=0), "dtypes": dtypes,
        "memory": {s: memory_at(graph, s) for s in ("float32", "float16", "int8", "nf4")},
        "tied": [list(t) for t in graph.ties], "trace": graph.method, "trace_seconds": round(graph.seconds, 3),
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


def graph_renderable(graph: ModelGraph, pattern: str | None = None):
    from .rules import pattern_matches

    s = graph_summary(graph)
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
        how += " (" + ", ".join(f"{k}: {t} of {n} layers traced, rest carried over"
                                for k, (n, t) in graph.reduced.items()) + ")"
    if graph.reason:
        how += f" — export failed: {graph.reason}"
    head.add_row("traced by", how)
    if s["uncalled"]:
        head.add_row("never called", ", ".join(s["uncalled"]))

    table = Table(title="modules (repeated blocks collapsed)", show_lines=False)
    for col, justify in (("module", "left"), ("×", "right"), ("class", "left"), ("kind", "left"),
                         ("params", "right"), ("weight", "left"), ("dtype", "left"), ("calls", "right"),
                         ("input → output", "left")):
        table.add_column(col, justify=justify)
    leaves = [m for m in graph.leaves() if pattern is None or pattern_matches(pattern, m.path)]
    for key, paths in grouped([m.path for m in leaves]).items():
        m = graph.modules[paths[0]]
        w = m.param("weight") or (m.params[0] if m.params else None)
        shapes = f"{_shape(m.input_shape)} → {_shape(m.output_shape)}" if m.input_shape else ""
        table.add_row(key, str(len(paths)), m.cls.rsplit(".", 1)[-1], m.kind, f"{m.numel:,}",
                      str(list(w.shape)) if w else "", m.quantized or (w.dtype if w else ""),
                      str(m.calls) if graph.method == "export" else "-", shapes)
    adapt = Text("adaptable modules (LoRA): ", style="bold") + Text(", ".join(s["adaptable"]))
    return Group(head, table, adapt)


def _shape(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")" if shape else "?"


# ------------------------------------------------------------------------------------------- plan

def plan_renderable(plan: Plan):
    by_rule: OrderedDict[str, list] = OrderedDict()
    for d in plan.decisions.values():
        by_rule.setdefault(d.decided_by, []).append(d)
    table = Table(title=f"plan: {plan.rules.source} on {plan.graph.name or plan.graph.model_class}")
    for col, justify in (("decided by", "left"), ("action", "left"), ("modules", "left"), ("n", "right"),
                         ("storage", "left"), ("LoRA", "left"), ("trainable / fine-tune", "right")):
        table.add_column(col, justify=justify)
    for who, decisions in by_rule.items():
        names = list(grouped([d.path for d in decisions]))
        shown = ", ".join(names[:4]) + (f", … (+{len(names) - 4})" if len(names) > 4 else "")
        storages = ", ".join(sorted({d.storage for d in decisions}))
        loras = sorted({f"r={d.lora.r} α={d.lora.alpha:g}" for d in decisions if d.lora})
        trainable = sum(d.adapter_params for d in decisions) + sum(
            p.numel for d in decisions if d.action == "plain" for p in plan.graph.modules[d.path].params)
        table.add_row(who, decisions[0].action, shown, str(len(decisions)), storages, ", ".join(loras),
                      f"{trainable:,}")
    parts = [table, memory_table(plan)]
    for note in plan.ties:
        parts.append(Text(f"tie: {note.message}", style="cyan"))
    for label in plan.shadowed:
        parts.append(Text(f"note: {label} only matches modules an earlier rule already decided", style="yellow"))
    for v in plan.violations:
        parts.append(Text(f"error [{v.constraint}]: {v.message}", style="bold red"))
    return Group(*parts)


def memory_table(plan: Plan, finetunes: int | None = None) -> Table:
    n = plan.finetunes if finetunes is None else finetunes
    table = Table(title=f"memory (planned, exact): base + {n} fine-tune{'s' if n != 1 else ''}")
    table.add_column("what")
    table.add_column("bytes", justify="right")
    table.add_column("", justify="right")
    rows = [("base as loaded", plan.base_bytes_now), ("base after quantization", plan.base_bytes_after),
            ("each fine-tune (adapters + plain copies)", plan.finetune_bytes),
            (f"base + {n} fine-tune{'s' if n != 1 else ''}", plan.total_bytes(n)),
            (f"{n} full cop{'ies' if n != 1 else 'y'} of the model", plan.full_copies_bytes(n))]
    for label, value in rows:
        table.add_row(label, f"{value:,}", fmt_bytes(value))
    table.add_row("trainable parameters per fine-tune", f"{plan.trainable_params:,}", "")
    return table
