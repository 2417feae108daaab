"""surgery: rule-driven model surgery for HuggingFace models.

One frozen, quantized base in memory, any number of independently trainable fine-tunes on top
of it, chosen per module by a rule file and checked before anything is changed.

The package reads as the pipeline, one folder per stage, each importing only the ones before it:
``rules`` (rule files) -> ``layers`` (LoRA, bitsandbytes) -> ``model`` (graphs of models) ->
``planning`` (rules + graph -> plan, memory) -> ``base`` (the quantized, shared base) -> ``finetune``
(fine-tunes of it) -> ``files`` (adapter files, PEFT, exports) -> ``train`` (training runs).
``import surgery`` imports none of torch, transformers or bitsandbytes: each public name below is
imported from its stage on first use (PEP 562).
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING

from .package import version as _version

_ERRORS = (
    "AdapterStateError",
    "DataError",
    "ExportError",
    "MergeError",
    "ModelConfigError",
    "ModelNotFoundError",
    "PlanError",
    "RewriteError",
    "RuleFileError",
    "SharedBaseWarning",
    "ShardingError",
    "ShardingWarning",
    "SurgeryError",
    "SurgeryWarning",
    "TraceError",
    "TrainError",
    "TruncationWarning",
    "Violation",
)
_PUBLIC = {  # public name -> the module that defines it
    **{name: "surgery.errors" for name in _ERRORS},
    **{
        name: "surgery.rules.ruleset"
        for name in ("ExtraTokens", "LoraConfig", "QuantConfig", "Rule", "RuleSet", "bundled_rules")
    },
    "load_rules": "surgery.rules.rule_file",
    "ModelGraph": "surgery.model.graph",
    "trace": "surgery.model.tracing",
    **{name: "surgery.planning.decisions" for name in ("Decision", "Plan", "plan")},
    "load_model": "surgery.base.loading",
    "prepare_base": "surgery.base.shared_base",
    **{name: "surgery.base.fingerprints" for name in ("Fingerprint", "fingerprint")},
    **{name: "surgery.base.ownership" for name in ("FinetuneInfo", "finetune_info")},
    "Finetune": "surgery.finetune.rewriting",
    "rewrite": "surgery.finetune.rewriting",
    "extended_tokenizer": "surgery.finetune.vocabulary",
    "merge": "surgery.finetune.merging",
    "shard_base": "surgery.finetune.sharding",
    **{name: "surgery.files.adapter_file" for name in ("AdapterFile", "read_adapter", "save_adapter")},
    **{name: "surgery.finetune.loading" for name in ("load_adapter", "import_peft")},
    "export_peft": "surgery.files.peft_format",
    "export_graph": "surgery.finetune.graph_export",
    **{name: "surgery.training.run" for name in ("train", "JobSpec")},
    **{name: "surgery.training.config" for name in ("TrainConfig", "DataConfig", "TrackerConfig")},
    "DeviceConfig": "surgery.devices",
    "LoraShorthand": "surgery.rules.shorthand",
}
_DEPRECATED = {  # name -> (its home now, what to use); importable from the top level with a warning for one release
    "tiny_model": ("surgery.base.tiny", "surgery.load_model('tiny-opt').model, or surgery.base.tiny.tiny_model"),
    "tiny_tokenizer": ("surgery.base.tokenizer", "surgery.base.tokenizer.load_tokenizer('tiny-opt')"),
    "ModuleInfo": ("surgery.model.graph", "surgery.model.graph.ModuleInfo"),
    "ParamInfo": ("surgery.model.graph", "surgery.model.graph.ParamInfo"),
}
_MODULES = {"finetuna": "surgery.finetuna"}  # public modules: finetuna's API, above the stages
_STAGES = ("rules", "layers", "model", "planning", "base", "files", "finetune", "training")

__version__ = _version()
__all__ = sorted([*_PUBLIC, *_MODULES]) + ["__version__"]


def __getattr__(name: str):
    """A public name (or stage) imported from its module on first use, then kept as a plain attribute."""
    if name in _STAGES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _DEPRECATED:
        home, instead = _DEPRECATED[name]
        warnings.warn(f"surgery.{name} moved out of the top level; use {instead}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(home), name)
    where = _PUBLIC.get(name) or _MODULES.get(name)
    if where is None:
        raise AttributeError(f"module 'surgery' has no attribute {name!r}")
    module = importlib.import_module(where)
    value = module if name in _MODULES else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *_STAGES})


if TYPE_CHECKING:  # for type checkers and IDEs: the names as they resolve
    from . import finetuna
    from .base.fingerprints import Fingerprint, fingerprint
    from .base.loading import load_model
    from .base.ownership import FinetuneInfo, finetune_info
    from .base.shared_base import prepare_base
    from .devices import DeviceConfig
    from .errors import (
        AdapterStateError,
        DataError,
        ExportError,
        MergeError,
        ModelConfigError,
        ModelNotFoundError,
        PlanError,
        RewriteError,
        RuleFileError,
        ShardingError,
        ShardingWarning,
        SharedBaseWarning,
        SurgeryError,
        SurgeryWarning,
        TraceError,
        TrainError,
        TruncationWarning,
        Violation,
    )
    from .files.adapter_file import AdapterFile, read_adapter, save_adapter
    from .files.peft_format import export_peft
    from .finetune.graph_export import export_graph
    from .finetune.loading import import_peft, load_adapter
    from .finetune.merging import merge
    from .finetune.rewriting import Finetune, rewrite
    from .finetune.sharding import shard_base
    from .finetune.vocabulary import extended_tokenizer
    from .model.graph import ModelGraph
    from .model.tracing import trace
    from .planning.decisions import Decision, Plan, plan
    from .rules.rule_file import load_rules
    from .rules.ruleset import ExtraTokens, LoraConfig, QuantConfig, Rule, RuleSet, bundled_rules
    from .rules.shorthand import LoraShorthand
    from .training.config import DataConfig, TrackerConfig, TrainConfig
    from .training.run import JobSpec, train
