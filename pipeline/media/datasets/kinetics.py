"""Kinetics-400/600/700 in the official layout.

``<root>/annotations/{train,val,test}.csv`` with columns ``label,youtube_id,time_start,time_end,split``;
videos named ``<youtube_id>_<start:06d>_<end:06d>.<ext>`` anywhere under the root (``<split>/`` or
per-class folders). The distributed files are already trimmed, so the whole file is decoded; with
``untrimmed=True`` the videos are full-length ``<youtube_id>.<ext>`` and the segment is cut out.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.media.datasets.common import index_videos, read_text, require_dir
from pipeline.media.datasets.manifest import Manifest, VideoRecord

SPLITS = ("train", "val", "test")


def load_kinetics(name: str, root: str, untrimmed: bool = False) -> Manifest:
    base = require_dir(root, f"{name} root")
    ann = base / "annotations"
    require_dir(ann, f"{name} annotation folder")
    rows_by_split: dict[str, list[dict[str, str]]] = {}
    for split in SPLITS:
        path = ann / f"{split}.csv"
        if path.is_file():
            rows_by_split[split] = _read_rows(path)
    if not rows_by_split:
        raise PipelineError(f"no annotation files found: expected {ann}/train.csv, val.csv or test.csv")

    labelled = [r["label"] for rows in rows_by_split.values() for r in rows if r.get("label")]
    class_names = sorted(set(labelled))
    class_index = {c: i for i, c in enumerate(class_names)}
    files = index_videos(base)
    records: list[VideoRecord] = []
    for split, rows in rows_by_split.items():
        for row in rows:
            yid = row["youtube_id"]
            start, end = float(row["time_start"]), float(row["time_end"])
            trimmed_id = f"{yid}_{int(start):06d}_{int(end):06d}"
            if untrimmed:
                path = files.get(yid, "")
                seg = (start, end)
            else:
                path = files.get(trimmed_id, "")
                seg = (math.nan, math.nan)
            label = row.get("label") or ""
            records.append(VideoRecord(
                video_id=trimmed_id, path=path, label=class_index.get(label, -1), split=split,
                start=seg[0], end=seg[1],
            ))
    return Manifest(dataset=name, class_names=class_names, records=records, root=str(base))


def _read_rows(path: Path) -> list[dict[str, str]]:
    reader = csv.DictReader(io.StringIO(read_text(path, "annotation file")))
    required = {"youtube_id", "time_start", "time_end"}
    if reader.fieldnames is None or not required <= set(reader.fieldnames):
        raise PipelineError(
            f"unreadable annotation file {path}: expected columns label,youtube_id,time_start,time_end,split, "
            f"found {reader.fieldnames}"
        )
    rows = list(reader)
    for i, row in enumerate(rows, start=2):
        try:
            float(row["time_start"]), float(row["time_end"])
        except (TypeError, ValueError) as e:
            raise PipelineError(f"unreadable annotation file {path}, line {i}: bad time_start/time_end") from e
    return rows
