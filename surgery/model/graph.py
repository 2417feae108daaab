"""The traced model as plain data: per-module info, ties, and how the capture went.

No torch here: ``plan`` and ``inspect`` of a cached trace (``trace_cache``) work from these
records alone, so they never import torch's model code. ``trace`` fills them from a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..rules.ruleset import QuantConfig

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ParamInfo:
    """One parameter as stored: local name, logical shape, storage dtype name and bytes held."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class ModuleInfo:
    """What the graph knows of one module; ``kind`` is linear, conv1d, embedding, norm or other."""

    path: str
    cls: str
    kind: str
    params: list[ParamInfo] = field(default_factory=list)
    quantized: str | None = None  # int8 / nf4 / fp4 when the module is already a bitsandbytes layer
    held: QuantConfig | None = None  # the settings it is held with then (threshold, blocksize, ...)
    calls: int = 0
    order: int | None = None
    input_shape: tuple | None = None
    output_shape: tuple | None = None

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.params)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.params)

    def param(self, name: str) -> ParamInfo | None:
        return next((p for p in self.params if p.name == name), None)

    def __repr__(self) -> str:
        q = f", quantized={self.quantized}" if self.quantized else ""
        shapes = ", ".join(f"{p.name}={list(p.shape)}" for p in self.params)
        return f"ModuleInfo({self.path!r}, {self.cls.rsplit('.', 1)[-1]}, {self.kind}{q}, calls={self.calls}, {shapes})"


@dataclass
class ModelGraph:
    """The traced model: per-module info (in module-tree order), ties, and how the capture went."""

    model_class: str
    modules: dict[str, ModuleInfo]
    ties: list[tuple[str, ...]]
    method: str  # "export" or "module-tree"
    seconds: float
    reason: str | None = None  # why the module-tree fallback was used
    reduced: dict[str, tuple[int, int]] = field(default_factory=dict)  # block path -> (layers, traced)
    exported: Any = None  # the torch.export ExportedProgram of the (meta, possibly depth-reduced) copy
    config: Any = None
    name: str | None = None

    @property
    def graph_module(self) -> torch.fx.GraphModule | None:
        return None if self.exported is None else self.exported.graph_module

    def leaves(self) -> list[ModuleInfo]:
        """Modules that hold parameters of their own: what rules decide about."""
        return [m for m in self.modules.values() if m.params]

    def uncalled(self) -> list[str]:
        """Modules with parameters that forward never calls (empty when traced by module tree)."""
        if self.method != "export":
            return []
        return [m.path for m in self.leaves() if m.calls == 0]

    def canonical_names(self) -> dict[str, str]:
        """Each tied parameter name -> the first name of its tie group (one tensor, one key)."""
        return {name: group[0] for group in self.ties for name in group}

    @property
    def numel(self) -> int:
        canon = self.canonical_names()
        unique = {
            canon.get(join_path(m.path, p.name), join_path(m.path, p.name)): p.numel
            for m in self.leaves()
            for p in m.params
        }
        return sum(unique.values())

    def __repr__(self) -> str:
        return (
            f"ModelGraph({self.model_class}, {len(self.leaves())} parametrized modules, "
            f"{self.numel:,} parameters, method={self.method}, {self.seconds:.2f}s)"
        )


def join_path(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
