"""Inputs checked at every use: an output made from inputs that have since been rebuilt is stale.

Each output records the fingerprints of the outputs it was made from (a feature store its frame
store's; an LDA or prototype head its feature store's; a text head its label embeddings'). A
consumer compares them with the inputs as they are now and refuses a stale combination with a
one-line error naming the stage to re-run; ``pipeline status`` marks such outputs.
"""

from __future__ import annotations

from pathlib import Path

import zarr

from pipeline.core.cachefs import as_path
from pipeline.core.errors import PipelineError
from pipeline.storage import store

from .paths import features_path, frames_path, labels_path, safe_name


def _fingerprint_at(path: Path) -> str | None:
    try:
        return zarr.open_group(str(path), mode="r").attrs.get("fingerprint")
    except (FileNotFoundError, OSError, ValueError, KeyError):
        return None


def feature_store_attrs(cache: Path, dataset: str) -> dict[str, dict]:
    """For each model whose features the cache holds for ``dataset``: the attributes of its first readable split."""
    base = as_path(cache) / "features" / safe_name(dataset, "dataset")
    found: dict[str, dict] = {}
    for tag_dir in sorted(base.iterdir(), key=str) if base.is_dir() else []:
        for split_dir in sorted(tag_dir.iterdir(), key=str) if tag_dir.is_dir() else []:
            if (split_dir / "zarr.json").exists():
                try:
                    found[tag_dir.name] = dict(zarr.open_group(str(split_dir), mode="r").attrs)
                except (OSError, ValueError):
                    continue
                break
    return found


def cached_models(cache: Path, dataset: str) -> dict[str, dict | None]:
    """The models whose features the cache holds for ``dataset``: tag -> recorded spec (None if imported)."""
    return {tag: dict(attrs["model_spec"]) if attrs.get("model_spec") else None
            for tag, attrs in feature_store_attrs(cache, dataset).items()}


def cached_models_anywhere(cache: Path) -> dict[str, dict]:
    """Every model whose features the cache holds, over all its datasets: key -> recorded spec.

    For readers of videos (``predict``), which need a model but no dataset. Imported features are
    left out (no model to encode a video with). A key that names different models in two datasets
    appears once per dataset, as ``key (dataset)``, so that neither is taken for the other.
    """
    base = as_path(cache) / "features"
    by_key: dict[str, dict[str, dict]] = {}  # key -> dataset -> spec
    for ds_dir in sorted(base.iterdir(), key=str) if base.is_dir() else []:
        if not ds_dir.is_dir() or ds_dir.name.startswith("."):
            continue
        for tag, spec in cached_models(cache, ds_dir.name).items():
            if spec:
                by_key.setdefault(tag, {})[ds_dir.name] = spec
    found: dict[str, dict] = {}
    for tag, specs in by_key.items():
        models = {_model_identity(spec) for spec in specs.values()}
        if len(models) == 1:
            found[tag] = next(iter(specs.values()))
        else:
            found.update({f"{tag} ({ds})": spec for ds, spec in specs.items()})
    return found


def _model_identity(spec: dict) -> tuple:
    return tuple(str(spec.get(k)) for k in ("name", "pretrained", "quick_gelu"))


def stale_reason(cache: Path, group: zarr.Group) -> str | None:
    """Why ``group`` no longer matches the inputs it was made from (``None`` when it does)."""
    attrs = group.attrs
    stage, dataset = attrs.get("stage"), attrs.get("dataset")
    if stage == "features" and attrs.get("frames_fingerprint"):
        split = attrs.get("split")
        current = _fingerprint_at(frames_path(cache, dataset, split))
        if current != attrs["frames_fingerprint"]:
            what = "was rebuilt" if current else "is gone"
            return (f"its frame store {dataset}/{split} {what} since: re-run `pipeline features --dataset {dataset}` "
                    "(with --replace-mismatched)")
    if stage == "heads":
        params = dict(attrs.get("params") or {})
        kind, model_tag = attrs.get("kind"), attrs.get("model_tag")
        if params.get("labels") and attrs.get("encoder_tag"):
            current = _fingerprint_at(labels_path(cache, dataset, attrs["encoder_tag"]))
            if current != params["labels"]:
                return (f"the label embeddings {attrs['encoder_tag']} of {dataset} changed since: re-run "
                        f"`pipeline heads --head {kind}` (with --replace-mismatched)")
        if params.get("features"):
            split = params.get("split", "train")
            current = _fingerprint_at(features_path(cache, dataset, model_tag, split))
            if current != params["features"]:
                return (f"the features {dataset}/{split} of {model_tag} changed since: re-run "
                        f"`pipeline heads --head {kind}` (with --replace-mismatched)")
    if stage in ("labels", "heads") and attrs.get("model_tag"):
        reason = _labels_model_mismatch(cache, group)
        if reason:
            return reason
    return None


def older_snapshot(cache: Path, group: zarr.Group) -> str | None:
    """How an output is older than its inputs' current snapshots (videos or classes added or dropped since it
    was made), or None. Not stale: its rows are still there and it can be read as the snapshot it records; the
    note says what makes it again on the current one."""
    attrs = group.attrs
    stage, dataset, split = attrs.get("stage"), attrs.get("dataset"), attrs.get("split")
    if stage == "features" and attrs.get("version"):
        frames = _attrs_at(frames_path(cache, dataset, split))
        now = int(frames.get("version", 0)) if frames else 0
        if now and now != int(attrs["version"]):
            return (f"made from snapshot {attrs['version']} of its frame store {dataset}/{split}, which is at snapshot "
                    f"{now}: `pipeline features -d {dataset}` encodes the videos added since (only those)")
    if stage == "labels":
        current = _class_names(cache, dataset)
        have = list(attrs.get("class_names") or [])
        if current and len(have) < len(current) and current[:len(have)] == have:
            return (f"embeds {len(have)} of the {len(current)} classes {dataset} has now: `pipeline labels` embeds "
                    "the new ones (only those)")
    if stage == "heads":
        behind = store.snapshots_behind(dict(attrs.get("inputs") or {}))
        current = _class_names(cache, dataset)
        if not behind and current and attrs.get("kind") in ("random", "orthogonal") \
                and int(attrs.get("rows", len(current))) < len(current):
            behind = [f"{attrs.get('rows')} of the {len(current)} classes"]
        if behind:
            return (f"made from an older snapshot ({'; '.join(behind)}): `pipeline heads --head {attrs.get('kind')}` "
                    "makes it again from the current one")
    return None


def run_older_snapshot(info: dict) -> str | None:
    """How a run is older than its stores (videos added or dropped since it was trained), or None."""
    behind = store.snapshots_behind(dict(info.get("snapshots") or {}))
    if not behind:
        return None
    return (f"trained on an older snapshot ({'; '.join(behind)}); its numbers are of that data (resuming it keeps it): "
            "a new run (another --run-name, or --replace-mismatched) trains on the current one")


def _attrs_at(path: Path) -> dict:
    try:
        return dict(zarr.open_group(str(path), mode="r").attrs)
    except (FileNotFoundError, OSError, ValueError, KeyError):
        return {}


def _class_names(cache: Path, dataset: str) -> list[str]:
    """The dataset's class names as its frame stores hold them now (the longest list: splits grow apart)."""
    found: list[str] = []
    base = as_path(cache) / "frames" / safe_name(dataset, "dataset")
    for split_dir in sorted(base.iterdir(), key=str) if base.is_dir() else []:
        if split_dir.name.startswith("."):
            continue
        names = list(_attrs_at(split_dir).get("class_names") or [])
        found = names if len(names) > len(found) else found
    return found


def _labels_model_mismatch(cache: Path, group: zarr.Group) -> str | None:
    """A CLIP-text head or embedding whose text tower is not the image tower of the cached features."""
    attrs = group.attrs
    encoder = attrs.get("encoder")
    if attrs.get("stage") == "heads":
        if attrs.get("kind") != "clip-text" or not attrs.get("encoder_tag"):
            return None
        try:
            encoder = zarr.open_group(str(labels_path(cache, attrs["dataset"], attrs["encoder_tag"])),
                                      mode="r").attrs.get("encoder")
        except (FileNotFoundError, OSError, ValueError):
            return None
    if not isinstance(encoder, dict) or encoder.get("encoder") != "clip":
        return None
    features_model = feature_store_attrs(cache, attrs["dataset"]).get(attrs["model_tag"], {}).get("model")
    text_model = {k: v for k, v in encoder.items() if k != "encoder"}
    if features_model and "imported_from" not in features_model and features_model != text_model:
        return (f"its CLIP text tower is not the model of the cached features {attrs['dataset']}/{attrs['model_tag']}: "
                "re-run `pipeline labels` (then `pipeline heads`) with --replace-mismatched")
    return None


MODEL_FILES_KEYS = ("name", "pretrained", "weights_sha256", "config_sha256", "quick_gelu", "random_weights")


def head_model_changes(cache: Path, hgroup: zarr.Group, identity: dict) -> list[str]:
    """What differs between the model a head was made with (a clip-text head: its label embeddings' CLIP text
    tower; an LDA or prototype head: the model of its features) and ``identity``, the model a run trains now.
    Empty when the head has no model of its own (random, orthogonal, another text encoder, imported features)."""
    attrs = hgroup.attrs
    kind, dataset = attrs.get("kind"), attrs.get("dataset")
    try:
        if kind == "clip-text" and attrs.get("encoder_tag"):
            source = labels_path(cache, dataset, attrs["encoder_tag"])
            made_with = dict(zarr.open_group(str(source), mode="r").attrs.get("encoder") or {})
        elif kind in ("lda", "prototype"):
            split = dict(attrs.get("params") or {}).get("split") or "train"
            source = features_path(cache, dataset, attrs["model_tag"], split)
            made_with = dict(zarr.open_group(str(source), mode="r").attrs.get("model") or {})
        else:
            return []
    except (FileNotFoundError, OSError, ValueError, KeyError, PipelineError):
        return []
    if not made_with or "imported_from" in made_with:
        return []

    def value(d: dict, key: str):  # noqa: ANN202 - flags absent from older records are off
        return bool(d.get(key)) if key in ("quick_gelu", "random_weights") else d.get(key)

    return [k for k in MODEL_FILES_KEYS if value(made_with, k) != value(identity, k)]


def run_stale_reason(cache: Path, info: dict) -> str | None:
    """Why a run no longer matches the stores it was trained and validated on (they were rebuilt or are gone
    since), from its run.json; None when they are as they were."""
    dataset = info.get("dataset")
    for split in ("train", "val"):
        recorded = info.get(split)
        if not recorded or not dataset:
            continue
        if info.get("backbone") == "frozen":
            path, what = features_path(cache, dataset, info.get("model_tag"), split), "features"
        else:
            path, what = frames_path(cache, dataset, split), "frame store"
        try:
            current = _fingerprint_at(path)
        except PipelineError:
            current = None
        if current != recorded:
            return (f"its {what} {dataset}/{split} was {'rebuilt' if current else 'deleted'} since it was trained: "
                    "its numbers are of the old data (re-run it with --replace-mismatched)")
    return None


def require_fresh(cache: Path, group: zarr.Group, what: str) -> zarr.Group:
    """``group``, or a one-line error when it is stale (see :func:`stale_reason`)."""
    reason = stale_reason(cache, group)
    if reason:
        raise PipelineError(f"{what} is stale: {reason}")
    return group


def open_fresh(cache: Path, path: Path, what: str) -> zarr.Group:
    """Open an existing output for reading, refusing it when it is stale."""
    return require_fresh(cache, store.open_existing(path, what), what)
