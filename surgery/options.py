"""A config field is an option: its help, its command-line flag and its help panel live in the field's metadata, once.

The configs (``TrainConfig``, ``DataConfig``, ``TrackerConfig``, ``DeviceConfig``, ``LoraShorthand``) are frozen,
keyword-only dataclasses declared with ``option(...)``; the CLI builds its options from them (``surgery_cli``),
the library takes the same objects, and the docs' option reference is generated from them
(``python docs/generate.py`` writes ``docs/options.md``). A value is checked once, in the config's
``__post_init__``, and a message names the option as the command line spells it (``--batch-size``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any, Literal, get_args, get_origin


def option(
    default: Any = MISSING,
    *,
    help: str,
    flag: str | None = None,
    short: str | None = None,
    panel: str | None = None,
    cli: bool = True,
    default_factory: Any = MISSING,
) -> Any:
    """A dataclass field that is an option.

    Args:
        default: its default value.
        help: one or two sentences for ``--help`` and the docs.
        flag: its command-line name (default ``--field-name``).
        short: a one-letter alias (``-d``).
        panel: the ``--help`` panel it is listed under.
        cli: False for a field the library takes but the command line spells otherwise.
        default_factory: for a mutable default.

    Returns:
        A ``dataclasses.field`` carrying that metadata.
    """
    metadata = {"help": help, "flag": flag, "short": short, "panel": panel, "cli": cli}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class OptionInfo:
    """One option of a config, as the CLI and the docs show it."""

    name: str
    flag: str
    short: str | None
    help: str
    panel: str | None
    annotation: Any
    default: Any
    choices: tuple | None

    @property
    def is_flag(self) -> bool:
        """A boolean switch (``--packing``), given or not."""
        return self.annotation is bool


def options_of(config: type) -> list[OptionInfo]:
    """Every command-line option of a config class, in field order."""
    hints = typing.get_type_hints(config)
    out = []
    for f in dataclasses.fields(config):
        meta = f.metadata
        if "help" not in meta or not meta.get("cli", True):
            continue
        annotation = hints[f.name]
        default = f.default if f.default is not MISSING else f.default_factory()
        out.append(
            OptionInfo(
                f.name,
                meta.get("flag") or "--" + f.name.replace("_", "-"),
                meta.get("short"),
                meta["help"],
                meta.get("panel"),
                annotation,
                default,
                literal_choices(annotation),
            )
        )
    return out


def flag(config: type, name: str) -> str:
    """The command-line spelling of a config field (``--batch-size`` for ``batch_size``)."""
    meta = next(f.metadata for f in dataclasses.fields(config) if f.name == name)
    return meta.get("flag") or "--" + name.replace("_", "-")


def literal_choices(annotation: Any) -> tuple | None:
    """The values of a ``Literal`` (or an optional one), else None."""
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    if get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in get_args(annotation):
            if get_origin(arg) is Literal:
                return get_args(arg)
    return None


def set_options(config: Any) -> dict[str, str]:
    """The options a config sets, by flag (each its own 'where'): switches that are on, values given that differ
    from the default (what ``surgery.combinations`` checks)."""
    out = {}
    for f in dataclasses.fields(config):
        if "help" not in f.metadata:
            continue
        value = getattr(config, f.name)
        default = f.default if f.default is not MISSING else None
        if value not in (None, False) and value != default:
            name = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            out[name] = name
    return out


def flags_of(config: type) -> tuple[str, ...]:
    """Every flag of a config class."""
    return tuple(o.flag for o in options_of(config))
