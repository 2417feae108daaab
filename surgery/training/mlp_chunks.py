"""Each decoder layer's MLP computed over the tokens in chunks (``--mlp-chunk-tokens``): its inner activations never
exist for the whole sequence at once.

At long context the MLP's inner activations are the largest thing a decoder layer keeps for backward: gate, up,
their product and the LoRA dropout copies, each tokens x intermediate values (about 170 KiB per token in a
Llama-3.1-8B layer under bf16, against 8 KiB for the layer's input). A transformer MLP works on each token alone, so
computing it chunk by chunk over the tokens gives the same values; each chunk runs under non-reentrant
``torch.utils.checkpoint``, so the forward keeps only the chunk's input (a view of the MLP's input, which the layer
keeps anyway) and the backward recomputes one chunk's inner activations at a time (replaying the random state, so
LoRA dropout draws the same masks). With ``--gradient-checkpointing`` this bounds what one layer's recomputation
holds; without it, what every layer keeps.

The chunking is switched on for a training run only (``chunked_mlps``, a context manager around the run): the
fine-tune's own MLP modules (never the base's, which a fine-tune does not share as modules) take a class that chunks,
and get their own class back afterwards, so saved, merged and exported fine-tunes are as without.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..base.ownership import finetune_info
from ..errors import TrainError
from ..finetune.rewriting import subclass_of

MLP_NAMES = ("mlp",)  # the attribute of a decoder layer holding its feed-forward block (Llama, Qwen, Mistral, GPT-2)


class TokenChunked(nn.Module):
    """A feed-forward block computed ``chunk_tokens`` tokens at a time along its input's second-to-last dimension."""

    chunk_tokens: int

    def forward(self, hidden: torch.Tensor, *args, **kwargs):
        whole = super().forward
        if args or kwargs or not torch.is_tensor(hidden) or hidden.dim() < 2:
            return whole(hidden, *args, **kwargs)
        chunk = self.__dict__["chunk_tokens"]
        if hidden.shape[-2] <= chunk:
            return whole(hidden)
        pieces = []
        for part in hidden.split(chunk, dim=-2):
            part = part.contiguous()  # a row-major chunk, as the layers' kernels (int8, Conv1D views) expect
            out = checkpoint(whole, part, use_reentrant=False) if torch.is_grad_enabled() else whole(part)
            if not torch.is_tensor(out) or out.shape[:-1] != part.shape[:-1]:
                raise TrainError(
                    f"--mlp-chunk-tokens: {type(self).base_class.__name__} does not map each token to one output "
                    "(it returns more than a tensor per token, e.g. a mixture of experts' router logits); train "
                    "without --mlp-chunk-tokens"
                )
            pieces.append(out)
        return torch.cat(pieces, dim=-2)


def feed_forward_blocks(model: nn.Module) -> list[nn.Module]:
    """The feed-forward block (``mlp``) of every decoder layer of ``model``.

    Args:
        model: a causal LM (a fine-tune).

    Returns:
        The blocks, in layer order.

    Raises:
        TrainError: the model's layers have no ``mlp`` block (e.g. OPT, whose layers hold fc1/fc2 themselves).
    """
    blocks = [
        getattr(m, name) for m in model.modules() for name in MLP_NAMES if isinstance(getattr(m, name, None), nn.Module)
    ]
    if not blocks:
        raise TrainError(
            f"--mlp-chunk-tokens: {type(model).__name__}'s decoder layers have no `mlp` block to compute in chunks "
            "(their feed-forward layers sit in the layer itself); train without --mlp-chunk-tokens"
        )
    return blocks


@contextlib.contextmanager
def chunked_mlps(model: nn.Module, chunk_tokens: int) -> Iterator[None]:
    """Within the block, every feed-forward block of ``model`` computes ``chunk_tokens`` tokens at a time; the blocks
    get their own classes back at exit. ``chunk_tokens`` 0 (or None) changes nothing.

    Args:
        model: the fine-tune (its own module objects are changed, never the base's).
        chunk_tokens: tokens per chunk.

    Raises:
        TrainError: the model has no ``mlp`` blocks (``feed_forward_blocks``).
    """
    if not chunk_tokens:
        yield
        return
    blocks = feed_forward_blocks(model)
    info = finetune_info(model)
    shared = {id(m) for m in info.base.modules()} if info is not None else set()
    if any(id(block) in shared for block in blocks):  # never the case for a fine-tune made by surgery
        raise TrainError("--mlp-chunk-tokens: a feed-forward block is the base's own module; nothing was changed")
    classes = [type(block) for block in blocks]
    try:
        for block, cls in zip(blocks, classes):
            block.__class__ = subclass_of(TokenChunked, cls)
            block.__dict__["chunk_tokens"] = chunk_tokens
        yield
    finally:
        for block, cls in zip(blocks, classes):
            block.__class__ = cls
            block.__dict__.pop("chunk_tokens", None)
