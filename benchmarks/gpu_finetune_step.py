"""GPU figures for full fine-tuning (issue #4): ViT-B/16, 8 frames, batch 32, AMP.

Prepared for a lent GPU machine (a few minutes; no weights needed: random ViT-B/16 weights time the
same as OpenAI's). Prints step time (median of 20 after 5 warm-up steps), clips/s and peak memory,
with and without gradient checkpointing, and TokenT1D vs TAP.

    python benchmarks/gpu_finetune_step.py
"""

from __future__ import annotations

import statistics
import time

import open_clip
import torch

from pipeline.models.classifier import CosineHead, build_video_classifier
from pipeline.training import autocast_for, cross_entropy

FRAMES, BATCH, CLASSES = 8, 32, 400


def measure(temporal: str, checkpointing: bool) -> dict:
    device = torch.device("cuda")
    clip = open_clip.create_model("ViT-B-16", force_quick_gelu=True)
    head = CosineHead(torch.randn(CLASSES, 512), learnable=False)
    model = build_video_classifier(clip.visual, 512, head, temporal, FRAMES,
                                   grad_checkpointing=checkpointing).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-6, betas=(0.9, 0.98), weight_decay=0.2)
    autocast, scaler = autocast_for(device, True)
    x = torch.randn(BATCH, FRAMES, 3, 224, 224, device=device)
    y = torch.randint(0, CLASSES, (BATCH,), device=device)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(25):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            loss = cross_entropy(model, x, y)
        opt.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        torch.cuda.synchronize()
        if step >= 5:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    return {"temporal": temporal, "checkpointing": checkpointing, "step_s": step_s, "clips_s": BATCH / step_s,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    print(torch.cuda.get_device_name(), "bf16" if torch.cuda.is_bf16_supported() else "fp16")
    for temporal, ckpt in [("tap", False), ("tokent1d", False), ("tap", True)]:
        r = measure(temporal, ckpt)
        print(f"{r['temporal']:<9} grad-ckpt={r['checkpointing']!s:<5} step {r['step_s'] * 1000:7.1f} ms  "
              f"{r['clips_s']:6.1f} clips/s  peak {r['peak_gib']:.1f} GiB")


if __name__ == "__main__":
    main()
