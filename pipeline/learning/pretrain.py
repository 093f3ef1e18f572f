"""Pretrain a tiny CLIP on single frames with captions, for the offline demo world.

The model is an ``open_clip.model.CLIP`` with a small config, trained with the project's
contrastive loss (``losses.VideoTextContrastiveLoss``: open_clip's ``ClipLoss`` with identical
captions as positives of each other) and saved as a ``local-dir:`` model, so every later stage loads it through the same
code path as a real CLIP. Captions name the attributes of the frame's class ("a photo of a small red
ring"), each attribute word dropped with probability ``word_dropout`` so the text tower learns the
words one by one; classes listed as held out never appear, so zero-shot on them must compose.
Deterministic given the seed (CPU).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from pipeline.core.settings import PretrainSettings
from pipeline.models.losses import VideoTextContrastiveLoss

_P = PretrainSettings.defaults()  # the defaults

CAPTION = "a photo of a {}"


@dataclass(frozen=True)
class PretrainConfig:
    steps: int = _P.steps
    batch_size: int = _P.global_batch_size
    lr: float = _P.lr
    weight_decay: float = _P.weight_decay
    warmup: int = _P.warmup
    word_dropout: float = _P.word_dropout
    seed: int = _P.seed
    embed_dim: int = _P.embed_dim
    image_size: int = _P.image_size
    patch_size: int = _P.patch_size
    width: int = _P.width
    layers: int = _P.layers
    text_layers: int = _P.text_layers
    context_length: int = _P.context_length

    def model_cfg(self) -> dict:
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {"image_size": self.image_size, "layers": self.layers, "width": self.width,
                           "patch_size": self.patch_size, "head_width": 64},
            "text_cfg": {"context_length": self.context_length, "vocab_size": 49408, "width": self.width,
                         "heads": max(1, self.width // 64), "layers": self.text_layers},
        }

    def as_dict(self) -> dict:
        return asdict(self)


def caption(class_name: str, rng: np.random.Generator, dropout: float) -> str:
    """The class's attribute words, each kept with probability 1 - dropout (at least one kept)."""
    words = [w for w in class_name.split() if w not in ("a", "an", "the")]
    kept = [w for w in words if rng.random() >= dropout] or [words[rng.integers(len(words))]]
    return CAPTION.format(" ".join(kept))


def pretrain(frames: np.ndarray, class_names: list[str], labels: np.ndarray, cfg: PretrainConfig,
             on_step: Callable[[int, float], None] | None = None):
    """Train on uint8 frames [N, T, H, W, 3] of clips with ``labels``; returns (model, model_cfg, losses)."""
    import open_clip
    import torch
    from torchvision.transforms.v2 import functional as F

    torch.manual_seed(cfg.seed)
    model_cfg = cfg.model_cfg()
    model = open_clip.model.CLIP(**model_cfg, output_dict=True)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=cfg.context_length)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    # The project's one contrastive loss: identical captions in a batch are positives of each other
    # (with every caption distinct it is exactly open_clip's ClipLoss).
    loss_fn = VideoTextContrastiveLoss()
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    n, t = frames.shape[:2]
    losses = []
    model.train()
    for step in range(cfg.steps):
        rng = np.random.default_rng([cfg.seed, step])
        clips = rng.integers(0, n, cfg.batch_size)
        which = rng.integers(0, t, cfg.batch_size)
        images = torch.from_numpy(frames[clips, which]).permute(0, 3, 1, 2).float().div_(255)
        if images.shape[-1] != cfg.image_size:
            images = F.resize(images, [cfg.image_size, cfg.image_size], antialias=True)
        images = (images - mean) / std
        captions = [caption(class_names[labels[c]], rng, cfg.word_dropout) for c in clips]
        texts = tokenizer(captions)
        ids = {text: i for i, text in enumerate(dict.fromkeys(captions))}
        same_caption = torch.tensor([ids[text] for text in captions])
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        out = model(images, texts)
        loss = loss_fn(out["image_features"], out["text_features"], same_caption, model.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return model, model_cfg, losses
