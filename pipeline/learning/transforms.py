"""The clip transforms of training and evaluation, shared by the per-clip path (pipeline.learning.clips) and the
batched one (pipeline.learning.batchclips): the augmentation settings and their torchvision pipeline, the model's
normalisation and test-time scale, and the evaluation views (crops and their positions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.core.settings import FinetuneSettings

_F = FinetuneSettings.defaults()  # the defaults


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation. Defaults: the official K400 ViT-B/16 run's (its logged train transforms:
    `GroupTransform(RandAugment(2, 9))` first, on each frame separately, then `GroupScale`,
    `GroupRandomSizedCrop`, `GroupRandomHorizontalFlip`, `GroupRandomGrayscale(p=0.2)`, each one draw per
    clip). RandAugment per clip instead: ``randaugment_per_frame=False``."""

    crop_scale: tuple[float, float] = _F.crop_scale  # RandomResizedCrop area range
    flip: float = _F.flip  # horizontal flip probability (0 where left/right is part of the label)
    grayscale: float = _F.grayscale  # grayscale probability (0 where colour is part of the label)
    randaugment_ops: int = _F.randaugment[0]  # RandAugment N (0: off)
    randaugment_magnitude: int = _F.randaugment[1]  # RandAugment M
    randaugment_per_frame: bool = _F.randaugment_per_frame  # the official GroupTransform: its own draw per frame
    # the official GroupGaussianBlur / GroupSolarization (datasets/transforms.py:478-499): one draw per clip,
    # after grayscale; the released code gives no probabilities, so 0 (off) unless asked
    gaussian_blur: float = _F.gaussian_blur
    solarization: float = _F.solarization

    def __post_init__(self) -> None:
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, not {lo} {hi}")
        for name in ("flip", "grayscale", "gaussian_blur", "solarization"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a probability in [0, 1], not {getattr(self, name)}")
        if not 0 <= self.randaugment_ops <= 14 or not 0 <= self.randaugment_magnitude <= 30:
            raise ValueError("RandAugment N must be in 0..14 (operations) and M in 0..30 (magnitude), not "
                             f"{self.randaugment_ops} {self.randaugment_magnitude}")


@dataclass(frozen=True)
class Normalization:
    """The model's input: its size, mean, std and interpolation; and the short side evaluation views are scaled to
    before they are cropped (``test_scale`` pixels per 224 of input: test.py:94's 256 for a 224 input)."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    test_scale: int = _F.test_scale

    def __post_init__(self) -> None:
        if self.test_size < self.image_size:
            raise ValueError(f"test scale {self.test_scale} gives a short side of {self.test_size} px, under the "
                             f"{self.image_size}-px input: use at least 224")

    @property
    def test_size(self) -> int:
        """The short side of evaluation frames before the crop, in pixels: 256 for a 224 input, 73 for a 64 one."""
        return eval_short_side(self.image_size, self.test_scale)


def eval_short_side(image_size: int, test_scale: int) -> int:
    """``test_scale`` is given per 224 pixels of model input, so one setting fits every input size (the demo's
    64-px tiny CLIP as ViT-B/16's 224)."""
    return int(round(test_scale * image_size / 224))


def _mode(name: str):
    from torchvision.transforms.v2 import InterpolationMode

    return {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}.get(
        name, InterpolationMode.BICUBIC)


# GroupGaussianBlur draws sigma = random() * 1.9 + 0.1 (datasets/transforms.py:485); PIL blurs with it in pixels. A
# 13-tap kernel spans +-3 sigma at the largest sigma, so the Gaussian is not truncated.
BLUR_SIGMA = (0.1, 2.0)
BLUR_KERNEL = 13
SOLARIZE_THRESHOLD = 128  # PIL's ImageOps.solarize default: pixels >= 128 inverted (transforms.py:497)


class PerFrame(torch.nn.Module):
    """Apply ``transform`` to each frame of a clip separately (its own random draw each): the official
    `GroupTransform`."""

    def __init__(self, transform) -> None:  # noqa: ANN001
        super().__init__()
        self.transform = transform

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.transform(frame) for frame in clip])


def train_transform(norm: Normalization, aug: AugmentConfig):
    """uint8 [T, 3, H, W] -> float [T, 3, S, S]. v2 draws one set of parameters per call, i.e. per clip;
    RandAugment comes first, per frame (the official order) unless ``randaugment_per_frame`` is off; then crop,
    flip, grayscale, blur and solarization, in the logged K400 run's order."""
    from torchvision.transforms import v2

    steps = []
    randaugment = v2.RandAugment(aug.randaugment_ops, aug.randaugment_magnitude) if aug.randaugment_ops else None
    if randaugment is not None and aug.randaugment_per_frame:
        steps.append(PerFrame(randaugment))
    steps.append(v2.RandomResizedCrop(norm.image_size, scale=aug.crop_scale,
                                      interpolation=_mode(norm.interpolation), antialias=True))
    if aug.flip > 0:
        steps.append(v2.RandomHorizontalFlip(aug.flip))
    if aug.grayscale > 0:
        steps.append(v2.RandomGrayscale(aug.grayscale))
    if aug.gaussian_blur > 0:  # the logged order: grayscale, blur, solarization
        steps.append(v2.RandomApply([v2.GaussianBlur(BLUR_KERNEL, BLUR_SIGMA)], p=aug.gaussian_blur))
    if aug.solarization > 0:
        steps.append(v2.RandomSolarize(SOLARIZE_THRESHOLD, p=aug.solarization))
    if randaugment is not None and not aug.randaugment_per_frame:
        steps.append(randaugment)
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(norm.mean), list(norm.std))]
    return v2.Compose(steps)


def crop_offsets(length: int, size: int, spatial: int) -> list[int]:
    """Where ``spatial`` crops of ``size`` start along a side of ``length``: 1, the centre (torchvision's
    CenterCrop, which test.py:103's GroupCenterCrop calls); 3, left / centre / right at 0, 2 and 4 steps of
    (length - size) // 4, as GroupFullResSample (datasets/transforms.py:189-195); others spread evenly."""
    if spatial == 1:
        return [int(round((length - size) / 2.0))]
    if spatial == 3:
        step = (length - size) // 4
        return [0, 2 * step, 4 * step]
    return [round((length - size) * k / (spatial - 1)) for k in range(spatial)]


def eval_views(clip: torch.Tensor, norm: Normalization, spatial: int) -> torch.Tensor:
    """uint8 [T, 3, H, W] -> float [spatial, T, 3, S, S]: the short side scaled to ``norm.test_size`` (256 for a
    224 input, test.py:94 and 102), then 1 centre crop or ``spatial`` crops along the long side (3: left, centre,
    right over the full width, test.py:107's GroupFullResSample); across the short side, centred."""
    from torchvision.transforms.v2 import functional as F

    s = norm.image_size
    x = F.resize(clip, [norm.test_size], interpolation=_mode(norm.interpolation), antialias=True)
    h, w = x.shape[-2:]
    across = crop_offsets(min(h, w), s, 1 if spatial == 1 else 3)[1 if spatial != 1 else 0]
    crops = []
    for along in crop_offsets(max(h, w), s, spatial):
        top, left = (along, across) if h > w else (across, along)
        crops.append(F.crop(x, top, left, s, s))
    out = torch.stack(crops).to(torch.float32).div_(255)
    return F.normalize(out.flatten(0, 1), list(norm.mean), list(norm.std)).view(out.shape)
