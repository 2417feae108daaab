"""Files: fine-tunes to and from disk and other tools.

Adapter-only safetensors (``adapter_file``), adapter folders with ``save_pretrained``
(``adapter_folder``), PEFT export and import (``peft_format``), vLLM / LoRAX folders (``serving``),
``torch.export`` programs (``graph_export``) and model cards. Every reader treats its input as
hostile: bounded, validated, one clear error naming the file.
"""

from ..stages import submodules_on_use
from . import adapter_folder  # noqa: F401  fine-tunes get save_pretrained, folders their PEFT check

__getattr__ = submodules_on_use(__name__)
