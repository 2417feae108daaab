"""A quantized base's full-precision weights, read again where they still are: LoftQ starts from W − deq(Q(W)).

The base itself keeps only Q(W). W is read, one module at a time, from the module while the base still
holds it unquantized, else from where the base came from (``sources.full_weights_of`` says where): its
checkpoint's safetensors files (as PEFT's ``replace_lora_weights_loftq`` does), or a rebuild of a model made
in memory from a seed (tiny models, ``--random-init``). Nothing here changes the base.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from ..disk import gate_file
from ..errors import RewriteError
from ..layers.bnb import quantized_storage
from .folder import gate_shard, weight_map

Read = Callable[[str], torch.Tensor]  # module path -> its weight as the module stores it, full precision


class FullWeights(Protocol):
    """Where a base's full-precision weights can be read after it was quantized."""

    def describe(self) -> str: ...

    def origin(self, path: str) -> str:
        """Where the weight of module ``path`` is read from (a file, a rebuild), for messages."""

    def missing(self, paths: list[str]) -> list[str]:
        """The paths whose weight this source cannot give (checked before anything changes)."""

    def reader(self) -> contextlib.AbstractContextManager[Read]: ...


@dataclass(frozen=True)
class CheckpointWeights:
    """The safetensors files of the checkpoint the base was loaded from (one file or an index of shards)."""

    folder: Path
    prefix: str = ""  # the model's base_model_prefix: checkpoints are written with or without it

    @classmethod
    def of(cls, folder: Path, model: nn.Module) -> CheckpointWeights:
        """The checkpoint in ``folder`` that ``model`` was (or can be) loaded from."""
        return cls(folder, getattr(model, "base_model_prefix", "") or "")

    def describe(self) -> str:
        return f"the checkpoint in {self.folder}"

    def origin(self, path: str) -> str:
        names = self.files()
        key = self.key(path, names)
        return f"{names[key]} (tensor {key})" if key is not None else self.describe()

    def files(self) -> dict[str, Path]:
        """Tensor name -> the safetensors file that holds it, each file through the gate (inside the folder,
        regular)."""
        from safetensors import safe_open

        index = "model.safetensors.index.json"
        if os.path.lexists(self.folder / index):
            names = weight_map(self.folder, index, error=RewriteError)
            shards = {file: gate_shard(self.folder, index, file, error=RewriteError) for file in set(names.values())}
            return {name: shards[file] for name, file in names.items()}
        if not os.path.lexists(self.folder / "model.safetensors"):
            return {}
        single = gate_file(self.folder, "model.safetensors", what="checkpoint", error=RewriteError)
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}

    def key(self, path: str, names: dict[str, Path]) -> str | None:
        candidates = [path]
        if self.prefix and path.startswith(self.prefix + "."):
            candidates.append(path[len(self.prefix) + 1 :])
        elif self.prefix:
            candidates.append(f"{self.prefix}.{path}")
        return next((f"{c}.weight" for c in candidates if f"{c}.weight" in names), None)

    def missing(self, paths: list[str]) -> list[str]:
        names = self.files()
        return [p for p in paths if self.key(p, names) is None]

    @contextlib.contextmanager
    def reader(self) -> Iterator[Read]:
        from safetensors import safe_open

        names = self.files()

        def read(path: str) -> torch.Tensor:
            key = self.key(path, names)
            with safe_open(names[key], framework="pt") as f:
                return f.get_tensor(key)

        yield read


@dataclass(frozen=True)
class RebuiltWeights:
    """A model built in memory from a seed (a tiny model, --random-init): built again, once per read-out."""

    build: Callable[[], nn.Module] = field(repr=False)
    name: str = ""

    def describe(self) -> str:
        return f"a rebuild of {self.name} from its seed"

    def origin(self, path: str) -> str:
        return self.describe()

    def missing(self, paths: list[str]) -> list[str]:
        return []

    @contextlib.contextmanager
    def reader(self) -> Iterator[Read]:
        built = [self.build()]
        try:
            yield lambda path: built[0].get_submodule(path).weight.detach()
        finally:
            built.clear()


@dataclass(frozen=True)
class InMemoryWeights:
    """Weights the base still holds unquantized (they are quantized by the rewrite that reads them)."""

    weights: dict[str, torch.Tensor]

    def origin(self, path: str) -> str:
        return f"the base's unquantized {path}"

    @contextlib.contextmanager
    def reader(self) -> Iterator[Read]:
        yield self.weights.__getitem__


def full_weight_reader(model: nn.Module, paths: list[str], source: FullWeights | None):
    """A reader of the full-precision weight of every module in ``paths``, checked now (before the base changes):
    modules the base still holds unquantized are read from themselves, the others from ``source``."""
    held = {p: model.get_submodule(p).weight for p in paths if not quantized_storage(model.get_submodule(p))}
    rest = [p for p in paths if p not in held]
    if not rest:
        return InMemoryWeights(held)
    if source is None:
        raise RewriteError(
            f"init_lora_weights: loftq needs the full-precision weight of {rest[0]}"
            f"{f' (and {len(rest) - 1} more)' if len(rest) > 1 else ''}, but the base holds it quantized and surgery "
            "does not know where it was loaded from (no safetensors checkpoint at its name_or_path); load the base "
            "with surgery.load_model (which records its checkpoint), or make the LoftQ fine-tune before the base is "
            "quantized"
        )
    missing = source.missing(rest)
    if missing:
        raise RewriteError(
            f"init_lora_weights: loftq needs the full-precision weight of {missing[0]}, but "
            f"{source.describe()} has no safetensors tensor for it; LoftQ reads weights from a "
            "safetensors checkpoint (save the model with save_pretrained), or use init true"
        )
    return _Both(InMemoryWeights(held), source)


@dataclass(frozen=True)
class _Both:
    held: InMemoryWeights
    source: FullWeights

    def origin(self, path: str) -> str:
        return self.held.origin(path) if path in self.held.weights else self.source.origin(path)

    @contextlib.contextmanager
    def reader(self) -> Iterator[Read]:
        with self.source.reader() as read:
            yield lambda path: self.held.weights[path] if path in self.held.weights else read(path)
