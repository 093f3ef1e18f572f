"""The frame store: decoded, resized frames of every video of a split, in manifest order.

Arrays (row i = manifest row i):
- ``frames``: JPEG bytes [N, T] (codec ``jpeg``, the default) or uint8 [N, T, H, W, 3] with zstd
  (codec ``raw``); read them with :func:`read_frames`, which returns uint8 either way;
- ``frame_index`` int32 [N, T], ``timestamp`` float64 [N, T], ``source_frames`` int32 [N];
- ``status`` int8 [N] (0 pending, 1 ok, 2 failed) and ``reason`` str [N], whole-column bookkeeping
  written by the coordinating process (:class:`pipeline.store.Ledger`); rows whose file is missing
  from the dataset are recorded failed when the store is created, and never visited;
- the manifest columns ``video_id``, ``path``, ``label``, ``start``, ``end`` (plus ``targets`` uint8
  [N, C] for multi-label splits); ``block_done`` (see :mod:`pipeline.store`).
Attributes: ``stage``, ``dataset``, ``split``, ``class_names``, ``spec``, ``codec``, ``n``, ``block_size``.

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

from . import store
from .datasets import Manifest
from .errors import DamagedStore, read_error
from .settings import FramesSettings
from .video import DecodeError, FrameSpec, decode_clip

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


def frames_fingerprint_record(manifest: Manifest, spec: FrameSpec, codec: FrameCodec, block_size: int) -> dict:
    """What determines a frame store's content: the split's manifest, the input files' sizes, the spec."""
    sizes = []
    for r in manifest.records:
        try:
            sizes.append(os.stat(r.path).st_size if r.path else -1)
        except OSError:
            sizes.append(-1)
    return {
        "stage": "frames",
        "dataset": manifest.dataset,
        "manifest": manifest.fingerprint(),
        "input_sizes": store.fingerprint({"sizes": sizes}),
        "spec": spec.as_dict(),
        "codec": asdict(codec),
        "block_size": block_size,
    }


def init_frame_store(group: zarr.Group, manifest: Manifest, split: str, spec: FrameSpec, codec: FrameCodec,
                     block_size: int) -> None:
    """Create the arrays of an empty frame store for ``manifest`` (one split)."""
    records = manifest.records
    n, t = len(records), spec.num_frames
    block_size = store.bounded_block(n, block_size, t * spec.height * spec.width * 3)
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
    missing = np.array([not r.path for r in records], bool)
    store.create_bookkeeping(group, n, block_size, failed=missing,
                             reasons=np.full(n, MISSING_REASON, dtype=object))
    store.create_column(group, "video_id", np.array([r.video_id for r in records], dtype=object))
    store.create_column(group, "path", np.array([r.path for r in records], dtype=object))
    store.create_column(group, "label", np.array([r.label for r in records], np.int32))
    store.create_column(group, "start", np.array([r.start for r in records], np.float64))
    store.create_column(group, "end", np.array([r.end for r in records], np.float64))
    if manifest.multi_label:
        targets = np.zeros((n, len(manifest.class_names)), np.uint8)
        for i, r in enumerate(records):
            targets[i, list(r.labels or ((r.label,) if r.label >= 0 else ()))] = 1
        store.create_column(group, "targets", targets)
    group.attrs.update({
        "stage": "frames", "dataset": manifest.dataset, "split": split, "class_names": manifest.class_names,
        "spec": spec.as_dict(), "codec": asdict(codec), "n": n, "block_size": block_size,
    })


def extract_block(path: str, block: int, threads: int = 1) -> store.BlockResult:
    """Decode one block of videos and write its data. Runs in any worker.

    The block's rows are written as whole shards (no read-modify-write); the coordinator then
    records the block done (:class:`pipeline.store.Ledger`): a block killed half-way is redone.
    """
    group = zarr.open_group(path, mode="r+")
    spec = FrameSpec(**group.attrs["spec"])
    codec = FrameCodec(**group.attrs["codec"])
    rows = store.block_slice(group, block)
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
    status = np.full(m, OK, np.int8)
    reasons = np.array([""] * m, dtype=object)
    for j in range(m):
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
    return store.BlockResult(block, status, reasons, digest=store.block_digest(written))


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
