"""Base fingerprints: which checkpoint an adapter was trained on, whatever precision the base is held in.

A fingerprint has two parts:

- ``architecture``: sha256 of the model class and every parameter's module path, name and element
  count. Element counts (not shapes, not dtypes) are the same for a weight held as fp32, fp16, int8,
  packed 4-bit, or GPT-2's Conv1D transposed into a bitsandbytes Linear.
- ``probes``: 64 weight values (8 rows x 8 columns, evenly spaced) from each of up to 8 weight
  matrices evenly spaced through the model, read in fp32 (dequantized where quantized), each with
  the error bound of the form it is held in: 0 for fp32, half an ulp for fp16/bf16, half an int8
  step of its row for int8, a fifth of its block's absmax for 4-bit. Two probes agree when they
  differ by no more than the sum of their bounds.

So the fp32, fp16 and quantized copies of one checkpoint match, while another architecture fails
the digest and other weights of the same architecture fail the probes (independent weights differ
far beyond a quantization step). What is blind by design: two checkpoints closer to each other than
the quantization error, such as a base and a lightly fine-tuned copy of it held in 4-bit.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..layers.bnb import dequantized_weight, int8_rows, logical_shape, quantized_storage
from ..model.tracing import _param_infos, op_kind
from .shared_base import base_record

VERSION = 1
PROBED_TENSORS = 8
PROBE_ROWS = 8
PROBE_COLS = 8
FOUR_BIT_BOUND = 0.2  # > half the widest gap between nf4 (0.152) or fp4 (0.167) levels, scaled by the block absmax
HALF_STEP = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
SUBNORMAL_HALF_STEP = {torch.float16: 2.0**-25}  # fp16 subnormals below 6.1e-5 have a fixed step
SOURCE_ROUNDING = 2.0**-8  # a quantized weight may have been quantized from fp16 or bf16
MAX_JSON_CHARS = 256 << 10


@dataclass
class Fingerprint:
    """Architecture digest plus weight probes with their error bounds (see module docstring)."""

    architecture: str
    probes: dict[str, list[float]] = field(default_factory=dict)
    bounds: dict[str, list[float]] = field(default_factory=dict)
    version: int = VERSION

    @property
    def short(self) -> str:
        """A short printable id: the first 12 hex digits of the architecture digest."""
        return self.architecture[:12]

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": self.version,
                "architecture": self.architecture,
                "probes": {k: [float(f"{v:.9g}") for v in vs] for k, vs in self.probes.items()},
                "bounds": {k: [float(f"{v:.9g}") for v in vs] for k, vs in self.bounds.items()},
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> Fingerprint:
        """Parse a stored fingerprint (untrusted: schema, sizes and finiteness checked); ValueError if not one."""
        if len(text) > MAX_JSON_CHARS:
            raise ValueError(f"{len(text):,} characters, more than any fingerprint holds")
        try:
            data = json.loads(text)
        except RecursionError:
            raise ValueError("nested too deeply") from None
        if not isinstance(data, dict) or not isinstance(data.get("architecture"), str):
            raise ValueError("not a fingerprint object")
        if not re.fullmatch(r"[0-9a-f]{64}", data["architecture"]):
            raise ValueError("the architecture digest is not a sha256 hex digest")
        version = data.get("version", VERSION)
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= VERSION:
            raise ValueError(f"unknown fingerprint version {version!r}")
        probes, bounds = data.get("probes"), data.get("bounds")
        if not isinstance(probes, dict) or not isinstance(bounds, dict) or set(probes) != set(bounds):
            raise ValueError("probes and bounds do not correspond")
        if not 1 <= len(probes) <= PROBED_TENSORS:
            raise ValueError(f"{len(probes)} probed weights; a fingerprint has 1 to {PROBED_TENSORS}")
        for name in probes:
            values, limits = probes[name], bounds[name]
            if not (
                isinstance(values, list)
                and isinstance(limits, list)
                and 1 <= len(values) == len(limits) <= PROBE_ROWS * PROBE_COLS
            ):
                raise ValueError(
                    f"probes of {name!r} are not two lists of equal length up to {PROBE_ROWS * PROBE_COLS}"
                )
            if not all(_finite_number(v) for v in values) or not all(_finite_number(b) and b >= 0 for b in limits):
                raise ValueError(f"probes of {name!r} hold a value that is not a finite number (or a negative bound)")
        return cls(data["architecture"], probes, bounds, version)

    def mismatch(self, other: Fingerprint) -> str | None:
        """Why ``other`` is not the same checkpoint as ``self`` (the stored one), or None when it is.

        Never a match by default: every stored probe must exist in ``other`` and agree with it.
        """
        if self.architecture != other.architecture:
            return (
                f"another architecture (digest {other.short}, the file's base has {self.short}): "
                "other classes, layer names or sizes"
            )
        if not self.probes:
            return "the stored fingerprint has no weight probes"
        for name in sorted(self.probes):
            if name not in other.probes or len(other.probes[name]) != len(self.probes[name]):
                return f"the stored fingerprint probes {name}, which this base's fingerprint does not probe alike"
            for i, (a, b) in enumerate(zip(self.probes[name], other.probes[name])):
                allowed = self.bounds[name][i] + other.bounds[name][i] + 1e-6 * abs(a)
                if not abs(a - b) <= allowed:  # NaN never agrees
                    return (
                        f"other weights of the same architecture: {name} probe {i} is {b:.6g} here but "
                        f"{a:.6g} in the file's base (allowed difference {allowed:.3g})"
                    )
        return None

    def __repr__(self) -> str:
        count = sum(len(v) for v in self.probes.values())
        return f"Fingerprint(architecture={self.short}, {count} probes over {len(self.probes)} weights)"


def fingerprint(model: nn.Module) -> Fingerprint:
    """The fingerprint of ``model`` as held now (fp32, fp16, bf16 or bitsandbytes-quantized leaves)."""
    digest = hashlib.sha256(type(model).__name__.encode())
    weighted = []
    for path, module in model.named_modules(remove_duplicate=False):
        infos = _param_infos(module)
        for info in infos:
            digest.update(f"\n{path}.{info.name}:{info.numel}".encode())
        if op_kind(module) in ("linear", "conv1d", "embedding") and any(i.name == "weight" for i in infos):
            weighted.append(path)
    chosen = _evenly_spaced(weighted, PROBED_TENSORS)
    probes, bounds = {}, {}
    for path in chosen:
        values, bound = _probe(model.get_submodule(path))
        probes[f"{path}.weight"], bounds[f"{path}.weight"] = values, bound
    return Fingerprint(digest.hexdigest(), probes, bounds)


def _finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _evenly_spaced(items: list, count: int) -> list:
    if len(items) <= count:
        return list(items)
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


def _probe(module: nn.Module) -> tuple[list[float], list[float]]:
    """PROBE_ROWS x PROBE_COLS values of a weight in (out, in) orientation, with their error bounds.

    Only the probed rows are copied to fp32 (an 8B model's embedding whole in fp32 would be 2 GB); a 4-bit
    weight is dequantized once in its own dtype, since its blocks run across rows.
    """
    form = quantized_storage(module)
    with torch.no_grad():
        if form == "nf4" or form == "fp4":
            return _probe_4bit(module)
        if form is None:
            weight = module.weight.detach()
            dense = weight.t() if op_kind(module) == "conv1d" else weight
            rows, cols = _probed(dense.shape)
            chosen = dense[rows.to(dense.device)].float()
            half_step, subnormal = HALF_STEP.get(weight.dtype, 2.0**-8), SUBNORMAL_HALF_STEP.get(weight.dtype, 0.0)
        else:
            chosen = int8_rows(module, rows := _probed(logical_shape(module))[0])
            cols = _probed(logical_shape(module))[1]
        values = chosen[:, cols.to(chosen.device)].to("cpu")
        if form is None:
            bound = values.abs() * half_step + subnormal
        else:
            bound = chosen.abs().amax(dim=1, keepdim=True).cpu() / 254.0 + values.abs() * SOURCE_ROUNDING
            bound = bound.expand_as(values)
    return values.reshape(-1).tolist(), bound.reshape(-1).tolist()


def _probed(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.tensor(_evenly_spaced(range(shape[0]), PROBE_ROWS)),
        torch.tensor(_evenly_spaced(range(shape[1]), PROBE_COLS)),
    )


def _probe_4bit(module: nn.Module) -> tuple[list[float], list[float]]:
    dense = dequantized_weight(module, dtype=None)
    rows, cols = _probed(dense.shape)
    values = dense[rows.to(dense.device)][:, cols.to(dense.device)].float().to("cpu")
    blocksize = module.weight.quant_state.blocksize
    flat = dense.reshape(-1)
    index = rows.to(dense.device).unsqueeze(1) * dense.shape[1] + cols.to(dense.device).unsqueeze(0)
    starts = (index // blocksize) * blocksize
    block_max = torch.stack([flat[s : s + blocksize].abs().max() for s in starts.reshape(-1).tolist()]).float()
    bound = block_max.reshape(values.shape).cpu() * FOUR_BIT_BOUND + values.abs() * SOURCE_ROUNDING
    return values.reshape(-1).tolist(), bound.reshape(-1).tolist()


def base_fingerprint(base: nn.Module) -> Fingerprint:
    """The base's fingerprint, recomputed only when its weights changed since the last call.

    The cache is keyed on every parameter's identity, data pointer, version counter and a sample of
    its stored values, so weights replaced or edited in place (even through ``.data``) are noticed.
    """
    record = base_record(base)
    if record.sharded is not None:  # pinned by shard_base: frozen, and no rank holds the whole weights
        return record.fingerprint[1]
    key = _weights_key(base)
    if record.fingerprint is None or record.fingerprint[0] != key:
        record.fingerprint = (key, fingerprint(base))
    return record.fingerprint[1]


def _weights_key(base: nn.Module) -> str:
    digest = hashlib.sha256()
    with torch.no_grad():
        for p in base.parameters():
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 16)][:16].to("cpu").contiguous()
            digest.update(f"{id(p)}:{p.data_ptr()}:{p._version}:{p.dtype}:{p.numel()}|".encode())
            digest.update(sample.view(torch.uint8).numpy().tobytes() if sample.numel() else b"")
    return digest.hexdigest()


def outside_quantization_error(weight: torch.Tensor, module: nn.Module) -> tuple[int, float, float] | None:
    """Where ``weight`` (fp32, (out, in)) is not what the quantized ``module`` holds within its quantization error:
    the bounds of the probes, applied to every element (a fifth of the block's absmax for 4-bit, half an int8 step of
    the row for int8, plus the rounding of a 16-bit source).

    Args:
        weight: the full-precision weight ``module`` is taken to have been quantized from.
        module: a bitsandbytes layer.

    Returns:
        None when every element agrees, else (flat index of the worst element, its difference, the allowed one).
    """
    form = quantized_storage(module)
    with torch.no_grad():
        dense = dequantized_weight(module).to(weight.device)
        if form in ("nf4", "fp4"):
            blocksize = module.weight.quant_state.blocksize
            flat = dense.reshape(-1)
            pad = (-flat.numel()) % blocksize
            blocks = torch.nn.functional.pad(flat.abs(), (0, pad)).reshape(-1, blocksize).amax(dim=1)
            scale = blocks.repeat_interleave(blocksize)[: flat.numel()].reshape(dense.shape) * FOUR_BIT_BOUND
        else:
            scale = dense.abs().amax(dim=1, keepdim=True) / 254.0
        excess = (weight - dense).abs() - (scale + weight.abs() * SOURCE_ROUNDING + 1e-12)
        worst = int(excess.reshape(-1).argmax())
        if not excess.reshape(-1)[worst] > 0 and not excess.isnan().any():
            return None
        diff = float((weight - dense).reshape(-1)[worst].abs())
        return worst, diff, diff - float(excess.reshape(-1)[worst])
