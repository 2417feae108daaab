"""Shared fixtures: tiny models (random weights, fixed seed) and their graphs; no network, no downloads."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HANG_SECONDS = 300  # a hang guard, never a speed test: far above what any call guarded here takes on a loaded machine

import surgery  # noqa: E402
from surgery.base.tiny import tiny_model  # noqa: E402
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
    return {name: surgery.trace(tiny_model(name)) for name in TINY_MODELS}


@pytest.fixture()
def write_rules(tmp_path):
    """Write a rule file from text and return its path."""

    def write(text: str, name: str = "rules.yaml"):
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


@pytest.fixture()
def no_hang():
    """``no_hang(call, *args)``: the call's result (or its exception), run in a worker thread; the calling test fails
    if the call still runs after HANG_SECONDS.

    A guard for tests whose failure mode is a hang (a FIFO, an endless device, a bomb). It cannot interrupt
    anything: no signal reaches pytest's own frames, a stuck worker is left behind as a daemon thread, and
    only the test that called it fails, naming the call.
    """

    def run(call, *args, **kwargs):
        outcome: dict = {}

        def work():
            try:
                outcome["value"] = call(*args, **kwargs)
            except BaseException as exc:  # handed to the test's thread, as if the call had raised there
                outcome["error"] = exc

        worker = threading.Thread(target=work, name=f"no_hang {getattr(call, '__name__', call)}", daemon=True)
        worker.start()
        worker.join(HANG_SECONDS)
        if worker.is_alive():
            pytest.fail(f"{worker.name}{args} still runs after {HANG_SECONDS} s: it hangs", pytrace=False)
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("value")

    return run
