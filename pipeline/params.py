"""params.yaml: keys grouped by command (``frames.*``, ``features.*``, ...) plus a shared ``data`` group.

A command-line flag overrides the key of the same name (``--num-frames`` <-> ``frames.num_frames``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from .errors import PipelineError

DEFAULT_PARAMS = "params.yaml"
DATA_KEYS = ("dataset", "root", "split_id", "untrimmed", "name", "val_fraction")
# The model is shared by every command that reads features, labels or heads: ``model.name``
# (flag --model), ``model.pretrained``, ``model.quick_gelu``.
MODEL_KEYS = {"model": "name", "pretrained": "pretrained", "quick_gelu": "quick_gelu"}


def load_params(path: str | os.PathLike | None) -> dict[str, Any]:
    """The parsed params file; ``./params.yaml`` when present and no path is given."""
    if path is None:
        if not Path(DEFAULT_PARAMS).is_file():
            return {}
        path = DEFAULT_PARAMS
    p = Path(path)
    if not p.is_file():
        raise PipelineError(f"params file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise PipelineError(f"params file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise PipelineError(f"params file {p} must hold a mapping of command names to keys")
    return data


class Params:
    """Resolve one command's settings: flag, then ``<section>.<key>``, then ``data.<key>``, then default."""

    def __init__(self, params: dict[str, Any], section: str) -> None:
        self.section = section
        self._own = params.get(section) or {}
        self._data = params.get("data") or {}
        self._model = params.get("model") or {}
        if not isinstance(self._own, dict):
            raise PipelineError(f"params group {section!r} must be a mapping")

    def get(self, key: str, flag: Any, default: Any = None) -> Any:
        if flag is not None and flag != ():
            return flag
        if key in self._own:
            return self._typed(f"{self.section}.{key}", self._own[key], default)
        if key in DATA_KEYS and key in self._data:
            return self._typed(f"data.{key}", self._data[key], default)
        if key in MODEL_KEYS and MODEL_KEYS[key] in self._model:
            return self._model[MODEL_KEYS[key]]
        return default

    @staticmethod
    def _typed(name: str, value: Any, default: Any) -> Any:
        """A params-file value of the default's type (flags are typed by click), or a one-line error.

        Numbers written as text convert (PyYAML reads ``5e-5``, without a dot, as a string).
        """
        if value is None or default is None or isinstance(default, str):
            return value
        kind = type(default)
        try:
            if kind is bool and isinstance(value, bool):
                return value
            if kind is int and not isinstance(value, (bool, float)):
                return int(value)
            if kind is float and not isinstance(value, bool):
                return float(value)
            if kind not in (bool, int, float):
                return value
        except (TypeError, ValueError):
            pass
        names = {bool: "true or false", int: "an integer", float: "a number"}
        raise PipelineError(f"{name} in the params file must be {names[kind]}, not {value!r}")

    def for_dataset(self, dataset: str) -> Params:
        """These settings with the ``data`` keys dropped when they describe another dataset.

        ``pipeline frames --dataset ucf101`` in a folder whose params.yaml describes the demo must
        not pick up the demo's root or cache name.
        """
        described = self._own.get("dataset", self._data.get("dataset"))
        if described is None or described == dataset:
            return self
        other = Params({"model": self._model}, self.section)
        other._own = {k: v for k, v in self._own.items() if k not in DATA_KEYS}
        return other
