"""The frame store: decoded, resized frames of every video of a split, in manifest order.

Arrays (row i = manifest row i): ``frames`` uint8 [N, T, H, W, 3] (zstd), ``frame_index`` int32
[N, T], ``timestamp`` float64 [N, T], ``source_frames`` int32 [N], ``status`` int8 [N]
(0 pending, 1 ok, 2 failed), ``reason`` str [N], and the manifest columns ``video_id``, ``path``,
``label``, ``start``, ``end`` (plus ``targets`` uint8 [N, C] for multi-label splits).
Attributes: ``stage``, ``dataset``, ``split``, ``class_names``, ``spec``, ``n``, ``block_size``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import zarr

from . import store
from .datasets import Manifest
from .video import DecodeError, FrameSpec, decode_clip

PENDING, OK, FAILED = 0, 1, 2


def frames_fingerprint_record(manifest: Manifest, spec: FrameSpec, block_size: int) -> dict:
    """What determines a frame store's content: the split's manifest, the input files' sizes, the spec."""
    sizes = []
    for r in manifest.records:
        try:
            sizes.append(os.stat(r.path).st_size if r.path else -1)
        except OSError:
            sizes.append(-1)
    return {
        "stage": "frames",
        "dataset": manifest.dataset,
        "manifest": manifest.fingerprint(),
        "input_sizes": store.fingerprint({"sizes": sizes}),
        "spec": spec.as_dict(),
        "block_size": block_size,
    }


def init_frame_store(group: zarr.Group, manifest: Manifest, split: str, spec: FrameSpec,
                     block_size: int) -> None:
    """Create the arrays of an empty frame store for ``manifest`` (one split)."""
    records = manifest.records
    n, t = len(records), spec.num_frames
    store.create_per_video(group, "frames", n, block_size, (t, spec.height, spec.width, 3), "uint8")
    store.create_per_video(group, "frame_index", n, block_size, (t,), "int32")
    store.create_per_video(group, "timestamp", n, block_size, (t,), "float64")
    store.create_per_video(group, "source_frames", n, block_size, (), "int32")
    store.create_per_video(group, "status", n, block_size, (), "int8", fill_value=PENDING)
    group.create_array("reason", shape=(n,), dtype=str, chunks=(block_size,), fill_value="")
    store.create_column(group, "video_id", np.array([r.video_id for r in records], dtype=object))
    store.create_column(group, "path", np.array([r.path for r in records], dtype=object))
    store.create_column(group, "label", np.array([r.label for r in records], np.int32))
    store.create_column(group, "start", np.array([r.start for r in records], np.float64))
    store.create_column(group, "end", np.array([r.end for r in records], np.float64))
    if manifest.multi_label:
        targets = np.zeros((n, len(manifest.class_names)), np.uint8)
        for i, r in enumerate(records):
            targets[i, list(r.labels or ((r.label,) if r.label >= 0 else ()))] = 1
        store.create_column(group, "targets", targets)
    store.create_block_markers(group, (n + block_size - 1) // block_size)
    group.attrs.update({
        "stage": "frames", "dataset": manifest.dataset, "split": split,
        "class_names": manifest.class_names, "spec": spec.as_dict(), "n": n, "block_size": block_size,
    })


@dataclass
class BlockResult:
    block: int
    n: int
    failures: list[tuple[str, str, str]]  # (video_id, path, reason)


def extract_block(path: str, block: int, threads: int = 1) -> BlockResult:
    """Decode one block of videos and write it, then mark the block done. Runs in any worker.

    The block's rows are written as whole shards (no read-modify-write), and only then is the
    marker set: a block killed half-way is simply redone on the next run.
    """
    group = zarr.open_group(path, mode="r+")
    spec = FrameSpec(**group.attrs["spec"])
    rows = store.block_slice(group, block)
    paths = group["path"][rows]
    ids = group["video_id"][rows]
    starts, ends = group["start"][rows], group["end"][rows]
    m = len(paths)
    frames = np.zeros((m, spec.num_frames, spec.height, spec.width, 3), np.uint8)
    index = np.zeros((m, spec.num_frames), np.int32)
    stamps = np.zeros((m, spec.num_frames), np.float64)
    counts = np.zeros(m, np.int32)
    status = np.full(m, OK, np.int8)
    reasons = np.array([""] * m, dtype=object)
    failures = []
    for j in range(m):
        try:
            clip = decode_clip(str(paths[j]), spec, float(starts[j]), float(ends[j]), threads=threads)
        except DecodeError as e:
            status[j], reasons[j] = FAILED, str(e)
            failures.append((str(ids[j]), str(paths[j]), str(e)))
            continue
        frames[j], index[j], stamps[j], counts[j] = clip.frames, clip.frame_index, clip.timestamp, \
            clip.source_frames
    group["frames"][rows] = frames
    group["frame_index"][rows] = index
    group["timestamp"][rows] = stamps
    group["source_frames"][rows] = counts
    group["reason"][rows] = reasons.astype(str)
    group["status"][rows] = status
    store.mark_done(group, block)
    return BlockResult(block, m, failures)
