"""Shared fixtures: tiny models (random weights, fixed seed) and their graphs; no network, no downloads."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import surgery  # noqa: E402
from surgery.architectures import TINY_MODELS  # noqa: E402


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
