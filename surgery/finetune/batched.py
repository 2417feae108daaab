"""Many fine-tunes, one base pass: a batched view whose rows belong to different fine-tunes.

``batched(base, [ft1, ft2, None, ...])`` is a structural copy of the base (own module objects over
the base's tensors, like a fine-tune) in which every layer that any fine-tune adapts or makes
``plain`` is a ``RoutedLayer``: the frozen base layer runs once over all rows, then each fine-tune's
LoRA adapter updates its own rows (``LoraLayer.update``) and each ``plain`` copy computes its own
rows; ``None`` stands for the bare base. Rows are routed in contiguous segments, one per entry, set
with ``route(view, counts)`` before each call; layers that see (rows·T, d) route by T-row blocks.

The view owns no trainable tensor: the fine-tunes stay the only owners, so their optimizers,
adapter files and checkpoints are unchanged. Results equal each fine-tune run alone up to float
round-off from the larger batch, except where the base itself mixes rows: LLM.int8 with threshold
> 0 picks outlier columns from the whole batch (use ``threshold: 0`` for exact row independence),
and base-model dropout is drawn over the whole batch. LoRA dropout is exact: each fine-tune's
masks are drawn from its own random state (``Routing.rngs``) when one is given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..base.ownership import finetune_info, own_state, refuse_copying_move, refuse_training_shared
from ..base.shared_base import refuse_sharded
from ..devices import input_device
from ..errors import DataError, RewriteError
from ..layers.extra_tokens import extra_token_layers
from ..layers.lora import LoraLayer, LoraPositionalEmbedding
from ..model.tracing import replace_submodule
from ..random_state import swap_rng
from .rewriting import NoticesOnce, shared_copy, subclass_of


@dataclass
class Routing:
    """Which rows of the next call belong to which entry: ``counts[i]`` consecutive rows for entry i."""

    counts: list[int] = field(default_factory=list)
    rngs: list[torch.Tensor | None] | None = None  # per entry: its own random state for LoRA dropout
    lengths: list[int] | None = None  # per entry: its tokens per row before right padding to the call's length

    def segments(self, n: int) -> list[slice]:
        """Row slices of a tensor with ``n`` rows: the routed rows, or rows·T for layers that flatten."""
        rows = sum(self.counts)
        if rows == 0:
            raise RewriteError(
                "the batched view was called without routing; call surgery.finetune.batched.route(view, "
                "counts) with the row count of each fine-tune first"
            )
        if n % rows:
            raise RewriteError(
                f"a routed layer got {n} rows but the call was routed for {rows}; the rows of a "
                "batched call must follow the counts given to route()"
            )
        factor, start, out = n // rows, 0, []
        for count in self.counts:
            out.append(slice(start, start + count * factor))
            start += count * factor
        return out


class RoutedLayer(nn.Module):
    """A base layer shared by all rows, plus per-entry parts (LoRA adapter, plain copy, or None) on their rows."""

    def __init__(self, base_layer: nn.Module, parts: Sequence[nn.Module | None], routing: Routing):
        super().__init__()
        self.base_layer = base_layer
        self.__dict__["parts"] = tuple(parts)  # the fine-tunes' own modules: referenced, never registered
        self.__dict__["routing"] = routing

    def forward(self, *args, **kwargs) -> torch.Tensor:
        if kwargs or len(args) != 1:
            return self._computed_rows(*args, **kwargs)
        x = args[0]
        needs_base = any(p is None or isinstance(p, LoraLayer) for p in self.parts)
        result = self.base_layer(x) if needs_base else None
        outputs = []
        for i, (part, rows) in enumerate(zip(self.parts, self.routing.segments(x.shape[0]))):
            if part is None:
                outputs.append(result[rows])
            elif isinstance(part, LoraLayer):
                outputs.append(self._lora_rows(i, part, result[rows], x[rows]))
            else:
                outputs.append(part(x[rows]))
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    def _computed_rows(self, *args, **kwargs) -> torch.Tensor:
        """A layer that computes its rows from several inputs (a learned positional embedding: attention mask, cache
        length, position ids): each part computes every row and each entry keeps its own."""
        result = self.base_layer(*args, **kwargs)
        outputs = []
        for part, rows in zip(self.parts, self.routing.segments(result.shape[0])):
            if part is None:
                outputs.append(result[rows])
            elif isinstance(part, LoraPositionalEmbedding):
                outputs.append(part.update(result[rows], part.rows(*args, **kwargs)[rows]))
            else:
                outputs.append(part(*args, **kwargs)[rows])
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    def _lora_rows(self, index: int, part: LoraLayer, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Entry ``index``'s adapter update on its rows; dropout masks drawn from its own state, in its own shape."""
        if (
            not (part.training and isinstance(part.dropout, nn.Dropout))
            or self.routing.rngs is None
            or self.routing.rngs[index] is None
        ):
            return part.update(result, x)
        lengths = self.routing.lengths
        length = lengths[index] if lengths is not None and x.dim() >= 3 else None
        outer = swap_rng(self.routing.rngs[index], x.device)
        try:
            if length is None or length >= x.shape[1]:
                return part.update(result, x)
            # right padding beyond the entry's own length: draw the masks the entry would draw alone
            return torch.cat([part.update(result[:, :length], x[:, :length]), result[:, length:]], dim=1)
        finally:
            self.routing.rngs[index] = swap_rng(outer, x.device)

    def extra_repr(self) -> str:
        kinds = ["base" if p is None else "lora" if isinstance(p, LoraLayer) else "plain" for p in self.parts]
        return f"parts=[{', '.join(kinds)}]"


class BatchedView(NoticesOnce):
    """A batched view (made by ``batched``): a model of the base's class over the base's tensors whose routed layers
    run each row through its own fine-tune's parts; ``type(view)`` is ``BatchedView<BaseClass>``."""

    def _apply(self, fn, *args, **kwargs):
        """Refuse moves and casts: they would give the view its own copy of the shared base."""
        refuse_copying_move(self, fn, "a batched view")
        return super()._apply(fn, *args, **kwargs)


@dataclass(frozen=True)
class BatchedInfo:
    """What a batched view serves: its base, its entries (fine-tunes or None for the base), its routing."""

    base: nn.Module
    entries: tuple[nn.Module | None, ...]
    routing: Routing


def batched(base: nn.Module, entries: Sequence[nn.Module | None]) -> nn.Module:
    """A view of ``base`` that runs the rows of several fine-tunes (None: the bare base) in one pass."""
    entries = tuple(entries)
    if not entries:
        raise RewriteError("batched() needs at least one fine-tune (or None for the base)")
    refuse_sharded(
        base,
        "a batched view (batched generate, --batched training)",
        "let the fine-tunes take turns (train without --batched), or generate in one process on an unsharded base",
    )
    plain_paths = [_check_entry(base, i, ft) for i, ft in enumerate(entries)]
    routed = sorted(
        {
            path
            for ft, plain in zip(entries, plain_paths)
            if ft is not None
            for path in [*plain, *(p for p, m in ft.named_modules() if isinstance(m, LoraLayer))]
        }
    )
    routing = Routing()
    view = shared_copy(base)
    for path in routed:
        parts = [
            None
            if ft is None or not (path in plain or isinstance(ft.get_submodule(path), LoraLayer))
            else ft.get_submodule(path)
            for ft, plain in zip(entries, plain_paths)
        ]
        replace_submodule(view, path, RoutedLayer(view.get_submodule(path), parts, routing))
    if any(p.requires_grad for p in view.parameters()):
        raise RewriteError("internal: the batched view would own a trainable tensor")  # the fine-tunes own them
    view.__class__ = subclass_of(BatchedView, type(base))
    view.__dict__["_surgery_batched"] = BatchedInfo(base, entries, routing)
    view.register_forward_pre_hook(lambda module, args: refuse_training_shared(module))
    return view


def batched_info(view: nn.Module) -> BatchedInfo:
    info = view.__dict__.get("_surgery_batched")
    if info is None:
        raise RewriteError(f"a {type(view).__name__} that is not a batched view; make one with surgery.batched")
    return info


def route(
    view: nn.Module,
    counts: Sequence[int],
    rngs: list[torch.Tensor | None] | None = None,
    lengths: Sequence[int] | None = None,
) -> None:
    """Route the next calls of ``view``: ``counts[i]`` consecutive rows belong to entry i (0 rows allowed).

    ``rngs[i]``, when given, is entry i's random state: its LoRA dropout draws from it (and it is
    advanced in place); ``lengths[i]`` is entry i's row length before right padding, so its masks
    keep the shape they have when it runs alone.
    """
    info = batched_info(view)
    for name, values in (("row count", counts), ("random state", rngs), ("length", lengths)):
        if values is not None and len(values) != len(info.entries):
            raise RewriteError(f"route() needs one {name} per entry ({len(info.entries)}), got {len(values)}")
    if any(c < 0 for c in counts):
        raise RewriteError(f"route() needs row counts >= 0, got {list(counts)}")
    info.routing.counts = list(counts)
    info.routing.rngs = rngs
    info.routing.lengths = list(lengths) if lengths is not None else None


def _check_entry(base: nn.Module, index: int, ft: nn.Module | None) -> set[str]:
    """The entry's plain module paths, after checking that it is a fine-tune of this very base, as it is now."""
    if ft is None:
        return set()
    info = finetune_info(ft)
    if info is None:
        raise RewriteError(
            f"entry {index} is a {type(ft).__name__} that is not a fine-tune; batched() takes "
            "fine-tunes made by surgery.rewrite or surgery.load_adapter (or None for the base)"
        )
    if info.base is not base:
        raise RewriteError(
            f"entry {index} is a fine-tune of another base; all fine-tunes in one batch must share "
            "the base object they were made from"
        )
    if info.rules.extra_tokens is not None:
        raise RewriteError(
            f"entry {index} adds its own tokens ({len(info.rules.extra_tokens.tokens)}, extra_tokens in "
            f"{info.rules.source}), so its vocabulary is not the base's; a batched pass needs one "
            "vocabulary: generate with it alone, and train it without --batched"
        )
    own = {id(p) for p in own_state(ft).values()}
    held = {id(p) for p in base.parameters()}
    stale = next((name for name, p in ft.named_parameters() if id(p) not in own and id(p) not in held), None)
    if stale is not None:
        raise RewriteError(
            f"entry {index}: '{stale}' is not the base's tensor any more (the base was quantized "
            "again after this fine-tune was made); reload its adapter file onto the base as it is now"
        )
    return {d.path for d in info.plan.by_action("plain")}


def _stop_ids(tokenizer, base: nn.Module) -> list[int]:
    """Tokens that end an answer: the tokenizer's EOS and the model's generation config's (an instruct
    model's end-of-turn token is often only there)."""
    configured = getattr(getattr(base, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(i for i in [tokenizer.eos_token_id, *configured] if isinstance(i, int)))


def generate(
    base: nn.Module,
    entries: Sequence[nn.Module | None],
    prompts: Sequence[str],
    tokenizer,
    *,
    max_new_tokens: int = 40,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
) -> list[list[str]]:
    """Every entry's answer to every prompt, from one batched ``generate`` (KV cache, left padding).

    Returns ``answers[entry][prompt]``. Greedy (temperature 0) gives each fine-tune's own greedy
    answer. Sampling draws prompt i's tokens from its own generator seeded ``seed + i``, in every
    entry: an entry's samples do not depend on which others share the batch, and fine-tunes
    compared on one prompt see the same random numbers.
    """
    _check_sampling(max_new_tokens, temperature, top_p, top_k)
    if not prompts:
        raise DataError("no prompts to answer; give at least one")
    alone = len(entries) == 1 and entries[0] is not None and extra_token_layers(entries[0])
    view = entries[0] if alone else batched(base, entries)  # a fine-tune with its own tokens answers by itself
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError("the tokenizer has neither a pad nor an EOS token; batched generation needs one to pad")
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(ids) for ids in encoded)
    if width == 0:
        raise DataError("every prompt is empty after tokenization; give some text")
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    device = input_device(base)
    rows = len(entries)
    modes = [(m, m.training) for ft in entries if ft is not None for m in ft.modules()]
    if not alone:
        route(view, [len(prompts)] * rows)
    options = {
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        "pad_token_id": pad,
        "eos_token_id": _stop_ids(tokenizer, base),
    }
    if temperature > 0:  # greedy over scores where only the row's own sample is left
        seeds = [seed + i for i in range(len(prompts))] * rows
        options["logits_processor"] = [RowSampler(seeds, temperature, top_p, top_k, device)]
    try:
        for ft in entries:
            if ft is not None:
                ft.eval()
        with torch.no_grad():
            out = view.eval().generate(
                input_ids=ids.repeat(rows, 1).to(device), attention_mask=mask.repeat(rows, 1).to(device), **options
            )
    finally:
        for module, training in modes:
            module.training = training
    texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return [texts[i * len(prompts) : (i + 1) * len(prompts)] for i in range(rows)]


def _check_sampling(max_new_tokens: int, temperature: float, top_p: float, top_k: int) -> None:
    if max_new_tokens < 1:
        raise DataError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise DataError(f"--temperature must be a finite number >= 0 (0: greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise DataError(f"--top-p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise DataError(f"--top-k must be >= 0 (0: off), got {top_k}")


class RowSampler:
    """A logits processor that samples each row from its own generator (temperature, top-k, top-p).

    It leaves only the sampled token possible, so a greedy ``generate`` emits it: row r's draws
    depend on ``seeds[r]`` and its own scores only, never on the other rows of the batch.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float, top_k: int, device: torch.device):
        self.generators = [torch.Generator(device).manual_seed(s) for s in seeds]
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = self._probabilities(scores.float() / self.temperature)
        chosen = torch.cat([torch.multinomial(row, 1, generator=g) for row, g in zip(probs, self.generators)])
        return torch.full_like(scores, -math.inf).scatter_(1, chosen[:, None], 0.0)

    def _probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        if self.top_k:
            kth = logits.topk(min(self.top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        if self.top_p < 1:
            ordered, order = logits.sort(descending=True)
            probs = ordered.softmax(-1)
            beyond = probs.cumsum(-1) - probs > self.top_p  # tokens after the nucleus is full (the first stays)
            logits = logits.scatter(1, order, ordered.masked_fill(beyond, -math.inf))
        return logits.softmax(-1)
