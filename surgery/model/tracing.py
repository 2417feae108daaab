"""Capture a model's computation as a torch.fx graph and describe every module of it.

``trace(model)`` exports a meta-device copy of the model with ``torch.export`` (non-strict, input_ids
of odd static sizes that shapes name back to batch and seq), maps every fx node to the module that
owns it through ``nn_module_stack``, and returns a ``ModelGraph``: plain data per module (path,
class, op kind, parameters, calls, shapes) plus ties, uncalled modules and how the capture went.
No weights are read or copied.

Repeated blocks (a ``ModuleList`` of structurally identical layers) are traced with three
instances and the result is carried over to the others, so an 80-layer 70B model traces in
seconds; ``reduce_repeated=False`` traces every layer.
"""

from __future__ import annotations

import copy
import logging
import re
import time
from collections import defaultdict
from typing import Any

import torch
from torch import nn

from ..errors import TraceError, first_line
from ..layers.bnb import (
    from_conv1d,
    held_bytes,
    held_quant_config,
    is_bnb_layer,
    logical_shape,
    own_class,
    plain_equivalent,
    quantized_storage,
)
from ..layers.lora import LoraLayer
from .graph import ModelGraph, ModuleInfo, ParamInfo
from .graph import join_path as _join

log = logging.getLogger(__name__)
KEEP_REPEATED = 3  # layers kept per repeated block: layer 0, then one odd and one even representative
# Static (batch, seq) sizes to export input_ids with, first that fits: odd primes, so a dimension equal to
# one of them (or to their product, a flattened batch*seq) is that symbol. Sizes the model's own tensors or
# config use are skipped; when all are taken, export runs with symbolic shapes (slower, same answer).
STATIC_SIZES = ((11, 37), (13, 41), (17, 43), (19, 47), (23, 53))


# ----------------------------------------------------------------------------------------- kinds


def op_kind(module: nn.Module) -> str:
    """Classify a module: linear, conv1d, embedding, positional, norm or other (bitsandbytes and LoRA forms
    included)."""
    base = getattr(module, "base_layer", None)
    if isinstance(module, LoraLayer):
        return op_kind(base)
    if from_conv1d(module):
        return "conv1d"
    if isinstance(module, nn.Linear) and _standard_forward(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding) and _standard_forward(module, nn.Embedding):
        return "embedding"
    if is_learned_positional(module):
        return "positional"
    if own_class(module).__name__ == "Conv1D" and own_class(module).__module__.startswith("transformers"):
        return "conv1d"
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or type(module).__name__.endswith(
        ("RMSNorm", "LayerNorm", "Norm")
    ):
        return "norm"
    return "other"


def _standard_forward(module: nn.Module, cls: type) -> bool:
    """True when ``module`` computes what ``cls`` computes: its own forward, or a bitsandbytes form of it.

    Subclasses with their own forward (OPT's learned positional embedding) are not: swapping them for a
    quantized or plain LoRA layer would change what they compute.
    """
    return type(module).forward is cls.forward or is_bnb_layer(module)


def is_learned_positional(module: nn.Module) -> bool:
    """An embedding that computes its own rows from its inputs (OPT's, BART's and BioGPT's learned positional
    embeddings: positions from the attention mask or position ids, plus an offset) and then looks them up:
    ``LoraPositionalEmbedding`` adapts it with the rows it computes; bitsandbytes has no layer for it."""
    return (
        isinstance(module, nn.Embedding)
        and not _standard_forward(module, nn.Embedding)
        and type(module).__name__.endswith("LearnedPositionalEmbedding")
    )


def _param_infos(module: nn.Module) -> list[ParamInfo]:
    quant = quantized_storage(module) if is_bnb_layer(module) else None
    infos = []
    for name, p in module.named_parameters(recurse=False):
        if quant and name == "weight":
            shape = logical_shape(module)  # (out, in); a Conv1D's weight is (in, out)
            infos.append(ParamInfo(name, shape[::-1] if from_conv1d(module) else shape, quant, held_bytes(p, module)))
        else:
            infos.append(
                ParamInfo(name, tuple(p.shape), str(p.dtype).removeprefix("torch."), p.numel() * p.element_size())
            )
    return infos


# ----------------------------------------------------------------------------------------- trace


def trace(
    model: nn.Module, example_inputs: dict[str, torch.Tensor] | None = None, *, reduce_repeated: bool = True
) -> ModelGraph:
    """Trace ``model`` into a ModelGraph; falls back to the module tree (and says why) when export fails.

    ``example_inputs``: keyword inputs for forward; HF causal LMs get ``input_ids`` by default.
    The model itself is never modified, moved or run on real data.
    """
    start = time.perf_counter()
    graph = ModelGraph(
        type(model).__name__,
        _module_infos(model),
        find_ties(model),
        "module-tree",
        0.0,
        config=getattr(model, "config", None),
        name=getattr(getattr(model, "config", None), "name_or_path", None) or None,
    )
    try:
        inputs, dynamic, names = _export_inputs(model, example_inputs)
        meta = _logical_meta_copy(model)
        reduced = _reduce_repeated_blocks(meta) if reduce_repeated else {}
        try:
            exported = _export(meta, inputs, dynamic)
        except Exception:
            if not reduced:
                raise
            meta, reduced = _logical_meta_copy(model), {}
            exported = _export(meta, inputs, dynamic)
        _record_calls(graph, exported, reduced, names)
        graph.method, graph.exported, graph.reduced = "export", exported, reduced
    except Exception as exc:  # any failure of capture: fall back, keep the reason
        graph.reason = f"{type(exc).__name__}: {first_line(exc, 300)}"
        log.debug("torch.export of %s failed, module-tree fallback: %s", type(model).__name__, graph.reason)
    graph.seconds = time.perf_counter() - start
    return graph


def _module_infos(model: nn.Module) -> dict[str, ModuleInfo]:
    """What the module tree alone tells about every module (no calls, no shapes)."""
    return {
        path: ModuleInfo(
            path,
            f"{own_class(m).__module__}.{own_class(m).__qualname__}",
            op_kind(m),
            _param_infos(m),
            quantized_storage(m),
            held_quant_config(m),
        )
        for path, m in model.named_modules(remove_duplicate=False)
    }


def replace_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at dotted ``path`` inside ``model`` (the module that was there is let go)."""
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def find_ties(model: nn.Module) -> list[tuple[str, ...]]:
    """Parameters that are one tensor under several names, e.g. ('model.embed_tokens.weight', 'lm_head.weight')."""
    names: dict[int, list[str]] = defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        names[id(p)].append(name)
    return [tuple(group) for group in names.values() if len(group) > 1]


def _export_inputs(model: nn.Module, example_inputs) -> tuple[dict, dict | None, dict[int, str]]:
    """Keyword inputs for export, their dynamic dimensions (None: all static) and static sizes' names.

    HF causal LMs are exported with static ``input_ids`` of odd sizes named back to batch and seq
    afterwards: symbolic shapes make export two to five times slower (bench/cli_latency.py).
    """
    from torch.export import Dim

    if example_inputs is not None:
        inputs = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in example_inputs.items()}
        dynamic = {
            k: ({i: Dim.AUTO for i in range(v.dim())} if isinstance(v, torch.Tensor) else None)
            for k, v in inputs.items()
        }
        return inputs, dynamic, {}
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "vocab_size"):
        raise TraceError("not a HuggingFace model and no example_inputs given")
    max_len = next(
        (
            getattr(config, a)
            for a in ("max_position_embeddings", "n_positions", "n_ctx")
            if isinstance(getattr(config, a, None), int)
        ),
        4096,
    )
    sizes = _free_sizes(model, config, max_len)
    if sizes is None:
        inputs = {"input_ids": torch.zeros(2, 8, dtype=torch.long, device="meta"), "use_cache": False}
        return (
            inputs,
            {
                "input_ids": {0: Dim("batch", min=1, max=4096), 1: Dim("seq", min=2, max=max(max_len, 8))},
                "use_cache": None,
            },
            {},
        )
    batch, seq = sizes
    inputs = {"input_ids": torch.zeros(batch, seq, dtype=torch.long, device="meta"), "use_cache": False}
    return inputs, None, {batch: "batch", seq: "seq", batch * seq: "seq*batch"}


def _free_sizes(model: nn.Module, config, max_len: int) -> tuple[int, int] | None:
    """The first STATIC_SIZES pair none of whose numbers is a dimension or config value of the model."""
    taken = {d for t in [*model.parameters(), *model.buffers()] for d in t.shape}
    taken |= {v for v in config.to_dict().values() if isinstance(v, int)}
    return next(((b, s) for b, s in STATIC_SIZES if s <= max_len and not {b, s, b * s} & taken), None)


def _export(model: nn.Module, inputs: dict, dynamic: dict):
    with torch.no_grad():
        return torch.export.export(model, (), inputs, dynamic_shapes=dynamic, strict=False)


def _logical_meta_copy(model: nn.Module) -> nn.Module:
    """A structural copy on the meta device; bitsandbytes layers become their plain logical equivalents."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        if quantized_storage(module) and is_bnb_layer(module):
            memo[id(module)] = plain_equivalent(module)
    for module in model.modules():
        if id(module) in memo:
            continue
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if id(t) not in memo:
                meta = torch.empty(t.shape, dtype=t.dtype, device="meta")
                memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    copied = copy.deepcopy(model, memo)
    return copied.eval()


def _structure(module: nn.Module) -> tuple:
    return (
        type(module),
        tuple((n, tuple(t.shape), t.dtype) for n, t in [*module.named_parameters(), *module.named_buffers()]),
    )


def _reduce_repeated_blocks(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Shorten every ModuleList of identical layers to KEEP_REPEATED layers; returns path -> (n, kept)."""
    reduced = {}
    for path, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.ModuleList) or len(child) <= KEEP_REPEATED:
                continue
            shapes = {_structure(layer) for layer in child}
            if len(shapes) != 1:
                continue
            setattr(parent, name, nn.ModuleList(list(child)[:KEEP_REPEATED]))
            reduced[_join(path, name)] = (len(child), KEEP_REPEATED)
    return reduced


def representative(path: str, reduced: dict[str, tuple[int, int]]) -> str | None:
    """The traced module that stands for ``path`` in a depth-reduced trace (layer i -> 0, 1 or 2)."""
    for block in reduced:
        if path.startswith(block + "."):
            rest = path[len(block) + 1 :]
            index, _, tail = rest.partition(".")
            if not index.isdigit():
                return path
            i = int(index)
            rep = i if i < KEEP_REPEATED else 1 + (i - 1) % (KEEP_REPEATED - 1)
            return f"{block}.{rep}" + (f".{tail}" if tail else "")
    return path


def _record_calls(graph: ModelGraph, exported, reduced: dict[str, tuple[int, int]], names: dict[int, str]) -> None:
    """Fill calls, order and first-call shapes of every module from the exported graph.

    ``names``: static sizes to show as batch/seq; without them, export's symbols are named.
    """
    sig = exported.graph_signature
    user_inputs = set(sig.user_inputs)
    nodes = list(exported.graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    symbols = names or _symbol_names(nodes, user_inputs)
    call_keys: dict[str, list[str]] = defaultdict(list)
    members: dict[str, set] = defaultdict(set)
    first_seen: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for key, (path, _cls) in (node.meta.get("nn_module_stack") or {}).items():
            if not path or key.startswith("_empty"):
                continue
            if key not in call_keys[path]:
                call_keys[path].append(key)
            members[key].add(node)
            first_seen.setdefault(path, index)

    traced_order = sorted(first_seen, key=first_seen.get)
    order = {path: i for i, path in enumerate(_expand_order(traced_order, reduced))}
    for path, info in graph.modules.items():
        rep = representative(path, reduced)
        keys = call_keys.get(rep, [])
        info.calls = len(keys)
        info.order = order.get(path)
        if keys:
            info.input_shape, info.output_shape = _call_shapes(members[keys[0]], position, user_inputs, symbols)


def _expand_order(traced: list[str], reduced: dict[str, tuple[int, int]]) -> list[str]:
    """First-call order of the full model, replaying each representative layer for every layer it stands for."""
    out, done = [], set()
    for path in traced:
        block = next((b for b in reduced if path.startswith(b + ".")), None)
        if block is None:
            out.append(path)
            continue
        if block in done:
            continue
        done.add(block)
        inside = [t for t in traced if t.startswith(block + ".")]
        for i in range(reduced[block][0]):
            rep = representative(f"{block}.{i}", reduced)
            out += [f"{block}.{i}{t[len(rep) :]}" for t in inside if t == rep or t.startswith(rep + ".")]
    return out


def _symbol_names(nodes, user_inputs: set) -> dict[str, str]:
    """Readable names for the dynamic dimensions of input_ids: batch and seq."""
    for node in nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and val.dim() == 2:
                return {str(val.shape[0]): "batch", str(val.shape[1]): "seq"}
    return {}


def _shape_of(node, symbols: dict) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return None
    return tuple(symbols.get(d, d) if isinstance(d, int) else _readable(str(d), symbols) for d in val.shape)


def _readable(expr: str, symbols: dict) -> str:
    """Replace export's symbol names (s70) in a size expression with batch/seq."""
    return re.sub(r"\bs\d+\b", lambda m: symbols.get(m.group(0), m.group(0)), expr)


def _call_shapes(
    nodes: set, position: dict, user_inputs: set, symbols: dict[str, str]
) -> tuple[tuple | None, tuple | None]:
    """Shape of the first outside input and of the last result used outside of one module call."""
    ordered = sorted(nodes, key=position.__getitem__)
    input_shape = None
    for node in ordered:
        for arg in node.all_input_nodes:
            if arg in nodes or (arg.op == "placeholder" and arg.name not in user_inputs):
                continue
            input_shape = _shape_of(arg, symbols)
            if input_shape is not None:
                break
        if input_shape is not None:
            break
    output_shape = None
    for node in reversed(ordered):
        if any(user not in nodes for user in node.users):
            output_shape = _shape_of(node, symbols)
            if output_shape is not None:
                break
    return input_shape, output_shape


def refresh(graph: ModelGraph, model: nn.Module) -> ModelGraph:
    """The same graph with module classes, parameters and quantized state re-read from ``model``.

    Calls and shapes do not change when layers are quantized or wrapped, so a base that was traced
    once can be re-planned after ``quantize_base`` without tracing again.
    """
    modules = _module_infos(model)
    for path, info in modules.items():
        old = graph.modules.get(path)
        if old is not None:
            info.calls, info.order, info.input_shape, info.output_shape = (
                old.calls,
                old.order,
                old.input_shape,
                old.output_shape,
            )
    return ModelGraph(
        graph.model_class,
        modules,
        find_ties(model),
        graph.method,
        graph.seconds,
        graph.reason,
        graph.reduced,
        graph.exported,
        graph.config,
        graph.name,
    )


def decoder_layers(base: nn.Module) -> list[nn.Module]:
    """The repeated blocks (to shard one by one): transformers' ``_no_split_modules`` classes, else the longest
    ModuleList."""
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if layers:
        return layers
    lists = [m for m in base.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []
