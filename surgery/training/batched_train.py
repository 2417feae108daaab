"""Several jobs, one base pass per micro-step: what ``train(jobs, batched=True)`` runs.

Jobs on the same base with the same precision form a group served by one batched view
(``surgery.batched``). Each micro-step takes every unfinished job's next micro-batch, pads them on
the right to a common length, runs the model body once over all rows, then each job's output
layer and token-mean loss on its own rows, one job at a time (its logits are freed before the next
job's are made, so N x T x vocab logits never live together), and one backward through the body.
A job whose step's micro-batches are done clips and steps its own optimizer (``optimizer_step``)
and writes its own metrics and checkpoints; a finished job drops out of the group.
``max_batched_tokens`` caps the rows x length of one pass: the jobs beyond it run in sub-groups.

Each job's adapters end where turn-taking would put them, to float round-off, except where the
base itself mixes rows: base-model dropout is drawn once over a pass (from a stream seeded by the
jobs' data positions: the same statistics as turn-taking, not the same masks), and LLM.int8 with
threshold > 0 picks outlier columns from all rows of a pass. LoRA dropout stays exact: each job's
masks come from its own random state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..base.ownership import finetune_info
from ..combinations import check, rule_features
from ..distributed import World, rank_weight
from ..errors import TrainError
from ..finetune.batched import batched, route
from .data import IGNORE
from .job import Job, Run, TrainConfig
from .loss import chunked_lm_loss, replaying
from .step import autocast, micro_batch, model_inputs, offloaded, optimizer_step, tokens, trainable_device

AfterStep = Callable[[Run, dict], None]


@dataclass
class Group:
    """Jobs that share base passes: their batched view, its body and output layer, the steps in progress."""

    view: nn.Module
    body: nn.Module
    head: nn.Module
    runs: list[Run]
    pending: dict[int, list[float]] = field(default_factory=dict)  # job index -> [loss sum, tokens, seconds]


def check_batching(
    batched: bool, max_batched_tokens: int | None, gradient_checkpointing: bool, compiled: bool, rule_sets: list
) -> None:
    """The jobs of a run against the table of combinations around --batched (checkpointing, --compile, new tokens,
    the token cap), and the cap's range, before anything trains."""
    present = {
        name: name
        for name, on in (
            ("--batched", batched),
            ("--gradient-checkpointing", gradient_checkpointing),
            ("--compile", compiled),
            ("--max-batched-tokens", max_batched_tokens is not None),
        )
        if on
    }
    if batched:
        present.update(next((rule_features(r) for r in rule_sets if r.extra_tokens is not None), {}))
    check(present)
    if max_batched_tokens is not None and max_batched_tokens < 1:
        raise TrainError(f"--max-batched-tokens must be at least 1, got {max_batched_tokens}")


def group_jobs(jobs: list[Job], max_batched_tokens: int | None) -> list[Job]:
    """The jobs with their grouping recorded in their identity (a resumed run must be grouped alike)."""
    groups: dict[tuple, list[str]] = {}
    for job in jobs:
        groups.setdefault(_group_key(job), []).append(job.name)
    return [
        dataclasses.replace(
            job,
            identity={
                **job.identity,
                "batched": {"jobs": sorted(groups[_group_key(job)]), "max_batched_tokens": max_batched_tokens},
            },
        )
        for job in jobs
    ]


def run_batched(runs: list[Run], where: World, max_batched_tokens: int | None, after_step: AfterStep) -> None:
    """Train every run to its end in batched micro-steps, calling ``after_step`` after each job's step."""
    keyed: dict[tuple, list[Run]] = {}
    for run in runs:
        keyed.setdefault(_group_key(run.job), []).append(run)
    groups = [make_group(members) for members in keyed.values()]
    while not all(run.done for run in runs):
        for group in groups:
            for run, record in micro_step(group, where, max_batched_tokens):
                after_step(run, record)


def _group_key(job: Job) -> tuple:
    info = finetune_info(job.finetune)
    device = next(p.device for p in job.finetune.parameters() if p.requires_grad)
    return id(info.base), job.config.precision, str(device)


def make_group(runs: list[Run]) -> Group:
    """The group of runs on one base: a batched view of their fine-tunes, split into body and output layer."""
    base = finetune_info(runs[0].job.finetune).base
    view = batched(base, [run.job.finetune for run in runs])
    body, head = _body_and_head(view, runs)
    return Group(view, body, head, runs)


def _body_and_head(view: nn.Module, runs: list[Run]) -> tuple[nn.Module, nn.Module]:
    """The model body and output layer, after checking on a probe that the model's logits are head(body)."""
    body = getattr(view, "base_model", None)
    head = view.get_output_embeddings() if hasattr(view, "get_output_embeddings") else None
    name = type(view).__name__
    if body is None or body is view or head is None:
        raise TrainError(
            f"batched training needs a causal LM with a separate body and output layer; {name} has "
            "none; train without --batched"
        )
    device = trainable_device(runs[0])
    ids = torch.tensor([[1, 2]], device=device)
    modes = [(m, m.training) for run in runs for m in run.job.finetune.modules()] + [(view, view.training)]
    try:
        for run in runs:
            run.job.finetune.eval()
        view.eval()
        route(view, [1] + [0] * (len(runs) - 1))
        with torch.no_grad():
            whole = view(input_ids=ids, use_cache=False).logits
            split = head(body(input_ids=ids, use_cache=False)[0])
    finally:
        for module, training in modes:
            module.training = training
    if whole.shape != split.shape or not torch.allclose(whole, split, rtol=1e-4, atol=1e-4 * whole.abs().max()):
        raise TrainError(
            f"{name} computes more than output_layer(body(...)) (e.g. scaled or capped logits); "
            "batched training cannot split it per job; train without --batched"
        )
    return body, head


def micro_step(group: Group, where: World, max_batched_tokens: int | None) -> list[tuple[Run, dict]]:
    """One micro-batch of every unfinished job of the group (its optimizer steps when its accumulation is
    complete); the (run, record) of each job that stepped."""
    active = [i for i, run in enumerate(group.runs) if not run.done]
    if not active:
        return []
    device = trainable_device(group.runs[active[0]])
    start = time.perf_counter()
    group.view.train()
    for i in active:
        group.runs[i].job.finetune.train()
    batches = {i: micro_batch(group.runs[i], where, device) for i in active}
    for members in _sub_groups(active, batches, max_batched_tokens):
        _forward_backward(group, members, batches, where)
    seconds = time.perf_counter() - start
    stepped = []
    for i in active:
        run = group.runs[i]
        totals = group.pending.setdefault(i, [0.0, 0, 0.0])
        totals[2] += seconds
        if run.micro % run.job.config.grad_accum == 0:
            loss_sum, count, spent = group.pending.pop(i)
            stepped.append((run, optimizer_step(run, where, loss_sum, int(count), spent)))
    return stepped


def _sub_groups(active: list[int], batches: dict[int, dict], limit: int | None) -> list[list[int]]:
    """Consecutive jobs whose padded rows x length stay within ``limit`` (a job above it alone)."""
    if limit is None:
        return [active]
    groups, current, rows, width = [], [], 0, 0
    for i in active:
        n, t = batches[i]["input_ids"].shape
        if current and (rows + n) * max(width, t) > limit:
            groups.append(current)
            current, rows, width = [], 0, 0
        current.append(i)
        rows, width = rows + n, max(width, t)
    return groups + [current]


def _forward_backward(group: Group, members: list[int], batches: dict[int, dict], where: World) -> None:
    """One pass of the members' micro-batches: body once, each job's head and loss on its rows, one backward."""
    runs = group.runs
    width = max(batches[i]["input_ids"].shape[1] for i in members)
    padded = {i: _pad_right(batches[i], width) for i in members}
    counts = [len(padded[i]["input_ids"]) if i in padded else 0 for i in range(len(runs))]
    rngs = [runs[i].rng if i in padded else None for i in range(len(runs))]
    lengths = [batches[i]["input_ids"].shape[1] if i in padded else 0 for i in range(len(runs))]
    config = runs[members[0]].job.config
    device = padded[members[0]]["input_ids"].device
    route(group.view, counts, rngs, lengths)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(_pass_seed(runs, members, where))  # base dropout: one draw over the pass
        with autocast(config, device), offloaded(config, device):
            hidden = group.body(
                input_ids=torch.cat([padded[i]["input_ids"] for i in members]),
                attention_mask=torch.cat([padded[i]["attention_mask"] for i in members]),
                use_cache=False,
            )[0]
    detached = hidden.detach().requires_grad_(hidden.requires_grad)
    start = 0
    for i in members:
        run, rows = runs[i], slice(start, start + counts[i])
        start += counts[i]
        route(group.view, [counts[i] if j == i else 0 for j in range(len(runs))], rngs, lengths)
        with autocast(config, device):
            loss = _job_loss(group, i, run.job.config, detached[rows], padded[i]["labels"], rngs)
        loss = loss * rank_weight(padded[i], where)
        if loss.requires_grad:
            run.scaler.scale(loss / run.job.config.grad_accum).backward()
        totals = group.pending.setdefault(i, [0.0, 0, 0.0])
        totals[0] = totals[0] + loss.detach()  # read once per step, in optimizer_step
        totals[1] += tokens(batches[i])
    if hidden.requires_grad and detached.grad is not None:
        hidden.backward(detached.grad)
    for i in members:
        runs[i].rng = rngs[i]


def _pad_right(batch: dict[str, torch.Tensor], width: int) -> dict[str, torch.Tensor]:
    """A micro-batch padded on the right to ``width`` tokens (masked, no loss): causal rows are unchanged."""
    batch = model_inputs(batch)
    extra = width - batch["input_ids"].shape[1]
    if extra == 0:
        return batch
    fill = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE}
    return {k: F.pad(v, (0, extra), value=fill[k]) for k, v in batch.items()}


def _job_loss(
    group: Group, index: int, config: TrainConfig, hidden: torch.Tensor, labels: torch.Tensor, rngs: list
) -> torch.Tensor:
    """Job ``index``'s token-mean causal LM loss on its rows of the body's output (routed to it alone): chunk by
    chunk over the tokens, each chunk's rows routed to the job (its head's dropout drawn from, and replayed in
    backward from, the job's own random state), or over its full logits at once."""
    if config.chunked_loss:

        def head(rows: torch.Tensor) -> torch.Tensor:
            route(group.view, [rows.shape[0] if j == index else 0 for j in range(len(group.runs))], rngs)
            return group.head(rows)

        replay = replaying(rngs, index)
        return chunked_lm_loss(hidden, head, labels, chunk_tokens=config.chunked_loss, context_fn=replay)
    logits = group.head(hidden).float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE)


def _pass_seed(runs: list[Run], members: list[int], where: World) -> int:
    """The base-dropout seed of one pass: fixed by the members' seeds, data positions and the rank."""
    key = repr([(runs[i].job.config.seed, runs[i].micro) for i in members] + [where.rank]).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
