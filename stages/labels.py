"""Labels stage: text embeddings of a dataset's class names."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core.cachefs import as_path
from pipeline.core.errors import DamagedStore, FingerprintMismatch, PipelineError
from pipeline.core.progress import Progress, say
from pipeline.models.clip import ModelSpec, load_clip, same_model
from pipeline.models.text import encode_with_clip, encode_with_hf, encoder_tag, resolve_templates
from pipeline.storage import store

from .paths import frames_path, labels_path, splits_of


def class_names_of(cache: Path, dataset: str) -> tuple[list[str], str]:
    """The dataset's class names (every split stores the same list) and their fingerprint.

    From its frame store, or from a feature store when the features were imported (no frames).
    """
    splits = splits_of(cache, "frames", dataset)
    if splits:
        group = store.open_existing(frames_path(cache, dataset, splits[0]), f"frame store {dataset}/{splits[0]}")
    else:
        found = sorted((as_path(cache) / "features" / dataset).glob("*/*/zarr.json"))
        if not found:
            raise PipelineError(f"no frame or feature store for {dataset!r} under {cache}: "
                                "run `pipeline frames` (or `pipeline import`) first")
        group = store.open_existing(found[0].parent, f"features of {dataset}")
    names = list(group.attrs["class_names"])
    return names, store.fingerprint({"class_names": names})


def _already_done(cache: Path, dataset: str, encoder: str, spec: ModelSpec, class_names: list[str],
                  templates: list[str], prompt_names: list[str]) -> tuple[Path, np.ndarray] | None:
    """The stored CLIP label embeddings when this run would write exactly them again (same class names,
    templates and model files), checked without loading the model; else None."""
    if encoder != "clip":
        return None
    path = labels_path(cache, dataset, encoder_tag(encoder, spec.tag))
    if not (path / "zarr.json").exists():
        return None
    try:
        group = store.open_group(path, mode="r")
        attrs = group.attrs
        identity = dict(attrs.get("encoder") or {})
        if (not attrs.get("fingerprint") or list(attrs.get("class_names") or []) != class_names
                or list(attrs.get("templates") or []) != templates or not same_model(spec, identity)
                or list(attrs.get("prompt_names") or attrs.get("class_names") or []) != prompt_names
                or (spec.quick_gelu is not None and identity.get("quick_gelu") != spec.quick_gelu)):
            return None
        return path, np.asarray(group["embeddings"][:])
    except (DamagedStore, OSError, KeyError):
        return None


def _named(class_names_file: str | None) -> str | None:
    """How the store records a class-names file: its absolute path, or the text4vis: name as given."""
    if not class_names_file or class_names_file.startswith("text4vis:"):
        return class_names_file
    return str(Path(class_names_file).resolve())


def read_class_names(path: str | Path, expected: int) -> list[str]:
    """Class names to embed from a file: one a line, or the official code's ``id,name`` CSV (ordered by id)."""
    from pipeline.media.officiallists import resolve_list

    p = resolve_list(str(path))  # a path, or text4vis:kinetics_400_labels.csv (downloaded once)
    if not p.is_file():
        raise PipelineError(f"class-names file not found: {p}")
    lines = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if lines and lines[0].lower().replace(" ", "") in ("id,name", "name"):
        lines = lines[1:]
    rows = [line.split(",", 1) for line in lines]
    if rows and all(len(r) == 2 and r[0].strip().isdigit() for r in rows):
        names = [name.strip() for _, name in sorted(rows, key=lambda r: int(r[0]))]
    else:
        names = lines
    if len(names) != expected:
        raise PipelineError(f"{p} lists {len(names)} class names; the dataset has {expected} (in its class order)")
    return names


def run(cache: Path, dataset: str, encoder: str, template: str, spec: ModelSpec, *, device: str,
        replace_mismatched: bool, quiet: bool,
        class_names_file: str | None = None) -> tuple[Path, np.ndarray]:
    class_names, names_fp = class_names_of(cache, dataset)
    # the names the text encoder reads: the dataset's readable ones, or a list given (the official code's)
    prompt_names = read_class_names(class_names_file, len(class_names)) if class_names_file else class_names
    templates = resolve_templates(template)
    if encoder != "clip" and not encoder.startswith("hf:"):
        raise PipelineError(f"--encoder must be 'clip' or 'hf:NAME_OR_PATH', not {encoder!r}")
    done = _already_done(cache, dataset, encoder, spec, class_names, templates, prompt_names)
    if done is not None:  # a no-op re-run: no model to load
        return done
    tag = encoder_tag(encoder, spec.tag)
    path = labels_path(cache, dataset, tag)
    # names already embedded, when the store holds a prefix of them (a grown dataset: new classes come last)
    kept = _embedded_prefix(path, class_names, prompt_names, templates)
    todo = prompt_names[kept:]
    say(f"loading the text encoder {spec.name if encoder == 'clip' else encoder[3:]} on {device} ...", quiet)
    clip = load_clip(spec, device) if encoder == "clip" else None

    def encode(names: list[str]) -> tuple[np.ndarray, dict]:
        with Progress(len(templates), f"labels {dataset} ({len(names)} classes)", quiet, unit="template") as bar:
            if clip is not None:
                return encode_with_clip(clip, names, templates, device, bar.update), {"encoder": "clip",
                                                                                       **clip.identity}
            return encode_with_hf(encoder[3:], names, templates, device, bar.update)

    embeddings, identity = encode(todo)
    # what makes other embeddings: the encoder and the templates (and a names file); the class names are its rows
    record = {"stage": "labels", "templates": templates, "encoder": identity,
              **({"class_names_file": _named(class_names_file)} if class_names_file else {})}
    params = {"encoder": encoder, "templates": templates, **identity}
    if kept and store.open_group(path, mode="r").attrs.get("fingerprint") != store.fingerprint(record):
        if not replace_mismatched:  # another encoder: the stored rows are not these embeddings
            raise FingerprintMismatch(f"{path} was made with different parameters or inputs (another text encoder "
                                      "or its files); re-run with --replace-mismatched to rebuild it")
        kept = 0
        embeddings, identity = encode(prompt_names)

    def init(group):
        store.create_small(group, "embeddings", embeddings)
        group.attrs.update({"stage": "labels", "dataset": dataset, "split": "-", "class_names": class_names,
                            "templates": templates, "encoder": identity, "encoder_tag": tag,
                            "model_tag": spec.tag, "width": int(embeddings.shape[1]), "prompt_names": prompt_names,
                            "class_names_file": _named(class_names_file), "version": 1})

    with store.writer_lock(path):
        if kept:
            group = store.open_output(path, store.fingerprint(record), params, replace_mismatched=False,
                                      init=lambda g: None)
            if _embedded_prefix(path, class_names, prompt_names, templates) != kept:  # changed meanwhile
                raise PipelineError(f"{path} changed while its new class names were embedded: re-run")
            embeddings = append_rows(group, embeddings, class_names, prompt_names)
        else:
            group = store.open_output(path, store.fingerprint(record), params,
                                      replace_mismatched=replace_mismatched, init=init)
    return path, embeddings


def _embedded_prefix(path: Path, class_names: list[str], prompt_names: list[str], templates: list[str]) -> int:
    """How many of the dataset's classes the label embeddings at ``path`` already hold, when they hold the first
    ones under the same prompts and templates (class lists only grow at their end); 0 otherwise."""
    if not (path / "zarr.json").exists():
        return 0
    try:
        attrs = store.open_group(path, mode="r").attrs
        names = list(attrs.get("class_names") or [])
        prompts = list(attrs.get("prompt_names") or names)
    except (DamagedStore, OSError):
        return 0
    if (not attrs.get("fingerprint") or list(attrs.get("templates") or []) != templates
            or attrs.get("format_version") != store.FORMAT_VERSION
            or names != class_names[:len(names)] or prompts != prompt_names[:len(prompts)] or len(names) == 0):
        return 0
    return len(names) if len(names) < len(class_names) else 0


def append_rows(group, new: np.ndarray, class_names: list[str], prompt_names: list[str]) -> np.ndarray:  # noqa: ANN001
    """Append the embeddings of new class names (the existing rows are not touched); a new version."""
    arr = group["embeddings"]
    c = arr.shape[0]
    arr.resize((c + len(new), arr.shape[1]))
    arr[c:] = new
    whole = np.asarray(arr[...])
    arr.attrs["sha256"] = store.values_sha256(whole)
    group.attrs.update({"class_names": class_names, "prompt_names": prompt_names,
                        "version": int(group.attrs.get("version", 1)) + 1})
    return whole
