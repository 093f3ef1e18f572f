"""GPU throughput of the pipeline at the K400 recipe's size (issues #14, #22): one prepared script for a lent GPU.

    python benchmarks/gpu_throughput.py [--out cache/gpu_throughput.json] [--budget-s 270] [--peak-tflops N]
    python benchmarks/gpu_throughput.py --smoke     # on a CPU, a tiny model: proves the script runs

ViT-B/16 with random weights (throughput needs no pretrained weights), 8 frames a clip, bf16 autocast
(fp16 where bf16 is missing), fused AdamW. Rows, most important first, until the time budget:
- features: videos/s of 8 frames from a JPEG store (256 x 456, q90): decode on the GPU (nvJPEG) +
  preprocess + the image tower, 1,024 frames a pass (eager; torch.compile near the end);
- training: clips/s per GPU at batch 32 and 64 with T-Trans (6 layers) and TokenT1D, then the data path,
  gradient checkpointing, TAP and torch.compile; peak memory; matrix-product FLOPs per clip counted by
  torch's FlopCounterMode (forward + backward), the encoder's share of them, and the fraction of the
  device's bf16 peak the encoder's matrix products reach;
- the data path alone: the loader worker's share per core (read bytes + draw parameters) and the
  device's share (decode + RandAugment 2/9 per frame + crop + flip + grayscale + normalise), clips/s.

Never dies half-way: every row is guarded (an exception becomes a row with the error, and the run goes
on), and the JSON (``--out``) and its markdown table (the same name, ``.md``) are rewritten after every
row, atomically, so a run killed at any moment leaves every row it measured. Targets on one H100/H200
are printed next to the figures (``TARGETS``).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
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
# The issue's targets on one H100/H200 (ViT-B/16, 8 frames, bf16).
TARGETS = {"features_videos_s": 2000.0, "train_clips_s": 700.0, "encoder_of_peak": 0.5,
           "data_path_vs_training": 3.0, "peak_gib_batch_32": 40.0}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
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


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def new_clip(smoke: bool):
    import open_clip

    if smoke:
        return open_clip.model.CLIP(**TINY), TINY["embed_dim"], TINY["vision_cfg"]["image_size"]
    return open_clip.create_model("ViT-B-16", force_quick_gelu=True), 512, 224


def features_row(store: Path, device: torch.device, smoke: bool, compile_: bool, frames_per_pass: int) -> dict:
    import zarr

    from pipeline.models.clip import LoadedClip
    from pipeline.storage.featurestore import encode_stored

    model, _, size = new_clip(smoke)
    model = model.to(device).eval()
    if compile_:
        model.visual.compile()
    clip = LoadedClip(model=model, tokenizer=None, image_size=size, mean=(0.48145466, 0.4578275, 0.40821073),
                      std=(0.26862954, 0.26130258, 0.27577711), interpolation="bicubic")
    group = zarr.open_group(str(store), mode="r")
    # every stored frame, as videos of 8 frames (smoke: 8 frames of each stored video)
    stored = (group["frames"][:, ::4] if smoke else group["frames"][:]).reshape(-1)
    box = tuple(int(v) for v in group["box"][0])
    name = f"cuda:{device.index or 0}" if device.type == "cuda" else "cpu"
    reset_peak(device)
    seconds = timed(lambda: encode_stored(stored, box, clip, name, frames_per_pass), device, 2 if compile_ else 1, 3)
    return {"batch": frames_per_pass, "per_s": len(stored) / FRAMES / seconds, "unit": "videos/s",
            "peak_gib": peak_memory_gib(device)}


def data_path_rows(store: Path, device: torch.device, smoke: bool, batch: int) -> list[dict]:
    import zarr
    from bench_data_path import MEAN, STD

    from pipeline.learning.batchclips import train_batch
    from pipeline.learning.clips import FrameClipSet
    from pipeline.learning.training import _collate
    from pipeline.learning.transforms import AugmentConfig, Normalization

    n = int(zarr.open_group(str(store), mode="r")["frames"].shape[0])
    norm, aug = Normalization(32 if smoke else 224, MEAN, STD), AugmentConfig()
    data = FrameClipSet(str(store), np.arange(n), np.arange(n) % 4, FRAMES, norm, 0, aug, batched=True)
    indices = [i % n for i in range(batch)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        worker_s = timed(lambda: data.items(indices, 0, True), torch.device("cpu"), 1, 5)
    finally:
        torch.set_num_threads(threads)
    _, encoded, _ = _collate([(i, *pair) for i, pair in zip(indices, data.items(indices, 0, True), strict=True)])
    encoded = [c.pin_memory() for c in encoded] if device.type == "cuda" else encoded
    reset_peak(device)
    device_s = timed(lambda: train_batch(encoded, device, norm, aug), device, 1 if smoke else 2, 2 if smoke else 5)
    return [{"key": "data-path-worker", "what": "data path: worker share, one core", "batch": batch,
             "per_s": batch / worker_s, "unit": "clips/s"},
            {"key": "data-path-device", "what": "data path: device share", "batch": batch, "per_s": batch / device_s,
             "unit": "clips/s", "peak_gib": peak_memory_gib(device)}]


def matmul_flops_per_clip(model, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:  # noqa: ANN001
    """(all, the visual encoder's) matrix-product FLOPs of one clip's forward + backward, counted on 2 clips.

    Counted without gradient checkpointing: its recomputed forward is work, not progress."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.learning.training import cross_entropy

    visual = model.visual
    checkpointing = bool(getattr(getattr(visual, "transformer", None), "grad_checkpointing", False))
    if checkpointing:
        visual.set_grad_checkpointing(False)
    try:
        with FlopCounterMode(display=False) as counter:
            cross_entropy(model, x[:2], y[:2]).backward()
    finally:
        if checkpointing:
            visual.set_grad_checkpointing(True)
    model.zero_grad(set_to_none=True)
    per_module = counter.get_flop_counts()
    encoder = sum(per_module.get(f"{type(model).__name__}.visual", {}).values())
    return counter.get_total_flops() / 2, encoder / 2


def train_row(device: torch.device, smoke: bool, temporal: str, batch: int, checkpointing: bool, compile_: bool,
              peak_tflops: float | None) -> dict:
    from pipeline.learning.training import autocast_for, cross_entropy
    from pipeline.models.classifier import CosineHead, build_video_classifier

    clip, dim, size = new_clip(smoke)
    torch.manual_seed(0)
    model = build_video_classifier(clip.visual, dim, CosineHead(torch.randn(CLASSES, dim), learnable=False), temporal,
                                   FRAMES, grad_checkpointing=checkpointing).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-6, betas=(0.9, 0.98), weight_decay=0.2,
                            fused=True if device.type == "cuda" else None)
    autocast, scaler = autocast_for(device, True)
    x = torch.randn(batch, FRAMES, 3, size, size, device=device)
    y = torch.randint(0, CLASSES, (batch,), device=device)
    flops, encoder_flops = matmul_flops_per_clip(model, x, y)
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
    reset_peak(device)
    seconds = timed(step, device, 4 if compile_ else 3, 3 if smoke else 8)
    clips_s = batch / seconds
    encoder_tflops = encoder_flops * clips_s / 1e12
    return {"batch": batch, "per_s": clips_s, "unit": "clips/s", "peak_gib": peak_memory_gib(device),
            "gflop_per_clip": flops / 1e9, "encoder_gflop_per_clip": encoder_flops / 1e9,
            "tflop_s": flops * clips_s / 1e12, "encoder_tflop_s": encoder_tflops,
            "of_peak": encoder_tflops / peak_tflops if peak_tflops else None}


def device_peak(device: torch.device, given: float | None) -> float | None:
    if given or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK.items() if k in name), None)


@dataclass
class Task:
    """One row (or a pair of rows) of the table; ``key`` names it for ``--fail-row``."""

    key: str
    what: str
    run: Callable[[], dict | list[dict]]
    in_smoke: bool = True  # compile rows take a minute each on a CPU: the eager rows prove the script there


def plan(store: Callable[[], Path], device: torch.device, smoke: bool, peak: float | None) -> list[Task]:
    """The rows in order of importance: the headline figures come in the first minutes. Keys name the GPU's
    batches; --smoke runs each row at an eighth of the batch (a CPU shared by others must finish in seconds)."""
    def train(temporal: str, batch: int, ckpt: bool = False, compile_: bool = False) -> Task:
        key = f"train-{temporal}-b{batch}" + ("-ckpt" if ckpt else "") + ("-compile" if compile_ else "")
        what = f"train {temporal}" + (" ckpt" if ckpt else "") + (" compile" if compile_ else "")
        run_batch = batch // 8 if smoke else batch
        return Task(key, what, lambda: train_row(device, smoke, temporal, run_batch, ckpt, compile_, peak),
                    in_smoke=not compile_)

    frames_per_pass = 64 if smoke else 1024
    return [
        Task("features", "features", lambda: features_row(store(), device, smoke, False, frames_per_pass)),
        train("ttrans", 32), train("tokent1d", 32), train("ttrans", 64), train("tokent1d", 64),
        Task("data-path", "data path", lambda: data_path_rows(store(), device, smoke, 8 if smoke else 64)),
        train("ttrans", 32, ckpt=True),  # peak memory at batch 32, with and without checkpointing
        train("tap", 32), train("tap", 64), train("tokent1d", 64, ckpt=True),
        Task("features-compile", "features compile",
             lambda: features_row(store(), device, smoke, True, frames_per_pass), in_smoke=False),
        train("ttrans", 64, compile_=True), train("tokent1d", 64, compile_=True),
    ]


def judge(row: dict, rows: list[dict], smoke: bool) -> list[dict]:
    """The targets that apply to ``row``, each with whether it is met (None in smoke mode: a tiny model on a CPU)."""
    if "per_s" not in row:
        return []
    key, checks = row["key"], []
    if key.startswith("features"):
        need = TARGETS["features_videos_s"]
        checks.append((f">= {need:,.0f} videos/s", row["per_s"] >= need))
    elif key.startswith("train-"):
        checks.append((f">= {TARGETS['train_clips_s']:,.0f} clips/s", row["per_s"] >= TARGETS["train_clips_s"]))
        if row.get("of_peak") is not None or not smoke:
            of_peak = row.get("of_peak")
            checks.append((f"encoder >= {TARGETS['encoder_of_peak']:.0%} of bf16 peak",
                           None if of_peak is None else of_peak >= TARGETS["encoder_of_peak"]))
        if row["key"].startswith(("train-ttrans-b32", "train-tokent1d-b32", "train-tap-b32")):
            peak = row.get("peak_gib")
            checks.append((f"peak < {TARGETS['peak_gib_batch_32']:.0f} GiB",
                           None if peak is None else peak < TARGETS["peak_gib_batch_32"]))
    elif key == "data-path-device":
        trained = [r["per_s"] for r in rows if r.get("key", "").startswith("train-") and "per_s" in r]
        rate = max(trained) if trained else TARGETS["train_clips_s"]
        need = TARGETS["data_path_vs_training"] * rate
        source = "the fastest training row" if trained else "the training target"
        checks.append((f">= {need:,.0f} clips/s (3x {source})", row["per_s"] >= need))
    return [{"target": text, "met": None if smoke else met} for text, met in checks]


def fmt(value: object, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def verdict(targets: list[dict]) -> str:
    if not targets:
        return ""
    return "; ".join(f"{t['target']}: " + {True: "yes", False: "NO", None: "n/a"}[t["met"]] for t in targets)


def describe(row: dict) -> str:
    """One row as a progress line."""
    if "error" in row:
        return f"ERROR {row['error']}"
    if "skipped" in row:
        return f"skipped: {row['skipped']}"
    text = f"{row['per_s']:,.1f} {row['unit']}"
    if row.get("peak_gib") is not None:
        text += f", peak {row['peak_gib']:.1f} GiB"
    return text + (f"  [{verdict(row['targets'])}]" if row["targets"] else "")


def markdown(report: dict) -> str:
    """The table as markdown: the figures, their targets and whether each is met."""
    head = (f"{report['device']}; {report['amp']}; {FRAMES} frames a clip; bf16 peak "
            f"{report['peak_bf16_tflops'] or '?'} TFLOP/s; torch {report['torch']}; {report['date']}"
            + ("; SMOKE (tiny model on the CPU: targets do not apply)" if report["smoke"] else ""))
    lines = [head, "", "| what | batch | rate | unit | peak GiB | GFLOP/clip | of it encoder | encoder TFLOP/s | "
             "of bf16 peak | targets (met?) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['what']} | | **error** | | | | | | | {r['error']} |")
        elif "skipped" in r:
            lines.append(f"| {r['what']} | | skipped | | | | | | | {r['skipped']} |")
        else:
            lines.append(f"| {r['what']} | {fmt(r.get('batch'), 'd')} | {fmt(r.get('per_s'), ',.0f')} | {r['unit']} | "
                         f"{fmt(r.get('peak_gib'), '.1f')} | {fmt(r.get('gflop_per_clip'), '.0f')} | "
                         f"{fmt(r.get('encoder_gflop_per_clip'), '.0f')} | {fmt(r.get('encoder_tflop_s'), '.0f')} | "
                         f"{fmt(r.get('of_peak'), '.0%')} | {verdict(r.get('targets', []))} |")
    state = "complete" if report["complete"] else "INCOMPLETE (stopped or still running)"
    lines += ["", f"{len(report['rows'])} rows in {report['seconds']:.0f} s, {state}; "
              f"{sum('error' in r for r in report['rows'])} with errors."]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Readers (and a run killed mid-write) see the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def release(device: torch.device) -> None:
    """Free what a finished or failed row held (a failed row's traceback keeps its tensors alive)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, tiny store: check that it runs")
    parser.add_argument("--out", default="cache/gpu_throughput.json", help="the JSON (and, next to it, the .md table)")
    parser.add_argument("--budget-s", type=float, default=270.0, help="start no row after this many seconds")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak")
    parser.add_argument("--rows", default=None, help="only these rows, comma-separated keys (default: all; "
                        "keys: features, train-ttrans-b32, data-path, ...; a run prints them)")
    # tests: make the row of this key raise, to show that the run goes on (an error row, then the later rows)
    parser.add_argument("--fail-row", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    started = time.perf_counter()
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"error: torch {torch.__version__} sees no CUDA device: run this on a GPU machine, or add --smoke to "
              "check the script on the CPU", file=sys.stderr)
        sys.exit(2)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    peak = device_peak(device, args.peak_tflops)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.TemporaryDirectory(prefix=".gpu_throughput-store-", dir=out.parent)  # next to the output
    store_path: list[Path] = []

    def store() -> Path:  # made by the first row that needs it: a failure there is that row's error
        if not store_path:
            from bench_data_path import make_store

            path = Path(tmp.name) / "frames"
            make_store(path, 8 if args.smoke else 64, distinct=2 if args.smoke else 8)
            store_path.append(path)
        return store_path[0]

    tasks = [t for t in plan(store, device, args.smoke, peak) if t.in_smoke or not args.smoke]
    keys = [t.key for t in tasks]
    chosen = [k.strip() for k in args.rows.split(",") if k.strip()] if args.rows else keys
    for flag, wanted in (("--rows", chosen), ("--fail-row", [args.fail_row] if args.fail_row else [])):
        unknown = [k for k in wanted if k not in keys]
        if unknown:
            print(f"error: {flag} {unknown[0]!r} is not a row of this run ({', '.join(keys)})", file=sys.stderr)
            sys.exit(2)
    tasks = [t for t in tasks if t.key in chosen]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)"
    amp = "fp32" if device.type == "cpu" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16") + " autocast"
    report = {"script": "gpu_throughput", "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "amp": amp, "frames": FRAMES,
              "peak_bf16_tflops": peak, "smoke": args.smoke, "targets": TARGETS, "planned": [t.key for t in tasks],
              "rows": [], "complete": False, "seconds": 0.0}

    def save() -> None:
        report["seconds"] = time.perf_counter() - started
        # The table first: whoever watches the JSON (a test, a poller) then finds its rows in the table too.
        write_atomic(out.with_suffix(".md"), markdown(report))
        write_atomic(out, json.dumps(report, indent=2))

    save()
    print(f"{name}; {amp}; {FRAMES} frames a clip; bf16 peak {peak or '?'} TFLOP/s; rows -> {out}", flush=True)
    try:
        for task in tasks:
            elapsed = time.perf_counter() - started
            if elapsed > args.budget_s:
                rows = [{"key": task.key, "what": task.what, "skipped": f"time budget ({args.budget_s:.0f} s)"}]
            else:
                try:
                    if task.key == args.fail_row:
                        raise RuntimeError(f"injected failure of row {task.key} (--fail-row)")
                    result = task.run()
                    rows = [{"key": task.key, "what": task.what, **r} for r in (
                        result if isinstance(result, list) else [result])]
                except Exception as e:  # noqa: BLE001 - any failure is this row's, and the run goes on
                    traceback.print_exc()
                    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                    rows = [{"key": task.key, "what": task.what, "error": f"{type(e).__name__}: {first}"[:300],
                             "seconds": round(time.perf_counter() - started - elapsed, 1)}]
                finally:
                    if "compile" in task.key:
                        torch._dynamo.reset()  # compiled graphs hold memory the next rows need
                    release(device)
            for row in rows:
                row["targets"] = judge(row, report["rows"], args.smoke)
                report["rows"].append(row)
                print(f"  {row['what']:<28} b{fmt(row.get('batch'), 'd'):<4} {describe(row)}  "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)
            save()
        report["complete"] = True
    finally:
        save()
        tmp.cleanup()
    print()
    print(markdown(report), end="")
    print(f"-> {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
