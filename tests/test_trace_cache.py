"""The trace cache: a hit builds no model; corrupted, foreign or hand-edited entries are ignored and rewritten."""

from __future__ import annotations

import importlib
import json

import pytest
from typer.testing import CliRunner

from surgery.base.loading import graph_of
from surgery.model.trace_cache import cache_folder, graph_to_data
from surgery.planning.decisions import plan
from surgery.rules.rule_file import load_rules
from surgery_cli.app import app

runner = CliRunner()
trace_module = importlib.import_module("surgery.model.tracing")  # the module (the package attribute is the function)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "traces"


def no_tracing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("traced although the cache holds this model")

    monkeypatch.setattr(trace_module, "trace", refuse)


def test_the_cache_folder_follows_surgery_cache_then_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv("SURGERY_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_folder() == tmp_path / "xdg" / "surgery"
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "mine"))
    assert cache_folder() == tmp_path / "mine"


@pytest.mark.parametrize("model", ["tiny-opt", "meta-llama/Llama-3.1-8B"])
def test_a_hit_gives_the_traced_graph_and_the_same_plan_without_tracing(cache, monkeypatch, model):
    fresh = graph_of(model, use_cache=False)
    assert not cache.exists()  # --no-cache neither reads nor writes
    first = graph_of(model)
    (entry,) = cache.iterdir()
    no_tracing(monkeypatch)
    hit = graph_of(model)
    assert (
        graph_to_data(hit) | {"seconds": 0}
        == graph_to_data(fresh) | {"seconds": 0}
        == graph_to_data(first) | {"seconds": 0}
    )
    rules = load_rules("qlora_nf4")
    assert plan(hit, rules, check=False).to_dict() == plan(fresh, rules, check=False).to_dict()
    assert hit.name == model and entry.suffix == ".json"


BAD_ENTRIES = {
    "garbage": lambda text: "\x00\xffnot json",
    "truncated": lambda text: text[: len(text) // 2],
    "foreign version": lambda text: json.dumps(
        {**json.loads(text), "key": {**json.loads(text)["key"], "torch": "1.0.0"}}
    ),
    "bad schema": lambda text: json.dumps(
        {**json.loads(text), "graph": {**json.loads(text)["graph"], "modules": [{"path": "x", "cls": 3}]}}
    ),
    "negative count": lambda text: text.replace('"calls":1', '"calls":-1', 1),
}


@pytest.mark.parametrize("change", list(BAD_ENTRIES))
def test_a_bad_entry_is_ignored_traced_again_and_rewritten(cache, change):
    good = graph_to_data(graph_of("tiny-llama")) | {"seconds": 0}
    (entry,) = cache.iterdir()
    written = entry.read_text()
    assert BAD_ENTRIES[change](written) != written
    entry.write_text(BAD_ENTRIES[change](written))
    again = graph_of("tiny-llama")
    assert graph_to_data(again) | {"seconds": 0} == good
    assert json.loads(entry.read_text())["key"] == json.loads(written)["key"]  # rewritten, valid again


def test_cli_plan_and_inspect_answer_from_the_cache(cache, monkeypatch):
    fresh = runner.invoke(app, ["plan", "qv_lora", "--model", "tiny-opt", "--json", "--no-cache"])
    assert fresh.exit_code == 0, fresh.output
    assert runner.invoke(app, ["inspect", "tiny-opt", "--json"]).exit_code == 0  # fills the cache
    no_tracing(monkeypatch)
    cached = runner.invoke(app, ["plan", "qv_lora", "--model", "tiny-opt", "--json"])
    assert cached.exit_code == 0, cached.output
    strip = lambda out: {k: v for k, v in json.loads(out).items() if k != "trace_seconds"}  # noqa: E731
    assert strip(cached.stdout) == strip(fresh.stdout)
