"""surgery: rule-driven model surgery for HuggingFace models.

One frozen, quantized base in memory, any number of independently trainable fine-tunes on top
of it, chosen per module by a rule file and checked before anything is changed.
"""

from .export import ExportError, export_graph
from .errors import (AdapterStateError, ModelNotFoundError, PlanError, RewriteError, RuleFileError, SurgeryError,
                     TraceError, Violation)
from .fingerprint import Fingerprint, fingerprint
from .merge import MergeError, merge
from .models import load_model, tiny_model, tiny_tokenizer
from .peft_format import export_peft, import_peft
from .plan import Decision, Plan, plan
from .finetune import FinetuneInfo, finetune_info
from .rewrite import SharedBaseWarning, prepare_base, rewrite
from .rules import LoraConfig, QuantConfig, Rule, RuleSet, bundled_rules, load_rules
from .state import AdapterFile, load_adapter, read_adapter, save_adapter
from .trace import ModelGraph, ModuleInfo, ParamInfo, trace

__version__ = "0.1.0"

__all__ = [
    "AdapterFile", "AdapterStateError", "Decision", "ExportError", "export_graph", "FinetuneInfo", "Fingerprint", "LoraConfig", "MergeError",
    "ModelGraph", "ModelNotFoundError", "ModuleInfo", "ParamInfo", "Plan", "PlanError", "QuantConfig",
    "RewriteError", "Rule", "RuleFileError", "RuleSet", "SurgeryError", "TraceError", "Violation",
    "bundled_rules", "export_peft", "finetune_info", "fingerprint", "import_peft", "load_adapter", "load_model",
    "load_rules", "merge", "plan", "prepare_base", "SharedBaseWarning", "read_adapter", "rewrite", "save_adapter", "tiny_model", "tiny_tokenizer",
    "trace", "__version__",
]
