import math

import bitsandbytes as bnb
import pytest
import torch

import surgery
from surgery.base.tiny import tiny_model
from surgery.errors import PlanError
from surgery.layers.bnb import held_bytes
from surgery.model.architectures import TINY_MODELS
from surgery.planning.memory import quantized_weight_bytes
from surgery.rules.ruleset import QuantConfig


@pytest.mark.parametrize("rules", ["qv_lora", "all_linear_lora", "qlora_nf4", "finetuna_default", "full_finetune"])
@pytest.mark.parametrize("model", list(TINY_MODELS))
def test_bundled_rules_plan_cleanly_on_tiny_models(tiny_graphs, model, rules):
    plan = surgery.plan(tiny_graphs[model], rules)
    assert plan.ok and plan.trainable_params > 0
    assert plan.base_bytes_after <= plan.base_bytes_now
    assert plan.to_dict()["decisions"]


@pytest.fixture(scope="module")
def big_graphs():
    from surgery.base.loading import load_model

    return {
        name: surgery.trace(load_model(name, weights=False).model)
        for name in ("facebook/opt-1.3b", "meta-llama/Llama-3.1-8B")
    }


@pytest.mark.parametrize("rules", ["qv_lora", "all_linear_lora", "qlora_nf4", "finetuna_default", "full_finetune"])
@pytest.mark.parametrize("model", ["facebook/opt-1.3b", "meta-llama/Llama-3.1-8B"])
def test_bundled_rules_plan_cleanly_on_big_configs(big_graphs, model, rules):
    plan = surgery.plan(big_graphs[model], rules, finetunes=8)
    assert plan.ok
    assert plan.total_bytes() < plan.full_copies_bytes() or rules == "full_finetune"


def test_qv_lora_counts_on_opt_1_3b(big_graphs):
    plan = surgery.plan(big_graphs["facebook/opt-1.3b"], "qv_lora")
    adapted = plan.by_action("adapt")
    assert len(adapted) == 48  # q_proj and v_proj of 24 layers
    assert plan.trainable_params == 48 * 8 * (2048 + 2048)
    assert plan.finetune_bytes == plan.trainable_params * 4  # fp32 adapters


# --------------------------------------------------------------------------- memory vs bitsandbytes


def _quantize_with_bnb(module, quant: QuantConfig):
    """Quantize one Linear/Embedding directly with bitsandbytes and return the stored weight."""
    if isinstance(module, torch.nn.Embedding):
        if quant.scheme == "int8":
            q = bnb.nn.Embedding8bit(module.num_embeddings, module.embedding_dim)
        else:
            q = bnb.nn.Embedding4bit(module.num_embeddings, module.embedding_dim, quant_type=quant.scheme)
    elif quant.scheme == "int8":
        q = bnb.nn.Linear8bitLt(
            module.in_features, module.out_features, bias=module.bias is not None, has_fp16_weights=False
        )
    else:
        q = bnb.nn.Linear4bit(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            compress_statistics=quant.double_quant,
            quant_type=quant.scheme,
        )
    q.load_state_dict(module.state_dict())
    return q.to("cpu").weight


@pytest.mark.parametrize(
    "quant",
    [
        QuantConfig("int8"),
        QuantConfig("nf4"),
        QuantConfig("nf4", double_quant=True),
        QuantConfig("fp4"),
        QuantConfig("fp4", double_quant=True),
    ],
    ids=["int8", "nf4", "nf4-dq", "fp4", "fp4-dq"],
)
@pytest.mark.parametrize("model", ["tiny-opt", "tiny-llama"])
def test_predicted_bytes_equal_what_bitsandbytes_allocates(tiny_graphs, model, quant):
    torch_model = tiny_model(model)
    graph = tiny_graphs[model]
    checked = 0
    for path, module in torch_model.named_modules():
        kind = graph.modules[path].kind
        if kind not in ("linear", "embedding"):
            continue
        if kind == "embedding" and quant.double_quant:
            continue  # bitsandbytes' Embedding4bit has no double quantization
        predicted = quantized_weight_bytes(kind, tuple(module.weight.shape), quant)
        assert predicted == held_bytes(_quantize_with_bnb(module, quant)), path
        checked += 1
    assert checked >= 10


def test_plan_memory_adds_up_per_tensor(tiny_graphs):
    g = tiny_graphs["tiny-llama"]
    plan = surgery.plan(
        g, {"quantize": "int8", "default": "freeze", "rules": [{"match": "*", "type": "linear", "action": "quantize"}]}
    )
    expected = 0
    for m in g.leaves():
        for p in m.params:
            if m.kind == "linear" and p.name == "weight":
                expected += p.numel + 4 * p.shape[0]
            else:
                expected += p.nbytes
    assert plan.base_bytes_after == expected
    assert plan.base_bytes_now == sum(p.nbytes for m in g.leaves() for p in m.params)


def test_double_quant_formula_for_a_large_layer():
    quant = QuantConfig("nf4", double_quant=True)
    shape = (4096, 4096)
    blocks = 4096 * 4096 // 64
    assert (
        quantized_weight_bytes("linear", shape, quant)
        == 4096 * 4096 // 2 + blocks + 4 * math.ceil(blocks / 256) + 1024 + 4 + 64
    )


# --------------------------------------------------------------------------------- constraints


def _quantized_base(name="tiny-opt", module="model.decoder.layers.0.fc1"):
    model = tiny_model(name)
    parent_name, _, child = module.rpartition(".")
    parent = model.get_submodule(parent_name)
    fp = getattr(parent, child)
    q = bnb.nn.Linear8bitLt(fp.in_features, fp.out_features, bias=fp.bias is not None, has_fp16_weights=False)
    q.load_state_dict(fp.state_dict())
    setattr(parent, child, q.to("cpu"))
    return surgery.trace(model)


def _violation(graph, text, write_rules, constraint):
    path = write_rules(text)
    with pytest.raises(PlanError) as err:
        surgery.plan(graph, surgery.load_rules(path))
    assert err.value.constraints[0] == constraint, err.value.violations
    return str(err.value), path


def test_c1_no_unquantize_after_quantize(write_rules):
    graph = _quantized_base()
    msg, path = _violation(
        graph, "quantize: none\nrules:\n  - match: layers.0.fc1\n    action: adapt\n", write_rules, "C1"
    )
    assert f"{path}:3: rule 1 'layers.0.fc1' keeps model.decoder.layers.0.fc1 unquantized" in msg
    assert "already holds it as int8" in msg and "load the base again" in msg
    msg, _ = _violation(graph, "quantize: nf4\nrules:\n  - match: fc1\n    action: quantize\n", write_rules, "C1")
    assert "as nf4" in msg
    # freezing or adapting it as int8 is fine
    ok = surgery.plan(graph, {"quantize": "int8", "rules": [{"match": "fc1", "action": "adapt"}]})
    assert ok.decisions["model.decoder.layers.0.fc1"].storage == "int8"
    assert ok.decisions["model.decoder.layers.0.fc1"].quant is None  # nothing to do: already quantized


def test_c2_no_trainable_quantized_module(write_rules):
    graph = _quantized_base()
    msg, path = _violation(
        graph, "quantize: int8\nrules:\n  - match: layers.0.fc1\n    action: plain\n", write_rules, "C2"
    )
    assert f"{path}:3:" in msg and "model.decoder.layers.0.fc1" in msg and "cannot be trained" in msg


def test_c3_adapt_only_on_supported_kinds(write_rules):
    graph = surgery.trace(tiny_model("tiny-llama"))
    msg, path = _violation(graph, "rules:\n  - match: input_layernorm\n    action: adapt\n", write_rules, "C3")
    assert f"{path}:2:" in msg and "adapts 2 modules (model.layers.*.input_layernorm)" in msg and "kind norm" in msg


def test_c4_rule_that_matches_nothing_suggests_close_names(tiny_graphs, write_rules):
    msg, path = _violation(
        tiny_graphs["tiny-opt"],
        "rules:\n  - match: q_proj\n    action: adapt\n  - match: q_projj\n    action: adapt\n",
        write_rules,
        "C4",
    )
    assert f"{path}:4: rule 2 'q_projj' matched no module" in msg
    assert "did you mean 'q_proj' (2 modules)" in msg
    optional = surgery.plan(
        tiny_graphs["tiny-opt"], {"rules": [{"match": "nothing", "action": "adapt", "optional": True}]}
    )
    assert optional.ok


def test_c5_malformed_rules_fail_at_load(write_rules):
    with pytest.raises(surgery.RuleFileError, match="r must be an integer from 1 to"):
        surgery.load_rules(write_rules("rules:\n  - match: q\n    action: adapt\n    lora: {r: 0}\n"))


def test_c6_ties_are_stated_and_splitting_needs_untie(tiny_graphs, write_rules):
    g = tiny_graphs["tiny-opt"]
    msg, path = _violation(g, "quantize: int8\nrules:\n  - match: lm_head\n    action: plain\n", write_rules, "C6")
    assert "lm_head" in msg and "model.decoder.embed_tokens" in msg and "untie: true" in msg and f"{path}:3" in msg
    ok = surgery.plan(g, {"quantize": "int8", "rules": [{"match": "lm_head", "action": "plain", "untie": True}]})
    assert "private copy" in ok.ties[0].message and ok.ties[0].extra_finetune_bytes == 260 * 64 * 4
    # quantizing the embedding while lm_head stays fp32 keeps the fp32 tensor alive: stated and counted
    plan = surgery.plan(
        g, {"quantize": "int8", "default": "freeze", "rules": [{"match": "embed_tokens", "action": "quantize"}]}
    )
    note = plan.ties[0]
    assert "keeps the float32 weight alive for lm_head" in note.message
    assert note.extra_base_bytes == 260 * 64 * 4
    assert plan.base_bytes_after == plan.base_bytes_now + 260 * 64 + 260 * 4


def test_c7_per_module_lora_configs_cover_every_adapted_module(tiny_graphs, write_rules):
    text = "rules:\n  - match: re:.*(q_proj|v_proj)\n    action: adapt\n    lora_by_module:\n      q_proj: {r: 4}\n"
    msg, path = _violation(tiny_graphs["tiny-opt"], text, write_rules, "C7")
    assert f"{path}:2:" in msg and "2 modules (model.decoder.layers.*.self_attn.v_proj)" in msg and "no entry" in msg
    full = surgery.plan(
        tiny_graphs["tiny-opt"],
        {
            "rules": [
                {
                    "match": "re:.*(q_proj|v_proj)",
                    "action": "adapt",
                    "lora_by_module": {"q_proj": {"r": 4}, "v_proj": {"r": 2}},
                }
            ]
        },
    )
    assert full.decisions["model.decoder.layers.1.self_attn.v_proj"].lora.r == 2


def test_all_violations_are_reported_together(tiny_graphs):
    plan = surgery.plan(
        tiny_graphs["tiny-llama"],
        {"rules": [{"match": "norm", "action": "adapt"}, {"match": "nope", "action": "freeze"}]},
        check=False,
    )
    assert {v.constraint for v in plan.violations} == {"C3", "C4"}
    with pytest.raises(PlanError):
        plan.check()


def test_plan_is_pure(tiny_graphs):
    model = tiny_model("tiny-opt")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    surgery.plan(model, "finetuna_default")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("width", [80, 120, 160])
def test_tables_never_cut_module_names(width):
    from surgery.planning.decisions import memory_by_scheme
    from surgery.planning.report import graph_renderable, render_text
    from surgery.rules.ruleset import grouped

    graph = surgery.trace(tiny_model("tiny-opt"))
    names = list(grouped([m.path for m in graph.leaves()]))
    assert "model.decoder.layers.*.self_attn.out_proj" in names
    inspect_text = render_text(graph_renderable(graph, memory_by_scheme(graph)), width=width)
    assert [n for n in names if n not in inspect_text] == []
    the_plan = surgery.plan(graph, "qv_lora_head")
    plan_text = render_text(the_plan, width=width)
    by_rule = {}
    for d in the_plan.decisions.values():
        by_rule.setdefault(d.decided_by, []).append(d.path)
    shown = [n for paths in by_rule.values() for n in list(grouped(paths))[:4]]  # a plan row lists up to 4
    assert len(shown) > 4 and [n for n in shown if n not in plan_text] == []


def test_violations_of_one_rule_and_cause_are_one_line_and_a_conflict_between_jobs_says_so():
    base = tiny_model("tiny-llama")
    with pytest.raises(PlanError) as caught:
        surgery.prepare_base(base, "qv_lora", "qlora_nf4")
    message = str(caught.value)
    assert len(caught.value.violations) == 14 and len(message.splitlines()) == 2  # the note, one grouped line
    assert "keeps 14 modules (model.layers.*.self_attn.q_proj," in message
    assert "all fine-tunes of one base need the same quantization" in message and "qv_lora.yaml" in message
    assert all(isinstance(m, bnb.nn.Linear8bitLt) for n, m in base.named_modules() if n.endswith("q_proj"))


def test_the_count_of_violations_is_the_lines_shown_with_the_modules_beside():
    from surgery.errors import Violation

    violations = [Violation("C1", "m", f"layer{i}") for i in range(3)]
    message = str(PlanError(violations, ["[C1] rule 1 keeps layer* as nf4 ...", "[C4] rule 2 matched nothing"]))
    assert message.splitlines()[0] == "2 constraint violations (3 modules):"
    assert str(PlanError(violations[:1])) == "[C1] m"
