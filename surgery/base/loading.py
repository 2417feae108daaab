"""Load a MODEL as a base: its checkpoint read onto its devices (one device, or transformers' device map), quantized
while it loads for the rule files given, and where its full-precision weights can be read again recorded.

Where a name comes from is ``sources``; models built from a config (tiny, ``--random-init``) are ``tiny``; a model
without weights and its graph are ``layout``; tokenizers are ``tokenizer``. Their public names are importable from
here too. Never touches the network.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import DeviceError, ModelConfigError, ModelNotFoundError, SurgeryError, first_line
from ..model.architectures import TINY_MODELS
from .folder import gate_model_folder
from .layout import graph_of, model_layout, read_config
from .sources import WEIGHT_FILES, LoadedModel, config_identity, full_weights_of, locate, resolve
from .tiny import build_from_config, bundled_config, config_from_dict, random_model, tiny_model
from .tokenizer import TOKENIZER_FILES, load_tokenizer, tiny_tokenizer

if TYPE_CHECKING:  # torch is imported where a model is built: resolving a name or a config needs none
    import torch
    from torch import nn

    from ..rules.ruleset import RuleSet

__all__ = [  # load_model and Placement are defined here; the rest is re-exported from the modules that define them
    "LoadedModel",
    "Placement",
    "TOKENIZER_FILES",
    "build_from_config",
    "config_from_dict",
    "config_identity",
    "full_weights_of",
    "graph_of",
    "load_model",
    "load_tokenizer",
    "locate",
    "target_rules",
    "tiny_model",
    "tiny_tokenizer",
]


@dataclass(frozen=True)
class Placement:
    """Where a loaded base goes: one device, or transformers' device map (with max_memory) over several."""

    device: torch.device
    device_map: str | dict | None = None
    max_memory: dict | None = None
    attn_implementation: str | None = None

    def loading_kwargs(self) -> dict:
        """``from_pretrained`` keywords that place the weights as they load."""
        out: dict = {}
        if self.device_map is not None:
            out["device_map"] = self.device_map
            if self.max_memory is not None:
                out["max_memory"] = self.max_memory
        elif self.device.type != "cpu":
            out["device_map"] = {"": self.device}
        if self.attn_implementation is not None:
            out["attn_implementation"] = self.attn_implementation
        return out


def load_model(
    name: str,
    *,
    weights: bool = True,
    random_init: bool = False,
    rules: RuleSet | str | Sequence[RuleSet | str] = (),
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    attn_implementation: str | None = None,
) -> LoadedModel:
    """Resolve MODEL: (a) local directory, (b) hub id in the local HF cache, (c) bundled architecture, (d) tiny.

    Args:
        name: the MODEL argument.
        weights: False builds it on the meta device from the config alone (inspect, plan).
        random_init: build real random weights when none are available.
        rules: one rule file or several, as ``prepare_base`` takes them: the base comes back quantized for them,
            planned and checked before anything is read; a checkpoint is quantized while it loads, one tensor at a
            time on its target device, never held whole in full precision.
        device: auto, cpu, cuda, cuda:N (default cpu).
        device_map: auto, balanced, or transformers' module -> device dict, with ``max_memory``, as transformers'
            ``from_pretrained`` places weights.
        max_memory: per-device limits for ``device_map``.
        attn_implementation: passed to transformers (sdpa, eager, ...).

    Returns:
        The model and where it came from.

    Raises:
        ModelNotFoundError: the name is found nowhere, or has no weights and ``random_init`` is not set.
        ModelConfigError: its config or weights cannot be read; --random-init beyond memory.
        PlanError: a rule file's violations, before anything is read.
    """
    from ..devices import check_attn_implementation, check_max_memory, resolve_device

    rule_sets = _rule_sets(rules)
    placement = Placement(resolve_device(device or "cpu"), device_map, max_memory, attn_implementation)
    check_attn_implementation(attn_implementation, placement.device)
    check_max_memory(max_memory)
    if not weights:
        return model_layout(name)
    source, folder = resolve(name)
    if placement.device_map is not None:  # every source alike (one built in memory stays where it is built)
        _check_fits(
            name, _loading_plan(name, _for_device(rule_sets, placement.device)) if rule_sets else None, placement
        )
    if source == "tiny":
        loaded = LoadedModel(tiny_model(name), name, "tiny", True)
    elif source == "bundled":
        loaded = _from_architecture(name, random_init=random_init)
    else:
        loaded = _from_folder(folder, name, source, random_init=random_init, rule_sets=rule_sets, placement=placement)
    from .shared_base import base_record

    if attn_implementation is not None and (source == "tiny" or not loaded.has_weights):
        loaded.model.set_attn_implementation(attn_implementation)  # built from a config: as from_pretrained sets it
    base_record(loaded.model).full_weights = _full_weights(loaded, folder)
    _place_and_quantize(loaded.model, rule_sets, placement)
    return loaded


def _full_weights(loaded: LoadedModel, folder: Path | None):
    """Where the base's full-precision weights can be read again once it is quantized (LoftQ reads them)."""
    from .full_weights import CheckpointWeights, RebuiltWeights

    if loaded.source in ("directory", "hub-cache") and loaded.has_weights:
        return CheckpointWeights.of(folder, loaded.model)
    name = loaded.name  # a tiny model or --random-init: the same seed builds the same weights
    return RebuiltWeights(lambda: load_model(name, random_init=True).model, name)


def _rule_sets(rules) -> list:
    from ..rules.rule_file import load_rules

    if isinstance(rules, (str, Path, dict)) or hasattr(rules, "rules"):  # one rule file (a dict: its content)
        rules = [rules]
    return [load_rules(r) for r in rules]


def _place_and_quantize(model: nn.Module, rule_sets: list, placement: Placement) -> None:
    """Move a base built in memory (tiny, random) to its device, then quantize it there for every rule set;
    a base that loaded quantized gets only what loading left (tied weights, later rule files)."""
    from .shared_base import prepare_base

    if placement.device_map is None and next(model.parameters()).device != placement.device:
        model.to(placement.device)
    if rule_sets:
        prepare_base(model, *_for_device(rule_sets, placement.device))


def _for_device(rule_sets: list, device: torch.device) -> list:
    """The rule sets with a 4-bit compute dtype the file leaves open set for ``device`` (bf16 on CUDA)."""
    from ..devices import default_compute_dtype

    dtype = default_compute_dtype(device)
    return [r.with_compute_dtype(dtype) for r in rule_sets] if dtype else rule_sets


def target_rules(rules, cuda: bool):
    """The rules as a base loaded for a CUDA device (``cuda``) or the CPU would hold them, for planning a run on
    a machine that need not have that device: CUDA is taken to have bf16 (every GPU since Ampere)."""
    return rules.with_compute_dtype("bfloat16") if cuda else rules


def _from_folder(
    path: Path, name: str, source: str, *, random_init: bool, rule_sets: list, placement: Placement
) -> LoadedModel:
    """A local directory or HF-cache snapshot: its checkpoint, else (``random_init``) its config with random
    weights."""
    config = read_config(path)
    gate_model_folder(path, error=ModelConfigError)  # what transformers will open: regular, inside, bounded
    if any((path / f).is_file() for f in WEIGHT_FILES):
        model = _from_checkpoint(path, name, config, rule_sets, placement, random_init=random_init)
        return LoadedModel(model.eval(), name, source, True)
    if random_init:
        return LoadedModel(random_model(config, str(path)), name, source, False)
    raise ModelNotFoundError(
        f"{path}: has a config but no weights ({', '.join(WEIGHT_FILES[::2])}); "
        "pass --random-init to build it with random weights, or point to a folder with weights"
    )


def _from_checkpoint(
    path: Path, name: str, config, rule_sets: list, placement: Placement, *, random_init: bool = False
) -> nn.Module:
    """``from_pretrained`` onto the placement; with rule files, the first that quantizes is planned (every error
    before a byte is read) and its quantized modules are quantized as their tensors load. The checkpoint must hold
    exactly the weights the config describes (``random_init``: missing ones may start random), and the base owns
    its tensors once loaded (none stays a view of a file)."""
    from transformers import AutoModelForCausalLM

    from .load_checks import check_loading_info, own_file_backed

    kwargs = placement.loading_kwargs()
    plan = quantized = None
    if rule_sets and getattr(config, "quantization_config", None) is None:  # a pre-quantized checkpoint loads as is
        plan = _loading_plan(name, _for_device(rule_sets, placement.device))
        if plan is not None:
            from .quantizer import loading_config

            kwargs["quantization_config"] = loading = loading_config(plan)
            quantized = loading.findings
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
        )
    except SurgeryError:
        raise
    except Exception as exc:
        if quantized is not None and quantized.mismatched:  # raised by the quantizer to skip the weight
            check_loading_info(path, {}, quantized, random_init=random_init)
        raise ModelConfigError(f"{path}: weights could not be loaded: {first_line(exc)}") from None
    check_loading_info(path, info, quantized, random_init=random_init)
    own_file_backed(model, path)
    if plan is not None:  # the meta trace is this model's graph: calls and shapes do not depend on weights
        from ..model.tracing import refresh
        from .shared_base import base_record, settle_base

        settle_base(model)
        base_record(model).graph = refresh(plan.graph, model)
    return model


def _check_fits(name: str, plan, placement: Placement) -> None:
    """Refuse a device map that would put part of the base on disk (too little --max-memory, or too little memory
    free): surgery loads every weight into memory, never offloads."""
    from ..planning.memory import fmt_bytes as format_size
    from .quantizer import planned_device_map

    layout = model_layout(name).model
    where = planned_device_map(layout, plan, placement.max_memory, balanced=placement.device_map == "balanced")
    on_disk = [path or "the whole model" for path, device in where.items() if device == "disk"]
    if not on_disk:
        return
    needed = (
        plan.base_bytes_after if plan is not None else sum(p.numel() * p.element_size() for p in layout.parameters())
    )
    given = placement.max_memory
    limits = ",".join(f"{k}={format_size(v).replace(' ', '')}" for k, v in given.items()) if given else None
    raise DeviceError(
        f"{f'--max-memory {limits}' if limits else 'the memory free on this machine'} holds too little of the base "
        f"({name}, about {format_size(needed)}{' as the rule files quantize it' if plan is not None else ''}): "
        f"the device map puts {', '.join(on_disk[:3])}{f' and {len(on_disk) - 3} more' if len(on_disk) > 3 else ''} "
        "on disk, and surgery keeps the base in memory; "
        + (
            "raise the limits so the base fits, or leave --max-memory out"
            if limits
            else "use a machine with more memory"
        )
    )


def _loading_plan(name: str, rule_sets: list):
    """The plan of the first rule set that quantizes anything, on the meta graph (as ``prepare_base`` would
    plan it first); None when none quantizes. Raises PlanError for any rule set's violations."""
    from ..planning.decisions import plan as make_plan

    graph = graph_of(name)
    plans = [make_plan(graph, rules) for rules in rule_sets]
    return next((p for p in plans if p.quantized), None)


def _from_architecture(name: str, *, random_init: bool) -> LoadedModel:
    if random_init:
        return LoadedModel(random_model(bundled_config(name), name), name, "bundled", False)
    raise ModelNotFoundError(
        f"{name}: only its architecture is bundled (no weights) and it is not in the local HF cache; "
        "pass --random-init to build it with random weights, download it into the HF cache, "
        f"or use a tiny bundled model ({', '.join(TINY_MODELS)})"
    )
