"""Compact: rewrite a dataset's frame stores, and the feature stores aligned with them, without their dropped
videos (kept, masked, since they left the dataset, so that older snapshots could still be read).

Bytes are copied, nothing is decoded or encoded. A compacted store holds the same live videos (its new
snapshot has the same hash) at other rows, so it gets another fingerprint: outputs made from the old rows
(heads, runs) are then stale, as after a rebuild, and `pipeline heads` makes them again; snapshots from before
the last drop can no longer be read (``evaluate --snapshot`` says so). Feature stores of another snapshot than
their frames cannot follow the new rows: compaction refuses until `pipeline features` has brought them up.
Local caches only (on object storage, putting a store in place of another is no rename).
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from pipeline.core.cachefs import is_remote, remove_tree
from pipeline.core.errors import PipelineError
from pipeline.core.progress import Progress
from pipeline.media.video import FrameSpec
from pipeline.storage import store
from pipeline.storage.featurestore import features_fingerprint_record
from pipeline.storage.framestore import FrameCodec, frames_fingerprint_record

from .paths import frames_path, safe_name, splits_of


def _copy_of(path: Path) -> Path:
    """Where the compacted copy of the store at ``path`` is made (hidden: no reader lists it)."""
    return path.parent / f".{path.name}.compact"


def _feature_stores(cache: Path, dataset: str, split: str) -> list[Path]:
    base = Path(cache) / "features" / safe_name(dataset, "dataset")
    return [p / split for p in sorted(base.iterdir(), key=str)
            if not p.name.startswith(".") and (p / split / "zarr.json").exists()] if base.is_dir() else []


def _leftover(path: Path, group, frames_fp: str | None = None) -> bool:  # noqa: ANN001
    """Put in place the finished copy a killed compaction left beside ``path`` when it is still a copy of the
    store there (and, for features, of the frame store as it is now); any other copy is deleted."""
    copy_path = _copy_of(path)
    if not copy_path.exists():
        return False
    try:
        copy = store.open_group(copy_path, mode="r")
        source = dict(copy.attrs.get("compacted_from") or {})
        usable = (bool(copy.attrs.get("fingerprint")) and source.get("fingerprint") == group.attrs.get("fingerprint")
                  and source.get("version") == store.version_of(group)
                  and (frames_fp is None or copy.attrs.get("frames_fingerprint") == frames_fp))
    except store.DamagedStore:
        usable = False
    if usable:
        store.swap_in(path, copy_path)
    else:
        remove_tree(copy_path)
    return usable


def run(cache: Path, dataset: str, splits: list[str] | None, quiet: bool) -> list[dict]:
    """Compact each split's frame store and its feature stores; one summary per store."""
    if is_remote(cache):
        raise PipelineError("`pipeline compact` rewrites stores on local disks only: copy the cache to a local disk, "
                            "compact, and copy it back")
    available = splits_of(cache, "frames", dataset)
    if not available:
        raise PipelineError(f"no frame store for {dataset!r} under {cache}: nothing to compact")
    unknown = [s for s in splits or [] if s not in available]
    if unknown:
        raise PipelineError(f"no frame store for {dataset}/{unknown[0]}; stored splits: {', '.join(available)}")
    results = []
    for split in splits or available:
        results += _compact_split(cache, dataset, split, quiet)
    return results


def _compact_split(cache: Path, dataset: str, split: str, quiet: bool) -> list[dict]:
    fpath = frames_path(cache, dataset, split)
    feature_paths = _feature_stores(cache, dataset, split)
    with ExitStack() as locks:
        for path in (fpath, *feature_paths):  # every store of the split, for the whole compaction
            locks.enter_context(store.writer_lock(path))
            store.finish_swap(path)
        what = f"frame store {dataset}/{split}"
        frames = store.open_existing(fpath, what)
        # a compaction killed half-way: its finished copies go in place (frames first, then features)
        if _leftover(fpath, frames):
            frames = store.open_existing(fpath, what)
        features = []
        for path in feature_paths:
            group = store.open_existing(path, f"features {path}")
            if not group.attrs.get("frames_fingerprint"):
                continue  # imported features: not made from these frames, not aligned with their rows
            if _leftover(path, group, frames.attrs["fingerprint"]):
                group = store.open_existing(path, f"features {path}")
            features.append((path, group))
        if store.ADDED not in frames:
            raise PipelineError(f"{what} was made before stores could shrink (store format 2): it has no dropped "
                                "videos to remove")
        if store.pending_blocks(frames):
            raise PipelineError(f"{what} is unfinished: run `pipeline frames` first")
        dropped = store.snapshot_counts(frames)["dropped"]
        if not dropped:
            return [{"path": str(fpath), "removed": 0, "videos": int(store.live_mask(frames).sum()),
                     "snapshot": store.version_of(frames)}]
        for path, group in features:
            if (store.version_of(group) != store.version_of(frames) or store.rows_of(group) != store.rows_of(frames)
                    or store.pending_blocks(group)):
                raise PipelineError(f"the features at {path} are of another snapshot than their frame store, or "
                                    f"unfinished: run `pipeline features -d {dataset}` first, so that they follow the "
                                    "compacted rows (or delete them)")
        return _compact(dataset, split, fpath, frames, features, quiet)


def _compact(dataset: str, split: str, fpath: Path, frames, features: list, quiet: bool) -> list[dict]:  # noqa: ANN001
    """Copy every store beside itself, then put the copies in place, frames first: a run killed anywhere is
    finished by the next one (:func:`_leftover`)."""
    attrs = frames.attrs
    compactions = int(attrs.get("compactions", 0)) + 1
    record = frames_fingerprint_record(dataset, FrameSpec(**attrs["spec"]), FrameCodec(**attrs["codec"]),
                                       int(attrs["block_size"]), compactions)
    results = []
    total = store.rows_of(frames) * (1 + len(features))
    with Progress(total, f"compact {dataset}/{split}", quiet, unit="video") as bar:
        def copy(path: Path, group, fp: str, changed: dict) -> object:  # noqa: ANN001
            if _copy_of(path).exists():
                remove_tree(_copy_of(path))  # an unfinished copy of a killed run
            params = {**dict(group.attrs.get("params") or {}), **changed}
            made = store.compact_into(group, _copy_of(path), fp, lambda k: bar.update(k),
                                      attrs={"params": params, **({"frames_fingerprint": changed["frames_fingerprint"]}
                                                                  if "frames_fingerprint" in changed else {})})
            bar.update(store.rows_of(group) - store.rows_of(made))  # the rows left out
            results.append({"path": str(path), "removed": int(made.attrs["snapshots"][-1]["compacted"]),
                            "videos": store.rows_of(made), "snapshot": store.version_of(made)})
            return made

        new_frames = copy(fpath, frames, store.fingerprint(record), {"compactions": compactions})
        for path, group in features:
            params = dict(group.attrs.get("params") or {})
            fp = store.fingerprint(features_fingerprint_record(
                new_frames, dict(group.attrs["model"]), params.get("precision"), params.get("batch_size"),
                bool(params.get("compile"))))
            copy(path, group, fp, {"frames_fingerprint": new_frames.attrs["fingerprint"]})
    store.swap_in(fpath, _copy_of(fpath))
    for path, _ in features:
        store.swap_in(path, _copy_of(path))
    return results
