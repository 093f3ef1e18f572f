"""UCF101 in the official layout.

``<root>/UCF-101/<Class>/v_<Class>_gXX_cXX.avi`` and
``<root>/ucfTrainTestlist/{classInd.txt, trainlist0N.txt, testlist0N.txt}``; split N in {1, 2, 3}.
"""

from __future__ import annotations

import os

from pipeline.core.errors import PipelineError
from pipeline.media.datasets.common import read_text, readable_camel, require_dir, require_file
from pipeline.media.datasets.manifest import Manifest, VideoRecord


def load_ucf101(root: str, split_id: int = 1) -> Manifest:
    if split_id not in (1, 2, 3):
        raise PipelineError(f"UCF101 has splits 1, 2 and 3, not {split_id}")
    base = require_dir(root, "ucf101 root")
    videos = require_dir(base / "UCF-101", "UCF101 video folder")
    lists = require_dir(base / "ucfTrainTestlist", "UCF101 split folder")

    folders: list[str] = []
    for n, line in enumerate(read_text(require_file(lists / "classInd.txt", "classInd.txt"),
                                       "classInd.txt").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise PipelineError(f"unreadable classInd.txt line {n}: {line!r} (expected '<index> <Class>')")
        folders.append(parts[1])
    by_folder = {f.lower(): i for i, f in enumerate(folders)}
    class_names = [readable_camel(f) for f in folders]

    records: list[VideoRecord] = []
    for split, fname in (("train", f"trainlist0{split_id}.txt"), ("test", f"testlist0{split_id}.txt")):
        path = require_file(lists / fname, f"UCF101 split list {fname}")
        for n, line in enumerate(read_text(path, fname).splitlines(), start=1):
            if not line.strip():
                continue
            rel = line.split()[0].replace("\\", "/")
            folder = rel.split("/")[0]
            if folder.lower() not in by_folder:
                raise PipelineError(f"{fname} line {n}: class folder {folder!r} is not in classInd.txt")
            full = videos / rel
            records.append(VideoRecord(
                video_id=os.path.splitext(os.path.basename(rel))[0],
                path=str(full) if os.path.lexists(full) else "",
                label=by_folder[folder.lower()], split=split,
            ))
    return Manifest(dataset="ucf101", class_names=class_names, records=records, root=str(base))
