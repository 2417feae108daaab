"""A training run for the kill-loop test, started from a fork server that imported this module once.

Importing it builds tiny-llama and traces it, so every forked run starts in well under a second.
"""

import shutil
import sys

import torch

torch.set_num_threads(1)  # forked children must not inherit a started OpenMP pool

import surgery  # noqa: E402
from surgery.base.shared_base import base_graph  # noqa: E402
from surgery.base.tiny import tiny_model  # noqa: E402
from surgery.base.tokenizer import tiny_tokenizer  # noqa: E402
from surgery.training.checkpoint import latest_checkpoint  # noqa: E402
from surgery.training.config import DataConfig  # noqa: E402
from surgery.training.job import TrainConfig, make_job  # noqa: E402
from surgery.training.loop import train_jobs as train  # noqa: E402

base_graph(tiny_model("tiny-llama"))  # the trace cache every forked run reuses


def run(out: str, steps: int, ready) -> None:
    """Train (resuming from the newest complete checkpoint, if any) with a checkpoint at every step."""
    base = tiny_model("tiny-llama")
    job = make_job(
        base,
        name="job",
        rules="qv_lora_head",
        data="upper",
        tokenizer=tiny_tokenizer(),
        config=TrainConfig(batch_size=4, lr=1e-2, max_steps=steps, seed=0, save_steps=1, save_total_limit=2),
        data_config=DataConfig(block_size=24),
        out=out,
        model_name="tiny-llama",
    )
    found = latest_checkpoint(job.out) if job.out.exists() else None
    if found is None and job.out.exists():  # killed before its first checkpoint: start afresh, as a user would
        shutil.rmtree(job.out)
    ready.set()
    train([job], resume={"job": found} if found else None)


def two_finetunes():
    """Two fine-tunes of tiny-llama with different (seeded) adapter values: what the folder writers alternate."""
    base = tiny_model("tiny-llama")
    out = []
    for seed in (1, 2):
        ft = surgery.rewrite(base, "qv_lora")
        with torch.no_grad():
            generator = torch.Generator().manual_seed(seed)
            for p in ft.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
        out.append(ft)
    return out


def write_folders(folder: str, kind: str, ready) -> None:
    """Write the folder again and again, alternating the two fine-tunes, until killed."""
    finetunes = two_finetunes()
    ready.set()
    for i in range(1_000_000):
        ft = finetunes[i % 2]
        if kind == "adapter":
            ft.save_pretrained(folder)
        else:
            surgery.export_peft(ft, folder)


if __name__ == "__main__":
    sys.exit("run through tests/test_promises.py")
