"""Integrity of stage outputs: damaged or missing chunks are found and reported, never read as zeros.

Three layers:
- every array's chunks end with a CRC-32C (:func:`pipeline.storage.store.checksummed`): flipped or truncated
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

from pipeline.core.cachefs import as_path, remove_tree
from pipeline.core.errors import DamagedStore
from pipeline.storage import store
from pipeline.storage.store import read_array as _read
from pipeline.storage.store import values_sha256

DATA_ARRAYS = ("frames", "features")  # the per-video array whose rows must hold data when ok
WHOLE_ARRAYS = ("head", "embeddings")  # outputs without blocks


@dataclass
class Report:
    """What :func:`verify` found in one store."""

    path: str
    damaged_blocks: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    rebuild: bool = False  # damage that recomputing blocks cannot fix: the store must be rebuilt
    files: list[str] = field(default_factory=list)  # a run's damaged files

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "ok": self.ok, "damaged_blocks": self.damaged_blocks, "problems": self.problems,
                "rebuild": self.rebuild, **({"damaged_files": self.files} if self.files else {})}


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


def _block_problem(group: zarr.Group, b: int, status: np.ndarray, recorded: str) -> str | None:
    """Why finished block ``b`` is damaged, or None: its arrays' digest differs from the one its worker
    recorded (stores made before digests: ok rows without data, an unreadable array). The digest covers the
    rows the worker wrote: not the VOID rows padding a block that was short when rows were appended."""
    rows = store.written_slice(group, b)
    names = [n for n in store.BLOCK_ARRAYS if n in group]
    try:
        if recorded:
            values = {n: _read(group, n, rows) for n in names}
            if store.block_digest(values) != recorded:
                return "its arrays differ from what was written (a chunk is missing or altered)"
            return None
        why = _data_problems(group, rows, status)
        for name in names:
            if why is None:
                _read(group, name, rows)
        return why
    except DamagedStore as e:
        return str(e)


def verify(path: str | Path, group: zarr.Group) -> Report:
    """Check one output: every array's metadata and chunk files, checksums, the recorded digests of columns
    and of every finished block, and the bookkeeping."""
    report = Report(str(path))
    if group.attrs.get(store.CHANGE):  # arrays and attributes disagree until the change is finished
        report.problems.append("an append or drop was interrupted: re-run its stage to finish it")
        return report
    keys = store._list_keys(group)
    arrays, metadata = store.open_arrays(group, keys)
    if metadata:  # nothing is trustworthy without its metadata: rebuild
        report.problems += metadata
        report.rebuild = True
        return report
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
        digests = store.as_text(_read(group, store.DIGEST_ARRAY)) if store.DIGEST_ARRAY in group else None
        damaged = set(store.inconsistent_blocks(group, status))
    except DamagedStore as e:  # the bookkeeping itself: nothing can be trusted, rebuild
        report.problems.append(str(e))
        report.rebuild = True
        return report
    lost, lost_columns = store.missing_chunks(group, arrays, keys, status, done)
    if lost_columns:
        report.problems += lost_columns
        report.rebuild = True
    for name, blocks in lost.items():
        damaged.update(blocks)
        report.problems.append(f"{name}: the chunk files of {len(blocks)} finished block(s) are missing "
                               f"(block {blocks[0]}{', ...' if len(blocks) > 1 else ''})")
    n, size = int(group.attrs["n"]), int(group.attrs["block_size"])
    n_blocks = store.n_blocks_of(group)
    has_ok = np.zeros(n_blocks, bool)
    has_ok[np.flatnonzero(status[:n] == store.OK) // size] = True
    # only blocks with an ok video hold data anyone reads: a million failed rows cost no reads
    for b in np.flatnonzero((done[:n_blocks] == 1) & has_ok).tolist():
        if b in damaged:
            continue
        why = _block_problem(group, b, status, digests[b] if digests is not None else "")
        if why is not None:
            damaged.add(b)
            if len(report.problems) < 20:
                rows = store.block_slice(group, b)
                report.problems.append(f"block {b} (rows {rows.start}-{rows.stop - 1}): {why}")
    if damaged and not report.problems:
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
    if group.attrs.get(store.CHANGE):
        store.settle(group)
        return "an interrupted append or drop was undone: re-run its stage to make it again"
    blocks = np.asarray(report.damaged_blocks, np.int64)
    rows = store.block_rows(group, blocks)
    rows = rows[group["status"].oindex[rows] != store.VOID] if rows.size else rows  # padding rows stay VOID
    group[store.DONE_ARRAY].oindex[blocks] = 0  # markers first: an interrupted repair leaves blocks pending
    group["status"].oindex[rows] = store.PENDING
    group["reason"].oindex[rows] = ""
    # their files go too: the stage then writes them afresh (a truncated shard is never read back)
    store.delete_block_chunks(group, blocks)
    return f"{blocks.size} blocks marked pending: re-run its stage to recompute them"


def verify_run(run_dir: str | Path) -> Report:
    """Check a fine-tuning run's folder: ``run.json`` and ``metrics.json`` readable, every ``history.jsonl``
    line a record (a torn last line is what a kill leaves, and resuming drops it), and the checkpoint's
    every record matching its CRC-32 and belonging to this run (its fingerprint is run.json's)."""
    from pipeline.core.files import CHECKPOINT, checkpoint_problem, read_history, read_json

    run_dir = as_path(run_dir)
    report = Report(str(run_dir))

    def damaged(name: str, why: str) -> None:
        report.problems.append(f"{name}: {why}")
        report.files.append(name)

    info: dict = {}
    try:
        info = read_json(run_dir / "run.json", "run settings")
        if not isinstance(info, dict) or "fingerprint" not in info:
            damaged("run.json", "no fingerprint (not a run of this pipeline, or damaged)")
            info = {}
    except DamagedStore:
        damaged("run.json", "unreadable")
    except FileNotFoundError:
        report.problems.append("run.json is missing")
    if (run_dir / "metrics.json").exists():
        try:
            read_json(run_dir / "metrics.json", "run metrics")
        except DamagedStore:
            damaged("metrics.json", "unreadable")
    try:
        read_history(run_dir / "history.jsonl")
    except DamagedStore as e:
        damaged("history.jsonl", str(e).split("(", 1)[-1].rstrip(")").split(")")[0])
    checkpoint = run_dir / CHECKPOINT
    if checkpoint.exists():
        problem = checkpoint_problem(checkpoint)
        if problem:
            damaged(CHECKPOINT, problem)
        elif info.get("fingerprint"):
            import torch

            with checkpoint.open("rb") as f:
                recorded = torch.load(f, map_location="cpu", weights_only=True).get("fingerprint")
            if recorded != info["fingerprint"]:
                damaged(CHECKPOINT, "made by other settings than run.json's (another run's)")
    return report


def repair_run(run_dir: str | Path, report: Report) -> str:
    """Make re-running the run's command redo what ``report`` found damaged. Call under the run's lock.

    A damaged checkpoint cannot be resumed from: the run is deleted (trained again). A damaged run.json or
    metrics.json is deleted: the stage writes it again (a run.json only when the checkpoint is of the same
    settings). A damaged history keeps its good lines: the stage drops the others when it resumes."""
    from pipeline.core.files import CHECKPOINT

    run_dir = as_path(run_dir)
    if report.ok:
        return "nothing to repair"
    if CHECKPOINT in report.files or not (run_dir / CHECKPOINT).exists() and "run.json" in report.files:
        remove_tree(run_dir)
        return "deleted: re-run its `pipeline finetune` command to train it again"
    for name in ("run.json", "metrics.json"):
        if name in report.files:
            (run_dir / name).unlink(missing_ok=True)
    return "damaged files deleted: re-run its `pipeline finetune` command, which resumes and rewrites them"
