"""The wheel holds what a non-editable install needs: every module, bundled rule files and data sets."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_carries_modules_rules_and_data(tmp_path):
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("model_surgery-*.whl")  # the distribution name (import name: surgery)
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {p.relative_to(ROOT).as_posix() for p in (ROOT / "surgery").rglob("*.py")}  # every stage's modules
    expected |= {f"surgery/bundled_rules/{p.name}" for p in (ROOT / "rules").glob("*.yaml")}
    expected |= {f"surgery/bundled_data/{p.name}" for p in (ROOT / "data").glob("*.jsonl")}
    expected |= {"surgery_cli/app.py", "surgery_cli/__init__.py"}
    assert expected <= names, sorted(expected - names)
