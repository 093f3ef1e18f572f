"""Reading the cache from Python: open an output by its path and get arrays and a table of its videos.

    >>> from pipeline import open_frames, open_features, open_head, open_run
    >>> val = open_features("cache/features/ucf101/ViT-B-16-openai/test")
    >>> val.table().query("status == 'failed'")          # pandas: video_id, path, label, class_name, ...
    >>> x, y, rows = val.video_features()                  # temporal means of the ok videos, float32
    >>> head = open_head("cache/heads/ucf101/ViT-B-16-openai/clip-text").weights   # [C, D] float32

Every output is also a Zarr v3 group with named dimensions: ``xarray.open_zarr(path)`` opens it.
Opening checks what the stages check (the output exists, is finished being created, and its
bookkeeping and small arrays are intact); whether it is stale against rebuilt inputs is checked by
the commands, which know the cache's layout (``pipeline status``).

Stores live from snapshot to snapshot (videos added, dropped, redone): reads serve the rows live at the
current snapshot, or at the one named (``snapshot=N``); dropped rows stay in the arrays until
``pipeline compact`` but are never served. ``older_snapshot()`` says when an output was made from an
older snapshot of its inputs than they have now:

    >>> val.snapshot                                       # {"version": 3, "hash": "..."}
    >>> x, y, rows = val.video_features(snapshot=2)        # the videos of snapshot 2
    >>> open_head("cache/heads/ucf101/ViT-B-16-openai/lda").older_snapshot()
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from pipeline.core.cachefs import as_path
from pipeline.core.errors import PipelineError
from pipeline.storage import store

STATUS_NAMES = {store.PENDING: "pending", store.OK: "ok", store.FAILED: "failed", store.VOID: "void"}


@dataclass
class Output:
    """One stage output: its Zarr group, attributes and (for per-video stores) a table of its videos."""

    path: str
    group: zarr.Group

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    @property
    def fingerprint(self) -> str:
        return str(self.group.attrs["fingerprint"])

    @property
    def class_names(self) -> list[str]:
        return list(self.group.attrs.get("class_names", []))

    @property
    def snapshot(self) -> dict[str, Any]:
        """{"version", "hash"} of the output's current snapshot (version 0: made before snapshots)."""
        return store.snapshot_of(self.group)

    @property
    def snapshots(self) -> list[dict[str, Any]]:
        """Every snapshot the output has had: version, hash, rows, live videos, added, dropped, classes."""
        return [dict(e) for e in self.group.attrs.get("snapshots") or []]

    def older_snapshot(self) -> list[str]:
        """The inputs this output was made from that have another snapshot now (e.g. ``["frames: snapshot 2,
        now 3"]``): the output is older than its data (not invalid; re-running its stage brings it up)."""
        attrs = self.group.attrs
        recorded = dict(attrs.get("inputs") or {})
        if attrs.get("stage") == "features" and attrs.get("frames_path") and attrs.get("version"):
            recorded["frames"] = {"path": attrs["frames_path"], "version": attrs["version"]}
        return store.snapshots_behind(recorded)

    def live_rows(self, snapshot: int | None = None) -> np.ndarray:
        """Row indices of the videos live at ``snapshot`` (None: the current one)."""
        return np.flatnonzero(store.live_mask(self.group, snapshot))

    def table(self, snapshot: int | None = None, dropped: bool = False):
        """A pandas DataFrame, one row per video live at ``snapshot`` (None: the current one; ``dropped``: the
        dropped ones too): video_id, path, label, class_name, status, reason, added_in, dropped_in, indexed by
        the store's row."""
        import pandas as pd

        g = self.group
        if "status" not in g:
            raise PipelineError(f"{self.path} is not a per-video output (it has no videos)")
        status = g["status"][:]
        rows = self.live_rows(snapshot)
        if dropped:
            rows = np.flatnonzero(status != store.VOID)
        label = g["label"][:][rows]
        names = np.array(self.class_names + [""], dtype=object)  # label -1 (unlabelled) -> ""
        lifecycle = {name: g[name][:][rows] if name in g else np.zeros(rows.size, np.int32)
                     for name in (store.ADDED, store.DROPPED)}
        return pd.DataFrame({
            "video_id": store.as_text(g["video_id"][:][rows]), "path": store.as_text(g["path"][:][rows]),
            "label": label, "class_name": names[np.where(label >= 0, label, len(names) - 1)],
            "status": [STATUS_NAMES.get(int(s), str(s)) for s in status[rows]],
            "reason": store.as_text(g["reason"][:][rows]), **lifecycle,
        }, index=pd.Index(rows, name="row"))


@dataclass
class Frames(Output):
    def frames(self, rows: slice | int) -> np.ndarray:
        """Decoded uint8 frames [n, T, H, W, 3] (or [T, H, W, 3] for one row)."""
        from pipeline.storage.framestore import read_frames

        return read_frames(self.group, rows)


@dataclass
class Features(Output):
    @property
    def features(self) -> zarr.Array:
        """float16 [N, T, D], read lazily (index it)."""
        return self.group["features"]

    def video_features(self, snapshot: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(temporal means float32 [n, D], labels [n], row indices) of the videos that are ok and live at
        ``snapshot`` (None: the current one)."""
        from pipeline.storage.featurestore import video_features

        return video_features(self.group, snapshot=snapshot)


@dataclass
class Head(Output):
    @property
    def weights(self) -> np.ndarray:
        """The classifier [C, D] float32 (label embeddings: the same, from ``embeddings``)."""
        name = "head" if "head" in self.group else "embeddings"
        return store.read_array(self.group, name)


@dataclass
class Run:
    """A fine-tuning run's folder: settings, metrics, history and weights."""

    path: str

    @property
    def info(self) -> dict[str, Any]:
        return json.loads((as_path(self.path) / "run.json").read_text())

    @property
    def metrics(self) -> dict[str, Any]:
        path = as_path(self.path) / "metrics.json"
        return json.loads(path.read_text()) if path.exists() else {}

    @property
    def history(self) -> list[dict[str, Any]]:
        path = as_path(self.path) / "history.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]

    @property
    def snapshots(self) -> dict[str, Any]:
        """The snapshots of its stores the run trained on: {"train": {"version", "hash", "path"}, ...}."""
        return dict(self.info.get("snapshots") or {})

    def older_snapshot(self) -> list[str]:
        """Its stores that have another snapshot now (videos added or dropped since it was trained)."""
        return store.snapshots_behind(self.snapshots)

    def state_dict(self) -> dict[str, Any]:
        """The model's weights at the last checkpoint (tensors only)."""
        from pipeline.learning.training import CHECKPOINT, load_checkpoint

        return load_checkpoint(as_path(self.path) / CHECKPOINT)["model"]


def _open(path: str | os.PathLike, stage: str, what: str, cls: type[Output], partial: bool = False) -> Output:
    group = store.open_existing(path, what)
    if group.attrs.get("stage") != stage:
        raise PipelineError(f"{path} holds {group.attrs.get('stage')!r} output, not {stage!r}")
    pending = store.pending_blocks(group) if "status" in group else []
    if pending:
        rows, n = store.rows_in(group, pending), int(group.attrs["n"])
        if not partial:
            raise PipelineError(f"{what} {path} is unfinished ({rows} of {n} videos pending, or being written): "
                                f"finish it with `pipeline {stage}`, or open it with partial=True to read the "
                                f"{n - rows} finished ones")
        import warnings

        warnings.warn(f"{what} {path} is unfinished: reading the {n - rows} finished of its {n} videos "
                      f"({rows} pending are left out)", stacklevel=3)
    return cls(str(path), group)


def open_frames(path: str | os.PathLike, partial: bool = False) -> Frames:
    """A frame store, e.g. ``cache/frames/<dataset>/<split>``. An unfinished one is refused unless
    ``partial`` (then a warning says how many videos are left out)."""
    return _open(path, "frames", "frame store", Frames, partial)  # type: ignore[return-value]


def open_features(path: str | os.PathLike, partial: bool = False) -> Features:
    """A feature store, e.g. ``cache/features/<dataset>/<model>/<split>``. An unfinished one is refused unless
    ``partial`` (then a warning says how many videos are left out)."""
    return _open(path, "features", "feature store", Features, partial)  # type: ignore[return-value]


def open_head(path: str | os.PathLike) -> Head:
    """A head (``cache/heads/<dataset>/<model>/<kind>``) or label embeddings (``cache/labels/...``)."""
    group = store.open_existing(path, "head")
    if group.attrs.get("stage") not in ("heads", "labels"):
        raise PipelineError(f"{path} holds {group.attrs.get('stage')!r} output, not a head or label embeddings")
    return Head(str(path), group)


def open_run(path: str | os.PathLike) -> Run:
    """A run folder, e.g. ``cache/runs/<run>``."""
    if not (as_path(path) / "run.json").exists():
        raise PipelineError(f"no run at {path} (no run.json)")
    return Run(str(path))
