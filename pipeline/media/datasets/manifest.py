"""The manifest: what every dataset adapter produces and every stage consumes."""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field

WHOLE = "all"  # the split of every video of a dataset once, whole, one label each: the official zero-shot set


@dataclass(frozen=True)
class VideoRecord:
    """One instance to decode: a whole video file or a [start, end] segment of one.

    ``path`` is empty when the annotation names a video that is not on disk: the frame stage
    records such rows as failed ("missing file") instead of dropping them, so rows stay aligned
    with the official annotation and every absence is reported.
    """

    video_id: str
    path: str
    label: int  # index into the manifest's class names; -1 when unknown (e.g. a test split)
    split: str
    start: float = math.nan  # seconds; NaN = from the beginning
    end: float = math.nan  # seconds; NaN = to the end
    labels: tuple[int, ...] = ()  # every label of a multi-label instance (ActivityNet validation)


@dataclass
class Manifest:
    """The ordered instances of a dataset and its ordered class names."""

    dataset: str
    class_names: list[str]
    records: list[VideoRecord]
    root: str = ""  # paths are fingerprinted relative to it, so a moved dataset keeps its caches
    notes: dict[str, list[str]] = field(default_factory=dict)  # per split: what an adapter decided (for the user)

    def split(self, name: str) -> Manifest:
        """The records of one split, in manifest order (missing files of that split kept too)."""
        return Manifest(
            dataset=self.dataset,
            class_names=self.class_names,
            records=[r for r in self.records if r.split == name],
            root=self.root,
            notes={name: self.notes[name]} if name in self.notes else {},
        )

    def hold_out(self, fraction: float, seed: int = 0) -> Manifest:
        """A copy whose ``val`` split is a seeded ``fraction`` of each class's ``train`` videos.

        For layouts without a validation split (a flat ``<class>/<video>`` folder, a CSV without a
        split column). Each class with at least 2 training videos gives ``round(fraction * n)`` of
        them (at least 1); the draw depends on the seed and the video ids only. A class left without
        training videos (a large fraction of a small class) is named in a warning: nothing trains it.
        """
        import warnings

        import numpy as np

        if not 0.0 < fraction < 1.0:
            raise ValueError(f"the validation fraction must be in (0, 1), not {fraction}")
        if "val" in self.splits:
            raise ValueError("the dataset already has a 'val' split")
        moved: set[int] = set()
        emptied = []
        labels = np.array([r.label if r.split == "train" else -2 for r in self.records])
        for c in sorted(set(labels.tolist()) - {-2}):
            rows = np.flatnonzero(labels == c)
            if rows.size < 2:
                continue
            k = max(1, int(round(fraction * rows.size)))
            rng = np.random.default_rng([seed, c + 1])
            moved.update(rows[rng.permutation(rows.size)[:k]].tolist())
            if k == rows.size and 0 <= c < len(self.class_names):  # (-1: unlabelled rows, not a class)
                emptied.append(self.class_names[c])
        if emptied:
            warnings.warn(f"holding out {fraction:g} of each class's training videos leaves {len(emptied)} class(es) "
                          f"without any (all in 'val'): {', '.join(emptied[:10])}"
                          + (f" and {len(emptied) - 10} more" if len(emptied) > 10 else "")
                          + "; a smaller --val-fraction keeps some for training", stacklevel=2)
        records = [VideoRecord(**{**r.__dict__, "split": "val"}) if i in moved else r
                   for i, r in enumerate(self.records)]
        return Manifest(self.dataset, self.class_names, records, self.root, dict(self.notes))

    @property
    def splits(self) -> list[str]:
        seen: dict[str, None] = {}
        for r in self.records:
            seen.setdefault(r.split, None)
        return list(seen)

    @property
    def multi_label(self) -> bool:
        return any(r.labels for r in self.records)

    def fingerprint(self) -> str:
        """Hash of everything an adapter decided: ids, paths, labels, segments, class names."""
        h = hashlib.sha256()
        h.update(json.dumps(self.class_names).encode())
        for r in self.records:
            path = os.path.relpath(r.path, self.root) if (r.path and self.root) else r.path
            h.update(json.dumps([r.video_id, path, r.label, r.split, _num(r.start), _num(r.end),
                                 list(r.labels)]).encode())
        return h.hexdigest()


def _num(x: float) -> float | None:
    return None if math.isnan(x) else x


def whole_dataset(manifest: Manifest) -> list[VideoRecord]:
    """The ``all`` split of a dataset whose splits partition its videos (UCF101's train + test, Kinetics, csv,
    folders): every labelled record once (the first split that lists a video id keeps it)."""
    seen: set[str] = set()
    out = []
    for r in manifest.records:
        if r.split != WHOLE and r.video_id not in seen and (r.label >= 0 or r.labels):
            seen.add(r.video_id)
            out.append(VideoRecord(r.video_id, r.path, r.label, WHOLE, r.start, r.end, r.labels))
    return out
