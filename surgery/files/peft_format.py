"""PEFT's adapter format both ways: ``export_peft(ft, dir)`` and ``import_peft(base, dir)``.

A PEFT LoRA folder is ``adapter_config.json`` + ``adapter_model.safetensors`` with keys such as
``base_model.model.<module>.lora_A.weight``. We write full module paths as ``target_modules`` (PEFT
matches a target equal to the module name), per-module ranks and alphas as ``rank_pattern`` /
``alpha_pattern``, plain modules as ``modules_to_save``, and ``fan_in_fan_out`` for GPT-2's Conv1D.
PEFT scales a LoRA bias (``lora_bias``, the bias of lora_B) with alpha/r; ours is added unscaled,
so it is divided by the scaling on export and multiplied on import. PEFT features we cannot
represent (other tuner types, trained base biases, ...) are refused with a clear error. DoRA's
magnitude is ``lora_magnitude_vector`` there, ``lora_magnitude`` here.

On import, the modules adapter_config.json selects on the base (``target_modules`` as names or a regex,
``layers_to_transform``, ``exclude_modules``, ``modules_to_save``, as PEFT 0.22 reads them) must be the modules the
weights hold; they become a few rules, per (LoRA settings, storage) one pattern per module position in a block
(``model.layers.*.self_attn.q_proj``), so a 100-layer model reads as easily as a 2-layer one.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..base.fingerprints import Fingerprint, base_fingerprint
from ..base.ownership import require_finetune
from ..base.shared_base import base_graph, refuse_sharded
from ..disk import MiB, check_folder_files, check_user_file, gate_folder, read_user_text, write_folder_files
from ..errors import AdapterStateError, RuleFileError, SurgeryError, first_line
from ..layers.bnb import quantized_storage
from ..layers.extra_tokens import extra_token_layers
from ..layers.lora import LoraEmbedding, LoraLayer, LoraPositionalEmbedding
from ..package import version
from ..planning.decisions import plan as make_plan
from ..rules.rule_file import parse_rules
from ..rules.ruleset import REGEX_TIMEOUT, LoraConfig, QuantConfig, RuleSet, compile_regex, covering_patterns
from .adapter_file import ADAPTER_FILE, MAX_ADAPTER_BYTES, MAX_RULES_JSON
from .model_card import CARD_FILE, adapter_card
from .serving import Target, check_servable

PREFIX = "base_model.model."
TOKEN_DELTA = "token_adapter.trainable_tokens_delta"  # PEFT's key for a layer's trainable token rows
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1 * MiB
UNSUPPORTED = {  # adapter_config.json field -> what it means, when set to anything but its off value
    "layer_replication": "layer replication",
    "use_qalora": "QA-LoRA",
    "target_parameters": "LoRA on bare parameters (target_parameters)",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_bdlora": "block-diagonal LoRA",
    "velora_config": "VeLoRA",
    "modules_to_tie": "modules_to_tie",
}


# -------------------------------------------------------------------------------------- export


def export_peft(finetune: nn.Module, folder: str | Path, *, target: Target = "peft") -> Path:
    """Write the fine-tune as a PEFT LoRA adapter folder that ``PeftModel.from_pretrained`` loads.

    With a ``README.md`` card saying how the base must be loaded (its ``BitsAndBytesConfig``) for the
    same outputs. ``target`` ("peft", "vllm", "lorax") first checks the export against that server's loading rules
    (``serving.check_servable``); nothing is written when it does not fit.
    """
    refuse_sharded(
        finetune,
        "export_peft",
        "export in one process without --fsdp, from the adapter file the run "
        "saved (`surgery export-peft ADAPTER --out DIR`)",
    )
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise AdapterStateError(f"{folder}: exists and is not a folder; export_peft writes a folder")
    config, tensors, metadata = peft_adapter(finetune)
    check_servable(finetune, config, target)
    files = peft_files(config, tensors, metadata)
    files[CARD_FILE] = adapter_card(finetune, tensors, "peft").encode()
    write_folder_files(folder, files, error=AdapterStateError)
    return folder


def peft_adapter(
    finetune: nn.Module, values: dict[str, torch.Tensor] | None = None
) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    """The fine-tune in PEFT's terms: adapter_config.json's fields, the weights by PEFT key, and metadata.

    ``values`` (the fine-tune's own tensors by name, as ``save_pretrained(state_dict=...)`` passes them) replace
    the live tensors.

    The metadata (stored in the weights file's header, which PEFT and servers ignore) names the base
    and holds its fingerprint, so ``surgery adapter show`` and ``import_peft`` can tell which base it needs.
    """
    from .adapter_file import base_name

    info = require_finetune(finetune, "exported to PEFT")
    adapters = {path: m for path, m in finetune.named_modules() if isinstance(m, LoraLayer)}
    plain = [d.path for d in info.plan.by_action("plain")]
    if not adapters:
        raise AdapterStateError(
            "this fine-tune has no LoRA adapters; PEFT's LoRA format needs at least one "
            "(save plain modules with surgery.save_adapter instead)"
        )
    _check_exportable(adapters)
    configs = {path: m.config for path, m in adapters.items()}
    r = Counter(c.r for c in configs.values()).most_common(1)[0][0]
    alpha = Counter(c.lora_alpha for c in configs.values()).most_common(1)[0][0]
    with_bias = any(c.bias for c in configs.values())
    tensors: dict[str, torch.Tensor] = {}

    def own(path: str, name: str, live: torch.Tensor | None) -> torch.Tensor | None:
        value = values.get(f"{path}.{name}", live) if values is not None and live is not None else live
        return value.detach().to("cpu").contiguous() if value is not None else None

    for path, m in adapters.items():
        tensors.update(_peft_tensors(path, m, with_bias, lambda name, live, path=path: own(path, name, live)))
    for path in plain:
        for name, p in finetune.get_submodule(path).named_parameters(recurse=False):
            tensors[f"{PREFIX}{path}.{name}"] = own(path, name, p)
    token_indices = _trainable_tokens(finetune, plain, tensors, own)
    token_first = next(iter(token_indices.values()))[0] if token_indices else None
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name(info.base) or None,
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {p: c.r for p, c in sorted(configs.items()) if c.r != r},
        "alpha_pattern": {p: c.lora_alpha for p, c in sorted(configs.items()) if c.lora_alpha != alpha},
        "lora_dropout": Counter(c.lora_dropout for c in configs.values()).most_common(1)[0][0],
        "target_modules": sorted(adapters),
        "modules_to_save": sorted(plain) or None,
        "fan_in_fan_out": any(info.plan.decisions[p].kind == "conv1d" for p in adapters),
        "bias": "none",
        "lora_bias": with_bias,
        "use_rslora": next(iter(configs.values())).use_rslora,
        "use_dora": next(iter(configs.values())).use_dora,
        "init_lora_weights": True,
        "inference_mode": True,
        **({"trainable_token_indices": token_indices} if token_indices else {}),
    }
    metadata = {
        "format": "pt",
        "surgery_version": version(),
        "surgery_base_model": base_name(info.base),
        "surgery_base_class": type(info.base).__name__,
        "surgery_base_fingerprint": base_fingerprint(info.base).to_json(),
        "surgery_base_storage": json.dumps(_base_storage(info.base), sort_keys=True),
        "surgery_rules": info.rules.to_json(),  # the storage the fine-tune was trained on, for import and generate
        **(
            {"surgery_extra_tokens": json.dumps(info.rules.extra_tokens.to_dict() | {"first_id": token_first})}
            if token_indices
            else {}
        ),
    }
    return config, tensors, metadata


def peft_files(config: dict, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, bytes]:
    """The bytes of ``adapter_model.safetensors`` and ``adapter_config.json``, in the order to write them."""
    from safetensors.torch import save

    return {
        WEIGHTS_FILE: save(tensors, metadata=metadata),
        CONFIG_FILE: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
    }


def _base_storage(base: nn.Module) -> dict[str, int]:
    """How the base the adapter was trained on is stored: module count per form (int8, nf4, ...)."""
    return dict(Counter(s for _, m in base.named_modules() if (s := quantized_storage(m))))


def _trainable_tokens(finetune: nn.Module, plain: list[str], tensors: dict, own) -> dict[str, list[int]]:
    """The fine-tune's extra tokens as PEFT's ``trainable_token_indices`` (a delta of rows per layer, one for a tied
    pair, as PEFT ties them); their tensors go into ``tensors``. PEFT needs the base resized to the new vocabulary
    first (``resize_token_embeddings``); the card says so."""
    indices: dict[str, list[int]] = {}
    seen: set[int] = set()
    for path, layer in extra_token_layers(finetune):
        if isinstance(layer.base_layer, LoraLayer) or path in plain:
            raise AdapterStateError(
                f"{path}: holds the fine-tune's extra tokens and is also "
                f"{'adapted with LoRA' if path not in plain else 'plain'}; PEFT keeps trainable "
                "tokens and LoRA or modules_to_save on different layers, so it cannot represent "
                "this: save with surgery.save_adapter, or merge it (`surgery merge`)"
            )
        if id(layer.extra_rows) in seen:
            continue  # the output layer tied to the embedding: PEFT ties its token adapter the same way
        seen.add(id(layer.extra_rows))
        indices[path.rsplit(".", 1)[-1]] = list(range(layer.first_id, layer.first_id + layer.count))
        tensors[f"{PREFIX}{path}.{TOKEN_DELTA}"] = own(path, "extra_rows", layer.extra_rows)
    return indices


def _check_exportable(adapters: dict[str, nn.Module]) -> None:
    positional = next((p for p, m in adapters.items() if isinstance(m, LoraPositionalEmbedding)), None)
    if positional is not None:
        raise AdapterStateError(
            f"{positional}: a LoRA adapter on a learned positional embedding, which PEFT cannot express: PEFT's LoRA "
            "embedding looks rows up by the layer's input (for OPT's positional embedding the attention mask), not "
            "by the positions the layer computes; save it with surgery.save_adapter, or merge it (`surgery merge`)"
        )
    if len({m.config.use_rslora for m in adapters.values()}) > 1:
        raise AdapterStateError("some adapters use rslora and some do not; PEFT has one use_rslora per adapter")
    if len({m.config.use_dora for m in adapters.values()}) > 1:
        dora = next(p for p, m in adapters.items() if m.config.use_dora)
        raise AdapterStateError(
            f"{dora} uses DoRA and other adapted layers do not; PEFT has one use_dora per "
            "adapter (its embeddings take no DoRA here): set use_dora alike on every adapted "
            "layer to export to PEFT"
        )
    embeddings = [p for p, m in adapters.items() if isinstance(m, LoraEmbedding)]
    biased = [p for p, m in adapters.items() if m.lora_bias is not None]
    if embeddings and biased:
        raise AdapterStateError(
            f"{biased[0]} has a LoRA bias and {embeddings[0]} is an adapted embedding: PEFT's "
            "lora_bias is one switch for every adapted layer and embeddings do not support it; "
            "train with `bias: false` or without embedding adapters to export to PEFT"
        )


def _peft_tensors(path: str, m: nn.Module, with_bias: bool, own) -> dict[str, torch.Tensor]:
    """One LoRA layer's PEFT tensors; ``own(name, live)`` gives the value of its tensor ``name`` on the CPU."""
    a, b = own("lora_A", m.lora_A), own("lora_B", m.lora_B)
    if isinstance(m, LoraEmbedding):
        return {f"{PREFIX}{path}.lora_embedding_A": a, f"{PREFIX}{path}.lora_embedding_B": b}
    out = {f"{PREFIX}{path}.lora_A.weight": a, f"{PREFIX}{path}.lora_B.weight": b}
    if m.config.use_dora:
        out[f"{PREFIX}{path}.lora_magnitude_vector"] = own("lora_magnitude", m.lora_magnitude)
    if with_bias:
        lora_bias = own("lora_bias", m.lora_bias)
        bias = lora_bias / m.scaling if lora_bias is not None else torch.zeros(b.shape[0], dtype=b.dtype)
        out[f"{PREFIX}{path}.lora_B.bias"] = bias.contiguous()
    return out


# -------------------------------------------------------------------------------------- import


@dataclass
class PeftFolder:
    """A PEFT LoRA adapter folder, read and checked: its config, weights, and surgery's metadata if any."""

    path: Path
    config: dict
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    fingerprint: Fingerprint | None  # of the base it was exported from, when surgery wrote it

    @property
    def base_model(self) -> str:
        return self.config.get("base_model_name_or_path") or self.metadata.get("surgery_base_model", "")


def read_peft_folder(folder: str | Path) -> PeftFolder:
    """Read a PEFT adapter folder completely (config, weights, metadata); changes nothing."""
    folder = Path(folder)
    if folder.is_dir():
        check_folder_files(folder, error=AdapterStateError)
        limits = {
            CONFIG_FILE: MAX_CONFIG_BYTES,
            WEIGHTS_FILE: MAX_ADAPTER_BYTES,
            "adapter_model.bin": MAX_ADAPTER_BYTES,
        }
        gate_folder(folder, limits, what="PEFT adapter folder", error=AdapterStateError)
    config = _read_config(folder)
    tensors, metadata = _read_weights(folder)
    fingerprint = None
    if "surgery_base_fingerprint" in metadata:
        try:
            fingerprint = Fingerprint.from_json(metadata["surgery_base_fingerprint"])
        except ValueError as exc:
            raise AdapterStateError(f"{folder / WEIGHTS_FILE}: unreadable base fingerprint ({exc})") from None
    return PeftFolder(folder, config, tensors, metadata, fingerprint)


@dataclass(frozen=True)
class PeftImport:
    """A PEFT LoRA folder read for one base: the rules that rebuild it there and the fine-tune's tensors by name."""

    folder: Path
    rules: RuleSet
    values: dict[str, torch.Tensor]
    tied_rows: torch.Tensor | None = None  # PEFT's one token delta for an output layer tied to the embedding


def read_peft_import(base: nn.Module, folder: str | Path | PeftFolder, *, quantize: str | None = None) -> PeftImport:
    """Read a PEFT LoRA folder for ``base``: which modules it adapts on this base (as PEFT would), their LoRA settings
    as a small rule set, and its weights under surgery's names; every check before anything is built.

    Args:
        base: the model the folder is loaded onto.
        folder: the PEFT adapter folder.
        quantize: int8, nf4, fp4 or none for how the base is stored; by default it is kept as it is held.

    Returns:
        A ``PeftImport`` that ``surgery.import_peft`` builds the fine-tune from.

    Raises:
        AdapterStateError: the folder is malformed, for another base, or does not plan on this one.
    """
    adapter = folder if isinstance(folder, PeftFolder) else read_peft_folder(folder)
    folder, config, tensors = adapter.path, adapter.config, adapter.tensors
    if adapter.fingerprint is not None:
        why = adapter.fingerprint.mismatch(base_fingerprint(base))
        if why is not None:
            raise AdapterStateError(
                f"{folder}: was exported from another base ({adapter.base_model or 'unnamed'}) "
                f"than this {type(base).__name__}: {why}"
            )
    modules_to_save = config.get("modules_to_save") or []
    names = {path.rsplit(".", 1)[-1] for path, _ in base.named_modules()} | {p for p, _ in base.named_modules()}
    unknown = [m for m in modules_to_save if not isinstance(m, str) or m not in names]
    if unknown:
        raise AdapterStateError(
            f"{folder / CONFIG_FILE}: modules_to_save names {unknown[0]!r}, which this "
            f"{type(base).__name__} has no module of; the adapter is for another model"
        )
    adapters, plain, tokens = _split_keys(folder, tensors, modules_to_save)
    plain_modules = {name.rsplit(".", 1)[0] for name in plain}
    paths = _check_modules(adapter, base, set(adapters), plain_modules)
    extra = _extra_tokens(adapter, tokens)
    rank, alpha = (_pattern_lookup(config.get(f), f, folder / CONFIG_FILE) for f in ("rank_pattern", "alpha_pattern"))
    loras = {path: _lora_config(config, path, parts, rank, alpha) for path, parts in adapters.items()}
    recorded = recorded_rules(adapter) if quantize is None else None
    if recorded is not None and _rebuilds(base, recorded, loras, plain_modules):
        rules = recorded  # surgery's own export: the rules it was trained with, its base's storage included
    else:
        try:
            rules = parse_rules(
                {**_rules_for(base, paths, loras, plain_modules, quantize), **extra}, source=f"{folder} (PEFT)"
            )
        except RuleFileError as exc:  # a value of adapter_config.json out of range: name the file it came from
            raise AdapterStateError(f"{folder / CONFIG_FILE}: a setting is out of range ({exc})") from None
        _check_rules(folder, rules, paths, set(adapters), plain_modules)
    values = {}
    for path, parts in adapters.items():
        values[f"{path}.lora_A"], values[f"{path}.lora_B"] = parts["A"], parts["B"]
        if "bias" in parts:  # PEFT scales its lora_B bias; ours is added as is
            lora = loras[path]
            scaling = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], use_rslora=lora["use_rslora"]).scaling
            values[f"{path}.lora_bias"] = parts["bias"] * scaling
        if "magnitude" in parts:
            values[f"{path}.lora_magnitude"] = parts["magnitude"]
    values.update(plain)
    values.update({f"{path}.extra_rows": rows for path, rows in tokens.items()})
    tied = next(iter(tokens.values())) if len(tokens) == 1 else None
    return PeftImport(folder, rules, values, tied)


def recorded_rules(adapter: PeftFolder) -> RuleSet | None:
    """The rules of the fine-tune surgery exported this folder from (None for a folder surgery did not write).

    Args:
        adapter: the folder, as ``read_peft_folder`` read it.

    Returns:
        The rules, parsed as a rule file is: they say how the base was stored when the fine-tune trained.

    Raises:
        AdapterStateError: the recorded rules are oversized or invalid.
    """
    text = adapter.metadata.get("surgery_rules")
    if text is None:
        return None
    where = adapter.path / WEIGHTS_FILE
    if len(text) > MAX_RULES_JSON:
        raise AdapterStateError(f"{where}: its recorded rules are {len(text):,} characters; at most {MAX_RULES_JSON:,}")
    try:
        return parse_rules(json.loads(text), source=f"{where}#surgery_rules")
    except (ValueError, RecursionError) as exc:
        raise AdapterStateError(f"{where}: its recorded rules are not valid JSON ({first_line(exc)})") from None
    except SurgeryError as exc:
        raise AdapterStateError(f"{where}: its recorded rules are invalid: {exc}") from None


def _rebuilds(base: nn.Module, rules: RuleSet, loras: dict[str, dict], plain: set[str]) -> bool:
    """Whether ``rules`` adapt on ``base`` exactly the modules the folder's weights adapt, with the LoRA settings its
    ``adapter_config.json`` gives, and copy exactly its plain modules (else the config, not the record, is read)."""
    decided = make_plan(base_graph(base), rules, check=False)
    if decided.violations and any(v.constraint != "C1" for v in decided.violations):
        return False
    adapted = {d.path: d.lora for d in decided.by_action("adapt")}
    if set(adapted) != set(loras) or {d.path for d in decided.by_action("plain")} != plain:
        return False
    for path, lora in loras.items():
        mine = adapted[path].to_dict()
        if any(mine.get(key, False) != value for key, value in lora.items() if key != "dropout"):  # training only
            return False
    return True


def _extra_tokens(adapter: PeftFolder, tokens: dict[str, torch.Tensor]) -> dict:
    """The rule file's ``extra_tokens`` for a folder with trainable token rows: PEFT names them by id only, so they
    are read where surgery exported them (the token strings are in its metadata) and refused otherwise."""
    indices = adapter.config.get("trainable_token_indices")
    if not tokens and not indices:
        return {}
    where = adapter.path / CONFIG_FILE
    try:
        extra = json.loads(adapter.metadata["surgery_extra_tokens"])
        first, count = int(extra["first_id"]), len(extra["tokens"])
    except (KeyError, ValueError, TypeError):
        raise AdapterStateError(
            f"{where}: trains token rows (trainable_token_indices), which PEFT names by id only, "
            "and the folder does not say which tokens they are; surgery's extra tokens need the "
            "strings: load the adapter surgery saved (adapter.safetensors, surgery.load_adapter), "
            "or merge it with PEFT"
        ) from None
    expected = list(range(first, first + count))
    if (
        not isinstance(indices, dict)
        or any(ids != expected for ids in indices.values())
        or {p.rsplit(".", 1)[-1] for p in tokens} != set(indices)
        or any(tuple(t.shape)[0] != count for t in tokens.values())
    ):
        raise AdapterStateError(
            f"{where}: trainable_token_indices {str(indices)[:200]} and the token rows are not the "
            f"{count} extra tokens from id {first} the folder's metadata names; the folder is "
            "inconsistent"
        )
    return {"extra_tokens": extra}


def is_peft_folder(path: str | Path) -> bool:
    """Whether ``path`` is a PEFT adapter folder (``adapter_config.json``) without a surgery adapter file: read it with
    ``import_peft`` (a folder ``save_pretrained`` wrote holds both; ``read_adapter`` reads its adapter file)."""
    path = Path(path)
    return path.is_dir() and os.path.lexists(path / CONFIG_FILE) and not os.path.lexists(path / ADAPTER_FILE)


def peft_base_model(folder: str | Path) -> str | None:
    """The base model a PEFT adapter folder names (``base_model_name_or_path``), if any."""
    return _read_config(Path(folder)).get("base_model_name_or_path") or None


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise AdapterStateError(f"{folder}: not a folder; a PEFT adapter is a folder with {CONFIG_FILE}")
    if not path.exists():
        raise AdapterStateError(f"{path}: missing; not a PEFT adapter folder")
    text = read_user_text(path, what="PEFT adapter config", limit=MAX_CONFIG_BYTES, error=AdapterStateError)
    try:
        config = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise AdapterStateError(f"{path}: not readable JSON ({first_line(exc)})") from None
    if not isinstance(config, dict):
        raise AdapterStateError(f"{path}: must hold a JSON object")
    if config.get("peft_type") != "LORA":
        raise AdapterStateError(
            f"{path}: peft_type {config.get('peft_type')!r} is not supported; surgery reads LoRA adapters only"
        )
    for key, what in UNSUPPORTED.items():
        if config.get(key):
            raise AdapterStateError(f"{path}: uses {what} ({key}), which surgery does not support; nothing was loaded")
    if config.get("bias", "none") != "none":
        raise AdapterStateError(
            f"{path}: bias={config['bias']!r} trains the base's biases, which surgery keeps "
            "frozen; only bias='none' is supported"
        )
    return config


def _read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The weights by key, and the safetensors header's metadata ({} for the legacy .bin)."""
    safe, pickled = folder / WEIGHTS_FILE, folder / "adapter_model.bin"
    for candidate in (safe, pickled):
        if candidate.exists():
            check_user_file(
                candidate, what="PEFT adapter weights file", limit=MAX_ADAPTER_BYTES, error=AdapterStateError
            )
    try:
        if safe.is_file():
            from safetensors import safe_open

            with safe_open(safe, framework="pt") as f:
                return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata() or {})
        if pickled.is_file():  # legacy PEFT format; tensors only, never arbitrary objects
            return torch.load(pickled, map_location="cpu", weights_only=True), {}
    except Exception as exc:  # safetensors and torch.load report corruption in many ways
        raise AdapterStateError(
            f"{safe if safe.is_file() else pickled}: unreadable adapter weights "
            f"({type(exc).__name__}: {first_line(exc)})"
        ) from None
    raise AdapterStateError(f"{folder}: has no {WEIGHTS_FILE} (or adapter_model.bin)")


KEY = re.compile(
    r"^(?P<path>.+)\.(?:(?P<ab>lora_[AB])\.(?P<param>weight|bias)|(?P<emb>lora_embedding_[AB])"
    r"|(?P<magnitude>lora_magnitude_vector)(?:\.weight)?)$"
)


def _split_keys(folder: Path, tensors: dict, modules_to_save: list[str]):
    """{module: {A, B, bias}} for LoRA keys, {param name: tensor} for modules_to_save and {module: rows} for trainable
    tokens; anything else fails."""
    adapters: dict[str, dict[str, torch.Tensor]] = {}
    plain: dict[str, torch.Tensor] = {}
    tokens: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        name = key.removeprefix(PREFIX)
        m = KEY.match(name)
        if m and m["magnitude"]:
            adapters.setdefault(m["path"], {})["magnitude"] = t
        elif m and (m["emb"] or m["param"] == "weight" or m["ab"] == "lora_B"):
            part = (m["emb"] or m["ab"])[-1] if m["param"] != "bias" else "bias"
            adapters.setdefault(m["path"], {})[part] = t
        elif any(name.rsplit(".", 1)[0] == s or name.rsplit(".", 1)[0].endswith("." + s) for s in modules_to_save):
            plain[name] = t
        elif name.endswith("." + TOKEN_DELTA):
            tokens[name.removesuffix("." + TOKEN_DELTA)] = t
        elif ".base_layer." in name:
            continue  # PEFT may save an adapted embedding's base weight; the base supplies it
        else:
            raise AdapterStateError(
                f"{folder / WEIGHTS_FILE}: key '{key}' is not a LoRA A/B weight or a "
                "modules_to_save weight; surgery cannot represent it"
            )
    for path, parts in adapters.items():
        if "A" not in parts or "B" not in parts:
            raise AdapterStateError(
                f"{folder / WEIGHTS_FILE}: '{path}' has lora_{'B' if 'A' in parts else 'A'} "
                f"but no lora_{'A' if 'A' not in parts else 'B'}"
            )
    return adapters, plain, tokens


def _lora_config(config: dict, path: str, parts: dict, rank: Callable, alpha: Callable) -> dict:
    """One adapted module's LoRA settings; ``rank`` / ``alpha`` look up ``rank_pattern`` / ``alpha_pattern``."""
    if bool(config.get("use_dora")) != ("magnitude" in parts):
        raise AdapterStateError(
            f"adapter_config.json {'sets' if config.get('use_dora') else 'does not set'} "
            f"use_dora but {path} {'has no' if config.get('use_dora') else 'has a'} "
            "lora_magnitude_vector; the folder is inconsistent"
        )
    r = parts["A"].shape[0]
    declared = rank(path, config.get("r", r))
    if declared != r:
        raise AdapterStateError(f"adapter_config.json gives {path} rank {declared} but its lora_A has {r} rows")
    return {
        "r": int(r),
        "alpha": float(alpha(path, config.get("lora_alpha", 8))),
        "dropout": float(config.get("lora_dropout", 0.0)),
        "bias": "bias" in parts,
        "use_rslora": bool(config.get("use_rslora", False)),
        **({"use_dora": True} if "magnitude" in parts else {}),
        "dtype": str(parts["A"].dtype).removeprefix("torch."),
    }


def _pattern_lookup(patterns, field: str, where: Path) -> Callable[[str, object], object]:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup (``get_pattern_key``): the value of the first key ``k``
    for which ``(.*\\.)?(k)$`` matches the module path from its start, else the default.

    Raises:
        AdapterStateError: the field is not a mapping, a key is not a valid regex, or one backtracks too long.
    """
    if not isinstance(patterns or {}, dict):
        raise AdapterStateError(f"{where}: {field} must be a mapping of module patterns to values, not {patterns!r}")
    keys = [(_peft_regex(where, field, rf"(.*\.)?({key})$"), value) for key, value in (patterns or {}).items()]

    def lookup(path: str, default):
        return next((value for pattern, value in keys if _found(where, field, pattern.match, path)), default)

    return lookup


# ---------------------------------------------------------------------------- which modules, as PEFT picks them


def _check_modules(adapter: PeftFolder, base: nn.Module, adapted: set[str], plain: set[str]) -> list[str]:
    """Refuse a folder whose weights name modules the base lacks, or whose adapter_config.json selects other modules
    for LoRA on this base than its weights hold (PEFT would leave those at their start, or drop weights).

    Returns:
        Every module path of the base (the root's empty path left out), in order.

    Raises:
        AdapterStateError: naming the folder and the first module that differs.
    """
    paths = [path for path, _ in base.named_modules() if path]
    known = set(paths)
    lacking = next((p for p in sorted(adapted | plain) if p not in known), None)
    if lacking is not None:
        raise AdapterStateError(
            f"{adapter.path / WEIGHTS_FILE}: holds weights for '{lacking}', which this {type(base).__name__} has no "
            "module of; the adapter is for another model"
        )
    selected = _selected(adapter.config, adapter.path / CONFIG_FILE, paths)
    differs = None if selected is None else next((p for p in paths if (p in adapted) != (p in selected)), None)
    if differs in adapted:
        raise AdapterStateError(
            f"{adapter.path}: {WEIGHTS_FILE} holds LoRA weights for '{differs}', which {CONFIG_FILE} does not select "
            f"on this {type(base).__name__} (target_modules, layers_to_transform, exclude_modules, modules_to_save); "
            "the config and the weights are of different adapters: export the adapter again"
        )
    if differs is not None:
        raise AdapterStateError(
            f"{adapter.path}: {CONFIG_FILE} selects '{differs}' for LoRA on this {type(base).__name__}, but "
            f"{WEIGHTS_FILE} holds no LoRA weights for it; the config and the weights are of different adapters: "
            "export the adapter again"
        )
    return paths


def _selected(config: dict, where: Path, paths: list[str]) -> set[str] | None:
    """The modules PEFT 0.22 gives a LoRA layer (``check_target_module_exists``) on a model with these module paths.

    ``target_modules`` as names selects a module whose path equals a name or ends in ``.name`` (the latter then
    narrowed by ``layers_to_transform``); as a string it is a regex the whole path must match. ``exclude_modules``
    (the same two forms) and ``modules_to_save`` are left out. None where PEFT picks by model type instead (no
    ``target_modules``, or ``all-linear``, which PEFT writes out as names when it saves): the weights decide there.

    Raises:
        AdapterStateError: a field of the wrong type, a pattern that is not a valid regex or backtracks too long.
    """
    targets = config.get("target_modules")
    if targets is None or (isinstance(targets, str) and targets.lower() == "all-linear"):
        return None
    excluded = _names_test(config.get("exclude_modules") or [], "exclude_modules", where, lambda path: True)
    saved = [
        _peft_regex(where, "modules_to_save", rf"(^|.*\.){m}($|\..*)") for m in config.get("modules_to_save") or []
    ]
    targeted = _names_test(targets, "target_modules", where, _layers_test(config, where))
    return {
        p
        for p in paths
        if not excluded(p) and not any(_found(where, "modules_to_save", s.match, p) for s in saved) and targeted(p)
    }


def _names_test(value, field: str, where: Path, in_layers: Callable[[str], bool]) -> Callable[[str], bool]:
    """PEFT's test of a module path against ``target_modules`` / ``exclude_modules``: a regex string to match whole,
    or names equal to the path (selected as they are) or to a dot-aligned suffix of it (then also ``in_layers``)."""
    if isinstance(value, str):
        pattern = _peft_regex(where, field, value)
        return lambda path: _found(where, field, pattern.fullmatch, path)
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise AdapterStateError(
            f"{where}: {field} must be a list of module names or a regex string, not {value!r:.200}"
        )
    names = set(value)
    return lambda path: path in names or (not names.isdisjoint(_suffixes(path)) and in_layers(path))


def _suffixes(path: str) -> set[str]:
    """What follows each dot of a module path: the names ``path.endswith("." + name)`` holds for."""
    return {path[i + 1 :] for i, c in enumerate(path) if c == "."}


def _layers_test(config: dict, where: Path) -> Callable[[str], bool]:
    """PEFT's ``layers_to_transform`` (one index or a list) with ``layers_pattern``: whether a path's first layer
    index (after a ``layers_pattern`` part, else after any part) is one of them; no test when it is unset or empty."""
    indexes, names = config.get("layers_to_transform"), config.get("layers_pattern")
    if indexes is None or indexes == []:
        return lambda path: True
    if not _is_index(indexes) and not (isinstance(indexes, list) and all(map(_is_index, indexes))):
        raise AdapterStateError(
            f"{where}: layers_to_transform must be a layer index or a list of them, not {indexes!r:.200}"
        )
    wanted = set(indexes) if isinstance(indexes, list) else {indexes}
    names = [names] if isinstance(names, str) else names or []
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise AdapterStateError(f"{where}: layers_pattern must be a name or a list of names, not {names!r:.200}")
    finders = [_peft_regex(where, "layers_pattern", rf"(?:^|.*?\.){name}\.(?P<idx>\d+)\.") for name in names]
    finders = finders or [compile_regex(r".*?\.[^.]*\.(?P<idx>\d+)\.")]

    def in_layers(path: str) -> bool:
        found = next((m for f in finders if (m := _found(where, "layers_pattern", f.match, path, whole=True))), None)
        return found is not None and int(found["idx"]) in wanted

    return in_layers


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _peft_regex(where: Path, field: str, text: str):
    """A regex built from adapter_config.json (PEFT hands these to ``re`` as written), compiled for timed matching."""
    try:
        return compile_regex(text)
    except Exception as exc:  # the regex package reports bad patterns in several types
        raise AdapterStateError(
            f"{where}: {field} pattern {text[:200]!r} is not a valid regex ({first_line(exc)})"
        ) from None


def _found(where: Path, field: str, match: Callable, path: str, *, whole: bool = False):
    """``match(path)`` within REGEX_TIMEOUT: a bool, or the match itself with ``whole``."""
    try:
        found = match(path, timeout=REGEX_TIMEOUT)
    except TimeoutError:
        raise AdapterStateError(
            f"{where}: a {field} pattern takes over {REGEX_TIMEOUT} s to match '{path}' (catastrophic backtracking); "
            "nothing was loaded"
        ) from None
    return found if whole else found is not None


# ---------------------------------------------------------------------------------------------- the rules


def _rules_for(
    base: nn.Module, paths: list[str], loras: dict[str, dict], plain: set[str], quantize: str | None
) -> dict:
    """Rules that rebuild the adapter, as few as its settings allow: per (LoRA settings, storage) the adapted modules
    as patterns collapsed by layer index (``covering_patterns``), the plain modules alike, and freeze the rest.
    Their number grows with the distinct settings and module positions in a block, never with depth."""
    held = {path: quantized_storage(m) for path, m in base.named_modules()}
    scheme = quantize or "none"
    groups: dict[tuple, list[str]] = {}
    for path, lora in sorted(loras.items()):
        groups.setdefault((tuple(sorted(lora.items())), held.get(path) or scheme), []).append(path)
    rules = [
        {"match": match, "action": "adapt", "lora": dict(lora), "quantize": storage}
        for (lora, storage), members in groups.items()
        for match in covering_patterns(members, paths)
    ]
    rules += [{"match": match, "action": "plain", "untie": True} for match in covering_patterns(sorted(plain), paths)]
    return {
        "quantize": QuantConfig(scheme).to_dict() if quantize else "none",
        "default": "quantize" if quantize and quantize != "none" else "freeze",
        "rules": rules,
    }


def _check_rules(folder: Path, rules: RuleSet, paths: list[str], adapted: set[str], plain: set[str]) -> None:
    """Refuse (before anything is built) rules that would adapt or copy other modules than the folder's weights name.

    Raises:
        AdapterStateError: naming the folder and the first module whose rule disagrees with the weights.
    """
    for path in paths:
        rule = rules.decide(path, "other")  # the rules name no module kind
        got = rule.action if rule is not None and rule.action in ("adapt", "plain") else "freeze"
        wanted = "adapt" if path in adapted else "plain" if path in plain else "freeze"
        if got != wanted:
            raise AdapterStateError(
                f"{folder}: the rules read from this PEFT adapter would {got} '{path}', where its weights "
                f"{'adapt' if wanted == 'adapt' else 'copy' if wanted == 'plain' else 'leave'} it; nothing was loaded"
            )
