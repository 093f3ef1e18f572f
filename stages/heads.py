"""Heads stage: the classifier heads of the paper (and a prototype head), as [C, D] matrices in the cache."""

from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.models.heads import lda_head, orthogonal_head, prototype_head, random_head, sample_per_class
from pipeline.models.text import encoder_tag
from pipeline.storage import store
from pipeline.storage.featurestore import video_features

from .inputs import open_fresh
from .labels import class_names_of
from .paths import features_path, heads_path, labels_path, splits_of


def open_features(cache: Path, dataset: str, model_tag: str, split: str | None = None):
    splits = splits_of(cache, "features", dataset, model_tag)
    if not splits:
        raise PipelineError(f"no features of {dataset!r} with model {model_tag!r}: run `pipeline features` first")
    split = split or ("train" if "train" in splits else splits[0])
    if split not in splits:
        raise PipelineError(f"no features for {dataset}/{split} with model {model_tag}; stored: {', '.join(splits)}")
    what = f"features {dataset}/{split}"
    group = open_fresh(cache, features_path(cache, dataset, model_tag, split), what)
    if store.pending_blocks(group):
        raise PipelineError(f"features {dataset}/{split} are unfinished: re-run `pipeline features` first")
    return group


@contextlib.contextmanager
def _printed_warnings():
    """The block's warnings as ``warning: ...`` lines on stderr, each message once, also when the block raises."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for message in dict.fromkeys(str(w.message) for w in caught):
                print(f"warning: {message}", file=sys.stderr)


def run(cache: Path, dataset: str, kind: str, model_tag: str, *, encoder: str | None = None, seed: int,
        per_class: int, solver: str, shrinkage: float | str | None = None, split: str,
        replace_mismatched: bool, snapshot: int | None = None) -> tuple[Path, np.ndarray, list[str]]:
    """Build the ``kind`` head. It records the snapshots of what it was made from (``inputs``): a head made
    from an older snapshot (the dataset grew since) is rebuilt by the next run without asking, being the same
    head of newer data. ``snapshot`` (lda, prototype): sample from the videos the features had at that
    snapshot, with that snapshot's classes: the head an older evaluation used, made again."""
    class_names, names_fp = class_names_of(cache, dataset)
    record: dict = {"stage": "heads", "kind": kind, "class_names": names_fp}
    extra: dict = {}
    inputs: dict = {}
    enc_tag = None
    if snapshot is not None and kind not in ("lda", "prototype"):
        raise PipelineError(f"--snapshot chooses the videos a head is fitted to: lda and prototype heads only, not "
                            f"{kind} (its rows follow the class names; `evaluate --snapshot` keeps that snapshot's)")
    if kind in ("clip-text", "text"):
        if kind == "clip-text":
            enc_tag = encoder_tag("clip", model_tag)
        else:
            if not encoder or not encoder.startswith("hf:"):
                raise PipelineError("--head text needs --encoder hf:NAME_OR_PATH (the labels stage's text encoder)")
            enc_tag = encoder_tag(encoder, model_tag)
        what = f"label embeddings ({enc_tag})"
        labels = open_fresh(cache, labels_path(cache, dataset, enc_tag), what)
        embedded = list(labels.attrs["class_names"])
        if embedded != class_names:
            raise PipelineError(f"the {what} of {dataset} cover {len(embedded)} of its {len(class_names)} classes "
                                f"(it has new ones): re-run `pipeline labels`, which embeds the new names only")
        head = labels["embeddings"][:]
        record["labels"] = labels.attrs["fingerprint"]
        inputs["labels"] = {"path": store.address_of(labels), "classes": len(embedded),
                            "version": store.version_of(labels)}
    elif kind in ("random", "orthogonal"):
        d = int(open_features(cache, dataset, model_tag).attrs["embed_dim"])
        head = random_head(len(class_names), d, seed) if kind == "random" else orthogonal_head(len(class_names), d,
                                                                                                seed)
        record.update(seed=seed, width=d)
    elif kind in ("lda", "prototype"):
        group = open_features(cache, dataset, model_tag, split)
        version = store.resolve_snapshot(group, snapshot) if store.version_of(group) else 0
        # the classes of the features' snapshot (class lists only grow at their end; features may lag their frames)
        class_names = list(group.attrs["class_names"])
        if snapshot is not None:
            class_names = class_names[:int(store.snapshot_entry(group, version).get("classes") or len(class_names))]
        record["class_names"] = store.fingerprint({"class_names": class_names})
        c = len(class_names)
        feats, labels, rows = video_features(group, snapshot=snapshot)
        usable = labels >= 0
        feats, labels, rows = feats[usable], labels[usable], rows[usable]
        with _printed_warnings():
            picked = sample_per_class(labels, c, per_class, seed, min_per_class=2 if kind == "lda" else 1,
                                      class_names=class_names)
        with _printed_warnings():  # the LDA fit runs twice (its rounding check): each warning is said once
            if kind == "lda":
                head = lda_head(feats[picked], labels[picked], c, solver=solver, shrinkage=shrinkage)
            else:
                head = prototype_head(feats[picked], labels[picked], c)
        record.update(seed=seed, per_class=per_class, features=group.attrs["fingerprint"], split=split,
                      solver=solver if kind == "lda" else None, shrinkage=shrinkage if kind == "lda" else None,
                      features_snapshot=version)
        extra["sample_video_id"] = group["video_id"][:][rows[picked]]
        inputs["features"] = {"path": store.address_of(group), "split": split, "version": version,
                              "hash": store.snapshot_entry(group, version)["hash"] if version else None}
    else:
        raise PipelineError(f"unknown head kind {kind!r}")
    path = write_head(cache, dataset, model_tag, kind, head, class_names, record, replace_mismatched=replace_mismatched,
                      enc_tag=enc_tag, extra=extra, seed=seed, inputs=inputs)
    return path, head, class_names


def write_head(cache: Path, dataset: str, model_tag: str, kind: str, head: np.ndarray, class_names: list[str],
               record: dict, *, replace_mismatched: bool, enc_tag: str | None = None, extra: dict | None = None,
               seed: int | None = None, inputs: dict | None = None) -> Path:
    """Store ``head`` [C, D] as the ``kind`` head of ``dataset``; ``record`` is what made it (its fingerprint),
    ``inputs`` the snapshots of the stores it was made from."""
    path = heads_path(cache, dataset, model_tag, kind, enc_tag if kind == "text" else None)

    def init(g):
        store.create_small(g, "head", head.astype(np.float32))
        for name, values in (extra or {}).items():
            store.create_column(g, name, np.asarray(values, dtype=object))
        g.attrs.update({"stage": "heads", "dataset": dataset, "split": "-", "kind": kind, "class_names": class_names,
                        "model_tag": model_tag, "encoder_tag": enc_tag, "width": int(head.shape[1]),
                        "seed": seed, "rows": len(class_names), "inputs": inputs or {}})

    with store.writer_lock(path):
        # a head of an older snapshot (new videos or classes since) is this head of newer data: rebuilt
        store.open_output(path, store.fingerprint(record), {k: v for k, v in record.items() if k != "stage"},
                          replace_mismatched=replace_mismatched, init=init,
                          renewable=("class_names", "features_snapshot"))
    return path
