"""One shared base sharded with FSDP2 across a launch's ranks, computed through by every fine-tune.

``shard_base(base)`` runs once per process under torchrun / accelerate, after the base is quantized
and before any fine-tune of it exists. It groups the frozen leaf modules (the modules that hold
tensors) of each decoder layer into one FSDP2 group (``fully_shard([...])``) and puts the rest
(embeddings, final norm, head) in the group of a root, ``ShardedBase``. Fine-tunes made afterwards
share those leaf module objects instead of copying them, and their forward runs through the root,
so FSDP gathers each layer's weights for its forward and backward and frees them after: a rank
holds about 1/world of the base plus its jobs' own tensors. Trainable tensors (LoRA, plain copies)
stay outside FSDP, replicated, their gradients all-reduced as under DDP, so optimizers, adapter
files, checkpoints and resume are unchanged. LLM.int8 cannot be sharded (its row scales live
beside the weight in a per-layer matmul state); 4-bit weights shard as packed bytes, their
quantization state replicated on every rank.
"""

from __future__ import annotations

import hashlib
import warnings

import torch
from torch import nn

from ..base.fingerprints import base_fingerprint
from ..base.ownership import finetune_info
from ..base.shared_base import ShardedBase, base_record, holds_tensors, run_through_root
from ..combinations import check, rule_features
from ..distributed import World, world
from ..errors import ShardingError, ShardingWarning
from ..layers.bnb import own_class, quantized_storage, state_tensors
from ..model.tracing import decoder_layers


def shard_base(base: nn.Module) -> ShardedBase:
    """Shard ``base`` over this launch's ranks with FSDP2, once; fine-tunes made afterwards compute through it.

    Every rank must call it with the same base (same weights, same quantization); checked.
    """
    record = base_record(base)
    if record.sharded is not None:
        return record.sharded
    where = world()
    _check_shardable(base, where, len(record.finetunes))
    fully_shard, mesh = _fsdp2(where, rank_device(base))
    base_fingerprint(base)  # pinned now: probing needs the whole weights (see adapter_file.base_fingerprint)
    _check_same_base_everywhere(base, where)
    if where.size == 1:
        warnings.warn(
            "sharding the base over 1 process saves no memory; launch several with `torchrun "
            "--nproc_per_node N` (or `accelerate launch --multi_gpu --num_processes N`)",
            ShardingWarning,
            stacklevel=2,
        )
    for layer in decoder_layers(base):
        leaves = [m for m in layer.modules() if holds_tensors(m)]
        if leaves:
            fully_shard(leaves, mesh=mesh)
    root = ShardedBase(base)
    fully_shard(root, mesh=mesh, reshard_after_forward=True)
    root.world_size = where.size
    record.sharded = root
    run_through_root(base, root)
    return root


def _check_shardable(base: nn.Module, where: World, live_finetunes: int) -> None:
    if finetune_info(base) is not None:
        raise ShardingError(
            "this model is a fine-tune; shard its base (surgery.finetune_info(ft).base) before making fine-tunes"
        )
    if live_finetunes:
        raise ShardingError(
            f"{live_finetunes} fine-tune(s) of this base exist already and hold its tensors whole; "
            "shard the base first (after prepare_base), then make the fine-tunes"
        )
    embedding = next((path for path, m in base.named_modules() if own_class(m).__name__ == "Embedding4bit"), None)
    if embedding is not None:
        raise ShardingError(
            f"'{embedding}' is a 4-bit embedding, which FSDP2 cannot shard (bitsandbytes' "
            f"Embedding4bit has no quant_storage to rebuild its weight from a shard); {_EMBEDDING_FIX}"
        )
    int8 = next((path for path, m in base.named_modules() if quantized_storage(m) == "int8"), None)
    if int8 is not None:
        raise ShardingError(
            f"'{int8}' is stored as LLM.int8, which FSDP cannot shard (its row scales live in a "
            "per-layer matmul state); quantize the base as nf4 (`quantize: nf4`, optionally "
            "`storage: bfloat16`) to shard it, or train with DDP without --fsdp"
        )
    device = rank_device(base)
    for name, t in [*base.named_parameters(), *base.named_buffers()]:
        if t.device != device:
            raise ShardingError(
                f"'{name}' is on {t.device}, but rank {where.rank} computes on {device}: load the "
                "whole base onto this rank's device (load_model(..., device=...)) before sharding it"
            )
    if device.type == "cuda" and torch.cuda.current_device() != device.index:
        raise ShardingError(
            f"rank {where.rank}'s base is on {device} but its current CUDA device is "
            f"cuda:{torch.cuda.current_device()}; load each rank's base with --device cuda (it "
            "takes cuda:$LOCAL_RANK) so FSDP2 and NCCL use that GPU"
        )


_EMBEDDING_FIX = (
    'keep embeddings unquantized under --fsdp (a rule `- {match: "*", type: embedding, action: '
    "freeze}` before the one that quantizes them), or train without --fsdp"
)


def refuse_unshardable(plan) -> None:
    """What a plan would store or start that FSDP2 cannot shard (LLM.int8 layers, 4-bit embeddings, DoRA, LoftQ,
    extra tokens), named with its rule and the remedy from the table of combinations, before anything loads."""
    check({"--fsdp": "--fsdp", **rule_features(plan.rules, plan)})


def refuse_unshardable_rules(model: str, rule_sets: list) -> None:
    """``refuse_unshardable`` for each rule file's plan of MODEL (on meta, from the trace cache): --fsdp's check
    before a byte of weights is read."""
    from ..base.loading import graph_of
    from ..planning.decisions import plan as make_plan
    from ..rules.rule_file import load_rules

    graph = graph_of(model)
    for rules in rule_sets:
        refuse_unshardable(make_plan(graph, load_rules(rules)))


def rank_device(base: nn.Module) -> torch.device:
    """Where this rank's base computes: the device its tensors are on (checked to hold them all), or where the
    launch would compute when they are on meta (no weights)."""
    from ..devices import resolve_device

    device = next(base.parameters()).device
    return resolve_device("auto") if device.type == "meta" else device


def _fsdp2(where: World, device: torch.device):
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError as exc:
        raise ShardingError(
            f"--fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard), which torch "
            f"{torch.__version__} does not have; install a newer torch"
        ) from exc
    import torch.distributed as dist

    if not dist.is_initialized():  # one process without a launcher: a group of one
        dist.init_process_group(
            "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1
        )
    return fully_shard, init_device_mesh(device.type, (where.size,))


def _check_same_base_everywhere(base: nn.Module, where: World) -> None:
    """Every rank keeps only its shard and replicates the 4-bit statistics: the bases must be identical."""
    if where.size == 1:
        return
    import torch.distributed as dist

    digest = hashlib.sha256(base_fingerprint(base).to_json().encode())
    with torch.no_grad():
        for module in base.modules():
            for p in module.parameters(recurse=False):
                for t in state_tensors(p, module):
                    digest.update(t.detach().reshape(-1).to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    digests: list = [None] * where.size
    dist.all_gather_object(digests, digest.hexdigest())
    if len(set(digests)) > 1:
        raise ShardingError(
            "the ranks hold different bases (weights or quantization statistics differ); every "
            "rank must load the same checkpoint (or seed random init alike) and quantize it alike"
        )
