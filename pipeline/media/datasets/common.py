"""Helpers shared by the dataset adapters: file indexing and readable class names."""

from __future__ import annotations

import os
import re
from pathlib import Path

from pipeline.core.errors import PipelineError

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".ogv")


def require_dir(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise PipelineError(f"{what} not found: {p}")
    if not p.is_dir():
        raise PipelineError(f"{what} is not a directory: {p}")
    return p


def require_file(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise PipelineError(f"{what} not found: {p}")
    return p


def read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise PipelineError(f"cannot read {what} {path}: {e}") from e


def visible(name: str) -> bool:
    """False for hidden files and folders: ``.DS_Store``, macOS's ``._x.mp4`` resource forks (named like
    videos, holding none), ``.Trash``, ``.git``. Dataset layouts never put a video there."""
    return not name.startswith(".")


def index_videos(root: Path) -> dict[str, str]:
    """Map each video file's stem to its path, for every video-like name under ``root``.

    One walk of the tree (os.scandir, no stat of files) serves every annotation row, which
    matters at Kinetics scale (240k files). Entries that only look like videos (directories
    named ``x.mp4``, dangling symlinks) are indexed too: the frame stage reports why they fail.
    Hidden files and folders are not (:func:`visible`).
    """
    index: dict[str, str] = {}
    stack = [str(root)]
    while stack:
        top = stack.pop()
        try:
            entries = sorted(os.scandir(top), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            name = entry.name
            if not visible(name):
                continue
            lower = name.lower()
            if lower.endswith(VIDEO_EXTENSIONS):
                index.setdefault(os.path.splitext(name)[0], entry.path)
            elif entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
    return index


_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def readable_camel(name: str) -> str:
    """"ApplyEyeMakeup" -> "apply eye makeup" (UCF101 class folders)."""
    return _CAMEL.sub(" ", name).lower()


def readable_snake(name: str) -> str:
    """"brush_hair" -> "brush hair" (HMDB51 class folders)."""
    return " ".join(name.replace("_", " ").split())
