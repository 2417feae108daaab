"""Fine-tunes: independent trainable models over one shared base.

``rewriting`` makes a fine-tune from a base and rules (new module objects, the base's tensors, LoRA
wrappers, private plain copies); ``state`` holds what a fine-tune is and guards the base from it;
``merging``, ``batched`` (many fine-tunes in one base pass), ``sharding`` (FSDP2) and ``apply`` work
on fine-tunes (finetuna's API, ``surgery.finetuna``, sits above the stages).
"""

from ..stages import submodules_on_use

__getattr__ = submodules_on_use(__name__)
