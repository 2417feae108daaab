"""Fine-tunes from files: surgery's adapter files and PEFT LoRA folders loaded onto a base (or into a fine-tune).

The files stage reads and checks the files (``files.adapter_file.read_adapter``, ``files.peft_format``); this
module builds the fine-tune through ``rewrite``, so loading is atomic: any failure leaves the base and the
target fine-tune exactly as they were.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from ..base.ownership import finetune_info, own_state
from ..base.shared_base import base_graph
from ..errors import AdapterStateError, PlanError, RuleFileError
from ..files.adapter_file import ADAPTER_FILE, AdapterFile, check_base, read_adapter
from ..files.adapter_folder import check_peft_layout
from ..files.peft_format import PeftFolder, read_peft_import
from ..planning.decisions import plan as make_plan
from ..rules.ruleset import QuantConfig, RuleSet
from .rewriting import Finetune, rewrite


def load_adapter(model: nn.Module, path: str | Path | AdapterFile) -> Finetune:
    """Load an adapter file: onto a base (a new fine-tune from the file's rules) or into a fine-tune.

    Loading is strict (every key present, none extra, same shapes and dtypes) and atomic: on any
    AdapterStateError the base and the target fine-tune are exactly as before.

    Args:
        model: the base the file was saved from (a new fine-tune is made), or a fine-tune of it with the same rules
            (its own tensors are replaced).
        path: an adapter file, a folder ``save_pretrained`` wrote, or an ``AdapterFile`` read with ``read_adapter``.

    Returns:
        The fine-tune holding the file's tensors.

    Raises:
        AdapterStateError: the file is malformed, from another base, or does not fit.
    """
    adapter = path if isinstance(path, AdapterFile) else read_adapter(path)
    info = finetune_info(model)
    base = info.base if info is not None else model
    check_base(adapter, base)
    try:
        rules = held_storage_rules(adapter.rules, base)
        if info is not None:
            if info.rules.to_json() not in (adapter.rules.to_json(), rules.to_json()):
                raise AdapterStateError(
                    f"{adapter.path}: was saved from a fine-tune with other rules than this one "
                    f"({info.rules.source}); load it onto the base instead to rebuild it"
                )
            _copy_into(model, adapter)
            return model
        return rewrite(base, rules, finish=lambda ft: _fill_and_check(ft, adapter))
    except (PlanError, RuleFileError) as exc:
        raise AdapterStateError(f"{adapter.path}: its rules do not plan on this base: {exc}") from None


def _fill_and_check(finetune: nn.Module, adapter: AdapterFile) -> None:
    """Load the adapter's tensors; one loaded from a folder that also holds PEFT's layout must match it."""
    _copy_into(finetune, adapter)
    if adapter.path.name == ADAPTER_FILE:
        check_peft_layout(finetune, adapter)


def held_storage_rules(rules: RuleSet, base: nn.Module) -> RuleSet:
    """The rules with their storage following the base where it is already quantized.

    Adapter tensors do not depend on how the base is stored, so a file saved on an fp32 base loads
    onto the same checkpoint held as int8 or nf4: a rule (or the default) whose only conflict is how
    an already-quantized module is stored (C1: unquantized, frozen in full precision, another scheme or
    other settings) takes the scheme and settings the base holds (a ``freeze`` becomes a ``quantize``, which
    keeps the module frozen as held). The rules returned never quantize a module the given ones would not.
    """
    graph = base_graph(base)
    trial = make_plan(graph, rules, check=False)
    if not trial.violations or any(v.constraint != "C1" for v in trial.violations):
        return rules
    held: dict[int, QuantConfig | None] = {}  # per rule (0: the default), how the base holds what it decides
    for v in sorted(trial.violations, key=lambda v: trial.decisions[v.module].kind == "embedding"):
        decision = trial.decisions[v.module]
        held.setdefault(decision.rule.index if decision.rule else 0, graph.modules[v.module].held)
    if None in held.values():
        return rules
    new_rules = tuple(_as_held(r, held[r.index]) if r.index in held else r for r in rules.rules)
    default = "quantize" if 0 in held and rules.default == "freeze" else rules.default
    out = dataclasses.replace(rules, rules=new_rules, quantize=held.get(0, rules.quantize), default=default)
    again = make_plan(graph, out, check=False)  # the held settings must fit every module, and quantize nothing new
    new = {d.path for d in again.quantized} - {d.path for d in trial.quantized}
    return out if not again.violations and not new else rules


def _as_held(rule, quant: QuantConfig):
    """A rule that keeps what it matches as the base holds it: its storage the held one, a freeze a quantize."""
    return dataclasses.replace(rule, quantize=quant, action="quantize" if rule.action == "freeze" else rule.action)


def _copy_into(finetune: nn.Module, adapter: AdapterFile) -> None:
    """Check every key, shape and dtype first, then copy: a mismatch changes nothing."""
    own = own_state(finetune)
    unexpected = sorted(set(adapter.tensors) - set(own))
    missing = [name for name in own if name not in adapter.tensors]
    if unexpected or missing:
        parts = [
            f"{what} key '{keys[0]}'" + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else "")
            for what, keys in (("unexpected", unexpected), ("missing", missing))
            if keys
        ]
        raise AdapterStateError(
            f"{adapter.path}: {'; '.join(parts)} — the file does not match the fine-tune its rules build"
        )
    for name, p in own.items():
        t = adapter.tensors[name]
        if tuple(t.shape) != tuple(p.shape):
            raise AdapterStateError(
                f"{adapter.path}: '{name}' has shape {tuple(t.shape)} but the fine-tune needs {tuple(p.shape)}"
            )
        if t.dtype != p.dtype:
            raise AdapterStateError(f"{adapter.path}: '{name}' is {t.dtype} but the fine-tune holds {p.dtype}")
    with torch.no_grad():
        for name, p in own.items():
            p.copy_(adapter.tensors[name])


def import_peft(base: nn.Module, folder: str | Path | PeftFolder, *, quantize: str | None = None) -> Finetune:
    """A fine-tune of ``base`` with a PEFT LoRA adapter folder's weights, giving PEFT's outputs.

    Args:
        base: the model the folder's adapter was trained on (PEFT's ``base_model_name_or_path``).
        folder: a PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``), or one
            ``read_peft_folder`` has read.
        quantize: int8, nf4, fp4 or none for how the base is stored; by default it is kept as it is held.

    Returns:
        The fine-tune.

    Raises:
        AdapterStateError: the folder is malformed, for another base (a folder surgery exported names its base's
            fingerprint), or does not plan on this base; nothing changed.
    """
    read = read_peft_import(base, folder, quantize=quantize)
    values = dict(read.values)

    def fill(finetune: nn.Module) -> None:
        own = own_state(finetune)
        if read.tied_rows is not None:  # PEFT's one delta for an output layer tied to the embedding: both take it
            values.update({name: read.tied_rows for name in own if name.endswith(".extra_rows")})
        for name, p in own.items():
            t = values.get(name)
            if t is None or tuple(t.shape) != tuple(p.shape):
                why = "missing" if t is None else f"shape {tuple(t.shape)}, needs {tuple(p.shape)}"
                raise AdapterStateError(f"{read.folder}: no usable weights for '{name}' ({why})")
        extra = sorted(set(values) - set(own))
        if extra:
            raise AdapterStateError(f"{read.folder}: weights for '{extra[0]}', which the fine-tune does not have")
        with torch.no_grad():
            for name, p in own.items():
                p.copy_(values[name].to(p.dtype))

    try:
        return rewrite(base, read.rules, finish=fill)
    except PlanError as exc:
        raise AdapterStateError(f"{read.folder}: this PEFT adapter does not plan on this base: {exc}") from exc
