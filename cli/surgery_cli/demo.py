"""The demo: one quantized base, three fine-tunes trained together on toy tasks, files verified."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import DEVICE_OPT, RANDOM_INIT_OPT, DeviceConfig, console, quiet_libraries, say
from .progress import run_with_progress

TASKS = {  # data set -> two prompts shown after training
    "reverse": ("owl <-", "van <-"),
    "capitals": ("The capital of Japan is", "The capital of Peru is"),
    "upper": ("owl ->", "van ->"),
}
RULE_SETS = {  # kind of model (see model_kind) -> (learning rate, the rule file that trains each task)
    "random weights": (1e-2, {"reverse": "finetuna_default", "capitals": "lora_plus_head", "upper": "qv_lora_head"}),
    "pretrained, under 3B parameters": (
        2e-3,
        {"reverse": "all_linear_lora", "capitals": "qv_lora", "upper": "all_linear_lora"},
    ),
    "pretrained, 3B parameters or more": (
        1e-3,
        {"reverse": "qlora_nf4", "capitals": "qlora_nf4", "upper": "qlora_nf4"},
    ),
}


def model_kind(random_weights: bool, parameters: int) -> str:
    """Random weights need a trainable lm_head to learn a toy task in a minute; a pretrained model learns it with
    LoRA alone (int8 base), and from 3B parameters up its base is stored in nf4 to fit in memory."""
    if random_weights:
        return "random weights"
    return "pretrained, under 3B parameters" if parameters < 3_000_000_000 else "pretrained, 3B parameters or more"


def demo(
    model: str = typer.Option(
        "tiny-opt",
        "--model",
        "-m",
        help="Model: a bundled tiny model (default, offline), a "
        "local model folder, a model in the local HF cache, or a bundled architecture with "
        "--random-init.",
    ),
    steps: int = typer.Option(150, "--steps", help="Training steps per fine-tune."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Folder for the adapter files (default: a new temporary folder)."
    ),
    random_init: bool = RANDOM_INIT_OPT,
    device: str = DEVICE_OPT,
):
    """The whole story offline in under a minute: one quantized base, three fine-tunes trained on it, saved, reloaded.

    Example: surgery demo

    Example (your own model; rule files chosen by its size): surgery demo --model ./my-model --steps 100

    Example (on a GPU): surgery demo --device cuda
    """
    quiet_libraries()
    import tempfile
    import time

    import torch

    from surgery.base.loading import load_model
    from surgery.files.adapter_file import ADAPTER_FILE
    from surgery.finetune.loading import load_adapter
    from surgery.model.architectures import TINY_MODELS
    from surgery.planning.memory import extra_bytes, parameter_bytes
    from surgery.planning.report import demo_files_table, demo_memory_table, demo_results_table
    from surgery.rules.rule_file import load_rules
    from surgery.training.config import DataConfig, TrainConfig
    from surgery.training.job import make_job
    from surgery.training.loop import evaluate

    start = time.perf_counter()
    devices = DeviceConfig(device=device)
    where = devices.placement()
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="surgery-demo-"))
    layout = load_model(model, weights=False)  # the model as it would load (meta: no memory) picks the rule files
    loaded_bytes = sum(p.numel() * p.element_size() for p in layout.model.parameters())  # tied ones once
    parameters = sum(p.numel() for p in layout.model.parameters())
    kind = model_kind(model in TINY_MODELS or not layout.has_weights, parameters)
    lr, rule_files = RULE_SETS[kind]
    tasks = [(task, rule_files[task], prompts) for task, prompts in TASKS.items()]
    dtype = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(
        str(next(layout.model.parameters()).dtype).removeprefix("torch."), "fp32"
    )
    say(
        ("1. base", "bold"),
        f": {model} on {devices.describe().removeprefix('device ')} "
        f"({type(layout.model).__name__}, {parameters:,} parameters, {loaded_bytes:,} bytes {dtype})",
    )
    console.print(
        f"three fine-tunes on toy tasks, rule files for {kind} models: "
        f"{', '.join(f'{task}={rules}' for task, rules, _ in tasks)}",
        highlight=False,
    )
    config = TrainConfig(batch_size=8, lr=lr, max_steps=steps, warmup=max(1, steps // 10), seed=0)
    rule_sets = [load_rules(rules) for _, rules, _ in tasks]
    base = load_model(model, random_init=random_init, rules=rule_sets, **where).model  # one quantization for all
    tokenizer = _tokenizer(model, base, random_init)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    jobs = [
        make_job(
            base,
            name=task,
            rules=rules,
            data=task,
            tokenizer=tokenizer,
            config=config,
            data_config=DataConfig(block_size=32, pad_token_id=pad),
            out=out / task,
            model_name=model,
        )
        for task, rules, _ in tasks
    ]

    base_bytes = parameter_bytes(base)
    own = [
        (f"fine-tune '{job.name}' ({_rules_name(job)}): own tensors", extra_bytes(job.finetune, base)) for job in jobs
    ]
    scheme = " + ".join(sorted({r.quantize.scheme for r in rule_sets}))
    console.print(demo_memory_table(base_bytes, loaded_bytes, own, scheme, dtype))

    before = {job.name: evaluate(job.finetune, job.data)["eval_loss"] for job in jobs}
    say(("3. training", "bold"), f" the three together, {steps} steps each, on the one base:")
    run_with_progress(jobs, {}, show=True)
    rows = []
    for job, (task, _, prompts) in zip(jobs, tasks):
        after, expected = evaluate(job.finetune, job.data)["eval_loss"], _expected_answers(task)
        rows += [
            (
                job.name,
                before[job.name],
                after,
                prompt,
                _greedy(job.finetune, tokenizer, prompt),
                expected.get(prompt, ""),
            )
            for prompt in prompts
        ]
    console.print(demo_results_table(rows))

    vocab = getattr(base.config, "vocab_size", 256)
    ids = torch.randint(0, min(vocab, 256), (2, 16), generator=torch.Generator().manual_seed(0)).to(where["device"])
    checked = []
    for job in jobs:
        path = job.out / ADAPTER_FILE
        again = load_adapter(base, path)
        with torch.no_grad():
            checked.append((path, torch.equal(again(ids).logits, job.finetune.eval()(ids).logits)))
    console.print(demo_files_table(checked))
    verified = all(same for _, same in checked)
    console.print(
        f"done in {time.perf_counter() - start:.1f} s. Next: surgery adapter show {jobs[1].out / ADAPTER_FILE};"
        f' surgery generate "{TASKS["capitals"][1]}" --model {model} --adapter {jobs[1].out / ADAPTER_FILE}',
        highlight=False,
        markup=False,
    )
    if not verified:
        raise typer.Exit(1)


def _tokenizer(model: str, base, random_init: bool):
    """The model's tokenizer; a bundled architecture built with --random-init has none and gets the byte tokenizer."""
    from surgery.base.loading import load_tokenizer, tiny_tokenizer
    from surgery.errors import SurgeryError

    try:
        return load_tokenizer(model)
    except SurgeryError:
        if not random_init or getattr(base.config, "vocab_size", 0) < 260:
            raise
        console.print(
            f"{model} has no tokenizer here: using the bundled byte-level tokenizer (ids 0-259)",
            highlight=False,
            markup=False,
        )
        return tiny_tokenizer()


def _rules_name(job) -> str:
    from surgery.base.ownership import finetune_info

    return finetune_info(job.finetune).rules.name


def _expected_answers(task: str) -> dict[str, str]:
    from surgery.training.data import read_examples

    return {ex.prompt: ex.completion for ex in read_examples(task)}


def _greedy(model, tokenizer, prompt: str, max_new_tokens: int = 12) -> str:
    import torch

    from surgery.devices import input_device

    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    ids = ids.to(input_device(model))
    with torch.no_grad():
        out = model.eval().generate(
            ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
