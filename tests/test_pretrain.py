"""The demo's tiny-CLIP pretraining: captions, determinism, and loading through local-dir:."""

from __future__ import annotations

import json

import numpy as np
import torch
from conftest import run_inproc

from pipeline.learning.pretrain import PretrainConfig, caption, pretrain
from pipeline.media.world import WorldSpec, generate_world
from pipeline.models.clip import ModelSpec, load_clip

SMALL = PretrainConfig(steps=12, batch_size=16, warmup=2, embed_dim=32, image_size=32, width=64, layers=1,
                       text_layers=1, lr=2e-3)


def test_captions_drop_words_but_never_all():
    rng = np.random.default_rng(0)
    caps = [caption("a small red ring", rng, 0.5) for _ in range(200)]
    assert all(c.startswith("a photo of a ") and len(c) > len("a photo of a ") for c in caps)
    assert "a photo of a small red ring" in caps and "a photo of a red" in caps
    assert caption("a small red ring", rng, 0.0) == "a photo of a small red ring"


def test_pretraining_is_deterministic_and_lowers_the_loss():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (8, 2, 32, 32, 3), dtype=np.uint8)
    frames[:4, ..., 0] = 250  # two visibly different groups
    labels = np.array([0] * 4 + [1] * 4)
    names = ["a red thing", "a blue thing"]
    a, _, losses_a = pretrain(frames, names, labels, SMALL)
    b, _, losses_b = pretrain(frames, names, labels, SMALL)
    assert losses_a == losses_b
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert np.mean(losses_a[-3:]) < np.mean(losses_a[:3])


def test_pretrain_stage_writes_a_local_dir_model(tmp_path):
    generate_world(tmp_path / "world", WorldSpec(colours=("red", "blue"), shapes=("disc", "bar"), sizes=("small",),
                                                 train_per_class=2, val_per_class=1, frames=4, size=32))
    cache = tmp_path / "cache"
    run_inproc("frames", "--format", "csv", "--root", str(tmp_path / "world"), "--dataset", "w", "--cache-frames", "2",
               "--height", "32", "--width", "32", "--cache", str(cache), "-q")
    out = run_inproc("pretrain", "-d", "w", "--steps", "3", "--global-batch-size", "8", "--heldout", "a small blue bar",
                     "--cache", str(cache), "-q")
    assert "local-dir:" in out
    summary = json.loads((cache / "tiny-clip" / "pretrain.json").read_text())
    assert summary["clips"] == 6 and summary["heldout"] == ["a small blue bar"]  # the held-out class's clips left out
    clip = load_clip(ModelSpec(f"local-dir:{cache / 'tiny-clip'}"))
    assert clip.embed_dim == 128 and clip.image_size == 64
