"""Files: the formats fine-tunes are saved in and read from, below the fine-tune type that uses them.

Adapter-only safetensors (``adapter_file``: write, read, check against a base), adapter folders
(``adapter_folder``: the files ``ft.save_pretrained`` writes), PEFT's LoRA format both ways (``peft_format``),
vLLM / LoRAX checks (``serving``) and model cards. Fine-tunes are read through ``base.ownership``; building
one from a file is the fine-tune stage's (``finetune.loading``). Every reader treats its input as hostile:
bounded, validated, one clear error naming the file.
"""

from ..stages import submodules_on_use

__getattr__ = submodules_on_use(__name__)
