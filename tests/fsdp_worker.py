"""Run by tests/test_sharding.py, alone or under torchrun / accelerate: two jobs on one tiny-llama base.

    python fsdp_worker.py OUT BASES STEPS [shard] [stop=N] [resume]

BASES: comma-separated fp32, nf4, nf4-bf16 (nf4 stored as bfloat16), run one after another in this
process (one launch: a launch costs more than a tiny run). ``shard`` shards the base with FSDP2 first;
``stop=N`` ends the run after step N's checkpoint (as a killed run would); ``resume`` continues it.
Each rank writes its adapters, the logits of job a on fixed ids, and its resident base bytes.
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file

import surgery
from surgery.base.ownership import own_state
from surgery.base.tiny import tiny_model
from surgery.base.tokenizer import tiny_tokenizer
from surgery.planning.memory import parameter_bytes
from surgery.training.config import DataConfig
from surgery.training.job import TrainConfig, make_job
from surgery.training.loop import train_jobs as train

out, base_kinds, steps = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
flags = sys.argv[4:]
shard, resume = "shard" in flags, "resume" in flags
stop = next((int(f.split("=")[1]) for f in flags if f.startswith("stop=")), None)
world = int(os.environ.get("WORLD_SIZE", "1"))
rank = int(os.environ.get("RANK", "0"))
FROZEN = [{"match": "lm_head", "action": "freeze"}, {"match": "*", "type": "embedding", "action": "freeze"}]


class Stop(Exception):
    pass


def stop_after(run, record):
    if stop is not None and run.job.name == "a" and record.get("step") == stop:
        raise Stop


def run_kind(base_kind: str) -> None:
    quant = {"fp32": "none", "nf4": "nf4", "nf4-bf16": {"scheme": "nf4", "storage": "bfloat16"}}[base_kind]
    default = "freeze" if base_kind == "fp32" else "quantize"
    rules_a = {
        "quantize": quant,
        "default": default,
        "rules": [*FROZEN, {"match": "re:.*(q_proj|v_proj)", "action": "adapt"}],
    }
    rules_b = {
        "quantize": quant,
        "default": default,
        "rules": [*FROZEN, {"match": "re:.*(up_proj|o_proj)", "action": "adapt", "lora": {"r": 2}}],
    }
    base = tiny_model("tiny-llama")
    surgery.prepare_base(base, rules_a, rules_b)
    whole = parameter_bytes(base)
    planned = surgery.plan(surgery.trace(base), rules_a).base_bytes_per_rank(world, fsdp=True)
    if shard:
        surgery.shard_base(base)
    tokenizer = tiny_tokenizer()
    folder = os.path.join(out, f"{base_kind}-{'sharded' if shard else 'whole'}-a")
    jobs = [
        make_job(
            base,
            name="a",
            rules=rules_a,
            data="upper",
            tokenizer=tokenizer,
            config=TrainConfig(batch_size=4 // world, lr=1e-2, max_steps=steps, seed=0, save_steps=5),
            data_config=DataConfig(group_texts=True, block_size=16),
            out=folder,
        ),
        make_job(
            base,
            name="b",
            rules=rules_b,
            data="reverse",
            tokenizer=tokenizer,
            config=TrainConfig(batch_size=4 // world, lr=1e-2, max_steps=steps // 2, seed=1),
            data_config=DataConfig(block_size=20),
        ),
    ]
    if resume:
        from surgery.training.checkpoint import latest_checkpoint

        train(jobs, resume={"a": latest_checkpoint(jobs[0].out)})
    else:
        try:
            train(jobs, on_step=stop_after)
        except Stop:
            pass
    tag = f"{base_kind}-{'sharded' if shard else 'whole'}{'-resumed' if resume else ''}-rank{rank}-of-{world}"
    ids = torch.arange(3, 19).reshape(2, 8)
    with torch.no_grad():
        logits = jobs[0].finetune(ids).logits
    tensors = {f"{j.name}.{k}": v.detach().contiguous() for j in jobs for k, v in own_state(j.finetune).items()}
    save_file({**tensors, "logits": logits.contiguous()}, os.path.join(out, f"{tag}.safetensors"))
    with open(os.path.join(out, f"{tag}.json"), "w") as f:
        json.dump({"whole_bytes": whole, "resident_bytes": parameter_bytes(base), "planned_bytes": planned}, f)


for kind in base_kinds:
    run_kind(kind)
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
