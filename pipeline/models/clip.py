"""CLIP models through open_clip: every SPEC form, the QuickGELU trap, offline-friendly errors.

SPEC forms (``--model`` / ``--pretrained``):
- ``ViT-B-16`` + ``--pretrained openai``: a built-in config and a pretrained tag (downloaded by
  open_clip into its cache, or found there when offline);
- ``ViT-B-16`` + ``--pretrained /path/weights.pt``: a built-in config and a local checkpoint file;
- ``local-dir:DIR``: ``DIR/open_clip_config.json`` (model_cfg + preprocess_cfg) and weights in DIR;
- ``hf-hub:ORG/NAME``: the same from the Hugging Face Hub.

OpenAI's weights were trained with QuickGELU; open_clip's plain ``ViT-B-16`` config uses GELU
and only warns when the two are combined, which silently degrades features. We force the
activation that the pretrained tag was trained with.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.errors import PipelineError

# torch and open_clip are imported where they are used: importing open_clip takes ~10 s here,
# and commands that only read the cache (heads, evaluate, status) must not pay for it.

WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                "pytorch_model.bin", "model.safetensors")
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


@dataclass(frozen=True)
class ModelSpec:
    name: str  # built-in name, "local-dir:DIR" or "hf-hub:ORG/NAME"
    pretrained: str | None = None  # tag or checkpoint file (built-in names only)
    quick_gelu: bool | None = None  # None: what the pretrained tag was trained with (OpenAI: QuickGELU)
    key: str | None = None  # the model's name in the cache; None: derived (see ``tag``)
    random_weights: bool = False  # a built-in architecture with random weights, asked for (tests, benchmarks)

    def absolute(self) -> ModelSpec:
        """This spec with its local paths absolute: recorded in runs, usable from any directory."""
        name, pretrained = self.name, self.pretrained
        if name.startswith("local-dir:"):
            name = "local-dir:" + os.path.abspath(os.path.expanduser(name[len("local-dir:"):]))
        if pretrained and os.path.isfile(pretrained):
            pretrained = os.path.abspath(pretrained)
        return ModelSpec(name=name, pretrained=pretrained, quick_gelu=self.quick_gelu, key=self.key,
                         random_weights=self.random_weights)

    @property
    def tag(self) -> str:
        """The model's name in the cache: ``key`` when given, else a short, path-safe name
        (``ViT-B-16-openai``, ``org--name``); for weights in a local file or folder the name plus
        a short hash of the weights (``tiny-clip-3f9a1c2e``), so that two checkpoints called
        ``epoch_latest.pt`` never share a key."""
        if self.key:
            return self.key
        if self.name.startswith("local-dir:"):
            base = Path(self.name[len("local-dir:"):]).resolve().name
        elif self.name.startswith("hf-hub:"):
            base = self.name[len("hf-hub:"):].replace("/", "--")
        else:
            base = self.name
            if self.pretrained:
                p = self.pretrained
                base += "-" + (Path(p).stem if os.path.sep in p or os.path.isfile(p) else p)
            elif self.random_weights:
                base += "-random"  # never the key of real weights
        digest = weights_sha256(self) if not self.name.startswith("hf-hub:") else None
        if digest:
            base += "-" + digest[:8]
        return re.sub(r"[^A-Za-z0-9._-]+", "-", base)


@functools.lru_cache(maxsize=64)
def _sha256_of_version(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def cached_file_sha256(path: str) -> str:
    """A file's sha256, computed once per file version (size, mtime) in a process."""
    st = os.stat(path)
    return _sha256_of_version(os.path.realpath(path), st.st_size, st.st_mtime_ns)


def identity_changes(spec: ModelSpec, identity: dict) -> list[str]:
    """What of ``identity`` (recorded by :func:`load_clip`) is no longer that of ``spec``'s files, checked
    without loading the model: name, tag, random weights, and the sha256 of the weights and config files.
    (The activation and preprocessing follow from these and from the spec's flags, compared by the caller.)"""
    config = _config_file(spec)
    name = spec.name if not spec.name.startswith("local-dir:") else f"local-dir:{Path(spec.name[10:]).name}"
    pretrained = spec.pretrained if not (spec.pretrained and os.path.isfile(spec.pretrained)) else None
    now = {"name": name, "pretrained": pretrained, "random_weights": spec.random_weights,
           "weights_sha256": weights_sha256(spec), "config_sha256": cached_file_sha256(config) if config else None}
    recorded = {**identity, "random_weights": bool(identity.get("random_weights"))}
    return [key for key, value in now.items() if recorded.get(key) != value]


def same_model(spec: ModelSpec, identity: dict) -> bool:
    """Whether ``identity`` is still that of ``spec``'s files (see :func:`identity_changes`)."""
    return not identity_changes(spec, identity)


@dataclass
class LoadedClip:
    model: Any  # open_clip.CLIP (or CustomTextCLIP)
    tokenizer: Any
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    identity: dict = field(default_factory=dict)  # everything that determines the weights and the activation
    resize_mode: str = "shortest"  # open_clip's: shortest (resize + centre crop), longest (+ pad), squash

    @property
    def embed_dim(self) -> int:
        return int(self.model.visual.output_dim)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _hub_file(repo: str, names: tuple[str, ...]) -> str | None:
    """The locally cached copy of the first of ``names`` in Hugging Face Hub repository ``repo``."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for name in names:
        found = try_to_load_from_cache(repo, name)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def _config_file(spec: ModelSpec) -> str | None:
    if spec.name.startswith("local-dir:"):
        path = Path(spec.name[len("local-dir:"):]) / "open_clip_config.json"
        return str(path) if path.is_file() else None
    if spec.name.startswith("hf-hub:"):
        return _hub_file(spec.name[len("hf-hub:"):], ("open_clip_config.json",))
    return None


def _weights_files(spec: ModelSpec) -> list[str]:
    """Every file the model's weights may be loaded from. For a ``local-dir:`` folder that is every checkpoint
    file in it (open_clip chooses among them by its own preference, e.g. a ``.safetensors`` beside a ``.bin``):
    the identity covers them all, so it is that of the weights actually loaded."""
    if spec.name.startswith("hf-hub:"):
        found = _hub_file(spec.name[len("hf-hub:"):], WEIGHT_NAMES)
        return [found] if found else []
    if spec.name.startswith("local-dir:"):
        folder = Path(spec.name[len("local-dir:"):])
        if not folder.is_dir():
            return []
        return sorted(str(p) for p in folder.iterdir() if p.suffix in CHECKPOINT_SUFFIXES and p.is_file())
    if spec.pretrained and os.path.isfile(spec.pretrained):
        return [spec.pretrained]
    return []


def _weights_file(spec: ModelSpec) -> str | None:
    files = _weights_files(spec)
    return files[0] if files else None


def weights_sha256(spec: ModelSpec) -> str | None:
    """sha256 of the model's weights file; with several candidate files (see :func:`_weights_files`), sha256 of
    their names and sha256s. None for a tag (its name identifies it) or random weights."""
    files = _weights_files(spec)
    if not files:
        return None
    if len(files) == 1:
        return cached_file_sha256(files[0])
    listing = "".join(f"{Path(f).name}:{cached_file_sha256(f)}\n" for f in files)
    return hashlib.sha256(listing.encode()).hexdigest()


def quick_gelu_for(spec: ModelSpec) -> bool:
    """Whether to force QuickGELU: as asked, else as the pretrained tag was trained (OpenAI tags: yes)."""
    if spec.quick_gelu is not None:
        return spec.quick_gelu
    import open_clip

    if spec.pretrained and not spec.name.startswith(("local-dir:", "hf-hub:")):
        tag_cfg = open_clip.get_pretrained_cfg(spec.name, spec.pretrained)
        return bool(tag_cfg and tag_cfg.get("quick_gelu", False))
    return False


def load_clip(spec: ModelSpec, device: str = "cpu") -> LoadedClip:
    """Build the model of ``spec`` in eval mode on ``device``; one-line errors for every user mistake.

    A checkpoint file of OpenAI weights needs ``quick_gelu=True`` in the spec (``--quick-gelu``);
    for tags it is automatic.
    """
    import open_clip

    force_quick_gelu = quick_gelu_for(spec)
    if spec.name.startswith("local-dir:"):
        folder = Path(spec.name[len("local-dir:"):])
        if not (folder / "open_clip_config.json").is_file():
            raise PipelineError(f"no open_clip_config.json in {folder} (local-dir: needs the config and the weights)")
        if _weights_file(spec) is None:
            raise PipelineError(f"no weights in {folder}: expected one of {', '.join(WEIGHT_NAMES)}")
    elif not spec.name.startswith("hf-hub:"):
        if open_clip.get_model_config(spec.name) is None:
            raise PipelineError(f"unknown open_clip model {spec.name!r} (see open_clip.list_models())")
        if spec.pretrained:
            if not open_clip.get_pretrained_cfg(spec.name, spec.pretrained) and not os.path.isfile(spec.pretrained):
                tags = ", ".join(open_clip.list_pretrained_tags_by_model(spec.name)) or "none"
                raise PipelineError(f"--pretrained {spec.pretrained!r} is neither a checkpoint file nor a tag of "
                                    f"{spec.name} (tags: {tags})")
        if not spec.pretrained and not spec.random_weights:
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(spec.name)[:6]) or "none"
            raise PipelineError(f"{spec.name} without --pretrained would have random weights, and every number made "
                                f"with it would be noise: pass --pretrained TAG (tags: {tags}) or a checkpoint "
                                "file, or --random-weights if random weights are what you want (tests, benchmarks)")
    downloads = spec.name.startswith("hf-hub:") or bool(spec.pretrained and not os.path.isfile(spec.pretrained))
    pretrained = spec.pretrained if not spec.name.startswith(("local-dir:", "hf-hub:")) else None
    logging.disable(logging.ERROR)  # open_clip logs download failures itself; we raise one clear line
    try:
        model = None
        if downloads:
            # the local caches first, without the network: a missing file is known at once, not after a
            # minute of retries on an offline machine
            with _hub_offline():
                try:
                    model = open_clip.create_model(spec.name, pretrained=pretrained, force_quick_gelu=force_quick_gelu,
                                                   device=device)
                except (RuntimeError, OSError, ValueError):
                    model = None
            if model is None and not _hub_reachable():
                raise PipelineError(_offline_advice(spec))
        if model is None:
            model = open_clip.create_model(spec.name, pretrained=pretrained, force_quick_gelu=force_quick_gelu,
                                           device=device)
    except (RuntimeError, OSError, ValueError) as e:
        if downloads:
            raise PipelineError(_offline_advice(spec) + f" ({' '.join(str(e).split())[:160]})") from None
        raise PipelineError(f"could not load {spec.name}: {' '.join(str(e).split())[:300]}") from None
    finally:
        logging.disable(logging.NOTSET)
    model.eval()
    cfg = model.visual.preprocess_cfg if hasattr(model.visual, "preprocess_cfg") else {}
    size = cfg.get("size", model.visual.image_size)
    size = size[0] if isinstance(size, (tuple, list)) else size
    config = _config_file(spec)
    mean = tuple(float(v) for v in cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(float(v) for v in cfg.get("std", open_clip.OPENAI_DATASET_STD))
    interpolation = str(cfg.get("interpolation", "bicubic"))
    # Everything that makes a row of features: the weights (sha256 of the file; for hub models, of
    # the cached file), the architecture config, the activation and the preprocessing.
    identity = {
        "name": spec.name if not spec.name.startswith("local-dir:") else f"local-dir:{Path(spec.name[10:]).name}",
        "pretrained": spec.pretrained if not (spec.pretrained and os.path.isfile(spec.pretrained)) else None,
        "weights_sha256": weights_sha256(spec),
        "config_sha256": cached_file_sha256(config) if config else None,
        "quick_gelu": force_quick_gelu or _uses_quick_gelu(model),
        "image_size": int(size),
        "embed_dim": int(model.visual.output_dim),
        "preprocess": {"mean": list(mean), "std": list(std), "interpolation": interpolation,
                       "resize_mode": str(cfg.get("resize_mode", "shortest"))},
        **({"random_weights": True} if spec.random_weights else {}),  # said in status and exports
    }
    return LoadedClip(
        model=model, tokenizer=open_clip.get_tokenizer(spec.name),
        image_size=int(size), mean=mean, std=std, interpolation=interpolation, identity=identity,
        resize_mode=identity["preprocess"]["resize_mode"],
    )


@contextlib.contextmanager
def _hub_offline():
    """Hugging Face Hub downloads from the local cache only, for the duration (huggingface_hub reads this
    constant at each call)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a download could work: not in offline mode, and the hub answers a connection within seconds."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _offline_advice(spec: ModelSpec) -> str:
    """How to get a tag's (or hub model's) weights onto an offline machine, in one line."""
    if spec.name.startswith("hf-hub:"):
        return (f"the weights of {spec.name} are not in the local Hugging Face cache and the hub cannot be reached "
                f"(offline): on a machine with internet run `huggingface-cli download {spec.name[len('hf-hub:'):]}`, "
                "copy the folder here and use --model local-dir:FOLDER")
    import open_clip

    cfg = open_clip.get_pretrained_cfg(spec.name, spec.pretrained or "") or {}
    source = (f"https://huggingface.co/{cfg['hf_hub'].rstrip('/')}" if cfg.get("hf_hub") else cfg.get("url", ""))
    gelu = (" --quick-gelu (OpenAI weights were trained with QuickGELU: without it the features are wrong)"
            if cfg.get("quick_gelu") else "")
    return (f"the weights of {spec.name} '{spec.pretrained}' are not in open_clip's local cache and the hub cannot be "
            f"reached (offline): on a machine with internet download them ({source}, or run `python -c \"import "
            f"open_clip; open_clip.create_model('{spec.name}', pretrained='{spec.pretrained}')\"` and take the file "
            f"from ~/.cache/huggingface), copy the file here and pass --pretrained /path/to/the/file{gelu}")


def _uses_quick_gelu(model: Any) -> bool:
    return any(type(m).__name__ == "QuickGELU" for m in model.modules())


def save_local_dir(model: Any, model_cfg: dict, out: str | os.PathLike, preprocess_cfg: dict | None = None) -> Path:
    """Write ``model`` as an open_clip ``local-dir:`` model (open_clip_config.json + weights)."""
    import open_clip
    import torch

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or {
        "size": model_cfg["vision_cfg"]["image_size"], "mean": list(open_clip.OPENAI_DATASET_MEAN),
        "std": list(open_clip.OPENAI_DATASET_STD), "interpolation": "bicubic", "resize_mode": "shortest"}}
    from pipeline.core.files import write_atomic

    write_atomic(out / "open_clip_config.json", json.dumps(config, indent=2))
    state = model.state_dict()
    write_atomic(out / "open_clip_pytorch_model.bin", lambda f: torch.save(state, f))
    return out
