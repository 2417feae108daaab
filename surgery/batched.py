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

import types
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import DataError, RewriteError
from .finetune import finetune_info, guarded_apply, own_state
from .lora import LoraLayer
from .rewrite import shared_copy
from .trace import replace_submodule


@dataclass
class Routing:
    """Which rows of the next call belong to which entry: ``counts[i]`` consecutive rows for entry i."""

    counts: list[int] = field(default_factory=list)
    rngs: list[torch.Tensor | None] | None = None  # per entry: its own random state for LoRA dropout

    def segments(self, n: int) -> list[slice]:
        """Row slices of a tensor with ``n`` rows: the routed rows, or rows·T for layers that flatten."""
        rows = sum(self.counts)
        if rows == 0:
            raise RewriteError("the batched view was called without routing; call surgery.batched.route(view, "
                               "counts) with the row count of each fine-tune first")
        if n % rows:
            raise RewriteError(f"a routed layer got {n} rows but the call was routed for {rows}; the rows of a "
                               "batched call must follow the counts given to route()")
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        needs_base = any(p is None or isinstance(p, LoraLayer) for p in self.parts)
        result = self.base_layer(x) if needs_base else None
        outputs = []
        for i, (part, rows) in enumerate(zip(self.parts, self.routing.segments(x.shape[0]))):
            if part is None:
                outputs.append(result[rows])
            elif isinstance(part, LoraLayer):
                outputs.append(self._with_rng(i, part, lambda: part.update(result[rows], x[rows])))
            else:
                outputs.append(part(x[rows]))
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    def _with_rng(self, index: int, part: LoraLayer, compute):
        """Run ``compute`` in entry ``index``'s own random state when its adapter draws dropout masks."""
        rngs = self.routing.rngs
        if rngs is None or rngs[index] is None or not (part.training and isinstance(part.dropout, nn.Dropout)):
            return compute()
        outer = torch.get_rng_state()
        torch.set_rng_state(rngs[index])
        try:
            return compute()
        finally:
            rngs[index] = torch.get_rng_state()
            torch.set_rng_state(outer)

    def extra_repr(self) -> str:
        kinds = ["base" if p is None else "lora" if isinstance(p, LoraLayer) else "plain" for p in self.parts]
        return f"parts=[{', '.join(kinds)}]"


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
    plain_paths = [_check_entry(base, i, ft) for i, ft in enumerate(entries)]
    routed = sorted({path for ft, plain in zip(entries, plain_paths) if ft is not None
                     for path in [*plain, *(p for p, m in ft.named_modules() if isinstance(m, LoraLayer))]})
    routing = Routing()
    view = shared_copy(base)
    for path in routed:
        parts = [None if ft is None or not (path in plain or isinstance(ft.get_submodule(path), LoraLayer))
                 else ft.get_submodule(path) for ft, plain in zip(entries, plain_paths)]
        replace_submodule(view, path, RoutedLayer(view.get_submodule(path), parts, routing))
    if any(p.requires_grad for p in view.parameters()):
        raise RewriteError("internal: the batched view would own a trainable tensor")  # the fine-tunes own them
    view.__dict__["_surgery_batched"] = BatchedInfo(base, entries, routing)
    view.__dict__["_apply"] = types.MethodType(guarded_apply, view)  # moving the view would copy the base
    return view


def batched_info(view: nn.Module) -> BatchedInfo:
    info = view.__dict__.get("_surgery_batched")
    if info is None:
        raise RewriteError(f"a {type(view).__name__} that is not a batched view; make one with surgery.batched")
    return info


def route(view: nn.Module, counts: Sequence[int], rngs: list[torch.Tensor | None] | None = None) -> None:
    """Route the next calls of ``view``: ``counts[i]`` consecutive rows belong to entry i (0 rows allowed)."""
    info = batched_info(view)
    if len(counts) != len(info.entries) or any(c < 0 for c in counts):
        raise RewriteError(f"route() needs one row count >= 0 per entry ({len(info.entries)}), got {list(counts)}")
    info.routing.counts = list(counts)
    info.routing.rngs = rngs


def _check_entry(base: nn.Module, index: int, ft: nn.Module | None) -> set[str]:
    """The entry's plain module paths, after checking that it is a fine-tune of this very base, as it is now."""
    if ft is None:
        return set()
    info = finetune_info(ft)
    if info is None:
        raise RewriteError(f"entry {index} is a {type(ft).__name__} that is not a fine-tune; batched() takes "
                           "fine-tunes made by surgery.rewrite or surgery.load_adapter (or None for the base)")
    if info.base is not base:
        raise RewriteError(f"entry {index} is a fine-tune of another base; all fine-tunes in one batch must share "
                           "the base object they were made from")
    own = {id(p) for p in own_state(ft).values()}
    held = {id(p) for p in base.parameters()}
    stale = next((name for name, p in ft.named_parameters() if id(p) not in own and id(p) not in held), None)
    if stale is not None:
        raise RewriteError(f"entry {index}: '{stale}' is not the base's tensor any more (the base was quantized "
                           "again after this fine-tune was made); reload its adapter file onto the base as it is now")
    return {d.path for d in info.plan.by_action("plain")}


def generate(base: nn.Module, entries: Sequence[nn.Module | None], prompts: Sequence[str], tokenizer, *,
             max_new_tokens: int = 40, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             seed: int = 0) -> list[list[str]]:
    """Every entry's answer to every prompt, from one batched ``generate`` (KV cache, left padding).

    Returns ``answers[entry][prompt]``. Greedy (temperature 0) gives each fine-tune's own greedy
    answer; sampling is seeded once per call (rows do not reproduce their solo samples).
    """
    if not prompts:
        raise DataError("no prompts to answer; give at least one")
    view = batched(base, entries)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError("the tokenizer has neither a pad nor an EOS token; batched generation needs one to pad")
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(ids) for ids in encoded)
    if width == 0:
        raise DataError("every prompt is empty after tokenization; give some text")
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    device = next(base.parameters()).device
    rows = len(entries)
    modes = [(m, m.training) for ft in entries if ft is not None for m in ft.modules()]
    route(view, [len(prompts)] * rows)
    options = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0, "pad_token_id": pad,
               "eos_token_id": tokenizer.eos_token_id}
    if temperature > 0:
        options.update(temperature=temperature, top_p=top_p, top_k=top_k or None)
    try:
        for ft in entries:
            if ft is not None:
                ft.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = view.eval().generate(input_ids=ids.repeat(rows, 1).to(device),
                                       attention_mask=mask.repeat(rows, 1).to(device), **options)
    finally:
        for module, training in modes:
            module.training = training
    texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return [texts[i * len(prompts):(i + 1) * len(prompts)] for i in range(rows)]
