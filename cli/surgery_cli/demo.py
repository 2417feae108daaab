"""The demo: one quantized base, three fine-tunes trained together on toy tasks, files verified."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .common import console, quiet_libraries
from .train_cmds import run_with_progress


DEMO_TASKS = (  # (data set, rule file, two prompts shown after training)
    ("reverse", "finetuna_default", ("owl <-", "van <-")),
    ("capitals", "lora_plus_head", ("The capital of Japan is", "The capital of Peru is")),
    ("upper", "qv_lora_head", ("owl ->", "van ->")),
)


def demo(
    model: str = typer.Option("tiny-opt", "--model", "-m", help="Bundled tiny model to use."),
    steps: int = typer.Option(150, "--steps", help="Training steps per fine-tune."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for the adapter files (default: a new "
                                       "temporary folder)."),
):
    """The whole story offline in under a minute: one int8 base, three fine-tunes trained on it, saved, reloaded.

    Example: surgery demo
    """
    quiet_libraries()
    import tempfile
    import time

    import torch

    from surgery.memory import extra_bytes, parameter_bytes
    from surgery.loading import load_model, load_tokenizer
    from surgery.memory import fmt_bytes
    from surgery.rewrite import prepare_base
    from surgery.adapter_file import load_adapter
    from surgery.job import TrainConfig, make_job
    from surgery.train import evaluate

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
    run_with_progress(jobs, {}, show=True)
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
