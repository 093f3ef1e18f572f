"""Finetune stage: a video classifier trained against a frozen head from the cache.

Two settings share one run directory layout and the library's one training loop:
- full fine-tuning (the paper): the CLIP visual encoder + temporal module on clips of the frame store;
- ``frozen_backbone``: only the temporal module (and a projection) on cached frame features.

Run directory cache/runs/<name>/: run.json (settings, inputs' fingerprints), checkpoint.pt,
history.jsonl, metrics.json and dvclive/ (per-step loss and lr, per-epoch accuracy).
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.core.cachefs import as_path, is_remote, remove_tree
from pipeline.core.errors import PipelineError
from pipeline.core.files import append_line, read_json, write_atomic
from pipeline.core.progress import Progress, say
from pipeline.learning import distributed
from pipeline.learning.clips import FrameClipSet, usable_rows
from pipeline.learning.training import CHECKPOINT, TrainConfig, load_checkpoint, rank_and_world, train
from pipeline.learning.transforms import AugmentConfig, Normalization
from pipeline.media.sampling import sample_rng, segment_indices, view_indices
from pipeline.models.classifier import (
    ContrastiveVideoText,
    CosineHead,
    FrameFeatureClassifier,
    TemplateDrawHead,
    TextTowerHead,
    build_video_classifier,
)
from pipeline.models.clip import ModelSpec, load_clip
from pipeline.models.coop import CoOpHead
from pipeline.models.heads import sample_per_class
from pipeline.models.losses import VideoTextContrastiveLoss
from pipeline.models.temporal import build_temporal
from pipeline.models.text import encode_with_clip, encoder_tag, resolve_templates
from pipeline.storage import store
from pipeline.storage.featurestore import read_rows

from .heads import open_features
from .inputs import head_model_changes, require_fresh
from .paths import features_path, frames_path, heads_path, run_path, splits_of

HEAD_SEED_STREAM = 0x1EAD


@dataclass(frozen=True)
class Objective:
    """What the run optimises: cross-entropy against the frozen head (the paper), or the contrastive
    video-text baseline (Table 9) with or without batch gather, its text side cached or trained."""

    kind: str = "ce"  # ce | contrastive
    batch_gather: bool = True
    text: str = "offline"  # offline: the cached label embeddings; online: the CLIP text tower, trained
    text_lr: float = 5e-6
    text_weight_decay: float = 0.2
    template: str = "a video of a person {}."  # the online text tower's prompt

    def record(self) -> dict | None:
        return None if self.kind == "ce" else asdict(self)


def with_objective(video_model, objective: Objective, head: str, clip, names: list[str], lr_of):
    """(model, objective function or None, lr rule) for ``objective`` around a video classifier."""
    if objective.kind == "ce":
        return video_model, None, lr_of
    if objective.kind != "contrastive":
        raise PipelineError(f"unknown objective {objective.kind!r} (ce, contrastive)")
    if head not in ("clip-text", "text"):
        raise PipelineError("the contrastive objective matches videos with class-name text: use --head clip-text "
                            "(or text) for its text side")
    online = None
    if objective.text == "online":
        if head != "clip-text" or clip is None:
            raise PipelineError("--text online trains the CLIP text tower: use --head clip-text")
        online = TextTowerHead(clip.model, clip.tokenizer, objective.template, names,
                               float(video_model.head.logit_scale.detach()))
    model = ContrastiveVideoText(video_model, online)
    rank, world = rank_and_world()
    loss = VideoTextContrastiveLoss(gather=objective.batch_gather, rank=rank, world_size=world)

    def contrastive(net, x, y):
        video, text, scale = net(x, y)
        return loss(video, text, y, scale)

    def rule(name: str):
        name = name.removeprefix("video.")
        if name.startswith("head.text."):
            return objective.text_lr, objective.text_weight_decay
        return lr_of(name)

    return model, contrastive, rule


class CachedFeatureSet(torch.utils.data.Dataset):
    """Clips of T frame features drawn TSN-style from the T_cache cached ones; ``views`` temporal views in eval."""

    def __init__(self, features: np.ndarray, labels: np.ndarray, frames: int, seed: int, views: int = 1) -> None:
        self.features, self.frames, self.seed, self.views = features, frames, seed, views
        self.labels = np.asarray(labels).astype(np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def item(self, index: int, epoch: int, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.features.shape[1]
        if train:
            x = self.features[index, segment_indices(n, self.frames, sample_rng(self.seed, epoch, index))]
        else:
            x = np.stack([self.features[index, view_indices(n, self.frames, c, self.views)]
                          for c in range(self.views)])
        return torch.from_numpy(x.astype(np.float32)), torch.as_tensor(self.labels[index])


def load_split(group, snapshot: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    rows, labels = usable_rows(group, snapshot=snapshot)
    return read_rows(group, rows), labels


def choose_snapshots(run_dir: Path, record: dict, groups: dict) -> tuple[dict, dict]:
    """(the snapshot of each input store the run trains on, as its fingerprinted record holds it, and as run.json
    describes it). A run resumed with the settings it started with keeps the snapshots it started with, even
    when its stores have grown since (its data, hence its steps, are those of the uninterrupted run); any other
    run (a new one, or one started again) takes the stores' current snapshots."""
    current = {split: store.version_of(g) for split, g in groups.items() if g is not None}
    recorded: dict = {}
    if (run_dir / "metrics.json").exists():  # a finished run: a new one starts from the current snapshots
        groups = {split: g for split, g in groups.items() if g is not None}
        return current, _describe_snapshots(current, groups)
    try:
        info = json.loads((run_dir / "run.json").read_text())
        recorded = {k: int(v["version"]) for k, v in (info.get("snapshots") or {}).items()}
        if set(recorded) == set(current) and recorded != current \
                and store.fingerprint({**record, "snapshot": recorded}) == info.get("fingerprint"):
            for split, version in recorded.items():
                store.resolve_snapshot(groups[split], version)  # still there (not compacted away)
            current = recorded
    except (OSError, ValueError, KeyError, TypeError, AttributeError, PipelineError):
        pass
    return current, _describe_snapshots(current, groups)


def _describe_snapshots(versions: dict, groups: dict) -> dict:
    """What run.json says of each input snapshot: its number and hash, and the store it is of."""
    return {split: {"version": version, "path": store.address_of(groups[split]),
                    "hash": store.snapshot_entry(groups[split], version)["hash"] if version else None}
            for split, version in versions.items()}


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


def derived_run_name(dataset: str, model_tag: str, head: str, temporal: str, *, frozen: bool = False,
                     encoder: str | None = None, hard_templates: str | None = None, frames: int = 8,
                     shots: int | None = None, objective: Objective = Objective(), init_from: str | None = None,
                     seed: int = 0) -> str:
    """The run's name when no --run-name is given: what tells apart the runs users commonly make (dataset,
    model, head and its text encoder, temporal module, frames, frozen or full backbone, objective, shots,
    transfer source, seed). Settings at their default are left out (the paper's recipe on K400 is
    ``k400-ViT-B-16-openai-clip-text-tap``); any other setting that changes a run is in its fingerprint,
    and reusing a name for it is refused naming the change. One path component."""
    parts = [dataset, model_tag, head]
    if head == "text" and encoder:
        parts.append(encoder_tag(encoder, model_tag).removeprefix("hf-"))
    if hard_templates:
        parts.append("hard-" + (Path(hard_templates.removeprefix("text4vis:")).stem or "templates"))
    parts.append(temporal)
    if frames != 8:
        parts.append(f"{frames}f")
    if frozen:
        parts.append("frozen")
    if objective.kind != "ce":
        parts.append(objective.kind + ("-online" if objective.text == "online" else "")
                     + ("" if objective.batch_gather else "-nogather"))
    if shots:
        parts.append(f"{shots}shot")
    if init_from:
        parts.append(f"from-{init_from}")
    if seed:
        parts.append(f"s{seed}")
    return re.sub(r"[^A-Za-z0-9._+=-]+", "_", "-".join(str(p) for p in parts))


# Keys of run.json compared (besides the fingerprinted settings) to say what makes two runs differ, and what the
# input fingerprints are.
NAMED_IN_CHANGES = ("dataset", "model_tag", "encoder")
DESCRIBED = {"train": "train (its training store)", "val": "val (its validation store)",
             "head_fingerprint": "head_fingerprint (the head's rows)",
             "snapshot.train": "snapshot.train (its training store has another snapshot: videos were added or "
                               "dropped since)",
             "snapshot.val": "snapshot.val (its validation store has another snapshot)"}


def run_changes(config_file: Path, settings: dict, info: dict) -> list[str]:
    """What differs between the run recorded in ``config_file`` (run.json) and a run of ``settings`` (the
    fingerprinted record) and ``info``: dotted keys, as a frame store's mismatch names them."""
    try:
        old = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(old, dict):
        return []
    keys = [*settings, *(k for k in NAMED_IN_CHANGES if k not in settings)]
    # as run.json holds it: tuples as lists, other objects as text
    new = json.loads(json.dumps({k: settings[k] if k in settings else info.get(k) for k in keys}, default=str))
    return [DESCRIBED.get(k, k) for k in store._changed_keys({k: old.get(k) for k in keys}, new)]


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


def _prepare_run_dir(run_dir: Path, fp: str, info: dict, replace_mismatched: bool,
                     settings: dict | None = None) -> None:
    config_file = run_dir / "run.json"
    recorded = _recorded_fingerprint(config_file)
    if recorded is None and (run_dir / CHECKPOINT).exists():
        try:  # run.json lost (or deleted by `verify --repair`): the checkpoint says whose run this is
            recorded = load_checkpoint(run_dir / CHECKPOINT)["fingerprint"]
        except PipelineError:
            recorded = None
    holds_work = run_dir.is_dir() and any(run_dir.iterdir())
    if holds_work and recorded != fp:
        changed = run_changes(config_file, settings, info) if recorded and settings is not None else []
        why = ("exists with other parameters or inputs" + (f" (changed: {', '.join(changed)})" if changed else "")
               if recorded else "holds files but no readable run.json (another run's, or damaged)")
        if not replace_mismatched:
            raise PipelineError(f"run {run_dir.name!r} {why}; use another --run-name, or --replace-mismatched "
                                "to delete it and start again")
        remove_tree(run_dir)
    elif replace_mismatched and (run_dir / CHECKPOINT).exists():
        try:
            load_checkpoint(run_dir / CHECKPOINT)
        except PipelineError:  # a damaged checkpoint of these settings: start the run again
            remove_tree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(config_file, json.dumps({"fingerprint": fp, **info}, indent=2, default=str))


def _recorded_fingerprint(config_file: Path) -> str | None:
    try:
        return str(json.loads(config_file.read_text())["fingerprint"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class Reporter:
    """The training loop's callback: history.jsonl, DVCLive metrics and a progress bar with clips/s.

    On resume, records past the checkpoint's step (replayed now) are dropped first, so the logs
    read like those of an uninterrupted run.
    """

    def __init__(self, run_dir: Path, steps: int, desc: str, quiet: bool, live: bool = True) -> None:
        self.history = run_dir / "history.jsonl"
        self.bar = Progress(steps, desc, quiet, unit="step")
        self.live = None
        self.live_dir = run_dir / "dvclive"
        self.use_live = live and not is_remote(run_dir)  # DVCLive writes local folders only
        self.clips, self.seconds = 0, 0.0

    def _truncate(self, step: int) -> None:
        if self.history.exists():
            kept = []
            for line in self.history.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line torn by a kill: the replayed steps write it again
                if record.get("step", 0) <= step:
                    kept.append(line)
            write_atomic(self.history, "".join(line + "\n" for line in kept))
        for tsv in self.live_dir.rglob("*.tsv") if self.live_dir.exists() else []:
            lines = tsv.read_text().splitlines()
            header = lines[:1]
            rows = [r for r in lines[1:] if _tsv_step(header, r) <= step]
            tsv.write_text("".join(line + "\n" for line in header + rows))

    def __call__(self, kind: str, values: dict) -> None:
        if kind == "start":
            self._truncate(values["step"])
            self.bar.update(values["step"])
            if self.use_live:
                from dvclive import Live

                try:
                    self.live = Live(str(self.live_dir), resume=values["step"] > 0, save_dvc_exp=False,
                                     dvcyaml=None)
                except Exception as e:  # noqa: BLE001 - tracking must never stop a training run
                    print(f"warning: DVCLive is off for this run ({type(e).__name__}: {e}); "
                          "history.jsonl still has every step", file=sys.stderr)
            return
        append_line(self.history, json.dumps({"kind": kind, **values}))
        if kind == "step":
            self.clips += values["clips"]
            self.seconds += values["seconds"]
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{values['loss']:.3f}", clips_s=f"{self.clips / self.seconds:.1f}")
            if self.live is not None:
                self.live.step = values["step"]
                self.live.log_metric("train/loss", values["loss"])
                self.live.log_metric("train/lr", values["lr"])
                self.live.log_metric("train/clips_per_s", values["clips"] / max(values["seconds"], 1e-9))
        elif kind == "epoch" and self.live is not None:
            self.live.step = values["step"]
            for key, value in values.items():
                if key.startswith("val_"):
                    self.live.log_metric(f"val/{key[4:]}", value)

    def close(self, final: dict) -> None:
        self.bar.close()
        if self.live is not None:
            for key, value in final.items():
                if isinstance(value, (int, float)) and key != "steps":
                    self.live.summary[key] = value
            try:
                self.live.make_summary()
                self.live.end()
            except Exception as e:  # noqa: BLE001 - the run's own files are already written
                print(f"warning: DVCLive could not finish ({type(e).__name__}: {e})", file=sys.stderr)


def _tsv_step(header: list[str], row: str) -> float:
    cols = header[0].split("\t") if header else []
    fields = row.split("\t")
    return float(fields[cols.index("step")]) if "step" in cols else 0.0


def _train_run(run_dir: Path, fp: str, info: dict, model, train_set, val_set, cfg: TrainConfig, lr_of,
               epoch_length: int | None, device: torch.device, replace_mismatched: bool, quiet: bool,
               objective=None, settings: dict | None = None) -> dict:
    main = distributed.is_main()
    lock = store.writer_lock(run_dir) if main else None
    if lock is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock.__enter__()
    try:
        if main:
            _prepare_run_dir(run_dir, fp, {**info, "world_size": rank_and_world()[1]}, replace_mismatched, settings)
        distributed.barrier()
        steps = cfg.epochs * math.ceil((epoch_length or len(train_set)) / cfg.batch_size)
        reporter = Reporter(run_dir, steps, f"finetune {run_dir.name}", quiet or not main)
        started = time.perf_counter()
        kwargs = {"objective": objective} if objective is not None else {}
        result = train(model, train_set, val_set, cfg, run_dir, fp, lr_of=lr_of, callback=reporter,
                       epoch_length=epoch_length, device=device, **kwargs)
        final = result["history"][-1] if result["history"] else {}
        metrics = {"run": info["run"], "steps": result["steps"], "best_val_top1": result["best_top1"],
                   **{k: v for k, v in final.items() if k.startswith("val_")}}
        if main:
            metrics["train_seconds_this_call"] = round(time.perf_counter() - started, 2)
            reporter.close(metrics)
            write_atomic(run_dir / "metrics.json", json.dumps(metrics, indent=2))
        return metrics | {"path": str(run_dir)}
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)


def run(cache: Path, dataset: str, model_tag: str, head: str, temporal: str, cfg: TrainConfig, *,
        encoder: str | None = None, run_name: str | None = None, frames: int = 8, shots: int | None = None,
        layers: int = 6, replace_mismatched: bool = False, quiet: bool = False, device: str | None = None,
        objective: Objective = Objective(), spec: ModelSpec | None = None, ttrans_init: str = "official",
        coop_ctx: int = 4, coop_lr: float | None = None) -> dict:
    """Frozen backbone: the temporal module (and a projection) on cached frame features."""
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
        result = _train_run(run_path(cache, run_name), fp, info, model, CachedFeatureSet(x_train, y_train, frames,
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


def build_model(clip, head_rows: torch.Tensor, learnable: bool, temporal: str, frames: int, layers: int,
                t1d_init: str, grad_checkpointing: bool = False, ttrans_init: str = "official"):
    """The loaded open_clip model's visual tower wrapped as a video classifier against ``head_rows``."""
    head = CosineHead(head_rows, learnable=learnable, logit_scale=float(clip.model.logit_scale.detach()))
    return build_video_classifier(clip.model.visual, clip.embed_dim, head, temporal, frames, layers, t1d_init,
                                  grad_checkpointing, ttrans_init=ttrans_init)


def run_full(cache: Path, dataset: str, spec: ModelSpec, head: str, temporal: str, cfg: TrainConfig, *,
             augment: AugmentConfig = AugmentConfig(), encoder: str | None = None, run_name: str | None = None,
             frames: int = 8, shots: int | None = None, layers: int = 6, t1d_init: str = "shift",
             ttrans_init: str = "official", init_from: str | None = None, coop_ctx: int = 4,
             coop_lr: float | None = None, hard_templates: str | None = None, hard_templates_eval: str = "single",
             grad_checkpointing: bool = False, replace_mismatched: bool = False, quiet: bool = False,
             device: str | None = None, objective: Objective = Objective(), data_device: str = "auto",
             test_scale: int = 256) -> dict:
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
        model = build_model(clip, weights, head == "learnable", temporal, frames, layers, t1d_init, grad_checkpointing,
                            ttrans_init)
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
        run_name = run_name or derived_run_name(dataset, spec.tag, head, temporal, encoder=encoder,
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
        result = _train_run(run_path(cache, run_name), fp, info, model, train_set, val_set, cfg, lr_of,
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


def init_from_run(model: torch.nn.Module, cache: Path, source: str) -> dict:
    """Copy the visual encoder (TokenT1D included), the temporal module and the logit scale of fine-tuned run
    ``source`` into ``model`` (transfer, Tables 2 and 5); the head's rows stay this run's. The official code
    loads the source's whole state dict (train.py:245-250), CLIP's trained logit scale with it. Returns what
    the new run records of its start. Refused, naming a difference, when the architectures differ."""
    run_dir = run_path(cache, source)
    if not (run_dir / "run.json").is_file() or not (run_dir / CHECKPOINT).is_file():
        raise PipelineError(f"--init-from {source!r}: no fine-tuned run of that name with a checkpoint under "
                            f"{run_dir.parent}")
    info = read_json(run_dir / "run.json", "run settings")
    state = load_checkpoint(run_dir / CHECKPOINT)["model"]
    if any(k.startswith("video.") for k in state):  # a contrastive run: its video model
        state = {k.removeprefix("video."): v for k, v in state.items() if k.startswith("video.")}
    parts = ("visual.", "temporal.")
    taken = {k: v for k, v in state.items() if k.startswith(parts)}
    own = {k: v for k, v in model.state_dict().items() if k.startswith(parts)}
    differ = sorted(set(taken) ^ set(own)) or [k for k in own if own[k].shape != taken[k].shape]
    if differ:
        raise PipelineError(f"--init-from {source}: its encoder or temporal module differs from this run's "
                            f"({info.get('backbone')} {info.get('temporal')} vs this run; first difference: "
                            f"{differ[0]}); use the same model, --temporal and --layers")
    scale = "head.logit_scale"
    if scale in state and scale in model.state_dict():
        taken[scale] = state[scale]
    model.load_state_dict(taken, strict=False)
    return {"run": source, "fingerprint": info.get("fingerprint"), "logit_scale": scale in taken}


def load_run(cache: Path, run_name: str):
    """(model with the run's latest weights, run.json, loaded clip or None for frozen-backbone runs)."""
    run_dir = run_path(cache, run_name)
    if not (run_dir / "run.json").is_file():
        known = sorted(p.name for p in (as_path(cache) / "runs").glob("*") if (p / "run.json").is_file())
        raise PipelineError(f"no run {run_name!r} in {as_path(cache) / 'runs'}" + (f"; runs: {', '.join(known)}"
                                                                                    if known else ""))
    if not (run_dir / "checkpoint.pt").is_file():
        raise PipelineError(f"run {run_name!r} has no checkpoint yet (it has not finished an epoch)")
    info = read_json(run_dir / "run.json", "run settings")
    state = load_checkpoint(run_dir / CHECKPOINT)["model"]
    objective = Objective(**info["objective"]) if info.get("objective") else Objective()
    contrastive = objective.kind == "contrastive"
    video_state = {k.removeprefix("video."): v for k, v in state.items()} if contrastive else state
    online = contrastive and objective.text == "online"
    coop = info["head"] == "coop"
    clip = load_clip(ModelSpec(**info["model_spec"])) if (info["backbone"] == "full" or online or coop) else None
    if online or coop:  # the head is the text tower: placeholder rows of the video width until loaded
        rows = torch.zeros(len(info["class_names"]), clip.embed_dim)
    else:
        rows = video_state["head.weight"]
    if info["backbone"] == "frozen":
        width = int(video_state["projection.weight"].shape[1]) if "projection.weight" in video_state else rows.shape[1]
        model = FrameFeatureClassifier(build_temporal(info["temporal"], width, layers=info["layers"],
                                                      max_frames=info["frames"],
                                                      ttrans_init=info.get("ttrans_init") or "tap"),
                                       CosineHead(rows, learnable=info["head"] == "learnable"), width,
                                       project="projection.weight" in video_state)
    else:
        model = build_model(clip, rows, info["head"] == "learnable", info["temporal"], info["frames"], info["layers"],
                            info.get("t1d_init") or "identity", ttrans_init=info.get("ttrans_init") or "tap")
    if coop:
        model.head = CoOpHead(clip.model, clip.tokenizer, info["class_names"], info["coop_ctx"])
    if info.get("hard_templates"):
        model.head = TemplateDrawHead(torch.zeros(len(info["hard_templates"]), *rows.shape))
    if contrastive:
        model, _, _ = with_objective(model, objective, info["head"], clip, info["class_names"], lambda name: 0.0)
    model.load_state_dict(state)
    model.eval()
    return model, info, clip
