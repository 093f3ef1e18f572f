"""Predict: zero-shot labels for single videos with your own label names."""

from __future__ import annotations

import numpy as np

from pipeline.errors import PipelineError
from pipeline.featurestore import encode_frames
from pipeline.models.clip import ModelSpec, load_clip
from pipeline.models.text import encode_with_clip, resolve_templates
from pipeline.video import DecodeError, FrameSpec, decode_clip


def run(videos: list[str], labels: list[str], spec: ModelSpec, *, template: str = "paper", frames: int = 8,
        device: str = "cpu", top: int = 5) -> list[dict]:
    """For each video: the ``top`` labels with softmax probabilities (CLIP logit scale, TAP over frames)."""
    if len(labels) < 2:
        raise PipelineError("give at least two label names (--labels 'a,b' or --labels-file)")
    clip = load_clip(spec, device)
    text = encode_with_clip(clip, labels, resolve_templates(template), device)
    scale = float(clip.model.logit_scale.detach().exp().clamp(max=100))
    side = clip.image_size
    # Decode to the model's own square; preprocessing then only normalises.
    frame_spec = FrameSpec(num_frames=frames, height=side, width=side)
    results = []
    for video in videos:
        try:
            clip_frames = decode_clip(video, frame_spec).frames
        except DecodeError as e:
            results.append({"video": video, "error": str(e)})
            continue
        emb = encode_frames(clip_frames, clip, device, batch_size=frames).mean(axis=0)
        emb = emb / max(np.linalg.norm(emb), 1e-12)
        logits = scale * text @ emb
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        order = np.argsort(-probs)[:top]
        results.append({"video": video, "top": [(labels[i], float(probs[i])) for i in order]})
    return results
