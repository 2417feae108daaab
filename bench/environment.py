"""Where a benchmark ran: the hardware, the software versions and the command line, for its JSON.

Every script in ``bench/`` writes ``"environment": environment()`` into the JSON it writes with ``--out``, so the
docs' tables (``bench/report.py``) can name what produced each figure.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
from importlib import metadata


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(0)


def environment() -> dict:
    """The hardware, software and command line of this process.

    Returns:
        A JSON-ready dict: ``command`` (as typed, from the repository root), ``platform``, ``cpu``, ``cpu_count``,
        ``gpu`` (None without CUDA), ``python`` and the versions of torch, transformers, bitsandbytes, peft and
        surgery (None when not installed).
    """
    return {
        "command": shlex.join(["python", *sys.argv]),
        "platform": platform.platform(),
        "cpu": _cpu(),
        "cpu_count": os.cpu_count(),
        "gpu": _gpu(),
        "python": platform.python_version(),
        **{
            name: _version(distribution)
            for name, distribution in (
                ("torch", "torch"),
                ("transformers", "transformers"),
                ("bitsandbytes", "bitsandbytes"),
                ("peft", "peft"),
                ("surgery", "model-surgery"),
            )
        },
    }
