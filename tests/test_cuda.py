"""The CUDA path: bitsandbytes' GPU kernels, bf16/fp16 training, 8-bit AdamW, files, memory as planned.

Skipped without a CUDA device (this project's CI has none); run where one is lent.
"""

from __future__ import annotations

import pytest
import torch

import surgery
from surgery.memory import extra_bytes, parameter_bytes
from surgery.job import TrainConfig, make_job
from surgery.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TOK = surgery.tiny_tokenizer()
SCHEMES = {"int8": "qv_lora", "nf4": "qlora_nf4"}


def cuda_base(name: str = "tiny-llama") -> torch.nn.Module:
    return surgery.tiny_model(name).to("cuda").eval()


def inputs(rows: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, TOK.vocab_size, (rows, length), generator=torch.Generator().manual_seed(0)).cuda()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_planned_bytes_are_held_on_the_gpu(scheme):
    base = cuda_base()
    torch.cuda.synchronize()
    predicted = surgery.plan(surgery.trace(base), SCHEMES[scheme], finetunes=2)
    ft = surgery.rewrite(base, SCHEMES[scheme])
    assert next(ft.parameters()).is_cuda
    assert parameter_bytes(base) == predicted.base_bytes_after
    assert extra_bytes(ft, base) == predicted.finetune_bytes


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_new_finetune_computes_the_quantized_base_on_cuda(scheme):
    base = cuda_base()
    ft = surgery.rewrite(base, SCHEMES[scheme])
    ids = inputs()
    with torch.no_grad():
        got, expected = ft(ids).logits, base(ids).logits
    assert got.is_cuda and torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)  # LoRA B = 0 at init: same kernels, same result


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_training_on_cuda_learns_and_leaves_base_and_sibling_alone(scheme, precision, digest):
    base = cuda_base()
    surgery.prepare_base(base, SCHEMES[scheme])
    sibling = surgery.rewrite(base, SCHEMES[scheme])
    before_base, before_sibling = digest(base), digest(sibling)
    config = TrainConfig(batch_size=8, lr=1e-2, max_steps=30, seed=0, precision=precision)
    job = make_job(base, "job", "lora_plus_head", "upper", TOK, config, block_size=24, model_name="tiny-llama")
    (run,) = train([job])
    losses = [r["loss"] for r in run.history if "loss" in r]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[-5:]) < losses[0] * 0.7
    assert digest(base) == before_base and digest(sibling) == before_sibling


def test_8bit_adamw_runs_on_cuda():
    base = cuda_base()
    config = TrainConfig(batch_size=8, lr=1e-2, max_steps=10, seed=0, optimizer="adamw8bit")
    job = make_job(base, "job", "lora_plus_head", "upper", TOK, config, block_size=24, model_name="tiny-llama")
    (run,) = train([job])
    assert type(run.optimizer).__module__.startswith("bitsandbytes")
    assert all(torch.isfinite(torch.tensor([r["loss"] for r in run.history if "loss" in r])))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_adapter_file_round_trip_and_merge_on_cuda(tmp_path, scheme):
    base = cuda_base()
    ft = surgery.rewrite(base, SCHEMES[scheme])
    with torch.no_grad():
        for name, p in ft.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    path = surgery.save_adapter(ft, tmp_path / "ft.safetensors")
    again = surgery.load_adapter(base, path)
    ids = inputs()
    with torch.no_grad():
        reference = ft(ids).logits
        torch.testing.assert_close(again(ids).logits, reference, rtol=0, atol=0)
        merged = surgery.merge(ft)
        error = (merged(ids).logits - reference).abs().max() / reference.abs().max()
    bound = {"int8": 0.05, "nf4": 1e-5}[scheme]  # int8: LLM.int8's activation quantization; nf4: exact
    assert float(error) <= bound
