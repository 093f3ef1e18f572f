"""CPU cost per training clip of the per-clip data path vs the batched (GPU) data path, at the K400 recipe's size.

Run on demand: ``python benchmarks/bench_data_path.py [--videos 48] [--repeats 5]``. A JPEG frame store
of the default shape (32 frames of 256 x 456 per video, q90; synthetic scenes with the texture of
real frames) and the official recipe: 8 frames per clip, RandAugment(2, 9) per frame, then
RandomResizedCrop to 224, flip, grayscale, normalise. One core (``torch.set_num_threads(1)``).
Interleaved round-robin; medians of ``--repeats``.

- (a) the per-clip path: what a loader worker does per clip today (read, decode 8 JPEGs, augment);
- (b) the batched path's CPU share: what a loader worker does per clip there (read the 8 frames'
  bytes, draw the augmentation parameters);
- (c) the batched path run on the CPU device: (b) plus the batch's decode and augmentation.

Target (issue #14): (b) costs at most 1/20 of (a), i.e. a 16-core host feeds more than 2,000 clips/s
to GPUs that decode and augment.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.learning.clips import FrameClipSet  # noqa: E402
from pipeline.learning.training import _collate, to_device  # noqa: E402
from pipeline.learning.transforms import AugmentConfig, Normalization  # noqa: E402
from pipeline.media.datasets.manifest import Manifest, VideoRecord  # noqa: E402
from pipeline.media.video import FrameSpec  # noqa: E402
from pipeline.storage.framestore import FrameCodec, encode_jpeg, init_frame_store  # noqa: E402

T_CACHE, HEIGHT, WIDTH, FRAMES, SIZE, BATCH = 32, 256, 456, 8, 224, 16
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def scene(rng: np.random.Generator, t: int) -> np.ndarray:
    """A frame with smooth structure, edges and sensor noise: JPEG sizes like real video frames."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    phase = rng.uniform(0, 6.28, 3)
    img = np.stack([127 + 80 * np.sin(x / (23 + 7 * c) + y / 41 + phase[c] + t / 5) for c in range(3)], -1)
    for _ in range(6):  # a few moving blocks: edges
        y0, x0 = rng.integers(0, HEIGHT - 60), rng.integers(0, WIDTH - 80)
        img[y0:y0 + 60, x0 + t:x0 + t + 80] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    return img.clip(0, 255).astype(np.uint8)


def make_store(path: Path, videos: int, distinct: int | None = None) -> None:
    """A JPEG frame store of ``videos`` rows; with ``distinct``, only that many are encoded and the other rows
    repeat their bytes (a decoder's cost does not depend on having seen the bytes before; encoding does take
    about half a second a video on one core)."""
    records = [VideoRecord(f"v{i}", f"v{i}.mp4", i % 4, "train") for i in range(videos)]
    manifest = Manifest("bench", ["a", "b", "c", "d"], records)
    group = zarr.open_group(str(path), mode="w")
    init_frame_store(group, manifest, "train", FrameSpec(num_frames=T_CACHE, height=HEIGHT, width=WIDTH),
                     FrameCodec(), block_size=16)
    rng = np.random.default_rng(0)
    frames = np.empty((videos, T_CACHE), dtype=object)
    for i in range(videos):
        frames[i] = ([encode_jpeg(scene(rng, t), 90) for t in range(T_CACHE)] if i < (distinct or videos)
                     else frames[i % distinct])
    group["frames"][:] = frames
    group["box"][:] = np.tile(np.array([0, HEIGHT, 0, WIDTH], np.int16), (videos, 1))


def batches(n: int, epoch: int) -> list[list[int]]:
    order = np.random.default_rng(epoch).permutation(n)  # shuffled, as in training: rows of many shards
    return [order[lo:lo + BATCH].tolist() for lo in range(0, n - BATCH + 1, BATCH)]


def worker_rate(data: FrameClipSet, epoch: int, n: int) -> float:
    """Clips/s of what a loader worker does: ``items`` of each batch (the DataLoader's ``__getitems__``)."""
    start = time.perf_counter()
    done = sum(len(data.items(b, epoch, True)) for b in batches(n, epoch))
    return done / (time.perf_counter() - start)


def batched_on_cpu_rate(data: FrameClipSet, epoch: int, n: int) -> float:
    start = time.perf_counter()
    done = 0
    for b in batches(n, epoch):
        _, x, _ = _collate([(i, *pair) for i, pair in zip(b, data.items(b, epoch, True), strict=True)])
        done += len(to_device(data, x, torch.device("cpu"), True))
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "frames"
        make_store(path, args.videos)
        rows, labels = np.arange(args.videos), np.arange(args.videos) % 4
        norm, aug = Normalization(SIZE, MEAN, STD), AugmentConfig()
        per_clip = FrameClipSet(str(path), rows, labels, FRAMES, norm, 0, aug)
        batched = FrameClipSet(str(path), rows, labels, FRAMES, norm, 0, aug, batched=True)
        jpeg_kib = np.mean([len(b) for b in zarr.open_group(str(path), mode="r")["frames"][0]]) / 1024
        worker_rate(per_clip, 99, BATCH), worker_rate(batched, 99, BATCH)  # warm-up: first opens, imports
        rates: dict[str, list[float]] = {"a": [], "b": [], "c": []}
        for r in range(args.repeats):  # interleaved round-robin
            rates["a"].append(worker_rate(per_clip, r, args.videos))
            rates["b"].append(worker_rate(batched, r, args.videos))
            rates["c"].append(batched_on_cpu_rate(batched, r, args.videos))
        med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"{args.videos} videos, {T_CACHE} JPEG frames of {HEIGHT}x{WIDTH} each ({jpeg_kib:.0f} KiB a frame); "
          f"clips of {FRAMES} frames to {SIZE}, RandAugment 2/9 per frame; one core; medians of {args.repeats}")
    names = {"a": "(a) per-clip path (worker decodes + augments)",
             "b": "(b) batched path, CPU share (read bytes + draw)",
             "c": "(c) batched path on the CPU device"}
    for k, label in names.items():
        print(f"  {label:<50} {med[k]:9.1f} clips/s per core  {1e3 / med[k]:8.2f} ms a clip")
    ratio = med["b"] / med["a"]
    print(f"(a)/(b): the batched path's CPU share costs 1/{ratio:.0f} of the per-clip path "
          f"(target: 1/20 or less); 16 cores feed {16 * med['b']:,.0f} clips/s")


if __name__ == "__main__":
    main()
