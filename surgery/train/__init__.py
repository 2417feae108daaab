"""Training: fine-tunes trained from data, one or many on one base.

Data files to token blocks (``data``), a job and its run state (``job``), one optimizer step
(``step``), the loop over jobs with eval, early stopping and files (``loop``), batched steps of
many jobs (``batched_train``), checkpoints and exact resume (``checkpoint``), fp32 masters of
half-precision tensors (``master_weights``).
"""

from ..stages import submodules_on_use

__getattr__ = submodules_on_use(__name__)
