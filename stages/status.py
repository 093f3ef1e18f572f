"""Status: what the cache holds (stores, runs, reports, metrics), and what is damaged or stale."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline import store
from pipeline.cachefs import as_path
from pipeline.errors import DamagedStore

from .inputs import stale_reason


def run(cache: Path) -> list[dict]:
    """One entry per output. Stores: counts, failures, fingerprint, ``kind`` and ``model``, ``stale`` and
    ``damaged`` (why, or null). Runs: state, step, best metric. Reports and metrics files: their path."""
    cache = as_path(cache)
    entries = []
    for path, group in store.find_stores(cache):
        if group is None:
            entry = store.damaged_entry(path, cache, "unreadable metadata (zarr.json)")
        else:
            try:
                entry = store.summarize(group, path)  # with "damaged": finished blocks without status
                entry["stale"] = stale_reason(cache, group)
                entry["kind"] = group.attrs.get("kind") or group.attrs.get("encoder_tag")
                entry["model"] = group.attrs.get("model_tag")
            except (DamagedStore, ValueError, KeyError, TypeError) as e:
                entry = store.damaged_entry(path, cache, str(e))
        entry["name"] = _name(path, cache)
        entries.append(entry)
    return entries + _runs(cache) + _files(cache)


def _name(path: Path, cache: Path) -> str:
    """The output's name under its stage folder: ``toy/val``, ``toy/ViT-B-16-openai/clip-text``."""
    rel = str(path)[len(str(cache)):].strip("/")
    return rel.split("/", 1)[1] if "/" in rel else rel


def _runs(cache: Path) -> list[dict]:
    base = cache / "runs"
    if not base.is_dir():
        return []
    found = []
    for info_file in sorted(list(base.glob("*/run.json")) + list(base.glob("*/s*/run.json")), key=str):
        run_dir = info_file.parent
        entry = {"stage": "run", "name": _name(run_dir, cache), "split": "-", "path": str(run_dir),
                 "state": "started", "step": 0}
        try:
            info = json.loads(info_file.read_text())
            entry.update(dataset=info.get("dataset"), model=info.get("model_tag"), kind=info.get("head"),
                         temporal=info.get("temporal"), backbone=info.get("backbone"),
                         fingerprint=info.get("fingerprint"))
        except (OSError, ValueError) as e:
            entry.update(state="damaged", damaged=f"run.json unreadable ({type(e).__name__})")
            found.append(entry)
            continue
        history = run_dir / "history.jsonl"
        if history.exists():
            steps = [json.loads(line).get("step", 0) for line in history.read_text().splitlines()
                     if line.strip().endswith("}")]
            entry["step"] = max(steps, default=0)
        metrics = run_dir / "metrics.json"
        if metrics.exists():
            m = json.loads(metrics.read_text())
            entry.update(state="complete", steps=m.get("steps"), best_val_top1=m.get("best_val_top1"))
        elif (run_dir / "checkpoint.pt").exists():
            entry["state"] = "partial"
        found.append(entry)
    return found


def _files(cache: Path) -> list[dict]:
    found = []
    report = cache / "report" / "report.md"
    if report.exists():
        found.append({"stage": "report", "name": "report", "split": "-", "path": str(report), "state": "complete"})
    metrics = cache / "metrics"
    for path in sorted(metrics.glob("*.json"), key=str) if metrics.is_dir() else []:
        entry = {"stage": "metrics", "name": path.stem, "split": "-", "path": str(path), "state": "complete"}
        try:
            full = json.loads(path.read_text()).get("full") or {}
            entry["top1"] = full.get("top1")
        except (OSError, ValueError):
            entry["state"] = "damaged"
        found.append(entry)
    return found
