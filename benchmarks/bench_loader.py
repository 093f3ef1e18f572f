"""Fine-tuning data path: loader clips/s alone vs training clips/s, and loader memory over epochs.

Run on demand (`make bench`). The question (issue #4): is the loader the bottleneck? It makes a
frame store of generated 64x64 videos (T_cache 16), then measures, interleaved round-robin, medians:
- the loader alone (JPEG decode of T frames, RandomResizedCrop + flip + RandAugment, normalise)
  with 0, 1 and 2 worker processes;
- full fine-tuning steps of the demo's tiny CLIP (8 frames, batch 16) fed by the loader;
and the RSS of the main process and of the workers at the end of each of several epochs (a leak
grows it epoch after epoch).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from pipeline.learning.clips import FrameClipSet, usable_rows  # noqa: E402
from pipeline.learning.pretrain import PretrainConfig  # noqa: E402
from pipeline.learning.training import TrainConfig, cross_entropy  # noqa: E402
from pipeline.learning.transforms import AugmentConfig, Normalization  # noqa: E402
from pipeline.media.world import WorldSpec, generate_world  # noqa: E402
from pipeline.models.classifier import CosineHead, build_video_classifier  # noqa: E402

FRAMES, BATCH, REPEATS = 8, 16, 5


def make_store(base: Path) -> Path:
    from conftest import run_inproc

    generate_world(base / "world", WorldSpec(train_per_class=6, val_per_class=1, frames=16, size=64, seed=0))
    run_inproc("frames", "-d", "csv", "--root", str(base / "world"), "--name", "bench", "--num-frames", "16",
               "--height", "64", "--width", "64", "--split", "train", "--cache", str(base / "cache"), "-q")
    return base / "cache" / "frames" / "bench" / "train"


def loader(data: FrameClipSet, workers: int, epoch: int):
    batches = [list(range(lo, min(len(data), lo + BATCH))) for lo in range(0, len(data), BATCH)]

    class View(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return data.item(i, epoch, True)

    return torch.utils.data.DataLoader(View(), batch_sampler=batches, num_workers=workers)


def loader_rate(data: FrameClipSet, workers: int, steps: int) -> float:
    it = iter(loader(data, workers, 0))
    next(it)  # worker start-up is not throughput
    start = time.perf_counter()
    for _ in range(steps):
        next(it)
    return steps * BATCH / (time.perf_counter() - start)


def train_rate(data: FrameClipSet, model, opt, workers: int, steps: int) -> float:
    it = iter(loader(data, workers, 1))
    next(it)
    start = time.perf_counter()
    for _ in range(steps):
        x, y = next(it)
        loss = cross_entropy(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * BATCH / (time.perf_counter() - start)


def main() -> None:
    import open_clip

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_store(Path(tmp))
        import zarr

        rows, labels = usable_rows(zarr.open_group(str(path), mode="r"))
        norm = Normalization(64, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
        aug = AugmentConfig(crop_scale=(0.5, 1.0), flip=0.5, grayscale=0.0, randaugment_ops=2, randaugment_magnitude=9)
        data = FrameClipSet(str(path), rows, labels, FRAMES, norm, seed=0, aug=aug)
        cfg = PretrainConfig()
        clip = open_clip.model.CLIP(**cfg.model_cfg())
        model = build_video_classifier(clip.visual, cfg.embed_dim, CosineHead(torch.randn(48, cfg.embed_dim), False),
                                       "tap", FRAMES)
        opt = torch.optim.AdamW(model.parameters(), lr=TrainConfig().lr)
        steps = len(data) // BATCH - 2
        rates: dict[str, list[float]] = {"loader w0": [], "loader w1": [], "loader w2": [], "train w2": []}
        for _ in range(REPEATS):  # interleaved round-robin
            for w in (0, 1, 2):
                rates[f"loader w{w}"].append(loader_rate(data, w, steps))
            rates["train w2"].append(train_rate(data, model, opt, 2, min(steps, 6)))
        med = {k: statistics.median(v) for k, v in rates.items()}
        print(f"{len(data)} clips of {FRAMES} frames (64 px), batch {BATCH}; medians of {REPEATS}, clips/s:")
        for k, v in med.items():
            print(f"  {k:<10} {v:8.1f}")
        print(f"loader (2 workers) / training: {med['loader w2'] / med['train w2']:.1f}x "
              "(> 1: the loader keeps up with the tiny model's training on this machine)")

        print("memory over epochs (MiB): main RSS, sum of worker RSS at the end of the epoch")
        me = psutil.Process()
        for epoch in range(4):
            it = iter(loader(data, 2, epoch))
            for k, _ in enumerate(it):
                if k == steps - 1:
                    workers = sum(c.memory_info().rss for c in me.children(recursive=True)) / 2**20
            print(f"  epoch {epoch}: {me.memory_info().rss / 2**20:7.1f} {workers:7.1f}")


if __name__ == "__main__":
    main()
