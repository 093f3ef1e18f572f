"""Classification metrics from cosine logits, and the zero-shot protocols of the paper."""

from __future__ import annotations

import warnings

import numpy as np

from pipeline.core.errors import PipelineError


def cosine_logits(features: np.ndarray, head: np.ndarray) -> np.ndarray:
    """[n, C] cosine similarities between video embeddings [n, D] and head rows [C, D]."""
    if features.shape[1] != head.shape[1]:
        raise PipelineError(f"head width {head.shape[1]} differs from the feature width {features.shape[1]}: "
                            "only a trained run's projection can bridge it")
    f = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    h = head / np.maximum(np.linalg.norm(head, axis=1, keepdims=True), 1e-12)
    return f @ h.T


def metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """top-1, top-5 (top-C when C < 5) and mean class accuracy, in percent."""
    if labels.size == 0:
        raise PipelineError("no labelled videos to evaluate")
    k = min(5, logits.shape[1])
    # top-k by partition, then order those k: O(n C) instead of sorting every row
    part = np.argpartition(-logits, k - 1, axis=1)[:, :k] if k < logits.shape[1] else np.tile(
        np.arange(logits.shape[1]), (logits.shape[0], 1))
    order = np.argsort(-np.take_along_axis(logits, part, axis=1), axis=1, kind="stable")
    top = np.take_along_axis(part, order, axis=1)
    hit1 = top[:, 0] == labels
    hitk = (top == labels[:, None]).any(axis=1)
    classes = np.unique(labels)
    per_class = [hit1[labels == c].mean() for c in classes]
    return {"top1": 100 * float(hit1.mean()), "top5": 100 * float(hitk.mean()),
            "mean_class": 100 * float(np.mean(per_class)), "videos": int(labels.size), "classes": int(classes.size)}


def multilabel_metrics(scores: np.ndarray, targets: np.ndarray, cosines: np.ndarray | None = None) -> dict[str, float]:
    """Multi-label validation (ActivityNet): mAP over classes with a positive, and top-1/top-5 hit rates
    (a hit: the predicted class is one of the video's labels), in percent. ``mAP_official`` scores
    100 x ``cosines`` as test_anet.py:244 does whatever the model's own logit scale (``scores`` when not given)."""
    from sklearn.metrics import average_precision_score

    if targets.size == 0:
        raise PipelineError("no labelled videos to evaluate")
    targets = targets.astype(bool)
    present = np.flatnonzero(targets.any(axis=0))
    ap = [average_precision_score(targets[:, c], scores[:, c]) for c in present]
    k = min(5, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    hits = np.take_along_axis(targets, top, axis=1)
    official = official_anet_map(100.0 * cosines if cosines is not None else scores, targets)
    return {"mAP": 100 * float(np.mean(ap)), "mAP_official": official,
            "top1": 100 * float(hits[:, 0].mean()),
            "top5": 100 * float(hits.any(axis=1).mean()), "videos": int(len(targets)), "classes": int(present.size)}


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def official_anet_map(logits: np.ndarray, targets: np.ndarray) -> float:
    """ActivityNet mAP as the official code computes it (whwu95/Text4Vis test_anet.py + utils.mean_average_precision):
    class probabilities softmax(softmax(logits)) (its evaluation applies softmax, then the mAP function again),
    then torchnet's mAPMeter: per class, the mean precision at each positive of the videos ranked by that
    class's probability, averaged over every class (0 for a class without positives), in percent.
    ``logits``: scale x cosine (the official 100 x cos); ``targets``: multi-hot (the official lists give one
    label a video; a second label of ours counts as a positive too)."""
    probs = _softmax(_softmax(logits.astype(np.float64)))
    targets = targets.astype(bool)
    ap = np.zeros(probs.shape[1])
    ranks = np.arange(1, probs.shape[0] + 1)
    for k in range(probs.shape[1]):
        truth = targets[np.argsort(-probs[:, k], kind="stable"), k]
        if truth.any():
            ap[k] = float((np.cumsum(truth) / ranks)[truth].sum() / truth.sum())
    return 100 * float(ap.mean())


def restricted(logits: np.ndarray, labels: np.ndarray, classes: np.ndarray) -> dict[str, float] | None:
    """Metrics over the videos of ``classes``, choosing among those of them that have videos, as the official
    code does (test_zeroshot.py:303-313: ``subclasses = np.unique(true_label[sel])``); ``logits`` [n, C] score
    every class (a head restricted to some rows scores those columns, whether cosine or a run's). None when no
    video belongs to ``classes`` (every video of those classes failed to decode, say)."""
    keep = np.isin(labels, classes)
    if not keep.any():
        return None
    present = np.unique(labels[keep])
    remap = np.full(logits.shape[1], -1)
    remap[present] = np.arange(present.size)
    return metrics(logits[keep][:, present], remap[labels[keep]])


def half_draw(n_classes: int, seed: int) -> np.ndarray:
    """The classes of one half-classes draw, as the official code draws them (test_zeroshot.py:300-302:
    ``np.random.seed(split); np.random.permutation(C)[:C // 2]``, numpy's legacy MT19937 stream), sorted.
    A private RandomState gives the same stream without touching numpy's global one."""
    return np.sort(np.random.RandomState(seed).permutation(n_classes)[: n_classes // 2])


def half_classes(logits: np.ndarray, labels: np.ndarray, seeds=range(10)) -> dict:
    """The paper's UCF*/HMDB*/ANet* protocol: half of the classes per draw, the official code's 10 draws (seeds
    0..9); mean and std over draws. Each draw's class indices are listed with its metrics, so they can be checked."""
    c = logits.shape[1]
    if c < 4:
        warnings.warn(f"the half-classes protocol on {c} classes scores {c // 2} class(es) per draw: "
                      "its numbers say little (it is meant for UCF101, HMDB51, ActivityNet)", stacklevel=2)
    runs = []
    for seed in seeds:
        classes = half_draw(c, seed)
        scores = restricted(logits, labels, classes) or {"empty": True, "videos": 0}
        runs.append(scores | {"name": f"draw {seed}", "seed": int(seed), "class_indices": classes.tolist()})
    return summarize_runs(runs) | {"seeds": list(seeds), "classes_per_draw": c // 2, "draws": "numpy legacy "
                                   "np.random.seed(seed); permutation(C)[:C // 2], as test_zeroshot.py:300-302"}


def subsets(logits: np.ndarray, labels: np.ndarray, class_names: list[str], subset_names: list[list[str]]) -> dict:
    """User-supplied class subsets (e.g. Kinetics-600's three splits of 160 of its 220 new classes, scored among
    those 160 only: the 400 classes seen in training never compete), averaged."""
    index = {n: i for i, n in enumerate(class_names)}
    runs = []
    for names in subset_names:
        missing = [n for n in names if n not in index]
        if missing:
            raise PipelineError(f"class {missing[0]!r} of a subset is not a class of this dataset")
        scores = restricted(logits, labels, np.array(sorted(index[n] for n in names))) or {"empty": True, "videos": 0}
        runs.append(scores | {"name": f"subset {len(runs) + 1}"})
    return summarize_runs(runs) | {"subsets": len(runs)}


def summarize_runs(runs: list[dict]) -> dict:
    """Mean and std over the draws or subsets that have videos; ``used`` says how many of them, and ``empty``
    names the others (a draw whose classes lost every video is reported, never scored as 0 nor dropped
    silently; the other protocols' results stand)."""
    scored = [r for r in runs if not r.get("empty")]
    out: dict = {"used": len(scored), "of": len(runs), "empty": [r["name"] for r in runs if r.get("empty")]}
    for key in ("top1", "top5", "mean_class"):
        values = np.array([r[key] for r in scored])
        out[key] = float(values.mean()) if scored else float("nan")
        out[f"{key}_std"] = float(values.std()) if scored else float("nan")
    out["runs"] = runs
    return out
