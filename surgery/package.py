"""What surgery is called where it is installed from: the distribution name, its version, and install hints.

The import name and the command are ``surgery``; the distribution on the package index is ``model-surgery``
(the name ``surgery`` there belongs to an unrelated project, which also installs a ``surgery`` import package:
the two cannot be installed side by side). Every install hint in messages and docs comes from here.
"""

from __future__ import annotations

DISTRIBUTION = "model-surgery"


def version() -> str:
    """surgery's installed version (from the package metadata; nothing imports the package root for it)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed(DISTRIBUTION)
    except PackageNotFoundError:  # a checkout on sys.path, not installed
        return "0+unknown"


def install_hint(extra: str | None = None, *, upgrade: bool = False) -> str:
    """The pip command that installs surgery (with an optional extra), quoted for a POSIX shell.

    Args:
        extra: an optional extra (``datasets``, ``tensorboard``, ``wandb``, ``mlflow``, ``plot``, ``docs``).
        upgrade: ``pip install -U``.

    Returns:
        e.g. ``pip install 'model-surgery[datasets]'``.
    """
    spec = f"{DISTRIBUTION}[{extra}]" if extra else DISTRIBUTION
    return f"pip install {'-U ' if upgrade else ''}'{spec}'"
