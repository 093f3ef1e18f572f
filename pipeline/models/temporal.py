"""Temporal modules over frame embeddings [B, T, D] -> video embedding [B, D]."""

from __future__ import annotations

import torch
from torch import nn


class TemporalMeanPool(nn.Module):
    """TAP: the mean over frames."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


class TemporalTransformer(nn.Module):
    """T-Trans: a transformer over frame embeddings with learned frame positions, a residual, then the mean.

    The last layer's output projections start at zero, so at step 0 the module is exactly TAP and
    training departs from the pretrained model's behaviour instead of from noise.
    """

    def __init__(self, width: int, layers: int = 6, max_frames: int = 32, heads: int | None = None,
                 dropout: float = 0.0) -> None:
        super().__init__()
        heads = heads or max(1, width // 64)
        self.position = nn.Parameter(torch.zeros(max_frames, width))
        nn.init.normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        for block in self.encoder.layers:
            nn.init.zeros_(block.self_attn.out_proj.weight)
            nn.init.zeros_(block.self_attn.out_proj.bias)
            nn.init.zeros_(block.linear2.weight)
            nn.init.zeros_(block.linear2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        if t > self.position.shape[0]:
            raise ValueError(f"{t} frames > the {self.position.shape[0]} frame positions of this module")
        # Pre-norm blocks with zero-initialised output projections: identity at initialisation,
        # so the residual (x + encoder(x + pos) - (x + pos)) starts at 0.
        y = self.encoder(x + self.position[:t]) - self.position[:t]
        return y.mean(dim=1)


def build_temporal(kind: str, width: int, layers: int = 6, max_frames: int = 32) -> nn.Module:
    if kind == "tap":
        return TemporalMeanPool()
    if kind == "ttrans":
        return TemporalTransformer(width, layers=layers, max_frames=max_frames)
    raise ValueError(f"unknown temporal module {kind!r} (tap, ttrans; tokent1d needs the full encoder)")
