"""The plan at long context: activation terms exact at any block size, the longest block size that fits a device
(bisection), the goal figures of an 8B QLoRA, and a plan that refuses what surgery train refuses."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from surgery.base.loading import graph_of, load_model, target_rules
from surgery.errors import ShardingError
from surgery.planning.decisions import plan
from surgery.planning.training_memory import (
    TrainingShape,
    _saved_parts,
    activation_terms,
    max_context,
    measure_activations,
    meta_finetune,
    training_peak,
)
from surgery.rules.rule_file import load_rules
from surgery_cli.app import app

GiB = 1 << 30


def tiny_llama():
    return load_model("tiny-llama", weights=False).model, plan(graph_of("tiny-llama"), "qlora_nf4")


@pytest.mark.parametrize("attention", ["fused", "math"])
def test_the_fitted_terms_equal_the_meta_forward_at_another_length(attention):
    layout, planned = tiny_llama()
    shape = TrainingShape(2, 1, attention=attention, loss_chunk_tokens=0)
    profile = measure_activations(layout, planned, shape)
    counted = _saved_parts(meta_finetune(layout, planned), 2, 200, attention == "fused")
    for key, value in counted.items():
        assert getattr(profile, key)(200) == value, key  # exact: every part is a polynomial in the tokens
    if attention == "math":
        assert profile.layer.c2 > 0  # eager attention keeps the (T, T) scores
    else:
        assert profile.layer.c2 == 0


def test_checkpointing_chunking_and_offloading_move_the_terms():
    layout, planned = tiny_llama()
    profile = measure_activations(layout, planned, TrainingShape(1, 1))
    full = activation_terms(profile, TrainingShape(1, 4096, loss_chunk_tokens=0))
    chunked = activation_terms(profile, TrainingShape(1, 4096))
    checkpointed = activation_terms(profile, TrainingShape(1, 4096, gradient_checkpointing=True))
    offloaded = activation_terms(profile, TrainingShape(1, 4096, gradient_checkpointing=True, offload_activations=True))
    on_cpu = activation_terms(
        profile, TrainingShape(1, 4096, gradient_checkpointing=True, offload_activations=True, device="cpu")
    )
    hidden = layout.config.hidden_size * 4  # fp32
    vocab = layout.config.vocab_size
    assert full.loss >= 4096 * vocab * 4 > chunked.loss  # the full logits' gradient alone
    assert chunked.loss == 4096 * hidden + 16 * 512 * vocab  # final hidden states + one chunk's logits
    assert checkpointed.layer_inputs == layout.config.num_hidden_layers * 4096 * hidden
    assert checkpointed.layers < chunked.layers
    assert offloaded.host == checkpointed.layer_inputs and offloaded.device == checkpointed.device - offloaded.host
    assert on_cpu.host == 0 and on_cpu.device == checkpointed.device  # nothing to offload to on the CPU


def test_max_context_fits_and_one_more_token_does_not_and_grows_with_memory():
    layout, planned = tiny_llama()
    shape = TrainingShape(1, 1, gradient_checkpointing=True, precision="bf16")
    answers = [max_context(planned, layout, shape, budget, explore=False) for budget in (2 * GiB, 3 * GiB, 6 * GiB)]
    for budget, answer in zip((2 * GiB, 3 * GiB, 6 * GiB), answers):
        assert answer.tokens > 0
        assert answer.peak.total <= budget < answer.next_peak.total
        again = training_peak(planned, layout, answer.shape)  # measured afresh at the answer's length
        assert again.total == answer.peak.total
    assert [a.tokens for a in answers] == sorted(a.tokens for a in answers)
    assert answers[0].tokens < answers[-1].tokens
    none = max_context(planned, layout, shape, GiB // 2, explore=False)  # the CUDA margin alone is 1 GiB
    assert none.tokens == 0 and none.peak.total > GiB // 2


def test_max_context_adds_the_memory_options_that_help():
    layout, planned = tiny_llama()
    asked = TrainingShape(1, 1, precision="bf16", loss_chunk_tokens=0)
    plain = max_context(planned, layout, asked, 3 * GiB, explore=False)
    best = max_context(planned, layout, asked, 3 * GiB)
    assert best.tokens > plain.tokens
    assert set(best.added) <= {
        "--gradient-checkpointing",
        "--loss-chunk-tokens 128",
        "--offload-activations",
        "--mlp-chunk-tokens 1024",
    }
    assert "--gradient-checkpointing" in best.flags() and f"--block-size {best.tokens}" in best.flags()


def test_a_chunked_mlp_keeps_one_chunk_of_inner_activations():
    layout, planned = tiny_llama()
    profile = measure_activations(layout, planned, TrainingShape(1, 1, precision="bf16"))
    for checkpointing in (True, False):
        whole = activation_terms(profile, TrainingShape(1, 4096, gradient_checkpointing=checkpointing))
        chunked = activation_terms(
            profile, TrainingShape(1, 4096, gradient_checkpointing=checkpointing, mlp_chunk_tokens=256)
        )
        layers = profile.layers if not checkpointing else 1
        # the MLP keeps its input, and one chunk's inner activations live at a time
        assert chunked.mlp == layers * profile.hidden_bytes(4096) + profile.mlp(256)
        assert chunked.layers == whole.layers - whole.mlp + chunked.mlp
        assert chunked.backward <= whole.backward
    longer = activation_terms(profile, TrainingShape(1, 100, mlp_chunk_tokens=256))  # the chunk holds every token
    assert longer == activation_terms(profile, TrainingShape(1, 100))


def test_llama_8b_qlora_r32_longest_context():
    """Llama-3.1-8B, nf4 + LoRA r=32 on every linear layer, batch 1, bf16, checkpointing, chunked loss, offloading:
    the plan adds --mlp-chunk-tokens (one layer recomputed in backward would keep about 301 KiB per token, 172 KiB
    of it the MLP's inner activations) and loss chunks of 128 tokens, and reaches the goals, 40,000 tokens on 16 GiB
    and 300,000 on 80 GiB (the model's positions end at 131,072: the plan says so beside the answer)."""
    name = "meta-llama/Llama-3.1-8B"
    planned = plan(graph_of(name), target_rules(load_rules("qlora_r32"), True))
    layout = load_model(name, weights=False).model
    shape = TrainingShape(1, 1, gradient_checkpointing=True, precision="bf16", offload_activations=True)
    asked = max_context(planned, layout, shape, 16 * GiB, model_limit=131072, explore=False)
    small = max_context(planned, layout, shape, 16 * GiB, model_limit=131072)
    large = max_context(planned, layout, shape, 80 * GiB, model_limit=131072)
    assert asked.tokens < small.tokens and small.tokens >= 40_000 and not small.limited_by_model
    assert small.added == ("--loss-chunk-tokens 128", "--mlp-chunk-tokens 1024")
    assert small.peak.terms.mlp < small.peak.terms.layers / 2  # chunked, the MLP no longer dominates the layer
    assert small.peak.host == 32 * small.tokens * 4096 * 2  # the offloaded inputs: layers x tokens x hidden, bf16
    # 80 GiB would hold 300,000 tokens and more, but the model's positions end first: the answer is the limit, with
    # the fewest added options that reach it
    assert large.memory_tokens >= 300_000 and large.tokens == 131_072 and large.limited_by_model
    assert large.added == () and large.peak.total <= 80 * GiB
    assert f"--block-size {large.tokens}" in large.flags()


def run(*args):
    return CliRunner().invoke(app, list(args))


def test_plan_refuses_fsdp_on_an_int8_base_as_train_does(tmp_path):
    planned = run("plan", "all_linear_lora", "--model", "tiny-llama", "--world-size", "2", "--fsdp")
    trained = run(
        "train", "all_linear_lora", "--model", "tiny-llama", "--data", "capitals", "--out", str(tmp_path), "--fsdp"
    )
    assert planned.exit_code == trained.exit_code == 2
    line = next(x for x in trained.output.splitlines() if "--fsdp with int8" in x)
    assert "FSDP cannot shard LLM.int8" in line and line in planned.output
    assert not (tmp_path / "adapter.safetensors").exists()


def test_the_library_checks_are_one_for_plan_and_train():
    from surgery.devices import DeviceConfig
    from surgery.training.config import DataConfig, TrainConfig
    from surgery.training.run import _check_combinations
    from surgery_cli.plan_cmd import _refuse_like_train

    rules = load_rules("all_linear_lora")
    configs = (TrainConfig(fsdp=True), DataConfig(), DeviceConfig())
    with pytest.raises(ShardingError) as by_plan:
        _refuse_like_train(*configs, 1, rules, plan(graph_of("tiny-llama"), rules))
    with pytest.raises(ShardingError) as by_train:
        _check_combinations(*configs, [(None, rules, "capitals")], "tiny-llama")
    assert str(by_plan.value) == str(by_train.value)


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--offload-activations"], "--offload-activations does nothing without --gradient-checkpointing"),
        (["--max-memory", "0=4GiB"], "--max-memory does nothing without --device-map"),
        (["--device", "gpu"], "--device 'gpu': write auto (CUDA when there is a GPU, else the CPU), cpu, cuda"),
        (["--loss-chunk-tokens", "-1"], "--loss-chunk-tokens must be >= 0"),
    ],
)
def test_plan_and_train_refuse_the_same_options(tmp_path, extra, needle):
    planned = run("plan", "qv_lora", "--model", "tiny-llama", *extra)
    trained = run("train", "qv_lora", "--model", "tiny-llama", "--data", "capitals", "--out", str(tmp_path), *extra)
    assert planned.exit_code == trained.exit_code == 2
    assert needle in planned.output and needle in trained.output


def test_the_verdict_says_which_device_and_precision_it_assumes():
    gpu = run("plan", "qv_lora", "--model", "tiny-llama", "--device-memory", "8GiB")
    assert gpu.exit_code == 0, gpu.output
    flat = " ".join(gpu.output.split())
    assert "training verdict for CUDA, fp32" in flat and "a GPU run is assumed" in flat
    assert "batch size 8 (surgery train's default" in flat  # --device-memory alone still gives a verdict
    assert "predicted peak" in flat and "CUDA context margin" in flat
    cpu = run("plan", "qv_lora", "--model", "tiny-llama", "--device", "cpu", "--batch-size", "2")
    flat = " ".join(cpu.output.split())
    assert "training verdict for the CPU, fp32" in flat and "CUDA context margin" not in flat
    half = run(
        "plan", "qv_lora", "--model", "tiny-llama", "--device", "cuda", "--batch-size", "2", "--precision", "bf16"
    )
    assert "training verdict for CUDA, bf16 autocast" in " ".join(half.output.split())


def test_cli_max_context_prints_the_answer_its_flags_and_json():
    args = [
        "plan",
        "qlora_nf4",
        "--model",
        "tiny-llama",
        "--device-memory",
        "3GiB",
        "--batch-size",
        "1",
        "--max-context",
    ]
    shown = run(*args)
    assert shown.exit_code == 0, shown.output
    flat = " ".join(shown.output.split())
    assert "longest block size:" in flat and "train with: --batch-size 1 --block-size" in flat
    assert "layer activations" in flat and "where the model's positions end" in flat
    data = json.loads(run(*args, "--json").stdout)["max_context"]
    limit = load_model("tiny-llama", weights=False).model.config.max_position_embeddings
    # tiny-llama's positions end long before 3 GiB does: the answer is the limit, and what the memory would allow
    assert data["model_limit"] == data["tokens"] == limit < data["memory_tokens"]
    assert data["total"] <= 3 * GiB < data["next_total"] and f"--block-size {limit}" in data["flags"]
    refused = run("plan", "qlora_nf4", "--model", "tiny-llama", "--max-context")
    assert refused.exit_code == 2 and "--max-context does nothing without --device-memory" in refused.output


def test_an_empty_device_memory_is_refused_not_ignored():
    result = run("plan", "qv_lora", "--model", "tiny-llama", "--device-memory", "")
    assert result.exit_code == 2 and "--device-memory ''" in result.output and "write a size" in result.output
