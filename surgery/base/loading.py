"""Resolve a MODEL argument to a model: local directory, cached hub id, bundled architecture or tiny model.

Never touches the network: hub ids are only looked up in the local HF cache.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ..disk import MiB, check_user_file, read_user_file
from ..errors import ModelConfigError, ModelNotFoundError, SurgeryError, first_line
from ..model.architectures import ARCHITECTURES, TINY_DEFAULT, TINY_MODELS, TINY_SEED

if TYPE_CHECKING:  # torch is imported where a model is built: resolving a name or a config needs none
    import torch
    from torch import nn

    from ..rules.ruleset import RuleSet

MAX_CONFIG_BYTES = 16 * MiB
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


@dataclass(frozen=True)
class LoadedModel:
    """A resolved model and where it came from (``source``: directory, hub-cache, bundled, tiny)."""

    model: nn.Module
    name: str
    source: Literal["directory", "hub-cache", "bundled", "tiny"]
    has_weights: bool

    def __repr__(self) -> str:
        weights = "weights" if self.has_weights else "no weights"
        return f"LoadedModel({self.name!r}, {type(self.model).__name__}, from {self.source}, {weights})"


def bundled_names() -> list[str]:
    """Names of every bundled model: tiny models first, then architectures."""
    return [*TINY_MODELS, *ARCHITECTURES]


def config_from_dict(spec: dict):
    """A transformers config from a bundled spec (``model_type`` plus published hyperparameters)."""
    from transformers import AutoConfig

    spec = dict(spec)
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


def build_from_config(config, *, device: str | torch.device = "meta", seed: int | None = None) -> nn.Module:
    """Instantiate a causal LM from a config; on meta it costs no memory, elsewhere weights are random."""
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
    """The model of ``config`` with seeded random weights on the CPU, refused before allocating when its weights
    would not fit in this machine's available memory (a config may claim any size)."""
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
    """A bundled tiny model with deterministic random weights (fixed seed), on the CPU, fp32."""
    if name not in TINY_MODELS:
        raise ModelNotFoundError(f"'{name}' is not a bundled tiny model; choose one of {', '.join(TINY_MODELS)}")
    model = build_from_config(config_from_dict(TINY_MODELS[name]), device="cpu", seed=TINY_SEED)
    model.name_or_path = name
    model.config.name_or_path = name
    return model


def _byte_to_char() -> dict[int, str]:
    """A printable character for every byte (the byte-level BPE convention), so ids equal byte values."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\u00a1"), ord("\u00ac") + 1),
        *range(ord("\u00ae"), ord("\u00ff") + 1),
    ]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def tiny_tokenizer():
    """The tiny models' tokenizer: one token per byte plus <pad> <bos> <eos> <unk>; needs no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: byte for byte, char in _byte_to_char().items()}
    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    vocab.update({tok: 256 + i for i, tok in enumerate(specials)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)


def load_tokenizer(name: str):
    """The tokenizer of MODEL (a tiny model's byte-level one, or a local dir / HF-cache snapshot's); never online."""
    if name in TINY_MODELS:
        return tiny_tokenizer()
    path = Path(name).expanduser()
    source = path if path.is_dir() else _hub_cache_dir(name)
    if source is None:
        raise ModelNotFoundError(
            f"no tokenizer for '{name}': not a local directory or a model in the local HF cache "
            "(no network is used); pass --tokenizer with a folder that holds one"
        )
    if not any((source / f).is_file() for f in TOKENIZER_FILES):
        raise ModelConfigError(
            f"{source}: holds no tokenizer (none of {', '.join(TOKENIZER_FILES[:4])}, ...); put the "
            "tokenizer's files in that folder, or pass --tokenizer with a folder or model that has "
            "one"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    except Exception as exc:  # transformers reports missing/broken tokenizer files in many ways
        raise ModelConfigError(
            f"{source}: its tokenizer could not be loaded ({type(exc).__name__}: "
            f"{first_line(exc)}); pass --tokenizer with a folder that holds a working one"
        ) from None


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

    ``weights=False`` builds on the meta device from the config alone (inspect, plan).
    ``random_init`` builds real random weights when none are available.
    ``rules`` (one rule file or several, as ``prepare_base`` takes them): the base comes back quantized for
    them, planned and checked before anything is read; a checkpoint is quantized while it loads, one tensor
    at a time on its target device, never held whole in full precision.
    ``device`` (auto, cpu, cuda, cuda:N; default cpu) or ``device_map`` (auto, balanced, or transformers'
    module -> device dict) with ``max_memory`` place the base, as transformers' ``from_pretrained`` does.
    """
    from ..devices import resolve_device

    rule_sets = _rule_sets(rules)
    target = resolve_device(device or "cpu")
    placement = Placement(target, device_map, max_memory, attn_implementation)
    source, folder = locate(name)
    if source == "tiny":
        loaded = LoadedModel(tiny_model(name), name, "tiny", True)
    elif source in ("directory", "hub-cache"):
        loaded = _from_directory(
            folder,
            name,
            weights=weights,
            random_init=random_init,
            source=source,
            rule_sets=rule_sets,
            placement=placement,
        )
    elif source == "file":
        raise ModelNotFoundError(f"{name}: is a file, not a model directory; pass the folder holding config.json")
    elif source == "bundled":
        loaded = _from_architecture(name, weights=weights, random_init=random_init)
    else:
        raise ModelNotFoundError(_not_found_message(name))
    if weights and not _is_meta(loaded.model):
        from .shared_base import base_record

        base_record(loaded.model).full_weights = _full_weights(loaded, folder)
        _place_and_quantize(loaded.model, rule_sets, placement)
    return loaded


def _full_weights(loaded: LoadedModel, folder: Path | None):
    """Where the base's full-precision weights can be read again once it is quantized (LoftQ reads them)."""
    from .full_weights import RebuiltWeights

    if loaded.source in ("directory", "hub-cache") and loaded.has_weights:
        return _checkpoint(folder, loaded.model)
    name = loaded.name  # a tiny model or --random-init: the same seed builds the same weights
    return RebuiltWeights(lambda: load_model(name, random_init=True).model, name)


def full_weights_of(model: nn.Module):
    """Where a base's full-precision weights can be read again: what ``load_model`` recorded, else the safetensors
    folder a transformers model's ``name_or_path`` names (a local folder or the local HF cache, as PEFT's
    ``replace_lora_weights_loftq`` finds it); None when neither is there."""
    from .shared_base import base_record

    recorded = base_record(model).full_weights
    if recorded is not None:
        return recorded
    name = str(getattr(model, "name_or_path", "") or "")
    where, folder = locate(name) if name else ("missing", None)
    safetensors = where in ("directory", "hub-cache") and any((folder / f).is_file() for f in WEIGHT_FILES[:2])
    return _checkpoint(folder, model) if safetensors else None


def _checkpoint(folder: Path, model: nn.Module):
    from .full_weights import CheckpointWeights

    return CheckpointWeights(folder, getattr(model, "base_model_prefix", "") or "")


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


def _rule_sets(rules) -> list:
    from ..rules.rule_file import load_rules

    if isinstance(rules, (str, Path, dict)) or hasattr(rules, "rules"):  # one rule file (a dict: its content)
        rules = [rules]
    return [load_rules(r) for r in rules]


def _is_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


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


def graph_of(name: str, *, use_cache: bool = True):
    """The graph of MODEL as ``plan``/``inspect`` need it (built on meta, no weights), from the trace cache if
    there."""
    from ..model.trace_cache import cached_graph

    def traced():
        from ..model.tracing import trace  # only on a cache miss: a cached graph needs neither torch nor a model

        return trace(load_model(name, weights=False).model)

    graph = cached_graph(config_identity(name) if use_cache else None, traced)
    graph.name = name
    return graph


def locate(name: str) -> tuple[str, Path | None]:
    """Where MODEL comes from, in the order load_model tries: tiny, directory, file (an error), hub-cache,
    bundled; ("missing", None) when nowhere. The folder for directory and hub-cache."""
    if name in TINY_MODELS:
        return "tiny", None
    path = Path(name).expanduser()
    if path.is_dir():
        return "directory", path
    if path.exists():
        return "file", path
    cached = _hub_cache_dir(name)
    if cached is not None:
        return "hub-cache", cached
    return ("bundled", None) if name in ARCHITECTURES else ("missing", None)


def config_identity(name: str) -> dict | None:
    """What ``load_model(name, weights=False)`` builds from, as plain JSON data, read without transformers.

    The trace cache keys on it. None when the name does not resolve to a readable config (loading
    then reports why).
    """
    import json

    source, folder = locate(name)
    if source in ("tiny", "bundled"):
        return {source: (TINY_MODELS if source == "tiny" else ARCHITECTURES)[name]}
    if folder is None or source == "file":
        return None
    try:
        config = json.loads(
            read_user_file(folder / "config.json", what="model config", limit=MAX_CONFIG_BYTES, error=ModelConfigError)
        )
    except (SurgeryError, ValueError, RecursionError):
        return None
    return {"config.json": config} if isinstance(config, dict) else None


def _from_directory(
    path: Path,
    name: str,
    *,
    weights: bool,
    random_init: bool,
    source: str,
    rule_sets: list = (),
    placement: Placement | None = None,
) -> LoadedModel:
    from transformers import AutoConfig

    if not (path / "config.json").exists():
        raise ModelNotFoundError(f"{path}: no config.json in this directory; is it a HuggingFace model folder?")
    check_user_file(path / "config.json", what="model config", limit=MAX_CONFIG_BYTES, error=ModelConfigError)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (Exception, RecursionError) as exc:  # transformers raises ValueError/OSError/KeyError for bad configs
        raise ModelConfigError(
            f"{path / 'config.json'}: cannot be read as a transformers config: {first_line(exc)}"
        ) from None
    has_weights = any((path / f).is_file() for f in WEIGHT_FILES)
    if not weights:
        return LoadedModel(build_from_config(config, device="meta"), name, source, has_weights)
    if has_weights:
        model = _from_checkpoint(path, name, config, rule_sets, placement or Placement(_cpu()))
        return LoadedModel(model.eval(), name, source, True)
    if random_init:
        return LoadedModel(random_model(config, str(path)), name, source, False)
    raise ModelNotFoundError(
        f"{path}: has a config but no weights ({', '.join(WEIGHT_FILES[::2])}); "
        "pass --random-init to build it with random weights, or point to a folder with weights"
    )


def _cpu():
    import torch

    return torch.device("cpu")


def _from_checkpoint(path: Path, name: str, config, rule_sets: list, placement: Placement) -> nn.Module:
    """``from_pretrained`` onto the placement; with rule files, the first that quantizes is planned (every error
    before a byte is read) and its quantized modules are quantized as their tensors load."""
    from transformers import AutoModelForCausalLM

    kwargs = placement.loading_kwargs()
    plan = None
    if rule_sets and getattr(config, "quantization_config", None) is None:  # a pre-quantized checkpoint loads as is
        plan = _loading_plan(name, _for_device(rule_sets, placement.device))
        if plan is not None:
            from .quantizer import loading_config

            kwargs["quantization_config"] = loading_config(plan)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kwargs)
    except SurgeryError:
        raise
    except Exception as exc:
        raise ModelConfigError(f"{path}: weights could not be loaded: {first_line(exc)}") from None
    if plan is not None:  # the meta trace is this model's graph: calls and shapes do not depend on weights
        from ..model.tracing import refresh
        from .shared_base import base_record, settle_base

        settle_base(model)
        base_record(model).graph = refresh(plan.graph, model)
    return model


def _loading_plan(name: str, rule_sets: list):
    """The plan of the first rule set that quantizes anything, on the meta graph (as ``prepare_base`` would
    plan it first); None when none quantizes. Raises PlanError for any rule set's violations."""
    from ..planning.decisions import plan as make_plan

    graph = graph_of(name)
    plans = [make_plan(graph, rules) for rules in rule_sets]
    return next((p for p in plans if p.quantized), None)


def _from_architecture(name: str, *, weights: bool, random_init: bool) -> LoadedModel:
    config = config_from_dict(ARCHITECTURES[name])
    config.name_or_path = name
    if not weights:
        return LoadedModel(build_from_config(config, device="meta"), name, "bundled", False)
    if random_init:
        return LoadedModel(random_model(config, name), name, "bundled", False)
    raise ModelNotFoundError(
        f"{name}: only its architecture is bundled (no weights) and it is not in the local HF cache; "
        "pass --random-init to build it with random weights, download it into the HF cache, "
        f"or use a tiny bundled model ({', '.join(TINY_MODELS)})"
    )


def _hub_cache_dir(name: str) -> Path | None:
    """The newest snapshot of ``name`` in the local HF cache, or None; never contacts the hub."""
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        return None
    cache = Path(
        os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "hub"
    )
    repo = cache.expanduser() / ("models--" + name.replace("/", "--"))
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo / "refs" / "main"
    if ref.is_file():
        snap = snapshots / ref.read_text().strip()
        if snap.is_dir():
            return snap
    candidates = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None


def _not_found_message(name: str) -> str:
    import difflib

    close = difflib.get_close_matches(name, bundled_names(), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return (
        f"model '{name}' is not a local directory, not in the local HF cache (no network is used) and not "
        f"bundled.{hint} Use a local path, a bundled name (`surgery models` lists them: "
        f"{', '.join(TINY_MODELS)}, {', '.join(list(ARCHITECTURES)[:3])}, ...), "
        "or pass --random-init with a bundled architecture."
    )
