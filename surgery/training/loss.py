"""A causal LM's loss without its full logits: the output layer and the cross-entropy, chunk by chunk over the tokens.

``model(**batch).loss`` makes the logits of every token at once: tokens x vocabulary fp32 values, and as many
again for their gradient (2 GiB at 2,048 tokens of a 128k vocabulary), usually the largest activation of a
long-context step. Here the model body gives its final hidden states; the output layer (called as the module it is:
``nn.Linear``, a bitsandbytes ``Linear8bitLt`` / ``Linear4bit``, a ``LoraLinear`` over either, an
``ExtraTokenHead``, a plain trainable copy, a head tied to the input embedding) and the loss run over
``chunk_tokens`` tokens at a time, each chunk under non-reentrant ``torch.utils.checkpoint``: the forward keeps only
the chunk's hidden states (a view of the body's output) and its loss; the backward recomputes that chunk's logits
(replaying the random state, so head dropout draws the same masks) and frees them before the next chunk's.

Memory: at any moment at most one chunk's logits live, with what the cross-entropy makes of them: the head's output,
its fp32 copy, the log-softmax kept for backward and the gradient, at most four (chunk_tokens x vocab) fp32 tensors
(``tests/test_loss.py`` measures it): 16 bytes per token and vocabulary entry, 384 MiB for 512 tokens of a 49k
vocabulary and 1 GiB for 128k, whatever the sequence length (the full fp32 logits of 8,192 tokens alone are 1.5 GiB
and 3.9 GiB, and each of their companions as much again). The price is one more forward of the output layer per step
(its recomputation in backward).

Semantics are transformers' ``ForCausalLMLoss``: labels shifted by one (the last position predicts nothing),
``-100`` ignored, logits upcast to fp32 before the cross-entropy, the mean over the targets that are not ignored
(or the sum over ``num_items_in_batch``, as the ``Trainer`` passes under gradient accumulation), after the
post-processing the architecture's ``forward`` applies to ``head(hidden)``: soft-capping (Gemma 2/3/3n/4, VaultGemma,
NanoChat, Beam, RecurrentGemma), multiplying (Cohere's ``logit_scale``, HyperCLOVAX's ``logits_scaling``, Falcon-H1's
``lm_head_multiplier``) or dividing (Granite's ``logits_scaling``). ``causal_lm_parts`` finds the body and the head
and checks on a few tokens that they give the model's own logits and loss; what it cannot reproduce it refuses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint, noop_context_fn

from ..errors import TrainError
from ..layers.notices import notices_once
from .data import IGNORE

# 512 tokens: the head's matrix product then has 512 rows, enough to keep a GPU's tensor cores busy (its arithmetic
# intensity is about the row count in flops per byte of weight read, above an H100's ~300), and a quantized head is
# dequantized once per 512 tokens, not per handful; the chunk's logits and their gradient stay 1/4 of the full
# logits at 2,048 tokens and 1/16 at 8,192 (0.5 GiB for a 128k vocabulary in fp32).
DEFAULT_CHUNK_TOKENS = 512

LogitOp = Literal["float", "multiply", "divide", "softcap"]
Head = Callable[[torch.Tensor], torch.Tensor]  # an output layer (module): (rows, hidden) -> (rows, vocabulary)
ContextFn = Callable[[], tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]]


@dataclass(frozen=True)
class LogitStep:
    """One operation an architecture's ``forward`` applies to ``head(hidden)`` before its loss, in the logits' dtype
    as transformers does: ``float`` (upcast), ``multiply`` / ``divide`` by ``value``, ``softcap`` (``value *
    tanh(logits / value)``)."""

    op: LogitOp
    value: float = 1.0

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.op == "float":
            return logits.float()
        if self.op == "multiply":
            return logits * self.value
        if self.op == "divide":
            return logits / self.value
        return torch.tanh(logits / self.value) * self.value


@dataclass(frozen=True)
class CausalLMParts:
    """A causal LM split for the chunked loss: its body (final hidden states), its output layer, and the steps its
    ``forward`` applies to the head's output. Made by ``causal_lm_parts``, which checked them on the model."""

    model_class: str
    body: nn.Module
    head: nn.Module
    steps: tuple[LogitStep, ...] = ()

    def hidden_states(self, **inputs) -> torch.Tensor:
        """The body's final hidden states (batch, tokens, hidden) for the model's keyword inputs."""
        out = self.body(**inputs, use_cache=False)
        hidden = getattr(out, "last_hidden_state", None)
        return hidden if hidden is not None else out[0]


# The *ForCausalLM classes of transformers 5.25 whose forward does more than head(hidden) before the loss
# (read from their forward): what each applies, as a function of the model. Every other class must compute
# exactly head(hidden), which the probe checks.
def _softcap(model: nn.Module) -> tuple[LogitStep, ...]:
    cap = model.config.final_logit_softcapping
    return (LogitStep("softcap", float(cap)),) if cap is not None else ()


def _steps_of(*steps: Callable[[nn.Module], LogitStep]) -> Callable[[nn.Module], tuple[LogitStep, ...]]:
    return lambda model: tuple(step(model) for step in steps)


_GEMMA = ("Gemma2", "Gemma3", "Gemma3n", "Gemma4", "Gemma4Unified", "NanoChat", "VaultGemma")
_COHERE = ("Cohere", "Cohere2", "Cohere2Moe", "CohereCompass")
_GRANITE = ("Granite", "GraniteSWA", "GraniteMoe", "GraniteMoeSWA", "GraniteMoeHybrid", "GraniteMoeShared")
POST_PROCESSING: dict[str, Callable[[nn.Module], tuple[LogitStep, ...]]] = {
    **{f"{name}ForCausalLM": _softcap for name in _GEMMA},
    "BeamForCausalLM": lambda m: (LogitStep("float"), *_softcap(m)) if _softcap(m) else (),
    "RecurrentGemmaForCausalLM": _steps_of(lambda m: LogitStep("softcap", float(m.config.logits_soft_cap))),
    **{f"{name}ForCausalLM": _steps_of(lambda m: LogitStep("multiply", float(m.logit_scale))) for name in _COHERE},
    **{
        f"{name}ForCausalLM": _steps_of(lambda m: LogitStep("divide", float(m.config.logits_scaling)))
        for name in _GRANITE
    },
    "HyperCLOVAXForCausalLM": _steps_of(lambda m: LogitStep("multiply", float(m.config.logits_scaling))),
    "FalconH1ForCausalLM": _steps_of(lambda m: LogitStep("multiply", float(m.model.lm_head_multiplier))),
}

# Classes whose logits or loss the chunked loss does not reproduce, and why.
_NOT_SHIFTED = "its loss does not shift the labels (labels[i] is the target of logits[i])"
REFUSED: dict[str, str] = {
    "MiniCPM3ForCausalLM": "it divides the hidden states by logits_scaling before lm_head",
    "InklingForCausalLM": "it divides the hidden states before lm_head and cuts the padded vocabulary",
    "Inkling2ForCausalLM": "it soft-caps the logits with a module of its own",
    "Inkling2LoopForCausalLM": "it soft-caps the logits with a module of its own",
    "xLSTMForCausalLM": "it soft-caps the logits with output_logit_soft_cap",
    "ClvpForCausalLM": "it applies a norm between the body and lm_head",
    "ModernBertDecoderForCausalLM": "it applies a decoder layer after lm_head",
    "MusicgenForCausalLM": "it has one output layer per codebook",
    "MusicgenMelodyForCausalLM": "it has one output layer per codebook",
    "CsmDepthDecoderForCausalLM": "its output layer depends on the codebook",
    **{
        f"{name}ForCausalLM": _NOT_SHIFTED
        for name in ("Bart", "BigBirdPegasus", "Blenderbot", "BlenderbotSmall", "Marian", "MBart", "Mvp")
        + ("Pegasus", "PLBart", "TrOCR", "Whisper")
    },
}

# Config fields that change logits in the architectures above: on a class not listed, one that is set means a
# post-processing surgery does not know, which a probe on random weights may not see (a soft cap of small logits).
_POST_PROCESSING_FIELDS = (
    "final_logit_softcapping",
    "logits_soft_cap",
    "output_logit_soft_cap",
    "logits_scaling",
    "lm_head_multiplier",
    "logits_mup_width_multiplier",
    "output_multiplier",
)


def logit_steps(model: nn.Module) -> tuple[LogitStep, ...]:
    """What ``model``'s forward applies to ``head(hidden)`` before its loss (transformers 5.25).

    Args:
        model: a transformers causal LM (or a fine-tune of one: the same class).

    Returns:
        The steps, in order (empty for most architectures).

    Raises:
        TrainError: the architecture is one whose logits or loss the chunked loss does not reproduce, or its config
            sets a logit post-processing field that surgery does not know for this class.
    """
    name = type(model).__name__
    if name in REFUSED:
        raise TrainError(f"{name}: the chunked loss cannot compute this model's loss: {REFUSED[name]}")
    known = POST_PROCESSING.get(name)
    if known is not None:
        return known(model)
    configs = {id(c): c for c in (getattr(model, "config", None), _text_config(model)) if c is not None}
    for config in configs.values():
        for field in _POST_PROCESSING_FIELDS:
            if getattr(config, field, None) is not None:
                raise TrainError(
                    f"{name}: its config sets {field}={getattr(config, field)!r}, a logit post-processing that the "
                    "chunked loss does not know for this class; train with --loss-chunk-tokens 0 (the model's own loss "
                    "over the full logits)"
                )
    return ()


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    get = getattr(config, "get_text_config", None)
    return get() if get is not None else None


def causal_lm_parts(model: nn.Module) -> CausalLMParts:
    """Split a causal LM into body, output layer and logit steps, and check the split on a few tokens.

    The body is ``model.base_model`` (else ``model.get_decoder()``), the head ``model.get_output_embeddings()``.
    The probe runs the model in eval mode without gradients (its train/eval modes are restored) on 8 tokens and
    compares ``steps(head(body(ids)))`` with ``model(ids).logits`` (to a few units in the last place of the largest
    logit in the model's dtype) and the chunked loss with ``model(ids, labels=...).loss``.

    Args:
        model: a transformers causal LM or a surgery fine-tune of one.

    Returns:
        The parts: pass them to ``causal_lm_loss`` to probe once, not on every step.

    Raises:
        TrainError: naming the model class, when it has no separate body and output layer, applies something the
            chunked loss does not reproduce (``logit_steps``), or the probe's logits or loss differ from the model's.
    """
    name = type(model).__name__
    steps = logit_steps(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = getattr(model, "base_model", None)
    if body is None or body is model:
        body = model.get_decoder() if hasattr(model, "get_decoder") else None
    if body is None or body is model or head is None:
        raise TrainError(
            f"{name}: the chunked loss needs a causal LM with a separate body (base_model) and output layer "
            "(get_output_embeddings); this model has none; train with --loss-chunk-tokens 0 (the model's own loss "
            "over the full logits)"
        )
    parts = CausalLMParts(name, body, head, steps)
    _probe(model, parts)
    return parts


def _probe(model: nn.Module, parts: CausalLMParts) -> None:
    ids = torch.arange(1, 9, device=_input_device(model)).unsqueeze(0)
    labels = ids.clone()
    labels[0, 3] = IGNORE
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad(), notices_once():
            whole = model(input_ids=ids, labels=labels, use_cache=False)
            hidden = parts.hidden_states(input_ids=ids)
            logits = parts.head(hidden)
            for step in parts.steps:
                logits = step(logits)
            loss = chunked_lm_loss(hidden, parts.head, labels, steps=parts.steps, chunk_tokens=3)
    finally:
        for module, training in modes:
            module.training = training
    expected = whole.logits
    if logits.shape != expected.shape or not _close(logits, expected):
        raise TrainError(
            f"{parts.model_class} computes more than its output layer over its body's hidden states (its logits "
            "differ on a probe: e.g. scaled, capped or otherwise post-processed in a way surgery does not know); "
            "train with --loss-chunk-tokens 0 (the model's own loss over the full logits)"
        )
    if whole.loss is None or not torch.allclose(loss, whole.loss.float(), rtol=1e-4, atol=0):
        raise TrainError(
            f"{parts.model_class} computes its loss differently from transformers' causal LM loss (labels shifted "
            "by one, -100 ignored, token mean) on a probe; train with --loss-chunk-tokens 0 (the model's own loss over "
            "the full logits)"
        )


def _close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal to a few units in the last place of the largest logit, in the logits' dtype."""
    eps = torch.finfo(expected.dtype).eps if expected.is_floating_point() else 0.0
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    return bool(torch.allclose(got.to(expected.dtype), expected, rtol=0, atol=4 * eps * max(scale, 1e-30)))


def _input_device(model: nn.Module) -> torch.device:
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for tensor in (*(embedding.parameters() if embedding is not None else ()), *model.parameters()):
        return tensor.device
    return torch.device("cpu")


def causal_lm_loss(
    model: nn.Module | CausalLMParts,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    **inputs,
) -> torch.Tensor:
    """``model(input_ids, labels=labels, ...).loss`` without ever holding the full logits.

    Args:
        model: a causal LM (probed on every call: one gradient-free forward of 8 tokens), or its
            ``causal_lm_parts(model)`` (probed once, by the caller).
        input_ids: (batch, tokens) token ids.
        labels: (batch, tokens), unshifted (as transformers takes them); ``-100`` where no loss is wanted.
        attention_mask: as the model takes it (right padding: 0 there, with labels -100).
        position_ids: as the model takes them (packed rows restart at 0 for each example).
        num_items_in_batch: divide the summed loss by this count instead of taking the mean over the targets.
        chunk_tokens: tokens per chunk of the output layer and loss; the peak memory of the logits is one chunk's.
        **inputs: further keyword inputs of the model's body (e.g. flash attention's sequence lengths).

    Returns:
        The scalar loss (fp32), differentiable with respect to every trainable parameter.

    Raises:
        TrainError: the model cannot be split (``causal_lm_parts``), ``chunk_tokens`` is below 1, or the labels do not
            have the shape of ``input_ids``.
    """
    parts = model if isinstance(model, CausalLMParts) else causal_lm_parts(model)
    if labels.shape != input_ids.shape:
        raise TrainError(
            f"labels have shape {tuple(labels.shape)} but input_ids {tuple(input_ids.shape)}; give one label per "
            "token (-100 where no loss is wanted)"
        )
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, **inputs}
    hidden = parts.hidden_states(**inputs)
    return chunked_lm_loss(
        hidden,
        parts.head,
        labels,
        steps=parts.steps,
        num_items_in_batch=num_items_in_batch,
        chunk_tokens=chunk_tokens,
    )


def model_loss(
    model: nn.Module, batch: dict, parts: CausalLMParts | None = None, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> torch.Tensor:
    """The causal LM loss of one batch: chunk by chunk through ``parts`` when given, else the model's own loss.

    Args:
        model: the causal LM (a fine-tune).
        batch: its keyword inputs with ``labels`` (``input_ids``, ``attention_mask``, ``position_ids`` ...).
        parts: ``causal_lm_parts(model)``, or None for the model's own loss over the full logits.
        chunk_tokens: tokens per chunk of the output layer and loss.

    Returns:
        The scalar loss.
    """
    if parts is None:
        return model(**batch, use_cache=False).loss
    return causal_lm_loss(parts, **batch, chunk_tokens=chunk_tokens)


def chunked_lm_loss(
    hidden: torch.Tensor,
    head: Head,
    labels: torch.Tensor,
    *,
    steps: Sequence[LogitStep] = (),
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    context_fn: ContextFn = noop_context_fn,
) -> torch.Tensor:
    """The causal LM loss of ``steps(head(hidden))`` against ``labels``, chunk by chunk over the tokens.

    No (tokens x vocabulary) tensor exists at any moment: each chunk's logits are made, reduced to their loss sum and
    freed; under autograd each chunk runs under non-reentrant checkpointing, which keeps only the chunk's hidden
    states and recomputes its logits in backward (restoring the CPU and CUDA random states, so dropout in the head
    draws the same masks). Rows are flattened, so padded rows of several jobs (the batched path) chunk as one.

    Args:
        hidden: (..., tokens, hidden) final hidden states of the body.
        head: the output layer, called as a module on (chunk, hidden) rows (any callable that is one: the batched
            path routes each chunk's rows to its job before calling its view's output layer).
        labels: hidden's shape without its last dimension, unshifted; ``-100`` where no loss is wanted.
        steps: what the architecture applies to the head's output (``CausalLMParts.steps``).
        num_items_in_batch: divide the summed loss by this count instead of taking the mean over the targets.
        chunk_tokens: tokens per chunk (any whole number >= 1; need not divide the token count).
        context_fn: ``torch.utils.checkpoint``'s: two context managers, one around each chunk's forward and one around
            its recomputation in backward. Where the head's dropout draws from a state of its own rather than torch's
            global one (a batched view swaps in each job's state), give ``replaying(states, index)`` so the
            recomputation draws the forward's masks again; without it the gradients would be silently wrong.

    Returns:
        The scalar fp32 loss: NaN when no target is left and no ``num_items_in_batch`` is given, as transformers.

    Raises:
        TrainError: ``chunk_tokens`` is not a whole number >= 1, or ``labels`` do not match ``hidden``'s tokens.
    """
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise TrainError(f"chunk_tokens must be a whole number of tokens >= 1, got {chunk_tokens!r}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise TrainError(
            f"labels have shape {tuple(labels.shape)} but the hidden states {tuple(hidden.shape)}; give one label "
            "per token (-100 where no loss is wanted)"
        )
    targets = F.pad(labels.to(hidden.device), (0, 1), value=IGNORE)[..., 1:].reshape(-1)
    rows = hidden.reshape(-1, hidden.shape[-1])
    steps = tuple(steps)
    pairs = zip(rows.split(chunk_tokens), targets.split(chunk_tokens))
    sums = [_chunk(chunk, target, head, steps, context_fn) for chunk, target in pairs]
    total = torch.stack(sums).sum() if len(sums) > 1 else sums[0]  # no tokens: one empty chunk, a sum of 0
    if num_items_in_batch is None:
        return total / (targets != IGNORE).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def replaying(states: list, index: int) -> ContextFn:
    """A ``context_fn`` for ``chunked_lm_loss`` whose head draws its dropout masks from ``states[index]``, a random
    state that the head itself swaps in and replaces with the advanced one (the batched view's ``Routing.rngs``).

    Each chunk's recomputation in backward starts from the state its forward started from, and the slot is put back
    afterwards: the masks are the forward's and the stream goes on where the forward left it.

    Args:
        states: the list holding the random state (replaced, never changed in place, by whoever draws from it).
        index: which entry of ``states`` the head draws from.

    Returns:
        The ``context_fn``: a new pair of context managers per chunk.
    """

    def context_fn() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        start: list = []

        @contextlib.contextmanager
        def forward():
            start.append(states[index])
            yield

        @contextlib.contextmanager
        def recompute():
            after = states[index]
            states[index] = start[0]
            try:
                yield
            finally:
                states[index] = after

        return forward(), recompute()

    return context_fn


def _chunk(rows: torch.Tensor, targets: torch.Tensor, head: Head, steps: tuple, context_fn: ContextFn):
    if not torch.is_grad_enabled():
        return _loss_sum(rows, targets, head, steps)
    return checkpoint(_loss_sum, rows, targets, head, steps, use_reentrant=False, context_fn=context_fn)


def _loss_sum(rows: torch.Tensor, targets: torch.Tensor, head: Head, steps: tuple) -> torch.Tensor:
    """The summed cross-entropy of one chunk (fp32 logits, as transformers upcasts them before its loss)."""
    logits = head(rows)
    for step in steps:
        logits = step(logits)
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum")
