"""surgery: rule-driven model surgery for HuggingFace models.

One frozen, quantized base in memory, any number of independently trainable fine-tunes on top
of it, chosen per module by a rule file and checked before anything is changed.
"""

from .errors import (AdapterStateError, ModelNotFoundError, PlanError, RewriteError, RuleFileError, SurgeryError,
                     TraceError, Violation)
from .models import load_model, tiny_model, tiny_tokenizer
from .plan import Decision, Plan, plan
from .rewrite import FinetuneInfo, finetune_info, rewrite
from .rules import LoraConfig, QuantConfig, Rule, RuleSet, bundled_rules, load_rules
from .trace import ModelGraph, ModuleInfo, ParamInfo, trace

__version__ = "0.1.0"

__all__ = [
    "AdapterStateError", "Decision", "FinetuneInfo", "LoraConfig", "ModelGraph", "ModelNotFoundError", "ModuleInfo", "ParamInfo",
    "Plan", "PlanError", "QuantConfig", "RewriteError", "Rule", "RuleFileError", "RuleSet", "SurgeryError",
    "TraceError", "Violation", "bundled_rules", "finetune_info", "load_model", "load_rules", "plan", "rewrite", "tiny_model", "tiny_tokenizer",
    "trace", "__version__",
]
