"""Files: one gate for every file surgery or a library it calls opens, bounded reads, and atomic writes.

Every file a user or the internet hands to surgery (rule files, data files and saved datasets, model and tokenizer
folders with their checkpoint shards, adapter and checkpoint folders, the caches a name is looked up in) passes the
gate first: ``gate_file`` (or ``gate_folder`` / ``gate_tree`` for a folder, right before a loader gets it) checks
with ``stat`` alone that it is a regular file (never a FIFO, device or socket, which are never opened), that it lies
inside the folder it belongs to once every link is resolved (the HF cache's links into its blobs are its normal
layout), and that it is no larger than its reader's limit when it is read whole. Files read here go through
``read_user_file``, bounded the same way. Writes go through a temp file or folder in the same directory and a
rename, so a crash leaves the previous version intact.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import SurgeryError

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def check_user_file(path: Path, *, what: str, limit: int | None, error: type[SurgeryError]) -> int:
    """The size of ``path`` if it is a regular file of at most ``limit`` bytes (None: any size); else ``error``
    saying why. Checked with ``stat`` alone: a FIFO is never opened."""
    try:
        info = os.stat(path)  # follows symlinks: a link to /dev/zero is a device
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except OSError as exc:
        raise error(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(info.st_mode):
        raise error(f"{path}: is a directory, not a {what}")
    if not stat.S_ISREG(info.st_mode):
        kind = (
            "a FIFO"
            if stat.S_ISFIFO(info.st_mode)
            else "a device"
            if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode)
            else "a socket or other special file"
        )
        raise error(f"{path}: is {kind}, not a regular file; a {what} must be a regular file")
    if limit is not None and info.st_size > limit:
        raise error(f"{path}: is {info.st_size:,} bytes; a {what} is at most {limit:,} bytes — is this the right file?")
    return info.st_size


def read_user_file(path: str | Path, *, what: str, limit: int, error: type[SurgeryError]) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; ``error`` (a SurgeryError) otherwise."""
    path = Path(path)
    size = check_user_file(path, what=what, limit=limit, error=error)
    try:
        with open(path, "rb") as f:
            data = f.read(min(size, limit) + 1)  # a file that grew since stat is still bounded
    except OSError as exc:
        raise error(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if len(data) > size:
        raise error(f"{path}: changed while being read; try again once nothing writes to it")
    return data


def read_user_text(path: str | Path, *, what: str, limit: int, error: type[SurgeryError]) -> str:
    """``read_user_file`` decoded as UTF-8 (a leading BOM dropped); a bad byte names its line."""
    data = read_user_file(path, what=what, limit=limit, error=error)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise error(f"{path}:{line}: not UTF-8 text (byte {exc.start}); a {what} must be UTF-8") from None


def umask() -> int:
    """The process umask (read without changing it for longer than the call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, data: bytes, *, error: type[SurgeryError]) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder: the old file survives any failure."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise error(
            f"{path}: could not be written ({exc.strerror or exc}); check that the folder exists and is writable"
        ) from None
    try:
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise error(
                f"{path}: could not be written ({exc.strerror or exc}); the previous file, if any, is unchanged"
            ) from exc
        raise
    fsync_folder(path.parent)


def check_new_folder(path: str | Path, *, error: type[SurgeryError], overwrite: bool = False) -> None:
    """Refuse an output folder ``atomic_folder`` would refuse: a file, or a non-empty folder without ``overwrite``
    (call it before the work that fills the folder, so the refusal comes first).

    Raises:
        error: naming the path and what to do.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise error(f"{path}: exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise error(f"{path}: exists and is not empty; choose a new folder or pass --overwrite")


@contextlib.contextmanager
def atomic_folder(path: str | Path, *, error: type[SurgeryError], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside ``path``; on success it becomes ``path``, on failure it is removed.

    An existing non-empty ``path`` is refused unless ``overwrite``; then it is replaced only once the
    new folder is complete. The new folder and everything in it get the permissions the umask gives
    (not mkdtemp's 0700, nor the 0600 of files libraries write through temp files, as transformers does).
    """
    path = Path(path)
    check_new_folder(path, error=error, overwrite=overwrite)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        os.chmod(tmp, 0o777 & ~umask())
    except OSError as exc:
        raise error(
            f"{path}: cannot be created ({exc.strerror or exc}); check that the parent folder exists and is writable"
        ) from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _umask_permissions(tmp)
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    fsync_folder(path.parent)


def _umask_permissions(folder: Path) -> None:
    """Folders 0777 and files 0666, less the umask, below ``folder`` (surgery writes no executables)."""
    mask = umask()
    for item in folder.rglob("*"):
        if not item.is_symlink():
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


# ------------------------------------------------------------------------- a set of files, whole or not at all

MANIFEST_FILE = ".surgery-files.json"  # what the last complete write of a folder's files put there
MAX_MANIFEST_BYTES = 64 * 1024


def write_folder_files(
    folder: str | Path, files: dict[str, bytes], *, error: type[SurgeryError], links: dict[str, str] | None = None
) -> None:
    """Write ``files`` (name -> bytes; ``links``: name -> the file of ``files`` it is a hard link to, a copy
    where links fail) into ``folder`` so that every reader sees the old set or the new set, never a mix:
    the new files go to temp names first; the folder's manifest says "writing" while they are renamed into
    place, then lists each file's sha256 (``check_folder_files``). Other files in the folder are left alone.
    """
    import hashlib
    import json

    folder, links = Path(folder), links or {}
    temps: dict[str, str] = {}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            temps[name] = _written_temp(folder, name, data)
        for name, target in links.items():
            temps[name] = _linked_temp(folder, name, temps[target])
        atomic_write(folder / MANIFEST_FILE, json.dumps({"format": 1, "writing": sorted(temps)}).encode(), error=error)
        for name, tmp in temps.items():
            os.replace(tmp, folder / name)
        temps.clear()
        fsync_folder(folder)
        digests = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
        digests.update({name: digests[target] for name, target in links.items()})
        atomic_write(
            folder / MANIFEST_FILE, json.dumps({"format": 1, "files": digests}, indent=1).encode(), error=error
        )
    except OSError as exc:
        raise error(
            f"{folder}: could not be written ({exc.strerror or exc}); files written before are as they were"
        ) from None
    finally:
        for tmp in temps.values():
            Path(tmp).unlink(missing_ok=True)


def _written_temp(folder: Path, name: str, data: bytes) -> str:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        os.chmod(tmp, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def _linked_temp(folder: Path, name: str, source: str) -> str:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    os.unlink(tmp)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    return tmp


def check_folder_files(folder: str | Path, *, error: type[SurgeryError]) -> None:
    """Refuse a folder whose last write of its files did not finish (its manifest still says "writing": the files
    may mix two saves). A folder without a manifest (from before manifests, or another tool) passes; files edited
    after a complete save are each read and checked as usual (the manifest's sha256 list records what was saved)."""
    import json

    folder = Path(folder)
    manifest = folder / MANIFEST_FILE
    if not manifest.exists() and not manifest.is_symlink():
        return
    try:
        entry = json.loads(read_user_file(manifest, what="folder manifest", limit=MAX_MANIFEST_BYTES, error=error))
    except (ValueError, RecursionError):
        entry = None
    if not isinstance(entry, dict) or not ("writing" in entry or isinstance(entry.get("files"), dict)):
        raise error(
            f"{manifest}: not a manifest surgery wrote (it lists the files of the folder's last save); "
            "save the folder again, or delete that file if the folder's files are whole"
        )
    if "writing" in entry:
        raise error(
            f"{folder}: its files were being written when that was interrupted ({MANIFEST_FILE} says so), "
            "so they may mix two saves; save the folder again"
        )


def check_inside(folder: Path, name: str, *, error: type[SurgeryError], named_by: str = "") -> Path:
    """The path of ``name`` (a path relative to ``folder``) once it is known to stay inside the folder: not
    absolute, no ``..``, and every link on the way resolved to a place inside it (a loop or a missing target is
    refused too). A folder from the internet must not make surgery read other files. A snapshot of the HF cache
    is the exception the cache's layout makes: its files are links into its repository's blobs (``link_roots``),
    and those are followed.

    Args:
        folder: the folder the file belongs to.
        name: the file's path in it (a file name, or a path through subfolders).
        error: the SurgeryError to raise.
        named_by: the file (and entry) that named ``name``, for the message (default: the folder itself).

    Returns:
        ``folder / name``.

    Raises:
        error: the name leaves the folder, or the file is a link that leads nowhere or out of ``link_roots(folder)``.
    """
    path = folder / name
    parts = Path(name).parts
    if not parts or Path(name).is_absolute() or any(part in ("..", ".") for part in parts) or "\0" in name:
        source = named_by or str(folder)
        raise error(
            f"{source}: names {name!r}, a path out of {folder}; surgery reads only the folder's own files "
            "(name them relative to the folder, without '..'), or copy the file in"
        )
    if not any(p.is_symlink() for p in [path, *list(path.parents)[: len(parts) - 1]]):
        return path
    try:
        target = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise error(
            f"{path}: is a link that leads nowhere (a loop or a missing target); replace it with the file"
        ) from None
    roots = link_roots(folder)
    if not any(target.is_relative_to(root) for root in roots):
        where = "outside its folder" + (" and its HF cache repository" if len(roots) > 1 else "")
        raise error(
            f"{path}: is a link to {target}, {where}; surgery reads only the folder's own files (copy the file in)"
        )
    return path


MAX_FOLDER_ENTRIES = 100_000  # a model or dataset folder holds tens of files; a million is an attack on the scan


def gate_file(
    folder: Path,
    name: str,
    *,
    what: str,
    error: type[SurgeryError],
    limit: int | None = None,
    named_by: str = "",
) -> Path:
    """The gate every file surgery or a library it calls opens passes first: the file ``name`` of ``folder`` is
    inside the folder (``check_inside``), a regular file (never a FIFO, device or socket: checked with ``stat``,
    nothing is opened) and, when it is read whole, at most ``limit`` bytes.

    Args:
        folder: the folder the file belongs to.
        name: the file's path relative to the folder.
        what: what the file is, for the message ("checkpoint shard").
        error: the SurgeryError to raise.
        limit: the most bytes the file may hold (None: read piecewise or memory-mapped, no bound).
        named_by: the file (and entry) that named ``name``, for the message.

    Returns:
        ``folder / name``.

    Raises:
        error: naming the file and what is wrong with it.
    """
    path = check_inside(folder, name, error=error, named_by=named_by)
    check_user_file(path, what=what, limit=limit, error=error)
    return path


def gate_folder(
    folder: str | Path,
    files: dict[str, int | None] | None = None,
    *,
    what: str,
    error: type[SurgeryError],
) -> Path:
    """Gate a whole folder once, right before it is handed to a loader (transformers, datasets): every entry at its
    top that is not a folder passes ``gate_file``, and so does each of ``files`` that is there (they may lie in
    subfolders: a checkpoint's shards, a dataset's splits).

    Args:
        folder: the folder.
        files: path relative to the folder -> the most bytes the loader reads whole from it (None: no bound);
            a top-level entry not named here is checked without a bound. Names that are absent are skipped (the
            loader says what it misses); a name that leaves the folder is refused.
        what: what the folder holds, for the message ("model folder").
        error: the SurgeryError to raise.

    Returns:
        The folder.

    Raises:
        error: the folder is not one, holds more than MAX_FOLDER_ENTRIES entries, or one of its files fails the gate.
    """
    folder, files = Path(folder), files or {}
    if not folder.is_dir():
        raise error(f"{folder}: is not a folder; a {what} is a folder")
    try:
        with os.scandir(folder) as entries:
            top = [entry.name for _, entry in zip(range(MAX_FOLDER_ENTRIES + 1), entries)]
    except OSError as exc:
        raise error(f"{folder}: cannot be read ({exc.strerror or exc})") from None
    if len(top) > MAX_FOLDER_ENTRIES:
        raise error(f"{folder}: holds more than {MAX_FOLDER_ENTRIES:,} entries; is this the {what}?")
    for name in [*(n for n in top if n not in files), *files]:
        path = check_inside(folder, name, error=error)  # a link to a subfolder is followed only inside too
        if os.path.lexists(path) and not path.is_dir():
            gate_file(folder, name, what=f"file of a {what}", error=error, limit=files.get(name))
    return folder


def gate_tree(folder: str | Path, *, what: str, error: type[SurgeryError]) -> None:
    """``gate_folder`` for a folder and every folder below it (a cache a library reads from): every file passes
    ``gate_file`` (inside, regular; no size bound), links to folders are followed only inside.

    Raises:
        error: a file fails the gate, or the tree holds more than MAX_FOLDER_ENTRIES entries.
    """
    folder, seen = Path(folder), 0
    for top, dirs, files in os.walk(folder):
        seen += len(dirs) + len(files)
        if seen > MAX_FOLDER_ENTRIES:
            raise error(f"{folder}: holds more than {MAX_FOLDER_ENTRIES:,} entries; is this the {what}?")
        for name in [*files, *(d for d in dirs if os.path.islink(os.path.join(top, d)))]:
            relative = os.path.relpath(os.path.join(top, name), folder)
            path = check_inside(folder, relative, error=error)
            if not path.is_dir():
                gate_file(folder, relative, what=f"file of a {what}", error=error)


HF_CACHE_REPOSITORY = re.compile(r"(models|datasets|spaces)--.+")  # huggingface_hub's folder of one repository
HF_SHARED_BLOBS_MARKER = ".huggingface-shared-blobs"  # marks huggingface_hub's cache-wide blob store, <cache>/blobs


def link_roots(folder: Path) -> list[Path]:
    """The folders a link in ``folder`` may lead into (resolved).

    Args:
        folder: a folder of files surgery reads.

    Returns:
        The folder itself; for a snapshot in huggingface_hub's cache (``<cache>/models--org--name/snapshots/<commit>``
        or a folder below it, whose files link into ``../../blobs/``) also that repository's folder, and the
        cache-wide blob store its blobs link on to when huggingface_hub has marked one (``<cache>/blobs``).
    """
    real = folder.resolve()
    roots = [real]
    snapshots = next((p for p in real.parents if p.name == "snapshots"), None)
    if snapshots is None or not HF_CACHE_REPOSITORY.fullmatch(snapshots.parent.name):
        return roots
    repository = snapshots.parent
    if not (repository / "blobs").is_dir():
        return roots
    roots.append(repository)
    store = repository.parent / "blobs"
    if (store / HF_SHARED_BLOBS_MARKER).is_file():
        roots.append(store.resolve())
    return roots


def fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: some file systems refuse)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_folder(path: Path) -> None:
    """Delete a folder so that it is never seen half deleted: rename it aside first, then delete."""
    trash = path.with_name(f".{path.name}.deleting-{os.getpid()}")
    os.replace(path, trash)
    fsync_folder(path.parent)
    shutil.rmtree(trash, ignore_errors=True)
