"""Where each stage's output lives in the cache (the only place that knows the layout)."""

from __future__ import annotations

from pathlib import Path


def frames_path(cache: Path, dataset: str, split: str) -> Path:
    return Path(cache) / "frames" / dataset / split
