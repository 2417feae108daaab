"""The finetuna-style loop: int8 base, LoRA fine-tune, autocast forward, backward, optimizer step.

Run: python examples/finetuna_loop.py   (CPU, tiny bundled model, about 10 s)
"""

import torch

import surgery.finetuna as finetuna
from surgery.base.tiny import tiny_model
from surgery.base.tokenizer import tiny_tokenizer
from surgery.training.data import read_examples, tokenize

base = tiny_model("tiny-opt")
finetuna.quantize_base_model(base)  # int8 everything but lm_head, frozen
ft = finetuna.new_finetuned(base, plain_layers={"lm_head"}, linear_config=finetuna.LinearAdapterConfig(r=8, alpha=16))
blocks = tokenize(read_examples("upper"), tiny_tokenizer(), block_size=24)

optimizer = torch.optim.AdamW([p for p in ft.parameters() if p.requires_grad], lr=1e-2)
generator = torch.Generator().manual_seed(0)
ft.train()
for step in range(60):
    rows = torch.randint(0, len(blocks), (8,), generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ft(**blocks.batch(rows)).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    if step % 20 == 0 or step == 59:
        print(f"step {step:3d}  loss {loss.item():.3f}")
first_loss = loss.item()
