"""`surgery train`: one fine-tune, several on one base, DDP or FSDP2 under torchrun (what it shows: progress.py)."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import (
    ATTN_OPT,
    DEVICE_MAP_OPT,
    DEVICE_OPT,
    DEVICE_PANEL,
    MAX_MEMORY_OPT,
    MODEL_OPT,
    RANDOM_INIT_OPT,
    TOKENIZER_OPT,
    console,
    model_for,
    placement,
    quiet_libraries,
    say,
    where_text,
)
from .progress import LOGGING_STEPS, plot_losses, run_with_progress

DATA = "Data"
SCHEDULE = "Schedule & optimizer"
SHORTHAND = "LoRA shorthand (instead of RULES)"
EVALUATION = "Evaluation & early stopping"
CHECKPOINTS = "Checkpoints"
OUTPUT = "Output"


def _parse_job(spec: str) -> tuple[str, str, str]:
    name, sep, rest = spec.partition("=")
    rules, comma, data = rest.partition(",")
    if not (sep and comma and name and rules and data):
        raise typer.BadParameter(f"--job {spec!r}: write NAME=RULES,DATA, e.g. --job caps=lora_plus_head,capitals")
    return name, rules, data


def train(
    rules: str | None = typer.Argument(
        None, help="Rule file or bundled name (or --job for several, or --target-modules for a one-off LoRA)."
    ),
    model: str | None = MODEL_OPT,
    data: str | None = typer.Option(
        None,
        "--data",
        "-d",
        rich_help_panel=DATA,
        help="Training data: .csv (a text column; quoted "
        "fields may span lines), .jsonl (text, prompt+completion or messages), .txt (one "
        "example per line; with --group-texts one running text), .parquet, .arrow, a "
        "datasets save_to_disk folder, a dataset name from the local datasets cache "
        "(never downloaded), or a bundled set (capitals, upper, reverse).",
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", rich_help_panel=OUTPUT, help="Output folder (one subfolder per --job)."
    ),
    extra_tokens: Path | None = typer.Option(
        None,
        "--extra-tokens",
        rich_help_panel=DATA,
        help="A file of new "
        "tokens, one per line: each fine-tune adds them to its tokenizer and "
        "trains embedding and output rows of its own (the base stays as is).",
    ),
    job: list[str] = typer.Option(
        [],
        "--job",
        rich_help_panel=DATA,
        help="NAME=RULES,DATA: one more fine-tune on the same base "
        "(repeatable; all train in this process on one shared base).",
    ),
    eval_file: str | None = typer.Option(
        None,
        "--eval",
        rich_help_panel=EVALUATION,
        help="Evaluation data (any --data form; a dataset with splits gives its validation or test split).",
    ),
    eval_split: float | None = typer.Option(
        None, "--eval-split", rich_help_panel=EVALUATION, help="Hold out this fraction for evaluation."
    ),
    chat_template: bool = typer.Option(
        False,
        "--chat-template",
        rich_help_panel=DATA,
        help="Render prompt/completion rows with the "
        "tokenizer's chat template (`messages` rows always are); loss on the "
        "assistant's answer only.",
    ),
    group_texts: bool = typer.Option(
        False,
        "--group-texts",
        rich_help_panel=DATA,
        help="Corpus mode: examples (a .txt file whole) "
        "joined with EOS and cut into blocks (default: one example per row, padded).",
    ),
    packing: bool = typer.Option(
        False,
        "--packing",
        rich_help_panel=DATA,
        help="Fill each row with several whole "
        "examples (positions restart, attention never crosses them); eval rows stay single.",
    ),
    text_field: str = typer.Option("text", "--text-field", rich_help_panel=DATA, help="Column holding a row's text."),
    prompt_field: str = typer.Option(
        "prompt", "--prompt-field", rich_help_panel=DATA, help="Column holding the prompt (no loss)."
    ),
    completion_field: str = typer.Option(
        "completion", "--completion-field", rich_help_panel=DATA, help="Column holding the completion."
    ),
    messages_field: str = typer.Option(
        "messages", "--messages-field", rich_help_panel=DATA, help="Column holding a conversation."
    ),
    dataset_config: str | None = typer.Option(
        None,
        "--dataset-config",
        rich_help_panel=DATA,
        help="A configuration of a dataset named by --data (e.g. wikitext-2-raw-v1), from the cache.",
    ),
    dataset_train_split: str | None = typer.Option(
        None,
        "--dataset-train-split",
        rich_help_panel=DATA,
        help="The split of a stored dataset to train on (default: train).",
    ),
    dataset_test_split: str | None = typer.Option(
        None,
        "--dataset-test-split",
        rich_help_panel=EVALUATION,
        help="The split --eval reads (default: validation, test or eval).",
    ),
    block_size: int = typer.Option(128, "--block-size", rich_help_panel=DATA, help="Tokens per row."),
    pad_token_id: int | None = typer.Option(
        None, "--pad-token-id", rich_help_panel=DATA, help="For tokenizers without a pad token."
    ),
    batch_size: int = typer.Option(
        8, "--batch-size", rich_help_panel=SCHEDULE, help="Rows per micro-batch (per process)."
    ),
    grad_accum: int = typer.Option(
        1, "--grad-accum", rich_help_panel=SCHEDULE, help="Micro-batches per optimizer step."
    ),
    lr: float = typer.Option(2e-4, "--lr", rich_help_panel=SCHEDULE, help="Peak learning rate."),
    epochs: int = typer.Option(
        1, "--epochs", rich_help_panel=SCHEDULE, help="Passes over the data (unless --max-steps)."
    ),
    max_steps: int | None = typer.Option(
        None, "--max-steps", rich_help_panel=SCHEDULE, help="Optimizer steps (overrides --epochs)."
    ),
    warmup: int = typer.Option(0, "--warmup", rich_help_panel=SCHEDULE, help="Warmup steps."),
    schedule: str = typer.Option("cosine", "--schedule", rich_help_panel=SCHEDULE, help="cosine, linear or constant."),
    weight_decay: float = typer.Option(
        0.0, "--weight-decay", rich_help_panel=SCHEDULE, help="AdamW weight decay (matrices only)."
    ),
    max_grad_norm: float = typer.Option(
        1.0, "--max-grad-norm", rich_help_panel=SCHEDULE, help="Gradient clipping (0: off)."
    ),
    seed: int = typer.Option(
        0, "--seed", rich_help_panel=SCHEDULE, help="Seed of adapter init, data order and dropout."
    ),
    precision: str = typer.Option(
        "fp32", "--precision", rich_help_panel=SCHEDULE, help="fp32, bf16 or fp16 (autocast)."
    ),
    optimizer: str = typer.Option(
        "adamw", "--optimizer", rich_help_panel=SCHEDULE, help="adamw or adamw8bit (bitsandbytes 8-bit AdamW)."
    ),
    eval_steps: int | None = typer.Option(
        None, "--eval-steps", rich_help_panel=EVALUATION, help="Evaluate every N steps."
    ),
    save_steps: int | None = typer.Option(
        None, "--save-steps", rich_help_panel=CHECKPOINTS, help="Checkpoint every N steps."
    ),
    save_total_limit: int | None = typer.Option(
        None, "--save-total-limit", rich_help_panel=CHECKPOINTS, help="Keep only the newest N."
    ),
    early_stopping_patience: int | None = typer.Option(
        None,
        "--early-stopping-patience",
        rich_help_panel=EVALUATION,
        help="Stop a job after "
        "N evaluations (--eval-steps) without a better eval loss; "
        "its adapter keeps the best weights.",
    ),
    early_stopping_threshold: float = typer.Option(
        0.0,
        "--early-stopping-threshold",
        rich_help_panel=EVALUATION,
        help="How much an eval loss must beat the best to count as better.",
    ),
    resume: Path | None = typer.Option(
        None,
        "--resume",
        rich_help_panel=CHECKPOINTS,
        help="A checkpoint folder, or the --out folder of a run (each job resumes from its newest checkpoint).",
    ),
    batched: bool = typer.Option(
        False,
        "--batched",
        rich_help_panel=DEVICE_PANEL,
        help="Several --job: run every job's micro-batch through "
        "one shared base pass per micro-step (same results as taking turns, faster).",
    ),
    max_batched_tokens: int | None = typer.Option(
        None,
        "--max-batched-tokens",
        rich_help_panel=DEVICE_PANEL,
        help="With --batched: at most "
        "this many padded tokens (rows x length) per pass; jobs beyond "
        "it go in further passes (bounds activation memory).",
    ),
    fsdp: bool = typer.Option(
        False,
        "--fsdp",
        rich_help_panel=DEVICE_PANEL,
        help="Under torchrun / accelerate launch: shard the shared base "
        "over the processes with FSDP2 (each holds about 1/N of it); nf4 or unquantized bases.",
    ),
    target_modules: str | None = typer.Option(
        None,
        "--target-modules",
        rich_help_panel=SHORTHAND,
        help="Instead of RULES, a one-off LoRA: "
        "module names to adapt (q_proj,v_proj) or all-linear; the rule "
        "file they stand for is written to OUT/rules.yaml.",
    ),
    lora_r: int | None = typer.Option(
        None, "--lora-r", rich_help_panel=SHORTHAND, help="With --target-modules: LoRA rank (default 8)."
    ),
    lora_alpha: float | None = typer.Option(
        None, "--lora-alpha", rich_help_panel=SHORTHAND, help="With --target-modules: LoRA alpha (default: the rank)."
    ),
    lora_dropout: float | None = typer.Option(
        None, "--lora-dropout", rich_help_panel=SHORTHAND, help="With --target-modules: LoRA dropout (default 0)."
    ),
    use_rslora: bool = typer.Option(
        False,
        "--use-rslora",
        rich_help_panel=SHORTHAND,
        help="With --target-modules: "
        "rank-stabilized LoRA, scaling alpha/sqrt(r) instead of alpha/r (PEFT's use_rslora).",
    ),
    init_lora_weights: str | None = typer.Option(
        None,
        "--init-lora-weights",
        rich_help_panel=SHORTHAND,
        help="With "
        "--target-modules: true (kaiming, B = 0), gaussian, or loftq (start from the "
        "base's quantization error; needs --quantize), as PEFT.",
    ),
    use_dora: bool = typer.Option(
        False,
        "--use-dora",
        rich_help_panel=SHORTHAND,
        help="With --target-modules: DoRA, a trained magnitude per output (PEFT's use_dora; linear layers).",
    ),
    quantize: str | None = typer.Option(
        None,
        "--quantize",
        rich_help_panel=SHORTHAND,
        help="With --target-modules: none, int8, nf4 or fp4 "
        "for every other linear layer and the adapted ones' base (default none).",
    ),
    gradient_checkpointing: bool = typer.Option(
        False,
        "--gradient-checkpointing",
        rich_help_panel=SCHEDULE,
        help="Recompute each decoder "
        "layer's activations in backward instead of keeping them: less "
        "memory, about a third more compute.",
    ),
    report_to: str = typer.Option(
        "none",
        "--report-to",
        rich_help_panel=OUTPUT,
        help="Experiment trackers, one run "
        "per job: tensorboard, wandb, mlflow (comma-separated) or none; runs kept in OUT.",
    ),
    compile_: bool = typer.Option(
        False,
        "--compile",
        rich_help_panel=SCHEDULE,
        help="torch.compile each fine-tune's forward (fp, int8, nf4 bases; the first steps compile).",
    ),
    compile_backend: str = typer.Option(
        "inductor", "--compile-backend", rich_help_panel=SCHEDULE, help="With --compile: a torch.compile backend."
    ),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        rich_help_panel=OUTPUT,
        help="Move an earlier run in --out aside (to OUT.replaced-N, nothing deleted) when training starts.",
    ),
    logging_steps: int = typer.Option(
        LOGGING_STEPS,
        "--logging-steps",
        min=1,
        rich_help_panel=OUTPUT,
        help="When stdout is no terminal (a log file, a pipe, a scheduler): a progress line per job every N "
        "steps, and at its first and last step and every eval (a terminal shows a progress bar).",
    ),
    random_init: bool = RANDOM_INIT_OPT,
    tokenizer_name: str | None = TOKENIZER_OPT,
    device: str = DEVICE_OPT,
    device_map: str | None = DEVICE_MAP_OPT,
    max_memory: str | None = MAX_MEMORY_OPT,
    attn_implementation: str | None = ATTN_OPT,
):
    """Train one fine-tune, or several on one shared base in one process; torchrun gives DDP.

    Example: surgery train lora_plus_head --model tiny-opt --data capitals --out runs/caps --max-steps 100 --lr 1e-2

    Example (a one-off LoRA without a rule file): surgery train --target-modules q_proj,v_proj --lora-r 16
    --lora-alpha 32 --quantize nf4 --model tiny-llama --data upper --out runs/up --max-steps 50

    Example (two fine-tunes sharing each base pass): surgery train --model tiny-llama --out runs --batched
    --job caps=lora_plus_head,capitals --job up=qv_lora,upper --max-steps 50

    Example (on a GPU, the nf4 base quantized as it loads): surgery train qlora_nf4 --model ./Llama-3.1-8B --data
    chat.jsonl --chat-template --out runs/chat --device cuda --gradient-checkpointing

    Example (the base sharded over 2 processes): torchrun --nproc_per_node 2 -m surgery_cli.app train qlora_nf4
    --model tiny-llama --data upper --out runs/up --fsdp --max-steps 50
    """
    quiet_libraries()
    from surgery.base.loading import load_model, load_tokenizer
    from surgery.distributed import world
    from surgery.finetune.sharding import check_sharding, refuse_unshardable_rules, shard_base
    from surgery.package import install_hint
    from surgery.planning.report import training_summary
    from surgery.rules.rule_file import load_rules, read_extra_tokens, with_extra_tokens
    from surgery.train.batched_train import check_batching
    from surgery.train.checkpoint import ADAPTER_FILE, STATE_FILE, check_output_folder, latest_checkpoint
    from surgery.train.data import Fields
    from surgery.train.job import TrainConfig, make_job
    from surgery.train.rows import DatasetParts
    from surgery.train.trackers import parse_report_to

    shorthand = _shorthand_rules(
        rules, job, target_modules, lora_r, lora_alpha, lora_dropout, quantize, use_rslora, use_dora, init_lora_weights
    )
    specs = [(None, shorthand or rules, data)] if rules or data or shorthand else []
    specs += [_parse_job(j) for j in job]
    if not specs or any(r is None or d is None for _, r, d in specs):
        raise typer.BadParameter("give RULES with --data, or one or more --job NAME=RULES,DATA")
    specs = [(n, load_rules(r), d) for n, r, d in specs]  # each rule file read once, every error before loading
    if extra_tokens is not None:
        tokens = read_extra_tokens(extra_tokens)
        specs = [(n, with_extra_tokens(r, tokens, str(extra_tokens)), d) for n, r, d in specs]
        shorthand = specs[0][1] if shorthand is not None else None
    first_rules = specs[0][1]
    name, why = model_for(first_rules, model)
    config = TrainConfig(
        batch_size,
        grad_accum,
        lr,
        epochs,
        max_steps,
        warmup,
        schedule,
        weight_decay,
        max_grad_norm or None,
        seed,
        precision,
        optimizer,
        eval_steps,
        save_steps,
        save_total_limit,
        gradient_checkpointing,
        early_stopping_patience,
        early_stopping_threshold,
        compile_,
        compile_backend,
    )
    config.check()
    trackers = parse_report_to(report_to)
    check_batching(batched, max_batched_tokens, gradient_checkpointing, compile_, [r for _, r, _ in specs])
    check_sharding(fsdp, batched, device_map)
    if fsdp:
        refuse_unshardable_rules(name, [r for _, r, _ in specs])
    placed = placement(device, device_map, max_memory, attn_implementation)
    where = world()
    if where.main:  # every output folder is checked before anything is loaded
        for job_name, _, _ in specs:
            check_output_folder(out if job_name is None else out / job_name, resume=resume, overwrite=overwrite)
    # quantized once for every job, as it loads, on the device each process computes on
    base = load_model(name, random_init=random_init, rules=[r for _, r, _ in specs], **placed).model
    tokenizer = load_tokenizer(tokenizer_name or name)
    if fsdp:
        shard_base(base)
    jobs = []
    for job_name, job_rules, job_data in specs:
        folder = out if job_name is None else out / job_name
        jobs.append(
            make_job(
                base,
                job_name or ("lora" if shorthand else job_rules.name),
                job_rules,
                job_data,
                tokenizer,
                config,
                out=folder,
                eval_data=eval_file,
                eval_split=eval_split,
                mode="corpus" if group_texts else "entries",
                block_size=block_size,
                pad_token_id=pad_token_id,
                model_name=name,
                chat_template=chat_template,
                packing=packing,
                fields=Fields(text_field, prompt_field, completion_field, messages_field),
                parts=DatasetParts(dataset_config, dataset_train_split, dataset_test_split),
            )
        )
    resume_from = {}
    if resume is not None:
        if (resume / STATE_FILE).exists():
            if len(jobs) > 1:
                raise typer.BadParameter("--resume with several jobs takes the run's --out folder")
            resume_from[jobs[0].name] = resume
        else:
            for (job_name, _, _), j in zip(specs, jobs):
                folder = resume if job_name is None else resume / job_name  # the earlier run's --out, as written
                found = latest_checkpoint(folder) if folder.is_dir() else None
                if found is None:
                    raise typer.BadParameter(f"--resume {resume}: no checkpoint-N folder for job {j.name} in {folder}")
                resume_from[j.name] = found
    if where.main:
        say(
            "model: ",
            (name, "bold"),
            f" (from {why}); {len(jobs)} fine-tune{'s' if len(jobs) > 1 else ''}"
            f"{f' x {where.size} processes' if where.size > 1 else ''}"
            f"{', base sharded with FSDP2' if fsdp else ''}; {where_text(placed)}",
        )
    runs = run_with_progress(
        jobs,
        resume_from,
        show=where.main,
        batched=batched,
        max_batched_tokens=max_batched_tokens,
        overwrite=overwrite,
        report_to=trackers,
        log_dir=out,
        logging_steps=logging_steps,
    )
    if not where.main:
        return
    console.print(training_summary(runs, ADAPTER_FILE))
    if shorthand is not None:
        console.print(
            f"rules: {_record_rules(shorthand, out)} (what the flags stood for; train the same way with "
            f"`surgery train {out / 'rules.yaml'} ...`)",
            highlight=False,
            markup=False,
        )
    png = plot_losses(runs, out / "loss.png")
    console.print(
        f"loss curve: {png}" if png else f"loss curve: not drawn ({install_hint('plot')} for matplotlib)",
        highlight=False,
        markup=False,
    )


def _shorthand_rules(rules, job, target_modules, r, alpha, dropout, quantize, use_rslora, use_dora, init):
    """The RuleSet that --target-modules and its companions stand for, or None when they are not given."""
    given = {
        "--lora-r": r,
        "--lora-alpha": alpha,
        "--lora-dropout": dropout,
        "--quantize": quantize,
        "--use-rslora": use_rslora or None,
        "--use-dora": use_dora or None,
        "--init-lora-weights": init,
    }
    if target_modules is None:
        stray = [flag for flag, value in given.items() if value is not None]
        if stray:
            raise typer.BadParameter(
                f"{stray[0]} belongs with --target-modules (a one-off LoRA); with a rule file, write it there"
            )
        return None
    if rules is not None or job:
        raise typer.BadParameter("--target-modules replaces RULES and --job: give one of them")
    from surgery.rules.rule_file import shorthand_rules

    return shorthand_rules(
        target_modules.split(","),
        r=8 if r is None else r,
        alpha=alpha,
        dropout=dropout or 0.0,
        quantize=quantize or "none",
        use_rslora=use_rslora,
        use_dora=use_dora,
        init_lora_weights={"true": True}.get(init, init) if init else True,
    )


def _record_rules(rules, out: Path) -> Path:
    """OUT/rules.yaml: the rule file a shorthand run used, next to its adapter."""
    import yaml

    from surgery.disk import atomic_write
    from surgery.errors import TrainError

    text = f"# {rules.description}\n" + yaml.safe_dump(rules.to_dict(), sort_keys=False)
    atomic_write(out / "rules.yaml", text.encode(), error=TrainError)
    return out / "rules.yaml"
