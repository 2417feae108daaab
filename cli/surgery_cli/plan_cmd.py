"""`surgery plan`: what the rules do to a model, its exact memory, and whether a training run fits a device."""

from __future__ import annotations

import json

import typer

from .common import MODEL_OPT, NO_CACHE_OPT, RULES_ARG, console, model_for, quiet_libraries, say

TRAINING_PANEL = "Training run (predicted peak per device)"


def plan(
    rules: str = RULES_ARG,
    model: str | None = MODEL_OPT,
    finetunes: int = typer.Option(1, "--finetunes", "-n", min=1, help="Fine-tunes to plan memory for."),
    world_size: int = typer.Option(1, "--world-size", "-w", min=1, help="Devices of the launch: memory per device."),
    fsdp: bool = typer.Option(False, "--fsdp", help="Per device with the base sharded by FSDP2 (train --fsdp)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    no_cache: bool = NO_CACHE_OPT,
    device: str = typer.Option(
        "auto",
        "--device",
        rich_help_panel=TRAINING_PANEL,
        help="The device the run is "
        "for: cpu or cuda (nothing is checked: plan a GPU run anywhere); decides a 4-bit "
        "base's compute dtype (bf16 on CUDA unless the rule file names one).",
    ),
    device_memory: str | None = typer.Option(
        None,
        "--device-memory",
        rich_help_panel=TRAINING_PANEL,
        help="Memory of one GPU (e.g. 24GiB): say whether the run fits.",
    ),
    batch_size: int | None = typer.Option(
        None,
        "--batch-size",
        min=1,
        rich_help_panel=TRAINING_PANEL,
        help="Rows per micro-batch: predict the peak of a training run.",
    ),
    block_size: int = typer.Option(
        2048, "--block-size", min=1, rich_help_panel=TRAINING_PANEL, help="Tokens per row of that run."
    ),
    gradient_checkpointing: bool = typer.Option(
        False,
        "--gradient-checkpointing",
        rich_help_panel=TRAINING_PANEL,
        help="The run recomputes each decoder layer in backward.",
    ),
    optimizer: str = typer.Option("adamw", "--optimizer", rich_help_panel=TRAINING_PANEL, help="adamw or adamw8bit."),
    precision: str = typer.Option("bf16", "--precision", rich_help_panel=TRAINING_PANEL, help="fp32, bf16 or fp16."),
    attn_implementation: str = typer.Option(
        "sdpa",
        "--attn-implementation",
        rich_help_panel=TRAINING_PANEL,
        help="sdpa / flash_attention_2 (fused kernels) or eager.",
    ),
    device_map: str | None = typer.Option(
        None,
        "--device-map",
        rich_help_panel=TRAINING_PANEL,
        help="auto or balanced: the base's bytes on each device as transformers would place it (with --max-memory).",
    ),
    max_memory: str | None = typer.Option(
        None, "--max-memory", rich_help_panel=TRAINING_PANEL, help="With --device-map: e.g. 0=20GiB,1=20GiB,cpu=64GiB."
    ),
):
    """Decide every module of MODEL by RULES, check every constraint, and show memory for N fine-tunes; with
    --batch-size, the predicted peak of a training run on each device and whether it fits --device-memory.

    Example: surgery plan qv_lora --model facebook/opt-1.3b --finetunes 8

    Example (per GPU, 70B in nf4 over 4 GPUs): surgery plan qlora_nf4 --model meta-llama/Llama-3.1-70B -w 4 --fsdp

    Example (does QLoRA of an 8B model fit a 16 GB card?): surgery plan qlora_nf4 --model meta-llama/Llama-3.1-8B
    --device cuda --device-memory 16GiB --batch-size 1 --block-size 2048 --gradient-checkpointing
    """
    quiet_libraries()
    from surgery.base.loading import graph_of, target_rules
    from surgery.devices import cuda_available, parse_size
    from surgery.planning.decisions import plan as make_plan
    from surgery.planning.report import per_device, per_device_table
    from surgery.rules.rule_file import load_rules

    ruleset = load_rules(rules)
    name, why = model_for(ruleset, model)
    budget = parse_size(device_memory, "--device-memory") if device_memory else None
    cuda = device.startswith("cuda") or (device == "auto" and (budget is not None or cuda_available()))
    planned_rules = target_rules(ruleset, cuda)
    graph = graph_of(name, use_cache=not no_cache)
    result = make_plan(graph, planned_rules, finetunes=finetunes, check=False)
    devices = world_size > 1 or fsdp
    placed = _placed_bytes(result, name, device_map, max_memory) if device_map or max_memory else None
    peak = (
        _training_peak(
            result,
            name,
            cuda,
            batch_size,
            block_size,
            gradient_checkpointing,
            optimizer,
            precision,
            attn_implementation,
            finetunes,
            world_size,
            fsdp,
        )
        if batch_size
        else None
    )
    if as_json:
        extra = {"per_device": per_device(result, world_size, fsdp)} if devices else {}
        if peak is not None:
            extra["training_peak"] = {
                **{label: value for label, value, _ in peak[0].rows()},
                "total": peak[0].total,
                "device_memory": budget,
                "fits": None if budget is None else peak[0].total <= budget,
            }
        if placed is not None:
            extra["base_bytes_by_device"] = placed
        print(json.dumps({**result.to_dict(), **extra}, indent=2))
    else:
        if why != "--model":
            say("model: ", (name, "bold"), f" (from {why})")
        console.print(result)
        console.print(f"4-bit compute dtype: {_compute_text(result)}", highlight=False)
        if devices:
            console.print(per_device_table(result, world_size, fsdp))
        if placed is not None:
            from surgery.planning.memory import fmt_bytes

            console.print(
                f"base per device (--device-map {device_map}, transformers' placement): "
                + ", ".join(f"{device}: {fmt_bytes(n)}" for device, n in placed.items()),
                highlight=False,
            )
        if peak is not None:
            _print_peak(*peak, budget, result)
    if result.violations:
        result.check()


def _compute_text(result) -> str:
    dtypes = sorted(
        {d.quant.compute_dtype or "the input's dtype" for d in result.quantized if d.quant.scheme in ("nf4", "fp4")}
    )
    return ", ".join(dtypes) if dtypes else "none (no 4-bit layer)"


def _training_peak(
    result,
    name,
    cuda,
    batch_size,
    block_size,
    checkpointing,
    optimizer,
    precision,
    attention,
    finetunes,
    world_size,
    fsdp,
):
    from surgery.base.loading import load_model
    from surgery.planning.training_memory import TrainingShape, training_peak
    from surgery.training.config import OPTIMIZERS, PRECISIONS

    for flag, value, allowed in (
        ("--optimizer", optimizer, OPTIMIZERS),
        ("--precision", precision, PRECISIONS),
        ("--attn-implementation", attention, ("sdpa", "flash_attention_2", "eager")),
    ):
        if value not in allowed:
            raise typer.BadParameter(f"{flag} must be one of {', '.join(allowed)}, not {value!r}")
    shape = TrainingShape(
        batch_size,
        block_size,
        checkpointing,
        optimizer,
        precision,
        finetunes,
        world_size,
        fsdp,
        "math" if attention == "eager" else "fused",
    )
    layout = load_model(name, weights=False).model  # meta: the activations are counted without memory
    return training_peak(result, layout, shape, cuda=cuda), shape


def _placed_bytes(result, name, device_map, max_memory) -> dict[str, int]:
    from surgery.base.loading import load_model
    from surgery.base.quantizer import device_of, planned_device_map
    from surgery.devices import parse_max_memory
    from surgery.planning.memory import base_bytes_by_device

    if device_map not in ("auto", "balanced") or not max_memory:
        raise typer.BadParameter(
            "plan --device-map takes auto or balanced, with --max-memory (e.g. 0=20GiB,1=20GiB):"
            " the plan may run where those GPUs are not"
        )
    layout = load_model(name, weights=False).model
    where = planned_device_map(layout, result, parse_max_memory(max_memory), balanced=device_map == "balanced")
    return base_bytes_by_device(result.graph, result.decisions, device_of(where))


def _print_peak(peak, shape, budget, result) -> None:
    from surgery.planning.training_memory import peak_table

    how = (
        f"{shape.batch_size} x {shape.block_size} tokens, {shape.precision}, {shape.optimizer}"
        f"{', gradient checkpointing' if shape.gradient_checkpointing else ''}"
        f"{f', {shape.finetunes} fine-tunes' if shape.finetunes > 1 else ''}"
    )
    console.print(peak_table(peak, budget, shape, f"training peak per device: {how}"))
    four_bit = bool(result.quantized) and all(d.quant.scheme in ("nf4", "fp4") for d in result.quantized)
    for tip in peak.advice(budget, shape, four_bit) if budget is not None else []:
        console.print(f"  to fit: {tip}", highlight=False)
