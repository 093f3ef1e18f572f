"""Frame-cache codec measurement: raw uint8 + zstd (Zarr) against JPEG bytes.

Run on demand. Prints bytes per video and read speed (decode a whole stored video back to uint8)
for both encodings of the same frames: the frame stage's default box (16 frames at 256x456) from a
natural-looking 640x272 clip (see bench_frames.natural_clip), plus the demo world's 64x64 clips.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from bench_frames import natural_clip
from torchvision.io import decode_jpeg, encode_jpeg
from zarr.codecs import ZstdCodec

from pipeline.media.video import FrameSpec, decode_clip
from pipeline.media.world import WorldSpec, render_clip


def measure(frames: np.ndarray, tmp: Path, repeats: int = 20) -> dict[str, tuple[float, float]]:
    """{codec: (bytes per video, ms to read one video back)}."""
    out = {}
    t, h, w, _ = frames.shape
    for level in (1, 3):
        path = tmp / f"raw{level}"
        shutil.rmtree(path, ignore_errors=True)
        arr = zarr.create_array(str(path), shape=(1, t, h, w, 3), chunks=(1, t, h, w, 3), dtype="uint8",
                                compressors=[ZstdCodec(level=level)])
        arr[0] = frames
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != "zarr.json")
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            arr[0]
            times.append(time.perf_counter() - t0)
        out[f"raw uint8 + zstd-{level}"] = (size, statistics.median(times) * 1000)
    chw = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()
    for quality in (75, 90):
        blobs = [encode_jpeg(img, quality=quality) for img in chw]
        size = sum(b.numel() for b in blobs)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            decode_jpeg(blobs)
            times.append(time.perf_counter() - t0)
        out[f"JPEG q{quality}"] = (size, statistics.median(times) * 1000)
    return out


def main() -> None:
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-codec-"))
    try:
        clip = natural_clip(tmp / "clip.mp4", 10, 25, 640, 272)
        box = FrameSpec()  # the frame stage's defaults, so the benchmark measures what users store
        real_like = decode_clip(str(clip), box).frames
        spec = WorldSpec()
        world = render_clip(spec, "small", "red", "ring", np.random.default_rng(0))
        natural = f"natural-looking clip, {box.num_frames} x {box.height}x{box.width}"
        for name, frames in ((natural, real_like), ("demo world, 16 x 64x64", world)):
            raw = frames.nbytes
            print(f"{name} (uncompressed {raw / 1024:.0f} KiB per video), 1 thread:")
            for codec, (size, ms) in measure(frames, tmp).items():
                print(f"  {codec:<20} {size / 1024:8.1f} KiB/video ({raw / size:5.1f}x smaller)  "
                      f"read {ms:6.2f} ms/video ({16 / ms * 1000:7.0f} frames/s)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
