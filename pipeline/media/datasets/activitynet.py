"""ActivityNet v1.3 from ``activity_net.v1-3.min.json``; videos ``v_<id>.<ext>`` anywhere under the root.

Training: every annotated segment is a trimmed instance. Validation: whole videos, all of their
labels kept (multi-hot targets for mAP). Testing: whole videos without labels. ``whole``: the split
``all`` of the official zero-shot protocol (anet_full_for_zeroshot.txt: the 10,024 training and 4,926
validation videos, whole, one label each).
"""

from __future__ import annotations

import json
import math
from collections import Counter

from pipeline.core.errors import PipelineError
from pipeline.media.datasets.common import index_videos, read_text, require_dir, require_file
from pipeline.media.datasets.manifest import WHOLE, Manifest, VideoRecord

ANNOTATION_FILE = "activity_net.v1-3.min.json"
_SUBSETS = {"training": "train", "validation": "val", "testing": "test"}


def one_label(annotations: list[dict]) -> str:
    """The one label of a whole video for the zero-shot set: the label of most of its annotated segments, ties
    going to the first annotated (the official list gives one label a video; its rule is not released)."""
    counts = Counter(a["label"] for a in annotations)
    top = max(counts.values())
    return next(a["label"] for a in annotations if counts[a["label"]] == top)


def load_activitynet(root: str, whole: bool = False) -> Manifest:
    base = require_dir(root, "anet root")
    path = require_file(base / ANNOTATION_FILE, f"ActivityNet annotation file {ANNOTATION_FILE}")
    try:
        database = json.loads(read_text(path, "annotation file"))["database"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise PipelineError(f"unreadable annotation file {path}: {e}") from e

    labels = {a["label"] for v in database.values() for a in v.get("annotations", [])}
    class_names = sorted(labels)
    index = {c: i for i, c in enumerate(class_names)}
    files = index_videos(base)
    records: list[VideoRecord] = []
    every: list[VideoRecord] = []
    several = 0
    for vid in sorted(database):
        entry = database[vid]
        split = _SUBSETS.get(entry.get("subset", ""), entry.get("subset", ""))
        path = files.get(f"v_{vid}", files.get(vid, ""))
        anns = entry.get("annotations", [])
        if whole and split in ("train", "val") and anns:
            several += len({a["label"] for a in anns}) > 1
            every.append(VideoRecord(f"v_{vid}", path, index[one_label(anns)], WHOLE))
        if split == "train":
            for k, a in enumerate(anns):
                start, end = (float(x) for x in a["segment"])
                records.append(VideoRecord(f"v_{vid}_{k}", path, index[a["label"]], split, start, end))
        else:
            all_labels = tuple(sorted({index[a["label"]] for a in anns}))
            first = index[anns[0]["label"]] if anns else -1
            records.append(VideoRecord(f"v_{vid}", path, first, split, math.nan, math.nan, all_labels))
    notes = {WHOLE: [f"{len(every)} whole training and validation videos, one label each; {several} carry "
                     "several labels and keep the label of most of their segments (ties: the first annotated)"]
             } if whole else {}
    return Manifest(dataset="anet", class_names=class_names, records=records + every, root=str(base), notes=notes)
