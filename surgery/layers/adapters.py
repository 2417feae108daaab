"""Which adapter wrapper a layer gets: LoRA (``lora``) or DoRA (``dora``) for its op kind."""

from __future__ import annotations

from torch import nn

from ..rules.ruleset import LoraConfig
from .dora import DoraConv1D, DoraLinear
from .lora import LoraConv1D, LoraEmbedding, LoraLayer, LoraLinear, LoraPositionalEmbedding


def make_adapter(base_layer: nn.Module, kind: str, config: LoraConfig) -> LoraLayer:
    """The adapter wrapper for a layer of op kind ``kind`` (linear, conv1d, embedding, positional); DoRA with
    ``use_dora`` (linear and conv1d: the plan refuses it on embeddings)."""
    if kind == "positional":
        cls = LoraPositionalEmbedding
    elif kind == "embedding":
        cls = LoraEmbedding
    elif kind == "conv1d" and not isinstance(base_layer, nn.Linear):
        cls = DoraConv1D if config.use_dora else LoraConv1D
    else:
        cls = DoraLinear if config.use_dora else LoraLinear
    return cls(base_layer, config).train(base_layer.training)  # a new module must not flip the model's mode
