"""Status: what the cache holds (stores, runs, reports, metrics), and what is damaged or stale.

Damage is what can be seen cheaply (:func:`pipeline.storage.store.cheap_damage`: missing arrays and chunk files,
wrong chunk sizes, altered heads; a run's unreadable files or truncated checkpoint); ``pipeline verify``
reads everything, and each entry says when that last happened (``verified``).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.cachefs import as_path
from pipeline.core.errors import DamagedStore
from pipeline.core.files import read_history, read_json
from pipeline.storage import store

from .inputs import older_snapshot, run_older_snapshot, run_stale_reason, stale_reason
from .paths import run_dirs
from .verified import current, last_verified


def run(cache: Path, all_failures: bool) -> list[dict]:
    """One entry per output. Stores: counts, the first failures (every one with ``all_failures``) and their
    counts by reason, fingerprint, ``kind`` and ``model``, ``stale`` and ``damaged`` (why, or null),
    ``verified`` (when ``pipeline verify`` last read it whole, and what it found). Runs: state, step, best
    metric, ``stale`` and ``damaged``. Reports and metrics files: their path."""
    cache = as_path(cache)
    verified = last_verified(cache)
    entries = []
    for path, group in store.find_stores(cache):
        if group is None:
            entry = store.damaged_entry(path, cache, "unreadable metadata (zarr.json)")
        else:
            try:
                entry = store.summarize(group, path, max_failures=None if all_failures else 20)
                entry["stale"] = stale_reason(cache, group)
                entry["older_snapshot"] = older_snapshot(cache, group)
                entry["kind"] = group.attrs.get("kind") or group.attrs.get("encoder_tag")
                entry["model"] = group.attrs.get("model_tag")
                entry["random_weights"] = bool((group.attrs.get("model") or {}).get("random_weights"))
            except (DamagedStore, ValueError, KeyError, TypeError, OSError) as e:
                entry = store.damaged_entry(path, cache, str(e))
        entry["name"] = _name(path, cache)
        entry["verified"] = current(verified.get(_key(path, cache)), entry.get("fingerprint"))
        entries.append(entry)
    return entries + _runs(cache, verified) + _files(cache)


def _key(path: Path, cache: Path) -> str:
    return str(path)[len(str(cache)):].strip("/")


def _name(path: Path, cache: Path) -> str:
    """The output's name under its stage folder: ``toy/val``, ``toy/ViT-B-16-openai/clip-text``."""
    rel = _key(path, cache)
    return rel.split("/", 1)[1] if "/" in rel else rel


def _runs(cache: Path, verified: dict) -> list[dict]:
    from pipeline.core.files import CHECKPOINT

    found = []
    for run_dir in run_dirs(cache):
        entry = {"stage": "run", "name": _name(run_dir, cache), "split": "-", "path": str(run_dir),
                 "state": "started", "step": 0, "damaged": None, "stale": None,
                 "verified": None}
        problems = []
        info: dict = {}
        try:
            info = read_json(run_dir / "run.json", "run settings")
            entry.update(dataset=info.get("dataset"), model=info.get("model_tag"), kind=info.get("head"),
                         temporal=info.get("temporal"), backbone=info.get("backbone"),
                         fingerprint=info.get("fingerprint"),
                         random_weights=bool((info.get("model") or {}).get("random_weights")))
        except FileNotFoundError:
            problems.append("run.json is missing")
        except DamagedStore:
            problems.append("run.json is unreadable")
        try:
            steps = [r.get("step", 0) for r in read_history(run_dir / "history.jsonl")]
            entry["step"] = max(steps, default=0)
        except DamagedStore:
            problems.append("history.jsonl is damaged")
        if (run_dir / "metrics.json").exists():
            try:
                m = read_json(run_dir / "metrics.json", "run metrics")
                entry.update(state="complete", steps=m.get("steps"), best_val_top1=m.get("best_val_top1"))
            except DamagedStore:
                problems.append("metrics.json is unreadable")
        if (run_dir / CHECKPOINT).exists():
            if entry["state"] != "complete":
                entry["state"] = "partial"
            why = _checkpoint_cheaply(run_dir / CHECKPOINT)
            if why:
                problems.append(f"{CHECKPOINT} {why}")
        entry["verified"] = current(verified.get(_key(run_dir, cache)), info.get("fingerprint"))
        if problems:
            entry.update(state="damaged", damaged="; ".join(problems))
        elif info:
            entry["stale"] = run_stale_reason(cache, info)
            entry["older_snapshot"] = run_older_snapshot(info)
            entry["snapshots"] = {k: v.get("version") for k, v in (info.get("snapshots") or {}).items()}
        found.append(entry)
    return found


def _checkpoint_cheaply(path: Path) -> str | None:
    """Whether a checkpoint's zip directory can be read (a truncated file cannot); its CRCs are ``verify``'s."""
    import zipfile

    try:
        with path.open("rb") as f, zipfile.ZipFile(f):
            return None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        return f"is truncated or not a checkpoint ({type(e).__name__})"


def _files(cache: Path) -> list[dict]:
    found = []
    report = cache / "report" / "report.md"
    if report.exists():
        found.append({"stage": "report", "name": "report", "split": "-", "path": str(report), "state": "complete"})
    metrics = cache / "metrics"
    for path in sorted(metrics.glob("*.json"), key=str) if metrics.is_dir() else []:
        entry = {"stage": "metrics", "name": path.stem, "split": "-", "path": str(path), "state": "complete"}
        try:
            result = read_json(path, "metrics")
            entry["top1"] = (result.get("full") or {}).get("top1")
            # an evaluation of an older snapshot: its number stands for that data (`evaluate --snapshot N`)
            behind = store.snapshots_behind(dict((result.get("snapshots") or {}).get("features") or {}))
            if behind:
                entry["older_snapshot"] = f"evaluated an older snapshot ({'; '.join(behind)})"
        except (DamagedStore, AttributeError):
            entry["state"] = "damaged"
        found.append(entry)
    return found
