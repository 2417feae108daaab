"""The demo: one quantized base, three fine-tunes trained together on toy tasks, files verified."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

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

    from surgery.adapter_file import load_adapter
    from surgery.adapter_file import ADAPTER_FILE
    from surgery.job import TrainConfig, make_job
    from surgery.loading import load_model, load_tokenizer
    from surgery.memory import extra_bytes, parameter_bytes
    from surgery.report import demo_files_table, demo_memory_table, demo_results_table
    from surgery.rewrite import prepare_base
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

    base_bytes = parameter_bytes(base)
    own = [(f"fine-tune '{job.name}' ({_rules_name(job)}): own tensors", extra_bytes(job.finetune, base)) for job in jobs]
    console.print(demo_memory_table(base_bytes, loaded_bytes, own))

    before = {job.name: evaluate(job.finetune, job.data)["eval_loss"] for job in jobs}
    console.print(f"[bold]3. training[/] the three together, {steps} steps each, on the one base:")
    run_with_progress(jobs, {}, show=True)
    rows = []
    for job, (task, _, prompts) in zip(jobs, DEMO_TASKS):
        after, expected = evaluate(job.finetune, job.data)["eval_loss"], _expected_answers(task)
        rows += [(job.name, before[job.name], after, prompt, _greedy(job.finetune, tokenizer, prompt),
                  expected.get(prompt, "")) for prompt in prompts]
    console.print(demo_results_table(rows))

    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    checked = []
    for job in jobs:
        path = job.out / ADAPTER_FILE
        again = load_adapter(base, path)
        with torch.no_grad():
            checked.append((path, torch.equal(again(ids).logits, job.finetune.eval()(ids).logits)))
    console.print(demo_files_table(checked))
    verified = all(same for _, same in checked)
    console.print(f"done in {time.perf_counter() - start:.1f} s. Next: surgery adapter show {jobs[1].out / ADAPTER_FILE};"
                  f" surgery generate \"The capital of Peru is\" --adapter {jobs[1].out / ADAPTER_FILE}",
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
