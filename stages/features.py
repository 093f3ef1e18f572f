"""Features stage: CLIP image embeddings of every stored frame of each split."""

from __future__ import annotations

from pathlib import Path

from pipeline.core.cachefs import location
from pipeline.core.errors import FingerprintMismatch, PipelineError
from pipeline.core.parallel import run_blocks, threads_per_worker
from pipeline.core.progress import Progress, say
from pipeline.models.clip import ModelSpec, identity_changes, load_clip, same_model
from pipeline.storage import store
from pipeline.storage.featurestore import (
    extract_feature_block,
    features_fingerprint_record,
    follow_frames,
    init_feature_store,
    precision_for,
    remember_model,
)

from .paths import features_path, frames_path, splits_of


def run(cache: Path, dataset: str, spec: ModelSpec, splits: list[str] | None, *, device: str,
        batch_size: int, workers: int, scheduler_address: str | None = None,
        replace_mismatched: bool, quiet: bool, compile_: bool) -> list[dict]:
    available = splits_of(cache, "frames", dataset)
    if not available:
        raise PipelineError(f"no frame store for {dataset!r} under {cache}: run `pipeline frames` first")
    chosen = splits or available
    missing = [s for s in chosen if s not in available]
    if missing:
        raise PipelineError(f"no frame store for {dataset}/{missing[0]}; stored splits: {', '.join(available)}")
    spec = spec.absolute()  # workers may run in other directories
    precision = precision_for(device)
    finished = {split: done for split in chosen
                if (done := _already_done(cache, dataset, spec, split, precision, batch_size, compile_)) is not None}
    if len(finished) == len(chosen):  # a no-op re-run: nothing to compute, so no model to load
        return [finished[split] for split in chosen]
    for split in chosen:
        if not replace_mismatched:
            _refuse_foreign_key(cache, dataset, spec, split)  # before a model of gigabytes loads
    say(f"loading {spec.name} on {device} ...", quiet)
    clip = load_clip(spec, device)  # fail fast on a bad model, and learn its identity
    remember_model(spec, device, clip)  # in-process blocks reuse it (dask workers load their own)
    summaries = []
    for split in chosen:
        if split in finished:
            summaries.append(finished[split])
            continue
        fpath = frames_path(cache, dataset, split)
        # Shared lock on the frame store for the whole run: it cannot be rebuilt under us.
        with store.reader_lock(fpath):
            summaries.append(_features_of_split(cache, dataset, spec, split, fpath, clip, precision, device,
                                                batch_size, workers, scheduler_address, replace_mismatched, quiet,
                                                compile_))
    return summaries


def _already_done(cache: Path, dataset: str, spec: ModelSpec, split: str, precision: str,
                  batch_size: int, compile_: bool = False) -> dict | None:
    """The summary of a finished feature store that this run would leave exactly as it is (same frame
    store, model files, flags, precision and batch size), else None. Checked without loading the model."""
    path = features_path(cache, dataset, spec.tag, split)
    fpath = frames_path(cache, dataset, split)
    if not (path / "zarr.json").exists() or not (fpath / "zarr.json").exists():
        return None
    try:
        group = store.open_group(path, mode="r")
        frames_attrs = store.open_group(fpath, mode="r").attrs
        frames_fp = frames_attrs.get("fingerprint")
    except (store.DamagedStore, OSError):
        return None
    attrs = group.attrs
    if attrs.get("version", 0) != frames_attrs.get("version", 0) or attrs.get("n") != frames_attrs.get("n"):
        return None  # the frame store has another snapshot: its new rows are to be encoded
    recorded = dict(attrs.get("model_spec") or {})
    params = dict(attrs.get("params") or {})
    if (not attrs.get("fingerprint") or attrs.get("frames_fingerprint") != frames_fp
            or params.get("precision") != precision or params.get("batch_size") != batch_size
            or bool(params.get("compile", False)) != compile_
            or (recorded.get("name"), recorded.get("pretrained"), recorded.get("quick_gelu"))
            != (spec.name, spec.pretrained, spec.quick_gelu)
            or not same_model(spec, dict(attrs.get("model") or {})) or store.pending_blocks(group)):
        return None
    summary = store.summarize(group, path, max_failures=20)
    summary["errors"] = []
    return summary


def _refuse_foreign_key(cache: Path, dataset: str, spec: ModelSpec, split: str) -> None:
    """Refuse, before loading the model, a model key whose features are another model's (its recorded name,
    weights or flags differ); --replace-mismatched rebuilds them, as for any other change."""
    path = features_path(cache, dataset, spec.tag, split)
    if not (path / "zarr.json").exists():
        return
    try:
        attrs = store.open_group(path, mode="r").attrs
    except (store.DamagedStore, OSError):
        return
    recorded = dict(attrs.get("model_spec") or {})
    if not recorded:
        return  # imported features: no model to compare
    changed = identity_changes(spec, dict(attrs.get("model") or {}))
    if changed:
        theirs = f"{recorded.get('name')}" + (f" {recorded['pretrained']}" if recorded.get("pretrained") else "")
        raise FingerprintMismatch(
            f"the model key {spec.tag!r} of {dataset} holds features of another model ({theirs}; changed: "
            f"{', '.join(changed)}): give this one its own --model-key NAME, or --replace-mismatched if the old "
            "features are of no use (they are deleted)")


# Parameters of a feature store that describe the model itself, not how it was run.
MODEL_IDENTITY_KEYS = ("weights_sha256", "config_sha256", "model", "pretrained", "quick_gelu", "preprocess",
                       "image_size", "embed_dim")


def _features_of_split(cache: Path, dataset: str, spec: ModelSpec, split: str, fpath: Path, clip, precision: str,
                       device: str, batch_size: int, workers: int, scheduler_address: str | None,
                       replace_mismatched: bool, quiet: bool, compile_: bool = False) -> dict:
    frames_group = store.open_existing(fpath, f"frame store {dataset}/{split}")
    if store.pending_blocks(frames_group):
        raise PipelineError(f"frame store {dataset}/{split} is unfinished: re-run `pipeline frames` first")
    path = features_path(cache, dataset, spec.tag, split)
    record = features_fingerprint_record(frames_group, clip.identity, precision, batch_size, compile_)
    params = {"model": spec.name, "pretrained": spec.pretrained, "precision": precision, "batch_size": batch_size,
              "frames_fingerprint": frames_group.attrs["fingerprint"], **clip.identity,
              **({"compile": True} if compile_ else {})}
    with store.writer_lock(path):
        try:
            group = store.open_output(
                path, store.fingerprint(record), params, replace_mismatched=replace_mismatched,
                init=lambda g: init_feature_store(g, frames_group, clip, spec, precision, location(fpath)))
        except FingerprintMismatch as e:
            if not any(k in str(e) for k in MODEL_IDENTITY_KEYS):
                raise
            # Another model's features under this key: never advise deleting them.
            raise FingerprintMismatch(
                f"{path} was made with different parameters or inputs: the model key {spec.tag!r} holds features "
                f"of another model ({str(e).split('(changed: ')[-1].split(')')[0]}); give this one its own "
                "--model-key NAME, or --replace-mismatched if the old features are of no use (they are deleted)"
            ) from None
        # the frame rows it lacks (videos added since) become its own pending rows; encoded rows stay as they are
        before, old_version = store.rows_of(group), store.version_of(group)
        entry = follow_frames(group, frames_group)
        pending = store.pending_blocks(group)
        threads = threads_per_worker(workers) if (workers > 1 or scheduler_address) else 0
        with Progress(store.rows_in(group, pending), f"features {dataset}/{split}", quiet) as bar, \
                store.Ledger(group) as ledger:
            def done(r: store.BlockResult) -> None:
                ledger.record(r)
                bar.update(r.n)
            in_process = workers <= 1 and not scheduler_address
            # in one process blocks run in order: each reads the next one's bytes while it computes
            ahead = [*pending[1:], None][:len(pending)] if in_process else [None] * len(pending)
            errors = run_blocks(
                extract_feature_block,
                [(location(path), location(fpath), b, spec, device, batch_size, threads, compile_, nxt)
                 for b, nxt in zip(pending, ahead, strict=True)],
                workers=workers, scheduler_address=scheduler_address, on_result=done)
        summary = store.summarize(group, path, max_failures=20)
    summary["errors"] = errors
    summary["change"] = None
    if entry is not None:
        dropped = store.read_array(group, store.DROPPED)[:before]
        summary["change"] = {"added": int(store.live_mask(group)[before:].sum()), "redone": 0, "retried": 0,
                             "dropped": int((dropped > old_version).sum()), "snapshot": entry["version"]}
    return summary
