"""A fine-tune trained with transformers.Trainer: only adapters and plain modules reach the optimizer.

Run: python examples/trainer.py   (CPU, tiny bundled model, a few seconds)
"""

import tempfile

import torch
from transformers import Trainer, TrainingArguments

import surgery
from surgery.base.tiny import tiny_model
from surgery.base.tokenizer import tiny_tokenizer
from surgery.training.data import read_examples, tokenize

base = tiny_model("tiny-llama")
ft = surgery.rewrite(base, "qv_lora_head")
blocks = tokenize(read_examples("upper"), tiny_tokenizer(), block_size=24)
rows = [{k: v[i] for k, v in blocks.batch(torch.arange(len(blocks))).items()} for i in range(len(blocks))]
out = tempfile.mkdtemp(prefix="trainer-")
args = TrainingArguments(
    output_dir=out,
    max_steps=30,
    per_device_train_batch_size=8,
    learning_rate=1e-2,
    save_steps=10,
    report_to=[],
    use_cpu=True,
    logging_steps=10,
    disable_tqdm=True,
)
# Checkpoints and output_dir hold the adapter folder only (ft.save_pretrained): PEFT's files, surgery's
# adapter.safetensors, and model.safetensors for Trainer's own resume_from_checkpoint; never the base.
trainer = Trainer(model=ft, args=args, train_dataset=rows)
trainer.train()
trainer.save_model()
print("adapter folder:", out, "- load with surgery.load_adapter(base, out) or peft.PeftModel.from_pretrained")
