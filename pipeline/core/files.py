"""Small files beside the stores (run.json, metrics, checkpoints, reports): written atomically, errors in one line.

Paths may be local or on object storage (see :mod:`pipeline.core.cachefs`): there an object is replaced
whole by one PUT, which is atomic already.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from pipeline.core.cachefs import as_path, is_remote
from pipeline.core.errors import PipelineError

CHECKPOINT = "checkpoint.pt"  # a run's checkpoint, beside its run.json


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at ``path`` is damaged, or None. ``torch.save`` writes a zip whose every record
    carries a CRC-32 (torch's default); ``torch.load`` does not check them, so flipped bytes would load as
    wrong weights. Every record is read and checked here: a checkpoint is a few GB at most."""
    import zipfile

    try:
        with as_path(path).open("rb") as f, zipfile.ZipFile(f) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        return f"not a complete checkpoint ({type(e).__name__})"
    except Exception as e:  # noqa: BLE001 - zlib and struct errors of a mangled archive mean "damaged" too
        return f"unreadable ({type(e).__name__})"
    return f"record {bad} fails its CRC-32 (altered bytes)" if bad else None


def partial_path(path: Path) -> Path:
    """Where ``path`` is written before its atomic rename: ``name.partial`` beside it."""
    return path.with_name(path.name + ".partial")


def create_exclusive(path: Path) -> IO[bytes]:
    """A new file at ``path``, never through a link planted there: a leftover (or planted) file or symlink
    is removed first (unlinking a symlink removes the link, not its target), then the file is created
    with ``O_EXCL | O_NOFOLLOW``."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    return os.fdopen(fd, "wb")


def write_atomic(path: Path, data: str | bytes | Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through ``path.partial`` and a rename: readers see the old file or the new one.

    ``data`` is the content, or a function that writes into the binary file it is given
    (``lambda f: torch.save(obj, f)``). A full disk or a read-only folder is a one-line
    :class:`PipelineError`; the old file stays and no ``.partial`` is left behind.
    """
    path = as_path(path)
    if isinstance(data, str):
        data = data.encode()
    remote = is_remote(path)
    target = path if remote else partial_path(path)
    try:
        with (target.open("wb") if remote else create_exclusive(target)) as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
        if not remote:
            os.replace(target, path)
    except BaseException as e:
        if not remote:
            try:
                target.unlink(missing_ok=True)
            except OSError:
                pass
        if isinstance(e, OSError):
            raise PipelineError(f"cannot write {path}: {describe_os_error(e)}") from None
        if isinstance(e, RuntimeError) and not remote and nearly_full(path.parent):
            # torch.save's zip writer reports a failed write as a RuntimeError ("unexpected pos ...")
            raise PipelineError(f"cannot write {path}: {describe_os_error(OSError(errno.ENOSPC, ''))}") from None
        raise


def nearly_full(folder: Path, margin: int = 1 << 20) -> bool:
    try:
        return shutil.disk_usage(folder).free < margin
    except OSError:
        return False


def append_line(path: Path, line: str) -> None:
    """Append one line (object storage cannot append: the object is rewritten, fine for logs of runs)."""
    path = as_path(path)
    if is_remote(path):
        old = path.read_text() if path.exists() else ""
        path.write_text(old + line + "\n")
        return
    # never through a symbolic link planted in the run folder
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "a") as f:
        f.write(line + "\n")


def describe_os_error(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "no space left on the device (free some, then re-run: finished work is kept)"
    if e.errno == errno.EROFS:
        return "read-only file system"
    if e.errno == errno.ELOOP:
        return "a symbolic link is in the way (files of the cache are never written through links; remove it)"
    if e.errno in (errno.EEXIST, errno.ENOTDIR):
        return "a file is in the way of a folder"
    return e.strerror or str(e)


def read_json(path: Path, what: str) -> Any:
    """A JSON file of a run (run.json, metrics.json), or a one-line :class:`DamagedStore` error."""
    from pipeline.core.errors import DamagedStore

    path = as_path(path)
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise DamagedStore(f"{what} {path} is damaged ({type(e).__name__}): run `pipeline verify --repair`, or "
                           "re-run its stage with --replace-mismatched") from None


def read_history(path: Path) -> list[dict]:
    """The records of a run's ``history.jsonl``. A torn last line (a kill mid-write) is dropped, as resuming
    drops it; a damaged line before the last is a :class:`DamagedStore` error."""
    from pipeline.core.errors import DamagedStore

    path = as_path(path)
    if not path.exists():
        return []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DamagedStore(f"run history {path} is damaged ({type(e).__name__})") from None
    records = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError
            records.append(record)
        except ValueError:
            if i == len(lines) - 1:
                break  # torn by a kill: the resumed run writes it again
            raise DamagedStore(f"run history {path} is damaged (line {i + 1} is not a record): run "
                               "`pipeline verify --repair`") from None
    return records
