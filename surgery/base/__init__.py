"""Base: the one frozen, quantized base every fine-tune shares.

Takes a plan and gives the base: loaded (``loading``), quantized while it loads through transformers'
quantizer hook (``quantizer``) or in place (``quantize``), remembered with its graph and fine-tunes
(``shared_base``), and fingerprinted so adapter files know which checkpoint they belong to.
"""

from ..stages import submodules_on_use

__getattr__ = submodules_on_use(__name__)
