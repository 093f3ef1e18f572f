"""The device half of the batched clip path: JPEG decode and clip augmentation a whole batch at a time.

Loader workers only read the bytes of a clip's T frames and draw its augmentation parameters
(:class:`ClipDrawer`, from the clip's own seeded stream, as the per-clip path does); the training
process then decodes the batch with ``torchvision.io.decode_jpeg`` on its device (batched nvJPEG on
a GPU) and applies RandAugment, RandomResizedCrop, flip, grayscale and normalisation to the whole
batch there (:func:`train_batch`, :func:`eval_batch`), and the optional GaussianBlur and Solarization. The same
code runs on ``device="cpu"``.

Parameters are drawn as torchvision's transforms draw them, in the per-clip path's order, under the
same seed: the batched path makes the same choices as :func:`pipeline.learning.transforms.train_transform` (the
crop by RandomResizedCrop's own ``make_params``; RandAugment's two draws per operation replayed over
its own operation table, a test holding both paths equal). RandAugment operations are applied with
torchvision's own kernel dispatch, to all frames that drew the same operation at once: the official
per-frame RandAugment costs a handful of batched calls, not one per frame. On the CPU both paths
decode with libjpeg-turbo and call the same kernels: tests hold them equal (within a grey level, as
batched convolutions could round a pixel differently; bit-equal here). nvJPEG's IDCT may differ from
libjpeg-turbo's by a grey level.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

Box = tuple[int, int, int, int]  # y0, y1, x0, x1 of a video's own pixels in its stored frames
Ops = tuple[tuple[str, float], ...]  # one RandAugment draw: (operation, signed magnitude) per layer


@dataclass(frozen=True)
class ClipDraw:
    """Every random choice of one training clip's augmentation."""

    randaugment: tuple[Ops, ...]  # per frame (the official GroupTransform) or one for the whole clip
    crop: tuple[int, int, int, int]  # RandomResizedCrop's top, left, height, width inside the box
    flip: bool
    grayscale: bool
    blur_sigma: float | None = None  # GaussianBlur's sigma when the clip drew it
    solarize: bool = False


@dataclass
class EncodedClip:
    """What a loader worker hands over: the stored bytes of T frames, the video's box and (training) its draw."""

    frames: list[torch.Tensor] | torch.Tensor  # JPEG bytes per frame (uint8, 1-D), or raw uint8 [T, H, W, 3]
    box: Box
    draw: ClipDraw | None = None

    def pin_memory(self) -> EncodedClip:  # called by the DataLoader's pin-memory thread
        frames = ([f.pin_memory() for f in self.frames] if isinstance(self.frames, list)
                  else self.frames.pin_memory())
        return EncodedClip(frames, self.box, self.draw)


class _RandAugmentDraws:
    """torchvision's RandAugment draws, made as its ``forward`` makes them (one ``randint`` for the operation, one
    ``rand`` for the sign of a signed magnitude), without applying anything; magnitudes cached per frame size."""

    def __init__(self, ops: int, magnitude: int) -> None:
        self.ra = v2.RandAugment(ops, magnitude)
        self.space = list(self.ra._AUGMENTATION_SPACE.items())
        self._table: dict[tuple[int, int], list[tuple[str, float | None, bool]]] = {}

    def table(self, height: int, width: int) -> list[tuple[str, float | None, bool]]:
        if (height, width) not in self._table:
            ra = self.ra
            self._table[(height, width)] = [
                (name, None if (m := fn(ra.num_magnitude_bins, height, width)) is None else float(m[ra.magnitude]),
                 signed) for name, (fn, signed) in self.space]
        return self._table[(height, width)]

    def draw(self, height: int, width: int) -> Ops:
        table, drawn = self.table(height, width), []
        for _ in range(self.ra.num_ops):
            name, magnitude, signed = table[int(torch.randint(len(table), ()))]
            if magnitude is None:
                magnitude = 0.0
            elif signed and torch.rand(()) <= 0.5:
                magnitude = -magnitude
            drawn.append((name, magnitude))
        return tuple(drawn)


class ClipDrawer:
    """Draws :class:`ClipDraw` s with the per-clip path's transforms and random calls, in its order."""

    def __init__(self, image_size: int, aug) -> None:  # noqa: ANN001 - pipeline.learning.transforms.AugmentConfig
        self.aug = aug
        self.randaugment = (_RandAugmentDraws(aug.randaugment_ops, aug.randaugment_magnitude)
                            if aug.randaugment_ops else None)
        self.crop = v2.RandomResizedCrop(image_size, scale=aug.crop_scale, antialias=True)
        self.size = image_size

    def draw(self, frames: int, height: int, width: int, seed: int) -> ClipDraw:
        from pipeline.learning.transforms import BLUR_SIGMA

        aug, ra = self.aug, self.randaugment
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # the CPU stream torch.manual_seed(seed) sets
            ops: tuple[Ops, ...] = ()
            if ra is not None and aug.randaugment_per_frame:
                ops = tuple(ra.draw(height, width) for _ in range(frames))
            # a zero-stride probe: the crop reads only its shape
            c = self.crop.make_params([torch.zeros((), dtype=torch.uint8).expand(frames, 3, height, width)])
            # v2's random-apply transforms: applied unless torch.rand(1) >= p (drawn only where p > 0)
            flip = aug.flip > 0 and bool(torch.rand(1) < aug.flip)
            gray = aug.grayscale > 0 and bool(torch.rand(1) < aug.grayscale)
            sigma = None  # v2.RandomApply: applied unless torch.rand(1) >= p; then GaussianBlur draws its sigma
            if aug.gaussian_blur > 0 and bool(torch.rand(1) < aug.gaussian_blur):
                sigma = torch.empty(1).uniform_(*BLUR_SIGMA).item()
            solarize = aug.solarization > 0 and bool(torch.rand(1) < aug.solarization)
            if ra is not None and not aug.randaugment_per_frame:  # after the crop: on S x S frames
                ops = (ra.draw(self.size, self.size),)
        return ClipDraw(ops, (c["top"], c["left"], c["height"], c["width"]), flip, gray, sigma, solarize)


def decode_clips(clips: list[EncodedClip], device: torch.device | str) -> list[torch.Tensor]:
    """uint8 [T, 3, h, w] per clip on ``device``, cropped to its box: one batched decode for the whole batch."""
    device = torch.device(device)
    jpeg = [f for c in clips if isinstance(c.frames, list) for f in c.frames]
    decoded = iter(decode_jpeg(jpeg, mode=ImageReadMode.RGB, device=device) if jpeg else [])
    out = []
    for c in clips:
        if isinstance(c.frames, list):
            frames = torch.stack([next(decoded) for _ in c.frames])
        else:  # a raw store: no decode
            frames = c.frames.to(device, non_blocking=True).permute(0, 3, 1, 2)
        y0, y1, x0, x1 = c.box
        out.append(frames[:, :, y0:y1, x0:x1])
    return out


def _index(positions: list[int], device: torch.device) -> torch.Tensor:
    """An index tensor on ``device`` without a host synchronisation (pinned memory, non-blocking copy)."""
    index = torch.tensor(positions, dtype=torch.long)
    return index.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else index


def _randaugment_frames(frames: list[torch.Tensor], draws: list[Ops], magnitude_bins: int) -> list[torch.Tensor]:
    """Apply each frame's own draw. Frames of one shape are stacked and, for each RandAugment layer, permuted
    so that the frames that drew one operation are contiguous: one call (and no index tensor) per operation."""
    applier = v2.RandAugment(num_magnitude_bins=magnitude_bins)
    out = list(frames)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, f in enumerate(frames):
        by_shape.setdefault(tuple(f.shape), []).append(i)
    for members in by_shape.values():
        stack = torch.stack([frames[i] for i in members])
        order = list(range(len(members)))  # stack[k] holds frame members[order[k]]
        for layer in range(len(draws[members[0]])):
            groups: dict[tuple[str, float], list[int]] = {}
            for k, j in enumerate(order):
                groups.setdefault(draws[members[j]][layer], []).append(k)
            perm = [k for ks in groups.values() for k in ks]
            if perm != list(range(len(perm))):
                stack = stack[_index(perm, stack.device)]
                order = [order[k] for k in perm]
            lo = 0
            for (op, magnitude), ks in groups.items():
                if op != "Identity":
                    stack[lo:lo + len(ks)] = applier._apply_image_or_video_transform(
                        stack[lo:lo + len(ks)], op, magnitude, interpolation=applier.interpolation,
                        fill=applier._fill)
                lo += len(ks)
        for k, j in enumerate(order):
            out[members[j]] = stack[k]
    return out


def train_batch(clips: list[EncodedClip], device: torch.device | str, norm, aug) -> torch.Tensor:  # noqa: ANN001
    """float [B, T, 3, S, S] training clips on ``device``: the per-clip path's augmentation, batched."""
    from pipeline.learning.transforms import BLUR_KERNEL, SOLARIZE_THRESHOLD, _mode

    frames = decode_clips(clips, device)
    t = frames[0].shape[0]
    draws = [c.draw for c in clips]
    bins = v2.RandAugment().num_magnitude_bins
    if aug.randaugment_ops and aug.randaugment_per_frame:  # the official order: RandAugment first, per frame
        flat = _randaugment_frames([f for clip in frames for f in clip], [o for d in draws for o in d.randaugment],
                                   bins)
        frames = [torch.stack(flat[b * t:(b + 1) * t]) for b in range(len(clips))]
    s, mode = norm.image_size, _mode(norm.interpolation)
    x = torch.stack([F.resized_crop(f, *d.crop, [s, s], interpolation=mode, antialias=True)
                     for f, d in zip(frames, draws, strict=True)])
    # the draws are on the host: choosing clips needs no read-back from the device
    flip = [b for b, d in enumerate(draws) if d.flip]
    if flip:
        sel = _index(flip, x.device)
        x[sel] = F.horizontal_flip(x[sel])
    gray = [b for b, d in enumerate(draws) if d.grayscale]
    if gray:
        sel = _index(gray, x.device)
        x[sel] = F.rgb_to_grayscale(x[sel], num_output_channels=3)
    for b, d in enumerate(draws):  # each clip its own sigma: one call per blurred clip
        if d.blur_sigma is not None:
            x[b] = F.gaussian_blur(x[b], [BLUR_KERNEL, BLUR_KERNEL], [d.blur_sigma, d.blur_sigma])
    solarize = [b for b, d in enumerate(draws) if d.solarize]
    if solarize:
        sel = _index(solarize, x.device)
        x[sel] = F.solarize(x[sel], SOLARIZE_THRESHOLD)
    if aug.randaugment_ops and not aug.randaugment_per_frame:  # one draw for all frames of a clip
        flat = _randaugment_frames(list(x.flatten(0, 1)), [d.randaugment[0] for d in draws for _ in range(t)], bins)
        x = torch.stack(flat).view(x.shape)
    x = F.to_dtype(x, torch.float32, scale=True)
    return F.normalize(x, list(norm.mean), list(norm.std))


def eval_batch(clips: list[EncodedClip], device: torch.device | str, norm, frames: int,  # noqa: ANN001
               views: tuple[int, int]) -> torch.Tensor:
    """float [B, V, T, 3, S, S] evaluation views on ``device`` (as :func:`pipeline.learning.transforms.eval_views`)."""
    from pipeline.learning.transforms import eval_views

    temporal, spatial = views
    out = []
    for clip in decode_clips(clips, device):
        out.append(torch.cat([eval_views(clip[c * frames:(c + 1) * frames], norm, spatial)
                              for c in range(temporal)]))
    return torch.stack(out)
