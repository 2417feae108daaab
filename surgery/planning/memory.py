"""Memory, planned and measured: the exact bytes a plan predicts, and the bytes a model holds.

Planned: bitsandbytes' storage formulas per quantized weight, LoRA parameter counts, the base's
bytes now and after quantization (each tensor once per stored form) and what one more fine-tune
adds. Measured: bytes of unique tensor storage, bitsandbytes' quantization state included.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import TYPE_CHECKING

from ..model.graph import ModelGraph, ModuleInfo, ParamInfo
from ..rules.ruleset import LoraConfig, QuantConfig

if TYPE_CHECKING:
    from torch import nn


DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1, "uint8": 1}


# ---------------------------------------------------------------------------------------- planned


def lora_param_count(kind: str, weight_shape: tuple[int, ...], lora: LoraConfig) -> int:
    """Parameters of one LoRA adapter: r*(in+out), plus ``out`` for a trainable adapter bias or DoRA's magnitude."""
    in_f, out_f = lora_dims(kind, weight_shape)
    return lora.r * (in_f + out_f) + (out_f if lora.bias else 0) + (out_f if lora.use_dora else 0)


def lora_dims(kind: str, weight_shape: tuple[int, ...]) -> tuple[int, int]:
    """(in, out) of a layer from its weight: Linear (out, in), Conv1D (in, out), Embedding (num, dim)."""
    if kind == "linear":
        return weight_shape[1], weight_shape[0]
    return weight_shape[0], weight_shape[1]


def quantized_weight_bytes(kind: str, shape: tuple[int, ...], quant: QuantConfig) -> int:
    """Exact bytes bitsandbytes stores for one weight quantized with ``quant``.

    int8 (LLM.int8): one int8 per element + one float32 scale per output row.
    nf4/fp4: two elements per byte + float32 absmax per block + the 16-entry float32 code; with
    double quantization the absmax is uint8 plus float32 absmax per 256 blocks, a 256-entry float32
    code and a float32 offset.
    """
    numel = math.prod(shape)
    if quant.scheme == "int8":
        rows = shape[1] if kind == "conv1d" else shape[0]
        return numel + 4 * rows
    blocks = math.ceil(numel / quant.blocksize)
    packed = (numel + 1) // 2
    code = 16 * 4
    if quant.double_quant:
        absmax = blocks + 4 * math.ceil(blocks / 256) + 256 * 4 + 4
    else:
        absmax = 4 * blocks
    return packed + absmax + code


def base_bytes(graph: ModelGraph, decisions: dict, world_size: int = 1) -> tuple[int, int]:
    """Bytes of the base now and after quantization, counting each tensor once per stored form.

    ``world_size`` > 1: the bytes after are those one rank holds when FSDP2 shards the base (see
    ``stored_bytes``). ``decisions`` are the plan's (``plan.Decision`` by module path); memory does
    not import the plan.
    """
    canon = graph.canonical_names()
    now: dict[str, int] = {}
    after: dict[str, dict[object, int]] = defaultdict(dict)
    for path, decision in decisions.items():
        info = graph.modules[path]
        for p in info.params:
            full = f"{path}.{p.name}" if path else p.name
            key = canon.get(full, full)
            now[key] = p.nbytes
            form = decision.stored_form(p.name, p.dtype)
            after[key][form] = stored_bytes(info, p, form, decision.quant, world_size)
    return sum(now.values()), sum(sum(forms.values()) for forms in after.values())


def base_bytes_by_device(graph: ModelGraph, decisions: dict, device_of) -> dict[str, int]:
    """Bytes of the base after quantization on each device of a device map (``device_of(module path)``), each
    tensor once per stored form, on the device of the first module that holds it."""
    canon = graph.canonical_names()
    placed: dict[str, dict[object, tuple[str, int]]] = defaultdict(dict)
    for path, decision in decisions.items():
        info = graph.modules[path]
        for p in info.params:
            full = f"{path}.{p.name}" if path else p.name
            form = decision.stored_form(p.name, p.dtype)
            placed[canon.get(full, full)].setdefault(
                form, (str(device_of(path)), stored_bytes(info, p, form, decision.quant))
            )
    out: dict[str, int] = defaultdict(int)
    for forms in placed.values():
        for device, nbytes in forms.values():
            out[device] += nbytes
    return dict(out)


def stored_bytes(info: ModuleInfo, p: ParamInfo, form: object, quant: QuantConfig, world_size: int = 1) -> int:
    """Bytes of one tensor stored in ``form`` (see ``plan.Decision.stored_form``) on one of ``world_size`` ranks.

    FSDP2 splits every tensor along dim 0 into ``world_size`` chunks and gives each rank a buffer of
    the largest chunk (ceil); packed 4-bit weights are split as their storage rows, and their
    quantization statistics stay whole on every rank. LLM.int8 weights cannot be sharded: whole.
    """
    if isinstance(form, tuple) and form[0] == "cast":
        return _rows_bytes(p, p.numel * DTYPE_BYTES[form[1]], world_size)
    if world_size == 1:
        return p.nbytes if form == "original" else quantized_weight_bytes(info.kind, p.shape, quant)
    if form == "original" and not (info.quantized and p.name == "weight"):
        return _rows_bytes(p, p.nbytes, world_size)
    quant = info.held if form == "original" else quant  # quantized before this plan: as the base holds it
    whole = quantized_weight_bytes(info.kind, p.shape, quant)
    if quant.scheme == "int8":
        return whole
    packed, width = (math.prod(p.shape) + 1) // 2, DTYPE_BYTES[quant.storage]
    return math.ceil(packed // width / world_size) * width + whole - packed


def _rows_bytes(p: ParamInfo, nbytes: int, world_size: int) -> int:
    """One rank's bytes of a plain tensor of ``nbytes`` that FSDP2 splits along dim 0 (ceil chunks)."""
    rows = p.shape[0] if p.shape else 1
    return math.ceil(rows / world_size) * (nbytes // max(rows, 1))


def finetune_cost(graph: ModelGraph, decisions: dict) -> tuple[int, int]:
    """Bytes and trainable parameters one more fine-tune adds: adapters + private copies of plain modules."""
    canon = graph.canonical_names()
    plain: dict[str, tuple[int, int]] = {}
    nbytes = params = 0
    for path, decision in decisions.items():
        nbytes += decision.adapter_bytes
        params += decision.adapter_params
        if decision.action == "plain":
            for p in graph.modules[path].params:
                full = f"{path}.{p.name}" if path else p.name
                plain[canon.get(full, full)] = (p.nbytes, p.numel)
    return nbytes + sum(b for b, _ in plain.values()), params + sum(n for _, n in plain.values())


def extra_token_tensors(graph: ModelGraph, decisions: dict, count: int) -> list[tuple[int, int]]:
    """(elements, bytes per element) of ``count`` new token rows (float32): a set for the input embedding (the
    embedding with the most rows) and one for the output layer, one set in all where they still share one tensor
    (a tie that neither a plain copy nor quantization splits)."""
    embeddings = [m for m in graph.leaves() if m.kind == "embedding" and m.param("weight") is not None]
    if not count or not embeddings:
        return []
    embedding = max(embeddings, key=lambda m: m.param("weight").shape[0])
    dim = embedding.param("weight").shape[1]
    name = f"{embedding.path}.weight" if embedding.path else "weight"
    group = next((g for g in graph.ties if name in g), ())
    sides = [decisions.get(n.rsplit(".", 1)[0]) for n in group]
    tied = len(group) > 1 and all(
        d is not None and d.action != "plain" and d.storage not in ("int8", "nf4", "fp4") for d in sides
    )
    return [(count * dim, 4)] * (1 if tied else 2)


def extra_token_cost(graph: ModelGraph, decisions: dict, count: int) -> tuple[int, int]:
    """Bytes and parameters of ``count`` new token rows (``extra_token_tensors``)."""
    tensors = extra_token_tensors(graph, decisions, count)
    return sum(n * size for n, size in tensors), sum(n for n, _ in tensors)


def fmt_bytes(n: float) -> str:
    """Human-readable bytes (binary units), e.g. 1.3 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# ---------------------------------------------------------------------------------------- measured


def _parameter_tensors(model: nn.Module):
    """Every parameter (this rank's shard, when FSDP2 holds it) and the quantization state behind it."""
    from ..layers.bnb import state_tensors  # measuring a live model; planning from a graph needs no torch

    for module in model.modules():
        for p in module.parameters(recurse=False):
            yield p.to_local() if hasattr(p, "to_local") else p
            yield from state_tensors(p, module)


def storages(model: nn.Module) -> dict[tuple, int]:
    """Unique storages behind a model's parameters (and their quantization state): key -> bytes."""
    out = {}
    for t in _parameter_tensors(model):
        if t.device.type == "meta":
            continue
        s = t.untyped_storage()
        out[(t.device.type, s.data_ptr())] = s.nbytes()
    return out


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of parameter storage held by ``model``, each storage counted once."""
    return sum(storages(model).values())


def extra_bytes(model: nn.Module, *others: nn.Module) -> int:
    """Bytes ``model`` holds that none of ``others`` holds (what a fine-tune adds over its base)."""
    seen = {}
    for other in others:
        seen.update(storages(other))
    return sum(n for key, n in storages(model).items() if key not in seen)
