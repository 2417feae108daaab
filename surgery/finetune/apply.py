"""``apply``: plan a rule file, quantize the base once, make N fine-tunes, verify them and measure memory.

What ``surgery apply`` shows and ``bench/siblings.py`` measures: every fine-tune must compute exactly
what the quantized base computes at init (LoRA B = 0), and the bytes held must equal the plan's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..base.shared_base import base_graph
from ..devices import input_device
from ..planning.decisions import Plan
from ..planning.decisions import plan as make_plan
from ..planning.memory import extra_bytes, parameter_bytes
from ..rules.rule_file import load_rules
from ..rules.ruleset import RuleSet
from .rewriting import rewrite

Progress = Callable[[str, int, int], None]  # (what, done, total)


@dataclass(frozen=True)
class Applied:
    """N fine-tunes of one base, what they were planned to hold and what they hold."""

    plan: Plan
    finetunes: tuple[nn.Module, ...]
    loaded_bytes: int  # the base as it was before quantization
    base_bytes: int  # the base after, shared by every fine-tune
    own_bytes: tuple[int, ...]  # each fine-tune's own tensors
    equal_at_init: tuple[bool, ...]  # each fine-tune's logits == the base's, bit for bit, on the base's vocabulary
    trainable: int  # trainable parameters of one fine-tune
    new_tokens: int = 0  # logits of new tokens (extra_tokens) past the base's vocabulary: not compared

    @property
    def total_bytes(self) -> int:
        return self.base_bytes + sum(self.own_bytes)

    def __repr__(self) -> str:
        return (
            f"Applied({len(self.finetunes)} fine-tunes of {self.plan.rules.source}, base {self.base_bytes:,} B, "
            f"{sum(self.equal_at_init)}/{len(self.equal_at_init)} equal at init)"
        )


def apply(base: nn.Module, rules: RuleSet | str, finetunes: int = 1, *, progress: Progress | None = None) -> Applied:
    """Plan (all errors first), quantize ``base`` once, make ``finetunes`` fine-tunes, verify and measure them.

    Args:
        base: the model to quantize (in place) and share.
        rules: the rule file (or its RuleSet).
        finetunes: how many fine-tunes to make.
        progress: called with (what, done, total) as the work goes on.

    Returns:
        The fine-tunes, their bytes, and whether each computes the base's logits bit for bit at init (on the base's
        vocabulary: new tokens' logits have no counterpart in the base).
    """
    rules = load_rules(rules)
    planned = make_plan(base_graph(base), rules, finetunes=finetunes)
    loaded = parameter_bytes(base)
    report = progress or (lambda what, done, total: None)
    made = [rewrite(base, rules, progress=lambda i, n, path: report("quantizing base", i, n))]
    for i in range(1, finetunes):
        made.append(rewrite(base, rules))
        report("creating fine-tunes", i + 1, finetunes)
    vocab = getattr(getattr(base, "config", None), "vocab_size", 256)
    device = input_device(base)
    ids = torch.randint(0, min(vocab, 256), (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        reference = base(ids).logits
        outputs = [ft(ids).logits for ft in made]
    width = reference.shape[-1]  # new tokens widen a fine-tune's logits: the base has no logit to compare them with
    equal = tuple(out.shape[-1] >= width and torch.equal(out[..., :width], reference) for out in outputs)
    trainable = sum(p.numel() for p in made[0].parameters() if p.requires_grad)
    return Applied(
        planned,
        tuple(made),
        loaded,
        parameter_bytes(base),
        tuple(extra_bytes(ft, base) for ft in made),
        equal,
        trainable,
        max(out.shape[-1] for out in outputs) - width,
    )
