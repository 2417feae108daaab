"""Commands about adapter files: adapter show, merge, export-peft, import-peft."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .common import (
    ADAPTER_ARG,
    BASE_OPT,
    DEVICE_OPT,
    OVERWRITE_OPT,
    RANDOM_INIT_OPT,
    DeviceConfig,
    console,
    finetune_from,
    probe_inputs,
    quiet_libraries,
    say,
)


def adapter_show(
    adapter: Path = typer.Argument(
        ..., help="Adapter file, adapter folder (save_pretrained, a Trainer checkpoint) or PEFT folder (export-peft)."
    ),
    show_all: bool = typer.Option(False, "--all", help="List every tensor (default: the first 40)."),
):
    """Show an adapter: metadata, base fingerprint, rules (or PEFT config), and its tensors with sizes.

    Example: surgery adapter show runs/qv.safetensors
    """
    import yaml

    from surgery.files.adapter_file import ADAPTER_FILE, read_adapter
    from surgery.files.peft_format import CONFIG_FILE, read_peft_folder
    from surgery.planning.report import adapter_tables, peft_tables

    if adapter.is_dir() and not (adapter / ADAPTER_FILE).exists() and (adapter / CONFIG_FILE).exists():
        for table in peft_tables(read_peft_folder(adapter), show_all):
            console.print(table)
        return
    info = read_adapter(adapter)
    meta, tensors = adapter_tables(info, show_all)
    console.print(meta)
    say(("rules", "bold"), " (stored in the file; they rebuild the fine-tune):")
    console.print(yaml.safe_dump(info.rules.to_dict(), sort_keys=False), highlight=False, markup=False)
    console.print(tensors)


LARGE_REQUANTIZATION_ERROR = 0.05  # relative to the largest logit: beyond it, --report-requantized explains


def merge(
    adapter: Path = ADAPTER_ARG,
    model: str | None = BASE_OPT,
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the merged model (save_pretrained format)."),
    dtype: str | None = typer.Option(None, "--dtype", help="float32, float16 or bfloat16 (default: the base's)."),
    report_requantized: bool = typer.Option(
        False, "--report-requantized", help="Also measure the error of requantizing the merged weights."
    ),
    overwrite: bool = OVERWRITE_OPT,
    random_init: bool = RANDOM_INIT_OPT,
    device: str = DEVICE_OPT,
):
    """Fold an adapter into its base and save a plain transformers model (no surgery needed to load it).

    Example: surgery merge runs/qv.safetensors --out merged/
    """
    quiet_libraries()
    import torch

    from surgery.base.loading import load_tokenizer
    from surgery.disk import atomic_folder, check_new_folder
    from surgery.errors import AdapterStateError, SurgeryError
    from surgery.files.model_card import CARD_FILE, merged_card
    from surgery.finetune.merging import merge as merge_ft
    from surgery.finetune.merging import output_error
    from surgery.finetune.vocabulary import extended_tokenizer
    from surgery.layers.bnb import base_loading
    from surgery.rules.ruleset import DTYPES

    if dtype not in (None, *DTYPES):
        raise typer.BadParameter(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    check_new_folder(out, overwrite=overwrite, error=AdapterStateError)  # before the model loads
    devices = DeviceConfig(device=device)
    base, ft, name = finetune_from(adapter, model, random_init, devices.placement())
    say("model: ", (name, "bold"), f"; {devices.describe()}")
    merged = merge_ft(ft, getattr(torch, dtype) if dtype else None)
    inputs = probe_inputs(base)
    error = output_error(ft, merged, inputs)
    tokenizer, no_tokenizer = None, ""
    try:
        tokenizer = extended_tokenizer(ft, load_tokenizer(name))  # with the fine-tune's own tokens, if any
    except SurgeryError as exc:
        no_tokenizer = str(exc)
    merged_dtype = next(merged.parameters()).dtype
    with atomic_folder(out, overwrite=overwrite, error=AdapterStateError) as tmp:
        merged.save_pretrained(tmp)  # with its generation config
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)  # so AutoTokenizer.from_pretrained(out) works (chat template included)
        (tmp / CARD_FILE).write_text(merged_card(ft, str(adapter), merged_dtype, error))
    table = Table(title=f"merged {adapter} into {name}")
    table.add_column("")
    table.add_column("max |Δlogits|", justify="right")
    table.add_column("relative", justify="right")
    table.add_row("merged vs fine-tune", f"{error['max_abs']:.3g}", f"{error['max_rel']:.3g}")
    if report_requantized:
        added = output_error(merged, merge_ft(ft, requantize=True), inputs)
        table.add_row("requantized vs merged", f"{added['max_abs']:.3g}", f"{added['max_rel']:.3g}")
    console.print(table)
    if report_requantized and added["max_rel"] > LARGE_REQUANTIZATION_ERROR:
        console.print(
            f"note: requantizing moves the logits by {added['max_rel']:.1%} of the largest one (the merge "
            f"itself: {error['max_rel']:.1%}): quantizing the merged weights again re-rounds every weight "
            "of the adapted layers. Serve this fine-tune merged in 16/32-bit (this folder, or --dtype "
            "bfloat16) or unmerged on its quantized base, not requantized.",
            highlight=False,
            markup=False,
        )
    dtype_name = str(merged_dtype).removeprefix("torch.")
    console.print(
        f"wrote {out}: a plain {dtype_name} model, load it with AutoModelForCausalLM.from_pretrained("
        f"{str(out)!r}) and no quantization_config (see its README.md)",
        highlight=False,
        markup=False,
    )
    console.print(f"the fine-tune's base: {base_loading(base).note(name)}", highlight=False, markup=False)
    if no_tokenizer:
        console.print(f"no tokenizer written: {no_tokenizer}", highlight=False, markup=False)


def export_peft_cmd(
    adapter: Path = ADAPTER_ARG,
    model: str | None = BASE_OPT,
    out: Path = typer.Option(..., "--out", "-o", help="Folder for adapter_config.json + adapter_model.safetensors."),
    target: str = typer.Option(
        "peft",
        "--for",
        help="peft, vllm or lorax: first check that this server loads the "
        "export as it is (nothing is written when it would not).",
    ),
    overwrite: bool = OVERWRITE_OPT,
    random_init: bool = RANDOM_INIT_OPT,
    device: str = DEVICE_OPT,
):
    """Write an adapter in PEFT's format (loads with peft.PeftModel.from_pretrained; --for vllm/lorax to serve it).

    Example: surgery export-peft runs/qv.safetensors --out qv-peft/

    Example (checked against vLLM's loading rules): surgery export-peft runs/qv.safetensors --out qv-vllm/ --for vllm
    """
    from surgery.files.serving import check_target

    check_target(target)  # before anything loads
    quiet_libraries()
    from surgery.disk import atomic_folder, check_new_folder
    from surgery.errors import AdapterStateError
    from surgery.files.peft_format import export_peft
    from surgery.files.serving import launch_hints
    from surgery.layers.bnb import base_loading

    check_new_folder(out, overwrite=overwrite, error=AdapterStateError)  # before the model loads
    base, ft, name = finetune_from(adapter, model, random_init, DeviceConfig(device=device).placement())
    with atomic_folder(out, overwrite=overwrite, error=AdapterStateError) as tmp:
        export_peft(ft, tmp, target=target)
    console.print(f"wrote {out}: PeftModel.from_pretrained(base, {str(out)!r}) on a base of {name}", highlight=False)
    console.print(base_loading(base).note(name), highlight=False, markup=False)
    if target == "vllm":
        import json

        config = json.loads((out / "adapter_config.json").read_text())
        console.print(
            f"serve with: vllm serve {name} {' '.join(launch_hints(config, target))} --lora-modules ADAPTER_NAME={out}",
            highlight=False,
            markup=False,
        )
    elif target == "lorax":
        console.print(
            f"serve with: lorax-launcher --model-id {name}; request with adapter_id={out} (adapter_source local)",
            highlight=False,
            markup=False,
        )


def import_peft_cmd(
    folder: Path = typer.Argument(..., help="PEFT LoRA adapter folder (adapter_config.json + weights)."),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Base model (default: base_model_name_or_path of the adapter)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Adapter file to write (.safetensors)."),
    quantize: str | None = typer.Option(None, "--quantize", help="Store the base as int8, nf4, fp4 or none."),
    random_init: bool = RANDOM_INIT_OPT,
    device: str = DEVICE_OPT,
):
    """Read a PEFT LoRA adapter onto its base and save it as a surgery adapter file.

    Example: surgery import-peft qv-peft/ --out qv.safetensors --quantize int8
    """
    quiet_libraries()
    from surgery.base.loading import load_model
    from surgery.files.adapter_file import save_adapter
    from surgery.files.peft_format import peft_base_model
    from surgery.finetune.loading import import_peft
    from surgery.rules.ruleset import SCHEMES

    if quantize not in (None, *SCHEMES):
        raise typer.BadParameter(f"--quantize must be one of {', '.join(SCHEMES)}, not {quantize!r}")
    where = DeviceConfig(device=device).placement()
    name = model or peft_base_model(folder)
    if not name:
        raise typer.BadParameter("the adapter names no base model (base_model_name_or_path); pass --model")
    base = load_model(name, random_init=random_init, **where).model
    ft = import_peft(base, folder, quantize=quantize)
    path = save_adapter(ft, out)
    console.print(f"wrote {path} ({path.stat().st_size:,} bytes) for {name}", highlight=False)
