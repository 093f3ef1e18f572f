"""Frame-stage benchmark: our sampled decode against full decodes and the reference preprocessing.

Run on demand (``make bench``); prints medians and ratios measured in this one run.

Targets on a 10-s, 25-fps, 640x272 H.264 clip (issue #2):
  frame stage within 1.15x of a plain PyAV decode-only pass;
  >= 2.5x faster than (a) decoding every frame and converting each to RGB;
  >= 4x faster than (b) ffmpeg extracting every frame to JPEG at short side 320;
  2 workers >= 1.7x the throughput of 1 on 2 cores;
  peak memory per decode worker < 1 GiB on a 4K clip, flat in video length;
  (issue #12) at least as fast per video as torchcodec (the PyTorch team's decoder, CPU, one
  thread, exact frame access) taking the same 16 segment-centre frames, resized and cropped alike.

torchcodec is optional here (``pip install torchcodec``; it needs FFmpeg's shared libraries, e.g.
Debian's libavcodec59 libavformat59 libavutil57 libswscale6 libswresample4 libavdevice59
libavfilter8); without it that contender is skipped with the reason.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

from pipeline.media.video import FrameSpec, decode_clip, segment_centres

THREADS = 1  # every contender decodes with the same thread count


def natural_clip(path: Path, seconds: float, fps: int, width: int, height: int, seed: int = 0) -> Path:
    """A clip with smooth gradients, moving shapes and sensor-like noise (compresses like real video)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "medium", "crf": "23"}
        for i in range(int(seconds * fps)):
            base = np.stack([(x / width) * 180 + 30 * np.sin(i / 10), (y / height) * 160 + 20,
                             120 + 60 * np.sin((x + y + 4 * i) / 80)], axis=-1)
            for k in range(5):
                cx = (width * (0.1 + 0.8 * ((i * (k + 1) * 2 + 97 * k) % width) / width))
                cy = height * (0.2 + 0.6 * (k / 5))
                mask = (x - cx) ** 2 + (y - cy) ** 2 < (height * 0.12) ** 2
                base[mask] = (40 * k + 30, 200 - 30 * k, 90 + 20 * k)
            img = np.clip(base + rng.normal(0, 1.5, base.shape), 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def decode_only(path: Path) -> None:
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.thread_type, s.thread_count = "AUTO", THREADS
        for _ in c.decode(s):
            pass


def decode_all_rgb(path: Path) -> None:
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.thread_type, s.thread_count = "AUTO", THREADS
        for f in c.decode(s):
            f.to_ndarray(format="rgb24")


def ffmpeg_jpegs(path: Path, out_dir: Path) -> str:
    """The reference code's preprocessing: every frame to JPEG at short side 320."""
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir()
    if shutil.which("ffmpeg"):
        subprocess.run(["ffmpeg", "-loglevel", "error", "-threads", str(THREADS), "-i", str(path),
                        "-vf", "scale=-2:320", "-q:v", "2", str(out_dir / "%06d.jpg")], check=True)
        return "ffmpeg CLI"
    # Same libavcodec work through PyAV when no ffmpeg binary is installed.
    with av.open(str(path)) as c, av.open(str(out_dir / "%06d.jpg"), "w", format="image2") as o:
        s = c.streams.video[0]
        s.thread_type, s.thread_count = "AUTO", THREADS
        w = round(s.codec_context.width * 320 / s.codec_context.height / 2) * 2
        enc = o.add_stream("mjpeg", rate=25)
        enc.width, enc.height, enc.pix_fmt = w, 320, "yuvj420p"
        for f in c.decode(s):
            for p in enc.encode(f.reformat(width=w, height=320, format="yuvj420p")):
                o.mux(p)
        for p in enc.encode():
            o.mux(p)
    return "PyAV image2/mjpeg (no ffmpeg binary)"


def torchcodec_contender(spec: FrameSpec):
    """torchcodec taking the frame stage's frames (the same segment centres), resized and cropped alike.

    Returns (callable(path), None), or (None, why it cannot run here).
    """
    try:
        import torch
        from torchcodec.decoders import VideoDecoder
        from torchvision.transforms.v2 import functional as F
    except Exception as e:  # noqa: BLE001 - ImportError, or a missing FFmpeg library (RuntimeError/OSError)
        return None, f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
    torch.set_num_threads(THREADS)

    def run(path: Path):
        decoder = VideoDecoder(str(path), seek_mode="exact", num_ffmpeg_threads=THREADS)
        index = segment_centres(decoder.metadata.num_frames, spec.num_frames).tolist()
        frames = decoder.get_frames_at(index).data  # uint8 [T, 3, H, W]
        frames = F.resize(frames, [spec.height], antialias=True)
        return F.center_crop(frames, [spec.height, spec.width])

    return run, None


def interleaved_medians(contenders: dict[str, object], repeats: int) -> dict[str, float]:
    """Median seconds of each callable, run round-robin so that machine drift hits all alike."""
    for fn in contenders.values():
        fn()  # warm-up (page cache, codec init)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def worker_throughput(paths: list[Path], workers: int, threads: int, spec: FrameSpec, tmp: Path) -> float:
    """Videos/s of the frame stage's block function on a dask LocalCluster (start-up excluded)."""
    from dask.distributed import Client, LocalCluster, wait

    from pipeline.media.datasets import Manifest, VideoRecord
    from pipeline.storage import store
    from pipeline.storage.framestore import FrameCodec, extract_block, init_frame_store

    manifest = Manifest("bench", ["x"], [VideoRecord(f"v{i}", str(p), 0, "train") for i, p in enumerate(paths)])
    out = tmp / f"store-{workers}-{threads}"
    shutil.rmtree(out, ignore_errors=True)
    group = store.open_output(out, "bench", {}, replace_mismatched=True,
                              init=lambda g: init_frame_store(g, manifest, "train", spec, FrameCodec(), 1))
    blocks = store.pending_blocks(group)
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cl, \
            Client(cl) as client:
        wait([client.submit(extract_block, str(out), b, threads, pure=False) for b in blocks[:workers]])  # warm
        t0 = time.perf_counter()
        wait([client.submit(extract_block, str(out), b, threads, pure=False) for b in blocks[workers:]])
        return (len(blocks) - workers) / (time.perf_counter() - t0)


# VmHWM (peak resident set of this address space) rather than ru_maxrss, which a child inherits
# from its parent's size at fork time and keeps across exec.
PEAK_RSS = """
import sys
from pipeline.media.video import FrameSpec, decode_clip, segment_centres
decode_clip(sys.argv[1], FrameSpec(), threads=int(sys.argv[2]))
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")))
"""


def peak_rss_mib(path: Path, threads: int) -> float:
    out = subprocess.run([sys.executable, "-c", PEAK_RSS, str(path), str(threads)], capture_output=True,
                         text=True, check=True)
    return int(out.stdout.strip()) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--videos", type=int, default=24, help="videos for the 1-vs-2-worker throughput")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-frames-"))
    try:
        clip = natural_clip(tmp / "clip.mp4", 10, 25, 640, 272)
        spec = FrameSpec()  # the frame stage's defaults, so the benchmark measures what users run
        keys = FrameSpec(seek="keyframes")
        ours_name = f"frame stage ({spec.num_frames} frames, {spec.height}x{spec.width})"
        how = ffmpeg_jpegs(clip, tmp / "jpg")
        torchcodec, why_not = torchcodec_contender(spec)
        peers = {"torchcodec, same frames + resize/crop": lambda: torchcodec(clip)} if torchcodec else {}
        results = interleaved_medians({
            **peers,
            "decode-only (PyAV, baseline)": lambda: decode_only(clip),
            ours_name: lambda: decode_clip(str(clip), spec, threads=THREADS),
            "frame stage --seek keyframes": lambda: decode_clip(str(clip), keys, threads=THREADS),
            "(a) decode all + RGB": lambda: decode_all_rgb(clip),
            f"(b) all frames to JPEG @320 [{how}]": lambda: ffmpeg_jpegs(clip, tmp / "jpg"),
        }, args.repeats)
        base = results["decode-only (PyAV, baseline)"]
        ours = results[ours_name]
        print(f"clip: 10 s, 25 fps, 640x272 H.264; {THREADS} decoder thread(s); medians of {args.repeats}")
        for name, t in results.items():
            print(f"  {name:<58} {t * 1000:8.1f} ms   {t / base:5.2f}x decode-only   {t / ours:5.2f}x ours")
        print(f"  ours / decode-only = {ours / base:.2f} (target <= 1.15)")
        print(f"  (a) / ours = {results['(a) decode all + RGB'] / ours:.2f} (target >= 2.5)")
        b = next(v for k, v in results.items() if k.startswith("(b)"))
        print(f"  (b) / ours = {b / ours:.2f} (target >= 4)")
        if torchcodec:
            peer = results["torchcodec, same frames + resize/crop"]
            print(f"  torchcodec / ours = {peer / ours:.2f} (target >= 1: the frame stage at least as fast)")
        else:
            print(f"  torchcodec: not run here ({why_not})")

        paths = [clip] * args.videos
        one = worker_throughput(paths, 1, 1, spec, tmp)
        two = worker_throughput(paths, 2, 1, spec, tmp)
        one_two_threads = worker_throughput(paths, 1, 2, spec, tmp)
        print(f"workers ({os.cpu_count()} cores): 1 worker x 1 thread {one:.1f} videos/s, "
              f"2 workers x 1 thread {two:.1f} videos/s -> {two / one:.2f}x (target >= 1.7); "
              f"1 worker x 2 threads {one_two_threads:.1f} videos/s")

        uhd_short = natural_clip(tmp / "uhd2.mp4", 2, 25, 3840, 2160)
        uhd_long = natural_clip(tmp / "uhd6.mp4", 6, 25, 3840, 2160)
        for threads in (1, 2):
            a, b6 = peak_rss_mib(uhd_short, threads), peak_rss_mib(uhd_long, threads)
            print(f"peak RSS, 4K decode, {threads} thread(s): 2-s clip {a:.0f} MiB, 6-s clip {b6:.0f} MiB "
                  f"(target < 1024, flat in length)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
