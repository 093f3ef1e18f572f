"""Finetune stage: a video classifier trained against a frozen head from the cache.

Two settings share one run directory layout and the library's one training loop:
- full fine-tuning (the paper): the CLIP visual encoder + temporal module on clips of the frame store;
- ``frozen_backbone``: only the temporal module (and a projection) on cached frame features.

Run directory cache/runs/<name>/: run.json (settings, inputs' fingerprints), checkpoint.pt,
history.jsonl, metrics.json and dvclive/ (per-step loss and lr, per-epoch accuracy).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from pipeline.core.errors import PipelineError
from pipeline.core.progress import say
from pipeline.learning import distributed
from pipeline.learning.clips import CachedFeatureSet, FrameClipSet, load_split, usable_rows
from pipeline.learning.objectives import Objective, with_objective
from pipeline.learning.training import TrainConfig
from pipeline.learning.transforms import AugmentConfig, Normalization
from pipeline.models.classifier import (
    CosineHead,
    FrameFeatureClassifier,
    TemplateDrawHead,
    classifier_for,
)
from pipeline.models.clip import ModelSpec, load_clip
from pipeline.models.coop import CoOpHead
from pipeline.models.heads import sample_per_class
from pipeline.models.temporal import build_temporal
from pipeline.models.text import encode_with_clip, encoder_tag, resolve_templates
from pipeline.storage import store

from .heads import open_features
from .inputs import head_model_changes, require_fresh
from .paths import features_path, frames_path, heads_path, run_path, splits_of
from .runs import choose_snapshots, derived_run_name, init_from_run, train_run

HEAD_SEED_STREAM = 0x1EAD














def head_weights(cache: Path, dataset: str, model_tag: str, head: str, encoder: str | None, n_classes: int,
                 width: int, seed: int) -> tuple[torch.Tensor, str]:
    """The head's rows and fingerprint: from the cache, or random for the learnable (vision-only) head."""
    if head == "coop":  # rows come from the text tower and the learned context (CoOpHead)
        return torch.zeros(n_classes, width), "coop"
    if head == "learnable":
        # its own stream of the run seed (not the same draws as any other seeded choice of the run)
        rng = np.random.default_rng([seed, HEAD_SEED_STREAM])
        return torch.from_numpy(rng.standard_normal((n_classes, width)).astype(np.float32)), "learnable"
    enc = encoder_tag(encoder, model_tag) if head == "text" and encoder else None
    if head == "text" and not encoder:
        raise PipelineError("--head text needs --encoder hf:NAME (the text encoder of the labels stage)")
    hgroup = store.open_existing(heads_path(cache, dataset, model_tag, head, enc),
                                 f"{head} head of {dataset} (run `pipeline heads --head {head}` first)")
    require_fresh(cache, hgroup, f"{head} head of {dataset}")
    return torch.from_numpy(hgroup["head"][:]), hgroup.attrs["fingerprint"]




# Keys of run.json compared (besides the fingerprinted settings) to say what makes two runs differ, and what the
# input fingerprints are.




def _require_heads_model(cache: Path, dataset: str, model_tag: str, head: str, encoder: str | None,
                         identity: dict) -> None:
    """Refuse to train an encoder against a head made with another model (its files were replaced in place
    since the labels or features were made): the head's geometry is that other model's."""
    if head in ("learnable", "coop", "random", "orthogonal", "text"):
        return
    hgroup = store.open_existing(heads_path(cache, dataset, model_tag, head, None), f"{head} head of {dataset}")
    changed = head_model_changes(cache, hgroup, identity)
    if changed:
        source = "label embeddings (`pipeline labels`)" if head == "clip-text" else "features (`pipeline features`)"
        raise PipelineError(f"the {head} head of {dataset} was made with another model than the one this run trains "
                            f"(changed: {', '.join(changed)}): re-run its {source} and `pipeline heads --head {head}` "
                            "with --replace-mismatched, or train the model they were made with")












def run(cache: Path, dataset: str, model_tag: str, head: str, temporal: str, cfg: TrainConfig, *,
        encoder: str | None = None, run_name: str | None = None, frames: int, shots: int | None = None,
        layers: int, replace_mismatched: bool, quiet: bool, device: str | None = None,
        objective: Objective, spec: ModelSpec | None = None, ttrans_init: str,
        coop_ctx: int, coop_lr: float | None = None) -> dict:
    """Frozen backbone: the temporal module (and a projection) on cached frame features, held in memory: no
    loader processes (they would only copy the arrays)."""
    cfg = dataclasses.replace(cfg, workers=0)
    if temporal == "tokent1d":
        raise PipelineError("TokenT1D works inside the visual encoder: it needs full fine-tuning, "
                            "not --frozen-backbone")
    inputs = [features_path(cache, dataset, model_tag, s) for s in ("train", "val")
              if s in splits_of(cache, "features", dataset, model_tag)]
    # Shared locks on the feature stores before their fingerprints are read, for the whole run (see run_full)
    with store.reader_lock(*inputs):
        dev = distributed.setup(device)
        train_group = open_features(cache, dataset, model_tag, "train")
        has_val = "val" in splits_of(cache, "features", dataset, model_tag)
        val_group = open_features(cache, dataset, model_tag, "val") if has_val else None
        names = list(train_group.attrs["class_names"])
        c, width = len(names), int(train_group.attrs["embed_dim"])
        if frames > int(train_group.attrs["num_frames"]):
            raise PipelineError(f"--frames {frames} > the {train_group.attrs['num_frames']} frames cached per video")
        weights, head_fp = head_weights(cache, dataset, model_tag, head, encoder, c, width, cfg.seed)
        run_name = run_name or derived_run_name(dataset, model_tag, head, temporal, frozen=True, encoder=encoder,
                                                frames=frames, shots=shots, objective=objective, seed=cfg.seed)
        record = {"stage": "finetune", "backbone": "frozen", "train": train_group.attrs["fingerprint"],
                  "val": val_group.attrs["fingerprint"] if val_group is not None else None, "head": head,
                  "head_fingerprint": head_fp, "temporal": temporal, "frames": frames, "shots": shots, "layers": layers,
                  "ttrans_init": ttrans_init if temporal == "ttrans" else None,
                  **_coop_record(head, coop_ctx, coop_lr, cfg),
                  "config": _fingerprinted(cfg), "objective": objective.record()}
        record["snapshot"], snapshots = choose_snapshots(run_path(cache, run_name), record,
                                                          {"train": train_group, "val": val_group})
        fp = store.fingerprint(record)
        x_train, y_train = load_split(train_group, record["snapshot"]["train"])
        epoch_length = None
        if shots:
            rows = sample_per_class(y_train, c, shots, cfg.seed, class_names=names)
            epoch_length = len(y_train)  # the K-shot subset repeated: as many iterations as the full set
            x_train, y_train = x_train[rows], y_train[rows]
        torch.manual_seed(cfg.seed)
        model = FrameFeatureClassifier(build_temporal(temporal, width, layers=layers, max_frames=frames,
                                                      ttrans_init=ttrans_init),
                                       CosineHead(weights, learnable=head == "learnable"), width,
                                       project=temporal == "tap")
        temporal_lr = cfg.temporal_lr or cfg.lr

        def lr_of(name: str) -> float:
            if name == "head.ctx":
                return coop_lr or cfg.lr
            return temporal_lr if name.startswith("temporal.") else cfg.lr

        online = objective.text == "online" and objective.kind == "contrastive"
        if head == "coop" and spec is None:
            raise PipelineError("--head coop trains prompts in CLIP's text tower: these features need their model "
                                "(imported features have none)")
        clip = load_clip(spec) if (online or head == "coop") and spec else None
        if head == "coop":
            model.head = CoOpHead(clip.model, clip.tokenizer, names, coop_ctx, float(clip.model.logit_scale.detach()))
        model, objective_fn, lr_of = with_objective(model, objective, head, clip, names, lr_of)
        val_set = (CachedFeatureSet(*load_split(val_group, record["snapshot"]["val"]), frames, cfg.seed)
                   if val_group is not None else None)
        info = {**record, "snapshots": snapshots, "run": run_name, "dataset": dataset, "model_tag": model_tag,
                "class_names": names,
                "encoder": encoder, "shots_per_class": _shots_used(y_train, c) if shots else None,
                "model_spec": asdict(spec.absolute()) if spec else None}
        result = train_run(run_path(cache, run_name), fp, info, model, CachedFeatureSet(x_train, y_train, frames,
                            cfg.seed), val_set, cfg, lr_of, epoch_length, dev, replace_mismatched, quiet, objective_fn,
                            settings=record)
        if head == "coop":
            _write_coop_head(cache, dataset, model_tag, model, names, fp)
        return result


def _shots_used(labels: np.ndarray, n_classes: int) -> dict:
    """The videos per class a K-shot run really has (fewer than K where a class is short)."""
    counts = np.bincount(labels, minlength=n_classes)
    return {"min": int(counts.min()), "max": int(counts.max())}


def batched_data_path(data_device: str, device: torch.device) -> bool:
    """--data-device: True where clips are decoded and augmented a batch at a time on the training GPU."""
    if data_device not in ("auto", "cpu", "cuda"):
        raise PipelineError(f"--data-device must be auto, cpu or cuda, not {data_device!r}")
    if data_device == "cuda" and device.type != "cuda":
        raise PipelineError(f"--data-device cuda decodes on the training GPU, but this run is on {device.type}: "
                            "use --device cuda, or --data-device cpu")
    return device.type == "cuda" and data_device != "cpu"


def _fingerprinted(cfg: TrainConfig) -> dict:
    """The config keys that change results (not the loader's worker count or the logging interval; compile only
    when on, so that runs made before the option keep their fingerprints)."""
    return {k: v for k, v in cfg.as_dict().items()
            if k not in ("workers", "log_every") and not (k == "compile" and not v)}


def open_frames(cache: Path, dataset: str, split: str):
    path = frames_path(cache, dataset, split)
    if not (path / "zarr.json").exists():
        raise PipelineError(f"no frames of {dataset}/{split}: run `pipeline frames` (or `extract`) first")
    group = store.open_existing(path, f"frames {dataset}/{split}")
    if store.pending_blocks(group):
        raise PipelineError(f"frames {dataset}/{split} are unfinished: re-run `pipeline frames` first")
    return group, path


def normalization(clip, test_scale: int) -> Normalization:  # noqa: ANN001 - a loaded open_clip model
    """The model's input and the evaluation's short side (``test_scale`` per 224 px), or a one-line error."""
    try:
        return Normalization(clip.image_size, clip.mean, clip.std, clip.interpolation, test_scale)
    except ValueError as e:
        raise PipelineError(f"--test-scale: {e}") from None




def run_full(cache: Path, dataset: str, spec: ModelSpec, head: str, temporal: str, cfg: TrainConfig, *,
             augment: AugmentConfig, encoder: str | None = None, run_name: str | None = None,
             frames: int, shots: int | None = None, layers: int, t1d_init: str,
             ttrans_init: str, init_from: str | None = None, coop_ctx: int,
             coop_lr: float | None = None, hard_templates: str | None = None, hard_templates_eval: str,
             grad_checkpointing: bool, replace_mismatched: bool, quiet: bool,
             device: str | None = None, objective: Objective, data_device: str,
             test_scale: int) -> dict:
    """Full fine-tuning: the CLIP visual encoder and the temporal module on clips of the frame store; the
    validation after each epoch scales and crops as test.py (``test_scale`` per 224 px of input)."""
    inputs = [frames_path(cache, dataset, s) for s in ("train", "val") if s in splits_of(cache, "frames", dataset)]
    # Shared locks on the frame stores, taken before their fingerprints are read and held for the whole run: no
    # store can be rebuilt between what run.json records and what the run trains on.
    with store.reader_lock(*inputs):
        dev = distributed.setup(device)
        batched = batched_data_path(data_device, dev)
        train_group, train_path = open_frames(cache, dataset, "train")
        has_val = "val" in splits_of(cache, "frames", dataset)
        val_group, val_path = open_frames(cache, dataset, "val") if has_val else (None, None)
        names = list(train_group.attrs["class_names"])
        t_cache = int(train_group.attrs["spec"]["num_frames"])
        if frames > t_cache:
            raise PipelineError(f"--frames {frames} > the {t_cache} frames stored per video")
        if distributed.is_main() and not quiet:
            say(f"loading {spec.name} ...", quiet)
        clip = load_clip(spec)
        weights, head_fp = head_weights(cache, dataset, spec.tag, head, encoder, len(names), clip.embed_dim, cfg.seed)
        _require_heads_model(cache, dataset, spec.tag, head, encoder, clip.identity)
        torch.manual_seed(cfg.seed)  # new modules (T-Trans) start from the run's seed
        model = classifier_for(clip, weights, head == "learnable", temporal, frames, layers, t1d_init,
                               grad_checkpointing, ttrans_init)
        if head == "coop":
            model.head = CoOpHead(clip.model, clip.tokenizer, names, coop_ctx, float(clip.model.logit_scale.detach()))
        templates = None
        if hard_templates:
            if head != "clip-text":
                raise PipelineError("--hard-templates draws CLIP-text rows per step: use it with --head clip-text")
            templates = resolve_templates(hard_templates)
            if hard_templates_eval not in ("single", "ensemble"):
                raise PipelineError(f"--hard-templates-eval must be single or ensemble, not {hard_templates_eval!r}")
            bank = torch.stack([torch.from_numpy(encode_with_clip(clip, names, [t], "cpu")) for t in templates])
            # the paper evaluates with the single template: the cached clip-text head's rows (labels --template)
            model.head = TemplateDrawHead(bank, float(clip.model.logit_scale.detach()),
                                          eval_rows=weights if hard_templates_eval == "single" else None)
        # after the head is in place: the source run's logit scale goes to whichever head this run has
        start = init_from_run(model, cache, init_from) if init_from else None
        norm = normalization(clip, test_scale)
        run_name = run_name or derived_run_name(dataset, spec.tag, head, temporal, frozen=False, encoder=encoder,
                                                hard_templates=hard_templates, frames=frames, shots=shots,
                                                objective=objective, init_from=init_from, seed=cfg.seed)
        record = {"stage": "finetune", "backbone": "full", "model": clip.identity,
                  "train": train_group.attrs["fingerprint"],
                  "val": val_group.attrs["fingerprint"] if val_group is not None else None, "head": head,
                  "head_fingerprint": head_fp, "temporal": temporal, "frames": frames, "shots": shots, "layers": layers,
                  "t1d_init": t1d_init if temporal == "tokent1d" else None, "augment": asdict(augment),
                  "ttrans_init": ttrans_init if temporal == "ttrans" else None, "init_from": start,
                  **_coop_record(head, coop_ctx, coop_lr, cfg),
                  **({"hard_templates": templates, "hard_templates_eval": hard_templates_eval} if templates else {}),
                  "config": _fingerprinted(cfg), "objective": objective.record(),
                  # the validation's view (its metrics are part of the run's history)
                  "test_scale": test_scale,
                  # nvJPEG and batched kernels round a few pixels differently: a run never mixes the two data paths
                  **({"data_path": "batched-gpu"} if batched else {})}
        record["snapshot"], snapshots = choose_snapshots(run_path(cache, run_name), record,
                                                          {"train": train_group, "val": val_group})
        fp = store.fingerprint(record)
        rows, labels = usable_rows(train_group, snapshot=record["snapshot"]["train"])
        epoch_length = None
        if shots:
            picked = sample_per_class(labels, len(names), shots, cfg.seed, class_names=names)
            epoch_length = len(labels)  # the K-shot subset repeated: as many iterations as the full set
            rows, labels = rows[picked], labels[picked]
        train_set = FrameClipSet(str(train_path), rows, labels, frames, norm, cfg.seed, augment, batched=batched)
        val_set = None
        if val_group is not None:
            val_rows, val_labels = usable_rows(val_group, multilabel="targets" in val_group,
                                               snapshot=record["snapshot"]["val"])
            val_set = FrameClipSet(str(val_path), val_rows, val_labels, frames, norm, cfg.seed, batched=batched)
        temporal_lr = cfg.temporal_lr or cfg.lr
        backbone_lr = cfg.lr * cfg.backbone_lr_ratio

        def lr_of(name: str) -> float:
            if name == "head.ctx":
                return coop_lr or cfg.lr
            if name.startswith("temporal.") or ".t1d." in name:
                return temporal_lr
            # the official code trains CLIP's logit scale with the encoder (its `clip_params` group)
            return backbone_lr if name.startswith("visual.") or name.endswith("logit_scale") else cfg.lr

        model, objective_fn, lr_of = with_objective(model, objective, head, clip, names, lr_of)
        info = {**record, "snapshots": snapshots, "run": run_name, "dataset": dataset, "model_tag": spec.tag,
                "model_spec": asdict(spec.absolute()), "class_names": names, "encoder": encoder,
                "frame_spec": dict(train_group.attrs["spec"]),
                "shots_per_class": _shots_used(labels, len(names)) if shots else None}
        result = train_run(run_path(cache, run_name), fp, info, model, train_set, val_set, cfg, lr_of,
                            epoch_length, dev, replace_mismatched, quiet, objective_fn, settings=record)
        if head == "coop":
            _write_coop_head(cache, dataset, spec.tag, model, names, fp)
        return result


def _coop_record(head: str, coop_ctx: int, coop_lr: float | None, cfg: TrainConfig) -> dict:
    return {"coop_ctx": coop_ctx, "coop_lr": coop_lr or cfg.lr} if head == "coop" else {}


def _write_coop_head(cache: Path, dataset: str, model_tag: str, model, names: list[str], run_fp: str) -> None:
    """The trained prompts' rows as the cached `coop` head: evaluated and reused frozen like any other."""
    from .heads import write_head

    if not distributed.is_main():
        return
    model.eval()
    rows = model.head.weight.detach().cpu().numpy()
    write_head(cache, dataset, model_tag, "coop", rows, names, {"stage": "heads", "kind": "coop", "run": run_fp},
               replace_mismatched=True)




