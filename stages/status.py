"""Status: what the cache holds."""

from __future__ import annotations

from pathlib import Path

from pipeline import store
from pipeline.cachefs import as_path
from pipeline.errors import DamagedStore

from .inputs import stale_reason


def run(cache: Path) -> list[dict]:
    """A summary of every output, with ``stale``: why it no longer matches its inputs (or null)."""
    entries = []
    for path, group in store.find_stores(cache):
        if group is None:
            entries.append(store.damaged_entry(path, as_path(cache), "unreadable metadata (zarr.json)"))
            continue
        try:
            entry = store.summarize(group, path)
            bad = store.inconsistent_blocks(group) if "status" in group else []
            entry["damaged"] = f"{len(bad)} finished blocks without status" if bad else None
        except (DamagedStore, ValueError, KeyError, TypeError) as e:
            entries.append(store.damaged_entry(path, as_path(cache), str(e)))
            continue
        entry["stale"] = stale_reason(cache, group)
        entries.append(entry)
    return entries
