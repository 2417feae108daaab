"""Shared fixtures: tiny models (random weights, fixed seed) and their graphs; no network, no downloads."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import surgery  # noqa: E402
from surgery.layers.bnb import state_tensors  # noqa: E402
from surgery.model.architectures import TINY_MODELS  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def trace_cache_in_a_temporary_folder(tmp_path_factory):
    """CLI commands cache traces; the tests' cache lives in a temporary folder, never in ~/.cache."""
    os.environ["SURGERY_CACHE"] = str(tmp_path_factory.mktemp("surgery-cache"))


@pytest.fixture(scope="session")
def digest():
    """sha256 of a model over every parameter and buffer, bitsandbytes quantization state included."""

    def of(model) -> str:
        h = hashlib.sha256()
        for key, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
            for part in [t, *state_tensors(t)]:
                h.update(key.encode())
                h.update(part.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes())
        return h.hexdigest()

    return of


@pytest.fixture(scope="session")
def tiny_graphs():
    """ModelGraph of each tiny model, traced once per session."""
    return {name: surgery.trace(surgery.tiny_model(name)) for name in TINY_MODELS}


@pytest.fixture()
def write_rules(tmp_path):
    """Write a rule file from text and return its path."""

    def write(text: str, name: str = "rules.yaml"):
        path = tmp_path / name
        path.write_text(text)
        return path

    return write
