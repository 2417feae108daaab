"""Training data as the ``datasets`` library stores it, read through that library (an optional extra).

Four sources: a ``save_to_disk`` folder (a Dataset or a DatasetDict) and an ``.arrow`` file,
both memory-mapped; a ``.parquet`` file, streamed in record batches; and a dataset name
(``owner/name``) resolved only from the local datasets cache, with the Hub switched off for the
call, so nothing is ever downloaded. ``DatasetParts`` (TRL's ``--dataset-config`` and split options) picks a
cached dataset's configuration and the splits to read. Rows become ``data.Example``s through the same field mapping
as JSONL and CSV rows (``--text-field`` ...); the text read is bounded by ``MAX_DATA_BYTES`` as
the file readers are, and every problem is a DataError naming the source and row.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
from pathlib import Path

from ..errors import DataError, first_line
from ..package import install_hint
from .rows import MAX_DATA_BYTES, WHOLE, DatasetParts, Example, Fields, Split, example_of

SUFFIXES = (".parquet", ".arrow")
SAVED_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")  # what save_to_disk writes
NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # a Hub dataset id: name or owner/name
EVAL_SPLITS = ("validation", "test", "eval")


def is_stored(path: Path) -> bool:
    """Whether ``path`` is for this reader: a saved-dataset folder, a .parquet or .arrow file, or (naming
    nothing on disk and no file format) a dataset name for the local cache."""
    if path.is_dir():
        return any((path / marker).is_file() for marker in SAVED_MARKERS)
    if path.suffix.lower() in SUFFIXES:
        return True
    return not path.exists() and not path.suffix and NAME.fullmatch(str(path)) is not None


def read_stored(path: Path, fields: Fields, split: Split, parts: DatasetParts = WHOLE) -> list[Example]:
    """Every row of the stored dataset (the split ``split`` picks from several, or the one ``parts`` names) as
    examples."""
    datasets = _datasets(path)
    if path.suffix.lower() in SUFFIXES and not path.is_file():
        raise DataError(f"{path}: no such data file")
    if parts.config is not None and (path.exists() or path.suffix.lower() in SUFFIXES):
        raise DataError(
            f"{path}: --dataset-config picks a configuration of a dataset in the local cache (by name); "
            "a file or folder holds one: drop the option"
        )
    with tempfile.TemporaryDirectory(prefix="surgery-parquet-") as scratch:  # its builder's lock files, not the cache's
        try:
            return _examples(*_open(datasets, path, split, parts, scratch), fields)
        except DataError:
            raise
        except Exception as exc:  # arrow/parquet readers' errors (opening or mid-file), an unfinished save_to_disk
            raise DataError(f"{path}: cannot be read as a dataset ({type(exc).__name__}: {first_line(exc)})") from None


def _open(datasets, path: Path, split: Split, parts: DatasetParts, scratch: str):
    """(rows, source name) of the stored dataset at ``path``; rows iterate lazily (memory-mapped or streamed)."""
    if path.suffix.lower() == ".parquet":
        rows = datasets.load_dataset("parquet", data_files=str(path), split="train", streaming=True, cache_dir=scratch)
        return _one_split(rows, path, split, parts)
    if path.suffix.lower() == ".arrow":
        return _one_split(datasets.Dataset.from_file(str(path)), path, split, parts)
    if path.is_dir():
        return _pick_split(datasets.load_from_disk(str(path)), path, split, parts)
    return _pick_split(_from_cache(datasets, str(path), parts.config), path, split, parts)


def _datasets(path: Path):
    try:
        import datasets
    except ImportError:
        if not path.exists() and path.suffix.lower() not in SUFFIXES:
            raise DataError(
                f"{path}: no such data file (to read it as a dataset name from the local datasets cache, "
                f"{install_hint('datasets')})"
            ) from None
        raise DataError(
            f"{path}: reading .parquet, .arrow, dataset folders and cached datasets needs the datasets "
            f"library: {install_hint('datasets')}"
        ) from None
    return datasets


def _from_cache(datasets, name: str, config: str | None = None):
    """The dataset ``name`` (its configuration ``config``) as the local datasets cache holds it (all its splits),
    with the Hub switched off."""
    import huggingface_hub.constants as hub

    with contextlib.ExitStack() as offline:
        for module in (datasets.config, hub):
            offline.enter_context(_patched(module, "HF_HUB_OFFLINE", True))
        try:
            return datasets.load_dataset(name, config)
        except Exception as exc:
            which = f" (configuration {config!r})" if config is not None else ""
            raise DataError(
                f"{name}{which}: no such data file, and no dataset of that name in the local datasets cache "
                f"({datasets.config.HF_DATASETS_CACHE}; {type(exc).__name__}: {first_line(exc, 160)}). "
                "Nothing is downloaded: run datasets.load_dataset(...) once where there is network, or "
                "save it with save_to_disk and give the folder"
            ) from None


@contextlib.contextmanager
def _patched(module, name: str, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def _flag(split: Split) -> str:
    return "--dataset-train-split" if split == "train" else "--dataset-test-split"


def _one_split(rows, path: Path, split: Split, parts: DatasetParts):
    """(rows, source) of a file, which holds one split: a split option names what is not there."""
    if parts.split_for(split) is not None:
        raise DataError(
            f"{path}: holds one split, so {_flag(split)} {parts.split_for(split)!r} has nothing to "
            "choose; drop the option (or give a datasets folder with several splits)"
        )
    return rows, str(path)


def _pick_split(loaded, path: Path, split: Split, parts: DatasetParts = WHOLE):
    """(rows, source) of a Dataset, or of the wanted split of a DatasetDict: the one ``parts`` names, else train
    (for eval validation / test / eval)."""
    splits = getattr(loaded, "keys", None)
    if splits is None:  # a Dataset: one split
        return _one_split(loaded, path, split, parts)
    names = list(splits())
    chosen = parts.split_for(split)
    if chosen is not None:
        if chosen not in names:
            raise DataError(f"{path}: has no split {chosen!r} ({_flag(split)}); its splits are {', '.join(names)}")
        return loaded[chosen], f"{path} [{chosen}]"
    wanted = ("train",) if split == "train" else EVAL_SPLITS
    found = next((n for n in wanted if n in names), names[0] if len(names) == 1 else None)
    if found is None:
        raise DataError(
            f"{path}: holds the splits {', '.join(names)} but none named {' or '.join(wanted)} for "
            f"{'training' if split == 'train' else 'evaluation'}; save the split you want on its own"
        )
    return loaded[found], f"{path} [{found}]"


def _examples(rows, source: str, fields: Fields) -> list[Example]:
    """The rows as examples, reading at most MAX_DATA_BYTES of text."""
    out, size = [], 0
    for index, row in enumerate(rows):
        example = example_of(row, f"{source} row {index}", fields)
        size += len(example.completion) + len(example.prompt) + sum(len(r) + len(c) for r, c in example.messages)
        if size > MAX_DATA_BYTES:
            raise DataError(
                f"{source}: holds more than {MAX_DATA_BYTES >> 30} GiB of text (row {index}); train on a part of it"
            )
        if example.completion.strip() or example.prompt or example.messages:
            out.append(example)
    if not out:
        raise DataError(f"{source}: holds no examples")
    return out
