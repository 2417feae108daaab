"""Half-precision trainable tensors train through fp32 masters: gradients accumulate in fp32, AdamW steps the
master exactly as fp32 AdamW does, the module holds the master rounded, resume is exact, the plan counts them."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open

import surgery
from surgery.base.tiny import tiny_model
from surgery.base.tokenizer import tiny_tokenizer
from surgery.errors import TrainError
from surgery.planning.decisions import plan
from surgery.planning.training_memory import TrainingShape, training_peak
from surgery.training.config import DataConfig
from surgery.training.job import TrainConfig, make_job
from surgery.training.loop import train_jobs as train
from surgery.training.master_weights import MasterWeights

TOK = tiny_tokenizer()


def bf16_linear() -> torch.nn.Linear:
    layer = torch.nn.Linear(64, 64).to(torch.bfloat16)
    with torch.no_grad():  # weights near 0.1: a bf16 half-ulp there (2.4e-4) is larger than the update (1e-4)
        layer.weight.copy_(0.1 + 0.01 * torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))
    return layer


def test_gradients_accumulate_in_fp32_and_the_step_is_fp32_adamws():
    layer = bf16_linear()
    init = layer.weight.detach().clone()
    stepped, masters = MasterWeights.of(list(layer.parameters()))
    assert all(p.dtype == torch.float32 for p in stepped) and len(masters.pairs) == 2
    optimizer = torch.optim.AdamW(stepped, lr=1e-4)
    reference = torch.nn.Parameter(init.float())  # fp32 AdamW on the same fp32 gradient: what the master must be
    ref_optimizer = torch.optim.AdamW([reference], lr=1e-4)
    pure = torch.nn.Parameter(init.clone())  # pure bf16 AdamW (what training did before masters)
    pure_optimizer = torch.optim.AdamW([pure], lr=1e-4)
    inputs = [torch.randn(8, 64, generator=torch.Generator().manual_seed(s)).bfloat16() for s in range(6)]
    for step in range(3):
        for x in inputs[2 * step : 2 * step + 2]:  # two micro-batches per step
            layer(x).float().square().mean().backward()
            assert layer.weight.grad is None  # moved to the master as it was produced
        optimizer.step()
        masters.write_back()
        ref_grad = masters.pairs[0][1].grad.clone()
        reference.grad = ref_grad
        ref_optimizer.step()
        pure.grad = ref_grad.bfloat16()
        pure_optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        assert torch.equal(masters.pairs[0][1], reference)  # the master is fp32 AdamW, bit for bit
        assert torch.equal(layer.weight, reference.bfloat16())  # the module holds it rounded once
    assert (layer.weight != init).float().mean() > 0.25  # up to 3e-4 of movement shows after rounding
    assert (pure != init).float().mean() < 0.05  # pure bf16 lost the updates to rounding
    masters.close()
    layer(inputs[0]).float().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.dtype == torch.bfloat16  # hooks gone


def test_two_micro_batches_sum_in_fp32():
    layer = bf16_linear()
    expected = torch.zeros(64, 64)
    for seed in range(2):
        x = torch.randn(8, 64, generator=torch.Generator().manual_seed(seed)).bfloat16()
        twin = copy.deepcopy(layer)
        twin(x).float().square().mean().backward()
        expected += twin.weight.grad.float()
    _, masters = MasterWeights.of([layer.weight])
    for seed in range(2):
        x = torch.randn(8, 64, generator=torch.Generator().manual_seed(seed)).bfloat16()
        layer(x).float().square().mean().backward()
    assert torch.equal(masters.pairs[0][1].grad, expected)
    masters.close()


def bf16_job(base, out=None, **config):
    settings = {"batch_size": 8, "lr": 1e-3, "max_steps": 6, "seed": 0, **config}
    return make_job(
        base,
        name="job",
        rules="qv_lora_head",
        data="upper",
        tokenizer=TOK,
        config=TrainConfig(**settings),
        data_config=DataConfig(block_size=24),
        out=out,
        model_name="tiny-llama",
    )


def bf16_base() -> torch.nn.Module:
    return tiny_model("tiny-llama").to(torch.bfloat16)


def test_a_plain_head_on_a_bf16_base_trains_through_masters_and_resumes_exactly(tmp_path):
    base = bf16_base()
    straight = bf16_job(base, save_steps=3, out=tmp_path / "straight")
    before = {k: v.clone() for k, v in base.state_dict().items()}  # the base as the rules quantized it
    head = straight.finetune.get_submodule("lm_head").weight
    start = head.detach().clone()
    (run,) = train([straight])
    assert head.dtype == torch.bfloat16 and len(run.masters.pairs) == 1 and not torch.equal(head, start)
    assert torch.equal(head, run.masters.pairs[0][1].bfloat16())
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())  # the shared base is untouched
    with safe_open(str(tmp_path / "straight" / "checkpoint-3" / "training_state.safetensors"), "pt") as f:
        assert f.get_tensor("master.0").dtype == torch.float32  # the master, not the rounded head, is kept
    resumed = bf16_job(bf16_base(), out=tmp_path / "resumed")
    train([resumed], resume={"job": tmp_path / "straight" / "checkpoint-3"})
    for (name, a), b in zip(
        surgery.base.ownership.own_state(straight.finetune).items(),
        surgery.base.ownership.own_state(resumed.finetune).values(),
    ):
        assert torch.equal(a, b), name
    ids = torch.tensor([[1, 2, 3]])
    straight.finetune(input_ids=ids, labels=ids).loss.backward()  # after the run: gradients on the tensor again
    assert head.grad is not None


def test_the_plan_counts_masters_their_gradients_and_fp32_moments():
    base = bf16_base()
    j = bf16_job(base, max_steps=1)
    (run,) = train([j])
    state = sum(
        t.numel() * t.element_size()
        for s in run.optimizer.state.values()
        for key, t in s.items()
        if isinstance(t, torch.Tensor) and key != "step"
    )
    stepped = [p for group in run.optimizer.param_groups for p in group["params"]]
    peak = training_peak(plan(base, "qv_lora_head"), None, TrainingShape(8, 24, device="cpu"))
    assert peak.optimizer == state + run.masters.bytes
    assert peak.gradients == sum(p.numel() * 4 for p in stepped)  # every stepped tensor is fp32


def test_a_checkpoint_without_its_masters_is_refused_and_changes_nothing(tmp_path):
    from safetensors.torch import load_file, save_file

    train([bf16_job(bf16_base(), max_steps=4, save_steps=2, out=tmp_path / "run")])
    state = tmp_path / "run" / "checkpoint-2" / "training_state.safetensors"
    with safe_open(str(state), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(state)
    tensors["master.0"] = tensors["master.0"].bfloat16()  # a master that lost its low bits
    save_file(tensors, state, metadata=metadata)
    fresh = bf16_job(bf16_base(), max_steps=4, out=tmp_path / "again")
    before = {k: v.clone() for k, v in surgery.base.ownership.own_state(fresh.finetune).items()}
    with pytest.raises(TrainError, match="training_state.safetensors: the fp32 master 'master.0'"):
        train([fresh], resume={"job": tmp_path / "run" / "checkpoint-2"})
    assert all(torch.equal(before[k], v) for k, v in surgery.base.ownership.own_state(fresh.finetune).items())
