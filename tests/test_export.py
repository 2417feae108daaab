"""export_graph: a torch.export program of a fine-tune with the eager fine-tune's outputs."""

from __future__ import annotations

import pytest
import torch
from test_state import INPUTS, trained

import surgery
from surgery.base.tiny import tiny_model
from surgery.errors import ExportError
from surgery.finetune.graph_export import export_graph
from surgery.model.architectures import TINY_MODELS

FP32 = {
    "quantize": "none",
    "default": "freeze",
    "rules": [
        {"match": "*", "type": "linear", "action": "adapt"},
        {"match": "*", "type": "conv1d", "action": "adapt", "optional": True},
    ],
}


@pytest.mark.parametrize("model", list(TINY_MODELS))
def test_adapters_are_their_own_nodes_and_outputs_equal_eager(model):
    ft = trained(surgery.rewrite(tiny_model(model), FP32))
    program = export_graph(ft, INPUTS["input_ids"])
    assert any(name.endswith("lora_A") for name in program.graph_signature.parameters)
    other = torch.randint(0, 256, (3, 11))  # another batch size and length: shapes stay dynamic
    with torch.no_grad():
        assert torch.allclose(program.module()(input_ids=other), ft(input_ids=other).logits, rtol=1e-5, atol=1e-6)


NF4_EMBEDDINGS = {
    "quantize": {"scheme": "nf4", "double_quant": True},
    "default": "quantize",
    "rules": [{"match": "*", "type": "embedding", "action": "adapt"}, {"match": "q_proj", "action": "adapt"}],
}


@pytest.mark.parametrize(
    "rules",
    ["qv_lora", "qlora_nf4", "finetuna_default", NF4_EMBEDDINGS],
    ids=["int8", "nf4", "int8-embeddings", "nf4-dq-embeddings"],
)
def test_a_quantized_finetune_exports_quantized_with_equal_outputs(rules):
    ft = trained(surgery.rewrite(tiny_model("tiny-llama"), rules))
    program = export_graph(ft, INPUTS["input_ids"])
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any("bitsandbytes" in t for t in targets)  # still quantized in the graph
    assert not any(type(m).__module__.startswith("surgery.finetune.graph_export") for m in ft.modules())  # ft untouched
    other = torch.randint(0, 256, (3, 11))
    with torch.no_grad():
        assert torch.equal(program.module()(input_ids=other), ft(input_ids=other).logits)


def test_merged_export_of_a_quantized_finetune_equals_the_merged_model():
    ft = trained(surgery.rewrite(tiny_model("tiny-llama"), "qv_lora"))
    program = export_graph(ft, INPUTS["input_ids"], merge=True)
    assert not any("lora" in name for name in program.graph_signature.parameters)
    merged = surgery.merge(ft)
    with torch.no_grad():
        assert torch.allclose(
            program.module()(input_ids=INPUTS["input_ids"]), merged(**INPUTS).logits, rtol=1e-5, atol=1e-6
        )


def test_bad_inputs_are_explained():
    ft = surgery.rewrite(tiny_model("tiny-opt"), FP32)
    with pytest.raises(ExportError, match="input_ids and optionally attention_mask"):
        export_graph(ft, {"pixel_values": torch.zeros(1, 3)})
    with pytest.raises(ExportError, match="not a fine-tune"):
        export_graph(tiny_model("tiny-opt"), INPUTS["input_ids"])
