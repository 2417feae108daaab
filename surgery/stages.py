"""Stage packages resolve their modules on first use: ``surgery.model.tracing`` after ``import surgery`` alone."""

from __future__ import annotations

import importlib


def submodules_on_use(package: str):
    """A PEP 562 ``__getattr__`` for ``package`` that imports ``package.NAME`` when NAME is one of its modules."""

    def __getattr__(name: str):
        try:
            return importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{package}.{name}":
                raise
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None

    return __getattr__
