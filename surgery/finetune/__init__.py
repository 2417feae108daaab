"""Fine-tunes: independent trainable models over one shared base.

``rewriting`` says what a fine-tune is (``Finetune``, a subclass of the base's own class) and makes one from a base
and rules (new module objects, the base's tensors, LoRA wrappers, private plain copies); ``loading`` makes them
from adapter files and PEFT folders; ``merging``, ``batched`` (many fine-tunes in one base pass), ``sharding``
(FSDP2), ``graph_export`` (``torch.export``), ``vocabulary`` (new tokens) and ``apply`` work on fine-tunes
(finetuna's API, ``surgery.finetuna``, sits above the stages).
"""

from ..stages import submodules_on_use

__getattr__ = submodules_on_use(__name__)
