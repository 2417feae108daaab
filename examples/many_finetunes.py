"""Several fine-tunes on one int8 base, trained together in one process, each with its own data.

Run: python examples/many_finetunes.py   (CPU, tiny bundled model, about 15 s)
"""

import tempfile
from pathlib import Path

import surgery
from surgery.planning.memory import extra_bytes, parameter_bytes
from surgery.train.job import TrainConfig, make_job
from surgery.train.loop import evaluate, train

base = surgery.tiny_model("tiny-opt")
tokenizer = surgery.tiny_tokenizer()
tasks = [("upper", "qv_lora_head"), ("reverse", "lora_plus_head")]
surgery.prepare_base(base, *[rules for _, rules in tasks])  # quantize once, for both rule files
out = Path(tempfile.mkdtemp(prefix="many-finetunes-"))
config = TrainConfig(batch_size=8, lr=1e-2, max_steps=60, warmup=6)
jobs = [make_job(base, task, rules, task, tokenizer, config, out=out / task, block_size=24) for task, rules in tasks]
before = {job.name: evaluate(job.finetune, job.data)["eval_loss"] for job in jobs}
train(jobs)
print(f"base: {parameter_bytes(base):,} bytes, shared")
for job in jobs:
    after = evaluate(job.finetune, job.data)["eval_loss"]
    print(
        f"{job.name:8s} own tensors {extra_bytes(job.finetune, base):8,d} bytes   loss {before[job.name]:.3f} -> "
        f"{after:.3f}   adapter file {job.out / 'adapter.safetensors'}"
    )
