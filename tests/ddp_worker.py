"""Run by tests/test_integration.py under torchrun: train one fine-tune, save this rank's adapter tensors.

With a third argument ``batched`` it trains a second job beside it, both in batched passes.
"""

import os
import sys

import torch
from safetensors.torch import save_file

from surgery.base.ownership import own_state
from surgery.base.tiny import tiny_model
from surgery.base.tokenizer import tiny_tokenizer
from surgery.training.config import DataConfig
from surgery.training.job import TrainConfig, make_job
from surgery.training.loop import train_jobs as train

out, batch_size, batched = sys.argv[1], int(sys.argv[2]), sys.argv[3:] == ["batched"]
base = tiny_model("tiny-llama")
# An fp32 base: LLM.int8's outlier split (threshold 6) depends on which rows share a batch, so an int8
# base gives DDP results close to, not within 1e-5 of, one process.
RULES = {
    "quantize": "none",
    "default": "freeze",
    "rules": [{"match": "lm_head", "action": "plain"}, {"match": "re:.*(q_proj|v_proj)", "action": "adapt"}],
}
job = make_job(
    base,
    name="ddp",
    rules=RULES,
    data="upper",
    tokenizer=tiny_tokenizer(),
    config=TrainConfig(batch_size=batch_size, lr=1e-2, max_steps=6, seed=0),
    data_config=DataConfig(group_texts=True, block_size=16),
)
OTHER = {"quantize": "none", "default": "freeze", "rules": [{"match": "v_proj", "action": "adapt", "lora": {"r": 2}}]}
others = (
    [
        make_job(
            base,
            name="other",
            rules=OTHER,
            data="reverse",
            tokenizer=tiny_tokenizer(),
            config=TrainConfig(batch_size=batch_size // 2, grad_accum=2, lr=1e-2, max_steps=2, seed=1),
            data_config=DataConfig(block_size=20),
        )
    ]
    if batched
    else []
)
train([job, *others], batched=batched)
rank = int(os.environ.get("RANK", "0"))
save_file(
    {k: v.detach().contiguous() for k, v in own_state(job.finetune).items()},
    os.path.join(out, f"rank{rank}-of-{os.environ.get('WORLD_SIZE', '1')}{'-batched' * batched}.safetensors"),
)
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
