"""Small files beside the stores (run.json, metrics, checkpoints, reports): written atomically, errors in one line.

Paths may be local or on object storage (see :mod:`pipeline.cachefs`): there an object is replaced
whole by one PUT, which is atomic already.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO

from .cachefs import as_path, is_remote
from .errors import PipelineError


def partial_path(path: Path) -> Path:
    """Where ``path`` is written before its atomic rename: ``name.partial`` beside it."""
    return path.with_name(path.name + ".partial")


def write_atomic(path: Path, data: str | bytes | Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through ``path.partial`` and a rename: readers see the old file or the new one.

    ``data`` is the content, or a function that writes into the binary file it is given
    (``lambda f: torch.save(obj, f)``). A full disk or a read-only folder is a one-line
    :class:`PipelineError`; the old file stays.
    """
    path = as_path(path)
    if isinstance(data, str):
        data = data.encode()
    remote = is_remote(path)
    target = path if remote else partial_path(path)
    try:
        with target.open("wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
        if not remote:
            os.replace(target, path)
    except OSError as e:
        if not remote:
            try:
                target.unlink(missing_ok=True)
            except OSError:
                pass
        raise PipelineError(f"cannot write {path}: {describe_os_error(e)}") from None


def append_line(path: Path, line: str) -> None:
    """Append one line (object storage cannot append: the object is rewritten, fine for logs of runs)."""
    path = as_path(path)
    if is_remote(path):
        old = path.read_text() if path.exists() else ""
        path.write_text(old + line + "\n")
        return
    with open(path, "a") as f:
        f.write(line + "\n")


def describe_os_error(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "no space left on the device (free some, then re-run: finished work is kept)"
    if e.errno == errno.EROFS:
        return "read-only file system"
    if e.errno in (errno.EEXIST, errno.ENOTDIR):
        return "a file is in the way of a folder"
    return e.strerror or str(e)
