"""Commands about a model and rule files: models, inspect, apply, rules list/show (plan: plan_cmd.py)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from .common import (
    DEVICE_OPT,
    MODEL_OPT,
    NO_CACHE_OPT,
    RANDOM_INIT_OPT,
    RULES_ARG,
    DeviceConfig,
    console,
    model_for,
    quiet_libraries,
    say,
)


def inspect(
    model: str = typer.Argument(..., help="Local directory, hub id in the local HF cache, or bundled name."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    modules: str | None = typer.Option(None, "--modules", help="Only modules matching this pattern."),
    no_cache: bool = NO_CACHE_OPT,
):
    """Trace MODEL and show its modules, parameters, ties and memory at fp32/fp16/int8/nf4.

    Example: surgery inspect facebook/opt-1.3b --modules "self_attn.*"
    """
    quiet_libraries()
    from surgery.base.loading import graph_of
    from surgery.planning.decisions import memory_by_scheme
    from surgery.planning.report import graph_renderable, graph_summary

    graph = graph_of(model, use_cache=not no_cache)
    if as_json:
        print(json.dumps(graph_summary(graph, memory_by_scheme(graph)), indent=2))
    else:
        console.print(graph_renderable(graph, memory_by_scheme(graph), modules))


def apply(
    rules: str = RULES_ARG,
    model: str | None = MODEL_OPT,
    finetunes: int = typer.Option(1, "--finetunes", "-n", min=1, help="Fine-tunes to create on the one base."),
    random_init: bool = RANDOM_INIT_OPT,
    out: Path | None = typer.Option(
        None,
        "--out",
        "-o",
        help="Write each fine-tune's initial adapter file (FILE for one; FILE-1, FILE-2, ... for several).",
    ),
    device: str = DEVICE_OPT,
):
    """Plan, quantize the base once, create N fine-tunes sharing it, verify them, and measure memory.

    Example: surgery apply rules/qv_lora.yaml --finetunes 3 --out runs/qv.safetensors
    """
    quiet_libraries()
    from rich.progress import Progress

    from surgery.base.loading import load_model
    from surgery.files.adapter_file import save_adapter
    from surgery.finetune.apply import apply as apply_rules
    from surgery.planning.report import applied_table
    from surgery.rules.rule_file import load_rules

    ruleset = load_rules(rules)
    name, why = model_for(ruleset, model)
    devices = DeviceConfig(device=device)
    where = devices.placement()
    say("model: ", (name, "bold"), f" (from {why}); {devices.describe()}")
    base = load_model(name, random_init=random_init, rules=ruleset, **where).model  # quantized as it loads
    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task("planning", total=1)
        applied = apply_rules(
            base,
            ruleset,
            finetunes,
            progress=lambda what, done, total: progress.update(
                bar, description=what, completed=done, total=max(total, 1)
            ),
        )
    console.print(applied_table(applied, name))
    equal = applied.equal_at_init
    verdict = ("equal", "green") if all(equal) else ("DIFFERENT", "red")
    say(
        "each fine-tune's output at init vs the quantized base: ",
        verdict,
        f" ({sum(equal)}/{len(equal)} bit-identical"
        + (
            f" on the base's vocabulary; the {applied.new_tokens} new tokens' logits have no counterpart there)"
            if applied.new_tokens
            else ")"
        ),
    )
    if not all(equal):
        raise typer.Exit(1)
    if out is not None:
        paths = (
            [out] if finetunes == 1 else [out.with_name(f"{out.stem}-{i + 1}{out.suffix}") for i in range(finetunes)]
        )
        for ft, path in zip(applied.finetunes, paths):
            save_adapter(ft, path)
            console.print(f"wrote {path} ({path.stat().st_size:,} bytes)", highlight=False)


def models_cmd():
    """List the bundled models: tiny ones with weights, and architectures (config only, meta device).

    Example: surgery models
    """
    from surgery.model.architectures import ARCHITECTURES, TINY_MODELS

    table = Table(title="bundled models")
    table.add_column("name")
    table.add_column("type")
    table.add_column("weights")
    for name, spec in TINY_MODELS.items():
        table.add_row(name, spec["model_type"], "random, fixed seed")
    for name, spec in ARCHITECTURES.items():
        table.add_row(name, spec["model_type"], "none (architecture only; --random-init)")
    console.print(table)


def rules_list():
    """List the bundled rule files with their descriptions.

    Example: surgery rules list
    """
    from surgery.rules.rule_file import load_rules
    from surgery.rules.ruleset import bundled_rules

    table = Table(title="bundled rule files (use by name, e.g. `surgery plan qv_lora`)")
    table.add_column("name")
    table.add_column("quantize")
    table.add_column("description")
    for name in bundled_rules():
        rules = load_rules(name)
        table.add_row(name, rules.quantize.scheme, rules.description or "")
    console.print(table)


def rules_show(rules: str = typer.Argument(..., help="Rule file path or bundled name.")):
    """Print a rule file (bundled name or path).

    Example: surgery rules show qv_lora
    """
    from surgery.rules.rule_file import load_rules
    from surgery.rules.ruleset import bundled_rules

    ruleset = load_rules(rules)
    path = bundled_rules().get(rules) or Path(rules)
    console.print(f"# {ruleset.source}", highlight=False)
    console.print(path.read_text(), highlight=False, markup=False)
