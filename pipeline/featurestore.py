"""The feature store: CLIP image embeddings of every stored frame, rows aligned with the frame store.

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

from . import store
from .errors import DamagedStore
from .framestore import FAILED, OK, read_frames
from .models.clip import LoadedClip, ModelSpec, load_clip

# torch is imported inside the functions that encode: reading features (heads, evaluation) must
# stay free of torch's import time.


def precision_for(device: str) -> str:
    """The compute precision, part of the fingerprint: AMP on GPU and fp32 on CPU never mix rows."""
    import torch

    if device.startswith("cuda"):
        return "amp-bf16" if torch.cuda.is_bf16_supported() else "amp-fp16"
    return "fp32"


def preprocess(frames: np.ndarray, clip: LoadedClip):
    """uint8 [n, H, W, 3] -> normalised float [n, 3, S, S]: the model's own preprocessing (open_clip's
    ``PreprocessCfg``): its resize mode, interpolation, mean and std.

    ``shortest``: short side to S, centre crop (CLIP, the default); ``longest``: long side to S, centre
    pad with black; ``squash``: both sides to S, aspect ratio not kept (SigLIP, DFN and others).
    """
    import torch
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    modes = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}
    mode = modes.get(clip.interpolation, InterpolationMode.BICUBIC)
    s = clip.image_size
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div_(255)
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


def encode_frames(frames: np.ndarray, clip: LoadedClip, device: str, batch_size: int) -> np.ndarray:
    """float32 [n, D] image embeddings (not normalised) of uint8 frames [n, H, W, 3]."""
    import torch

    out = []
    precision = precision_for(device)
    dtype = torch.bfloat16 if precision == "amp-bf16" else torch.float16
    for lo in range(0, len(frames), batch_size):
        x = preprocess(frames[lo:lo + batch_size], clip).to(device, non_blocking=True)
        with torch.no_grad(), torch.autocast(device_type="cuda", dtype=dtype, enabled=precision != "fp32"):
            out.append(clip.model.encode_image(x).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, clip.embed_dim), np.float32)


def features_fingerprint_record(frames_group: zarr.Group, identity: dict, precision: str, batch_size: int) -> dict:
    """Frames, model, precision and batch size: BLAS kernels make a row's last bits depend on the batch it
    was computed in, so rows computed at another batch size are another output, not a resumable one."""
    return {"stage": "features", "frames": frames_group.attrs["fingerprint"], "model": identity,
            "precision": precision, "batch_size": batch_size}


def init_feature_store(group: zarr.Group, frames_group: zarr.Group, clip: LoadedClip, spec: ModelSpec,
                       precision: str, frames_path: str) -> None:
    n, block = int(frames_group.attrs["n"]), int(frames_group.attrs["block_size"])
    t = int(frames_group.attrs["spec"]["num_frames"])
    # Chunked by block, not by video: features are read whole (heads, evaluation, training on the cache).
    # Uncompressed: float16 embeddings barely compress, and decompression was a third of the read time.
    store.create_per_video(group, "features", n, block, (t, clip.embed_dim), "float16", chunk_per_video=False,
                           compress=False)
    # A video that failed in the frame stage fails here too, recorded at creation (whole columns).
    frame_status = frames_group["status"][:]
    failed = frame_status == FAILED
    reasons = None
    if failed.any():
        reasons = np.full(n, "", dtype=object)
        reasons[failed] = ["frames: " + r for r in store.as_text(frames_group["reason"][:])[failed]]
    store.create_bookkeeping(group, n, block, failed=failed, reasons=reasons)
    for name in ("video_id", "path", "label", "targets"):
        if name in frames_group:
            store.create_column(group, name, frames_group[name][:])
    group.attrs.update({
        "stage": "features", "dataset": frames_group.attrs["dataset"], "split": frames_group.attrs["split"],
        "class_names": list(frames_group.attrs["class_names"]), "model": clip.identity, "model_tag": spec.tag,
        "model_spec": {"name": spec.name, "pretrained": spec.pretrained, "quick_gelu": spec.quick_gelu,
                       "key": spec.key},
        "precision": precision, "embed_dim": clip.embed_dim, "num_frames": t, "n": n, "block_size": block,
        "frames_fingerprint": frames_group.attrs["fingerprint"], "frames_path": frames_path,
    })


# One model per worker process (dask workers run many blocks): loading is the expensive part.
_MODELS: dict[Any, LoadedClip] = {}


def remember_model(spec: ModelSpec, device: str, clip: LoadedClip) -> None:
    """Reuse a model this process already loaded (the coordinator's) instead of loading it again."""
    _MODELS.clear()
    _MODELS[(spec, device)] = clip


def _model(spec: ModelSpec, device: str) -> LoadedClip:
    key = (spec, device)
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = load_clip(spec, device)
    return _MODELS[key]


def extract_feature_block(path: str, frames_path: str, block: int, spec: ModelSpec, device: str,
                          batch_size: int, threads: int = 0) -> store.BlockResult:
    """Encode one block of stored videos and write its data (the coordinator records it done)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    group = zarr.open_group(path, mode="r+")
    frames_group = zarr.open_group(frames_path, mode="r")
    clip = _model(spec, device)
    rows = store.block_slice(group, block)
    status_in = frames_group["status"][rows]
    reasons_in = frames_group["reason"][rows]
    t, d = int(group.attrs["num_frames"]), int(group.attrs["embed_dim"])
    m = rows.stop - rows.start
    feats = np.zeros((m, t, d), np.float16)
    status = np.where(status_in == OK, OK, FAILED).astype(np.int8)
    reasons = np.array(["" if s == OK else f"frames: {r}" for s, r in zip(status_in, store.as_text(reasons_in),
                                                                          strict=True)], dtype=object)
    ok = np.flatnonzero(status_in == OK)
    if ok.size:
        frames = read_frames(frames_group, rows)[ok]  # [k, T, H, W, 3]
        boxes = (frames_group["box"][rows][ok] if "box" in frames_group
                 else np.tile([0, frames.shape[2], 0, frames.shape[3]], (ok.size, 1)))
        # each video's own pixels only (no padding); videos sharing a box (usually all) share batches
        for y0, y1, x0, x1 in np.unique(boxes, axis=0):
            same = np.flatnonzero((boxes == (y0, y1, x0, x1)).all(axis=1))
            own = frames[same][:, :, y0:y1, x0:x1]
            emb = encode_frames(own.reshape(-1, *own.shape[2:]), clip, device, batch_size)
            feats[ok[same]] = emb.reshape(same.size, t, d).astype(np.float16)
    group["features"][rows] = feats
    return store.BlockResult(block, status, reasons)


def require_data(group: zarr.Group, feats: np.ndarray, rows: np.ndarray) -> None:
    """Features of finished videos are never all zero: zeros there mean a lost chunk."""
    empty = ~np.any(feats.reshape(len(feats), -1), axis=1)
    if empty.any():
        raise DamagedStore(f"feature store {group.store_path} is damaged: features of row {int(rows[empty][0])} "
                           "are missing; run `pipeline verify --repair`, then `pipeline features`")


def read_rows(group: zarr.Group, rows: np.ndarray) -> np.ndarray:
    """float16 features [len(rows), T, D] of ok rows, checked for lost chunks."""
    feats = store.read_array(group, "features")[rows]
    require_data(group, feats, rows)
    return feats


def video_features(group: zarr.Group, ok_only: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(temporal-average features float32 [n, D], labels [n], row indices) of the usable rows."""
    status = group["status"][:]
    rows = np.flatnonzero(status == OK) if ok_only else np.arange(status.size)
    feats = np.empty((rows.size, int(group.attrs["embed_dim"])), np.float32)
    block = int(group.attrs.get("block_size", 1024))
    arr = group["features"]
    # Read in blocks: the full [N, T, D] array need not fit in memory.
    for lo in range(0, status.size, block * 64):
        hi = min(status.size, lo + block * 64)
        sel = rows[(rows >= lo) & (rows < hi)]
        if sel.size:
            chunk = arr[lo:hi]
            require_data(group, chunk[sel - lo], sel)
            # accumulate the temporal mean in float64 (the cache contract for statistics)
            feats[np.searchsorted(rows, sel)] = chunk[sel - lo].mean(axis=1, dtype=np.float64)
    return feats, group["label"][:][rows], rows
