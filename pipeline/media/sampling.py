"""TSN-style frame sampling: T of the T_cache stored frames, one per segment."""

from __future__ import annotations

import numpy as np


def segment_indices(n: int, t: int, rng: np.random.Generator | None = None, position: float = 0.5) -> np.ndarray:
    """One index per each of ``t`` equal segments of ``n`` frames.

    Training (``rng`` given): a random offset inside each segment. Evaluation: ``position`` inside
    each segment (0.5: the centres; multi-view clip c of C: (c + 0.5) / C). With fewer frames than
    segments, indices repeat.
    """
    edges = np.arange(t + 1) * n / t
    if rng is None:
        idx = edges[:-1] + position * (edges[1:] - edges[:-1])
    else:
        idx = edges[:-1] + rng.random(t) * (edges[1:] - edges[:-1])
    return np.minimum(idx.astype(np.int64), n - 1)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream of one sample in one epoch: independent of order, workers and resumption."""
    return np.random.default_rng([seed, epoch, index])


def view_indices(n: int, t: int, clip: int = 0, clips: int = 1) -> np.ndarray:
    """The ``t`` frames (of ``n``) of temporal view ``clip`` of ``clips``, as the official test sampler picks them
    (whwu95/Text4Vis datasets/datasets.py:141-149; one view, and validation during training, :122-123): a
    segment of ``tick = n / t`` frames, view c starting at ``int(linspace(0, tick - 1, clips))[c]`` in each
    segment (so one view takes each segment's first frame, and 4 views of 4 frames a segment take all 4)."""
    tick = n / t
    starts = np.trunc(np.linspace(0, tick - 1, num=clips)).astype(np.int64)  # the official `dtype=int` truncation
    return (starts[clip] + tick * np.arange(t)).astype(np.int64) % n
