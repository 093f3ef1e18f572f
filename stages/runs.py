"""Fine-tuning runs: their folders (run.json, checkpoint, history, metrics, DVCLive), names, the snapshots of the
stores they train on, the reporting callback, and loading a run back (evaluate, predict, transfer).

Run directory cache/runs/<name>/: run.json (settings, inputs' fingerprints and snapshots), checkpoint.pt,
history.jsonl, metrics.json and dvclive/ (per-step loss and lr, per-epoch accuracy).
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from pathlib import Path

import torch

from pipeline.core.cachefs import as_path, is_remote, remove_tree
from pipeline.core.errors import PipelineError
from pipeline.core.files import append_line, read_json, write_atomic
from pipeline.core.progress import Progress
from pipeline.core.settings import FinetuneSettings
from pipeline.learning import distributed
from pipeline.learning.objectives import Objective, with_objective
from pipeline.learning.training import CHECKPOINT, TrainConfig, load_checkpoint, rank_and_world, train
from pipeline.models.classifier import CosineHead, FrameFeatureClassifier, TemplateDrawHead, classifier_for
from pipeline.models.clip import ModelSpec, load_clip
from pipeline.models.coop import CoOpHead
from pipeline.models.temporal import build_temporal
from pipeline.models.text import encoder_tag
from pipeline.storage import store

from .paths import run_path

_F = FinetuneSettings.defaults()  # a derived run name leaves out the settings at their default


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


def derived_run_name(dataset: str, model_tag: str, head: str, temporal: str, *, frozen: bool,
                     encoder: str | None = None, hard_templates: str | None = None, frames: int,
                     shots: int | None = None, objective: Objective, init_from: str | None = None,
                     seed: int) -> str:
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
    if frames != _F.frames:
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


def train_run(run_dir: Path, fp: str, info: dict, model, train_set, val_set, cfg: TrainConfig, lr_of,
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
        model = classifier_for(clip, rows, info["head"] == "learnable", info["temporal"], info["frames"],
                               info["layers"], info.get("t1d_init") or "identity",
                               ttrans_init=info.get("ttrans_init") or "tap")
    if coop:
        model.head = CoOpHead(clip.model, clip.tokenizer, info["class_names"], info["coop_ctx"])
    if info.get("hard_templates"):
        model.head = TemplateDrawHead(torch.zeros(len(info["hard_templates"]), *rows.shape))
    if contrastive:
        model, _, _ = with_objective(model, objective, info["head"], clip, info["class_names"], lambda name: 0.0)
    model.load_state_dict(state)
    model.eval()
    return model, info, clip
