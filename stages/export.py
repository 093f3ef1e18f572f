"""Export: a stored output (frames, features, label embeddings, a head) to .npz or .h5."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.models.text import encoder_tag
from pipeline.storage import store
from pipeline.storage.export import Selected, export_arrays
from pipeline.storage.featurestore import CheckedFeatures
from pipeline.storage.framestore import DecodedFrames

from .inputs import open_fresh
from .paths import features_path, frames_path, heads_path, labels_path

FRAME_ARRAYS = ("frames", "frame_index", "timestamp", "video_id", "label", "status", "reason", "box")
FEATURE_ARRAYS = ("features", "video_id", "label", "status", "reason")


def require_finished(group, what: str, stage: str) -> None:  # noqa: ANN001
    """Refuse an unfinished store: its pending rows would be exported as zeros beside the finished ones."""
    pending = store.pending_blocks(group)
    if pending:
        rows = store.rows_in(group, pending)
        raise PipelineError(f"{what} is unfinished ({rows} of {group.attrs['n']} videos pending, or being written): "
                            f"run `pipeline {stage}` to finish it, then export")


def run(cache: Path, what: str, dataset: str, fmt: str, out: str, *, split: str | None = None,
        model_tag: str | None = None, encoder: str | None = None, kind: str | None = None, quiet: bool) -> Path:
    if what in ("frames", "features") and not split:
        raise PipelineError(f"--what {what} needs --split")
    if what in ("features", "head") and not model_tag:
        raise PipelineError(f"--what {what} needs --model")
    if what == "frames":
        group = open_fresh(cache, frames_path(cache, dataset, split), f"frame store for {dataset}/{split}")
        require_finished(group, f"frame store {dataset}/{split}", "frames")
        arrays = {name: group[name] for name in FRAME_ARRAYS if name in group}
        arrays["frames"] = DecodedFrames(group)  # uint8, whatever the store's codec
    elif what == "features":
        group = open_fresh(cache, features_path(cache, dataset, model_tag, split), f"features of {dataset}/{split}")
        require_finished(group, f"features of {dataset}/{split}", "features")
        arrays = {name: group[name] for name in FEATURE_ARRAYS}
        arrays["features"] = CheckedFeatures(group)  # a lost chunk is an error, never zeros marked ok
    elif what == "labels":
        tag = encoder_tag(encoder or "clip", model_tag or "")
        group = open_fresh(cache, labels_path(cache, dataset, tag), f"label embeddings {tag} of {dataset}")
        arrays = {"embeddings": group["embeddings"]}
    elif what == "head":
        if not kind:
            raise PipelineError("--what head needs --head KIND")
        enc = encoder_tag(encoder, model_tag) if kind == "text" and encoder else None
        group = open_fresh(cache, heads_path(cache, dataset, model_tag, kind, enc), f"{kind} head of {dataset}")
        arrays = {"head": group["head"]}
    else:
        raise PipelineError(f"cannot export {what!r}")
    if what in ("frames", "features"):
        # the videos live at the store's snapshot: dropped ones (kept until `pipeline compact`) are left out, and
        # ``row`` says where each exported video is in the store
        rows = np.flatnonzero(store.live_mask(group))
        arrays = {name: Selected(arr, rows) for name, arr in arrays.items()}
        arrays["row"] = rows
    attrs = {"class_names": list(group.attrs["class_names"]), "fingerprint": group.attrs["fingerprint"],
             "dataset": dataset, "split": split or "-", "stage": group.attrs["stage"],
             # Provenance: every attribute of the output (model identity, pretrained tag, precision, frame
             # spec, codec, the input fingerprints and parameters) as one JSON text, plus the main ones flat.
             "provenance": json.dumps(dict(group.attrs), sort_keys=True, default=str)}
    if group.attrs.get("version"):
        attrs["snapshot"] = int(group.attrs["version"])
    for key in ("model_tag", "precision", "encoder_tag", "kind", "frames_fingerprint"):
        if group.attrs.get(key) is not None:
            attrs[key] = str(group.attrs[key])
    for key in ("model", "spec", "codec", "encoder"):
        if group.attrs.get(key) is not None:
            attrs[key] = json.dumps(group.attrs[key], sort_keys=True, default=str)
    return export_arrays(out, fmt, arrays, attrs, quiet=quiet)
