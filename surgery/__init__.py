"""surgery: rule-driven model surgery for HuggingFace models.

One frozen, quantized base in memory, any number of independently trainable fine-tunes on top
of it, chosen per module by a rule file and checked before anything is changed.
"""

from . import adapter_folder, finetuna  # adapter_folder gives every fine-tune its save_pretrained
from .adapter_file import AdapterFile, load_adapter, read_adapter, save_adapter
from .errors import (AdapterStateError, DataError, ExportError, MergeError, ModelConfigError, ModelNotFoundError,
                     PlanError, RewriteError, RuleFileError, SharedBaseWarning, ShardingError, ShardingWarning,
                     SurgeryError, SurgeryWarning, TraceError, TrainError, TruncationWarning, Violation)
from .export import export_graph
from .files import version as _version
from .fingerprint import Fingerprint, fingerprint
from .finetune import FinetuneInfo, finetune_info
from .loading import load_model, tiny_model, tiny_tokenizer
from .merge import merge
from .peft_format import export_peft, import_peft
from .plan import Decision, Plan, plan
from .rewrite import rewrite
from .shared_base import prepare_base
from .sharding import shard_base
from .rules import LoraConfig, QuantConfig, Rule, RuleSet, bundled_rules
from .rule_file import load_rules
from .graph import ModelGraph, ModuleInfo, ParamInfo
from .trace import trace

__version__ = _version()

__all__ = [
    "AdapterFile", "AdapterStateError", "DataError", "Decision", "ExportError", "FinetuneInfo", "Fingerprint",
    "LoraConfig", "MergeError", "ModelConfigError", "ModelGraph", "ModelNotFoundError", "ModuleInfo", "ParamInfo",
    "Plan", "PlanError", "QuantConfig", "RewriteError", "Rule", "RuleFileError", "RuleSet", "SharedBaseWarning",
    "ShardingError", "ShardingWarning",
    "SurgeryError", "SurgeryWarning", "TraceError", "TrainError", "TruncationWarning", "Violation", "bundled_rules",
    "export_graph", "export_peft", "finetune_info", "finetuna", "fingerprint", "import_peft", "load_adapter",
    "load_model", "load_rules", "merge", "plan", "prepare_base", "read_adapter", "rewrite", "save_adapter",
    "shard_base", "tiny_model", "tiny_tokenizer", "trace", "__version__",
]
