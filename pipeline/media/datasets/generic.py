"""Generic layouts: a CSV list (``csv``) or one folder per class (``folder``)."""

from __future__ import annotations

import csv
import io
import math
import os
import warnings
from collections import Counter
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.media.datasets.common import VIDEO_EXTENSIONS, read_text, readable_snake, require_dir, visible
from pipeline.media.datasets.manifest import Manifest, VideoRecord


def load_csv(name: str, root: str) -> Manifest:
    """A CSV with columns ``path,label[,split][,start,end]``.

    ``root`` is the CSV file itself or a folder holding ``videos.csv``; relative paths are
    resolved against the CSV's folder. Classes are ordered as in ``classes.txt`` beside the CSV
    (one name a line) when present, else sorted by name. Without a split column every row is
    ``train``.
    """
    path = Path(root)
    if path.is_dir():
        path = path / "videos.csv"
    if not path.is_file():
        raise PipelineError(f"CSV list not found: {path}")
    reader = csv.DictReader(io.StringIO(read_text(path, "CSV list")))
    fields = set(reader.fieldnames or [])
    if not {"path", "label"} <= fields:
        raise PipelineError(f"unreadable CSV list {path}: needs columns path,label[,split][,start,end], "
                            f"found {reader.fieldnames}")
    rows = list(reader)
    if not rows:
        raise PipelineError(f"CSV list {path} has a header but no rows")
    for n, row in enumerate(rows, start=2):
        if None in row or any(row.get(k) is None for k in ("path", "label")):
            raise PipelineError(f"{path} line {n}: {len([v for v in row.values() if v is not None])} fields, "
                                f"the header has {len(reader.fieldnames or [])}")
        if not row["path"].strip():
            raise PipelineError(f"{path} line {n}: empty path")
    classes_file = path.parent / "classes.txt"
    if classes_file.is_file():
        class_names = [c.strip() for c in read_text(classes_file, "class list").splitlines() if c.strip()]
    else:
        class_names = sorted({r["label"] for r in rows if r["label"]})
    index = {c: i for i, c in enumerate(class_names)}
    records = []
    seen: set[str] = set()
    for n, row in enumerate(rows, start=2):
        label = row["label"]
        if label and label not in index:
            raise PipelineError(f"{path} line {n}: label {label!r} is not in {classes_file}")
        rel = row["path"]
        full = rel if os.path.isabs(rel) else str(path.parent / rel)
        try:
            start = float(row["start"]) if row.get("start") else math.nan
            end = float(row["end"]) if row.get("end") else math.nan
        except ValueError as e:
            raise PipelineError(f"{path} line {n}: bad start/end") from e
        vid = os.path.splitext(rel)[0].replace(os.sep, "/")
        if not math.isnan(start):
            vid = f"{vid}_{start:g}_{end:g}"
        if vid in seen:
            raise PipelineError(f"{path} line {n}: duplicate video {vid!r}")
        seen.add(vid)
        records.append(VideoRecord(
            video_id=vid, path=full if os.path.lexists(full) else "", label=index.get(label, -1),
            split=row.get("split") or "train", start=start, end=end,
        ))
    return Manifest(dataset=name, class_names=class_names, records=records, root=str(path.parent))


def class_folders(base: Path, extensions: tuple[str, ...], hint: str = "",
                  kind: str = "videos") -> tuple[list[str], list[VideoRecord]]:
    """(class folder names, records) of ``<base>/<class>/<file>`` or ``<base>/{train,val,test}/<class>/<file>``.

    Hidden files and folders are skipped (see :func:`visible`). A folder without a single file of
    ``extensions`` in any split is not a class (a warning names it): it would be a class no video
    teaches, counted by every head and metric. A video id is ``<split>/<class>/<stem>``, or
    ``<split>/<class>/<file name>`` for files that share a stem (``x.mp4`` and ``x.webm``): ids key
    the stores' rows, so two files must never share one.
    """
    split_dirs = [s for s in ("train", "val", "test") if (base / s).is_dir()]
    layout = [(s, base / s) for s in split_dirs] if split_dirs else [("train", base)]
    listed = []  # (split, class folder, its file names)
    for split, top in layout:
        for folder in sorted(d.name for d in top.iterdir() if d.is_dir() and visible(d.name)):
            names = sorted(f for f in os.listdir(top / folder) if visible(f) and f.lower().endswith(extensions))
            listed.append((split, top / folder, names))
    folders = sorted({d.name for _, d, names in listed if names})
    empty = sorted({d.name for _, d, _ in listed} - set(folders))
    if empty:
        warnings.warn(f"{len(empty)} class folder(s) under {base} hold no {kind} and are not classes: "
                      + ", ".join(empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else ""),
                      stacklevel=2)
    if not folders:
        raise PipelineError(f"no class folders with {kind} under {base}{hint}")
    index = {f: i for i, f in enumerate(folders)}
    records = []
    seen: dict[str, str] = {}
    for split, folder, names in listed:
        stems = Counter(os.path.splitext(f)[0] for f in names)
        for f in names:
            stem = os.path.splitext(f)[0]
            vid = f"{split}/{folder.name}/{stem if stems[stem] == 1 else f}"
            if vid in seen:  # e.g. "x.mp4.avi" beside "x.mp4" and "x.webm": no readable id tells them apart
                raise PipelineError(f"{folder / f} and {seen[vid]} would share the video id {vid!r}: rename one")
            seen[vid] = str(folder / f)
            records.append(VideoRecord(video_id=vid, path=str(folder / f), label=index[folder.name], split=split))
    return folders, records


def load_folder(name: str, root: str) -> Manifest:
    """``<root>/<class>/<video>`` or ``<root>/{train,val,test}/<class>/<video>``."""
    base = require_dir(root, f"{name} root")
    folders, records = class_folders(base, VIDEO_EXTENSIONS)
    return Manifest(dataset=name, class_names=[readable_snake(f) for f in folders], records=records,
                    root=str(base))


IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
# Class-name files an ImageNet-style folder may hold: "<folder> <name>[, <other names>]" a line.
NAME_FILES = ("LOC_synset_mapping.txt", "synset_words.txt", "classes.txt")


def load_imagefolder(name: str, root: str) -> Manifest:
    """Images as one-frame videos (App. A): ``<root>/{train,val,test}/<class>/<image>`` (ImageNet's layout,
    ``train/<wnid>/*.JPEG``) or ``<root>/<class>/<image>``. Class names: the first name after the folder
    in ``LOC_synset_mapping.txt`` / ``synset_words.txt`` / ``classes.txt`` at the root, else the folder."""
    base = require_dir(root, f"{name} root")
    folders, records = class_folders(base, IMAGE_EXTENSIONS, " (an ImageNet val/ folder must be sorted into "
                                                            "val/<wnid>/ first)", kind="images")
    mapping: dict[str, str] = {}
    for file in NAME_FILES:
        if (base / file).is_file():
            for line in read_text(base / file, "class-name file").splitlines():
                key, _, names = line.strip().partition(" ")
                if key and names:
                    mapping[key] = names.split(",")[0].strip()
            break
    return Manifest(dataset=name, class_names=[mapping.get(f) or readable_snake(f) for f in folders],
                    records=records, root=str(base))
