"""The video classifier on frame embeddings: temporal module, optional projection, cosine head."""

from __future__ import annotations

import math

import torch
from torch import nn


def cosine_scores(video: torch.Tensor, rows: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """exp(s) * cos(video, rows). No clamp here: it would zero the scale's gradient at exp(s) = 100; the
    training loop clamps the parameter after each step instead, as open_clip does."""
    v = video / video.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    h = rows / rows.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return logit_scale.exp() * v @ h.t()


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
        return cosine_scores(video, self.weight, self.logit_scale)


class TemplateDrawHead(nn.Module):
    """The paper's "multiple hard templates" (Table A.4): frozen class embeddings of K prompt templates
    [K, C, D]; each training forward pass scores against one template drawn at random (torch's generator,
    so a resumed run draws the same). Evaluation scores ``eval_rows`` (the paper: the single template's rows,
    those of the cached clip-text head), or without them the templates' ensemble (the normalised mean)."""

    def __init__(self, bank: torch.Tensor, logit_scale: float = math.log(100.0),
                 eval_rows: torch.Tensor | None = None) -> None:
        super().__init__()
        bank = bank.float() / bank.float().norm(dim=-1, keepdim=True).clamp(min=1e-12)
        self.register_buffer("bank", bank)
        # the rows of evaluation (and the width); a buffer, so a loaded run evaluates as it was trained to
        self.register_buffer("weight", bank.mean(dim=0) if eval_rows is None else eval_rows.float().clone())
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        if self.training:
            k = int(torch.randint(self.bank.shape[0], ()))
            return cosine_scores(video, self.bank[k], self.logit_scale)
        return cosine_scores(video, self.weight, self.logit_scale)


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

    def embed(self, frames: torch.Tensor) -> torch.Tensor:
        video = self.temporal(frames)
        return self.projection(video) if self.projection is not None else video

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(frames))


class VideoClassifier(nn.Module):
    """The full model: CLIP visual encoder on every frame -> temporal module -> (projection) -> cosine head.

    Input: normalised clips [B, T, 3, S, S]. With TokenT1D the temporal mixing happens inside the
    encoder's blocks (``t1d_blocks``) and ``temporal`` is the mean over frames. ``embed`` gives the
    video embedding before the head (multi-view evaluation averages it over views).
    """

    def __init__(self, visual: nn.Module, temporal: nn.Module, head: CosineHead, width: int,
                 t1d_blocks: list | None = None) -> None:
        super().__init__()
        self.visual = visual
        self.temporal = temporal
        head_width = head.weight.shape[1]
        # Only a head of another width needs a projection: the encoder itself adapts to the head.
        self.projection = nn.Linear(width, head_width, bias=False) if head_width != width else None
        self.head = head
        self._t1d_blocks = list(t1d_blocks or [])  # plain list: the blocks are registered under visual

    def embed(self, clips: torch.Tensor) -> torch.Tensor:
        b, t = clips.shape[:2]
        for block in self._t1d_blocks:
            block.frames = t
        frames = self.visual(clips.flatten(0, 1)).view(b, t, -1)
        video = self.temporal(frames)
        return self.projection(video) if self.projection is not None else video

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(clips))


def build_video_classifier(visual: nn.Module, width: int, head: CosineHead, temporal: str, frames: int,
                           layers: int = 6, t1d_init: str = "shift",
                           grad_checkpointing: bool = False, ttrans_init: str = "official") -> VideoClassifier:
    """The full fine-tuning model around an open_clip visual tower (modified in place for TokenT1D)."""
    from pipeline.models.temporal import TemporalMeanPool, TemporalTransformer, insert_token_t1d

    blocks = insert_token_t1d(visual, t1d_init) if temporal == "tokent1d" else None
    if temporal in ("tap", "tokent1d"):
        module: nn.Module = TemporalMeanPool()
    elif temporal == "ttrans":
        module = TemporalTransformer(width, layers=layers, max_frames=frames, init=ttrans_init)
    else:
        raise ValueError(f"unknown temporal module {temporal!r} (tap, ttrans, tokent1d)")
    if grad_checkpointing and hasattr(visual, "set_grad_checkpointing"):
        visual.set_grad_checkpointing(True)
    return VideoClassifier(visual, module, head, width, blocks)


class TextRowsHead(nn.Module):
    """A head whose rows come from CLIP's text tower (``class_embeddings()``): recomputed at every training
    call, cached while in eval mode; ``weight`` is the rows as they are now, without gradient."""

    _rows: torch.Tensor | None = None

    def class_embeddings(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def weight(self) -> torch.Tensor:
        if self.training or self._rows is None:
            with torch.no_grad():
                self._rows = self.class_embeddings().float()
        return self._rows

    def train(self, mode: bool = True):
        self._rows = None
        return super().train(mode)


class TextTowerHead(TextRowsHead):
    """The CLIP text tower as a head: rows = text embeddings of the class prompts, computed by the tower.

    Used by the contrastive objective with ``--text online``: the tower trains, and evaluation
    classifies with the class-name embeddings of the tower as it is after training. Rows are
    recomputed on every training call and cached while in eval mode.
    """

    def __init__(self, clip_model: nn.Module, tokenizer, template: str, class_names: list[str],
                 logit_scale: float) -> None:
        super().__init__()
        clip_model.visual = nn.Identity()  # the visual tower lives in the video model
        for name, param in clip_model.named_parameters():
            if name.startswith("logit_"):  # CLIP's own scale (and bias): this head has its own scale
                param.requires_grad_(False)  # unused parameters would stall DDP's gradient reduction
        self.text = clip_model
        self.tokenizer, self.template = tokenizer, template
        self.register_buffer("tokens", tokenizer([template.format(n) for n in class_names]), persistent=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)))

    def set_classes(self, class_names: list[str]) -> None:
        """Classify among other class names (zero-shot on another dataset, or your own labels)."""
        self.tokens = self.tokenizer([self.template.format(n) for n in class_names]).to(self.tokens.device)
        self._rows = None

    def class_embeddings(self, classes: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.tokens if classes is None else self.tokens[classes]
        return self.text.encode_text(tokens)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return cosine_scores(video, self.weight, self.logit_scale)


class ContrastiveVideoText(nn.Module):
    """Video-text matching (ActionCLIP-style, the paper's Table 9 baseline) around a video classifier.

    ``forward(clips, labels)`` -> (L2-normalised video embeddings, L2-normalised text embeddings of
    each clip's class, logit scale). Offline text: the cached label embeddings (the classifier's
    frozen head rows); online: the CLIP text tower, trained. ``embed`` and ``head`` are those of
    an ordinary classifier, so evaluation is the same as for every other run.
    """

    def __init__(self, video: VideoClassifier | FrameFeatureClassifier, online_head: TextTowerHead | None = None):
        super().__init__()
        self.video = video
        if online_head is not None:
            self.video.head = online_head

    @property
    def head(self) -> nn.Module:
        return self.video.head

    def embed(self, clips: torch.Tensor) -> torch.Tensor:
        return self.video.embed(clips)

    def forward(self, clips: torch.Tensor, labels: torch.Tensor):
        video = self.video.embed(clips)
        head = self.video.head
        text = head.class_embeddings(labels) if isinstance(head, TextTowerHead) else head.weight[labels]
        norm = lambda x: x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)  # noqa: E731
        return norm(video.float()), norm(text.float()), head.logit_scale  # clamped after each step


def classifier_for(clip, head_rows: torch.Tensor, learnable: bool, temporal: str, frames: int, layers: int,
                t1d_init: str, grad_checkpointing: bool = False, ttrans_init: str = "official"):
    """The loaded open_clip model's visual tower wrapped as a video classifier against ``head_rows``."""
    head = CosineHead(head_rows, learnable=learnable, logit_scale=float(clip.model.logit_scale.detach()))
    return build_video_classifier(clip.model.visual, clip.embed_dim, head, temporal, frames, layers, t1d_init,
                                  grad_checkpointing, ttrans_init=ttrans_init)
