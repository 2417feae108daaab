"""Command options generated from the library's configs: every field of a config is one option, once.

``with_configs(train=TrainConfig, data=DataConfig)(command)`` gives the command every option of those configs
(name, type, default, help, panel from the field), and calls it with the configs built from what was typed: the
config's own checks run there, so a bad value is one line naming the option, as everywhere.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import typer

from surgery.options import OptionInfo, options_of


def typer_option(info: OptionInfo):
    """The ``typer.Option`` of one config field."""
    names = [info.flag] + ([info.short] if info.short else [])
    help = info.help if info.choices is None else f"{info.help} One of: {', '.join(map(str, info.choices))}."
    return typer.Option(info.default, *names, help=help, rich_help_panel=info.panel, show_default=not info.is_flag)


def typer_annotation(info: OptionInfo):
    """The type the command line parses a field as: a ``Literal``'s values stay text, so the config checks them and
    a wrong one is the config's one-line message (with its reason), not a usage box."""
    if info.choices is None:
        return info.annotation
    return str if info.default is not None else str | None


def with_configs(**configs: type | tuple[type, tuple[str, ...]]) -> Callable[[Callable], Callable]:
    """Decorate a command whose keyword arguments named like ``configs`` take config objects: the command gets one
    option per config field instead, and receives the configs built from them. A config given as ``(cls, names)``
    contributes only those fields' options (the others keep their defaults): the option means the same on every
    command that has it."""
    chosen = {key: _chosen(value) for key, value in configs.items()}

    def decorate(command: Callable) -> Callable:
        own = [p for name, p in inspect.signature(command).parameters.items() if name not in configs]
        generated = [
            inspect.Parameter(
                o.name, inspect.Parameter.KEYWORD_ONLY, default=typer_option(o), annotation=typer_annotation(o)
            )
            for _, infos in chosen.values()
            for o in infos
        ]
        names = [p.name for p in own] + [p.name for p in generated]
        clash = next((n for n in names if names.count(n) > 1), None)
        if clash is not None:
            raise TypeError(f"option {clash!r} is declared twice in {command.__name__}")

        @functools.wraps(command)
        def run(**typed):
            built = {key: cls(**{o.name: typed.pop(o.name) for o in infos}) for key, (cls, infos) in chosen.items()}
            return command(**typed, **built)

        run.__signature__ = inspect.Signature(
            [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.kind == p.VAR_KEYWORD else p for p in own] + generated
        )
        return run

    return decorate


def _chosen(value: type | tuple[type, tuple[str, ...]]) -> tuple[type, list[OptionInfo]]:
    cls, names = value if isinstance(value, tuple) else (value, None)
    infos = options_of(cls)
    if names is not None:
        unknown = set(names) - {o.name for o in infos}
        if unknown:
            raise TypeError(f"{cls.__name__} has no option {', '.join(sorted(unknown))}")
        infos = [o for o in infos if o.name in names]
    return cls, infos
