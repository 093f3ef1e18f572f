"""Classifier heads: [C, D] float32 matrices applied as cosine logits.

Frozen heads of the paper: text embeddings of the class names (CLIP's or another text encoder's),
LDA fitted on 60 videos per class, random (normal) and orthogonal rows; plus ``prototype`` (the
normalised class means of the same sample), a bias-free cosine head that LDA's ``coef_`` is not.
"""

from __future__ import annotations

import warnings

import numpy as np

from pipeline.core.errors import PipelineError

HEAD_KINDS = ("clip-text", "text", "random", "orthogonal", "prototype", "lda")


def random_head(c: int, d: int, seed: int) -> np.ndarray:
    """Rows ~ N(0, I_d)."""
    return np.random.default_rng(seed).standard_normal((c, d)).astype(np.float32)


def orthogonal_head(c: int, d: int, seed: int) -> np.ndarray:
    """First C rows of a random orthogonal d x d matrix (QR of a Gaussian, signs fixed: Haar-distributed)."""
    if c > d:
        raise PipelineError(f"an orthogonal head needs classes <= width: {c} classes > {d} dimensions")
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    q = q * np.sign(np.diag(r))[None, :]
    return q.T[:c].astype(np.float32)


def sample_per_class(labels: np.ndarray, n_classes: int, per_class: int, seed: int,
                     min_per_class: int = 1, class_names: list[str] | None = None) -> np.ndarray:
    """Sorted row indices: ``per_class`` rows of each class drawn without replacement (all of a smaller class)."""
    name = (lambda c: repr(class_names[c])) if class_names else (lambda c: f"class {c}")
    rng = np.random.default_rng(seed)
    chosen = []
    short = []
    for c in range(n_classes):
        rows = np.flatnonzero(labels == c)
        if rows.size < min_per_class:
            raise PipelineError(f"{name(c)} has {rows.size} usable training videos; at least {min_per_class} needed")
        if rows.size < per_class:
            short.append(c)
        chosen.append(rng.choice(rows, size=min(per_class, rows.size), replace=False))
    if short:
        shown = ", ".join(name(c) for c in short[:3]) + (", ..." if len(short) > 3 else "")
        warnings.warn(f"{len(short)} classes have fewer than {per_class} videos; all of theirs were used "
                      f"({shown})", stacklevel=2)
    return np.sort(np.concatenate(chosen))


# The cached features are float16: a head that moves when they move by one rounding step (2**-11 of each value)
# is fitted to rounding, and another CPU's float kernels give another head and another accuracy.
ROUNDING = 2.0 ** -11
MOVED_TOO_FAR = 0.01


def _fit_lda(x: np.ndarray, y: np.ndarray, solver: str, shrinkage: float | str | None) -> np.ndarray:
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis  # 2 s to import: only when fitting

    return LinearDiscriminantAnalysis(solver=solver, shrinkage=shrinkage).fit(x.astype(np.float64, copy=False), y).coef_


def _rounding_sensitivity(x: np.ndarray, y: np.ndarray, coef: np.ndarray, solver: str,
                          shrinkage: float | str | None) -> float:
    """How far (relative Frobenius norm) the head moves when every feature moves by one float16 rounding step,
    up or down by a fixed draw: the fit again on the moved features."""
    signs = np.where(np.random.default_rng(0).random(x.shape) < 0.5, -1.0, 1.0)
    moved = _fit_lda(x.astype(np.float64) * (1.0 + ROUNDING * signs), y, solver, shrinkage)
    return float(np.linalg.norm(moved - coef) / max(np.linalg.norm(coef), 1e-30))


def lda_head(x: np.ndarray, y: np.ndarray, n_classes: int, solver: str = "svd",
             shrinkage: float | str | None = None) -> np.ndarray:
    """``coef_`` of scikit-learn's LDA fitted on (x, y): [C, D] (two classes: [-w, w]). Warns when the fit is
    ill-conditioned: when one float16 rounding step of the features moves the head by more than 1 %."""
    if shrinkage is not None and solver == "svd":
        raise PipelineError("LDA shrinkage needs solver 'lsqr' or 'eigen'")
    if isinstance(shrinkage, float) and not 0.0 <= shrinkage <= 1.0:
        raise PipelineError(f"LDA shrinkage must be 'auto' or a number in [0, 1], not {shrinkage}")
    if len(x) <= n_classes:
        raise PipelineError(f"LDA needs more videos than classes: {len(x)} videos for {n_classes} classes "
                            "(use --per-class 2 or more)")
    coef = _fit_lda(x, y, solver, shrinkage)
    moved = _rounding_sensitivity(x, y, coef, solver, shrinkage)
    if moved > MOVED_TOO_FAR:
        advice = "more videos a class, or --solver lsqr --shrinkage auto (Ledoit-Wolf)" if shrinkage is None else \
            "more videos a class, or more shrinkage"
        warnings.warn(f"the LDA fit is ill-conditioned: moving the features by one float16 rounding step moves "
                      f"its head by {moved:.0%}, so another machine's float kernels give another head and other "
                      f"accuracies; {advice} make it stable", stacklevel=2)
    if n_classes == 2 and coef.shape[0] == 1:
        coef = np.concatenate([-coef, coef])  # binary LDA has one discriminant direction
    return coef.astype(np.float32)


def prototype_head(x: np.ndarray, y: np.ndarray, n_classes: int) -> np.ndarray:
    """Normalised class means [C, D] (accumulated in float64)."""
    d = x.shape[1]
    sums = np.zeros((n_classes, d), np.float64)
    np.add.at(sums, y, x.astype(np.float64))
    means = sums / np.maximum(np.bincount(y, minlength=n_classes), 1)[:, None]
    return (means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)).astype(np.float32)
