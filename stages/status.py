"""Status: what the cache holds."""

from __future__ import annotations

from pathlib import Path

from pipeline import store


def run(cache: Path) -> list[dict]:
    return [store.summarize(group, path) for path, group in store.find_stores(cache)]
