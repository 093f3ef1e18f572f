"""The frame store: decoded, resized frames of every video of a split, one row per video.

Rows are keyed by video id: the first build stores the manifest's order, later runs append new videos,
mark gone ones dropped and redo changed ones (:func:`plan_change`), never rewriting a finished block.

Arrays (row i = video i):
- ``frames``: JPEG bytes [N, T] (codec ``jpeg``, the default) or uint8 [N, T, H, W, 3] with zstd
  (codec ``raw``); read them with :func:`read_frames`, which returns uint8 either way;
- ``frame_index`` int32 [N, T], ``timestamp`` float64 [N, T], ``source_frames`` int32 [N];
- ``status`` int8 [N] (0 pending, 1 ok, 2 failed, 3 VOID padding) and ``reason`` str [N], whole-column
  bookkeeping written by the coordinating process (:class:`pipeline.storage.store.Ledger`); rows whose file is
  missing from the dataset are recorded failed when they are added, and never opened;
- the manifest columns ``video_id``, ``path``, ``label``, ``start``, ``end`` (plus ``targets`` uint8
  [N, C] for multi-label splits); ``added_in`` / ``dropped_in`` (the snapshots a row lives in);
  ``file_size``, ``file_mtime_ns``, ``file_sha256`` (each file's identity when it was read);
  ``block_done``, ``block_digest`` (see :mod:`pipeline.storage.store`).
Attributes: ``stage``, ``dataset``, ``split``, ``class_names``, ``spec``, ``codec``, ``n``, ``block_size``,
``root``, ``version``, ``snapshots``.

Why JPEG by default: measured in ``benchmarks/bench_codec.py``, JPEG q90 stores ~10x fewer bytes
than raw uint8 + zstd and reads back faster (libjpeg-turbo beats zstd through zarr); libjpeg-turbo
encodes deterministically, so resumed stores stay byte-identical.
"""

from __future__ import annotations

import io
import os
from dataclasses import asdict, dataclass

import numpy as np
import zarr
from PIL import Image
from zarr.core.dtype import VariableLengthBytes

from pipeline.core.errors import DamagedStore, PipelineError, read_error
from pipeline.core.settings import FramesSettings
from pipeline.media.datasets import Manifest
from pipeline.media.video import DecodeError, FrameSpec, decode_clip
from pipeline.storage import store

_S = FramesSettings.defaults()  # the defaults

PENDING, OK, FAILED = store.PENDING, store.OK, store.FAILED
MISSING_REASON = "missing file: not found under the dataset root"
CODECS = ("jpeg", "raw")


@dataclass(frozen=True)
class FrameCodec:
    """How stored frames are encoded. Part of the frame store's fingerprint."""

    name: str = _S.codec
    quality: int = _S.jpeg_quality  # JPEG quality (ignored for raw)

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise ValueError(f"codec must be one of {CODECS}")
        if not 1 <= self.quality <= 100:
            raise ValueError("JPEG quality must be in 1..100")


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    out = io.BytesIO()
    # 4:2:0 chroma as in the source video; no optimisation passes (deterministic and fast).
    Image.fromarray(image).save(out, format="JPEG", quality=quality, subsampling=2)
    return out.getvalue()


def decode_jpeg(data: bytes, shape: tuple[int, int]) -> np.ndarray:
    if not data:
        return np.zeros((*shape, 3), np.uint8)  # a failed video's rows hold no frames
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def frames_fingerprint_record(dataset: str, spec: FrameSpec, codec: FrameCodec, block_size: int,
                              compactions: int = 0) -> dict:
    """What decides whether a frame store is another output: its settings (decoding spec, codec, block size),
    not its videos. Which videos it holds is its content, kept row by row (:func:`plan_change`): a new video is
    appended, a gone one dropped, a changed one redone, without touching the others. ``compactions``: how many
    times the store was rewritten without its dropped rows (rows moved, so outputs aligned with it are
    another output)."""
    return {"stage": "frames", "dataset": dataset, "spec": spec.as_dict(), "codec": asdict(codec),
            "block_size": block_size, **({"compactions": compactions} if compactions else {})}


def file_identity(records: list) -> tuple[np.ndarray, np.ndarray]:
    """(size, mtime in ns) of each record's file (following links), -1 where there is no file. What tells a
    changed file apart without reading it; a file whose mtime changed but not its size is then hashed."""
    sizes = np.full(len(records), -1, np.int64)
    mtimes = np.full(len(records), -1, np.int64)
    for i, r in enumerate(records):
        if r.path:
            try:
                st = os.stat(r.path)
            except OSError:
                continue
            sizes[i], mtimes[i] = st.st_size, st.st_mtime_ns
    return sizes, mtimes


def file_sha256(path: str) -> str:
    """sha256 of a file's bytes ("" when it cannot be read)."""
    import hashlib

    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return ""


def _record_columns(records: list, class_index: dict[str, int], class_names: list[str],
                    identity: tuple[np.ndarray, np.ndarray], multi_label: bool,
                    n_classes: int) -> dict[str, np.ndarray]:
    """The per-video columns of ``records`` (labels as indices into the store's class list ``class_index``)."""
    def store_label(label: int) -> int:
        return class_index[class_names[label]] if label >= 0 else -1

    missing = np.array([not r.path for r in records], bool)
    columns = {
        "video_id": np.array([r.video_id for r in records], dtype=object),
        "path": np.array([r.path for r in records], dtype=object),
        "label": np.array([store_label(r.label) for r in records], np.int32),
        "start": np.array([r.start for r in records], np.float64),
        "end": np.array([r.end for r in records], np.float64),
        "status": np.where(missing, FAILED, PENDING).astype(np.int8),
        "reason": np.where(missing, MISSING_REASON, "").astype(object),
        "file_size": identity[0].astype(np.int64), "file_mtime_ns": identity[1].astype(np.int64),
        "file_sha256": np.full(len(records), "", dtype=object),
    }
    if multi_label:
        targets = np.zeros((len(records), n_classes), np.uint8)
        for i, r in enumerate(records):
            targets[i, [store_label(x) for x in (r.labels or ((r.label,) if r.label >= 0 else ()))]] = 1
        columns["targets"] = targets
    return columns


def init_frame_store(group: zarr.Group, manifest: Manifest, split: str, spec: FrameSpec, codec: FrameCodec,
                     block_size: int, identity: tuple[np.ndarray, np.ndarray] | None = None,
                     compactions: int = 0) -> None:
    """Create the arrays of a frame store for ``manifest`` (one split): its first snapshot, every row pending
    (rows of files missing from the dataset: failed at once). ``identity``: :func:`file_identity` of the
    records, when the caller has it already; ``compactions``: the count a rebuilt store keeps (it is part of
    the fingerprint, and only grows, so no output made before a compaction ever matches it again)."""
    records = manifest.records
    n, t = len(records), spec.num_frames
    block_size = store.bounded_block(block_size, t * spec.height * spec.width * 3)
    if codec.name == "jpeg":
        group.create_array("frames", shape=(n, t), dtype=VariableLengthBytes(), chunks=(1, t),
                           shards=(block_size, t), compressors=store.checksummed(compress=False),
                           dimension_names=("video", "frame"))
    else:
        store.create_per_video(group, "frames", n, block_size, (t, spec.height, spec.width, 3), "uint8")
    store.create_per_video(group, "frame_index", n, block_size, (t,), "int32")
    store.create_per_video(group, "timestamp", n, block_size, (t,), "float64")
    store.create_per_video(group, "source_frames", n, block_size, (), "int32")
    # (y0, y1, x0, x1) of each video's own pixels in the H x W box: a video narrower than the box is padded,
    # never stretched; readers crop to it (training crops, evaluation views and features see no padding)
    store.create_per_video(group, "box", n, block_size, (4,), "int16")
    columns = _record_columns(records, {c: i for i, c in enumerate(manifest.class_names)}, manifest.class_names,
                              identity if identity is not None else file_identity(records), manifest.multi_label,
                              len(manifest.class_names))
    missing = columns["status"] == FAILED
    store.create_bookkeeping(group, n, block_size, failed=missing,
                             reasons=np.full(n, MISSING_REASON, dtype=object))
    for name in ("video_id", "path", "label", "start", "end", "targets", "file_size", "file_mtime_ns"):
        if name in columns:
            store.create_column(group, name, columns[name])
    # the hash of each file as its worker read it: bookkeeping the ledger writes (no digest of its own)
    store.create_column(group, "file_sha256", np.array([""] * n, dtype=str), digest=False)
    lifecycle = store.create_lifecycle(group, n, columns["video_id"], classes=len(manifest.class_names))
    group.attrs.update({
        "stage": "frames", "dataset": manifest.dataset, "split": split, "class_names": manifest.class_names,
        "spec": spec.as_dict(), "codec": asdict(codec), "n": n, "block_size": block_size, "root": manifest.root,
        **lifecycle, **({"compactions": compactions} if compactions else {}),
    })


@dataclass
class Plan:
    """What a frame store must do to hold a manifest's videos: the change (rows appended and dropped) and its
    parts, counted for the user."""

    change: store.Change
    added: int = 0  # new videos
    dropped: int = 0  # videos gone from the dataset
    redone: int = 0  # videos whose file or annotation changed: dropped, and appended again
    retried: int = 0  # failed videos tried again (their file changed, or --retry-failed)
    new_classes: int = 0
    refreshed: int = 0  # files touched without a change of bytes: their new mtime recorded

    def as_dict(self) -> dict:
        return {"added": self.added, "dropped": self.dropped, "redone": self.redone, "retried": self.retried,
                "new_classes": self.new_classes, "refreshed": self.refreshed}


def _same_text(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array([x == y for x, y in zip(a.tolist(), b.tolist(), strict=True)], bool)


def plan_change(group: zarr.Group, manifest: Manifest, identity: tuple[np.ndarray, np.ndarray], *,
                retry_failed: bool = False, hash_file=file_sha256,  # noqa: ANN001 - a function
                quiet: bool = True) -> Plan:
    """Compare the live rows of a frame store with ``manifest`` (one split), by video id, in whole columns.

    - a video of the manifest without a live row is appended;
    - a live row whose video left the manifest is dropped;
    - a live row whose annotation (path relative to the dataset root, class name, segment) or file changed is
      redone: dropped, and its video appended again. A file changed when its size changed, or its mtime when
      the hash of its bytes differs from the one recorded when it was decoded (same bytes: its new mtime is
      recorded, nothing is redone); a failed row (a missing or broken file) whose file changed is retried so;
    - with ``retry_failed`` every failed row is redone too.
    Appended videos keep the manifest's order; new class names are appended to the store's class list, so no
    existing row's label changes."""
    n = store.rows_of(group)
    records = manifest.records
    names = list(group.attrs["class_names"])
    new_classes = [c for c in manifest.class_names if c not in set(names)]
    if new_classes and "targets" in group:
        raise PipelineError(f"{store.location_of(group)}: the dataset has new classes ({new_classes[0]!r} ...) and "
                            "its multi-label targets cannot grow a class: rebuild it with --replace-mismatched")
    all_names = names + new_classes
    class_index = {c: i for i, c in enumerate(all_names)}
    live = store.live_mask(group)
    rows = np.flatnonzero(live)
    ids = store.as_text(group["video_id"][:n])[rows]
    where = {v: k for k, v in enumerate(ids.tolist())}
    pos = np.array([where.get(r.video_id, -1) for r in records], np.int64)
    rec = np.flatnonzero(pos >= 0)  # manifest records with a live row ...
    row = rows[pos[rec]]  # ... and that row
    # the annotation: class name, path relative to the dataset root, segment
    stored_label = group["label"][:n][row]
    label_names = np.array(all_names + [""], dtype=object)
    rec_label = np.array([class_index[manifest.class_names[records[i].label]] if records[i].label >= 0 else -1
                          for i in rec.tolist()], np.int64)
    same = label_names[stored_label] == label_names[rec_label]
    stored_path = store.as_text(group["path"][:n][row])
    rec_path = np.array([records[i].path for i in rec.tolist()], dtype=object)
    root = str(group.attrs.get("root") or "")
    if root and manifest.root and root != manifest.root:  # a moved dataset keeps its rows
        stored_path = np.array([os.path.relpath(p, root) if p else "" for p in stored_path.tolist()], dtype=object)
        rec_path = np.array([os.path.relpath(p, manifest.root) if p else "" for p in rec_path.tolist()], dtype=object)
    same &= _same_text(stored_path, rec_path)
    for name in ("start", "end"):
        a = group[name][:n][row]
        b = np.array([getattr(records[i], name) for i in rec.tolist()], np.float64)
        same &= (a == b) | (np.isnan(a) & np.isnan(b))
    # the file: size, then mtime, then (same size, new mtime) its bytes
    size, mtime = group["file_size"][:n][row], group["file_mtime_ns"][:n][row]
    new_size, new_mtime = identity[0][rec], identity[1][rec]
    same_file = (size == new_size) & (mtime == new_mtime)
    touched = np.flatnonzero((size == new_size) & (mtime != new_mtime) & (new_size >= 0))
    refresh_rows, refresh_mtimes = [], []
    if touched.size:
        from pipeline.core.progress import Progress

        recorded = store.as_text(group["file_sha256"][:n][row[touched]])
        # a moved or copied dataset touches every file: reading them is long, but far shorter than decoding
        with Progress(int(touched.size), "hash files with a new mtime", quiet or touched.size < 1000,
                      unit="file") as bar:
            for k, digest in zip(touched.tolist(), recorded.tolist(), strict=True):
                if digest and hash_file(records[int(rec[k])].path) == digest:
                    same_file[k] = True
                    refresh_rows.append(int(row[k]))
                    refresh_mtimes.append(int(new_mtime[k]))
                bar.update(1)
    failed = group["status"][:n][row] == FAILED
    redo = ~same | ~same_file | (failed & retry_failed)
    gone = np.setdiff1d(rows, row)
    drop = np.sort(np.concatenate([gone, row[redo]]))
    add = np.sort(np.concatenate([np.flatnonzero(pos < 0), rec[redo]]))
    plan = Plan(store.Change(drop=drop), added=int((pos < 0).sum()), dropped=int(gone.size),
                redone=int((redo & ~failed).sum()), retried=int((redo & failed).sum()),
                new_classes=len(new_classes), refreshed=len(refresh_rows))
    if refresh_rows:
        plan.change.refresh["file_mtime_ns"] = (np.array(refresh_rows), np.array(refresh_mtimes, np.int64))
    if add.size:
        chosen = [records[i] for i in add.tolist()]
        plan.change.columns = _record_columns(chosen, class_index, manifest.class_names,
                                              (identity[0][add], identity[1][add]), "targets" in group, len(all_names))
    if new_classes:
        plan.change.attrs["class_names"] = all_names
    if manifest.root and root != manifest.root:
        plan.change.attrs["root"] = manifest.root
    return plan


def apply_plan(group: zarr.Group, plan: Plan) -> dict | None:
    """Write ``plan``: a new snapshot when rows or classes change (its entry), else only refreshed mtimes."""
    if plan.change.empty and not plan.change.attrs:
        store.refresh_columns(group, plan.change.refresh)
        return None
    return store.apply_change(group, plan.change)


def extract_block(path: str, block: int, threads: int = 1) -> store.BlockResult:
    """Decode one block of videos and write its data. Runs in any worker.

    The block's rows are written as whole shards (no read-modify-write); the coordinator then
    records the block done (:class:`pipeline.storage.store.Ledger`): a block killed half-way is redone.
    VOID rows padding the block's end are not visited. Each file is hashed as it is read, so that a later
    run can tell a file whose mtime changed from one whose bytes did.
    """
    group = zarr.open_group(path, mode="r+")
    spec = FrameSpec(**group.attrs["spec"])
    codec = FrameCodec(**group.attrs["codec"])
    whole = store.block_slice(group, block)
    rows = store.written_slice(group, block)
    paths = group["path"][rows]
    starts, ends = group["start"][rows], group["end"][rows]
    m = len(paths)
    if codec.name == "jpeg":
        frames = np.full((m, spec.num_frames), b"", dtype=object)
    else:
        frames = np.zeros((m, spec.num_frames, spec.height, spec.width, 3), np.uint8)
    index = np.zeros((m, spec.num_frames), np.int32)
    stamps = np.zeros((m, spec.num_frames), np.float64)
    counts = np.zeros(m, np.int32)
    boxes = np.tile(np.array([0, spec.height, 0, spec.width], np.int16), (m, 1))
    status = np.full(whole.stop - whole.start, store.VOID, np.int8)
    status[:m] = OK
    reasons = np.array([""] * status.size, dtype=object)
    digests = np.array([""] * status.size, dtype=object)
    for j in range(m):
        if not paths[j]:  # not in the dataset: recorded when the row was added, nothing to open
            status[j], reasons[j] = FAILED, MISSING_REASON
            continue
        digests[j] = file_sha256(str(paths[j]))
        try:
            clip = decode_clip(str(paths[j]), spec, float(starts[j]), float(ends[j]), threads=threads)
        except DecodeError as e:
            status[j], reasons[j] = FAILED, str(e)
            continue
        if codec.name == "jpeg":
            frames[j] = [encode_jpeg(img, codec.quality) for img in clip.frames]
        else:
            frames[j] = clip.frames
        index[j], stamps[j], counts[j] = clip.frame_index, clip.timestamp, clip.source_frames
        if clip.box is not None:
            boxes[j] = clip.box
    written = {"frames": frames, "frame_index": index, "timestamp": stamps, "source_frames": counts}
    if "box" in group:  # stores made before boxes were recorded have none
        written["box"] = boxes
    for name, values in written.items():
        group[name][rows] = values
    columns = {"file_sha256": digests} if "file_sha256" in group else {}
    return store.BlockResult(block, status, reasons, digest=store.block_digest(written), columns=columns)


def read_boxes(group: zarr.Group, rows: slice | int = slice(None)) -> np.ndarray:
    """int16 (y0, y1, x0, x1) of videos' own pixels in their stored frames: [n, 4], or [4] for one row (the
    whole box for stores made before boxes were recorded)."""
    if "box" in group:
        return store.read_array(group, "box", rows)
    spec = group.attrs["spec"]
    whole = np.array([0, spec["height"], 0, spec["width"]], np.int16)
    return whole if isinstance(rows, int) else np.tile(whole, (len(range(int(group.attrs["n"]))[rows]), 1))


def video_box(group: zarr.Group, row: int) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of one video's own pixels in its stored frames."""
    y0, y1, x0, x1 = (int(v) for v in read_boxes(group, row))
    return y0, y1, x0, x1


def read_frames(group: zarr.Group, rows: slice | int, frame_indices: np.ndarray | None = None) -> np.ndarray:
    """uint8 frames [n, T, H, W, 3] (or [T, H, W, 3] for one row), whatever the store's codec.

    ``frame_indices`` (one row only) picks frames before decoding: training decodes T of T_cache JPEGs.
    """
    stored = store.read_array(group, "frames", rows)
    if frame_indices is not None:
        stored = stored[np.asarray(frame_indices)]
    if group.attrs["codec"]["name"] == "raw":
        return stored
    require_frames(group, stored, np.arange(*rows.indices(int(group.attrs["n"])))[:, None]
                   if isinstance(rows, slice) else rows)
    spec = group.attrs["spec"]
    shape = (spec["height"], spec["width"])
    flat = [decode_jpeg(b, shape) for b in stored.reshape(-1)]
    if not flat:
        return np.zeros((*stored.shape, *shape, 3), np.uint8)
    return np.stack(flat).reshape(*stored.shape, *shape, 3)


def read_stored(group: zarr.Group, rows: np.ndarray, frame_indices: np.ndarray,
                frames: zarr.Array | None = None) -> np.ndarray:
    """The stored form of frames (``rows[k]``, ``frame_indices[k]``), undecoded, in one coordinate read: JPEG
    bytes [k] (object), or uint8 [k, H, W, 3] for a raw store.

    The batched clip path reads a whole batch's chosen frames this way and decodes them later, on the
    training device; ``frames``: the store's ``frames`` array, when the caller keeps it open.
    """
    frames = group["frames"] if frames is None else frames
    rows, frame_indices = np.asarray(rows, np.int64), np.asarray(frame_indices, np.int64)
    try:
        if frames.ndim == 2:  # JPEG bytes [N, T]: exactly the chosen frames
            t = frames.shape[1]
            points, inverse = np.unique(rows * t + frame_indices, return_inverse=True)
            stored = frames.get_coordinate_selection((points // t, points % t))[inverse]
        else:  # raw [N, T, H, W, 3]: the rows x frames rectangle, then the chosen pairs
            urows, r = np.unique(rows, return_inverse=True)
            uframes, f = np.unique(frame_indices, return_inverse=True)
            stored = frames.get_orthogonal_selection((urows, uframes))[r, f]
    except (ValueError, RuntimeError, OSError, KeyError) as e:
        raise DamagedStore(f"array 'frames' of {store.location_of(group)} cannot be read ({read_error(e)}): "
                           "run `pipeline verify --repair`") from None
    require_frames(group, stored, rows)
    return stored


def require_frames(group: zarr.Group, stored: np.ndarray, row_of: np.ndarray | int) -> None:
    """Refuse stored frames that lost their bytes. Empty bytes are right for a failed video; for a decoded one
    they mean a lost shard. ``row_of``: the row of each element of ``stored`` (broadcast to its shape); only
    the status of rows with empty bytes is read."""
    if stored.dtype != object:
        return  # raw frames: a lost chunk reads as a failed checksum instead
    empty = np.frompyfunc(len, 1, 1)(stored).astype(np.int64) == 0
    if not empty.any():
        return
    hit = np.unique(np.broadcast_to(row_of, empty.shape)[empty])
    status = group["status"].get_orthogonal_selection(hit)
    if (status == OK).any():
        first = int(hit[status == OK][0])
        raise DamagedStore(f"frame store {group.store_path} is damaged: stored frames of decoded videos are "
                                 f"missing (row {first}); run `pipeline verify --repair`, then `pipeline frames`")


class DecodedFrames:
    """Array-like view of a frame store's frames as uint8, read block by block (for exports)."""

    def __init__(self, group: zarr.Group) -> None:
        self.group = group
        spec = group.attrs["spec"]
        self.shape = (group["frames"].shape[0], spec["num_frames"], spec["height"], spec["width"], 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 5

    def __getitem__(self, key: slice) -> np.ndarray:
        if key is Ellipsis:
            key = slice(None)
        return read_frames(self.group, key)
