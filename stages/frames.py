"""Frame stage: decode every video of a dataset's splits into the frame store."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.cachefs import location
from pipeline.core.errors import PipelineError
from pipeline.core.parallel import run_blocks, threads_per_worker
from pipeline.core.progress import Progress
from pipeline.media.datasets import WHOLE, load_manifest
from pipeline.media.video import FrameSpec
from pipeline.storage import store
from pipeline.storage.framestore import (
    FrameCodec,
    apply_plan,
    extract_block,
    file_identity,
    frames_fingerprint_record,
    init_frame_store,
    plan_change,
)

from .paths import frames_path


@dataclass
class DatasetArgs:
    dataset: str
    root: str | None
    split_id: int = 1
    untrimmed: bool = False
    name: str | None = None  # cache name of a csv/folder dataset
    val_fraction: float = 0.0  # hold out this fraction of each class's training videos as 'val'

    @property
    def cache_name(self) -> str:
        return self.name or self.dataset


def with_validation(manifest, data: DatasetArgs):
    """The manifest with a held-out 'val' split when asked; a warning when it has none."""
    if data.val_fraction:
        try:
            return manifest.hold_out(data.val_fraction)
        except ValueError as e:
            raise PipelineError(f"--val-fraction: {e}") from None
    if manifest.splits == ["train"]:
        warnings.warn(f"{data.cache_name} has no validation split (a flat folder or a CSV without a split "
                      "column): hold one out with --val-fraction 0.1, or evaluation and fine-tuning have no "
                      "'val' to use", stacklevel=2)
    return manifest


def run(cache: Path, data: DatasetArgs, splits: list[str] | None, spec: FrameSpec, codec: FrameCodec, *,
        block_size: int,
        workers: int, scheduler_address: str | None = None, replace_mismatched: bool,
        quiet: bool, retry_failed: bool) -> list[dict]:
    """Fill the frame store of each split; returns one summary dict per split (``change``: the videos added,
    dropped, redone and retried, and the snapshot they made, when the dataset changed). The split ``all`` (every
    video of the dataset once, whole, one label: the official zero-shot set) is made only when asked for by name."""
    manifest = load_manifest(data.dataset, data.root, split_id=data.split_id, untrimmed=data.untrimmed,
                             name=data.name, whole=WHOLE in (splits or []))
    manifest.dataset = data.cache_name
    manifest = with_validation(manifest, data)
    available = manifest.splits
    chosen = splits or available
    unknown = [s for s in chosen if s not in available]
    if unknown:
        raise PipelineError(f"split {unknown[0]!r} not in {data.cache_name}; it has: {', '.join(available)} (and "
                            f"'{WHOLE}': every video once, the official whole-dataset zero-shot set)")
    for split in chosen:  # every name checked before anything is written
        frames_path(cache, data.cache_name, split)
    summaries = []
    for split in chosen:
        part = manifest.split(split)
        path = frames_path(cache, data.cache_name, split)
        block = store.bounded_block(block_size, spec.num_frames * spec.height * spec.width * 3)
        identity = file_identity(part.records)
        params = {"dataset": data.dataset, "root": str(data.root), "split_id": data.split_id,
                  "untrimmed": data.untrimmed, "block_size": block, **spec.as_dict(),
                  "codec": codec.name, "jpeg_quality": codec.quality}
        with store.writer_lock(path):
            compactions = _compactions(path)
            fp = store.fingerprint(frames_fingerprint_record(data.cache_name, spec, codec, block, compactions))
            group = store.open_output(
                path, fp, {**params, **({"compactions": compactions} if compactions else {})},
                replace_mismatched=replace_mismatched,
                init=lambda g, part=part, split=split, block=block, identity=identity, k=compactions: init_frame_store(
                    g, part, split, spec, codec, block, identity, compactions=k))
            # the dataset as it is now against the store's live rows: only the difference is decoded
            plan = plan_change(group, part, identity, retry_failed=retry_failed, quiet=quiet)
            snapshot = apply_plan(group, plan)
            pending = store.pending_blocks(group)
            todo = store.rows_in(group, pending)
            threads = threads_per_worker(workers)
            with Progress(todo, f"frames {data.cache_name}/{split}", quiet) as bar, store.Ledger(group) as ledger:
                def done(result: store.BlockResult) -> None:
                    ledger.record(result)
                    bar.update(result.n)
                errors = run_blocks(extract_block, [(location(path), b, threads) for b in pending],
                                    workers=workers, scheduler_address=scheduler_address, on_result=done)
            summary = store.summarize(group, path, max_failures=20)
            summary["errors"] = errors
            summary["notes"] = part.notes.get(split, [])
            summary["change"] = {**plan.as_dict(), "snapshot": snapshot["version"]} if snapshot else None
            summaries.append(summary)
    return summaries


def _compactions(path: Path) -> int:
    """How many times the store at ``path`` was compacted (part of its fingerprint: compaction moves rows)."""
    try:
        return int(store.open_group(path, mode="r").attrs.get("compactions", 0)) if (path / "zarr.json").exists() \
            else 0
    except (store.DamagedStore, OSError, ValueError):
        return 0
