"""Finetune stage, frozen-backbone setting: train the temporal module against a head on cached features."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from pipeline import store
from pipeline.errors import PipelineError
from pipeline.heads import sample_per_class
from pipeline.models.classifier import CosineHead, FrameFeatureClassifier
from pipeline.models.temporal import build_temporal
from pipeline.models.text import encoder_tag
from pipeline.progress import Progress
from pipeline.sampling import sample_rng, segment_indices
from pipeline.training import ClipSet, TrainConfig, train

from .heads import open_features
from .paths import heads_path, splits_of


class CachedFeatureSet(ClipSet):
    """Clips of T frame features drawn TSN-style from the T_cache cached ones."""

    def __init__(self, features: np.ndarray, labels: np.ndarray, frames: int, seed: int) -> None:
        self.features, self.labels, self.frames, self.seed = features, labels, frames, seed

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, indices, epoch: int, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.features.shape[1]
        rows = [self.features[i, segment_indices(n, self.frames, sample_rng(self.seed, epoch, i) if train else None)]
                for i in indices]
        x = torch.from_numpy(np.stack(rows).astype(np.float32))
        return x, torch.from_numpy(self.labels[list(indices)].astype(np.int64))


def load_split(group) -> tuple[np.ndarray, np.ndarray]:
    status, labels = group["status"][:], group["label"][:]
    keep = (status == 1) & (labels >= 0)
    return group["features"][:][keep], labels[keep]


def run(cache: Path, dataset: str, model_tag: str, head: str, temporal: str, cfg: TrainConfig, *,
        encoder: str | None = None, run_name: str | None = None, frames: int = 8, shots: int | None = None,
        layers: int = 6, replace_mismatched: bool = False, quiet: bool = False) -> dict:
    train_group = open_features(cache, dataset, model_tag, "train")
    has_val = "val" in splits_of(cache, "features", dataset, model_tag)
    val_group = open_features(cache, dataset, model_tag, "val") if has_val else None
    names = list(train_group.attrs["class_names"])
    c, width = len(names), int(train_group.attrs["embed_dim"])
    if frames > int(train_group.attrs["num_frames"]):
        raise PipelineError(f"--frames {frames} > the {train_group.attrs['num_frames']} frames cached per video")
    if head == "learnable":
        # its own stream of the run seed (not the same draws as any other seeded choice of the run)
        rng = np.random.default_rng([cfg.seed, 0x1EAD])
        weights = torch.from_numpy(rng.standard_normal((c, width)).astype(np.float32))
        head_fp = "learnable"
    else:
        enc = encoder_tag(encoder, model_tag) if head == "text" and encoder else None
        hgroup = store.open_existing(heads_path(cache, dataset, model_tag, head, enc), f"{head} head of {dataset}")
        weights, head_fp = torch.from_numpy(hgroup["head"][:]), hgroup.attrs["fingerprint"]
    x_train, y_train = load_split(train_group)
    epoch_length = None
    if shots:
        rows = sample_per_class(y_train, c, shots, cfg.seed)
        epoch_length = len(y_train)  # the K-shot subset repeated: as many iterations as the full set
        x_train, y_train = x_train[rows], y_train[rows]
    run_name = run_name or f"{dataset}-{model_tag}-{head}-{temporal}-frozen" + (f"-{shots}shot" if shots else "")
    run_dir = Path(cache) / "runs" / run_name
    record = {"stage": "finetune", "backbone": "frozen", "train": train_group.attrs["fingerprint"],
              "val": val_group.attrs["fingerprint"] if val_group is not None else None, "head": head,
              "head_fingerprint": head_fp, "temporal": temporal, "frames": frames, "shots": shots, "layers": layers,
              "config": cfg.as_dict()}
    fp = store.fingerprint(record)

    torch.manual_seed(cfg.seed)
    model = FrameFeatureClassifier(build_temporal(temporal, width, layers=layers, max_frames=frames),
                                   CosineHead(weights, learnable=head == "learnable"), width, project=temporal == "tap")
    temporal_lr = cfg.temporal_lr or cfg.lr

    def lr_of(name: str) -> float:
        return temporal_lr if name.startswith("temporal.") else cfg.lr

    with store.writer_lock(run_dir):
        config_file = run_dir / "run.json"
        if config_file.exists() and json.loads(config_file.read_text())["fingerprint"] != fp:
            if not replace_mismatched:
                raise PipelineError(f"run {run_name!r} exists with other parameters or inputs; use another --run "
                                    "or --replace-mismatched")
            for entry in run_dir.iterdir():
                if entry.name != store.LOCK_NAME:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        config_file.write_text(json.dumps({"fingerprint": fp, **record, "dataset": dataset, "model_tag": model_tag,
                                           "class_names": names, "encoder": encoder}, indent=2, default=str))
        history = run_dir / "history.jsonl"
        steps = cfg.epochs * -(-(epoch_length or len(y_train)) // cfg.batch_size)
        with Progress(steps, f"finetune {run_name}", quiet, unit="step") as bar, open(history, "a") as log:
            def report(kind: str, values: dict) -> None:
                log.write(json.dumps({"kind": kind, **values}) + "\n")
                log.flush()
                if kind == "step":
                    bar.update(1)

            bar.update(0)
            val_set = CachedFeatureSet(*load_split(val_group), frames, cfg.seed) if val_group is not None else None
            result = train(model, CachedFeatureSet(x_train, y_train, frames, cfg.seed), val_set, cfg, run_dir, fp,
                           lr_of=lr_of, callback=report, epoch_length=epoch_length)
    final = result["history"][-1] if result["history"] else {}
    metrics = {"run": run_name, "steps": result["steps"], "best_val_top1": result["best_top1"],
               **{k: v for k, v in final.items() if k.startswith("val_")}}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics | {"path": str(run_dir)}
