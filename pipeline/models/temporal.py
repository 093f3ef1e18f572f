"""Temporal modules over frame embeddings [B, T, D] -> video embedding [B, D]."""

from __future__ import annotations

import torch
from torch import nn


class TemporalMeanPool(nn.Module):
    """TAP: the mean over frames."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): CLIP's activation, and the official T-Trans's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


# The official T-Trans (whwu95/Text4Vis modules/video_clip.py, `video_header("Transf")`): frame
# positions from an Embedding of CLIP's context length (77 rows), TF-style LayerNorm (eps 1e-12),
# QuickGELU, Linear/Embedding weights ~ N(0, 0.02) with zero biases, and the residual
# out = transformer(x + pos) + x before the temporal mean.
OFFICIAL_POSITIONS = 77
OFFICIAL_LN_EPS = 1e-12


class TemporalTransformer(nn.Module):
    """T-Trans: pre-norm transformer blocks over frame embeddings with learned frame positions, a residual
    around them, then the mean over frames.

    ``init="official"`` (default) is the official module (see above). ``init="tap"`` is this project's
    variant: GELU, eps 1e-5, the output projections of every block zero-initialised and the positions
    subtracted again, so that at step 0 it is exactly TAP.
    """

    def __init__(self, width: int, layers: int = 6, max_frames: int = 32, heads: int | None = None,
                 dropout: float = 0.0, init: str = "official") -> None:
        super().__init__()
        if init not in ("official", "tap"):
            raise ValueError(f"unknown T-Trans init {init!r} (official, tap)")
        self.init = init
        heads = heads or max(1, width // 64)
        official = init == "official"
        self.position = nn.Parameter(torch.zeros(max(max_frames, OFFICIAL_POSITIONS if official else 0), width))
        nn.init.normal_(self.position, std=0.02 if official else 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=dropout,
                                           activation=QuickGELU() if official else "gelu", batch_first=True,
                                           norm_first=True, layer_norm_eps=OFFICIAL_LN_EPS if official else 1e-5)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        for block in self.encoder.layers:
            if official:
                for linear in (block.self_attn.out_proj, block.linear1, block.linear2):
                    nn.init.normal_(linear.weight, std=0.02)
                    nn.init.zeros_(linear.bias)
            else:
                for linear in (block.self_attn.out_proj, block.linear2):
                    nn.init.zeros_(linear.weight)
                    nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        if t > self.position.shape[0]:
            raise ValueError(f"{t} frames > the {self.position.shape[0]} frame positions of this module")
        y = self.encoder(x + self.position[:t])
        if self.init == "official":
            return (y + x).mean(dim=1)
        # identity at initialisation: x + encoder(x + pos) - (x + pos) starts at 0
        return (y - self.position[:t]).mean(dim=1)


def build_temporal(kind: str, width: int, layers: int = 6, max_frames: int = 32, ttrans_init: str = "official"
                   ) -> nn.Module:
    if kind == "tap":
        return TemporalMeanPool()
    if kind == "ttrans":
        return TemporalTransformer(width, layers=layers, max_frames=max_frames, init=ttrans_init)
    raise ValueError(f"unknown temporal module {kind!r} (tap, ttrans; tokent1d needs the full encoder)")


class TokenT1D(nn.Module):
    """TokenT1D: a depthwise Conv1d (kernel 3) over time on the CLS token, applied before the attention
    and again before the MLP of a ViT block (the same module both times), as the official code does.

    ``init="shift"`` (default) is the official initialisation (n_div 4): a quarter of the channels
    take frame t+1's value, a quarter frame t-1's, the rest stay. ``init="identity"`` leaves the
    pretrained encoder unchanged at step 0.
    """

    def __init__(self, width: int, init: str = "shift") -> None:
        super().__init__()
        self.conv = nn.Conv1d(width, width, kernel_size=3, padding=1, groups=width, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            if init == "identity":
                self.conv.weight[:, 0, 1] = 1.0
            elif init == "shift":
                fold = width // 4
                self.conv.weight[:fold, 0, 2] = 1.0  # from frame t+1 (the official "shift left")
                self.conv.weight[fold:2 * fold, 0, 0] = 1.0  # from frame t-1
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
    """An open_clip ResidualAttentionBlock with TokenT1D before its attention and before its MLP (the
    official placement: its `control_point`, called twice); ``frames`` is set per forward pass."""

    def __init__(self, block: nn.Module, width: int, init: str) -> None:
        super().__init__()
        for part in ("ln_1", "attention", "ls_1", "ln_2", "mlp", "ls_2"):
            if not hasattr(block, part):
                raise ValueError("TokenT1D needs open_clip's ResidualAttentionBlock (pre-norm attention + MLP)")
        self.block = block
        self.t1d = TokenT1D(width, init)
        self.frames = 1

    def forward(self, q_x: torch.Tensor, k_x=None, v_x=None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b = self.block
        x = self.t1d(q_x, self.frames)
        x = x + b.ls_1(b.attention(q_x=b.ln_1(x), attn_mask=attn_mask))
        x = self.t1d(x, self.frames)
        return x + b.ls_2(b.mlp(b.ln_2(x)))


def insert_token_t1d(visual: nn.Module, init: str = "shift") -> list[TokenT1DBlock]:
    """Wrap every block of an open_clip VisionTransformer with TokenT1D; returns the wrapped blocks."""
    transformer = getattr(visual, "transformer", None)
    if transformer is None or not hasattr(transformer, "resblocks") or not getattr(transformer, "batch_first", True):
        raise ValueError("TokenT1D needs an open_clip ViT visual encoder (timm and ResNet towers have no CLS blocks)")
    width = transformer.width
    blocks = [TokenT1DBlock(block, width, init) for block in transformer.resblocks]
    transformer.resblocks = nn.ModuleList(blocks)
    return blocks
