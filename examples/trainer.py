"""A fine-tune trained with transformers.Trainer: only adapters and plain modules reach the optimizer.

Run: python examples/trainer.py   (CPU, tiny bundled model, a few seconds)
"""

import tempfile

import torch
from transformers import Trainer, TrainingArguments

import surgery
from surgery.data import read_examples, tokenize
from surgery.integrations import adapter_callback

base = surgery.tiny_model("tiny-llama")
ft = surgery.rewrite(base, "qv_lora_head")
blocks = tokenize(read_examples("upper"), surgery.tiny_tokenizer(), block_size=24)
rows = [{k: v[i] for k, v in blocks.batch(torch.arange(len(blocks))).items()} for i in range(len(blocks))]
out = tempfile.mkdtemp(prefix="trainer-")
args = TrainingArguments(output_dir=out, max_steps=30, per_device_train_batch_size=8, learning_rate=1e-2,
                         save_strategy="no", report_to=[], use_cpu=True, logging_steps=10, disable_tqdm=True)
# Trainer's own checkpoints hold the whole model; the callback adds surgery adapter files (a few KB here).
trainer = Trainer(model=ft, args=args, train_dataset=rows, callbacks=[adapter_callback(ft)])
trainer.train()
print("adapter:", f"{out}/adapter.safetensors")
