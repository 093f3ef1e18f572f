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


class TokenT1D(nn.Module):
    """TokenT1D: a depthwise Conv1d (kernel 3) over time on the CLS token, in front of a ViT block.

    ``init="identity"`` (default) makes it the identity, so the pretrained encoder is unchanged at
    step 0; ``init="shift"`` is the reference code's partial temporal shift (1/8 of the channels
    take the previous frame's value, 1/8 the next frame's, the rest stay).
    """

    def __init__(self, width: int, init: str = "identity") -> None:
        super().__init__()
        self.conv = nn.Conv1d(width, width, kernel_size=3, padding=1, groups=width, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            if init == "identity":
                self.conv.weight[:, 0, 1] = 1.0
            elif init == "shift":
                fold = width // 8
                self.conv.weight[:fold, 0, 0] = 1.0
                self.conv.weight[fold:2 * fold, 0, 2] = 1.0
                self.conv.weight[2 * fold:, 0, 1] = 1.0
            else:
                raise ValueError(f"unknown TokenT1D init {init!r} (identity, shift)")

    def forward(self, tokens: torch.Tensor, frames: int) -> torch.Tensor:
        # tokens [B*T, L, D] (batch first, frames of a clip adjacent)
        cls = tokens[:, 0]
        bt, d = cls.shape
        mixed = self.conv(cls.reshape(bt // frames, frames, d).transpose(1, 2)).transpose(1, 2).reshape(bt, d)
        return torch.cat([mixed.unsqueeze(1).to(tokens.dtype), tokens[:, 1:]], dim=1)


class TokenT1DBlock(nn.Module):
    """An open_clip ResidualAttentionBlock with TokenT1D in front; ``frames`` is set per forward pass."""

    def __init__(self, block: nn.Module, width: int, init: str) -> None:
        super().__init__()
        self.block = block
        self.t1d = TokenT1D(width, init)
        self.frames = 1

    def forward(self, q_x: torch.Tensor, k_x=None, v_x=None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.block(self.t1d(q_x, self.frames), k_x, v_x, attn_mask=attn_mask)


def insert_token_t1d(visual: nn.Module, init: str = "identity") -> list[TokenT1DBlock]:
    """Wrap every block of an open_clip VisionTransformer with TokenT1D; returns the wrapped blocks."""
    transformer = getattr(visual, "transformer", None)
    if transformer is None or not hasattr(transformer, "resblocks") or not getattr(transformer, "batch_first", True):
        raise ValueError("TokenT1D needs an open_clip ViT visual encoder (timm and ResNet towers have no CLS blocks)")
    width = transformer.width
    blocks = [TokenT1DBlock(block, width, init) for block in transformer.resblocks]
    transformer.resblocks = nn.ModuleList(blocks)
    return blocks
