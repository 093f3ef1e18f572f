"""Temporal jitter vs disk: what storing T_cache = 8, 16, 32 or 64 frames per video costs in top-1 and bytes.

Training draws one stored frame per segment (TSN); with T_cache = 32 and T = 8 that is 1 of 4 stored frames, where
the official code draws among all frames of the segment (datasets/datasets.py:102-112).
The question (issue #20): how much of that jitter matters, against what the store costs. On the demo's world with
long clips (64 frames a clip, so T_cache = 64 keeps every frame): one frame store per T_cache, the tiny CLIP
pretrained once, then the demo's full fine-tuning (CLIP-text head, T = 4 frames, the demo's recipe) on each store,
the same seeds. Prints one table: KiB a video, top-1 (mean +- std over seeds) on the validation clips.

    python benchmarks/bench_cache_frames.py              # the demo world's 48 classes: 50 min on 2 shared cores
    python benchmarks/bench_cache_frames.py --quick      # 12 classes, fewer steps: a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.media.world import WorldSpec, generate_world

T_CACHES = (8, 16, 32, 64)


def pipeline(*args: str, cwd: Path) -> str:
    """``python -m pipeline`` with built-in defaults only (no params file: the repository's demo params stay out)."""
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"pipeline {' '.join(args[:2])} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def store_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="12 classes, 80 pretraining steps, 1 seed")
    ap.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs per run")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--pretrain-steps", type=int, default=200)
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    args = ap.parse_args()
    if args.quick:
        args.pretrain_steps, args.seeds = 80, 1
    spec = WorldSpec(frames=64, train_per_class=8, val_per_class=4, size=64, seed=0,
                     **({"colours": ("red", "green", "blue"), "sizes": ("small", "large"), "shapes": ("disc", "bar")}
                        if args.quick else {}))
    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep or Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        cache = str(base / "cache")
        generate_world(base / "world", spec)
        n_classes = len(spec.classes())
        sizes = {}
        for t in T_CACHES:  # the same videos, stored at T_cache frames each
            pipeline("frames", "--no-params", "--format", "csv", "--root", str(base / "world"), "--dataset", f"t{t}",
                     "--cache-frames", str(t), "--height", "64", "--width", "64", "--cache", cache, "-q", cwd=base)
            videos = n_classes * (spec.train_per_class + spec.val_per_class)
            sizes[t] = store_bytes(base / "cache" / "frames" / f"t{t}") / videos / 1024
        model = ["--model", f"local-dir:{base / 'cache' / 'tiny-clip'}", "--model-key", "tiny-clip"]
        started = time.perf_counter()
        pipeline("pretrain", "--no-params", "-d", "t64", "--steps", str(args.pretrain_steps), "--cache", cache, "-q",
                 cwd=base)
        pretrain_s = time.perf_counter() - started
        rows = []
        for t in T_CACHES:
            pipeline("labels", "--no-params", "-d", f"t{t}", *model, "--template", "a photo of a {}", "--cache", cache,
                     cwd=base)
            pipeline("heads", "--no-params", "-d", f"t{t}", *model, "--head", "clip-text", "--cache", cache, cwd=base)
            seeds = [str(s) for s in range(args.seeds)]
            started = time.perf_counter()
            # the demo's recipe (params.yaml finetune.*): 4 frames, lr 5e-4 with the backbone at 0.1x, colour kept
            pipeline("finetune", "--no-params", "-d", f"t{t}", *model, "--head", "clip-text", "--frames", "4",
                     "--epochs", str(args.epochs), "--global-batch-size", "16", "--lr", "5e-4", "--warmup-epochs",
                     "0.2", "--min-lr", "5e-5", "--crop-scale", "0.6", "1", "--grayscale", "0", "--randaugment", "0",
                     "0", "--workers", "1", "--run-name", f"t{t}", *[x for s in seeds for x in ("--seed", s)],
                     "--cache", cache, "-q", cwd=base)
            seconds = time.perf_counter() - started
            runs = [base / "cache" / "runs" / f"t{t}" / f"s{s}" for s in seeds] if len(seeds) > 1 else \
                [base / "cache" / "runs" / f"t{t}"]
            top1 = [json.loads((r / "metrics.json").read_text())["val_top1"] for r in runs]
            rows.append((t, sizes[t], top1, seconds))
        print(f"\n{n_classes} classes, {spec.train_per_class} training / {spec.val_per_class} validation clips each, "
              f"64 source frames a clip; tiny CLIP pretrained {args.pretrain_steps} steps ({pretrain_s:.0f} s); "
              f"fine-tuning {args.epochs} epochs, T = 4, seeds {args.seeds}")
        print("| T_cache | stored frames a training clip draws from, per segment | KiB / video | top-1 | "
              "fine-tuning s |")
        print("|---|---|---|---|---|")
        for t, kib, top1, seconds in rows:
            spread = f" +- {statistics.pstdev(top1):.1f}" if len(top1) > 1 else ""
            print(f"| {t} | {t // 4} of {64 // 4} | {kib:.1f} | {statistics.mean(top1):.1f}{spread} | {seconds:.0f} |")
        print(json.dumps({"rows": [{"t_cache": t, "kib_per_video": kib, "top1": top1} for t, kib, top1, _ in rows]}))


if __name__ == "__main__":
    main()
