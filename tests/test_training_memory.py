"""The plan's training peak: optimizer state exactly as the optimizers allocate it, activations within 15 % of
what autograd saves in a real CPU step, and a verdict with remedies from the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import surgery
from surgery.base.loading import graph_of, load_model
from surgery.base.tiny import tiny_model
from surgery.planning.decisions import plan
from surgery.planning.training_memory import (
    SavedBytes,
    TrainingShape,
    activation_bytes,
    optimizer_state_bytes,
    trainable_tensors,
    training_peak,
)
from surgery.training.job import TrainConfig, build_optimizer
from surgery_cli.app import app


def measured_saved_bytes(name: str, rules: str, rows: int, length: int) -> int:
    """What autograd saves in one real forward + loss of the fine-tune on the CPU, plus the logits' gradient."""
    ft = surgery.rewrite(load_model(name).model, rules).train()
    ids = torch.randint(0, 256, (rows, length), generator=torch.Generator().manual_seed(0))
    saved = SavedBytes(ft)
    with saved:
        logits = ft(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, use_cache=False).logits
    return saved.bytes + logits.numel() * 4


@pytest.mark.parametrize("rules", ["qlora_nf4", "qv_lora", "lora_plus_head", "all_linear_lora"])
@pytest.mark.parametrize("name,attention", [("tiny-llama", "fused"), ("tiny-opt", "fused"), ("tiny-gpt2", "math")])
def test_the_activation_estimate_is_within_15_percent_of_what_autograd_saves(name, attention, rules):
    # tiny-gpt2 trains with attention dropout, which the CPU's SDPA runs on its math path (scores kept): "math"
    estimate = activation_bytes(
        load_model(name, weights=False).model,
        plan(graph_of(name), rules),
        TrainingShape(4, 48, attention=attention, loss_chunk_tokens=0),
    )
    real = measured_saved_bytes(name, rules, 4, 48)
    assert abs(estimate - real) <= 0.15 * real, (estimate, real)


DORA_AND_NEW_TOKENS = {
    "version": 1,
    "quantize": "nf4",
    "default": "freeze",
    "extra_tokens": ["<a>", "<b>"],
    "rules": [{"match": "q_proj", "action": "adapt", "lora": {"r": 4, "use_dora": True}}],
}


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
@pytest.mark.parametrize(
    "rules",
    ["qv_lora", "lora_plus_head", "full_finetune", DORA_AND_NEW_TOKENS],
    ids=["qv_lora", "lora_plus_head", "full_finetune", "dora_and_new_tokens"],
)
def test_optimizer_state_and_gradients_are_what_the_optimizer_allocates(optimizer, rules):
    ft = surgery.rewrite(tiny_model("tiny-llama"), rules)
    params = [p for p in ft.parameters() if p.requires_grad]
    opt = build_optimizer(TrainConfig(optimizer=optimizer), params)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    storages = {
        t.data_ptr(): t.numel() * t.element_size()
        for state in opt.state.values()
        for key, t in state.items()
        if isinstance(t, torch.Tensor) and key != "step"
    }
    storages.update({t.data_ptr(): t.numel() * t.element_size() for t in getattr(opt, "name2qmap", {}).values()})
    held = sum(storages.values())  # the 8-bit quantization maps are shared by every parameter's state
    planned = plan(graph_of("tiny-llama"), rules)
    assert optimizer_state_bytes(trainable_tensors(planned), optimizer) == held
    assert sum(n * s for n, s in trainable_tensors(planned)) == sum(p.numel() * p.element_size() for p in params)


def test_checkpointing_keeps_one_input_per_layer_and_one_layer_recomputed():
    layout, planned = load_model("tiny-llama", weights=False).model, plan(graph_of("tiny-llama"), "qv_lora")
    whole = activation_bytes(layout, planned, TrainingShape(4, 48))
    checkpointed = activation_bytes(layout, planned, TrainingShape(4, 48, gradient_checkpointing=True))
    layers = layout.config.num_hidden_layers
    assert checkpointed < whole
    assert checkpointed >= whole / layers  # at least one layer's activations come back in backward


def test_the_peak_adds_exact_parts_and_scales_with_fine_tunes():
    planned = plan(graph_of("tiny-llama"), "qv_lora")
    one = training_peak(planned, None, TrainingShape(2, 16, device="cpu"))
    three = training_peak(planned, None, TrainingShape(2, 16, finetunes=3, device="cpu"))
    assert one.base == three.base == planned.base_bytes_after and one.activations == 0 and one.context == 0
    assert three.own == 3 * one.own and three.optimizer == 3 * one.optimizer and three.gradients == 3 * one.gradients


def test_cli_plan_says_whether_a_run_fits_and_what_to_change():
    runner = CliRunner()
    args = ["plan", "qv_lora", "--model", "tiny-llama", "--device", "cuda", "--batch-size", "64", "--block-size", "512"]
    fits = runner.invoke(app, [*args, "--device-memory", "80GiB"])
    assert fits.exit_code == 0, fits.output
    assert "predicted peak" in fits.output and "fits" in fits.output and "to fit" not in fits.output
    short = runner.invoke(app, [*args, "--device-memory", "1GiB"])
    assert "does not fit" in short.output and "to fit: --gradient-checkpointing" in short.output
    data = json.loads(runner.invoke(app, [*args, "--device-memory", "1GiB", "--json"]).stdout)
    assert data["training_peak"]["fits"] is False and data["training_peak"]["total"] > 2**30
    bad = runner.invoke(app, [*args, "--optimizer", "sgd"])
    assert bad.exit_code == 2 and "--optimizer must be one of adamw, adamw8bit, not 'sgd'" in bad.output


def test_the_estimate_holds_on_a_smollm2_sized_layer(tmp_path):
    """SmolLM2-135M's layer and vocabulary sizes (4 of its 30 layers, to keep the CPU run short)."""
    from transformers import LlamaConfig

    LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    ).save_pretrained(tmp_path)
    name = str(tmp_path)
    estimate = activation_bytes(
        load_model(name, weights=False).model,
        plan(graph_of(name), "qlora_nf4"),
        TrainingShape(2, 128, loss_chunk_tokens=0),
    )
    ft = surgery.rewrite(load_model(name, random_init=True).model, "qlora_nf4").train()
    ids = torch.randint(0, 49152, (2, 128), generator=torch.Generator().manual_seed(0))
    saved = SavedBytes(ft)
    with saved:
        logits = ft(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, use_cache=False).logits
    real = saved.bytes + logits.numel() * 4
    assert abs(estimate - real) <= 0.15 * real, (estimate, real)


def test_plan_device_map_puts_the_exact_base_on_each_device_as_transformers_would_place_it():
    limits = {0: 3 * 2**30, 1: 3 * 2**30, "cpu": 64 * 2**30}
    done = CliRunner().invoke(
        app,
        [
            "plan",
            "qlora_nf4",
            "--model",
            "meta-llama/Llama-3.1-8B",
            "--json",
            "--device-map",
            "auto",
            "--max-memory",
            "0=3GiB,1=3GiB,cpu=64GiB",
        ],
    )
    assert done.exit_code == 0, done.output
    data = json.loads(done.stdout[done.stdout.index("{") :])
    placed = data["base_bytes_by_device"]
    assert sum(placed.values()) == data["memory"]["base_bytes_after"]  # every tensor once, exactly
    assert set(placed) == {"0", "1", "cpu"}  # the 3 GiB GPUs are full, the rest goes to the CPU
    assert all(placed[str(k)] <= limits[k] for k in (0, 1))
    bad = CliRunner().invoke(app, ["plan", "qlora_nf4", "--model", "tiny-llama", "--device-map", "auto"])
    assert bad.exit_code == 2 and "with --max-memory" in bad.output


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
def test_fsdp_counts_the_root_group_and_two_decoder_layers_unsharded(name):
    from surgery.model.tracing import decoder_layers
    from surgery.planning.memory import extra_bytes, parameter_bytes

    base = tiny_model(name)
    surgery.prepare_base(base, "qlora_nf4")  # the base as the rules store it: what FSDP2 gathers
    layers = decoder_layers(base)
    root = extra_bytes(base, *layers)  # everything outside the decoder layers: FSDP2's root group
    planned = plan(graph_of(name), "qlora_nf4")
    sharded = training_peak(planned, None, TrainingShape(2, 16, world_size=2, fsdp=True, device="cpu"))
    assert sharded.gathered == root + 2 * max(parameter_bytes(layer) for layer in layers)
    assert training_peak(planned, None, TrainingShape(2, 16, device="cpu")).gathered == 0
    assert "FSDP2 gathered (exact bytes)" in [row[0] for row in sharded.rows()]
