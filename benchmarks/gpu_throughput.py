"""GPU throughput of the pipeline at the K400 recipe's size (issue #14): one prepared script for a lent GPU.

    python benchmarks/gpu_throughput.py [--out gpu_throughput.json] [--budget-s 270] [--peak-tflops N]
    python benchmarks/gpu_throughput.py --smoke     # on a CPU, a tiny model: proves the script runs

ViT-B/16 with random weights (throughput needs no pretrained weights), 8 frames a clip, bf16 autocast
(fp16 where bf16 is missing), fused AdamW. Measures, most important first, until the time budget:
- features: videos/s of 8 frames from a JPEG store (256 x 456, q90): decode on the GPU (nvJPEG) +
  preprocess + the image tower, 256 frames a pass (eager, then torch.compile);
- the data path alone: the loader worker's share per core (read bytes + draw parameters) and the
  GPU's share (decode + RandAugment 2/9 per frame + crop + flip + grayscale + normalise), clips/s;
- training: clips/s per GPU at batch 32 and 64 with TAP, T-Trans and TokenT1D, with and without
  gradient checkpointing and torch.compile; peak memory; FLOPs per clip counted by torch's
  FlopCounterMode (forward + backward), achieved TFLOP/s and its fraction of the device's bf16 peak.
Prints one table and writes it as JSON. Targets on one H100/H200: features >= 2,000 videos/s,
training >= 700 clips/s, the data path faster than training (never the bottleneck).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

FRAMES, CLASSES = 8, 400
# dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets; --peak-tflops for others
BF16_PEAK = {"H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0,
             "L40S": 362.0, "L4": 121.0, "A10": 125.0}
TINY = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, warmup: int, repeats: int) -> float:  # noqa: ANN001
    """Median seconds of ``fn()`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def new_clip(smoke: bool):
    import open_clip

    if smoke:
        return open_clip.model.CLIP(**TINY), TINY["embed_dim"], TINY["vision_cfg"]["image_size"]
    return open_clip.create_model("ViT-B-16", force_quick_gelu=True), 512, 224


def features_row(store: Path, device: torch.device, smoke: bool, compile_: bool, frames_per_pass: int) -> dict:
    import zarr

    from pipeline.featurestore import encode_stored
    from pipeline.models.clip import LoadedClip

    model, _, size = new_clip(smoke)
    model = model.to(device).eval()
    if compile_:
        model.visual.compile()
    clip = LoadedClip(model=model, tokenizer=None, image_size=size, mean=(0.48145466, 0.4578275, 0.40821073),
                      std=(0.26862954, 0.26130258, 0.27577711), interpolation="bicubic")
    group = zarr.open_group(str(store), mode="r")
    stored = group["frames"][:, ::4].reshape(-1)  # 8 of the 32 stored frames of every video
    box = tuple(int(v) for v in group["box"][0])
    name = f"cuda:{device.index or 0}" if device.type == "cuda" else "cpu"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(lambda: encode_stored(stored, box, clip, name, frames_per_pass), device, 2 if compile_ else 1, 3)
    videos = len(stored) / FRAMES
    return {"what": "features" + (" compile" if compile_ else ""), "batch": frames_per_pass,
            "per_s": videos / seconds, "unit": "videos/s", "peak_gib": peak_memory_gib(device)}


def data_path_rows(store: Path, device: torch.device, smoke: bool, batch: int) -> list[dict]:
    import zarr
    from bench_data_path import MEAN, STD

    from pipeline.batchclips import train_batch
    from pipeline.clips import AugmentConfig, FrameClipSet, Normalization
    from pipeline.training import _collate

    n = int(zarr.open_group(str(store), mode="r")["frames"].shape[0])
    norm, aug = Normalization(32 if smoke else 224, MEAN, STD), AugmentConfig()
    data = FrameClipSet(str(store), np.arange(n), np.arange(n) % 4, FRAMES, norm, 0, aug, batched=True)
    indices = [i % n for i in range(batch)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    worker_s = timed(lambda: data.items(indices, 0, True), torch.device("cpu"), 1, 5)
    torch.set_num_threads(threads)
    _, encoded, _ = _collate([(i, *pair) for i, pair in zip(indices, data.items(indices, 0, True), strict=True)])
    encoded = [c.pin_memory() for c in encoded] if device.type == "cuda" else encoded
    device_s = timed(lambda: train_batch(encoded, device, norm, aug), device, 2, 5)
    return [{"what": "data path: worker share, one core", "batch": batch, "per_s": batch / worker_s,
             "unit": "clips/s"},
            {"what": "data path: device share", "batch": batch, "per_s": batch / device_s, "unit": "clips/s",
             "peak_gib": peak_memory_gib(device)}]


def flops_per_clip(model, x: torch.Tensor, y: torch.Tensor) -> float:  # noqa: ANN001
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.training import cross_entropy

    with FlopCounterMode(display=False) as counter:
        cross_entropy(model, x[:2], y[:2]).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def train_row(device: torch.device, smoke: bool, temporal: str, batch: int, checkpointing: bool, compile_: bool,
              peak_tflops: float | None) -> dict:
    from pipeline.models.classifier import CosineHead, build_video_classifier
    from pipeline.training import autocast_for, cross_entropy

    clip, dim, size = new_clip(smoke)
    torch.manual_seed(0)
    model = build_video_classifier(clip.visual, dim, CosineHead(torch.randn(CLASSES, dim), learnable=False), temporal,
                                   FRAMES, grad_checkpointing=checkpointing).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-6, betas=(0.9, 0.98), weight_decay=0.2,
                            fused=True if device.type == "cuda" else None)
    autocast, scaler = autocast_for(device, True)
    x = torch.randn(batch, FRAMES, 3, size, size, device=device)
    y = torch.randint(0, CLASSES, (batch,), device=device)
    flops = flops_per_clip(model, x, y)
    if compile_:
        model.visual.compile()

    def step() -> None:
        with autocast:
            loss = cross_entropy(model, x, y)
        opt.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(step, device, 4 if compile_ else 3, 3 if smoke else 8)
    clips_s = batch / seconds
    tflops = flops * clips_s / 1e12
    name = f"train {temporal}" + (" ckpt" if checkpointing else "") + (" compile" if compile_ else "")
    return {"what": name, "batch": batch, "per_s": clips_s, "unit": "clips/s", "peak_gib": peak_memory_gib(device),
            "gflop_per_clip": flops / 1e9, "tflop_s": tflops,
            "of_peak": tflops / peak_tflops if peak_tflops else None}


def device_peak(device: torch.device, given: float | None) -> float | None:
    if given or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK.items() if k in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, tiny store: check that it runs")
    parser.add_argument("--out", default="gpu_throughput.json")
    parser.add_argument("--budget-s", type=float, default=270.0, help="stop starting new rows after this")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak")
    args = parser.parse_args()
    from bench_data_path import make_store

    started = time.perf_counter()
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    peak = device_peak(device, args.peak_tflops)
    tasks = [lambda: [features_row(store, device, args.smoke, False, 256)],
             lambda: data_path_rows(store, device, args.smoke, 8 if args.smoke else 64)]
    for temporal in ("tap", "tokent1d", "ttrans"):
        tasks.append(lambda t=temporal: [train_row(device, args.smoke, t, 64, False, False, peak)])
    tasks += [lambda: [train_row(device, args.smoke, "tap", 32, False, False, peak)],
              lambda: [train_row(device, args.smoke, "tap", 64, True, False, peak)],
              lambda: [train_row(device, args.smoke, "tokent1d", 64, True, False, peak)],
              lambda: [train_row(device, args.smoke, "tap", 64, False, True, peak)],
              lambda: [features_row(store, device, args.smoke, True, 256)],
              lambda: [train_row(device, args.smoke, "tokent1d", 32, False, False, peak)],
              lambda: [train_row(device, args.smoke, "ttrans", 32, False, False, peak)],
              lambda: [train_row(device, args.smoke, "ttrans", 64, True, False, peak)],
              lambda: [train_row(device, args.smoke, "tokent1d", 64, False, True, peak)]]
    if args.smoke:  # compile rows take a minute each on a CPU: the eager rows prove the script
        tasks = tasks[:4]
    rows, skipped = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "frames"
        make_store(store, 8 if args.smoke else 64)
        for task in tasks:
            if time.perf_counter() - started > args.budget_s:
                skipped += 1
                continue
            try:
                rows += task()
            except torch.OutOfMemoryError as e:
                rows.append({"what": "out of memory", "error": str(e).splitlines()[0]})
                torch.cuda.empty_cache()
            print(f"  ... {rows[-1]['what']} done at {time.perf_counter() - started:.0f} s", flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)"
    amp = "fp32" if device.type == "cpu" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16") + " autocast"
    print(f"\n{name}; {amp}; "
          f"{FRAMES} frames a clip; bf16 peak {peak or '?'} TFLOP/s; {skipped} rows skipped by the time budget")
    print(f"{'what':<36} {'batch':>5} {'rate':>10} {'unit':<9} {'peak GiB':>8} {'GFLOP/clip':>10} "
          f"{'TFLOP/s':>8} {'of peak':>7}")

    def fmt(v, spec: str) -> str:  # noqa: ANN001
        return format(v, spec) if isinstance(v, (int, float)) else "-"
    for r in rows:
        print(f"{r['what']:<36} {fmt(r.get('batch'), 'd'):>5} {fmt(r.get('per_s'), ',.0f'):>10} {r.get('unit', ''):<9} "
              f"{fmt(r.get('peak_gib'), '.1f'):>8} {fmt(r.get('gflop_per_clip'), '.0f'):>10} "
              f"{fmt(r.get('tflop_s'), '.0f'):>8} {fmt(r.get('of_peak'), '.0%'):>7}")
    Path(args.out).write_text(json.dumps({"device": name, "peak_bf16_tflops": peak, "rows": rows,
                                          "seconds": time.perf_counter() - started}, indent=2))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
