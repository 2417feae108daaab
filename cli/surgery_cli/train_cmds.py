"""`surgery train`: one fine-tune, several on one base, DDP or FSDP2 under torchrun (what it shows: progress.py).

Its options are the fields of the library's configs (``TrainConfig``, ``DataConfig``, ``LoraShorthand``,
``DeviceConfig``, ``TrackerConfig``); the run itself is ``surgery.train``.
"""

from __future__ import annotations

from pathlib import Path

import typer

from surgery.devices import DeviceConfig
from surgery.rules.shorthand import LoraShorthand
from surgery.training.config import DataConfig, TrackerConfig, TrainConfig

from .common import MODEL_OPT, RANDOM_INIT_OPT, TOKENIZER_OPT, console, quiet_libraries, say
from .options import with_configs
from .progress import plot_losses, progress_display

DATA = "Data"
OUTPUT = "Output"


@with_configs(
    training=TrainConfig, data_config=DataConfig, lora=LoraShorthand, devices=DeviceConfig, trackers=TrackerConfig
)
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
        help="Training data: .csv (a text column; quoted fields may span lines), .jsonl (text, prompt+completion or "
        "messages), .txt (one example per line; with --group-texts one running text), .parquet, .arrow, a datasets "
        "save_to_disk folder, a dataset name from the local datasets cache (never downloaded), or a bundled set "
        "(capitals, upper, reverse).",
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", rich_help_panel=OUTPUT, help="Output folder (one subfolder per --job)."
    ),
    job: list[str] = typer.Option(
        [],
        "--job",
        rich_help_panel=DATA,
        help="NAME=RULES,DATA: one more fine-tune on the same base (repeatable; all train in this process on one "
        "shared base).",
    ),
    resume: Path | None = typer.Option(
        None,
        "--resume",
        rich_help_panel="Checkpoints",
        help="A checkpoint folder, or the --out folder of a run (each job resumes from its newest checkpoint).",
    ),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        rich_help_panel=OUTPUT,
        help="Move an earlier run in --out aside (to OUT.replaced-N, nothing deleted) when training starts.",
    ),
    random_init: bool = RANDOM_INIT_OPT,
    tokenizer_name: str | None = TOKENIZER_OPT,
    training: TrainConfig = TrainConfig(),
    data_config: DataConfig = DataConfig(),
    lora: LoraShorthand = LoraShorthand(),
    devices: DeviceConfig = DeviceConfig(),
    trackers: TrackerConfig = TrackerConfig(),
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
    import surgery
    from surgery.distributed import world
    from surgery.files.adapter_file import ADAPTER_FILE
    from surgery.package import install_hint
    from surgery.planning.report import training_summary
    from surgery.training.run import JobSpec

    main = world().main
    with progress_display(show=main, logging_steps=training.logging_steps) as display:
        runs = surgery.train(
            model,
            rules,
            data=data,
            out=out,
            jobs=[JobSpec.parse(spec) for spec in job],
            training=training,
            data_config=data_config,
            lora=lora,
            devices=devices,
            trackers=trackers,
            tokenizer=tokenizer_name,
            resume=resume,
            overwrite=overwrite,
            random_init=random_init,
            on_start=_announce if main else None,
            on_step=display.on_step if display is not None else None,
        )
    if not main:
        return
    console.print(training_summary(runs, ADAPTER_FILE))
    if lora.given:
        say(
            f"rules: {out / 'rules.yaml'} (what the flags stood for; train the same way with "
            f"`surgery train {out / 'rules.yaml'} ...`)"
        )
    png = plot_losses(runs, out / "loss.png")
    say(f"loss curve: {png}" if png else f"loss curve: not drawn ({install_hint('plot')} for matplotlib)")


def _announce(start) -> None:
    jobs = len(start.jobs)
    say(
        "model: ",
        (start.model, "bold"),
        f" (from {start.source}); {jobs} fine-tune{'s' if jobs > 1 else ''}"
        f"{f' x {start.processes} processes' if start.processes > 1 else ''}"
        f"{', base sharded with FSDP2' if start.fsdp else ''}; {start.devices.describe()}",
    )
    for job, checkpoint in start.resumed:
        say(f"resuming {job} from {checkpoint}")
