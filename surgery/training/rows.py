"""Rows of training data as examples: which column holds what (``Fields``) and one row read into an ``Example``.

Shared by the file readers (``data``: JSONL, CSV) and the stored-dataset reader (``stored_data``), so a
row means the same wherever it is stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..disk import GiB
from ..errors import DataError

MAX_DATA_BYTES = 4 * GiB  # the most text any data source may hold
Split = Literal["train", "eval"]  # which split of a stored dataset with several: train, or validation / test


@dataclass(frozen=True)
class Example:
    """One row: the text the loss is on and an optional prompt before it that carries no loss, or a
    conversation (``messages``: (role, content) pairs) for the tokenizer's chat template to render."""

    completion: str
    prompt: str = ""
    messages: tuple[tuple[str, str], ...] = ()
    where: str = field(default="", compare=False)  # file:line, for errors about this row


@dataclass(frozen=True)
class Fields:
    """Which column of a row holds what (``--text-field`` ...): rows with ``text``, with ``prompt`` and
    ``completion``, or with ``messages``, under these names (in JSONL, CSV and stored datasets alike)."""

    text: str = "text"
    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"


DEFAULT_FIELDS = Fields()


@dataclass(frozen=True)
class DatasetParts:
    """Which part of a stored dataset to read (``--dataset-config``, ``--dataset-train-split``,
    ``--dataset-test-split``, as TRL names them): a configuration of a dataset in the local cache, and the
    splits training and evaluation take (default: train; validation, test or eval)."""

    config: str | None = None
    train_split: str | None = None
    test_split: str | None = None

    def split_for(self, split: Split) -> str | None:
        return self.train_split if split == "train" else self.test_split

    def given(self) -> list[str]:
        """The options set, by their CLI names (for errors about sources they do not apply to)."""
        names = {
            "config": "--dataset-config",
            "train_split": "--dataset-train-split",
            "test_split": "--dataset-test-split",
        }
        return [flag for key, flag in names.items() if getattr(self, key) is not None]


WHOLE = DatasetParts()


def example_of(row, where: str, fields: Fields = DEFAULT_FIELDS) -> Example:
    """One row (a mapping of column names to values) as an Example; DataError at ``where`` if it has none
    of the fields."""
    if isinstance(row.get(fields.text), str):
        return Example(row[fields.text], where=where)
    if isinstance(row.get(fields.prompt), str) and isinstance(row.get(fields.completion), str):
        return Example(row[fields.completion], row[fields.prompt], where=where)
    if row.get(fields.messages) is not None:
        return Example("", messages=messages_of(row[fields.messages], where, fields.messages), where=where)
    raise DataError(
        f"{where}: needs a string `{fields.text}`, string `{fields.prompt}` and `{fields.completion}`, "
        f"or `{fields.messages}` (found: {', '.join(map(str, row))[:200] or 'none'}); name other "
        "columns with --text-field, --prompt-field, --completion-field or --messages-field"
    )


def messages_of(raw, where: str, name: str = "messages") -> tuple[tuple[str, str], ...]:
    """A row's ``messages``: a non-empty list of {"role": str, "content": str} objects."""
    if not isinstance(raw, (list, tuple)) or not raw:
        raise DataError(f'{where}: `{name}` must be a non-empty list of {{"role": ..., "content": ...}} objects')
    out = []
    for i, message in enumerate(raw):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise DataError(f"{where}: {name}[{i}] needs a string `role` and a string `content`")
        out.append((message["role"], message["content"]))
    return tuple(out)
