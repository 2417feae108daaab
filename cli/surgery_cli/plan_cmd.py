"""`surgery plan`: what the rules do to a model, its exact memory, and whether a training run fits a device."""

from __future__ import annotations

import json

import typer

from surgery.devices import DeviceConfig
from surgery.errors import TrainError
from surgery.planning.training_memory import TrainingShape, training_peak
from surgery.planning.training_memory import max_context as planned_context
from surgery.training.config import DataConfig, TrainConfig

from .common import MODEL_OPT, NO_CACHE_OPT, RULES_ARG, console, model_for, quiet_libraries, say
from .options import with_configs

TRAINING_PANEL = "Training run (predicted peak per device)"


PLAN_TRAINING = (
    "batch_size",
    "precision",
    "optimizer",
    "gradient_checkpointing",
    "loss_chunk_tokens",
    "mlp_chunk_tokens",
    "offload_activations",
    "fsdp",
)


@with_configs(
    training=(TrainConfig, PLAN_TRAINING),
    data_config=(DataConfig, ("block_size",)),
    devices=(DeviceConfig, ("device", "device_map", "max_memory", "attn_implementation")),
)
def plan(
    ctx: typer.Context,
    rules: str = RULES_ARG,
    model: str | None = MODEL_OPT,
    finetunes: int = typer.Option(1, "--finetunes", "-n", min=1, help="Fine-tunes to plan memory for."),
    world_size: int = typer.Option(
        1, "--world-size", "-w", min=1, help="Processes of the launch (torchrun): memory per device."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    no_cache: bool = NO_CACHE_OPT,
    device_memory: str | None = typer.Option(
        None,
        "--device-memory",
        rich_help_panel=TRAINING_PANEL,
        help="Memory of one GPU (e.g. 24GiB): predict a training run's peak and say whether it fits.",
    ),
    max_context: bool = typer.Option(
        False,
        "--max-context",
        rich_help_panel=TRAINING_PANEL,
        help="With --device-memory: the longest --block-size that fits, the options that make it fit and each term "
        "of its peak.",
    ),
    training: TrainConfig = TrainConfig(),
    data_config: DataConfig = DataConfig(),
    devices: DeviceConfig = DeviceConfig(),
):
    """Decide every module of MODEL by RULES, check every constraint, and show memory for N fine-tunes; with
    --device-memory or any training option, the predicted peak of a training run on each device and whether it
    fits. The training options are surgery train's, and the plan refuses what train would.

    Example: surgery plan qv_lora --model facebook/opt-1.3b --finetunes 8

    Example (per GPU, 70B in nf4 over 4 GPUs): surgery plan qlora_nf4 --model meta-llama/Llama-3.1-70B -w 4 --fsdp

    Example (does QLoRA of an 8B model fit a 16 GB card?): surgery plan qlora_nf4 --model meta-llama/Llama-3.1-8B
    --device cuda --device-memory 16GiB --batch-size 1 --block-size 2048 --precision bf16 --gradient-checkpointing

    Example (how long can a row be?): surgery plan qlora_r32 --model meta-llama/Llama-3.1-8B --device-memory 16GiB
    --batch-size 1 --precision bf16 --max-context
    """
    quiet_libraries()
    from surgery.base.loading import graph_of, target_rules
    from surgery.devices import parse_size
    from surgery.planning.decisions import plan as make_plan
    from surgery.planning.report import per_device, per_device_table
    from surgery.rules.rule_file import load_rules

    ruleset = load_rules(rules)
    name, why = model_for(ruleset, model)
    budget = parse_size(device_memory, "--device-memory") if device_memory is not None else None
    if max_context and budget is None:
        raise TrainError(
            "--max-context does nothing without --device-memory: it finds the longest block size that fits one "
            "device; add --device-memory (e.g. 16GiB)"
        )
    cuda, assumed = _planned_device(devices.device, budget)
    planned_rules = target_rules(ruleset, cuda)
    graph = graph_of(name, use_cache=not no_cache)
    result = make_plan(graph, planned_rules, finetunes=finetunes, check=False)
    _refuse_like_train(training, data_config, devices, world_size, ruleset, result)
    devices_table = world_size > 1 or training.fsdp
    placed = _placed_bytes(result, name, devices) if devices.device_map or devices.max_memory else None
    given = {key for key in (*PLAN_TRAINING, "block_size", "attn_implementation") if _typed(ctx, key)}
    wants_peak = budget is not None or bool(given - {"fsdp"})
    shape = (
        TrainingShape.from_configs(
            training, data_config, devices, cuda=cuda, finetunes=finetunes, world_size=world_size
        )
        if wants_peak
        else None
    )
    layout = _layout(name) if shape is not None else None
    if max_context:
        from surgery.training.data import model_max_length  # torch: only where a training run is planned
    answer = (
        planned_context(result, layout, shape, budget, model_limit=model_max_length(layout)) if max_context else None
    )
    peak = training_peak(result, layout, shape) if shape is not None and answer is None else None
    assumption = _assumption(shape, assumed, "batch_size" not in given, training.batch_size) if shape else ""
    if as_json:
        extra = {"per_device": per_device(result, world_size, training.fsdp)} if devices_table else {}
        if peak is not None:
            extra["training_peak"] = {
                **{label: value for label, value, _ in peak.rows()},
                "total": peak.total,
                "host_bytes": peak.host,
                "device_memory": budget,
                "fits": None if budget is None else peak.total <= budget,
                "assumes": assumption,
            }
        if answer is not None:
            extra["max_context"] = {**answer.to_dict(), "device_memory": budget, "assumes": assumption}
        if placed is not None:
            extra["base_bytes_by_device"] = placed
        print(json.dumps({**result.to_dict(), **extra}, indent=2))
    else:
        if why != "--model":
            say("model: ", (name, "bold"), f" (from {why})")
        console.print(result)
        console.print(f"4-bit compute dtype: {_compute_text(result)}", highlight=False)
        if devices_table:
            console.print(per_device_table(result, world_size, training.fsdp))
        if placed is not None:
            from surgery.planning.memory import fmt_bytes

            console.print(
                f"base per device (--device-map {devices.device_map}, transformers' placement): "
                + ", ".join(f"{device}: {fmt_bytes(n)}" for device, n in placed.items()),
                highlight=False,
            )
        if shape is not None:
            console.print(f"training verdict for {assumption}", highlight=False)
        if peak is not None:
            _print_peak(peak, shape, budget, result)
        if answer is not None:
            _print_context(answer, budget)
    if result.violations:
        result.check()


def _refuse_like_train(training, data_config, devices, world_size: int, ruleset, result) -> None:
    """What ``surgery train`` refuses for this run, with its words: the same table, the same features (what the rules
    really store, under --fsdp)."""
    from surgery.combinations import check, rule_features, run_features

    present = run_features(training, data_config, devices, processes=world_size)
    features = rule_features(ruleset, result if training.fsdp else None)
    present.update({k: v for k, v in features.items() if k not in present})
    check(present)


def _typed(ctx: typer.Context, name: str) -> bool:
    """Whether the option was given on the command line (not its default)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name != "DEFAULT"


def _planned_device(spec: str, budget: int | None) -> tuple[bool, str]:
    """(plans a CUDA run, why): cpu and cuda as written; auto is CUDA with --device-memory (a GPU's memory) or
    where this machine has a GPU, else the CPU."""
    from surgery.devices import cuda_available, parse_device

    kind, _ = parse_device(spec)
    if kind != "auto":
        return kind == "cuda", f"--device {spec}"
    if budget is not None:
        return True, "--device auto with --device-memory: a GPU run is assumed; --device cpu plans the CPU"
    return (True, "--device auto: this machine has a GPU") if cuda_available() else (False, "--device auto: no GPU")


def _assumption(shape, why: str, default_batch: bool, batch: int) -> str:
    """The line saying what the verdict assumes: device, precision, 4-bit compute, batch size."""
    four_bit = "bf16" if shape.device == "cuda" else "the input's dtype"
    batch_text = f"; batch size {batch} (surgery train's default; --batch-size to change)" if default_batch else ""
    return (
        f"{shape.describe()}, a 4-bit base computing in {four_bit} unless the rule file names a compute dtype "
        f"({why}){batch_text}"
    )


def _layout(name: str):
    from surgery.base.loading import load_model

    return load_model(name, weights=False).model  # meta: the activations are counted without memory


def _compute_text(result) -> str:
    dtypes = sorted(
        {d.quant.compute_dtype or "the input's dtype" for d in result.quantized if d.quant.scheme in ("nf4", "fp4")}
    )
    return ", ".join(dtypes) if dtypes else "none (no 4-bit layer)"


def _placed_bytes(result, name, devices: DeviceConfig) -> dict[str, int]:
    from surgery.base.quantizer import device_of, planned_device_map
    from surgery.planning.memory import base_bytes_by_device

    if devices.device_map is None or devices.max_memory is None:
        raise typer.BadParameter(
            "plan --device-map takes auto or balanced, with --max-memory (e.g. 0=20GiB,1=20GiB):"
            " the plan may run where those GPUs are not"
        )
    where = planned_device_map(_layout(name), result, devices.memory_map, balanced=devices.device_map == "balanced")
    return base_bytes_by_device(result.graph, result.decisions, device_of(where))


def _print_peak(peak, shape, budget, result) -> None:
    from surgery.planning.memory import fmt_bytes
    from surgery.planning.training_memory import peak_table

    how = (
        f"{shape.batch_size} x {shape.block_size} tokens, {shape.precision}, {shape.optimizer}"
        f"{', gradient checkpointing' if shape.gradient_checkpointing else ''}"
        f"{f', {shape.finetunes} fine-tunes' if shape.finetunes > 1 else ''}"
    )
    console.print(peak_table(peak, budget, shape, f"training peak per device: {how}"))
    four_bit = bool(result.quantized) and all(d.quant.scheme in ("nf4", "fp4") for d in result.quantized)
    if peak.host:
        console.print(f"pinned host memory for the offloaded layer inputs: {fmt_bytes(peak.host)}", highlight=False)
    for tip in peak.advice(budget, shape, four_bit) if budget is not None else []:
        console.print(f"  to fit: {tip}", highlight=False)


def _print_context(answer, budget: int) -> None:
    from surgery.planning.memory import fmt_bytes
    from surgery.planning.training_memory import peak_table

    if answer.tokens == 0:
        console.print(
            f"no block size fits {fmt_bytes(budget)}: one token's run needs {fmt_bytes(answer.peak.total)}",
            highlight=False,
        )
        for tip in answer.peak.advice(budget, answer.shape):
            console.print(f"  to fit: {tip}", highlight=False)
        return
    title = f"training peak per device at the longest block size, {answer.tokens:,} tokens"
    console.print(peak_table(answer.peak, budget, answer.shape, title))
    if answer.limited_by_model:
        console.print(
            f"longest block size: {answer.tokens:,} tokens per row, where the model's positions end (the memory "
            f"would allow {answer.memory_tokens:,}; surgery train refuses a longer --block-size)",
            highlight=False,
        )
    else:
        console.print(
            f"longest block size: {answer.tokens:,} tokens per row ({answer.tokens + 1:,} need "
            f"{answer.next_peak.total:,} bytes, over the {budget:,})",
            highlight=False,
        )
    added = f" (added: {', '.join(answer.added)})" if answer.added else ""
    console.print(f"train with: {answer.flags()}{added}", highlight=False)
    if answer.peak.host:
        console.print(
            f"pinned host memory for the offloaded layer inputs: {fmt_bytes(answer.peak.host)}", highlight=False
        )
