"""What LoRA servers load: a PEFT export checked against vLLM's or LoRAX's documented loading rules.

``check_servable(finetune, config, target)`` runs before ``export_peft`` writes anything, so an
adapter that a server would refuse at load time (or, worse, load with parts silently ignored) is
refused here with the module or field and what to change. The rules, as those servers state them:

* vLLM (``vllm/lora/peft_helper.py``, ``vllm/lora/utils.py``): no ``modules_to_save``; weights
  named ``lora_A.weight`` / ``lora_B.weight`` / ``lora_embedding_A`` / ``lora_embedding_B`` only
  (so no LoRA bias); one scaling ``lora_alpha / r`` (or ``/ sqrt(r)`` with rsLoRA) for every
  module; rank at most ``--max-lora-rank``, which takes 1, 8, 16, 32, 64, 128, 256, 320 or 512;
  LoRA on linear layers, and on ``embed_tokens`` / ``lm_head`` where the model lists them.
* LoRAX (``docs/models/adapters/lora.md``): per architecture a list of target modules; others are
  ignored with a warning on the server, which we refuse instead. LoRA A/B weights only.
* Neither loads DoRA (``use_dora``): vLLM's ``PEFTHelper`` refuses it, LoRAX reads no magnitude vector.
"""

from __future__ import annotations

import math
from typing import Literal

from torch import nn

from ..base.ownership import require_finetune
from ..errors import ExportError
from ..layers.lora import LoraEmbedding, LoraLayer

Target = Literal["peft", "vllm", "lorax"]
TARGETS: tuple[Target, ...] = ("peft", "vllm", "lorax")
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
LORAX_TARGETS: dict[str, tuple[str, ...]] = {  # model_type -> module names LoRAX adapts (its documented list)
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "cohere": _LLAMA_LIKE,
    "mixtral": ("q_proj", "k_proj", "v_proj", "o_proj", "lm_head"),
    "gemma": _LLAMA_LIKE[:-1],
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"),
    "phi": ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2", "lm_head"),
    "qwen": ("c_attn", "c_proj", "w1", "w2", "lm_head"),
    "dbrx": ("Wqkv", "out_proj", "lm_head"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "bloom": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "lm_head"),
}


def check_target(target: str) -> Target:
    """``target`` if it is one of TARGETS, else an ExportError listing them."""
    if target not in TARGETS:
        raise ExportError(f"unknown export target {target!r}; choose one of {', '.join(TARGETS)}")
    return target  # type: ignore[return-value]


def check_servable(finetune: nn.Module, config: dict, target: Target) -> None:
    """Raise ExportError naming the first module or field that ``target`` cannot serve as exported."""
    check_target(target)
    if target == "peft":
        return
    server = "vLLM" if target == "vllm" else "LoRAX"
    _refuse_modules_to_save(config, server)
    if config.get("trainable_token_indices"):
        raise ExportError(
            f"this fine-tune adds its own tokens (trainable_token_indices), whose rows {server}'s LoRA "
            "loader does not read (it loads LoRA A/B weights over the base's vocabulary); serve a merged "
            "model (`surgery merge`, which writes the tokenizer with the new tokens)"
        )
    adapters = {path: m for path, m in finetune.named_modules() if isinstance(m, LoraLayer)}
    biased = sorted(p for p, m in adapters.items() if m.lora_bias is not None)
    if biased:
        raise ExportError(
            f"{biased[0]}: has a LoRA bias (lora_B.bias), a weight {server} does not load (it reads "
            "lora_A/lora_B weights only); train with `lora: {bias: false}` in the rule file, or serve "
            "a merged model (`surgery merge`)"
        )
    dora = sorted(p for p, m in adapters.items() if m.config.use_dora)
    if dora:
        why = (
            'vLLM\'s adapter loader refuses use_dora ("vLLM does not yet support DoRA")'
            if target == "vllm"
            else "LoRAX reads LoRA A/B weights only, so DoRA's magnitude would be dropped"
        )
        raise ExportError(
            f"{dora[0]}: is a DoRA adapter; {why}. Serve a merged model (`surgery merge`), or train without use_dora"
        )
    _refuse_mixed_scaling(adapters, config, server)
    if target == "vllm":
        _check_vllm_targets(finetune, adapters)
        rank = max(m.config.r for m in adapters.values())
        if rank > VLLM_MAX_LORA_RANKS[-1]:
            raise ExportError(
                f"rank {rank} is above the largest --max-lora-rank vLLM accepts "
                f"({VLLM_MAX_LORA_RANKS[-1]}); train with a smaller `r`, or serve a merged model"
            )
    else:
        _check_lorax_targets(finetune, adapters)


def launch_hints(config: dict, target: Target) -> list[str]:
    """What to pass the server so it loads this export (vLLM: --enable-lora and the --max-lora-rank to use)."""
    if target != "vllm":
        return []
    rank = max([config["r"], *config.get("rank_pattern", {}).values()])
    allowed = next(r for r in VLLM_MAX_LORA_RANKS if r >= rank)
    return ["--enable-lora", f"--max-lora-rank {allowed}"]


def _refuse_modules_to_save(config: dict, server: str) -> None:
    plain = config.get("modules_to_save") or []
    if plain:
        raise ExportError(
            f"{', '.join(plain)}: trained in full (`plain` rules, PEFT's modules_to_save), which "
            f"{server} cannot serve as a LoRA adapter; train with a rule file without `plain` "
            "modules (adapt them instead), or serve a merged model (`surgery merge`)"
        )


def _refuse_mixed_scaling(adapters: dict[str, nn.Module], config: dict, server: str) -> None:
    """The server scales every module by the top-level lora_alpha / r; each module's own must equal it."""
    root = math.sqrt(config["r"]) if config.get("use_rslora") else config["r"]
    shared = config["lora_alpha"] / root
    for path, m in sorted(adapters.items()):
        if not math.isclose(m.scaling, shared, rel_tol=1e-6):
            raise ExportError(
                f"{path}: scales its LoRA by {m.scaling:g} (r={m.config.r}, alpha={m.config.lora_alpha:g}), "
                f"but {server} reads one r and lora_alpha for the whole adapter (scaling {shared:g}); "
                "give every adapted module the same alpha/r, or serve a merged model"
            )


def _check_vllm_targets(finetune: nn.Module, adapters: dict[str, nn.Module]) -> None:
    """vLLM adapts linear layers (attention and MLP projections), the input embedding and the output head."""
    from ..model.tracing import decoder_layers

    in_layers = {id(sub) for layer in decoder_layers(finetune) for sub in layer.modules()}
    head, embedding = finetune.get_output_embeddings(), finetune.get_input_embeddings()
    info = require_finetune(finetune, "exported")
    for path, m in sorted(adapters.items()):
        kind = info.plan.decisions[path].kind
        if kind == "conv1d":
            raise ExportError(
                f"{path}: a GPT-2-style Conv1D layer (PEFT's fan_in_fan_out), which vLLM's loader does "
                "not read; serve a merged model (`surgery merge`), or export --for peft"
            )
        if m is head or m is embedding:
            continue
        if isinstance(m, LoraEmbedding) or id(m) not in in_layers:
            raise ExportError(
                f"{path}: vLLM serves LoRA on the decoder layers' projections, the input embedding and "
                "lm_head; this module is none of them. Drop it from the rule file's adapt rules, or "
                "serve a merged model"
            )


def _check_lorax_targets(finetune: nn.Module, adapters: dict[str, nn.Module]) -> None:
    model_type = getattr(getattr(finetune, "config", None), "model_type", "")
    allowed = LORAX_TARGETS.get(model_type)
    if allowed is None:
        raise ExportError(
            f"LoRAX lists no LoRA target modules for model type {model_type!r} (it lists "
            f"{', '.join(sorted(LORAX_TARGETS))}); export --for peft or vllm, or serve a merged model"
        )
    for path in sorted(adapters):
        if path.rsplit(".", 1)[-1] not in allowed:
            raise ExportError(
                f"{path}: LoRAX adapts only {', '.join(allowed)} on {model_type} models and would "
                "ignore this module's LoRA; drop it from the rule file's adapt rules, or serve a "
                "merged model"
            )
