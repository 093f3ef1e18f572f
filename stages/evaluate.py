"""Evaluate from the cache: temporal average of cached features, cosine logits against a cached head."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.files import write_atomic
from pipeline.core.progress import Progress
from pipeline.learning import evaluation
from pipeline.media.datasets.manifest import WHOLE
from pipeline.models.text import encoder_tag
from pipeline.storage import store
from pipeline.storage.featurestore import read_rows, video_features

from .heads import open_features
from .inputs import open_fresh, require_fresh
from .paths import heads_path, labels_path, splits_of


def read_subsets(files: list[str]) -> list[list[str]]:
    """One subset per file: class names one a line or comma-separated (K600-style split CSVs)."""
    from pipeline.media.officiallists import resolve_list

    subsets = []
    for f in files:
        path = resolve_list(f)  # a path, or text4vis:k600/k160_labels_split1.csv (downloaded once)
        if not path.is_file():
            raise PipelineError(f"subset file not found: {path}")
        names = []
        for line in path.read_text().splitlines():
            fields = [n.strip() for n in line.split(",") if n.strip()]
            if len(fields) == 2 and fields[0].isdigit():  # the official `id,name` split CSVs
                fields = fields[1:]
            names += [n for n in fields if n.lower() not in ("id", "name", "class", "label")]
        subsets.append(names)
    return subsets


def score_protocols(logits: np.ndarray, labels: np.ndarray, names: list[str], protocols, subset_files) -> dict:
    """{protocol: metrics} for logits [n, C] over ``names`` (an untuned head's or a fine-tuned run's)."""
    result = {}
    for protocol in protocols:
        if protocol == "full":
            result["full"] = evaluation.metrics(logits, labels)
        elif protocol == "half":
            result["half"] = evaluation.half_classes(logits, labels)
        elif protocol == "subsets":
            if not subset_files:
                raise PipelineError("--protocol subsets needs --subsets FILE (one file per class subset)")
            result["subsets"] = evaluation.subsets(logits, labels, names, read_subsets(list(subset_files)))
        else:
            raise PipelineError(f"unknown protocol {protocol!r}; choose full, half or subsets")
    return result


def _names_file(cache: Path, dataset: str, hgroup) -> str | None:  # noqa: ANN001
    """The class-names file a text head's embeddings were made from (None: the dataset's own names)."""
    tag = hgroup.attrs.get("encoder_tag")
    path = labels_path(cache, dataset, tag) if tag else None
    if path is None or not (path / "zarr.json").exists():
        return None
    return store.open_group(path, mode="r").attrs.get("class_names_file")


def require_split(stored: list[str], dataset: str, split: str, stage: str) -> None:
    """``split`` is stored, or a one-line error; for ``all`` (the whole dataset) it says how to make it: the union of
    the stored splits would miss HMDB51's unused videos and ActivityNet's whole training videos."""
    if split == WHOLE and WHOLE not in stored:
        raise PipelineError(f"no {stage} of {dataset}/{WHOLE} (every video of the dataset, as the official zero-shot "
                            f"lists): run `pipeline frames --split {WHOLE}` (and `pipeline features`) first")


def snapshot_record(group, snapshot: int | None = None) -> dict:  # noqa: ANN001
    """What an evaluation records of the store it read: its snapshot (number, hash) and where it is."""
    version = store.resolve_snapshot(group, snapshot) if store.version_of(group) else 0
    return {"path": store.address_of(group), "version": version,
            "hash": store.snapshot_entry(group, version)["hash"] if version else None}


def run(cache: Path, dataset: str, kind: str, model_tag: str, *, split: str, encoder: str | None = None,
        head_dataset: str | None = None, protocols: tuple[str, ...], subset_files: list[str],
        out: Path | None = None, snapshot: int | None = None) -> dict:
    """``snapshot``: evaluate the videos the split had at that snapshot of its store (None: now), against the
    head's classes of that snapshot: an old number, reproduced."""
    require_split(splits_of(cache, "features", dataset, model_tag), dataset, split, "features")
    group = open_features(cache, dataset, model_tag, split)
    feats, labels = video_features(group, snapshot=snapshot)[:2]
    names = list(group.attrs["class_names"])
    enc_tag = encoder_tag(encoder, model_tag) if kind == "text" and encoder else None
    source = head_dataset or dataset
    hpath = heads_path(cache, source, model_tag, kind, enc_tag)
    hgroup = open_fresh(cache, hpath, f"{kind} head of {source}")
    head = hgroup["head"][:]
    head_names = list(hgroup.attrs["class_names"])
    if snapshot is not None and source == dataset:
        # class lists only grow at their end: the classes of that snapshot are the first ones
        known = int(store.snapshot_entry(group, store.resolve_snapshot(group, snapshot)).get("classes") or len(names))
        head, head_names, names = head[:known], head_names[:known], names[:known]
        made_from = (hgroup.attrs.get("inputs") or {}).get("features") or {}
        if made_from and made_from.get("version") != snapshot and made_from.get("split") == split:
            warnings.warn(f"the {kind} head was made from snapshot {made_from.get('version')} of these features, not "
                          f"{snapshot}: `pipeline heads --head {kind} --snapshot {snapshot}` remakes it", stacklevel=2)
    dropped = 0
    if head_names != names:  # a head built from another dataset's class names: match by name
        index = {n: i for i, n in enumerate(head_names)}
        mapped = np.array([index.get(names[y], -1) if y >= 0 else -1 for y in labels])
        dropped = int((mapped < 0).sum())
        keep = mapped >= 0
        feats, labels = feats[keep], mapped[keep]
    else:
        keep = labels >= 0
        feats, labels = feats[keep], labels[keep]
    result: dict = {"dataset": dataset, "split": split, "head": kind, "head_dataset": source, "model": model_tag,
                    "encoder": enc_tag, "videos_without_head_class": dropped,
                    "class_names_file": _names_file(cache, source, hgroup),
                    "snapshots": {"features": {split: snapshot_record(group, snapshot)},
                                  "head": dict(hgroup.attrs.get("inputs") or {})}}
    result.update(score_protocols(evaluation.cosine_logits(feats, head), labels, head_names, protocols, subset_files))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, json.dumps(result, indent=2))  # never a 0-byte file on a full disk
    return result


def run_trained(cache: Path, run_name: str, *, dataset: str | None = None, split: str,
                views: tuple[int, int], batch_size: int, workers: int, device: str | None = None,
                data_device: str, out: Path | None = None, quiet: bool, progress: bool,
                protocols: tuple[str, ...], subset_files: list[str], test_scale: int,
                snapshot: int | None = None) -> dict:
    """Evaluate a fine-tuned run: single or multi-view (temporal clips x spatial crops, the short side first
    scaled to ``test_scale`` per 224 px of input, as test.py), on its own dataset's classes or, zero-shot, on
    another dataset's (its cached head of the run's kind, e.g. clip-text); ``snapshot``: the videos the split had
    at that snapshot of its store."""
    import torch

    from pipeline.learning import distributed
    from pipeline.learning.clips import CachedFeatureSet, FrameClipSet, usable_rows
    from pipeline.learning.training import cosines_of, predict, rank_and_world

    from .finetune import batched_data_path, normalization, open_frames
    from .runs import load_run

    dev = distributed.setup(device)
    batched = batched_data_path(data_device, dev)
    model, info, clip = load_run(cache, run_name)
    dataset = dataset or info["dataset"]
    temporal, spatial = views
    if dataset != info["dataset"]:
        if info["head"] not in ("clip-text", "text", "coop"):
            raise PipelineError(f"run {run_name!r} has a {info['head']} head, fitted to {info['dataset']}'s classes; "
                                "zero-shot transfer to another dataset needs a text head (clip-text or text)")
        from pipeline.models.classifier import TextTowerHead
        from pipeline.models.coop import CoOpHead

        if isinstance(model.head, (TextTowerHead, CoOpHead)):  # the run's text tower embeds the new class names
            from .labels import class_names_of

            model.head.set_classes(class_names_of(cache, dataset)[0])
        else:
            enc = encoder_tag(info["encoder"], info["model_tag"]) if info["head"] == "text" else None
            hgroup = store.open_existing(heads_path(cache, dataset, info["model_tag"], info["head"], enc),
                                         f"{info['head']} head of {dataset} (run `pipeline heads -d {dataset}` first)")
            require_fresh(cache, hgroup, f"{info['head']} head of {dataset}")
            model.head.weight = torch.from_numpy(hgroup["head"][:]).float()
    frozen = info["backbone"] == "frozen"
    if frozen and spatial != 1:
        raise PipelineError("a frozen-backbone run evaluates cached features: spatial views need the frame "
                            "store and a fully fine-tuned run (use --views Cx1)")
    # --split all: the stored whole-dataset split (`frames --split all`), the official zero-shot set
    stored = splits_of(cache, "features", dataset, info["model_tag"]) if frozen else splits_of(cache, "frames",
                                                                                              dataset)
    require_split(stored, dataset, split, "features" if frozen else "frames")
    norm = normalization(clip, test_scale) if not frozen else None
    if frozen:
        group = open_features(cache, dataset, info["model_tag"], split)
    else:
        group, path = open_frames(cache, dataset, split)
    if dataset == info["dataset"] and info.get(split) and group.attrs["fingerprint"] != info[split]:
        warnings.warn(f"the {'features' if frozen else 'frames'} of {dataset}/{split} were rebuilt since run "
                      f"{run_name} was trained: this evaluates the new ones (re-train it for numbers of one "
                      "snapshot)", stacklevel=2)
    read = {split: snapshot_record(group, snapshot)}
    if frozen:
        rows, labels = usable_rows(group, snapshot=snapshot)
        data = CachedFeatureSet(read_rows(group, rows), labels, info["frames"], 0, views=temporal)
    else:
        rows, labels = usable_rows(group, multilabel="targets" in group, snapshot=snapshot)
        data = FrameClipSet(str(path), rows, labels, info["frames"], norm, 0, views=(temporal, spatial),
                            batched=batched)
    model.to(dev)
    rank, world = rank_and_world()
    # Rank 0's share of the clips (every rank scores about as many): hours at Kinetics size with 4x3 views.
    with Progress(len(range(rank, len(data), world)) if progress else 0, f"evaluate {run_name} {temporal}x{spatial}",
                  quiet or rank != 0 or not progress, unit="video") as bar:
        logits, y = predict(model, data, batch_size, dev, workers, on_batch=bar.update)
    if y.ndim == 2:  # mAP_official at the official code's 100 x cos, whatever scale the run trained
        scores = evaluation.multilabel_metrics(logits, y, cosines=cosines_of(model, logits))
    else:
        scores = evaluation.metrics(logits, y)
    result = {"run": run_name, "dataset": dataset, "split": split, "views": f"{temporal}x{spatial}",
              "trained_on": info["dataset"], "head": info["head"], **scores,
              **({"test_scale": test_scale, "test_short_side": norm.test_size} if norm is not None else {}),
              "snapshots": {"evaluated": read, "trained": info.get("snapshots")}}
    others = [p for p in protocols if p != "full"]
    if others:  # zero-shot protocols on the run's logits: a class subset scores its own columns only
        if y.ndim == 2:
            raise PipelineError("the half and subsets protocols need single-label videos (not a multi-label set)")
        result.update(score_protocols(logits, y, list(group.attrs["class_names"]), others, subset_files))
    if out is not None and distributed.is_main():
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, json.dumps(result, indent=2))
    return result
