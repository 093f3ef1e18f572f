"""Import stage: per-video feature files made by other extractors, as a feature store.

Each video of the dataset's manifest is looked up as ``<dir>/<video_id>.npy`` or ``.h5`` (dataset
``features``), shaped [T_i, D]; T_i frames are resampled to ``num_frames`` by segment centres. A
missing or unreadable file marks the video failed, as in every other stage.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import h5py
import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.progress import Progress
from pipeline.media.datasets import load_manifest
from pipeline.media.sampling import segment_indices
from pipeline.storage import store

from .frames import DatasetArgs, with_validation
from .paths import features_path


def read_feature_file(folder: Path, video_id: str) -> np.ndarray:
    for ext in (".npy", ".h5"):
        path = folder / f"{video_id}{ext}"
        if path.is_file():
            if ext == ".npy":
                arr = np.load(path, allow_pickle=False)
            else:
                with h5py.File(path, "r") as f:
                    if "features" not in f:
                        raise ValueError(f"{path.name} has no 'features' dataset")
                    arr = f["features"][:]
            if arr.ndim == 1:
                arr = arr[None]
            if arr.ndim != 2 or arr.shape[0] == 0:
                raise ValueError(f"{path.name} has shape {arr.shape}, expected [frames, dim]")
            return arr
    raise FileNotFoundError("no feature file (.npy or .h5)")


def _init_imported(g, *, part, split: str, feats: np.ndarray, status: np.ndarray, reasons: list[str],
                   model_tag: str, source: Path, block_size: int) -> None:
    n, num_frames, width = feats.shape
    block_size = store.bounded_block(block_size)
    store.create_per_video(g, "features", n, block_size, (num_frames, width), "float16",
                           chunk_per_video=False, compress=False)
    g["features"][:] = feats
    store.create_bookkeeping(g, n, block_size)
    g["status"][:] = status
    g["reason"][:] = np.array(reasons, dtype=np.str_)
    store.create_column(g, "video_id", np.array([r.video_id for r in part.records], dtype=object))
    store.create_column(g, "path", np.array([r.path for r in part.records], dtype=object))
    store.create_column(g, "label", np.array([r.label for r in part.records], np.int32))
    # one snapshot: imported features are made whole again when their files change (their fingerprint)
    lifecycle = store.create_lifecycle(g, n, np.array([r.video_id for r in part.records], dtype=object),
                                       classes=len(part.class_names))
    g[store.DONE_ARRAY][:] = 1
    g.attrs.update({"stage": "features", "dataset": part.dataset, "split": split, "class_names": part.class_names,
                    "model": {"imported_from": source.name}, "model_tag": model_tag, "precision": "imported",
                    "embed_dim": int(width), "num_frames": int(num_frames), "n": n, "block_size": block_size,
                    **lifecycle})
    g[store.DIGEST_ARRAY][:] = np.array([store.block_digest({"features": feats[store.block_slice(g, b)]})
                                         for b in range(store.n_blocks_of(g))], dtype=np.str_)


def run(cache: Path, data: DatasetArgs, source: Path, model_tag: str, num_frames: int, *, block_size: int,
        replace_mismatched: bool, quiet: bool) -> list[dict]:
    if not source.is_dir():
        raise PipelineError(f"feature folder not found: {source}")
    manifest = load_manifest(data.dataset, data.root, split_id=data.split_id, untrimmed=data.untrimmed,
                             name=data.name)
    manifest.dataset = data.cache_name
    manifest = with_validation(manifest, data)
    summaries = []
    for split in manifest.splits:
        part = manifest.split(split)
        ids = [r.video_id for r in part.records]
        sizes = []
        for v in ids:
            found = [source / f"{v}{e}" for e in (".npy", ".h5") if (source / f"{v}{e}").is_file()]
            sizes.append(os.path.getsize(found[0]) if found else -1)
        record = {"stage": "features", "imported": True, "manifest": part.fingerprint(),
                  "files": store.fingerprint({"ids": ids, "sizes": sizes}), "num_frames": num_frames}
        path = features_path(cache, data.cache_name, model_tag, split)
        n = len(ids)
        feats, status, reasons, width = None, np.full(n, 2, np.int8), [""] * n, None
        with Progress(n, f"import {data.cache_name}/{split}", quiet) as bar:
            for i, v in enumerate(ids):
                try:
                    arr = read_feature_file(source, v)
                    if width is None:
                        width = arr.shape[1]
                        feats = np.zeros((n, num_frames, width), np.float16)
                    if arr.shape[1] != width:
                        raise ValueError(f"width {arr.shape[1]} differs from the first file's {width}")
                    feats[i] = arr[segment_indices(arr.shape[0], num_frames)]
                    status[i] = 1
                except (OSError, ValueError) as e:
                    reasons[i] = f"import: {e}"
                bar.update(1)
        if feats is None:
            raise PipelineError(f"no readable feature file for any video of {data.cache_name}/{split} in {source}")

        with store.writer_lock(path):
            group = store.open_output(
                path, store.fingerprint(record), dict(record), replace_mismatched=replace_mismatched,
                init=partial(_init_imported, part=part, split=split, feats=feats, status=status, reasons=reasons,
                             model_tag=model_tag, source=source, block_size=block_size))
        summary = store.summarize(group, path)
        summary["errors"] = []
        summaries.append(summary)
    return summaries
