"""All surgery knows about reading bitsandbytes layers: what they hold and how to read it back.

Which scheme a layer holds and with which settings, the extra tensors behind a quantized weight
(LLM.int8 row scales, 4-bit quantization state), its logical shape, a plain layer of the same
shape, the float weight it stands for, and the 4-bit layout bitsandbytes may repack in place.
``quantize`` builds such layers; every other module asks this one about them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..rules.ruleset import DTYPES, STORAGES, QuantConfig
from .lora import LoraLayer

Storage = Literal["int8", "nf4", "fp4"]


FROM_CONV1D = "surgery_from_conv1d"  # set on a bitsandbytes Linear that stores a transformers Conv1D (GPT-2)


def from_conv1d(module: nn.Module) -> bool:
    """A bitsandbytes Linear that holds what was a Conv1D: still a conv1d to the plan, merge and LoftQ."""
    return getattr(module, FROM_CONV1D, False)


def is_bnb_layer(module: nn.Module) -> bool:
    return own_class(module).__module__.startswith("bitsandbytes")


def own_class(module: nn.Module) -> type:
    """The module's own class: FSDP2's ``fully_shard`` puts a generated ``FSDP<Class>`` in front of it."""
    return next(c for c in type(module).__mro__ if not c.__module__.startswith("torch.distributed.fsdp"))


def quantized_storage(module: nn.Module) -> Storage | None:
    """'int8', 'nf4' or 'fp4' when ``module`` (or a LoRA layer's base) is a bitsandbytes quantized layer."""
    if isinstance(module, LoraLayer):
        return quantized_storage(module.base_layer)
    if not is_bnb_layer(module):
        return None
    import bitsandbytes as bnb

    if isinstance(module, bnb.nn.Linear8bitLt):
        return None if module.state.has_fp16_weights else "int8"
    if isinstance(module, bnb.nn.Embedding8bit):
        return "int8"
    if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Embedding4bit)):
        qs = quant_state_of(module)
        return getattr(module.weight, "quant_type", None) or getattr(qs, "quant_type", None) or "fp4"
    return None


def quant_state_of(layer: nn.Module):
    """A 4-bit layer's quantization state: on its weight, or on the layer when FSDP holds the weight sharded."""
    return getattr(layer.weight, "quant_state", None) or getattr(layer, "quant_state", None)


def held_quant_config(module: nn.Module) -> QuantConfig | None:
    """The QuantConfig a bitsandbytes layer (or a LoRA layer's base) is held with, or None when not quantized."""
    scheme = quantized_storage(module)
    if scheme is None:
        return None
    layer = module.base_layer if isinstance(module, LoraLayer) else module
    if scheme == "int8":
        state = getattr(layer, "state", None)
        threshold = float(getattr(state, "threshold", 0.0) or 0.0) if state is not None else 0.0
        return QuantConfig("int8", threshold=threshold)
    qs = quant_state_of(layer)
    compute = getattr(layer, "compute_dtype", None)
    compute_name = str(compute).removeprefix("torch.") if isinstance(compute, torch.dtype) else None
    storage = str(layer.weight.dtype).removeprefix("torch.")
    return QuantConfig(
        scheme,
        double_quant=bool(getattr(qs, "nested", False)),
        compute_dtype=compute_name if compute_name in DTYPES else None,
        blocksize=int(getattr(qs, "blocksize", 64) or 64),
        storage=storage if storage in STORAGES else "uint8",
    )


def state_tensors(weight: torch.Tensor, layer: nn.Module | None = None) -> Iterator[torch.Tensor]:
    """The tensors a quantized weight needs beyond its own data: LLM.int8 row scales, 4-bit quant state.

    Linear8bitLt moves its scales from the weight to ``layer.state`` on its first forward; both
    places are looked at.
    """
    scales = getattr(weight, "SCB", None)
    if scales is None and layer is not None:
        scales = getattr(getattr(layer, "state", None), "SCB", None)
    if isinstance(scales, torch.Tensor):
        yield scales
    qs = getattr(weight, "quant_state", None)
    if qs is None and layer is not None and weight is getattr(layer, "weight", None):
        qs = getattr(layer, "quant_state", None)  # FSDP holds the weight sharded; the state stays on the layer
    if qs is not None:
        nested = getattr(qs, "state2", None)
        parts = [
            qs.absmax,
            qs.code,
            getattr(qs, "offset", None),
            *([nested.absmax, nested.code] if nested is not None else []),
        ]
        yield from (t for t in parts if isinstance(t, torch.Tensor))


def held_bytes(weight: torch.Tensor, layer: nn.Module | None = None) -> int:
    """Bytes a (quantized) weight holds: its data plus its quantization state."""
    return sum(t.numel() * t.element_size() for t in (weight, *state_tensors(weight, layer)))


def logical_shape(module: nn.Module) -> tuple[int, ...]:
    """The (out, in) or (num, dim) shape a bitsandbytes layer's weight stands for (packed data has another)."""
    if isinstance(module, nn.Linear):
        return (module.out_features, module.in_features)
    return (module.num_embeddings, module.embedding_dim)


def plain_equivalent(module: nn.Module) -> nn.Module:
    """A plain Linear/Embedding of the layer's logical shape on the meta device (for tracing)."""
    dtype = getattr(module, "compute_dtype", None) or getattr(module, "dtype", None)
    if not isinstance(dtype, torch.dtype):
        dtype = torch.float16
    if isinstance(module, nn.Linear):
        return nn.Linear(
            module.in_features, module.out_features, bias=module.bias is not None, device="meta", dtype=dtype
        )
    return nn.Embedding(module.num_embeddings, module.embedding_dim, device="meta", dtype=dtype)


def is_state_key(key: str, known: set[str]) -> bool:
    """A bitsandbytes state-dict entry (weight.SCB, weight.quant_state..., absmax, ...) of a known weight."""
    owner = key.split(".weight.", 1)[0] + ".weight" if ".weight." in key else None
    return owner in known


def settle_shared_layers(model: nn.Module) -> None:
    """Keep every 4-bit layer of a shared base in bitsandbytes' standard layout, now and later.

    On CPUs with AVX512-BF16 an eval-mode forward of ``Linear4bit`` repacks its weight in place into
    a CPU-specific layout; the weight object is shared by the base and every fine-tune, and readers
    (merge, fingerprint, export) expect the standard layout. So repacking is switched off on every
    layer (fine-tunes copy the flag), and a weight repacked before surgery saw it is unpacked.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
        if getattr(module, "weight", None) is not None:
            standard_layout(module)


def standard_layout(module: nn.Module) -> None:
    """Undo bitsandbytes' CPU repacking of a 4-bit weight in place (what its own state_dict and .cuda() do)."""
    weight = module.weight
    quant_state = getattr(weight, "quant_state", None)
    if getattr(quant_state, "packing_format_for_cpu", False):
        import bitsandbytes as bnb

        weight.data, weight.quant_state = bnb.functional._convert_weight_packed_for_cpu_inverse(
            weight.data, quant_state
        )
        if getattr(module, "quant_state", None) is quant_state:
            module.quant_state = weight.quant_state


def dequantized_weight(module: nn.Module, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """The weight a bitsandbytes layer stands for, in its logical (out, in) / (num, dim) shape, as ``dtype``
    (None: a 4-bit weight's own dtype, no fp32 copy of the whole matrix)."""
    import bitsandbytes as bnb

    standard_layout(module)
    weight = module.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:  # Linear4bit / Embedding4bit
        dense = bnb.functional.dequantize_4bit(weight.data, quant_state)
        return dense if dtype is None else dense.to(dtype)
    return int8_rows(module, slice(None)).to(dtype or torch.float32)


def dense_weight(layer: nn.Module, kind: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A layer's weight as ``dtype``, shaped (out, in) for linear and conv1d (Conv1D stores (in, out)), (num, dim)
    for an embedding; dequantized when bitsandbytes stores it (a 4-bit weight repacked for the CPU kernel is put
    back in the standard layout first, as everywhere surgery reads one)."""
    if quantized_storage(layer):
        return dequantized_weight(layer, dtype)
    weight = layer.weight.detach().to(dtype)
    return weight.t() if kind == "conv1d" else weight


def int8_rows(module: nn.Module, rows) -> torch.Tensor:
    """Rows of an LLM.int8 weight dequantized to fp32 (only those rows are copied)."""
    scb = getattr(module.weight, "SCB", None)
    if scb is None:  # Linear8bitLt after its first forward keeps the row scales in its matmul state
        scb = module.state.SCB
    if isinstance(rows, torch.Tensor):
        rows = rows.to(scb.device)
    return module.weight.data[rows].float() * (scb[rows].float().unsqueeze(1) / 127.0)


# --------------------------------------------------------------------- loading the base elsewhere


def bitsandbytes_config_text(quant: QuantConfig, skip_modules: list[str]) -> str:
    """transformers' ``BitsAndBytesConfig(...)`` (as Python source) that stores weights as ``quant`` does,
    leaving ``skip_modules`` unquantized (given even when empty: without it transformers skips lm_head)."""
    if quant.scheme == "int8":
        args = ["load_in_8bit=True", f"llm_int8_threshold={quant.threshold!r}"]
    else:
        args = [
            "load_in_4bit=True",
            f'bnb_4bit_quant_type="{quant.scheme}"',
            f"bnb_4bit_use_double_quant={quant.double_quant}",
        ]
        if quant.compute_dtype:
            args.append(f"bnb_4bit_compute_dtype=torch.{quant.compute_dtype}")
        if quant.storage != "uint8":
            args.append(f"bnb_4bit_quant_storage=torch.{quant.storage}")
    return f"BitsAndBytesConfig({', '.join([*args, f'llm_int8_skip_modules={skip_modules!r}'])})"


@dataclass(frozen=True)
class BaseLoading:
    """How a base holds its weights, in transformers' terms: what to load it with elsewhere for the same outputs."""

    schemes: tuple[str, ...]  # bitsandbytes schemes held; () for an unquantized base
    modules: int  # quantized modules
    quantization_config: str | None  # BitsAndBytesConfig(...) source, None where transformers cannot express it
    inexpressible: tuple[str, ...] = ()  # what transformers' BitsAndBytesConfig cannot reproduce

    def from_pretrained(self, name: str) -> str:
        """Python source that loads the base like this (transformers), or "" where transformers cannot."""
        if not self.schemes:
            return f"AutoModelForCausalLM.from_pretrained({name!r})"
        if self.quantization_config is None:
            return ""
        return f"AutoModelForCausalLM.from_pretrained({name!r}, quantization_config={self.quantization_config})"

    def note(self, name: str) -> str:
        """One paragraph for a model card or the terminal."""
        if not self.schemes:
            return (
                f"The adapter was trained on {name} unquantized: load it without a quantization_config "
                "(a quantized base gives other outputs)."
            )
        text = (
            f"The adapter was trained on {name} with {self.modules} modules stored as "
            f"{' and '.join(self.schemes)} by bitsandbytes. For the same outputs load the base the same way"
        )
        if self.quantization_config is None:
            text += (
                f": with surgery (`surgery.load_model({name!r})` and this adapter's rules), since transformers' "
                f"BitsAndBytesConfig cannot express {', '.join(self.inexpressible)}"
            )
        else:
            text += f": `{self.from_pretrained(name)}`"
        return text + ". On a base loaded otherwise (e.g. unquantized) the outputs differ by the quantization error."


def base_loading(base: nn.Module) -> BaseLoading:
    """How ``base`` holds its weights as transformers would load them: the ``quantization_config`` for
    ``from_pretrained`` (unquantized linear layers as ``llm_int8_skip_modules``), or what it cannot express."""
    held = {path: q for path, m in base.named_modules() if (q := held_quant_config(m)) is not None}
    configs = sorted(set(held.values()), key=repr)
    schemes = tuple(sorted({q.scheme for q in configs}))
    inexpressible = []
    if any(isinstance(base.get_submodule(path), nn.Embedding) for path in held):
        inexpressible.append("quantized embeddings (transformers keeps embeddings unquantized)")
    if any(q.scheme != "int8" and q.blocksize != 64 for q in configs):
        inexpressible.append("a 4-bit block size other than 64")
    if len(configs) > 1:
        inexpressible.append("different settings per module")
    if not held or inexpressible:
        return BaseLoading(schemes, len(held), None, tuple(inexpressible))
    linears = [path for path, m in base.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    skip = _skip_modules([path for path in linears if path not in held], list(held))
    return BaseLoading(schemes, len(held), bitsandbytes_config_text(configs[0], skip))


def _skip_modules(skipped: list[str], quantized: list[str]) -> list[str]:
    """``llm_int8_skip_modules`` naming exactly ``skipped``: last name parts where no quantized module shares one."""
    local = {path.rpartition(".")[2] for path in skipped}
    if local & {path.rpartition(".")[2] for path in quantized}:
        return skipped
    return sorted(local)
