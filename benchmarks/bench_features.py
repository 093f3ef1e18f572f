"""Feature-store benchmark: evaluation from the cache, LDA fit time and memory, feature throughput.

Run on demand. Targets (issue #3): zero-shot evaluation over 20,000 cached videos x 8 frames x 512
under 2 s on 2 cores; LDA fit on 24,000 x 512 under 15 s; peak memory of the LDA fit on
24,000 x 768 under 2 GiB; feature extraction memory bounded by the batch size, not the dataset size.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from pipeline.learning import evaluation
from pipeline.storage import store
from pipeline.storage.featurestore import video_features

VMHWM = 'next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM"))'


def synthetic_store(path: Path, n: int, t: int, d: int, c: int, block: int = 16, seed: int = 0) -> np.ndarray:
    """A feature store laid out like the features stage's, with class structure: returns the class means."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((c, d)).astype(np.float32)
    labels = np.arange(n) % c
    group = zarr.open_group(str(path), mode="w")
    arr = store.create_per_video(group, "features", n, block, (t, d), "float16", chunk_per_video=False,
                                 compress=False)
    for lo in range(0, n, block * 64):
        hi = min(n, lo + block * 64)
        x = means[labels[lo:hi]][:, None, :] + 2.0 * rng.standard_normal((hi - lo, t, d)).astype(np.float32)
        arr[lo:hi] = x.astype(np.float16)
    store.create_per_video(group, "status", n, block, (), "int8", fill_value=1)
    group["status"][:] = 1
    store.create_column(group, "label", labels.astype(np.int32))
    group.attrs.update({"embed_dim": d, "block_size": block, "n": n})
    return means


def bench_eval(tmp: Path) -> None:
    means = synthetic_store(tmp / "eval", 20_000, 8, 512, 400)
    group = zarr.open_group(str(tmp / "eval"), mode="r")
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        feats, labels, _ = video_features(group)
        m = evaluation.metrics(evaluation.cosine_logits(feats, means), labels)
        times.append(time.perf_counter() - t0)
    print(f"zero-shot eval, 20,000 videos x 8 x 512 from the store: median {np.median(times):.2f} s "
          f"(target < 2 s); top-1 {m['top1']:.1f}%")


LDA_CHILD = """
import sys, time, numpy as np
from pipeline.models.heads import lda_head
n, d, c = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
y = np.arange(n) % c
x = (rng.standard_normal((c, d))[y] + 2 * rng.standard_normal((n, d))).astype(np.float32)
t0 = time.perf_counter()
head = lda_head(x, y, c)
print(time.perf_counter() - t0, head.shape, """ + VMHWM + """)
"""


def bench_lda() -> None:
    for d in (512, 768):
        out = subprocess.run([sys.executable, "-c", LDA_CHILD, "24000", str(d), "400"], capture_output=True,
                             text=True, check=True).stdout.split()
        print(f"LDA fit (svd) with its rounding check (a second fit), 24,000 x {d}, 400 classes: "
              f"{float(out[0]):.1f} s, "
              f"peak RSS {int(out[-1]) / 1024:.0f} MiB (targets: < 15 s at 512, < 2048 MiB at 768)")


FEATURES_CHILD = """
import sys, time
from pipeline.storage.featurestore import extract_feature_block
from pipeline.models.clip import ModelSpec
import zarr
path, frames, spec, batch = sys.argv[1], sys.argv[2], ModelSpec("local-dir:" + sys.argv[3]), int(sys.argv[4])
g = zarr.open_group(path, mode="r")
blocks = -(-int(g.attrs["n"]) // int(g.attrs["block_size"]))
t0 = time.perf_counter()
for b in range(blocks):
    extract_feature_block(path, frames, b, spec, "cpu", batch, 0)
print(time.perf_counter() - t0, """ + VMHWM + """)
"""


def bench_features(tmp: Path) -> None:
    """Tiny model on CPU: frames/s, and peak memory for 64 vs 256 videos at the same batch size."""
    import open_clip
    import torch

    from pipeline.media.datasets import Manifest, VideoRecord
    from pipeline.media.video import FrameSpec
    from pipeline.models.clip import ModelSpec, load_clip, save_local_dir
    from pipeline.storage.featurestore import init_feature_store
    from pipeline.storage.framestore import FrameCodec, init_frame_store

    cfg = {"embed_dim": 128, "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4}}
    torch.manual_seed(0)
    model_dir = save_local_dir(open_clip.model.CLIP(**cfg), cfg, tmp / "tiny")
    spec = ModelSpec(f"local-dir:{model_dir}")
    clip = load_clip(spec)
    fspec = FrameSpec(num_frames=8, height=64, width=64)
    rng = np.random.default_rng(0)
    for n in (64, 256):
        manifest = Manifest("b", ["x"], [VideoRecord(f"v{i}", "", 0, "train") for i in range(n)])
        fpath, path = tmp / f"frames{n}", tmp / f"features{n}"
        fg = store.open_output(fpath, f"f{n}", {}, replace_mismatched=True,
                               init=lambda g, m=manifest: init_frame_store(g, m, "train", fspec, FrameCodec("raw"), 16))
        fg["frames"][:] = rng.integers(0, 255, (n, 8, 64, 64, 3), dtype=np.uint8)
        fg["status"][:] = 1
        fg["box"][:] = np.tile(np.array([0, 64, 0, 64], np.int16), (n, 1))  # (y0, y1, x0, x1): all picture
        store.open_output(path, f"x{n}", {}, replace_mismatched=True,
                          init=lambda g, fg=fg, fp=fpath: init_feature_store(g, fg, clip, spec, "fp32", str(fp)))
        out = subprocess.run([sys.executable, "-c", FEATURES_CHILD, str(path), str(fpath), str(model_dir), "64"],
                             capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"the feature child failed:\n{out.stderr[-3000:]}")
        out = out.stdout.split()
        seconds, peak = float(out[0]), int(out[-1]) / 1024
        print(f"features, tiny CLIP (64 px, 4+4 layers) on CPU, batch 64: {n} videos x 8 frames: "
              f"{n * 8 / seconds:.0f} frames/s, peak RSS {peak:.0f} MiB")


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-features-"))
    try:
        bench_eval(tmp)
        bench_lda()
        bench_features(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
