"""Video-text contrastive loss (the paper's Table 9 baseline), with multi-positive targets and batch gather.

Each clip is paired with its class's prompt. In a batch where a class repeats, clips of the same
class are positives of each other, not false negatives: the targets of a row are spread uniformly
over the columns of its class (soft-target cross-entropy). With every class distinct this is
exactly open_clip's ``ClipLoss``. With gather, each rank scores its local rows against the
gathered global batch (open_clip's ``gather_features``); without ``gather_with_grad`` gradients
reach only the local features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def multi_positive_targets(labels: torch.Tensor, all_labels: torch.Tensor) -> torch.Tensor:
    """[n, N] row-normalised: 1/k on the k columns that share the row's class."""
    same = (labels[:, None] == all_labels[None, :]).float()
    return same / same.sum(dim=1, keepdim=True)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


class VideoTextContrastiveLoss(nn.Module):
    def __init__(self, gather: bool = True, gather_with_grad: bool = False, rank: int = 0,
                 world_size: int = 1) -> None:
        super().__init__()
        self.gather, self.gather_with_grad = gather, gather_with_grad
        self.rank, self.world_size = rank, world_size

    def gathered(self, video: torch.Tensor, text: torch.Tensor, labels: torch.Tensor):
        if not self.gather or self.world_size == 1:
            return video, text, labels
        import torch.distributed as dist
        from open_clip.loss import gather_features

        all_video, all_text = gather_features(video, text, local_loss=False, gather_with_grad=self.gather_with_grad,
                                              rank=self.rank, world_size=self.world_size)
        parts = [torch.zeros_like(labels) for _ in range(self.world_size)]
        dist.all_gather(parts, labels)
        return all_video, all_text, torch.cat(parts)

    def logits(self, video: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, logit_scale: torch.Tensor):
        """(video->text [n, N], text->video [n, N], targets [n, N]) for this rank's rows."""
        all_video, all_text, all_labels = self.gathered(video, text, labels)
        scale = logit_scale.exp()
        return scale * video @ all_text.t(), scale * text @ all_video.t(), multi_positive_targets(labels, all_labels)

    def forward(self, video: torch.Tensor, text: torch.Tensor, labels: torch.Tensor,
                logit_scale: torch.Tensor) -> torch.Tensor:
        """Features are L2-normalised [n, D]; ``labels`` [n] class ids (equal ids = positives)."""
        per_video, per_text, targets = self.logits(video, text, labels, logit_scale)
        return (soft_cross_entropy(per_video, targets) + soft_cross_entropy(per_text, targets)) / 2
