"""The documentation site builds without a warning, its generated pages are current, and no page or docstring
speaks of how the project was made instead of what it does."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PHRASES = [  # lab-notebook wording: who built what, on which machine, in which round
    r"this project's \d-core",
    r"\b\d-core (CPU )?machine\b",
    r"\bthe seeds\b",
    r"\bwork item\b",
    r"\bthis round\b",
    r"\bsessions?\b",
    r"\bno GPU was\b",
    r"\bnone was available\b",
    r"\bwas lent\b",
    r"\bnot yet run\b",
    r"\bthe issue's goal\b",
    r"\blab notebook\b",
]
SEARCHED = ["README.md", "docs", "surgery", "cli", "bench"]


def test_the_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", str(ROOT / "mkdocs.yml"), "-d", tmp_path],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": "", "PYTHONPATH": f"{ROOT}:{ROOT / 'cli'}", "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    api = (tmp_path / "api" / "index.html").read_text()
    assert "load_model" in api and "TrainConfig" in api and "Raises" in api  # the reference is from the docstrings


def test_the_generated_pages_are_current():
    spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    for path, text in generate.pages().items():
        assert path.read_text() == text, f"{path.relative_to(ROOT)} is stale: run python docs/generate.py"
    for picture in ("siblings", "batched", "demo_loss"):
        if (ROOT / "bench" / "results" / f"{picture}.json").is_file():
            assert (ROOT / "docs" / "img" / f"{picture}.png").is_file()


def test_the_readme_is_a_front_page_with_the_two_commands_as_they_are():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    assert '```bash\npip install "torch==2.13.0" . && surgery demo\n```' in text
    test_command = 'pip install "torch==2.13.0" -e ".[test]" && python -m pytest -q -p no:cacheprovider'
    assert f"```bash\n{test_command}\n```" in text
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command.replace("pip install", "pip install -q") in ci  # what CI runs is what the README says


def test_every_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in (ROOT / "docs").glob("*.md"):
        assert f" {page.name}" in nav, f"docs/{page.name} is not in mkdocs.yml's nav"


def test_no_lab_notebook_wording():
    pattern = re.compile("|".join(PHRASES), re.I)
    found = []
    for top in SEARCHED:
        path = ROOT / top
        files = [path] if path.is_file() else [f for f in path.rglob("*") if f.suffix in (".py", ".md", ".yaml")]
        for file in files:
            for number, line in enumerate(file.read_text(errors="replace").splitlines(), 1):
                if pattern.search(line):
                    found.append(f"{file.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)
