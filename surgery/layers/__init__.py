"""Layers: the modules surgery puts into a model.

LoRA wrappers (``lora``), DoRA's on top of them (``dora``), which one a layer gets (``adapters``), and
what surgery knows of bitsandbytes' int8 / 4-bit layers (``bnb``): how they store, compute, dequantize
and name their tensors. Takes rule settings, gives ``nn.Module``s.
"""

from ..stages import submodules_on_use

__getattr__ = submodules_on_use(__name__)
