"""The feature store: CLIP image embeddings of every stored frame, rows aligned with the frame store.

It follows its frame store's snapshots row for row (:func:`follow_frames`): rows the frames gained are
appended pending and encoded by the usual blocks, drop marks are copied; encoded rows are never touched.

Arrays: ``features`` float16 [N, T, D]; ``status`` int8 [N] and ``reason`` str [N] (a video that
failed in the frame stage stays failed here, its features zero, never garbage); the manifest
columns ``video_id``, ``path``, ``label`` (and ``targets``) copied from the frame store, so that a
feature store (or an imported one) is self-contained; ``block_done``.
Attributes: ``stage``, ``dataset``, ``split``, ``class_names``, ``model`` (identity), ``model_tag``,
``precision``, ``embed_dim``, ``n``, ``block_size``, ``frames_fingerprint``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

from pipeline.core.errors import DamagedStore
from pipeline.models.clip import LoadedClip, ModelSpec, load_clip
from pipeline.storage import store
from pipeline.storage.framestore import FAILED, OK, read_boxes, require_frames

# torch is imported inside the functions that encode: reading features (heads, evaluation) must
# stay free of torch's import time.


def precision_for(device: str) -> str:
    """The compute precision, part of the fingerprint: AMP on GPU and fp32 on CPU never mix rows."""
    import torch

    if device.startswith("cuda"):
        return "amp-bf16" if torch.cuda.is_bf16_supported() else "amp-fp16"
    return "fp32"


def preprocess(frames, clip: LoadedClip):  # noqa: ANN001 - numpy or torch
    """uint8 frames (numpy [n, H, W, 3], or a torch tensor [n, 3, H, W] on any device) -> normalised float
    [n, 3, S, S] on the same device: the model's own preprocessing (open_clip's ``PreprocessCfg``): its resize
    mode, interpolation, mean and std.

    ``shortest``: short side to S, centre crop (CLIP, the default); ``longest``: long side to S, centre
    pad with black; ``squash``: both sides to S, aspect ratio not kept (SigLIP, DFN and others).
    """
    import torch
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    modes = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}
    mode = modes.get(clip.interpolation, InterpolationMode.BICUBIC)
    s = clip.image_size
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    x = frames.float().div_(255)
    if clip.resize_mode == "squash":
        x = F.resize(x, [s, s], interpolation=mode, antialias=True)
    elif clip.resize_mode == "longest":
        h, w = x.shape[-2:]
        scale = s / max(h, w)
        x = F.resize(x, [max(1, round(h * scale)), max(1, round(w * scale))], interpolation=mode, antialias=True)
        x = F.center_crop(x, [s, s])  # pads with zeros (black) where the image is smaller
    else:
        x = F.resize(x, [s], interpolation=mode, antialias=True)
        x = F.center_crop(x, [s, s])
    return F.normalize(x, mean=list(clip.mean), std=list(clip.std))


def _autocast(device: str):
    import torch

    precision = precision_for(device)
    dtype = torch.bfloat16 if precision == "amp-bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype, enabled=precision != "fp32")


def encode_frames(frames: np.ndarray, clip: LoadedClip, device: str, batch_size: int) -> np.ndarray:
    """float32 [n, D] image embeddings (not normalised) of uint8 frames [n, H, W, 3]."""
    return encode_stored(frames, (0, frames.shape[1], 0, frames.shape[2]), clip, device, batch_size)


def encode_stored(stored: np.ndarray, box: tuple[int, int, int, int], clip: LoadedClip, device: str,
                  batch_size: int) -> np.ndarray:
    """float32 [n, D] embeddings of stored frames (JPEG bytes [n], or raw uint8 [n, H, W, 3]) of one box:
    decoded on ``device`` (nvJPEG on a GPU; libjpeg-turbo on the CPU, the same pixels as Pillow), cropped
    to the box, preprocessed and encoded there, ``batch_size`` frames a pass; read back once, at the end."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    y0, y1, x0, x1 = box
    out = []
    for lo in range(0, len(stored), batch_size):
        part = stored[lo:lo + batch_size]
        if part.dtype == object:
            data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in part]
            x = torch.stack(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        else:
            x = torch.from_numpy(np.ascontiguousarray(part)).to(device, non_blocking=True).permute(0, 3, 1, 2)
        x = preprocess(x[:, :, y0:y1, x0:x1], clip)
        with torch.no_grad(), _autocast(device):
            out.append(clip.model.encode_image(x).float())  # on the device: the next pass decodes meanwhile
    return torch.cat(out).cpu().numpy() if out else np.zeros((0, clip.embed_dim), np.float32)


def features_fingerprint_record(frames_group: zarr.Group, identity: dict, precision: str, batch_size: int,
                                compile_: bool = False) -> dict:
    """Frames, model, precision and batch size: BLAS kernels make a row's last bits depend on the batch it
    was computed in, so rows computed at another batch size are another output, not a resumable one."""
    return {"stage": "features", "frames": frames_group.attrs["fingerprint"], "model": identity,
            "precision": precision, "batch_size": batch_size,
            **({"compile": True} if compile_ else {})}  # compiled kernels round differently; off: as before


def _mirrored_columns(frames_group: zarr.Group, rows: slice) -> dict[str, np.ndarray]:
    """The per-video columns of a feature store for frame rows ``rows``: the frame store's manifest columns and
    life cycle, and statuses: a video that failed in the frame stage fails here too (its features zero, never
    garbage), VOID padding stays VOID, the others are pending."""
    frame_status = frames_group["status"][rows]
    status = np.where(np.isin(frame_status, (FAILED, store.VOID)), frame_status, store.PENDING).astype(np.int8)
    reasons = np.full(status.size, "", dtype=object)
    failed = status == FAILED
    reasons[failed] = ["frames: " + r for r in store.as_text(frames_group["reason"][rows])[failed]]
    columns = {"status": status, "reason": reasons}
    for name in ("video_id", "path", "label", "targets", store.ADDED, store.DROPPED):
        if name in frames_group:
            columns[name] = frames_group[name][rows]
    return columns


def init_feature_store(group: zarr.Group, frames_group: zarr.Group, clip: LoadedClip, spec: ModelSpec,
                       precision: str, frames_path: str) -> None:
    """An empty feature store aligned with ``frames_group`` row for row, at its snapshot: same row order, same
    VOID padding, same added/dropped marks, so that a row's snapshots are its frames' snapshots."""
    n, block = store.rows_of(frames_group), int(frames_group.attrs["block_size"])
    t = int(frames_group.attrs["spec"]["num_frames"])
    # Chunked by block, not by video: features are read whole (heads, evaluation, training on the cache).
    # Uncompressed: float16 embeddings barely compress, and decompression was a third of the read time.
    store.create_per_video(group, "features", n, block, (t, clip.embed_dim), "float16", chunk_per_video=False,
                           compress=False)
    columns = _mirrored_columns(frames_group, slice(0, n))
    settled = columns["status"] != store.PENDING
    store.create_bookkeeping(group, n, block, failed=settled, reasons=columns["reason"])
    if settled.any():  # failed and VOID rows, as the frame store has them (whole columns)
        group["status"][:] = columns["status"]
        group["reason"][:] = np.array(columns["reason"].tolist(), dtype=np.str_)
    for name in ("video_id", "path", "label", "targets", store.ADDED, store.DROPPED):
        if name in columns:
            store.create_column(group, name, columns[name])
    group.attrs.update({
        "stage": "features", "dataset": frames_group.attrs["dataset"], "split": frames_group.attrs["split"],
        "class_names": list(frames_group.attrs["class_names"]), "model": clip.identity, "model_tag": spec.tag,
        "model_spec": {"name": spec.name, "pretrained": spec.pretrained, "quick_gelu": spec.quick_gelu,
                       "key": spec.key, **({"random_weights": True} if spec.random_weights else {})},
        "precision": precision, "embed_dim": clip.embed_dim, "num_frames": t, "n": n, "block_size": block,
        "frames_fingerprint": frames_group.attrs["fingerprint"], "frames_path": frames_path,
        **_mirrored_snapshots(frames_group),
    })


def _mirrored_snapshots(frames_group: zarr.Group) -> dict[str, Any]:
    if store.ADDED not in frames_group:
        return {}
    return {"version": store.version_of(frames_group), "snapshots": list(frames_group.attrs.get("snapshots") or []),
            "oldest_snapshot": int(frames_group.attrs.get("oldest_snapshot", 1))}


def follow_frames(group: zarr.Group, frames_group: zarr.Group) -> dict | None:
    """Bring a feature store to its frame store's snapshot: the frame rows it lacks are appended (pending, to
    be encoded by the usual blocks; nothing already encoded is touched), the drop marks copied. Returns the
    snapshot entry, or None when it already is at that snapshot. Call under the writer lock (and the frame
    store's reader lock)."""
    n, n_frames = store.rows_of(group), store.rows_of(frames_group)
    if store.version_of(group) == store.version_of(frames_group) and n == n_frames:
        return None
    if store.ADDED not in group or store.ADDED not in frames_group:
        return None  # made before snapshots: fingerprints decide, as before
    ids = store.as_text(group["video_id"][:n])
    if n > n_frames or not np.array_equal(ids, store.as_text(frames_group["video_id"][:n])):
        raise DamagedStore(f"{store.location_of(group)} is not aligned with its frame store {frames_group.store_path}"
                           " (rows differ): rebuild it with --replace-mismatched")
    dropped = frames_group[store.DROPPED][:n]
    differ = np.flatnonzero(group[store.DROPPED][:n] != dropped)
    change = store.Change(columns=_mirrored_columns(frames_group, slice(n, n_frames)) if n_frames > n else {},
                          at=n, mirror=list(frames_group.attrs["snapshots"]),
                          attrs={"class_names": list(frames_group.attrs["class_names"]),
                                 "oldest_snapshot": int(frames_group.attrs.get("oldest_snapshot", 1))})
    if differ.size:
        change.refresh[store.DROPPED] = (differ, dropped[differ])
    return store.apply_change(group, change)


# One model per worker process (dask workers run many blocks): loading is the expensive part.
_MODELS: dict[Any, LoadedClip] = {}


def remember_model(spec: ModelSpec, device: str, clip: LoadedClip) -> None:
    """Reuse a model this process already loaded (the coordinator's) instead of loading it again."""
    _MODELS.clear()
    _MODELS[(spec, device, False)] = clip


def _model(spec: ModelSpec, device: str, compile_: bool = False) -> LoadedClip:
    key = (spec, device, compile_)
    if key not in _MODELS:
        _MODELS.clear()
        clip = load_clip(spec, device)
        if compile_:
            clip.model.visual.compile()  # torch.compile, in place; the first batches compile
        _MODELS[key] = clip
    return _MODELS[key]


def worker_device(device: str) -> str:
    """The GPU of this process: ``cuda`` in dask worker i of a multi-GPU host is ``cuda:{i mod GPUs}``, so that
    ``--workers N`` on N GPUs runs one worker per GPU. Elsewhere ``device`` as given."""
    if device != "cuda":
        return device
    try:
        from distributed import get_worker

        name = str(get_worker().name)
    except (ImportError, ValueError):  # not in a dask worker
        return device
    import torch

    index = name.rsplit("-", 1)[-1]
    return f"cuda:{int(index) % max(1, torch.cuda.device_count())}" if index.isdigit() else device


def _read_block(frames_path: str, block: int, rows: slice | None = None) -> tuple:
    """(rows, status, reasons, stored frames of the ok rows, their boxes) of one block of a frame store
    (``rows``: the block's written rows, when known)."""
    frames_group = zarr.open_group(frames_path, mode="r")
    rows = store.written_slice(frames_group, block) if rows is None else rows
    status_in = frames_group["status"][rows]
    reasons_in = frames_group["reason"][rows]
    ok = np.flatnonzero(status_in == OK)
    stored = boxes = None
    if ok.size:
        stored = store.read_array(frames_group, "frames", rows)[ok]  # bytes: decoded later, on the device
        require_frames(frames_group, stored, (rows.start + ok)[:, None])
        boxes = read_boxes(frames_group, rows)[ok]
    return rows, status_in, reasons_in, ok, stored, boxes


# Read-ahead of the next block's bytes while this block computes (one process running blocks in order).
_READ_AHEAD: dict[tuple[str, int], Any] = {}


def _block_data(frames_path: str, block: int, next_block: int | None, rows: slice) -> tuple:
    from concurrent.futures import ThreadPoolExecutor

    future = _READ_AHEAD.pop((frames_path, block), None)
    data = future.result() if future is not None else _read_block(frames_path, block, rows)
    if data[0] != rows:  # read ahead before a change of the frame store: read again
        data = _read_block(frames_path, block, rows)
    _READ_AHEAD.clear()
    if next_block is not None:
        pool = ThreadPoolExecutor(1)
        _READ_AHEAD[(frames_path, next_block)] = pool.submit(_read_block, frames_path, next_block)
        pool.shutdown(wait=False)
    return data


def extract_feature_block(path: str, frames_path: str, block: int, spec: ModelSpec, device: str,
                          batch_size: int, threads: int = 0, compile_: bool = False,
                          next_block: int | None = None) -> store.BlockResult:
    """Encode one block of stored videos and write its data (the coordinator records it done).

    ``next_block``: the block this process runs next (in-process runs), read while this one computes."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    group = zarr.open_group(path, mode="r+")
    device = worker_device(device)
    clip = _model(spec, device, compile_)
    whole = store.block_slice(group, block)
    rows, status_in, reasons_in, ok, stored, boxes = _block_data(frames_path, block, next_block,
                                                                 store.written_slice(group, block))
    t, d = int(group.attrs["num_frames"]), int(group.attrs["embed_dim"])
    m = rows.stop - rows.start
    feats = np.zeros((m, t, d), np.float16)
    # the whole block's statuses: rows past the written ones pad it (VOID), as in the frame store
    status = np.full(whole.stop - whole.start, store.VOID, np.int8)
    status[:m] = np.where(status_in == OK, OK, np.where(status_in == store.VOID, store.VOID, FAILED))
    reasons = np.array([""] * status.size, dtype=object)
    reasons[:m] = ["" if s in (OK, store.VOID) else f"frames: {r}"
                   for s, r in zip(status_in.tolist(), store.as_text(reasons_in).tolist(), strict=True)]
    if ok.size:
        # each video's own pixels only (no padding); videos sharing a box (usually all) share batches
        for box in np.unique(boxes, axis=0):
            same = np.flatnonzero((boxes == box).all(axis=1))
            own = stored[same]
            emb = encode_stored(own.reshape(-1, *own.shape[2:]), tuple(int(v) for v in box), clip, device,
                                batch_size)
            feats[ok[same]] = emb.reshape(same.size, t, d).astype(np.float16)
    group["features"][rows] = feats
    return store.BlockResult(block, status, reasons, digest=store.block_digest({"features": feats}))


def require_data(group: zarr.Group, feats: np.ndarray, rows: np.ndarray) -> None:
    """Features of finished videos are never all zero: zeros there mean a lost chunk."""
    empty = ~np.any(feats.reshape(len(feats), -1), axis=1)
    if empty.any():
        raise DamagedStore(f"feature store {group.store_path} is damaged: features of row {int(rows[empty][0])} "
                           "are missing; run `pipeline verify --repair`, then `pipeline features`")


class CheckedFeatures:
    """Array-like view of a feature store's ``features`` that refuses rows of finished videos read back as
    zeros (a lost chunk), read block by block (for exports)."""

    def __init__(self, group: zarr.Group) -> None:
        self.group, self.array = group, group["features"]
        self.shape, self.dtype, self.ndim = self.array.shape, self.array.dtype, self.array.ndim
        self.status = group["status"][:]

    def __getitem__(self, key: slice) -> np.ndarray:
        if key is Ellipsis:
            key = slice(None)
        feats = store.read_array(self.group, "features", key)
        rows = np.arange(self.shape[0])[key]
        ok = self.status[rows] == OK
        require_data(self.group, feats[ok], rows[ok])
        return feats


def read_rows(group: zarr.Group, rows: np.ndarray) -> np.ndarray:
    """float16 features [len(rows), T, D] of ok rows, checked for lost chunks."""
    feats = store.read_array(group, "features")[rows]
    require_data(group, feats, rows)
    return feats


def video_features(group: zarr.Group, ok_only: bool = True,
                   snapshot: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(temporal-average features float32 [n, D], labels [n], row indices) of the usable rows: the rows live at
    ``snapshot`` (None: the current one; dropped rows are never read) that are ok."""
    status = group["status"][:]
    live = store.live_mask(group, snapshot)
    rows = np.flatnonzero(live & (status == OK)) if ok_only else np.flatnonzero(live)
    feats = np.empty((rows.size, int(group.attrs["embed_dim"])), np.float32)
    block = int(group.attrs.get("block_size", 1024))
    # Read in blocks: the full [N, T, D] array need not fit in memory.
    for lo in range(0, status.size, block * 64):
        hi = min(status.size, lo + block * 64)
        sel = rows[(rows >= lo) & (rows < hi)]
        if sel.size:
            chunk = store.read_array(group, "features", slice(lo, hi))
            require_data(group, chunk[sel - lo], sel)
            # accumulate the temporal mean in float64 (the cache contract for statistics)
            feats[np.searchsorted(rows, sel)] = chunk[sel - lo].mean(axis=1, dtype=np.float64)
    return feats, group["label"][:][rows], rows
