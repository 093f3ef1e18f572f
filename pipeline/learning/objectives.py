"""What a run optimises: cross-entropy against the frozen head (the paper), or the contrastive video-text baseline
(Table 9): InfoNCE with or without batch gather, its text side cached (offline) or the CLIP text tower trained
(online)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pipeline.core.errors import PipelineError
from pipeline.core.settings import FinetuneSettings
from pipeline.learning.training import rank_and_world
from pipeline.models.classifier import ContrastiveVideoText, TextTowerHead
from pipeline.models.losses import VideoTextContrastiveLoss

_F = FinetuneSettings.defaults()  # the defaults


@dataclass(frozen=True)
class Objective:
    """What the run optimises: cross-entropy against the frozen head (the paper), or the contrastive
    video-text baseline (Table 9) with or without batch gather, its text side cached or trained."""

    kind: str = _F.objective  # ce | contrastive
    batch_gather: bool = _F.batch_gather
    text: str = _F.text  # offline: the cached label embeddings; online: the CLIP text tower, trained
    text_lr: float = _F.text_lr
    text_weight_decay: float = _F.text_weight_decay
    template: str = _F.text_template  # the online text tower's prompt

    def record(self) -> dict | None:
        return None if self.kind == "ce" else asdict(self)


def with_objective(video_model, objective: Objective, head: str, clip, names: list[str], lr_of):
    """(model, objective function or None, lr rule) for ``objective`` around a video classifier."""
    if objective.kind == "ce":
        return video_model, None, lr_of
    if objective.kind != "contrastive":
        raise PipelineError(f"unknown objective {objective.kind!r} (ce, contrastive)")
    if head not in ("clip-text", "text"):
        raise PipelineError("the contrastive objective matches videos with class-name text: use --head clip-text "
                            "(or text) for its text side")
    online = None
    if objective.text == "online":
        if head != "clip-text" or clip is None:
            raise PipelineError("--text online trains the CLIP text tower: use --head clip-text")
        online = TextTowerHead(clip.model, clip.tokenizer, objective.template, names,
                               float(video_model.head.logit_scale.detach()))
    model = ContrastiveVideoText(video_model, online)
    rank, world = rank_and_world()
    loss = VideoTextContrastiveLoss(gather=objective.batch_gather, rank=rank, world_size=world)

    def contrastive(net, x, y):
        video, text, scale = net(x, y)
        return loss(video, text, y, scale)

    def rule(name: str):
        name = name.removeprefix("video.")
        if name.startswith("head.text."):
            return objective.text_lr, objective.text_weight_decay
        return lr_of(name)

    return model, contrastive, rule
