"""Training: fine-tunes trained from data, one or many on one base.

A run's configs (``config``: ``TrainConfig``, ``DataConfig``, ``TrackerConfig``) and the whole run from them
(``run``: ``surgery.train``, every check before the model loads); data files to token blocks (``data``,
``rows``, ``stored_data``), a job and its run state (``job``), one optimizer step (``step``) with the loss
from the last hidden states in chunks (``loss``) and checkpoints off the device (``offload``), the loop over
jobs with eval, early stopping and files (``loop``), batched steps of many jobs (``batched_train``),
checkpoints and exact resume (``checkpoint``), fp32 masters of half-precision tensors (``master_weights``),
experiment trackers (``trackers``).
"""

from ..stages import submodules_on_use

__getattr__ = submodules_on_use(__name__)
