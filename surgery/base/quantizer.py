"""Quantize while loading: transformers' own loader fills a base whose planned modules are already bitsandbytes
layers, each checkpoint tensor quantized on its target device as it is read.

A plan is handed to ``from_pretrained`` as a quantization config (``PlanQuantizationConfig``) with its
quantizer registered at transformers' extension point, so one path loads every plan (int8 and nf4
in one base, quantized embeddings, any blocksize, per-module compute dtypes) with transformers' shard
handling, weight conversions, ``device_map`` and ``max_memory``. Each weight is quantized by the
same function as ``quantize.quantized_layer`` on the same tensor, so the result is bit-identical to
loading in full precision and quantizing afterwards. Tied weights are left to that in-place path
(transformers ties after loading); the loaded base carries no trace of the quantizer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..layers.bnb import quantized_storage
from ..model.tracing import replace_submodule
from ..planning.decisions import Decision, Plan
from .quantize import empty_layer, finished_layer, float_weight, quantized_weight

METHOD = "surgery"


class LoadFindings:
    """What the quantizer found wrong with the weights it quantizes (transformers checks only the others): the same
    object in every copy transformers makes of the config, so the caller reads it after loading."""

    def __init__(self) -> None:
        self.mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []  # (key, in the file, expected)
        self.unfilled: list[tuple[str, str]] = []  # (key, the rule that quantizes it): the checkpoint lacks it

    def __copy__(self) -> LoadFindings:
        return self

    def __deepcopy__(self, memo: dict) -> LoadFindings:
        return self


class PlanQuantizationConfig(QuantizationConfigMixin):
    """The quantized modules of a plan, as transformers' loader takes a quantization config."""

    def __init__(self, decisions: dict[str, Decision] | None = None, findings: LoadFindings | None = None, **_: Any):
        self.quant_method = METHOD
        self.decisions = dict(decisions or {})
        self.findings = findings if isinstance(findings, LoadFindings) else LoadFindings()

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": METHOD,
            "modules": {path: {"kind": d.kind, **d.quant.to_dict()} for path, d in self.decisions.items()},
        }


class PlanQuantizer(HfQuantizer):
    """Builds the plan's bitsandbytes layers on meta before loading and quantizes their weights as they load."""

    requires_calibration = False

    def __init__(self, quantization_config: PlanQuantizationConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        self.decisions = quantization_config.decisions

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        return None

    def _owner(self, param_name: str) -> Decision | None:
        path, _, name = param_name.rpartition(".")
        return self.decisions.get(path) if name == "weight" else None

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        return self._owner(param_name) is not None

    def param_element_size(self, model: nn.Module, param_name: str, param: torch.Tensor) -> float:
        """Bytes per element where accelerate places layers (``device_map="auto"``): the packed data and its
        scales (absmax per block, a float per int8 row)."""
        decision = self._owner(param_name)
        if decision is None:
            return param.element_size()
        quant = decision.quant
        return 1.0 + 4 / param.shape[-1] if quant.scheme == "int8" else 0.5 + 4 / quant.blocksize

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        self.expected = {path: tuple(model.get_submodule(path).weight.shape) for path in self.decisions}
        for path, decision in self.decisions.items():
            if not _built_when_loaded(decision):
                replace_submodule(model, path, empty_layer(model.get_submodule(path), decision))

    def get_quantize_ops(self) -> ConversionOps:
        return QuantizeOnLoad(self)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        for path, decision in self.decisions.items():
            layer = model.get_submodule(path)
            if quantized_storage(layer) is None or not _quantized_weight(layer):  # never read: the loader reports it
                self.quantization_config.findings.unfilled.append((f"{path}.weight", decision.decided_by))
                continue
            finished_layer(layer, decision.quant)
        self.remove_quantization_config(model)  # the base looks as if quantized in place: Trainer, saves, copies
        for module in model.modules():
            config = getattr(module, "config", None)
            if config is not None and hasattr(config, "_is_quantized"):
                del config._is_quantized
        return model

    def is_serializable(self) -> bool:
        return False

    @property
    def is_trainable(self) -> bool:
        return True


class QuantizeOnLoad(ConversionOps):
    """One checkpoint weight, already on its target device in the load dtype, quantized there."""

    def __init__(self, quantizer: PlanQuantizer):
        self.quantizer = quantizer

    def convert(self, input_dict: dict[str, Any], model: nn.Module | None = None, **kwargs: Any) -> dict:
        out = {}
        for name, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            decision = self.quantizer._owner(name)
            expected = self.quantizer.expected[decision.path]
            if tuple(value.shape) != expected:  # recorded for loading's error, raised so the loader skips it
                self.quantizer.quantization_config.findings.mismatched.append((name, tuple(value.shape), expected))
                raise ValueError(f"{name}: shape {tuple(value.shape)}, expected {expected}")
            if _built_when_loaded(decision):
                replace_submodule(model, decision.path, empty_layer(model.get_submodule(decision.path), decision))
            layer = model.get_submodule(decision.path)
            with torch.no_grad():
                out[name] = quantized_weight(float_weight(value, decision), decision.quant, layer)
        return out


def _quantized_weight(layer: nn.Module) -> bool:
    """Whether a planned layer's weight was set by ``QuantizeOnLoad`` (int8 data with its scales, 4-bit with its
    quantization state)."""
    weight = layer.weight
    return getattr(weight, "CB", None) is not None or getattr(weight, "quant_state", None) is not None


def _built_when_loaded(decision: Decision) -> bool:
    """bitsandbytes' Embedding8bit/4bit cannot write a state dict, which the loader reads before loading: they take
    the embedding's place when its weight loads (an embedding has no other tensor)."""
    return decision.kind == "embedding"


def register() -> None:
    """Make the plan quantizer known to transformers (once per process)."""
    if METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(METHOD)(PlanQuantizationConfig)
    if METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(METHOD)(PlanQuantizer)


def loading_config(plan: Plan) -> PlanQuantizationConfig:
    """The quantization config that loads ``plan``'s quantized modules quantized; tied weights are left out
    (transformers ties after loading, so those are quantized in place right after)."""
    register()
    tied = {name.rpartition(".")[0] for names in plan.graph.ties for name in names}
    return PlanQuantizationConfig({d.path: d for d in plan.quantized if d.path not in tied})


def planned_device_map(
    model: nn.Module, plan: Plan | None, max_memory: dict | None, *, balanced: bool = False
) -> dict[str, object]:
    """The device map transformers would compute for ``plan``'s base (``device_map="auto"`` or "balanced" with
    ``max_memory``; None: what accelerate finds free), from the model on meta with the planned layers in place (no
    plan: none quantized): what ``from_pretrained`` places when the plan loads, computed without a GPU (accelerate
    only warns about GPUs it cannot see)."""
    import copy

    from transformers.integrations.accelerate import get_balanced_memory, infer_auto_device_map

    quantizer = PlanQuantizer(loading_config(plan)) if plan is not None else None
    twin = copy.deepcopy(model).to("meta")
    if quantizer is not None:
        quantizer._process_model_before_weight_loading(twin)
    no_split = getattr(twin, "_no_split_modules", None) or []
    memory = dict(max_memory) if max_memory is not None else None
    if balanced:
        memory = get_balanced_memory(twin, max_memory=memory, no_split_module_classes=no_split, hf_quantizer=quantizer)
    return infer_auto_device_map(twin, max_memory=memory, no_split_module_classes=no_split, hf_quantizer=quantizer)


def device_of(device_map: dict[str, object]):
    """``path -> device`` for a device map of module prefixes (the longest prefix that holds the path)."""
    prefixes = sorted(device_map, key=len, reverse=True)

    def lookup(path: str) -> object:
        for prefix in prefixes:
            if prefix == "" or path == prefix or path.startswith(prefix + "."):
                return device_map[prefix]
        return "cpu"

    return lookup
