"""The package reads as the pipeline: stage folders that import only downwards, a lazy top level that
imports no torch, and public names that are never also the names of modules."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import surgery

PACKAGE = Path(surgery.__file__).resolve().parent
STAGES = ["rules", "layers", "model", "planning", "base", "files", "finetune", "training"]  # the pipeline, in order


def _relative_imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            yield node.level, node.module or ""


def test_stages_import_only_themselves_earlier_stages_and_the_top_level():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).parts
        if len(parts) != 2:
            continue
        stage = parts[0]
        for level, module in _relative_imports(path):
            target = stage if level == 1 else module.split(".")[0]
            if target in STAGES and STAGES.index(target) > STAGES.index(stage):
                upward.append(f"{stage}/{parts[1]} imports {target}.{module.partition('.')[2] or module}")
    assert not upward, upward
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()) == sorted(STAGES)


def test_every_stage_says_what_it_takes_and_gives():
    for stage in STAGES:
        doc = ast.get_docstring(ast.parse((PACKAGE / stage / "__init__.py").read_text()))
        assert doc and len(doc.splitlines()) >= 3, stage


def test_import_surgery_imports_no_torch_transformers_or_bitsandbytes():
    code = (
        "import sys, json, surgery\n"
        "heavy = [m for m in ('torch', 'transformers', 'bitsandbytes') if m in sys.modules]\n"
        "rules = surgery.load_rules('qv_lora')\n"
        "heavy_after_rules = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "print(json.dumps([heavy, heavy_after_rules, surgery.__version__, sorted(surgery.__all__)]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    heavy, heavy_after_rules, version, names = json.loads(done.stdout)
    assert heavy == [] and heavy_after_rules == [] and version == surgery.__version__
    assert names == sorted(surgery.__all__)


def test_every_public_name_resolves_and_none_is_also_a_module():
    modules = {p.stem for p in PACKAGE.rglob("*.py")} | set(STAGES)
    for name in surgery.__all__:
        value = getattr(surgery, name)
        assert value is not None, name
        if callable(value) and not isinstance(value, type):
            assert name not in modules, f"surgery.{name} is a function and also the name of a module"
    assert (
        surgery.rewrite.__module__ == "surgery.finetune.rewriting"
        and surgery.plan.__module__ == "surgery.planning.decisions"
    )
    assert surgery.model.tracing.trace is surgery.trace  # stages give their modules on first use


def test_plan_and_inspect_answer_from_the_trace_cache_without_torch(tmp_path):
    """Cold, the trace needs torch; warm, the cached graph, the plan and the tables need neither torch nor
    transformers (the commands' whole answer)."""
    code = (
        "import sys, atexit\n"
        "atexit.register(lambda: print('HEAVY', sorted(m for m in ('torch', 'transformers', 'bitsandbytes') "
        "if m in sys.modules)))\n"
        "from surgery_cli.app import app\n"
        "sys.argv = ['surgery', *sys.argv[1:]]\n"
        "app()\n"
    )
    env = {**__import__("os").environ, "SURGERY_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    for args in (["plan", "qv_lora", "--model", "tiny-opt"], ["inspect", "meta-llama/Llama-3.1-8B"]):
        said = []
        for _ in range(2):  # cold, then warm
            done = subprocess.run(
                [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300
            )
            assert done.returncode == 0, done.stderr[-2000:]
            said.append(done.stdout.rsplit("HEAVY", 1)[1].strip())
        assert "'torch'" in said[0] and said[1] == "[]", (args, said)  # the cold run traced; the warm one did not
