"""Training data as the ``datasets`` library stores it, read through that library (an optional extra).

Four sources: a ``save_to_disk`` folder (a Dataset or a DatasetDict) and an ``.arrow`` file, both memory-mapped; a
``.parquet`` file, streamed in record batches; and a dataset name (``owner/name``) resolved only from the local
datasets cache, with the Hub switched off for the call, so nothing is ever downloaded. Every file the library will
open passes the gate of ``surgery.disk`` first: a saved folder's JSON files and the data files its ``state.json``
lists (inside the folder, regular, bounded), a file given whole. A name is a dataset's name only: a ``datasets``
file-format builder (``text``, ``json``, ...) would read every file under the working folder, so it is refused.
``DatasetParts`` (TRL's ``--dataset-config`` and split options) picks a cached dataset's configuration and the
splits to read. Rows become ``data.Example``s through the same field mapping as JSONL and CSV rows
(``--text-field`` ...); the text read is bounded by ``MAX_DATA_BYTES`` as the file readers are, and every problem
is a DataError naming the source and row.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path

from ..disk import MiB, check_inside, check_user_file, gate_file, gate_folder, gate_tree, read_user_text
from ..errors import DataError, first_line
from ..package import install_hint
from .rows import MAX_DATA_BYTES, WHOLE, DatasetParts, Example, Fields, Split, example_of

SUFFIXES = (".parquet", ".arrow")
SAVED_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")  # what save_to_disk writes
MAX_SAVED_JSON_BYTES = 64 * MiB  # save_to_disk's JSON files: features and a list of data files, far below this
NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # a Hub dataset id: name or owner/name
EVAL_SPLITS = ("validation", "test", "eval")


def is_stored(path: Path) -> bool:
    """Whether ``path`` is for this reader: a saved-dataset folder, a .parquet or .arrow file, or (naming
    nothing on disk and no file format) a dataset name for the local cache."""
    if path.is_dir():  # a marker that is there but no regular file (a FIFO) is the gate's to refuse
        return any(os.path.lexists(path / marker) for marker in SAVED_MARKERS)
    if path.suffix.lower() in SUFFIXES:
        return True
    return not path.exists() and not path.suffix and NAME.fullmatch(str(path)) is not None


def read_stored(path: Path, fields: Fields, split: Split, parts: DatasetParts = WHOLE) -> list[Example]:
    """Every row of the stored dataset (the split ``split`` picks from several, or the one ``parts`` names) as
    examples."""
    datasets = _datasets(path)
    if path.suffix.lower() in SUFFIXES:
        check_user_file(path, what="data file", limit=None, error=DataError)  # memory-mapped or streamed
    elif path.is_dir():
        gate_saved(path)
    else:
        check_dataset_name(str(path), datasets)
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


def gate_saved(folder: Path) -> None:
    """Gate a ``save_to_disk`` folder as ``load_from_disk`` will read it: a Dataset (its ``state.json`` and
    ``dataset_info.json``, and the data files ``state.json`` lists) or a DatasetDict (``dataset_dict.json`` and
    each split's folder it lists). Every name stays inside the folder; every file is regular; the JSON is bounded.

    Raises:
        DataError: naming the file (and the entry that named it) and what is wrong.
    """
    if not any(os.path.lexists(folder / name) for name in ("state.json", "dataset_info.json")):
        gate_folder(folder, {"dataset_dict.json": MAX_SAVED_JSON_BYTES}, what="saved dataset", error=DataError)
        listing = folder / "dataset_dict.json"
        splits = _saved_json(listing).get("splits")
        if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
            raise DataError(f"{listing}: its splits must be a list of split names; save the dataset again")
        for split in splits:
            check_inside(folder, split, error=DataError, named_by=f"{listing} (splits)")
            _gate_one(folder / split)
        return
    _gate_one(folder)


def _gate_one(folder: Path) -> None:
    """Gate the folder of one saved split: its JSON, then every data file its state.json lists."""
    limits = {"state.json": MAX_SAVED_JSON_BYTES, "dataset_info.json": MAX_SAVED_JSON_BYTES}
    gate_folder(folder, limits, what="saved dataset", error=DataError)
    state = folder / "state.json"
    entries = _saved_json(state).get("_data_files")
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and isinstance(e.get("filename"), str) for e in entries
    ):
        raise DataError(f"{state}: _data_files must list the split's data files by filename; save the dataset again")
    for entry in entries:
        name = entry["filename"]
        gate_file(folder, name, what="dataset data file", error=DataError, named_by=f"{state} (_data_files)")


def _saved_json(path: Path) -> dict:
    """A JSON object save_to_disk wrote (gated already), read within its bound."""
    if not os.path.lexists(path):
        raise DataError(f"{path}: missing; a save_to_disk folder has it (save the dataset again)")
    try:
        data = json.loads(read_user_text(path, what="saved dataset file", limit=MAX_SAVED_JSON_BYTES, error=DataError))
    except (ValueError, RecursionError) as exc:
        raise DataError(f"{path}: not readable JSON ({first_line(exc)}); save the dataset again") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: must hold a JSON object; save the dataset again")
    return data


def check_dataset_name(name: str, datasets) -> None:
    """Refuse a ``--data`` name that is no dataset's name: a ``datasets`` file-format builder (``text``, ``json``,
    ``parquet``, ...), which without data files reads every file under the working folder, or a name the Hub
    could not hold (``..``, ``--``), which the cache lookup could take for a path.

    Raises:
        DataError: saying to pass a file or folder.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    builders = getattr(getattr(datasets, "packaged_modules", None), "_PACKAGED_DATASETS_MODULES", {})
    if name.lower() in builders:
        raise DataError(
            f"--data {name}: names a file format of the datasets library, not a data set; on its own it would read "
            "every file under the working folder. Pass the file or folder to train on (e.g. --data notes.txt)"
        )
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise DataError(
            f"--data {name}: no such data file, and not a dataset name (owner/name, without '..' or '--'); pass a "
            "file or folder, or the name of a dataset in the local cache"
        ) from None


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

    gate_cached(name, datasets)
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


def gate_cached(name: str, datasets) -> None:
    """Gate what the local caches hold for the dataset ``name`` before ``load_dataset`` opens it: the prepared
    files in the datasets cache (``owner___name``) and every snapshot of it in the HF hub cache (``datasets--owner--
    name``, whose files link into its blobs).

    Raises:
        DataError: a cached file is a FIFO or another special file, or a link out of its cache folder.
    """
    from ..base.sources import hub_cache

    prepared = Path(datasets.config.HF_DATASETS_CACHE) / name.replace("/", "___")
    snapshots = hub_cache() / ("datasets--" + name.replace("/", "--")) / "snapshots"
    folders = [prepared, *(sorted(snapshots.iterdir()) if snapshots.is_dir() else [])]
    for folder in folders:
        if folder.is_dir():
            gate_tree(folder, what="cached dataset", error=DataError)


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
