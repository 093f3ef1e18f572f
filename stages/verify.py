"""Verify stage: read every finished block of every output and report (or repair) what is damaged."""

from __future__ import annotations

from pathlib import Path

from pipeline import integrity, store
from pipeline.progress import Progress


def run(cache: Path, *, repair: bool = False, quiet: bool = False) -> list[dict]:
    """One entry per output: ``ok``, the damaged blocks and problems, and with ``repair`` what was done."""
    found = store.find_stores(cache)
    results = []
    with Progress(len(found), "verify", quiet, unit="output") as bar:
        for path, group in found:
            if group is None:
                report = integrity.Report(str(path), problems=["unreadable metadata (zarr.json)"], rebuild=True)
            else:
                report = integrity.verify(path, group)
            entry = report.as_dict()
            if repair and not report.ok:
                with store.writer_lock(path):  # no stage may be writing it meanwhile
                    entry["repair"] = integrity.repair(path, report)
            results.append(entry)
            bar.update(1)
    return results
