"""Glue for transformers.Trainer: adapter files in its checkpoints and output folder."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .adapter_file import save_adapter
from .checkpoint import ADAPTER_FILE


def adapter_callback(finetune: nn.Module):
    """A ``transformers.TrainerCallback`` that writes ``adapter.safetensors`` into each Trainer checkpoint
    and into ``output_dir`` at the end, so Trainer runs give surgery adapter files (rank 0 only)."""
    from transformers import TrainerCallback

    class SaveAdapter(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                save_adapter(finetune, Path(args.output_dir) / f"checkpoint-{state.global_step}" / ADAPTER_FILE)

        def on_train_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                save_adapter(finetune, Path(args.output_dir) / ADAPTER_FILE)

    return SaveAdapter()
