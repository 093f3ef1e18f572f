"""The video classifier on frame embeddings: temporal module, optional projection, cosine head."""

from __future__ import annotations

import math

import torch
from torch import nn


class CosineHead(nn.Module):
    """logits = exp(s) * cos(video, head rows). A frozen head is a buffer; ``learnable`` is a parameter."""

    def __init__(self, head: torch.Tensor, learnable: bool, logit_scale: float = math.log(100.0),
                 learn_scale: bool = True) -> None:
        super().__init__()
        if learnable:
            self.weight = nn.Parameter(head.clone().float())
        else:
            self.register_buffer("weight", head.clone().float())
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)), requires_grad=learn_scale)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        v = video / video.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        h = self.weight / self.weight.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        return self.logit_scale.exp().clamp(max=100.0) * v @ h.t()


class FrameFeatureClassifier(nn.Module):
    """Classifier over cached frame features [B, T, D] (the frozen-backbone setting).

    TAP alone has nothing to learn against a frozen head, so it gets a linear projection
    (initialised to the identity when widths match); a head of another width (e.g. a 384-d MiniLM
    head on 512-d CLIP features) is always bridged by a learned projection on the video side.
    """

    def __init__(self, temporal: nn.Module, head: CosineHead, width: int, project: bool) -> None:
        super().__init__()
        self.temporal = temporal
        head_width = head.weight.shape[1]
        self.projection = nn.Linear(width, head_width, bias=False) if (project or head_width != width) else None
        if self.projection is not None and head_width == width:
            nn.init.eye_(self.projection.weight)
        self.head = head

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        video = self.temporal(frames)
        if self.projection is not None:
            video = self.projection(video)
        return self.head(video)
