"""Dataset adapters: each reads a dataset's official annotation files into a :class:`Manifest`."""

from __future__ import annotations

import os

from ..errors import PipelineError
from .activitynet import load_activitynet
from .generic import load_csv, load_folder, load_imagefolder
from .hmdb51 import load_hmdb51
from .kinetics import load_kinetics
from .manifest import Manifest, VideoRecord
from .ucf101 import load_ucf101

DATASETS = ("k400", "k600", "k700", "ucf101", "hmdb51", "anet", "csv", "folder", "imagefolder")

__all__ = ["DATASETS", "Manifest", "VideoRecord", "load_manifest"]


def load_manifest(dataset: str, root: str | None, *, split_id: int = 1, untrimmed: bool = False,
                  name: str | None = None) -> Manifest:
    """Read ``dataset`` (one of :data:`DATASETS`) at ``root``.

    ``name`` renames a ``csv``/``folder`` dataset in the cache (default: the format name).
    """
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
        return load_hmdb51(root, split_id)
    if dataset == "anet":
        return load_activitynet(root)
    if dataset == "csv":
        return load_csv(name or "csv", root)
    if dataset == "imagefolder":
        return load_imagefolder(name or "imagefolder", root)
    return load_folder(name or "folder", root)
