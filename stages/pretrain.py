"""Pretrain stage: the demo's tiny CLIP, from the world's training frames, saved as a local-dir: model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.progress import Progress
from pipeline.learning.pretrain import PretrainConfig, pretrain
from pipeline.models.clip import save_local_dir
from pipeline.storage import store
from pipeline.storage.framestore import read_frames

from .paths import frames_path


def run(cache: Path, dataset: str, out: Path, cfg: PretrainConfig, heldout: list[str], quiet: bool) -> dict:
    group = store.open_existing(frames_path(cache, dataset, "train"), f"frame store {dataset}/train")
    if store.pending_blocks(group):
        raise PipelineError(f"frame store {dataset}/train is unfinished: re-run `pipeline frames` first")
    names = list(group.attrs["class_names"])
    unknown = [h for h in heldout if h not in names]
    if unknown:
        raise PipelineError(f"held-out class {unknown[0]!r} is not a class of {dataset}")
    # The frame store's settings, not its snapshot: the demo's model is trained once, on the videos the store had
    # then (recorded below), like any pretrained CLIP; a grown world does not retrain it (a new model would make
    # every feature again). Delete cache/tiny-clip to train it on the current snapshot.
    fp = store.fingerprint({"stage": "pretrain", "frames": group.attrs["fingerprint"], "config": cfg.as_dict(),
                            "heldout": sorted(heldout)})
    marker = out / "pretrain.json"
    if marker.exists() and json.loads(marker.read_text()).get("fingerprint") == fp:
        return json.loads(marker.read_text())
    labels = group["label"][:]
    keep = (group["status"][:] == 1) & store.live_mask(group) & ~np.isin(labels, [names.index(h) for h in heldout])
    frames = read_frames(group, slice(None))[keep]
    with Progress(cfg.steps, "pretrain tiny CLIP", quiet, unit="step") as bar:
        model, model_cfg, losses = pretrain(frames, names, labels[keep], cfg, on_step=lambda s, loss: bar.update(1))
    if out.exists():
        shutil.rmtree(out)
    save_local_dir(model, model_cfg, out)
    summary = {"fingerprint": fp, "config": cfg.as_dict(), "heldout": heldout, "clips": int(keep.sum()),
               "frames_snapshot": store.snapshot_of(group),
               "first_loss": losses[0], "final_loss": float(np.mean(losses[-20:])), "losses": losses}
    marker.write_text(json.dumps(summary, indent=2))
    return summary
