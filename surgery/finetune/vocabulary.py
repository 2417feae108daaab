"""A fine-tune's own new tokens (the rule file's ``extra_tokens:``): private embedding and output rows, its own
vocabulary size, and the tokenizer that gives those tokens their ids. The base and every sibling are untouched."""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from ..errors import RewriteError
from ..layers.bnb import dense_weight, logical_shape, quantized_storage
from ..layers.extra_tokens import ExtraTokenEmbedding, ExtraTokenHead, extra_token_layers
from ..model.tracing import replace_submodule
from ..rules.ruleset import ExtraTokens, RuleSet


def first_extra_id(model: nn.Module, rules: RuleSet) -> int | None:
    """The id of the first extra token (None without ``extra_tokens:``); raises before anything changes when the
    model cannot take them."""
    extra = rules.extra_tokens
    if extra is None:
        return None
    embedding, head = _embedding_paths(model)
    if embedding is None or head is None:
        raise RewriteError(
            f"{rules.source}: extra_tokens needs a model with an input embedding and an output layer "
            f"(get_input_embeddings / get_output_embeddings); {type(model).__name__} lacks one"
        )
    rows = logical_shape(_innermost(model.get_submodule(embedding)))[0]
    first = rows if extra.first_id is None else extra.first_id
    if first > rows:
        raise RewriteError(
            f"{rules.source}: extra_tokens first_id {first} leaves ids {rows}..{first - 1} with no row "
            f"(the embedding has {rows}); use first_id <= {rows} (the tokenizer's length)"
        )
    return first


def add_extra_tokens(finetune: nn.Module, extra: ExtraTokens, first_id: int) -> None:
    """Wrap the fine-tune's input embedding and output layer with private rows for ``extra`` (each starting at the
    mean of the base's rows; one set for both when the base ties them) and set its config's vocab_size to the new
    width."""
    embedding_path, head_path = _embedding_paths(finetune)
    count = len(extra.tokens)
    inner = {path: _innermost(finetune.get_submodule(path)) for path in (embedding_path, head_path)}
    tied = inner[embedding_path].weight is inner[head_path].weight
    rows = None
    for path, cls in ((embedding_path, ExtraTokenEmbedding), (head_path, ExtraTokenHead)):
        layer = finetune.get_submodule(path)
        if rows is None or not tied:  # trained in float32, as LoRA
            rows = nn.Parameter(_mean_row(inner[path], cls is ExtraTokenEmbedding).expand(count, -1).clone())
        base_rows = logical_shape(inner[path])[0]
        replace_submodule(finetune, path, cls(layer, first_id, rows, base_rows).train(layer.training))
    width = finetune.get_submodule(embedding_path).width
    if getattr(finetune, "config", None) is not None:
        finetune.config.vocab_size = width  # transformers' loss reshapes the logits by it
        if hasattr(finetune.config, "get_text_config"):
            finetune.config.get_text_config().vocab_size = width


def pinned_to(rules: RuleSet, tokenizer) -> RuleSet:
    """The rules with the extra tokens' first id set to the tokenizer's length where the file leaves it open: the
    ids ``tokenizer.add_tokens`` will give them (what the CLI trains with, recorded in the adapter file)."""
    extra = rules.extra_tokens
    if extra is None or extra.first_id is not None:
        return rules
    return dataclasses.replace(rules, extra_tokens=dataclasses.replace(extra, first_id=len(tokenizer)))


def tokenizer_with(extra: ExtraTokens, first_id: int, tokenizer):
    """A copy of ``tokenizer`` with ``extra`` added, each checked to get its id (``first_id`` on): a token already
    in the tokenizer, or a tokenizer of another length, would feed rows the fine-tune does not hold."""
    out = copy.deepcopy(tokenizer)
    out.add_tokens(list(extra.tokens))
    ids = out.convert_tokens_to_ids(list(extra.tokens))
    expected = list(range(first_id, first_id + len(extra.tokens)))
    if ids != expected:
        wrong = next(i for i, (got, want) in enumerate(zip(ids, expected)) if got != want)
        token, where = extra.tokens[wrong], f"{extra.where}: " if extra.where else ""
        if ids[wrong] < len(tokenizer):
            raise RewriteError(
                f"{where}extra token {token!r} is already in the tokenizer's vocabulary (id {ids[wrong]}); a new "
                "token must be a string the tokenizer does not know: rename it (e.g. with angle brackets) or drop it "
                "from the list"
            )
        raise RewriteError(
            f"{where}the tokenizer gives extra token {token!r} the id {ids[wrong]}, but the "
            f"fine-tune's row for it is {expected[wrong]} (its tokens start at {first_id}); use the "
            f"tokenizer the fine-tune was trained with (of length {first_id})"
        )
    return out


def extended_tokenizer(finetune: nn.Module, tokenizer):
    """``tokenizer`` (the base's) with the fine-tune's extra tokens added, as a copy; the same object when the
    fine-tune adds none."""
    from ..base.ownership import require_finetune

    extra = require_finetune(finetune, "given a tokenizer").rules.extra_tokens
    layers = extra_token_layers(finetune)
    if extra is None or not layers:
        return tokenizer
    return tokenizer_with(extra, layers[0][1].first_id, tokenizer)


def _embedding_paths(model: nn.Module) -> tuple[str | None, str | None]:
    wanted = {
        "in": model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None,
        "out": model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None,
    }
    paths = {id(m): path for path, m in model.named_modules()}
    return tuple(paths.get(id(wanted[k])) if wanted[k] is not None else None for k in ("in", "out"))


def _mean_row(layer: nn.Module, embedding: bool) -> torch.Tensor:
    """The mean of the layer's rows in float32, where new rows start; a full-precision weight is averaged in place
    (a float32 copy of a 128k-row embedding would be gigabytes), a quantized one dequantized."""
    if quantized_storage(layer):
        return dense_weight(layer, "embedding" if embedding else "linear").mean(dim=0, keepdim=True)
    return torch.mean(layer.weight.detach(), dim=0, keepdim=True, dtype=torch.float32)


def _innermost(layer: nn.Module) -> nn.Module:
    while hasattr(layer, "base_layer"):
        layer = layer.base_layer
    return layer
