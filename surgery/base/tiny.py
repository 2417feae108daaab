"""Models built from a config rather than read from a checkpoint: the bundled tiny models (deterministic weights),
bundled architectures, any config on the meta device, and ``--random-init`` (refused before allocating when the
weights would not fit in memory).

torch and transformers are imported where a model is built: naming a config needs neither.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ModelConfigError, ModelNotFoundError, first_line
from ..model.architectures import ARCHITECTURES, TINY_DEFAULT, TINY_MODELS, TINY_SEED

if TYPE_CHECKING:
    import torch
    from torch import nn


def config_from_dict(spec: dict):
    """A transformers config from a bundled spec.

    Args:
        spec: ``model_type`` plus the published hyperparameters.

    Returns:
        The ``PretrainedConfig`` transformers makes for that model type.
    """
    from transformers import AutoConfig

    spec = dict(spec)
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


def bundled_config(name: str):
    """The config of a bundled architecture, named ``name`` (its ``name_or_path``)."""
    config = config_from_dict(ARCHITECTURES[name])
    config.name_or_path = name
    return config


def build_from_config(config, *, device: str | torch.device = "meta", seed: int | None = None) -> nn.Module:
    """Instantiate a causal LM from a config; on meta it costs no memory, elsewhere weights are random.

    Args:
        config: a transformers config of a causal LM.
        device: where the weights are made.
        seed: seeds the random weights (the caller's random state is left as it was); None: unseeded.

    Returns:
        The model, in eval mode, in the config's dtype (fp32 when it names none).

    Raises:
        ModelConfigError: the config names no causal LM, a dtype torch lacks, or sizes that build no model.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from ..random_state import forked_rng

    dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ModelConfigError(f"{_config_name(config)}: dtype {config.dtype!r} is not a torch dtype")
    rng = forked_rng() if seed is not None else contextlib.nullcontext()
    try:
        with rng:
            if seed is not None:
                torch.manual_seed(seed)
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            raise ModelConfigError(
                f"{_config_name(config)}: a {type(config).__name__} is not a causal language model "
                "architecture (AutoModelForCausalLM has no class for it); surgery works on causal "
                "LMs (GPT-2, OPT, Llama, Mistral, ...)"
            ) from None
        raise ModelConfigError(
            f"{_config_name(config)}: the config cannot build a model ({first_line(exc)}); check its sizes"
        ) from None
    except (TypeError, RuntimeError, AssertionError, ZeroDivisionError, AttributeError, KeyError) as exc:
        raise ModelConfigError(
            f"{_config_name(config)}: the config cannot build a model ({type(exc).__name__}: "
            f"{first_line(exc)}); check its sizes (e.g. hidden size divisible by the number of "
            "heads)"
        ) from None
    return model.eval()


def random_model(config, name: str) -> nn.Module:
    """The model of ``config`` with seeded random weights on the CPU (``--random-init``).

    Args:
        config: a transformers config (a config may claim any size).
        name: what the error calls the model.

    Returns:
        The model, its weights seeded with ``TINY_SEED``.

    Raises:
        ModelConfigError: before allocating, when its weights would take more than 90% of the memory available.
    """
    layout = build_from_config(config, device="meta")
    needed = sum(p.numel() * p.element_size() for p in layout.parameters())
    available = _available_memory()
    if available is not None and needed > 0.9 * available:
        raise ModelConfigError(
            f"{name}: --random-init would build {needed / 2**30:,.1f} GiB of weights in memory "
            f"and {available / 2**30:,.1f} GiB is available; plan and inspect it without weights "
            "(`surgery plan`, `surgery inspect` build it on meta), or pick a smaller model"
        )
    return build_from_config(config, device="cpu", seed=TINY_SEED)


def _available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None (no check)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _config_name(config) -> str:
    return str(getattr(config, "name_or_path", "") or getattr(config, "model_type", "") or "the model config")


def tiny_model(name: str = TINY_DEFAULT) -> nn.Module:
    """A bundled tiny model with deterministic random weights (fixed seed), on the CPU, fp32.

    Args:
        name: one of the bundled tiny models (``tiny-opt``, ``tiny-llama``, ``tiny-gpt2``).

    Returns:
        The model, its ``name_or_path`` set to ``name``.

    Raises:
        ModelNotFoundError: ``name`` is not a bundled tiny model.
    """
    if name not in TINY_MODELS:
        raise ModelNotFoundError(f"'{name}' is not a bundled tiny model; choose one of {', '.join(TINY_MODELS)}")
    model = build_from_config(config_from_dict(TINY_MODELS[name]), device="cpu", seed=TINY_SEED)
    model.name_or_path = name
    model.config.name_or_path = name
    return model
