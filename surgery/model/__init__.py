"""Model: a model as a graph, before any weight is read.

Bundled architectures, the ``torch.export`` trace that maps every fx node to the module that owns
it (``tracing``), the plain-data ``ModelGraph`` it gives (``graph``) and the on-disk cache of graphs
(``trace_cache``), so ``plan`` and ``inspect`` of a known architecture need neither torch nor weights.
"""

from ..stages import submodules_on_use

__getattr__ = submodules_on_use(__name__)
