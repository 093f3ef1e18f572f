"""Small files beside the stores (run.json, metrics, exports): written atomically, errors in one line."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

from .errors import PipelineError


def partial_path(path: Path) -> Path:
    """Where ``path`` is written before its atomic rename: ``name.partial`` beside it."""
    return path.with_name(path.name + ".partial")


def write_atomic(path: Path, data: str | bytes | Callable[[Path], None]) -> None:
    """Write ``path`` through ``path.partial`` and a rename: readers see the old file or the new one.

    ``data`` is the content, or a function that writes the file it is given (``torch.save``).
    A full disk or a read-only folder is a one-line :class:`PipelineError`; the old file stays.
    """
    path = Path(path)
    tmp = partial_path(path)
    try:
        if callable(data):
            data(tmp)
        elif isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise PipelineError(f"cannot write {path}: {describe_os_error(e)}") from None


def describe_os_error(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "no space left on the device (free some, then re-run: finished work is kept)"
    if e.errno == errno.EROFS:
        return "read-only file system"
    if e.errno in (errno.EEXIST, errno.ENOTDIR):
        return "a file is in the way of a folder"
    return e.strerror or str(e)
