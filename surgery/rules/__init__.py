"""Rules: what the user writes.

Takes a YAML rule file (or a bundled name, or CLI shorthand) and gives a checked ``RuleSet``:
per module-name pattern, quantize / freeze / adapt (LoRA) / plain, with file and line for every
rule so later errors can point at them. Pure Python (no torch).
"""

from ..stages import submodules_on_use

__getattr__ = submodules_on_use(__name__)
