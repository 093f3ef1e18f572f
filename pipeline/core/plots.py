"""PNG figures: the inter-class correlation map of a head (the paper's Fig. 1)."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.core.cachefs import as_path  # noqa: E402
from pipeline.core.files import write_atomic  # noqa: E402


def correlation(head: np.ndarray) -> np.ndarray:
    """Cosine similarity between the rows of a head [C, D] -> [C, C]."""
    h = head / np.maximum(np.linalg.norm(head, axis=1, keepdims=True), 1e-12)
    return h @ h.T


def plot_correlation(head: np.ndarray, class_names: list[str], out: str | os.PathLike, title: str) -> Path:
    corr = correlation(head)
    n = len(class_names)
    size = max(4.0, min(16.0, 0.32 * n + 2))
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    # colour range from the data: near-identical text rows (cosine 0.9+) must still show structure
    im = ax.imshow(corr, cmap="viridis", vmin=float(corr.min()), vmax=1.0)
    ax.set_xticks(range(n), class_names, rotation=90, fontsize=7)
    ax.set_yticks(range(n), class_names, fontsize=7)
    off = corr[~np.eye(n, dtype=bool)]
    ax.set_title(f"{title}\noff-diagonal cosine: mean {off.mean():.2f}, max {off.max():.2f}" if n > 1 else title,
                 fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _save(fig, out)


def plot_curves(curves: dict[str, list[np.ndarray]], out: str | os.PathLike, title: str, ylabel: str = "training loss",
                xlabel: str = "step") -> Path:
    """One line per label: the mean over its runs (seeds), with a band from min to max (the paper's Fig. A.4)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, runs in curves.items():
        if not runs:
            continue
        n = min(len(r) for r in runs)
        stack = np.stack([np.asarray(r[:n], dtype=float) for r in runs])
        steps = np.arange(1, n + 1)
        ax.plot(steps, stack.mean(axis=0), label=f"{label} ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
        if len(runs) > 1:
            ax.fill_between(steps, stack.min(axis=0), stack.max(axis=0), alpha=0.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, out)


def _save(fig, out: str | os.PathLike) -> Path:
    fig.tight_layout()
    out = as_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda f: fig.savefig(f, dpi=120, format="png"))
    plt.close(fig)
    return out
