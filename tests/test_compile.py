"""--compile: a fine-tune whose forward is torch.compiled trains to the losses and adapter of the eager one (fp32, int8
and nf4 bases), stays the same object on the same shared base, and bad settings fail before training."""

from __future__ import annotations

import pytest
import torch

from surgery.base.ownership import own_state
from surgery.base.tiny import tiny_model
from surgery.base.tokenizer import tiny_tokenizer
from surgery.errors import TrainError
from surgery.training.config import DataConfig
from surgery.training.job import TrainConfig, make_job
from surgery.training.loop import train_jobs as train

TOK = tiny_tokenizer()


def rules(storage: str, dropout: float = 0.1) -> dict:
    """LoRA on q/v over a base stored as ``storage`` (every other Linear too; embeddings and lm_head frozen)."""
    return {
        "quantize": storage,
        "default": "freeze" if storage == "none" else "quantize",
        "rules": [
            {"match": "lm_head", "action": "freeze"},
            {"match": "*", "type": "embedding", "action": "freeze"},
            {"match": "re:.*(q_proj|v_proj)", "action": "adapt", "lora": {"r": 4, "alpha": 8, "dropout": dropout}},
        ],
    }


def trained(storage: str, dropout: float = 0.1, evaluate: bool = True, **compile_settings):
    """(losses, adapter tensors, fine-tune, base) of 3 steps (ragged batches), with an eval at step 3."""
    base = tiny_model("tiny-llama")
    config = TrainConfig(
        batch_size=4, lr=1e-2, max_steps=3, eval_steps=3 if evaluate else None, seed=0, **compile_settings
    )
    job = make_job(
        base,
        name="j",
        rules=rules(storage, dropout),
        data="capitals",
        tokenizer=TOK,
        config=config,
        data_config=DataConfig(eval_data="upper" if evaluate else None, block_size=40),
    )
    (run,) = train([job])
    losses = [r.get("loss", r.get("eval_loss")) for r in run.history]
    return losses, {k: v.detach().clone() for k, v in own_state(job.finetune).items()}, job.finetune, base


def assert_close(eager, compiled, rel: float) -> None:
    (losses_e, own_e, *_), (losses_c, own_c, *_) = eager, compiled
    assert losses_c == pytest.approx(losses_e, rel=rel)
    assert own_e.keys() == own_c.keys() and own_e
    for key in own_e:
        torch.testing.assert_close(own_c[key], own_e[key], rtol=rel, atol=rel * own_e[key].abs().max().item(), msg=key)


@pytest.mark.parametrize("storage", ["none", "int8", "nf4"])
def test_a_compiled_finetune_trains_as_the_eager_one(storage):
    """aot_eager: dynamo's graphs and AOT autograd's joint forward/backward, no code generation (fast); the
    fp32 arithmetic is the eager one's, so losses agree to float rounding."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # each storage starts with dynamo's caches empty (so no test meets its recompile limit)
    counters.clear()
    eager = trained(storage)
    compiled = trained(storage, compile=True, compile_backend="aot_eager")
    assert counters["aot_autograd"]["total"] > 0 or counters["frames"]["ok"] > 0  # something was compiled
    assert_close(eager, compiled, rel=1e-5)
    ft, base = compiled[2], compiled[3]
    # compiled in place: the fine-tune's own body (the chunked loss calls the body, then the output layer by chunks)
    assert ft.base_model._compiled_call_impl is not None and ft.base_model is not base.base_model
    shared = {id(p) for p in base.parameters()}
    assert all(id(p) in shared for p in ft.parameters() if not p.requires_grad)


def test_inductor_compiles_the_finetune_and_matches_eager():
    """The default backend, with generated C++ kernels: fused float32 reductions differ from eager in rounding.
    Without dropout: inductor draws its own dropout masks (not eager's stream), so with dropout runs differ."""
    torch._dynamo.reset()
    eager = trained("none", dropout=0.0, evaluate=False)
    assert_close(eager, trained("none", dropout=0.0, evaluate=False, compile=True), rel=1e-4)


def test_bad_compile_settings_fail_before_training(tmp_path):
    base = tiny_model("tiny-llama")
    with pytest.raises(TrainError, match=r"--compile-backend must be one of .*inductor.*not 'fast'"):
        make_job(
            base,
            name="j",
            rules=rules("none"),
            data="upper",
            tokenizer=TOK,
            config=TrainConfig(compile=True, compile_backend="fast"),
        )
    job = make_job(
        base,
        name="j",
        rules=rules("none"),
        data="upper",
        tokenizer=TOK,
        config=TrainConfig(compile=True, compile_backend="aot_eager", max_steps=1),
        out=tmp_path / "run",
    )
    with pytest.raises(TrainError, match=r"--batched with --compile: --compile compiles each fine-tune's forward"):
        train([job], batched=True)
    assert not (tmp_path / "run").exists()
