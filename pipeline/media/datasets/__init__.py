"""Dataset adapters: each reads a dataset's official annotation files into a :class:`Manifest`."""

from __future__ import annotations

import os

from pipeline.core.errors import PipelineError
from pipeline.core.settings import FORMATS
from pipeline.media.datasets.activitynet import load_activitynet
from pipeline.media.datasets.generic import load_csv, load_folder, load_imagefolder
from pipeline.media.datasets.hmdb51 import load_hmdb51
from pipeline.media.datasets.kinetics import load_kinetics
from pipeline.media.datasets.manifest import WHOLE, Manifest, VideoRecord, whole_dataset
from pipeline.media.datasets.ucf101 import load_ucf101

DATASETS = FORMATS  # the settings declare the formats (--format's choices); each has an adapter below

__all__ = ["DATASETS", "WHOLE", "Manifest", "VideoRecord", "load_manifest"]


def load_manifest(dataset: str, root: str | None, *, split_id: int = 1, untrimmed: bool = False,
                  name: str | None = None, whole: bool = False) -> Manifest:
    """Read ``dataset`` (one of :data:`DATASETS`) at ``root``.

    ``name`` renames a ``csv``/``folder`` dataset in the cache (default: the format name). ``whole`` adds the
    split ``all``: every video of the dataset once, whole, with one label, as the official zero-shot lists
    (``*_full_for_zeroshot.txt``: UCF101's 13,320, HMDB51's 6,766 with its unused videos, ActivityNet's 14,950
    training and validation videos).
    """
    manifest = _load(dataset, root, split_id=split_id, untrimmed=untrimmed, name=name, whole=whole)
    if whole and dataset not in ("hmdb51", "anet"):  # those two know their whole set themselves
        manifest.records = manifest.records + whole_dataset(manifest)
    return manifest


def _load(dataset: str, root: str | None, *, split_id: int, untrimmed: bool, name: str | None,
          whole: bool) -> Manifest:
    if dataset not in DATASETS:
        raise PipelineError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
    if not root:
        raise PipelineError(f"no root given for dataset {dataset!r}: pass --root DIR or set data.root in params.yaml")
    # Absolute, so that the stores' path columns work from any directory and on remote workers.
    root = os.path.abspath(os.path.expanduser(root))
    if dataset in ("k400", "k600", "k700"):
        return load_kinetics(dataset, root, untrimmed=untrimmed)
    if dataset == "ucf101":
        return load_ucf101(root, split_id)
    if dataset == "hmdb51":
        return load_hmdb51(root, split_id, whole=whole)
    if dataset == "anet":
        return load_activitynet(root, whole=whole)
    if dataset == "csv":
        return load_csv(name or "csv", root)
    if dataset == "imagefolder":
        return load_imagefolder(name or "imagefolder", root)
    return load_folder(name or "folder", root)
