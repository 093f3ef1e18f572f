"""Where each stage's output lives in the cache (the only place that knows the layout)."""

from __future__ import annotations

from pathlib import Path


def frames_path(cache: Path, dataset: str, split: str) -> Path:
    return Path(cache) / "frames" / dataset / split


def features_path(cache: Path, dataset: str, model_tag: str, split: str) -> Path:
    return Path(cache) / "features" / dataset / model_tag / split


def labels_path(cache: Path, dataset: str, encoder_tag: str) -> Path:
    return Path(cache) / "labels" / dataset / encoder_tag


def heads_path(cache: Path, dataset: str, model_tag: str, kind: str, encoder_tag: str | None = None) -> Path:
    name = f"{kind}-{encoder_tag}" if kind == "text" and encoder_tag else kind
    return Path(cache) / "heads" / dataset / model_tag / name


def splits_of(cache: Path, stage: str, *parts: str) -> list[str]:
    """Splits that have an output of ``stage`` under cache/<stage>/<parts...>/<split>."""
    base = Path(cache).joinpath(stage, *parts)
    return sorted(p.name for p in base.iterdir() if (p / "zarr.json").exists()) if base.is_dir() else []
