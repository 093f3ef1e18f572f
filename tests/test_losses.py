"""The contrastive loss: ClipLoss when classes are distinct, multi-positive targets, 2-process gather."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from pipeline.models.losses import VideoTextContrastiveLoss, multi_positive_targets


def batch(n=8, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = F.normalize(torch.randn(n, d, generator=g), dim=1)
    t = F.normalize(torch.randn(n, d, generator=g), dim=1)
    return v, t, torch.tensor(2.3)


def test_equals_clip_loss_when_every_class_is_distinct():
    v, t, s = batch()
    ours = VideoTextContrastiveLoss()(v, t, torch.arange(8), s)
    theirs = ClipLoss()(v, t, s.exp())
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_repeated_classes_are_positives_of_each_other():
    labels = torch.tensor([3, 1, 3, 2, 3])
    targets = multi_positive_targets(labels, labels)
    assert torch.allclose(targets[0], torch.tensor([1 / 3, 0, 1 / 3, 0, 1 / 3]))
    assert torch.allclose(targets[1], torch.tensor([0.0, 1, 0, 0, 0]))
    assert torch.allclose(targets.sum(1), torch.ones(5))
    # a batch whose three clips of class 3 share one prompt: swapping those columns changes nothing
    v, t, s = batch(5)
    t = t.clone()
    t[2] = t[0]
    t[4] = t[0]
    loss = VideoTextContrastiveLoss()(v, t, labels, s)
    perm = torch.tensor([2, 1, 4, 3, 0])
    assert torch.allclose(loss, VideoTextContrastiveLoss()(v[perm], t[perm], labels[perm], s), atol=1e-6)


WORKER = """
import json, sys, torch, torch.distributed as dist
from pipeline.models.losses import VideoTextContrastiveLoss
rank, port, out, with_grad = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "1"
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
data = torch.load(out + "/batch.pt")
rows = slice(rank * 4, rank * 4 + 4)
v = data["v"][rows].clone().requires_grad_(True)
t = data["t"][rows].clone().requires_grad_(True)
loss_fn = VideoTextContrastiveLoss(gather=True, gather_with_grad=with_grad, rank=rank, world_size=2)
per_video, per_text, targets = loss_fn.logits(v, t, data["labels"][rows], data["scale"])
loss = loss_fn(v, t, data["labels"][rows], data["scale"])
loss.backward()
torch.save({"per_video": per_video.detach(), "loss": loss.detach(), "vgrad": v.grad}, f"{out}/rank{rank}.pt")
dist.barrier()  # no rank tears the store down while another still uses it
dist.destroy_process_group()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_on_the_concatenated_batch(tmp_path):
    with_grad = False
    v, t, s = batch(8)
    labels = torch.tensor([0, 1, 2, 1, 3, 0, 4, 5])  # classes repeat across the two ranks
    torch.save({"v": v, "t": t, "labels": labels, "scale": s}, tmp_path / "batch.pt")
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(r), port, str(tmp_path), str(int(with_grad))],
                              cwd=Path(__file__).parent) for r in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    one = VideoTextContrastiveLoss(gather=False)
    full_video, _, _ = one.logits(v, t, labels, s)
    assert torch.allclose(torch.cat([r["per_video"] for r in ranks]), full_video, atol=1e-6)
    full_loss = one(v, t, labels, s)
    assert torch.allclose((ranks[0]["loss"] + ranks[1]["loss"]) / 2, full_loss, atol=1e-6)
    # without gather-with-grad, the other rank's rows are constants: rank 0's gradient is that of its
    # local loss with rows 4..7 detached
    local = v[:4].clone().requires_grad_(True)
    text_local = t[:4].clone().requires_grad_(True)
    all_v, all_t = torch.cat([local, v[4:]]), torch.cat([text_local, t[4:]])
    targets = (labels[:4, None] == labels[None, :]).float()
    targets = targets / targets.sum(1, keepdim=True)
    scale = s.exp()
    loss0 = (-(targets * F.log_softmax(scale * local @ all_t.t(), 1)).sum(1).mean()
             - (targets * F.log_softmax(scale * text_local @ all_v.t(), 1)).sum(1).mean()) / 2
    loss0.backward()
    assert torch.allclose(ranks[0]["vgrad"], local.grad, atol=1e-6)
