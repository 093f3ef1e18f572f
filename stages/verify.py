"""Verify stage: read every finished block of every output, and every run's files, and report (or repair)
what is damaged; ``status`` shows when each was last verified."""

from __future__ import annotations

from pathlib import Path

from pipeline.core.cachefs import as_path
from pipeline.core.files import read_json
from pipeline.core.progress import Progress
from pipeline.storage import integrity, store

from . import verified
from .paths import run_dirs


def run(cache: Path, *, repair: bool, quiet: bool) -> list[dict]:
    """One entry per output and per run: ``ok``, the damaged blocks and problems, and with ``repair`` what was
    done (damaged blocks marked pending and their chunk files deleted; outputs and runs that cannot be
    recomputed block by block deleted, for their stage to rebuild)."""
    cache = as_path(cache)
    found = store.find_stores(cache)
    runs = run_dirs(cache)
    results, seen = [], []
    with Progress(len(found) + len(runs), "verify", quiet, unit="output") as bar:
        for path, group in found:
            if group is None:
                report = integrity.Report(str(path), problems=["unreadable metadata (zarr.json)"], rebuild=True)
            else:
                report = integrity.verify(path, group)
            entry = {"kind": "store", **report.as_dict()}
            if repair and not report.ok:
                with store.writer_lock(path):  # no stage may be writing it meanwhile
                    entry["repair"] = integrity.repair(path, report)
            results.append(entry)
            seen.append((_key(path, cache), report.ok, group.attrs.get("fingerprint") if group is not None else None))
            bar.update(1)
        for run_dir in runs:
            report = integrity.verify_run(run_dir)
            entry = {"kind": "run", **report.as_dict()}
            if repair and not report.ok:
                with store.writer_lock(run_dir):  # not while it trains
                    entry["repair"] = integrity.repair_run(run_dir, report)
            results.append(entry)
            seen.append((_key(run_dir, cache), report.ok, _run_fingerprint(run_dir)))
            bar.update(1)
    verified.record(cache, [s for s in seen if s[2] is not None])
    return results


def _key(path: Path, cache: Path) -> str:
    return str(path)[len(str(cache)):].strip("/")


def _run_fingerprint(run_dir: Path) -> str | None:
    try:
        info = read_json(run_dir / "run.json", "run settings")
        return info.get("fingerprint") if isinstance(info, dict) else None
    except Exception:  # noqa: BLE001 - a damaged or deleted run.json has no fingerprint to record
        return None
