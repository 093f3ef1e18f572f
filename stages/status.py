"""Status: what the cache holds."""

from __future__ import annotations

from pathlib import Path

from pipeline import store

from .inputs import stale_reason


def run(cache: Path) -> list[dict]:
    """A summary of every output, with ``stale``: why it no longer matches its inputs (or null)."""
    entries = []
    for path, group in store.find_stores(cache):
        entry = store.summarize(group, path)
        entry["stale"] = stale_reason(cache, group)
        entries.append(entry)
    return entries
