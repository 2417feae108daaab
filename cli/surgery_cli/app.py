"""`surgery` commands: inspect a model, list rule files, plan a rule file against a model.

User errors print one message and exit with status 2; no traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import click
import typer
from typer.core import TyperGroup
from rich.console import Console
from rich.table import Table

class _Commands(TyperGroup):
    """The command group: every command of the app (sub-groups included) runs through ``invoke``'s one handler."""

    def invoke(self, ctx):
        from surgery.errors import SurgeryError

        try:
            return super().invoke(ctx)
        except SurgeryError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except OSError as exc:  # a path the user gave that the library did not wrap: still one line
            where = f"{exc.filename}: " if exc.filename else ""
            err_console.print(f"[bold red]error:[/] {where}{exc.strerror or exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except (typer.Exit, typer.Abort, click.ClickException, KeyboardInterrupt):
            raise
        except Exception:
            err_console.print("[bold red]internal error[/] (a bug in surgery, not in what you typed): please report it "
                              "with the command you ran and the traceback below", highlight=False)
            raise


app = typer.Typer(help="Rule-driven model surgery for HuggingFace models: one quantized base, many fine-tunes.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, cls=_Commands)
rules_app = typer.Typer(help="Bundled rule files.", no_args_is_help=True)
app.add_typer(rules_app, name="rules")
adapter_app = typer.Typer(help="Adapter files (safetensors written by surgery).", no_args_is_help=True)
app.add_typer(adapter_app, name="adapter")
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


RULES_ARG = typer.Argument(..., help="Rule file path or bundled name (see `surgery rules list`).")
MODEL_OPT = typer.Option(None, "--model", "-m",
                         help="Model (default: the rule file's `model:`, else the bundled tiny default).")


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import warnings

    warnings.filterwarnings("ignore")
    import logging as std_logging

    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    std_logging.getLogger("bitsandbytes").setLevel(std_logging.ERROR)  # "inputs will be cast to float16" per call


def _model_for(rules, model: Optional[str]) -> tuple[str, str]:
    """The model to use: --model, else the rule file's `model:`, else the bundled tiny default."""
    from surgery.architectures import TINY_DEFAULT

    if model:
        return model, "--model"
    if rules.model:
        return rules.model, f"`model:` of {rules.source}"
    return TINY_DEFAULT, "the bundled tiny default (no --model and no `model:` in the rule file)"


@app.command()
def inspect(
    model: str = typer.Argument(..., help="Local directory, hub id in the local HF cache, or bundled name."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    modules: Optional[str] = typer.Option(None, "--modules", help="Only modules matching this pattern."),
):
    """Trace MODEL and show its modules, parameters, ties and memory at fp32/fp16/int8/nf4.

    Example: surgery inspect facebook/opt-1.3b --modules "self_attn.*"
    """
    _quiet_libraries()
    from surgery.models import load_model
    from surgery.report import graph_renderable, graph_summary
    from surgery.trace import trace

    loaded = load_model(model, weights=False)
    graph = trace(loaded.model)
    graph.name = model
    if as_json:
        print(json.dumps(graph_summary(graph), indent=2))
    else:
        console.print(graph_renderable(graph, modules))


@app.command()
def plan(
    rules: str = RULES_ARG,
    model: Optional[str] = MODEL_OPT,
    finetunes: int = typer.Option(1, "--finetunes", "-n", min=1, help="Fine-tunes to plan memory for."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
):
    """Decide every module of MODEL by RULES, check every constraint, and show memory for N fine-tunes.

    Example: surgery plan qv_lora --model facebook/opt-1.3b --finetunes 8
    """
    _quiet_libraries()
    from surgery.errors import PlanError
    from surgery.models import load_model
    from surgery.plan import plan as make_plan
    from surgery.rules import load_rules
    from surgery.trace import trace

    ruleset = load_rules(rules)
    name, why = _model_for(ruleset, model)
    graph = trace(load_model(name, weights=False).model)
    graph.name = name
    result = make_plan(graph, ruleset, finetunes=finetunes, check=False)
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        if why != "--model":
            console.print(f"model: [bold]{name}[/] (from {why})")
        console.print(result)
    if result.violations:
        raise PlanError(result.violations)


@app.command()
def apply(
    rules: str = RULES_ARG,
    model: Optional[str] = MODEL_OPT,
    finetunes: int = typer.Option(1, "--finetunes", "-n", min=1, help="Fine-tunes to create on the one base."),
    random_init: bool = typer.Option(False, "--random-init", help="Build random weights when none are available."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write each fine-tune's initial adapter file "
                                       "(FILE for one; FILE-1, FILE-2, ... for several)."),
):
    """Plan, quantize the base once, create N fine-tunes sharing it, verify them, and measure memory.

    Example: surgery apply rules/qv_lora.yaml --finetunes 3 --out runs/qv.safetensors
    """
    _quiet_libraries()
    import torch
    from rich.progress import Progress

    from surgery.memory import extra_bytes, parameter_bytes
    from surgery.models import load_model
    from surgery.plan import fmt_bytes, plan as make_plan
    from surgery.rewrite import base_graph, rewrite
    from surgery.rules import load_rules

    ruleset = load_rules(rules)
    name, why = _model_for(ruleset, model)
    console.print(f"model: [bold]{name}[/] (from {why})")
    loaded = load_model(name, random_init=random_init)
    base = loaded.model
    planned = make_plan(base_graph(base), ruleset, finetunes=finetunes)
    loaded_bytes = parameter_bytes(base)
    vocab = getattr(base.config, "vocab_size", 256)
    ids = torch.randint(0, min(vocab, 256), (2, 16), generator=torch.Generator().manual_seed(0))
    fts = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("quantizing base", total=max(len(planned.quantized), 1))
        fts.append(rewrite(base, ruleset, progress=lambda i, n, path: progress.update(task, completed=i)))
        progress.update(task, description="creating fine-tunes", completed=0, total=finetunes)
        for i in range(1, finetunes):
            fts.append(rewrite(base, ruleset))
            progress.update(task, completed=i + 1)
    with torch.no_grad():
        reference = base(ids).logits
        equal = [torch.equal(ft(ids).logits, reference) for ft in fts]
    table = Table(title=f"{name} + {finetunes} fine-tune{'s' if finetunes != 1 else ''} of {ruleset.source}: "
                        "measured (unique parameter storage) vs planned")
    for col in ("", "measured bytes", "planned bytes", ""):
        table.add_column(col, justify="right" if col else "left")
    base_now = parameter_bytes(base)
    table.add_row("base as loaded", f"{loaded_bytes:,}", f"{planned.base_bytes_now:,}", fmt_bytes(loaded_bytes))
    table.add_row("base, quantized and shared", f"{base_now:,}", f"{planned.base_bytes_after:,}",
                  fmt_bytes(base_now))
    for i, ft in enumerate(fts):
        table.add_row(f"fine-tune {i + 1} (own tensors)", f"{extra_bytes(ft, base):,}", f"{planned.finetune_bytes:,}",
                      fmt_bytes(extra_bytes(ft, base)))
    total = base_now + sum(extra_bytes(ft, base) for ft in fts)
    table.add_row(f"base + {finetunes} fine-tunes", f"{total:,}", f"{planned.total_bytes():,}", fmt_bytes(total))
    table.add_row(f"{finetunes} full copies", f"{finetunes * loaded_bytes:,}", f"{planned.full_copies_bytes():,}",
                  fmt_bytes(finetunes * loaded_bytes))
    trainable = sum(p.numel() for p in fts[0].parameters() if p.requires_grad)
    table.add_row("trainable parameters / fine-tune", f"{trainable:,}", f"{planned.trainable_params:,}", "")
    console.print(table)
    verdict = "[green]equal[/]" if all(equal) else "[red]DIFFERENT[/]"
    console.print(f"each fine-tune's output at init vs the quantized base: {verdict} "
                  f"({sum(equal)}/{len(equal)} bit-identical)")
    if not all(equal):
        raise typer.Exit(1)
    if out is not None:
        from surgery.state import save_adapter

        paths = [out] if len(fts) == 1 else [out.with_name(f"{out.stem}-{i + 1}{out.suffix}") for i in range(len(fts))]
        for ft, path in zip(fts, paths):
            save_adapter(ft, path)
            console.print(f"wrote {path} ({path.stat().st_size:,} bytes)", highlight=False)


@app.command("models")
def models_cmd():
    """List the bundled models: tiny ones with weights, and architectures (config only, meta device).

    Example: surgery models
    """
    from surgery.architectures import ARCHITECTURES, TINY_MODELS

    table = Table(title="bundled models")
    table.add_column("name")
    table.add_column("type")
    table.add_column("weights")
    for name, spec in TINY_MODELS.items():
        table.add_row(name, spec["model_type"], "random, fixed seed")
    for name, spec in ARCHITECTURES.items():
        table.add_row(name, spec["model_type"], "none (architecture only; --random-init)")
    console.print(table)


@rules_app.command("list")
def rules_list():
    """List the bundled rule files with their descriptions.

    Example: surgery rules list
    """
    from surgery.rules import bundled_rules, load_rules

    table = Table(title="bundled rule files (use by name, e.g. `surgery plan qv_lora`)")
    table.add_column("name")
    table.add_column("quantize")
    table.add_column("description")
    for name in bundled_rules():
        rules = load_rules(name)
        table.add_row(name, rules.quantize.scheme, rules.description or "")
    console.print(table)


@rules_app.command("show")
def rules_show(rules: str = typer.Argument(..., help="Rule file path or bundled name.")):
    """Print a rule file (bundled name or path).

    Example: surgery rules show qv_lora
    """
    from surgery.rules import bundled_rules, load_rules

    ruleset = load_rules(rules)
    path = bundled_rules().get(rules) or Path(rules)
    console.print(f"# {ruleset.source}", highlight=False)
    console.print(path.read_text(), highlight=False, markup=False)


# ------------------------------------------------------------------------------ adapter state

ADAPTER_ARG = typer.Argument(..., help="Adapter file written by surgery (apply --out, train, import-peft).")
BASE_OPT = typer.Option(None, "--model", "-m", help="Base model (default: the base named in the adapter file).")
RANDOM_INIT_OPT = typer.Option(False, "--random-init", help="Build random weights when none are available.")
TOKENIZER_OPT = typer.Option(None, "--tokenizer", help="Tokenizer folder or model (default: the model's own).")


def _finetune_from(adapter: Path, model: Optional[str], random_init: bool):
    """Load the base (from --model or the file's metadata) and the adapter onto it."""
    from surgery.models import load_model
    from surgery.state import load_adapter, read_adapter

    info = read_adapter(adapter)
    name = model or info.base_model
    if not name:
        raise typer.BadParameter("the adapter file names no base model; pass --model")
    base = load_model(name, random_init=random_init).model
    return base, load_adapter(base, info), name


def _probe_inputs(model) -> dict:
    import torch

    vocab = getattr(getattr(model, "config", None), "vocab_size", 256)
    return {"input_ids": torch.randint(0, min(vocab, 256), (2, 16), generator=torch.Generator().manual_seed(0))}


@adapter_app.command("show")
def adapter_show(
    adapter: Path = ADAPTER_ARG,
    show_all: bool = typer.Option(False, "--all", help="List every tensor (default: the first 40)."),
):
    """Show an adapter file: metadata, base fingerprint, rules, and its tensors with sizes.

    Example: surgery adapter show runs/qv.safetensors
    """
    import yaml

    from surgery.plan import fmt_bytes
    from surgery.state import read_adapter

    info = read_adapter(adapter)
    meta = Table(title=f"{adapter}", show_header=False)
    meta.add_column("field")
    meta.add_column("value")
    for key in ("format", "format_version", "surgery_version", "base_model", "base_class", "rules_source"):
        meta.add_row(key, info.metadata.get(key, ""))
    meta.add_row("base fingerprint", repr(info.fingerprint))
    meta.add_row("checksums", "metadata and tensors verified")
    console.print(meta)
    console.print("[bold]rules[/] (stored in the file; they rebuild the fine-tune):")
    console.print(yaml.safe_dump(info.rules.to_dict(), sort_keys=False), highlight=False, markup=False)
    table = Table(title=f"{len(info.tensors)} tensors, {info.nbytes:,} bytes ({fmt_bytes(info.nbytes)})")
    for col in ("tensor", "dtype", "shape", "bytes"):
        table.add_column(col, justify="right" if col == "bytes" else "left")
    names = list(info.tensors)
    for name in names if show_all else names[:40]:
        t = info.tensors[name]
        table.add_row(name, str(t.dtype).removeprefix("torch."), str(tuple(t.shape)), f"{t.numel() * t.element_size():,}")
    if not show_all and len(names) > 40:
        table.add_row(f"... {len(names) - 40} more (--all)", "", "", "")
    console.print(table)


@app.command()
def merge(
    adapter: Path = ADAPTER_ARG,
    model: Optional[str] = BASE_OPT,
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the merged model (save_pretrained format)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, float16 or bfloat16 (default: the base's)."),
    report_requantized: bool = typer.Option(False, "--report-requantized",
                                            help="Also measure the error of requantizing the merged weights."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing non-empty --out folder."),
    random_init: bool = RANDOM_INIT_OPT,
):
    """Fold an adapter into its base and save a plain transformers model (no surgery needed to load it).

    Example: surgery merge runs/qv.safetensors --out merged/
    """
    _quiet_libraries()
    import torch

    from surgery.merge import merge as merge_ft, output_error
    from surgery.errors import AdapterStateError
    from surgery.files import atomic_folder

    if dtype not in (None, "float32", "float16", "bfloat16"):
        raise typer.BadParameter(f"--dtype must be float32, float16 or bfloat16, not {dtype!r}")
    base, ft, name = _finetune_from(adapter, model, random_init)
    merged = merge_ft(ft, getattr(torch, dtype) if dtype else None)
    inputs = _probe_inputs(base)
    error = output_error(ft, merged, inputs)
    with atomic_folder(out, overwrite=overwrite, error=AdapterStateError) as tmp:
        merged.save_pretrained(tmp)
    table = Table(title=f"merged {adapter} into {name}")
    table.add_column("")
    table.add_column("max |Δlogits|", justify="right")
    table.add_column("relative", justify="right")
    table.add_row("merged vs fine-tune", f"{error['max_abs']:.3g}", f"{error['max_rel']:.3g}")
    if report_requantized:
        added = output_error(merged, merge_ft(ft, requantize=True), inputs)
        table.add_row("requantized vs merged", f"{added['max_abs']:.3g}", f"{added['max_rel']:.3g}")
    console.print(table)
    console.print(f"wrote {out} (load with transformers.AutoModelForCausalLM.from_pretrained)", highlight=False)


@app.command("export-peft")
def export_peft_cmd(
    adapter: Path = ADAPTER_ARG,
    model: Optional[str] = BASE_OPT,
    out: Path = typer.Option(..., "--out", "-o", help="Folder for adapter_config.json + adapter_model.safetensors."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing non-empty --out folder."),
    random_init: bool = RANDOM_INIT_OPT,
):
    """Write an adapter in PEFT's format (loads with peft.PeftModel.from_pretrained).

    Example: surgery export-peft runs/qv.safetensors --out qv-peft/
    """
    _quiet_libraries()
    from surgery.peft_format import export_peft
    from surgery.errors import AdapterStateError
    from surgery.files import atomic_folder

    _, ft, name = _finetune_from(adapter, model, random_init)
    with atomic_folder(out, overwrite=overwrite, error=AdapterStateError) as tmp:
        export_peft(ft, tmp)
    console.print(f"wrote {out}: PeftModel.from_pretrained(<{name}>, {str(out)!r})", highlight=False)


@app.command("import-peft")
def import_peft_cmd(
    folder: Path = typer.Argument(..., help="PEFT LoRA adapter folder (adapter_config.json + weights)."),
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="Base model (default: base_model_name_or_path of the adapter)."),
    out: Path = typer.Option(..., "--out", "-o", help="Adapter file to write (.safetensors)."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="Store the base as int8, nf4, fp4 or none."),
    random_init: bool = RANDOM_INIT_OPT,
):
    """Read a PEFT LoRA adapter onto its base and save it as a surgery adapter file.

    Example: surgery import-peft qv-peft/ --out qv.safetensors --quantize int8
    """
    _quiet_libraries()
    from surgery.models import load_model
    from surgery.peft_format import import_peft, peft_base_model
    from surgery.state import save_adapter

    if quantize not in (None, "int8", "nf4", "fp4", "none"):
        raise typer.BadParameter(f"--quantize must be int8, nf4, fp4 or none, not {quantize!r}")
    name = model or peft_base_model(folder)
    if not name:
        raise typer.BadParameter("the adapter names no base model (base_model_name_or_path); pass --model")
    base = load_model(name, random_init=random_init).model
    ft = import_peft(base, folder, quantize=quantize)
    path = save_adapter(ft, out)
    console.print(f"wrote {path} ({path.stat().st_size:,} bytes) for {name}", highlight=False)


# ------------------------------------------------------------------------------ training

def _parse_job(spec: str) -> tuple[str, str, str]:
    name, sep, rest = spec.partition("=")
    rules, comma, data = rest.partition(",")
    if not (sep and comma and name and rules and data):
        raise typer.BadParameter(f"--job {spec!r}: write NAME=RULES,DATA, e.g. --job caps=lora_plus_head,capitals")
    return name, rules, data


@app.command()
def train(
    rules: Optional[str] = typer.Argument(None, help="Rule file or bundled name (or use --job for several)."),
    model: Optional[str] = MODEL_OPT,
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Training data: .csv (a text column; quoted "
                                       "fields may span lines), .jsonl (text, or prompt+completion), .txt (one "
                                       "example per line; with --group-texts one running text), or a bundled set "
                                       "(capitals, upper, reverse)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (one subfolder per --job)."),
    job: list[str] = typer.Option([], "--job", help="NAME=RULES,DATA: one more fine-tune on the same base "
                                  "(repeatable; all train in this process on one shared base)."),
    eval_file: Optional[str] = typer.Option(None, "--eval", help="Evaluation data file."),
    eval_split: Optional[float] = typer.Option(None, "--eval-split", help="Hold out this fraction for evaluation."),
    group_texts: bool = typer.Option(False, "--group-texts", help="Corpus mode: examples (a .txt file whole) "
                                     "joined with EOS and cut into blocks (default: one example per row, padded)."),
    block_size: int = typer.Option(128, "--block-size", help="Tokens per row."),
    pad_token_id: Optional[int] = typer.Option(None, "--pad-token-id", help="For tokenizers without a pad token."),
    batch_size: int = typer.Option(8, "--batch-size", help="Rows per micro-batch (per process)."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per optimizer step."),
    lr: float = typer.Option(2e-4, "--lr", help="Peak learning rate."),
    epochs: int = typer.Option(1, "--epochs", help="Passes over the data (unless --max-steps)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Optimizer steps (overrides --epochs)."),
    warmup: int = typer.Option(0, "--warmup", help="Warmup steps."),
    schedule: str = typer.Option("cosine", "--schedule", help="cosine, linear or constant."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="AdamW weight decay (matrices only)."),
    max_grad_norm: float = typer.Option(1.0, "--max-grad-norm", help="Gradient clipping (0: off)."),
    seed: int = typer.Option(0, "--seed", help="Seed of adapter init, data order and dropout."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, bf16 or fp16 (autocast)."),
    optimizer: str = typer.Option("adamw", "--optimizer", help="adamw or adamw8bit (bitsandbytes 8-bit AdamW)."),
    eval_steps: Optional[int] = typer.Option(None, "--eval-steps", help="Evaluate every N steps."),
    save_steps: Optional[int] = typer.Option(None, "--save-steps", help="Checkpoint every N steps."),
    save_total_limit: Optional[int] = typer.Option(None, "--save-total-limit", help="Keep only the newest N."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="A checkpoint folder, or the --out folder of a "
                                          "run (each job resumes from its newest checkpoint)."),
    random_init: bool = RANDOM_INIT_OPT,
    tokenizer_name: Optional[str] = TOKENIZER_OPT,
):
    """Train one fine-tune, or several on one shared base in one process; torchrun gives DDP.

    Example: surgery train lora_plus_head --model tiny-opt --data capitals --out runs/caps --max-steps 100 --lr 1e-2
    """
    _quiet_libraries()
    from surgery.models import load_model, load_tokenizer
    from surgery.rewrite import prepare_base
    from surgery.rules import load_rules
    from surgery.train import TrainConfig, latest_checkpoint, make_job, plot_losses, train as run_jobs, world

    specs = [(None, rules, data)] if rules or data else []
    specs += [_parse_job(j) for j in job]
    if not specs or any(r is None or d is None for _, r, d in specs):
        raise typer.BadParameter("give RULES with --data, or one or more --job NAME=RULES,DATA")
    first_rules = load_rules(specs[0][1])
    name, why = _model_for(first_rules, model)
    config = TrainConfig(batch_size, grad_accum, lr, epochs, max_steps, warmup, schedule, weight_decay,
                         max_grad_norm or None, seed, precision, optimizer, eval_steps, save_steps, save_total_limit)
    config.check()
    where = world()
    base = load_model(name, random_init=random_init).model
    tokenizer = load_tokenizer(tokenizer_name or name)
    prepare_base(base, *[r for _, r, _ in specs])  # quantize once for every job before any fine-tune exists
    jobs = []
    for job_name, job_rules, job_data in specs:
        folder = out if job_name is None else out / job_name
        jobs.append(make_job(base, job_name or Path(str(job_rules)).stem, job_rules, job_data, tokenizer, config,
                             out=folder, eval_data=eval_file, eval_split=eval_split,
                             mode="corpus" if group_texts else "entries", block_size=block_size,
                             pad_token_id=pad_token_id, model_name=name))
    resume_from = {}
    if resume is not None:
        if (resume / "training_state.safetensors").exists():
            if len(jobs) > 1:
                raise typer.BadParameter("--resume with several jobs takes the run's --out folder")
            resume_from[jobs[0].name] = resume
        else:
            for j in jobs:
                found = latest_checkpoint(j.out)
                if found is None:
                    raise typer.BadParameter(f"--resume {resume}: no checkpoint-N folder for job {j.name} in {j.out}")
                resume_from[j.name] = found
    if where.main:
        console.print(f"model: [bold]{name}[/] (from {why}); {len(jobs)} fine-tune{'s' if len(jobs) > 1 else ''}"
                      f"{f' x {where.size} processes' if where.size > 1 else ''}", highlight=False)
    _run_with_progress(jobs, resume_from, run_jobs, show=where.main)
    if not where.main:
        return
    _training_summary(jobs)
    png = plot_losses(jobs, out / "loss.png")
    console.print(f"loss curve: {png}" if png else "loss curve: not drawn (pip install 'surgery[plot]' for matplotlib)",
                  highlight=False, markup=False)


def _run_with_progress(jobs, resume_from, run_jobs, *, show: bool) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:,.0f} tok/s"),
               TimeElapsedColumn()]
    with Progress(*columns, console=console, disable=not show) as progress:
        tasks = {}

        def on_step(job, record):
            if job.name not in tasks:
                tasks[job.name] = progress.add_task(job.name, total=job.total_steps, loss=0.0, lr=0.0, tps=0.0)
            progress.update(tasks[job.name], completed=job.step, loss=record["loss"], lr=record["lr"],
                            tps=record["tokens_per_s"])

        run_jobs(jobs, resume=resume_from, on_step=on_step)


def _training_summary(jobs) -> None:
    table = Table(title="training summary")
    for col in ("job", "steps", "first loss", "last loss", "eval loss", "perplexity", "adapter file"):
        table.add_column(col, justify="left" if col in ("job", "adapter file") else "right")
    for j in jobs:
        losses = [r["loss"] for r in j.history if "loss" in r]
        final = next((r for r in reversed(j.history) if "eval_loss" in r), {})
        table.add_row(j.name, str(j.step), f"{losses[0]:.4f}" if losses else "-", f"{losses[-1]:.4f}" if losses else "-",
                      f"{final['eval_loss']:.4f}" if final else "-", f"{final['perplexity']:.2f}" if final else "-",
                      str(j.out / "adapter.safetensors"))
    console.print(table)


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="Text to continue."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Base model (default: the adapter's base, "
                                        "else the bundled tiny default)."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", "-a", help="Adapter file to apply."),
    max_new_tokens: int = typer.Option(40, "--max-new-tokens", "-n", help="Tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy; > 0 samples."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling (with --temperature > 0)."),
    top_k: int = typer.Option(0, "--top-k", help="Top-k sampling (0: off)."),
    seed: int = typer.Option(0, "--seed", help="Seed for sampling."),
    random_init: bool = RANDOM_INIT_OPT,
    tokenizer_name: Optional[str] = TOKENIZER_OPT,
):
    """Continue PROMPT with a model, optionally with a fine-tune's adapter, streaming to the terminal.

    Example: surgery generate "The capital of Peru is" --adapter runs/caps/adapter.safetensors -n 8
    """
    _quiet_libraries()
    import torch
    from transformers import TextStreamer

    from surgery.architectures import TINY_DEFAULT
    from surgery.models import load_model, load_tokenizer

    if adapter is not None:
        _, lm, name = _finetune_from(adapter, model, random_init)
    else:
        name = model or TINY_DEFAULT
        lm = load_model(name, random_init=random_init).model
    lm.eval()
    tokenizer = load_tokenizer(tokenizer_name or name)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    sampling = temperature > 0
    options = {"do_sample": sampling, "max_new_tokens": max_new_tokens,
               "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id}
    if sampling:
        options.update(temperature=temperature, top_p=top_p, top_k=top_k or None)
    torch.manual_seed(seed)
    with torch.no_grad():
        lm.generate(ids, streamer=TextStreamer(tokenizer), **options)


DEMO_TASKS = (  # (data set, rule file, two prompts shown after training)
    ("reverse", "finetuna_default", ("owl <-", "van <-")),
    ("capitals", "lora_plus_head", ("The capital of Japan is", "The capital of Peru is")),
    ("upper", "qv_lora_head", ("owl ->", "van ->")),
)


@app.command()
def demo(
    model: str = typer.Option("tiny-opt", "--model", "-m", help="Bundled tiny model to use."),
    steps: int = typer.Option(150, "--steps", help="Training steps per fine-tune."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for the adapter files (default: a new "
                                       "temporary folder)."),
):
    """The whole story offline in under a minute: one int8 base, three fine-tunes trained on it, saved, reloaded.

    Example: surgery demo
    """
    _quiet_libraries()
    import tempfile
    import time

    import torch

    from surgery.memory import extra_bytes, parameter_bytes
    from surgery.models import load_model, load_tokenizer
    from surgery.plan import fmt_bytes
    from surgery.rewrite import prepare_base
    from surgery.state import load_adapter
    from surgery.train import TrainConfig, evaluate, make_job, train as run_jobs

    start = time.perf_counter()
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="surgery-demo-"))
    base = load_model(model).model
    tokenizer = load_tokenizer(model)
    loaded_bytes = parameter_bytes(base)
    console.print(f"[bold]1. base[/]: {model} ({type(base).__name__}, {loaded_bytes:,} bytes fp32); "
                  "three fine-tunes with three rule files, each on its own toy task", highlight=False)
    config = TrainConfig(batch_size=8, lr=1e-2, max_steps=steps, warmup=max(1, steps // 10), seed=0)
    prepare_base(base, *[rules for _, rules, _ in DEMO_TASKS])  # one quantization for all three
    jobs = [make_job(base, task, rules, task, tokenizer, config, out=out / task, block_size=32, model_name=model)
            for task, rules, _ in DEMO_TASKS]

    table = Table(title="2. memory: one int8 base shared by three fine-tunes (unique parameter storage)")
    table.add_column("")
    table.add_column("bytes", justify="right")
    table.add_column("", justify="right")
    base_bytes = parameter_bytes(base)
    table.add_row("base, quantized once (int8)", f"{base_bytes:,}", fmt_bytes(base_bytes))
    for job in jobs:
        own = extra_bytes(job.finetune, base)
        table.add_row(f"fine-tune '{job.name}' ({_rules_name(job)}): own tensors", f"{own:,}", fmt_bytes(own))
    total = base_bytes + sum(extra_bytes(job.finetune, base) for job in jobs)
    table.add_row("[bold]base + 3 fine-tunes[/]", f"{total:,}", fmt_bytes(total))
    table.add_row("3 full fp32 copies", f"{3 * loaded_bytes:,}", fmt_bytes(3 * loaded_bytes))
    console.print(table)

    before = {job.name: evaluate(job.finetune, job.data)["eval_loss"] for job in jobs}
    console.print(f"[bold]3. training[/] the three together, {steps} steps each, on the one base:")
    _run_with_progress(jobs, {}, run_jobs, show=True)
    results = Table(title="4. loss on each task's data, and what each fine-tune now generates (greedy)")
    for col in ("fine-tune", "loss before", "loss after", "prompt", "generated", "expected"):
        results.add_column(col, justify="right" if "loss" in col else "left")
    expected = {task: _expected_answers(task) for task, _, _ in DEMO_TASKS}
    for job, (task, _, prompts) in zip(jobs, DEMO_TASKS):
        after = evaluate(job.finetune, job.data)["eval_loss"]
        for i, prompt in enumerate(prompts):
            text = _greedy(job.finetune, tokenizer, prompt)
            results.add_row(job.name if i == 0 else "", f"{before[job.name]:.3f}" if i == 0 else "",
                            f"{after:.3f}" if i == 0 else "", prompt, repr(text), repr(expected[task].get(prompt, "")))
    console.print(results)

    files = Table(title="5. adapter files: written, reloaded onto the base, verified")
    for col in ("file", "bytes", "reloaded == trained"):
        files.add_column(col, justify="right" if col == "bytes" else "left")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    verified = True
    for job in jobs:
        path = job.out / "adapter.safetensors"
        again = load_adapter(base, path)
        with torch.no_grad():
            same = torch.equal(again(ids).logits, job.finetune.eval()(ids).logits)
        verified &= same
        files.add_row(str(path), f"{path.stat().st_size:,}", "[green]yes, bit for bit[/]" if same else "[red]NO[/]")
    console.print(files)
    console.print(f"done in {time.perf_counter() - start:.1f} s. Next: surgery adapter show {jobs[1].out}/adapter.safetensors;"
                  f" surgery generate \"The capital of Peru is\" --adapter {jobs[1].out}/adapter.safetensors",
                  highlight=False, markup=False)
    if not verified:
        raise typer.Exit(1)


def _rules_name(job) -> str:
    from surgery.finetune import finetune_info

    return finetune_info(job.finetune).rules.name


def _expected_answers(task: str) -> dict[str, str]:
    from surgery.data import read_examples

    return {ex.prompt: ex.completion for ex in read_examples(task)}


def _greedy(model, tokenizer, prompt: str, max_new_tokens: int = 12) -> str:
    import torch

    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.eval().generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
