"""HMDB51 in the official layout.

``<root>/<class>/<video>.avi`` and ``<root>/testTrainMulti_7030_splits/<class>_test_split<N>.txt``
with lines ``<video>.avi <tag>``: 1 = train, 2 = test, 0 = unused.
"""

from __future__ import annotations

import os
import re

from pipeline.core.errors import PipelineError
from pipeline.media.datasets.common import read_text, readable_snake, require_dir
from pipeline.media.datasets.manifest import WHOLE, Manifest, VideoRecord

_SPLIT_FILE = re.compile(r"^(?P<cls>.+)_test_split(?P<n>[123])\.txt$")


def load_hmdb51(root: str, split_id: int = 1, whole: bool = False) -> Manifest:
    """Split ``split_id``'s train (tag 1) and test (tag 2) videos; ``whole`` adds the split ``all``: every video
    of the split files, tag 0 (unused by the split) included, as the official hmdb_full_for_zeroshot.txt."""
    if split_id not in (1, 2, 3):
        raise PipelineError(f"HMDB51 has splits 1, 2 and 3, not {split_id}")
    base = require_dir(root, "hmdb51 root")
    splits_dir = require_dir(base / "testTrainMulti_7030_splits", "HMDB51 split folder")
    split_files = {}
    for name in sorted(os.listdir(splits_dir)):
        m = _SPLIT_FILE.match(name)
        if m and int(m["n"]) == split_id:
            split_files[m["cls"]] = splits_dir / name
    if not split_files:
        raise PipelineError(f"no '<class>_test_split{split_id}.txt' files in {splits_dir}")

    folders = sorted(split_files)
    class_names = [readable_snake(f) for f in folders]
    records: list[VideoRecord] = []
    every: list[VideoRecord] = []
    for label, folder in enumerate(folders):
        for n, line in enumerate(read_text(split_files[folder], "split file").splitlines(), start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise PipelineError(f"unreadable {split_files[folder].name} line {n}: {line!r}")
            full = base / folder / parts[0]
            video_id, path = os.path.splitext(parts[0])[0], str(full) if os.path.lexists(full) else ""
            every.append(VideoRecord(video_id=video_id, path=path, label=label, split=WHOLE))
            if parts[1] != "0":
                records.append(VideoRecord(video_id=video_id, path=path, label=label,
                                           split="train" if parts[1] == "1" else "test"))
    # Train rows first, then test rows: stable order independent of class folder listing.
    records.sort(key=lambda r: 0 if r.split == "train" else 1)
    return Manifest(dataset="hmdb51", class_names=class_names, records=records + (every if whole else []),
                    root=str(base))
