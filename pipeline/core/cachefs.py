"""Where the cache lives: a local folder, or any fsspec URL (``s3://bucket/prefix``, ``gs://``, ``memory://``).

Local paths stay :class:`pathlib.Path`; URLs become universal_pathlib's ``UPath``, which has the same
API over fsspec, so stages join, list, read and write cache entries the same way in both cases.
Zarr opens a store by the string of its path (a local path or a URL; credentials and endpoints come
from the storage's usual environment, e.g. ``AWS_ENDPOINT_URL`` and ``AWS_ACCESS_KEY_ID``).

Only the cache can be remote: datasets, models and exports are local files.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path, PurePath
from typing import Any

from pipeline.core.errors import PipelineError


def is_url(location: Any) -> bool:
    text = str(location)
    return "://" in text and not text.startswith("file://")


def cache_root(location: str | os.PathLike) -> Path:
    """The cache at ``location``: a local folder, or a URL of a storage fsspec knows (else a one-line error)."""
    text = str(location)
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    if not is_url(text):
        return Path(text)
    scheme = text.split("://", 1)[0]
    import fsspec

    try:
        fsspec.get_filesystem_class(scheme)
    except (ValueError, ImportError) as e:
        raise PipelineError(f"--cache {text}: storage {scheme!r} is unknown or not installed "
                            f"({' '.join(str(e).split())[:160]})") from None
    from upath import UPath

    return UPath(text)


def as_path(location: str | os.PathLike | PurePath) -> Path:
    """A cache path object for ``location`` (kept as is when it already is one)."""
    if isinstance(location, PurePath) or type(location).__module__.startswith("upath"):
        return location  # type: ignore[return-value]
    return cache_root(location)


def is_remote(path: Any) -> bool:
    return is_url(path)


def location(path: Any) -> str:
    """The string other processes open ``path`` by: the URL, or the absolute local path."""
    return str(path) if is_remote(path) else str(Path(path).absolute())


def remove_tree(path: Path) -> None:
    """Delete a folder (or object prefix) and everything below it."""
    if is_remote(path):
        path.fs.rm(path.path, recursive=True)
    elif path.is_symlink() or not path.is_dir():
        path.unlink()
    else:
        shutil.rmtree(path)


def walk(root: Path) -> Iterator[tuple[Path, list[str], list[str]]]:
    """``os.walk`` for local and remote folders: (folder, subfolder names, file names); prune subfolders in place."""
    if not is_remote(root):
        for dirpath, dirnames, filenames in os.walk(root):
            yield Path(dirpath), dirnames, filenames
        return
    fs = root.fs
    stack = [root]
    while stack:
        top = stack.pop()
        try:
            entries = fs.ls(top.path, detail=True)
        except FileNotFoundError:
            continue
        dirs = sorted(PurePath(e["name"]).name for e in entries if e["type"] == "directory")
        files = sorted(PurePath(e["name"]).name for e in entries if e["type"] != "directory")
        yield top, dirs, files
        stack.extend(top / d for d in reversed(dirs))
