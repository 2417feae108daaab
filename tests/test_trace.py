import pytest
import torch
from torch import nn

import surgery
from surgery.base.loading import load_model
from surgery.base.tiny import tiny_model
from surgery.model.tracing import op_kind


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama", "tiny-gpt2"])
def test_tiny_models_trace_by_export(tiny_graphs, name):
    graph = tiny_graphs[name]
    assert graph.method == "export" and graph.reason is None
    assert graph.graph_module is not None and len(list(graph.graph_module.graph.nodes)) > 20
    # every parametrized module of a causal LM is called exactly once and has first-call shapes
    for info in graph.leaves():
        assert info.calls == 1, info
        out_dim = {"linear": 0, "conv1d": 1, "embedding": 1, "positional": 1, "norm": 0, "other": 1}[info.kind]
        assert info.output_shape[-1] == info.param("weight").shape[out_dim], info
    orders = [m.order for m in graph.leaves()]
    assert len(set(orders)) == len(orders)


def test_first_call_shapes_use_batch_and_seq(tiny_graphs):
    g = tiny_graphs["tiny-opt"]
    q = g.modules["model.decoder.layers.0.self_attn.q_proj"]
    assert q.input_shape == ("batch", "seq", 64) and q.output_shape == ("batch", "seq", 64)
    assert g.modules["lm_head"].output_shape == ("batch", "seq", 260)
    assert g.modules["model.decoder.embed_tokens"].input_shape == ("batch", "seq")


def test_op_kinds_on_a_real_module_tree(tiny_graphs):
    # OPT's positional embedding has its own forward: neither quantizable nor adaptable as an Embedding
    assert tiny_graphs["tiny-opt"].modules["model.decoder.embed_positions"].kind == "positional"
    g = tiny_graphs["tiny-gpt2"]
    assert g.modules["transformer.h.0.attn.c_attn"].kind == "conv1d"
    assert g.modules["transformer.wte"].kind == "embedding"
    assert g.modules["transformer.h.0.ln_1"].kind == "norm"
    assert tiny_graphs["tiny-llama"].modules["model.layers.0.input_layernorm"].kind == "norm"
    assert tiny_graphs["tiny-llama"].modules["model.layers.0.mlp.gate_proj"].kind == "linear"


@pytest.mark.parametrize(
    "name,tie",
    [
        ("facebook/opt-125m", ("model.decoder.embed_tokens.weight", "lm_head.weight")),
        ("gpt2", ("transformer.wte.weight", "lm_head.weight")),
        ("meta-llama/Llama-3.1-8B", None),
        ("mistralai/Mistral-7B-v0.1", None),
        ("Qwen/Qwen2.5-7B", None),
    ],
)
def test_bundled_configs_trace_on_meta(name, tie):
    model = load_model(name, weights=False).model
    graph = surgery.trace(model)
    assert graph.method == "export", graph.reason
    assert graph.ties == ([tie] if tie else [])
    assert graph.numel == sum(p.numel() for p in model.parameters())
    assert all(p.device.type == "meta" for p in model.parameters())
    assert not graph.uncalled()


def test_depth_reduced_trace_equals_full_trace():
    """Tracing three layers and carrying them over gives what tracing every layer gives."""
    model = load_model("facebook/opt-125m", weights=False).model
    reduced, full = surgery.trace(model), surgery.trace(model, reduce_repeated=False)
    assert reduced.reduced == {"model.decoder.layers": (12, 3)} and full.reduced == {}
    for path, info in full.modules.items():
        other = reduced.modules[path]
        assert (other.calls, other.order, other.input_shape, other.output_shape) == (
            info.calls,
            info.order,
            info.input_shape,
            info.output_shape,
        ), path


def test_70b_traces_offline_without_weight_memory():
    model = load_model("meta-llama/Llama-3.1-70B", weights=False).model
    graph = surgery.trace(model)
    assert graph.method == "export"
    assert graph.numel == 70_553_706_496
    assert graph.modules["model.layers.79.mlp.down_proj"].calls == 1
    assert graph.modules["model.layers.79.mlp.down_proj"].input_shape == ("batch", "seq", 28672)
    assert all(p.device.type == "meta" for p in model.parameters())


class DataDependent(nn.Module):
    """Control flow on tensor values: torch.export cannot capture it on the meta device."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.a(x)
        return self.b(x)


def test_fallback_to_module_tree_keeps_the_interface():
    model = DataDependent()
    graph = surgery.trace(model, {"x": torch.randn(2, 4)})
    assert graph.method == "module-tree"
    assert graph.reason and "data-dependent" in graph.reason
    assert [m.path for m in graph.leaves()] == ["a", "b"]
    assert graph.modules["a"].kind == "linear" and graph.graph_module is None
    assert graph.uncalled() == []
    plan = surgery.plan(graph, {"rules": [{"match": "a", "action": "adapt"}], "default": "freeze"})
    assert plan.decisions["a"].action == "adapt"


def test_non_hf_model_without_inputs_falls_back_with_reason():
    graph = surgery.trace(nn.Sequential(nn.Linear(3, 3)))
    assert graph.method == "module-tree" and "example_inputs" in graph.reason


def test_custom_model_with_example_inputs_exports():
    graph = surgery.trace(nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)), {"input": torch.randn(4, 3)})
    assert graph.method == "export"
    assert graph.modules["0"].calls == 1 and graph.modules["2"].output_shape[-1] == 2


def test_trace_never_touches_the_model(tiny_graphs):
    model = tiny_model("tiny-opt")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    surgery.trace(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_quantized_modules_are_recognised_and_traced():
    import bitsandbytes as bnb

    model = tiny_model("tiny-opt")
    fc1 = model.model.decoder.layers[0].fc1
    q = bnb.nn.Linear8bitLt(fc1.in_features, fc1.out_features, has_fp16_weights=False)
    q.load_state_dict(fc1.state_dict())
    model.model.decoder.layers[0].fc1 = q.to("cpu")
    graph = surgery.trace(model)
    info = graph.modules["model.decoder.layers.0.fc1"]
    assert graph.method == "export"
    assert info.quantized == "int8" and info.kind == "linear" and info.param("weight").shape == (128, 64)
    assert info.param("weight").nbytes == 128 * 64 + 128 * 4
    assert op_kind(q) == "linear"


def _shapes(graph):
    return {p: (m.input_shape, m.output_shape, m.calls, m.order) for p, m in graph.modules.items()}


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-gpt2"])
def test_static_size_export_names_shapes_as_symbolic_export_does(name):
    """The default (static odd sizes named back) gives exactly what export with symbolic batch and seq gives."""
    from torch.export import Dim

    from surgery.model import tracing

    model = load_model(name, weights=False).model
    inputs, dynamic, names = tracing._export_inputs(model, None)
    assert dynamic is None and set(names.values()) == {"batch", "seq", "seq*batch"}
    symbolic = tracing.ModelGraph(type(model).__name__, tracing._module_infos(model), [], "export", 0.0)
    meta = tracing._logical_meta_copy(model)
    reduced = tracing._reduce_repeated_blocks(meta)
    exported = tracing._export(
        meta,
        {"input_ids": torch.zeros(2, 8, dtype=torch.long, device="meta"), "use_cache": False},
        {"input_ids": {0: Dim("batch", min=1, max=64), 1: Dim("seq", min=2, max=128)}, "use_cache": None},
    )
    tracing._record_calls(symbolic, exported, reduced, {})
    assert _shapes(surgery.trace(model)) == _shapes(symbolic)
    if name == "tiny-opt":  # OPT flattens batch and seq before its MLP
        assert symbolic.modules["model.decoder.layers.0.fc1"].input_shape == ("seq*batch", 64)


def test_static_sizes_skip_numbers_the_model_uses():
    """A model whose width is one of the static sizes is exported with the next free pair, or symbolically."""
    from surgery.model import tracing

    model = load_model("tiny-opt", weights=False).model
    config = model.config
    first = tracing.STATIC_SIZES[0]
    model.model.decoder.layers[0].fc1 = nn.Linear(64, first[0] * first[1], device="meta")
    assert tracing._free_sizes(model, config, 256) == tracing.STATIC_SIZES[1]
    for b, _ in tracing.STATIC_SIZES[1:]:
        model.register_buffer(f"taken_{b}", torch.empty(b, device="meta"))
    _, dynamic, names = tracing._export_inputs(model, None)
    assert dynamic is not None and names == {}
