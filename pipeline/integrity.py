"""Integrity of stage outputs: damaged or missing chunks are found and reported, never read as zeros.

Three layers:
- every array's chunks end with a CRC-32C (:func:`pipeline.store.checksummed`): flipped or truncated
  bytes fail on read;
- columns written once (ids, paths, labels, heads, embeddings) carry the sha256 of their values in
  their attributes, so a deleted chunk (which zarr reads back as the fill value) is caught;
- per-video data is checked against the bookkeeping: a done block's rows are ok or failed, never
  pending; an ok row has data (non-empty JPEG bytes, non-zero features); a failed row has a reason.

:func:`verify` runs every check over a store and returns what it found, block by block;
:func:`repair` marks the damaged blocks pending, so that re-running the stage recomputes them
(outputs without blocks, and stores whose manifest columns are damaged, are deleted instead:
the stage rebuilds them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from . import store
from .cachefs import as_path, remove_tree
from .errors import DamagedStore
from .store import read_array as _read
from .store import values_sha256

DATA_ARRAYS = ("frames", "features")  # the per-video array whose rows must hold data when ok
WHOLE_ARRAYS = ("head", "embeddings")  # outputs without blocks


@dataclass
class Report:
    """What :func:`verify` found in one store."""

    path: str
    damaged_blocks: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    rebuild: bool = False  # damage that recomputing blocks cannot fix: the store must be rebuilt

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "ok": self.ok, "damaged_blocks": self.damaged_blocks, "problems": self.problems,
                "rebuild": self.rebuild}


def check_columns(group: zarr.Group) -> list[str]:
    """Columns whose values no longer match the sha256 recorded when they were written."""
    problems = []
    for name in sorted(group.array_keys()):
        recorded = group[name].attrs.get("sha256")
        if recorded is None:
            continue
        try:
            if values_sha256(_read(group, name)) != recorded:
                problems.append(f"{name}: values differ from those written (a chunk is missing or altered)")
        except DamagedStore as e:
            problems.append(str(e))
    return problems


def _data_problems(group: zarr.Group, rows: slice, status: np.ndarray) -> str | None:
    """Why the data of these rows (one block) is damaged, or None."""
    ok = status[rows] == store.OK
    if not ok.any():
        return None
    name = next((n for n in DATA_ARRAYS if n in group), None)
    if name is None:
        return None
    data = _read(group, name, rows)
    if data.dtype.kind == "O":  # JPEG bytes [m, T]
        empty = np.array([[len(b) == 0 for b in row] for row in data.tolist()], bool).reshape(data.shape[:2])
        if empty[ok].any():
            return f"{name}: ok rows without frames (a missing shard)"
        return None
    flat = data[ok].reshape(int(ok.sum()), -1)
    if not np.any(flat, axis=1).all():
        return f"{name}: ok rows of zeros (a missing chunk)"
    return None


def verify(path: str | Path, group: zarr.Group) -> Report:
    """Check one output: checksums, recorded column digests, bookkeeping and per-block data."""
    report = Report(str(path))
    column_problems = check_columns(group)
    if column_problems:
        report.problems += column_problems
        report.rebuild = True
    for name in WHOLE_ARRAYS:
        if name in group:
            try:
                values = _read(group, name)
                if not np.any(values):
                    report.problems.append(f"{name}: all zeros (a missing chunk)")
                    report.rebuild = True
            except DamagedStore as e:
                report.problems.append(str(e))
                report.rebuild = True
    if "status" not in group or store.DONE_ARRAY not in group:
        return report
    try:
        status = _read(group, "status")
        done = _read(group, store.DONE_ARRAY)
        damaged = set(store.inconsistent_blocks(group, status))
    except DamagedStore as e:  # the bookkeeping itself: nothing can be trusted, rebuild
        report.problems.append(str(e))
        report.rebuild = True
        return report
    for b in np.flatnonzero(done[:store.n_blocks_of(group)]).tolist():
        rows = store.block_slice(group, b)
        try:
            why = _data_problems(group, rows, status)
        except DamagedStore as e:
            why = str(e)
        for name in ("frame_index", "timestamp", "source_frames"):
            if why is None and name in group:
                try:
                    _read(group, name, rows)
                except DamagedStore as e:
                    why = str(e)
        if why is not None:
            damaged.add(b)
            if len(report.problems) < 20:
                report.problems.append(f"block {b} (rows {rows.start}-{rows.stop - 1}): {why}")
    if damaged and not any(p.startswith("block ") for p in report.problems):
        report.problems.append(f"{len(damaged)} finished blocks have rows with no status or reason")
    report.damaged_blocks = sorted(damaged)
    return report


def repair(path: str | Path, report: Report) -> str:
    """Make the next run of the stage recompute what ``report`` found damaged. Call under the writer lock."""
    path = as_path(path)
    if report.ok:
        return "nothing to repair"
    if report.rebuild:
        remove_tree(path)
        return "deleted: re-run its stage to rebuild it"
    group = zarr.open_group(str(path), mode="r+")
    blocks = np.asarray(report.damaged_blocks, np.int64)
    rows = store.block_rows(group, blocks)
    group[store.DONE_ARRAY].oindex[blocks] = 0  # markers first: an interrupted repair leaves blocks pending
    group["status"].oindex[rows] = store.PENDING
    group["reason"].oindex[rows] = ""
    return f"{blocks.size} blocks marked pending: re-run its stage to recompute them"
