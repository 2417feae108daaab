"""Planning: rules + graph -> a plan, checked before anything changes.

``decisions`` decides every module by the rules and checks constraints C1-C7 (all errors at once);
``memory`` gives exact bytes of the base and each fine-tune, ``training_memory`` the predicted peak
of a training run, ``report`` the tables. Pure Python on a graph: no torch needed.
"""

from ..stages import submodules_on_use

__getattr__ = submodules_on_use(__name__)
