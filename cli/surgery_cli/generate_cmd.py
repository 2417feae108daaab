"""`surgery generate`: answer prompts with one or several fine-tunes (and the base) in one batched pass."""

from __future__ import annotations

from pathlib import Path

import typer

from surgery.devices import DeviceConfig

from .common import RANDOM_INIT_OPT, TOKENIZER_OPT, console, quiet_libraries, say
from .options import with_configs


def _asked(example) -> str:
    """What a prompt row asks, as printed: its prompt, its text, or its conversation's last user turn."""
    users = [content for role, content in example.messages if role == "user"]
    return example.prompt or example.completion or (users or [example.messages[-1][1]])[-1]


@with_configs(devices=DeviceConfig)
def generate(
    prompt: str | None = typer.Argument(None, help="Text to continue (or use --prompts)."),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Base model (default: the first adapter's base, else the bundled tiny default)."
    ),
    adapter: list[Path] = typer.Option(
        [],
        "--adapter",
        "-a",
        help="Adapter file, adapter folder or PEFT LoRA folder (repeatable: every fine-tune answers, all in one "
        "batched pass over the shared base).",
    ),
    with_base: bool = typer.Option(False, "--base", help="Also answer with the bare base (always, without adapters)."),
    prompts_file: Path | None = typer.Option(
        None,
        "--prompts",
        help="A .txt (one prompt per line) or .jsonl "
        "(`text`, or `prompt` + `completion`: the prompt is asked) file; prints JSON lines.",
    ),
    max_new_tokens: int = typer.Option(40, "--max-new-tokens", "-n", help="Tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy; > 0 samples."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling (with --temperature > 0)."),
    top_k: int = typer.Option(0, "--top-k", help="Top-k sampling (0: off)."),
    seed: int = typer.Option(0, "--seed", help="Seed for sampling: prompt i draws from seed + i, for every fine-tune."),
    chat_template: bool = typer.Option(
        False,
        "--chat-template",
        help="Ask each prompt as a user turn in the "
        "tokenizer's chat template (`messages` rows of --prompts always are).",
    ),
    random_init: bool = RANDOM_INIT_OPT,
    tokenizer_name: str | None = TOKENIZER_OPT,
    devices: DeviceConfig = DeviceConfig(),
):
    """Answer one or many prompts with one or several fine-tunes (and the base), in one batched generate.

    Example: surgery generate "The capital of Peru is" --adapter runs/caps/adapter.safetensors --base -n 8

    Example (an instruct model's chat template): surgery generate "What is the capital of Peru?" --chat-template
    --model ./my-instruct --adapter runs/chat/adapter.safetensors
    """
    quiet_libraries()
    import json

    from rich.table import Table

    from surgery.base.loading import load_model, load_tokenizer
    from surgery.files.adapter_file import read_adapter
    from surgery.files.peft_format import PeftFolder, is_peft_folder, read_peft_folder, recorded_rules
    from surgery.finetune.batched import generate as generate_batched
    from surgery.finetune.loading import import_peft, load_adapter
    from surgery.finetune.vocabulary import extended_tokenizer
    from surgery.model.architectures import TINY_DEFAULT
    from surgery.training.data import Example, chat_prompt, read_examples

    if (prompt is None) == (prompts_file is None):
        raise typer.BadParameter("give one PROMPT or --prompts FILE")
    examples = [Example("", prompt)] if prompt is not None else read_examples(prompts_file)
    shown = [_asked(e) for e in examples]
    # PEFT folders are read once, then imported onto the base
    read = [read_peft_folder(path) if is_peft_folder(path) else read_adapter(path) for path in adapter]
    files = [f for f in read if not isinstance(f, PeftFolder)]
    name = model or (read[0].base_model if read else "") or TINY_DEFAULT
    tokenizer = load_tokenizer(tokenizer_name or name)
    chat = chat_template or any(e.messages for e in examples)
    source = str(prompts_file or "PROMPT")
    prompts = [chat_prompt(e, tokenizer, source) for e in examples] if chat else shown
    placed = devices.placement()
    if prompts_file is None:
        say("model: ", (name, "bold"), f"; {devices.describe()}")
    # quantized once for every adapter's rules as it loads; then the adapters are loaded onto it
    stored = [f.rules for f in files] + [r for f in read if isinstance(f, PeftFolder) and (r := recorded_rules(f))]
    base = load_model(name, random_init=random_init, rules=stored, **placed).model
    base.requires_grad_(False)  # only answered with: the bare base too (a base no rule file froze was refused)
    entries = [import_peft(base, f) if isinstance(f, PeftFolder) else load_adapter(base, f) for f in read]
    entries += [None] if with_base or not read else []
    labels = [str(path) for path in adapter] + (["base"] if with_base or not read else [])
    if len(entries) == 1 and entries[0] is not None:  # a fine-tune with its own tokens reads and writes them
        tokenizer = extended_tokenizer(entries[0], tokenizer)
    answers = generate_batched(
        base,
        entries,
        prompts,
        tokenizer,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
    )
    if prompts_file is not None:
        for label, texts in zip(labels, answers):
            for p, text in zip(shown, texts):
                print(json.dumps({"model": label, "prompt": p, "answer": text}))
        return
    table = Table(title=f"{name}: {len(entries)} model{'s' if len(entries) != 1 else ''}, one batched pass")
    table.add_column("model")
    table.add_column("answer")
    for label, texts in zip(labels, answers):
        table.add_row(label, texts[0] if chat else prompt + texts[0])
    console.print(table)
