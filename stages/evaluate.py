"""Evaluate from the cache: temporal average of cached features, cosine logits against a cached head."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline import evaluation, store
from pipeline.errors import PipelineError
from pipeline.featurestore import video_features
from pipeline.models.text import encoder_tag

from .heads import open_features
from .paths import heads_path


def read_subsets(files: list[str]) -> list[list[str]]:
    """One subset per file: class names one a line or comma-separated (K600-style split CSVs)."""
    subsets = []
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise PipelineError(f"subset file not found: {path}")
        names = [n.strip() for line in path.read_text().splitlines() for n in line.split(",") if n.strip()]
        subsets.append([n for n in names if n.lower() not in ("name", "class", "label")])
    return subsets


def run(cache: Path, dataset: str, kind: str, model_tag: str, *, split: str = "val", encoder: str | None = None,
        head_dataset: str | None = None, protocols: tuple[str, ...] = ("full",), subset_files: list[str] = (),
        out: Path | None = None) -> dict:
    group = open_features(cache, dataset, model_tag, split)
    feats, labels, _ = video_features(group)
    names = list(group.attrs["class_names"])
    enc_tag = encoder_tag(encoder, model_tag) if kind == "text" and encoder else None
    source = head_dataset or dataset
    hpath = heads_path(cache, source, model_tag, kind, enc_tag)
    hgroup = store.open_existing(hpath, f"{kind} head of {source}")
    head = hgroup["head"][:]
    head_names = list(hgroup.attrs["class_names"])
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
                    "encoder": enc_tag, "videos_without_head_class": dropped}
    for protocol in protocols:
        if protocol == "full":
            result["full"] = evaluation.metrics(evaluation.cosine_logits(feats, head), labels)
        elif protocol == "half":
            result["half"] = evaluation.half_classes(feats, labels, head)
        elif protocol == "subsets":
            if not subset_files:
                raise PipelineError("--protocol subsets needs --subsets FILE (one file per class subset)")
            result["subsets"] = evaluation.subsets(feats, labels, head, head_names, read_subsets(list(subset_files)))
        else:
            raise PipelineError(f"unknown protocol {protocol!r}; choose full, half or subsets")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    return result
