"""Several fine-tunes on one int8 base, trained together in one process, each with its own data.

Run: python examples/many_finetunes.py   (CPU, tiny bundled model, about 15 s)
"""

import tempfile
from pathlib import Path

import surgery
from surgery.base.tiny import tiny_model
from surgery.base.tokenizer import tiny_tokenizer
from surgery.planning.memory import extra_bytes, parameter_bytes
from surgery.training.config import DataConfig
from surgery.training.job import TrainConfig, make_job
from surgery.training.loop import evaluate
from surgery.training.loop import train_jobs as train

base = tiny_model("tiny-opt")
tokenizer = tiny_tokenizer()
tasks = [("upper", "qv_lora_head"), ("reverse", "lora_plus_head")]
surgery.prepare_base(base, *[rules for _, rules in tasks])  # quantize once, for both rule files
out = Path(tempfile.mkdtemp(prefix="many-finetunes-"))
config = TrainConfig(batch_size=8, lr=1e-2, max_steps=60, warmup=6)
jobs = [
    make_job(
        base,
        name=task,
        rules=rules,
        data=task,
        tokenizer=tokenizer,
        config=config,
        data_config=DataConfig(block_size=24),
        out=out / task,
    )
    for task, rules in tasks
]
before = {job.name: evaluate(job.finetune, job.data)["eval_loss"] for job in jobs}
train(jobs)
print(f"base: {parameter_bytes(base):,} bytes, shared")
for job in jobs:
    after = evaluate(job.finetune, job.data)["eval_loss"]
    print(
        f"{job.name:8s} own tensors {extra_bytes(job.finetune, base):8,d} bytes   loss {before[job.name]:.3f} -> "
        f"{after:.3f}   adapter file {job.out / 'adapter.safetensors'}"
    )
