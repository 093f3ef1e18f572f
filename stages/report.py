"""Report stage: the paper's comparisons re-measured on the demo world, as markdown + PNG.

Every number is read from the cache (run metrics, histories, untuned evaluations) or computed here
from cached features; nothing is typed in. Runs are found by the names the demo's dvc.yaml gives
them (cache/runs/<table>-<setting>/s<seed>); a missing run shows as "not run" rather than failing,
so the report of a partial pipeline still says what it has.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from pipeline.core.cachefs import as_path
from pipeline.core.errors import PipelineError
from pipeline.core.files import read_history, read_json
from pipeline.core.plots import plot_curves
from pipeline.learning import evaluation
from pipeline.storage.featurestore import video_features

from .heads import open_features
from .inputs import open_fresh
from .paths import heads_path, run_path

HEAD_ROWS = [("random", "random (normal init)"), ("orthogonal", "orthogonal"), ("lda", "LDA (class means, sample)"),
             ("text-minilm", "MiniLM text (DistilBERT stand-in)"), ("clip-text", "CLIP text (ours)"),
             ("prototype", "class-mean prototype (extra)")]
UNTUNED_FILE = {"random": "random", "orthogonal": "orthogonal", "lda": "lda", "clip-text": "clip-text",
                "prototype": "prototype"}


def _seeds(cache: Path, name: str) -> list[dict]:
    """metrics.json (+ history, run settings) of every seed of a run group; one-seed runs sit at the top."""
    base = run_path(cache, name)
    dirs = sorted(p for p in base.glob("s*") if (p / "metrics.json").is_file()) if base.is_dir() else []
    if (base / "metrics.json").is_file():
        dirs = [base]
    out = []
    for d in dirs:
        m = read_json(d / "metrics.json", "run metrics")
        history = read_history(d / "history.jsonl")
        steps = [h for h in history if h["kind"] == "step"]
        m["losses"] = [h["loss"] for h in steps]
        m["train_seconds"] = float(sum(h["seconds"] for h in steps))
        m["settings"] = read_json(d / "run.json", "run settings")
        out.append(m)
    return out


def _stat(values: list[float]) -> tuple[float, float] | None:
    return (float(np.mean(values)), float(np.std(values))) if values else None


def _cell(stat: tuple[float, float] | None, n: int | None = None) -> str:
    if stat is None:
        return "not run"
    return f"{stat[0]:.1f} ± {stat[1]:.1f}" + (f" (n={n})" if n and n != 2 else "")


def _top1(runs: list[dict], key: str = "val_top1") -> tuple[float, float] | None:
    return _stat([r[key] for r in runs if key in r])


def _untuned(cache: Path, kind: str) -> dict | None:
    path = as_path(cache) / "metrics" / f"untuned-{kind}.json"
    return read_json(path, "metrics") if path.is_file() else None


def _verdict(holds: bool | None, text: str) -> str:
    if holds is None:
        return f"*Finding: cannot be judged (runs missing).* {text}"
    return f"*Finding {'holds' if holds else 'does NOT hold'} in this world:* {text}"


def zero_shot_seen_vs_heldout(cache: Path, dataset: str, model_tag: str, heldout: list[str]) -> dict | None:
    """Untuned CLIP-text head: accuracy (among all classes) on videos of classes seen in pretraining vs held out."""
    hpath = heads_path(cache, dataset, model_tag, "clip-text")
    if not (hpath / "zarr.json").exists():
        return None
    group = open_features(cache, dataset, model_tag, "val")
    feats, labels, _ = video_features(group)
    keep = labels >= 0
    feats, labels = feats[keep], labels[keep]
    head_group = open_fresh(cache, hpath, "clip-text head")
    head, names = head_group["head"][:], list(head_group.attrs["class_names"])
    logits = evaluation.cosine_logits(feats, head)
    held = np.isin(labels, [names.index(h) for h in heldout if h in names])
    out = {}
    for key, mask in (("seen", ~held), ("heldout", held)):
        if mask.any():
            out[key] = evaluation.metrics(logits[mask], labels[mask])
    return out


def run(cache: Path, out_dir: Path, dataset: str, order_dataset: str,
        model_tag: str, settings_note: str) -> tuple[Path, str]:
    cache, out_dir = as_path(cache), as_path(out_dir)
    if not any((cache / stage / dataset).is_dir() for stage in ("frames", "features")):
        raise PipelineError(f"nothing cached for dataset {dataset!r} under {cache}: run the demo pipeline first "
                            "(`make demo`), or pass the dataset's cache name with -d")
    out_dir.mkdir(parents=True, exist_ok=True)
    lines: list[str] = ["# Text4Vis on the demo world", ""]
    pretrain_info = json.loads((cache / model_tag / "pretrain.json").read_text()) if (
        cache / model_tag / "pretrain.json").is_file() else {}
    world_file = cache / "world" / "world.json"
    world = json.loads(world_file.read_text()) if world_file.is_file() else {}
    if world:
        n_classes = len(world["colours"]) * len(world["shapes"]) * len(world["sizes"])
        lines += [f"World: {n_classes} classes (sizes x colours x shapes), {world['train_per_class']} training and "
                  f"{world['val_per_class']} validation clips per class, {world['frames']} frames of "
                  f"{world['size']} px. Tiny CLIP pretrained for {pretrain_info.get('config', {}).get('steps', '?')} "
                  f"steps; {len(pretrain_info.get('heldout', []))} classes never captioned in pretraining. "
                  "Top-1 accuracy (%) on the validation split, mean ± std over seeds.", ""]
    if settings_note:
        lines += [settings_note, ""]

    # ---- Table 6: heads ------------------------------------------------------------------------
    lines += ["## Table 6: frozen classifier heads", "",
              "Untuned: the head on the pretrained model's cached features (TAP), no training. Fine-tuned: full "
              "fine-tuning of the visual encoder against the frozen head.", "",
              "| head | untuned top-1 | fine-tuned top-1 (full fine-tune) |", "|---|---|---|"]
    t6: dict[str, tuple[float, float] | None] = {}
    for kind, label in HEAD_ROWS:
        untuned = _untuned(cache, UNTUNED_FILE[kind]) if kind in UNTUNED_FILE else None
        runs = _seeds(cache, f"t6-{kind}")
        t6[kind] = _top1(runs)
        u = f"{untuned['full']['top1']:.1f}" if untuned else "— (needs a projection)"
        tuned = "— (untuned row only)" if kind == "prototype" and not runs else _cell(t6[kind], len(runs))
        lines.append(f"| {label} | {u} | {tuned} |")
    randoms = [t6[k] for k in ("random", "orthogonal") if t6[k]]
    holds6 = None if not (t6["clip-text"] and randoms) else all(t6["clip-text"][0] > r[0] for r in randoms)
    lines += ["", _verdict(holds6, "the CLIP-text head beats the random and orthogonal heads after fine-tuning "
                                   "(paper: textual knowledge gives the best head; random heads lag)."), ""]

    # ---- Table 7: vision-only vs vision-text ---------------------------------------------------
    untuned_ct = _untuned(cache, "clip-text")
    rows7 = [("zero-shot", None, untuned_ct["full"]["top1"] if untuned_ct else None),
             ("2-shot", "t7-learnable-2shot", "t7-clip-text-2shot"), ("full data", "t7-learnable-full", "t6-clip-text")]
    lines += ["## Table 7: vision-only (learnable head) vs vision-text (frozen CLIP-text head)", "",
              "| regime | vision-only | vision-text | gap |", "|---|---|---|---|"]
    gaps = {}
    for regime, vision_only, vision_text in rows7:
        if regime == "zero-shot":
            vt = (vision_text, 0.0) if vision_text is not None else None
            lines.append(f"| zero-shot (untuned) | — (no classifier without training) | {_cell(vt)} | |")
            continue
        vo_runs, vt_runs = _seeds(cache, vision_only), _seeds(cache, vision_text)
        vo, vt = _top1(vo_runs), _top1(vt_runs)
        gap = f"{vt[0] - vo[0]:+.1f}" if vo and vt else ""
        gaps[regime] = (vt[0] - vo[0]) if vo and vt else None
        lines.append(f"| {regime} | {_cell(vo, len(vo_runs))} | {_cell(vt, len(vt_runs))} | {gap} |")
    holds7 = None if None in gaps.values() or not gaps else all(g > 0 for g in gaps.values())
    shrinks = None if holds7 is None else gaps["full data"] < gaps["2-shot"]
    lines += ["", _verdict(holds7, "vision-text beats vision-only in every regime, by "
                                   + ", ".join(f"{g:+.1f} ({r})" for r, g in gaps.items() if g is not None)
                                   + " points (paper: vision-text is better, most of all with little data).")]
    if shrinks is not None:
        lines.append(f"The gap is {gaps['2-shot'] - gaps['full data']:.1f} points smaller with full data." if shrinks
                     else "The gap does not shrink with more data here, unlike the paper's (30 epochs on Kinetics let "
                     "a learnable head catch up): at the paper's small learning rates one epoch of this world is "
                     "too short for a randomly initialised head, whatever the data size.")
    lines.append("")

    # ---- Table 8: temporal modules ---------------------------------------------------------------
    lines += ["## Table 8: temporal modules on order classes (\"a red object then a blue object\")", "",
              "Frozen-backbone rows (the temporal module trains on cached frame features). TAP sees the same "
              "frames for a class and its reverse, so it cannot exceed 50% by construction.", "",
              "| temporal module | CLIP-text head | learnable head |", "|---|---|---|"]
    t8 = {}
    for temporal in ("tap", "ttrans"):
        cells = []
        for head in ("clip-text", "learnable"):
            runs = _seeds(cache, f"t8-{temporal}-{head}")
            t8[(temporal, head)] = _top1(runs)
            cells.append(_cell(t8[(temporal, head)], len(runs)))
        lines.append(f"| {'TAP' if temporal == 'tap' else 'T-Trans'} | {cells[0]} | {cells[1]} |")
    full = {}
    for temporal in ("tap", "tokent1d"):
        runs = _seeds(cache, f"t8-full-{temporal}")
        full[temporal] = _top1(runs)
        name = "TAP" if temporal == "tap" else "TokenT1D"
        lines.append(f"| {name}, full fine-tuning | {_cell(full[temporal], len(runs))} | — |")
    lines += ["", "The last two rows fine-tune the visual encoder on the order world's frames (the settings of "
              "Table 6): TokenT1D mixes the CLS token over time inside every block, initialised as the official "
              "partial shift."]
    # The paper's claim is about the text head; the other two comparisons are stated, with their numbers.
    text_pair = (t8[("ttrans", "clip-text")], t8[("tap", "clip-text")])
    holds8 = None if None in text_pair else text_pair[0][0] > text_pair[1][0]
    claim = "with the CLIP-text head, T-Trans beats TAP where order matters"
    if holds8 is not None:
        claim += f" ({text_pair[0][0]:.1f} vs {text_pair[1][0]:.1f})"
    lines += ["", _verdict(holds8, claim + " (paper: temporal modelling helps on top of the text head).")]
    also = []
    if t8[("ttrans", "learnable")] is not None and t8[("tap", "learnable")] is not None:
        a, b = t8[("ttrans", "learnable")][0], t8[("tap", "learnable")][0]
        also.append(f"with the learnable head T-Trans {'beats' if a > b else 'does not beat'} TAP ({a:.1f} vs {b:.1f})")
    if full["tokent1d"] is not None and full["tap"] is not None:
        a, b = full["tokent1d"][0], full["tap"][0]
        also.append(f"with full fine-tuning TokenT1D {'beats' if a > b else 'does not beat'} TAP ({a:.1f} vs {b:.1f})")
    if also:
        lines.append("Also: " + "; ".join(also) + ".")
    lines.append("")

    # ---- Table 9: contrastive baseline -------------------------------------------------------------
    lines += ["## Table 9: contrastive video-text matching vs our frozen-head cross-entropy", ""]
    rows9 = [("contrastive, text offline, no gather", "t9-offline-local"),
             ("contrastive, text offline, batch gather", "t9-offline-gather"),
             ("contrastive, text online, no gather", "t9-online-local"),
             ("contrastive, text online, batch gather", "t9-online-gather"),
             ("ours: cross-entropy vs frozen CLIP-text head", "t9-ours")]
    found9 = {key: _seeds(cache, key) for _, key in rows9}
    procs = {r["settings"].get("world_size") for runs in found9.values() for r in runs} - {None}
    lines += [f"All rows: the same setting and steps, run under `torchrun --nproc_per_node=2` (gloo on CPU; "
              f"{'2 processes' if not procs else ', '.join(str(p) for p in sorted(procs)) + ' processes'}). "
              "Wall time: training steps only, this machine.", "",
              "| method | top-1 | training wall time (s) |", "|---|---|---|"]
    for label, key in rows9:
        runs = found9[key]
        lines.append(f"| {label} | {_cell(_top1(runs), len(runs))} | "
                     f"{_cell(_stat([r['train_seconds'] for r in runs]), len(runs))} |")
    ours, contrast = _top1(found9["t9-ours"]), [_top1(found9[k]) for _, k in rows9[:4]]
    ours_time = _stat([r["train_seconds"] for r in found9["t9-ours"]])
    times = [_stat([r["train_seconds"] for r in found9[k]]) for _, k in rows9[:4]]
    holds9 = faster9 = None
    if ours is not None and None not in contrast and ours_time and None not in times:
        best = max(c[0] for c in contrast)
        # one validation video is 100/192 ~ 0.5 points: within 1 point is "comparable" at one seed
        holds9 = ours[0] >= best - 1.0
        # the paper's cost claim is against gathering and a trained text tower: rows 2-4 here
        costly = [t[0] for t in times[1:]]
        faster9 = ours_time[0] < min(costly)
        lines += ["", _verdict(holds9, f"accuracy: ours is {ours[0] - best:+.1f} points from the best contrastive "
                                       "variant (paper: comparable accuracy; here 'comparable' means within 1 point, "
                                       "two validation videos).")]
        lines += ["", _verdict(faster9, f"cost: ours trains in {ours_time[0]:.1f} s, against {min(costly):.1f}-"
                                        f"{max(costly):.1f} s for the variants with batch gather or an online text "
                                        f"tower ({times[0][0]:.1f} s for offline text without gather, which does the "
                                        "same work as ours) (paper: no gather and no text tower make the frozen head "
                                        "cheaper).")]
    else:
        lines += ["", _verdict(None, "accuracy and cost against the contrastive variants.")]
    lines.append("")

    # ---- zero-shot -------------------------------------------------------------------------------------
    lines += ["## Zero-shot (untuned CLIP-text head)", "", "| protocol | top-1 |", "|---|---|"]
    if untuned_ct:
        lines.append(f"| all {untuned_ct['full']['classes']} classes | {untuned_ct['full']['top1']:.1f} |")
        if "half" in untuned_ct:
            h = untuned_ct["half"]
            lines.append(f"| half of the classes x {len(h['runs'])} draws | {h['top1']:.1f} ± {h['top1_std']:.1f} |")
    split = zero_shot_seen_vs_heldout(cache, dataset, model_tag, pretrain_info.get("heldout", []))
    if split:
        for key, label in (("seen", "classes seen in pretraining"), ("heldout", "held-out attribute combinations")):
            if key in split:
                lines.append(f"| {label} ({split[key]['classes']} classes, among all) | {split[key]['top1']:.1f} |")
    rand = _untuned(cache, "random")
    holds_zs = None if not (untuned_ct and rand) else untuned_ct["full"]["top1"] > 3 * rand["full"]["top1"]
    lines += ["", _verdict(holds_zs, "a text head classifies without any training, far above a random head "
                                     f"({rand['full']['top1']:.1f} untuned)." if rand else "")
              + (" Held-out combinations are harder than seen ones: composing unseen attribute pairs is the "
                 "weak point of a model this small." if split and "heldout" in split else ""), ""]

    # ---- figures ---------------------------------------------------------------------------------------
    lines += ["## Figures", ""]
    plots = as_path(cache) / "plots" / dataset
    for kind in ("clip-text", "text-hf-all-MiniLM-L6-v2", "lda", "random"):
        src = plots / f"head-correlation-{kind}.png"
        if src.is_file():
            shutil.copyfile(src, out_dir / f"fig1-{kind}.png")
            lines.append(f"![Fig. 1, {kind}](fig1-{kind}.png)")
    curves = {"vision-text (CLIP-text head)": [r["losses"] for r in _seeds(cache, "t6-clip-text")],
              "vision-only (learnable head)": [r["losses"] for r in _seeds(cache, "t7-learnable-full")]}
    if any(curves.values()):
        plot_curves(curves, out_dir / "figA4-loss.png", "Fig. A.4: training loss, full data, full fine-tuning")
        lines += ["", "![Fig. A.4](figA4-loss.png)"]
    text = "\n".join(lines) + "\n"
    (out_dir / "report.md").write_text(text)
    summary = {"table6": {k: v for k, v in t6.items()}, "table7_gaps": gaps,
               "table8": {f"{a}-{b}": v for (a, b), v in t8.items()},
               "table9": {k: _top1(v) for k, v in found9.items()},
               "findings": {"table6": holds6, "table7": holds7, "table8": holds8, "table9_accuracy": holds9,
                            "table9_cost": faster9,
                            "zero_shot": holds_zs}}
    (out_dir / "report.json").write_text(json.dumps(summary, indent=2))
    return out_dir / "report.md", text
