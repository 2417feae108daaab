"""Base: the one frozen, quantized base every fine-tune shares.

Takes a plan and gives the base: found by name (``sources``: a local folder, the local HF cache, a bundled
model), built from a config (``tiny``: tiny models, ``--random-init``) or laid out on meta with its graph
(``layout``), loaded onto its devices (``loading``) with its tokenizer (``tokenizer``), quantized while it loads
through transformers' quantizer hook (``quantizer``) or in place (``quantize``), remembered with its graph and
fine-tunes (``shared_base``), its full-precision weights readable again for LoftQ (``full_weights``), and
fingerprinted so adapter files know which checkpoint they belong to.
"""

from ..stages import submodules_on_use

__getattr__ = submodules_on_use(__name__)
