"""Export: a stored split to .npz or .h5."""

from __future__ import annotations

from pathlib import Path

from pipeline import store
from pipeline.export import export_arrays
from pipeline.framestore import DecodedFrames

from .paths import frames_path

FRAME_ARRAYS = ("frames", "frame_index", "timestamp", "video_id", "label", "status", "reason")


def run(cache: Path, what: str, dataset: str, split: str, fmt: str, out: str) -> Path:
    group = store.open_existing(frames_path(cache, dataset, split), f"frame store for {dataset}/{split}")
    arrays = {name: group[name] for name in FRAME_ARRAYS}
    arrays["frames"] = DecodedFrames(group)  # uint8, whatever the store's codec
    attrs = {"class_names": list(group.attrs["class_names"]), "fingerprint": group.attrs["fingerprint"],
             "dataset": dataset, "split": split}
    return export_arrays(out, fmt, arrays, attrs)
