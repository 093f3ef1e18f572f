"""The Zarr store: one v3 group per stage output, fingerprinted, locked, resumable by blocks.

Contract (see DESIGN.md):
- the group's ``fingerprint`` attribute hashes everything that determines its content; opening
  an existing output with a different fingerprint is an error unless the caller asks to replace it;
- work is split in blocks aligned with the shards of the per-video arrays; a block's data is
  written first, then its entry in the small ``block_done`` array (one chunk per block, so each
  block has exactly one writer and the marker never depends on whether zarr skipped a fill chunk);
- one writer process per store, enforced with ``fcntl.flock`` on ``<store>/.lock``: the lock dies
  with its process, so a killed run never blocks its own resume.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.errors import UnstableSpecificationWarning

from .errors import FingerprintMismatch, PipelineError, StoreLocked

# Variable-length strings and bytes are not yet frozen in the Zarr v3 spec; zarr-python reads
# and writes them fine and we pin zarr's minor version, so the warning is noise for our users.
warnings.filterwarnings("ignore", category=UnstableSpecificationWarning)

FORMAT_VERSION = 1
LOCK_NAME = ".lock"
DONE_ARRAY = "block_done"


def fingerprint(record: dict[str, Any]) -> str:
    """sha256 of a JSON-able record (sorted keys), with the store format version mixed in."""
    payload = json.dumps({"format_version": FORMAT_VERSION, **record}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


@contextmanager
def writer_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold the one-writer lock of the store at ``path`` (created if needed)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise StoreLocked(f"{path} is being written by another process (pid {holder}); "
                              "wait for it to finish or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def open_output(path: str | os.PathLike, fp: str, params: dict[str, Any], *, replace_mismatched: bool,
                init: Callable[[zarr.Group], None]) -> zarr.Group:
    """Open the output at ``path`` for writing, creating it with ``init`` when needed.

    A store whose fingerprint matches is resumed. One made with other parameters is an error,
    or is deleted and rebuilt with ``replace_mismatched``. A store whose creation was interrupted
    (no fingerprint yet) holds no finished work and is rebuilt. Call under :func:`writer_lock`.
    """
    path = Path(path)
    if (path / "zarr.json").exists():
        group = zarr.open_group(str(path), mode="r+")
        old = group.attrs.get("fingerprint")
        if old == fp:
            return group
        if old is not None and not replace_mismatched:
            changed = _changed_keys(group.attrs.get("params", {}), params)
            raise FingerprintMismatch(
                f"{path} was made with different parameters or inputs"
                + (f" (changed: {', '.join(changed)})" if changed else "")
                + "; re-run with --replace-mismatched to rebuild it, or use another --cache")
        _clear(path)
    group = zarr.open_group(str(path), mode="w")
    init(group)
    # Written last: a store without a fingerprint is an unfinished creation.
    group.attrs.update({"params": params, "format_version": FORMAT_VERSION, "fingerprint": fp})
    return group


def open_existing(path: str | os.PathLike, what: str) -> zarr.Group:
    """Open a finished-or-resumable output for reading, with a one-line error when absent."""
    path = Path(path)
    if not (path / "zarr.json").exists():
        raise PipelineError(f"no {what} at {path}: run the stage that makes it first")
    group = zarr.open_group(str(path), mode="r")
    if "fingerprint" not in group.attrs:
        raise PipelineError(f"{what} at {path} was never fully created: re-run its stage")
    return group


def _clear(path: Path) -> None:
    """Delete a store's content but keep the lock file (held by us)."""
    for entry in path.iterdir():
        if entry.name == LOCK_NAME:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}")
    return keys


# ---- arrays ---------------------------------------------------------------------------------

def create_per_video(group: zarr.Group, name: str, n: int, block: int, inner: tuple[int, ...], dtype: Any,
                     fill_value: Any = 0, compress: bool = True, chunk_per_video: bool = True) -> zarr.Array:
    """A per-video array [n, *inner], sharded by blocks of ``block`` videos, one chunk per video.

    Shards are the unit of work and of writing; a chunk per video keeps random reads (training
    loaders) cheap. Small metadata arrays, and arrays read whole (``chunk_per_video=False``:
    features), use plain chunks of one block.
    """
    shape = (n, *inner)
    kwargs: dict[str, Any] = {"compressors": [ZstdCodec(level=3)] if compress else None}
    if chunk_per_video and inner and int(np.prod(inner)) * np.dtype(dtype).itemsize >= 4096:
        kwargs.update(chunks=(1, *inner), shards=(block, *inner))
    else:
        kwargs.update(chunks=(block, *inner))
    return group.create_array(name, shape=shape, dtype=dtype, fill_value=fill_value, **kwargs)


def create_column(group: zarr.Group, name: str, values: np.ndarray) -> zarr.Array:
    """A per-video column written once at creation (ids, paths, labels)."""
    values = np.asarray(values)
    dtype = str if values.dtype.kind in "UTO" else values.dtype
    chunk = max(1, min(len(values), 65536))
    arr = group.create_array(name, shape=values.shape, dtype=dtype, chunks=(chunk, *values.shape[1:]),
                             fill_value="" if dtype is str else 0)
    if len(values):
        # via a list: numpy's StringDType (zarr's string reads) does not cast to fixed-width str
        arr[...] = np.array(values.tolist(), dtype=np.str_) if dtype is str else values
    return arr


def create_block_markers(group: zarr.Group, n_blocks: int) -> zarr.Array:
    return group.create_array(DONE_ARRAY, shape=(max(1, n_blocks),), dtype="uint8", chunks=(1,),
                              fill_value=0, compressors=None)


def pending_blocks(group: zarr.Group) -> list[int]:
    done = group[DONE_ARRAY][:]
    n_blocks = n_blocks_of(group)
    return [b for b in range(n_blocks) if not done[b]]


def mark_done(group: zarr.Group, block: int) -> None:
    group[DONE_ARRAY][block] = 1


def n_blocks_of(group: zarr.Group) -> int:
    n, block = int(group.attrs["n"]), int(group.attrs["block_size"])
    return (n + block - 1) // block


def rows_in(group: zarr.Group, blocks: list[int]) -> int:
    """How many videos the given blocks hold (the last block may be short)."""
    return sum(block_slice(group, b).stop - block_slice(group, b).start for b in blocks)


def block_slice(group: zarr.Group, block: int) -> slice:
    n, size = int(group.attrs["n"]), int(group.attrs["block_size"])
    return slice(block * size, min(n, (block + 1) * size))


def summarize(group: zarr.Group, path: str | os.PathLike, max_failures: int | None = None) -> dict[str, Any]:
    """Counts and failures of a per-video store (any stage with ``status``/``reason`` arrays).

    Outputs that are not per video (label embeddings, heads) count their rows, all ok.
    """
    attrs = group.attrs
    if "status" not in group:
        rows = int(attrs.get("rows", len(attrs.get("class_names", []))))
        return {"stage": attrs.get("stage"), "dataset": attrs.get("dataset"), "split": attrs.get("split", "-"),
                "path": str(path), "total": rows, "ok": rows, "failed": 0, "pending": 0, "complete": True,
                "fingerprint": attrs.get("fingerprint"), "failures": []}
    status = group["status"][:]
    failed_rows = np.flatnonzero(status == 2)
    shown = failed_rows if max_failures is None else failed_rows[:max_failures]
    ids, paths, reasons = group["video_id"], group["path"], group["reason"]
    failures = [{"video_id": str(ids[i]), "path": str(paths[i]), "reason": str(reasons[i])}
                for i in shown.tolist()]
    return {
        "stage": attrs.get("stage"), "dataset": attrs.get("dataset"), "split": attrs.get("split"),
        "path": str(path), "total": int(status.size), "ok": int((status == 1).sum()),
        "failed": int(failed_rows.size), "pending": int((status == 0).sum()),
        "complete": not pending_blocks(group), "fingerprint": attrs.get("fingerprint"),
        "failures": failures,
    }


def find_stores(root: str | os.PathLike) -> list[tuple[Path, zarr.Group]]:
    """Every stage output (a Zarr group with a ``stage`` attribute) under ``root``, sorted by path."""
    found = []
    root = Path(root)
    if not root.is_dir():
        return found
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if "zarr.json" in filenames:
            try:
                group = zarr.open_group(dirpath, mode="r")
            except Exception:  # not a group (an array's metadata): keep walking
                continue
            if "stage" in group.attrs:
                found.append((Path(dirpath), group))
                dirnames[:] = []  # do not descend into its arrays
    return found
