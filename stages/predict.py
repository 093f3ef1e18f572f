"""Predict: zero-shot labels for single videos with your own label names."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.progress import Progress, say
from pipeline.media.video import DecodeError, FrameSpec, decode_clip
from pipeline.models.clip import ModelSpec, load_clip
from pipeline.models.text import encode_with_clip, resolve_templates
from pipeline.storage.featurestore import encode_frames


def own_pixels(clip) -> np.ndarray:  # noqa: ANN001
    """A decoded clip's frames cropped to the video's own pixels (as the stores' readers do)."""
    if clip.box is None:
        return clip.frames
    y0, y1, x0, x1 = clip.box
    return np.ascontiguousarray(clip.frames[:, y0:y1, x0:x1])


TOP = 5  # labels printed a video


def _top(logits: np.ndarray, labels: list[str], top: int) -> list[tuple[str, float]]:
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    return [(labels[i], float(probs[i])) for i in np.argsort(-probs)[:top]]


def run_trained(videos: list[str], cache: Path, run_name: str, labels: list[str] | None, *, template: str,
                device: str, quiet: bool, test_scale: int) -> list[dict]:
    """Top labels from a fine-tuned run: its own classes, or your ``labels`` through the run's text encoder.

    Frames are decoded exactly as the run's frame store was made, then sampled, scaled (``test_scale`` per
    224 px of input) and centre-cropped as in single-view evaluation.
    """
    import torch

    from pipeline.learning.transforms import eval_views
    from pipeline.media.sampling import view_indices
    from pipeline.models.classifier import TextTowerHead
    from pipeline.models.coop import CoOpHead
    from pipeline.models.text import encode_with_hf

    from .finetune import normalization
    from .runs import load_run

    model, info, clip = load_run(cache, run_name)
    if info["backbone"] != "full":
        raise PipelineError(f"run {run_name!r} trained on cached features (frozen backbone): predict needs a fully "
                            "fine-tuned run, or --model SPEC for zero-shot")
    if labels:
        if len(labels) < 2:
            raise PipelineError("give at least two label names (--labels 'a,b' or --labels-file)")
        if isinstance(model.head, (TextTowerHead, CoOpHead)):  # the run's text tower embeds the labels itself
            model.head.set_classes(labels)
        elif info["head"] == "clip-text":
            rows = encode_with_clip(clip, labels, resolve_templates(template), device)
        elif info["head"] == "text":
            rows, _ = encode_with_hf(info["encoder"].removeprefix("hf:"), labels, resolve_templates(template), device)
        else:
            raise PipelineError(f"run {run_name!r} has a {info['head']} head with rows only for its own classes; "
                                "leave out --labels to use them")
        if not isinstance(model.head, (TextTowerHead, CoOpHead)):
            model.head.weight = torch.from_numpy(rows).float()
    else:
        labels = list(info["class_names"])
    model.to(device)
    norm = normalization(clip, test_scale)
    frame_spec = FrameSpec(**{k: v for k, v in info["frame_spec"].items() if k in FrameSpec.__dataclass_fields__})
    results = []
    for video in Progress.over(videos, "predict", quiet):
        try:
            stored = own_pixels(decode_clip(video, frame_spec))
        except DecodeError as e:
            results.append({"video": video, "error": str(e)})
            continue
        picks = view_indices(len(stored), info["frames"])  # test.py's single view
        x = eval_views(torch.from_numpy(np.ascontiguousarray(stored[picks])).permute(0, 3, 1, 2), norm, 1)
        with torch.no_grad():
            logits = model.head(model.embed(x.to(device))).float().cpu().numpy()[0]
        results.append({"video": video, "top": _top(logits, labels, TOP)})
    return results


def run(videos: list[str], labels: list[str], spec: ModelSpec, *, template: str, frames: int,
        device: str, quiet: bool) -> list[dict]:
    """For each video: the ``TOP`` labels with softmax probabilities (CLIP logit scale, TAP over frames)."""
    if len(labels) < 2:
        raise PipelineError("give at least two label names (--labels 'a,b' or --labels-file)")
    if not quiet:
        say(f"loading {spec.name} on {device} ...")
    clip = load_clip(spec, device)
    text = encode_with_clip(clip, labels, resolve_templates(template), device)
    scale = float(clip.model.logit_scale.detach().exp().clamp(max=100))
    # Exactly the path of cached features: frames decoded into the frame stage's default box, then the
    # model's own preprocessing (features stage).
    frame_spec = FrameSpec(num_frames=frames)
    results = []
    for video in Progress.over(videos, "predict", quiet):
        try:
            clip_frames = own_pixels(decode_clip(video, frame_spec))
        except DecodeError as e:
            results.append({"video": video, "error": str(e)})
            continue
        emb = encode_frames(clip_frames, clip, device, batch_size=frames).mean(axis=0)
        emb = emb / max(np.linalg.norm(emb), 1e-12)
        results.append({"video": video, "top": _top(scale * text @ emb, labels, TOP)})
    return results
