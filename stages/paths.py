"""Where each stage's output lives in the cache (the only place that knows the layout)."""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.core.cachefs import as_path
from pipeline.core.errors import PipelineError

WHAT = {"dataset": "dataset name", "split": "split name", "model_tag": "model tag", "encoder_tag": "encoder tag",
        "kind": "head kind", "run": "run name"}


def safe_name(value: str, what: str) -> str:
    """``value`` as one path component of the cache, or a one-line error.

    Dataset, split, model and run names come from users and annotation files (a CSV ``split``
    column, an ActivityNet ``subset``): a separator or ``..`` would put a store, and its deletion
    by ``--replace-mismatched``, outside the cache.
    """
    value = str(value)
    bad = (not value or value in (".", "..") or value.startswith(".") or any(c in value for c in "/\\\0")
           or any(ord(c) < 32 for c in value))
    if bad:
        raise PipelineError(f"{WHAT.get(what, what)} {value!r} cannot name a folder of the cache: "
                            "use a plain name (no '/', '\\', leading '.' or control characters)")
    return value


def _under(cache: Path, stage: str, **parts: str) -> Path:
    return as_path(cache).joinpath(stage, *(safe_name(v, k) for k, v in parts.items()))


def frames_path(cache: Path, dataset: str, split: str) -> Path:
    return _under(cache, "frames", dataset=dataset, split=split)


def features_path(cache: Path, dataset: str, model_tag: str, split: str) -> Path:
    return _under(cache, "features", dataset=dataset, model_tag=model_tag, split=split)


def labels_path(cache: Path, dataset: str, encoder_tag: str) -> Path:
    return _under(cache, "labels", dataset=dataset, encoder_tag=encoder_tag)


def heads_path(cache: Path, dataset: str, model_tag: str, kind: str, encoder_tag: str | None = None) -> Path:
    name = f"{kind}-{encoder_tag}" if kind == "text" and encoder_tag else kind
    return _under(cache, "heads", dataset=dataset, model_tag=model_tag, kind=name)


def run_path(cache: Path, run_name: str) -> Path:
    """``runs/<run>``, or ``runs/<run>/s<seed>`` for one seed of a multi-seed run."""
    name, _, seed = str(run_name).partition("/")
    if seed and re.fullmatch(r"s\d+", seed):
        return _under(cache, "runs", run=name, seed=seed)
    return _under(cache, "runs", run=run_name)


def splits_of(cache: Path, stage: str, *parts: str) -> list[str]:
    """Splits that have an output of ``stage`` under cache/<stage>/<parts...>/<split>."""
    base = as_path(cache).joinpath(stage, *parts)
    return sorted(p.name for p in base.iterdir() if not p.name.startswith(".") and (p / "zarr.json").exists()) \
        if base.is_dir() else []


def run_dirs(cache: Path) -> list[Path]:
    """Every run folder under ``runs/``: ``runs/<run>`` and ``runs/<run>/s<seed>`` (several seeds), by their
    run.json or, for a run whose run.json is lost, by a checkpoint or history."""
    base = as_path(cache) / "runs"
    if not base.is_dir():
        return []
    found = set()
    for marker in ("run.json", "checkpoint.pt", "history.jsonl"):
        for pattern in (f"*/{marker}", f"*/s*/{marker}"):
            found.update(p.parent for p in base.glob(pattern))
    return sorted(found, key=str)
