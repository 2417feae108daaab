"""QLoRA, step by step: memory of fp32 vs int8 vs nf4, LoRA parameter counts, a few training steps.

Run: python examples/qlora_walkthrough.py   (CPU, tiny bundled model, a few seconds)
"""

import torch

import surgery
from surgery.base.tiny import tiny_model
from surgery.layers.lora import LoraLayer
from surgery.planning.memory import extra_bytes, parameter_bytes

# 1. The same checkpoint held three ways: bytes of unique parameter storage.
sizes = {"fp32": parameter_bytes(tiny_model("tiny-llama"))}
for scheme in ("int8", "nf4"):
    base = tiny_model("tiny-llama")
    surgery.prepare_base(
        base, {"quantize": scheme, "default": "quantize", "rules": [{"match": "lm_head", "action": "freeze"}]}
    )
    sizes[scheme] = parameter_bytes(base)
for name, size in sizes.items():
    print(f"{name:5s} base: {size:9,d} bytes ({size / sizes['fp32']:.0%} of fp32)")

# 2. A QLoRA fine-tune: nf4 base, LoRA on every Linear. Each adapter adds r * (in + out) parameters.
base = tiny_model("tiny-llama")
ft = surgery.rewrite(base, "qlora_nf4")
adapters = {path: m for path, m in ft.named_modules() if isinstance(m, LoraLayer)}
expected = sum(m.config.r * (m.in_features + m.out_features) for m in adapters.values())
trainable = sum(p.numel() for p in ft.parameters() if p.requires_grad)
assert trainable == expected, (trainable, expected)
print(
    f"{len(adapters)} LoRA adapters, r * (in + out) each: {expected:,} trainable parameters "
    f"({extra_bytes(ft, base):,} bytes on top of the shared base)"
)

# 3. Train a few steps: only the adapters move.
optimizer = torch.optim.AdamW([p for p in ft.parameters() if p.requires_grad], lr=5e-3)
ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
for step in range(5):
    loss = ft(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    print(f"step {step}  loss {loss.item():.4f}")
