"""params.yaml: keys grouped by command (``frames.*``, ``features.*``, ...) plus a shared ``data`` group.

A command-line flag overrides the key of the same name (``--cache-frames`` <-> ``frames.cache_frames``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.errors import PipelineError

DEFAULT_PARAMS = "params.yaml"
# The shared groups: ``data.*`` (where videos come from, for frames/extract/import) and ``model.*``
# (the model of every command that reads features, labels or heads): field -> key there.
DATA_KEYS = ("format", "root", "split_id", "untrimmed", "dataset", "val_fraction")
MODEL_KEYS = {"model": "name", "pretrained": "pretrained", "quick_gelu": "quick_gelu", "model_key": "key",
              "random_weights": "random_weights"}


MAX_PARAMS_BYTES = 1 << 20


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases: a few lines of nested aliases (a "billion laughs" file) expand
    to billions of values when anything walks them; a params file has no use for them."""

    def compose_node(self, parent, index):  # noqa: ANN001, ANN201
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.YAMLError(f"YAML aliases (*name) are not allowed in a params file (line {mark.line + 1})")
        return super().compose_node(parent, index)


def read_params_file(path: str | os.PathLike | None) -> dict[str, Any]:
    """The parsed params file (``./params.yaml`` when present and no path is given), not yet validated:
    ``pipeline.core.settings.load_params`` validates it."""
    if path is None:
        if not Path(DEFAULT_PARAMS).is_file():
            return {}
        path = DEFAULT_PARAMS
    p = Path(path)
    if not p.is_file():
        raise PipelineError(f"params file not found: {p}")
    if p.stat().st_size > MAX_PARAMS_BYTES:
        raise PipelineError(f"params file {p} is larger than {MAX_PARAMS_BYTES >> 20} MiB: not a params file")
    try:
        data = yaml.load(p.read_text(), Loader=_NoAliasLoader) or {}  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as e:
        raise PipelineError(f"params file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise PipelineError(f"params file {p} must hold a mapping of command names to keys")
    if isinstance(data.get("data"), dict) and "name" in data["data"]:  # read as before by upgrade_data_group
        import warnings

        warnings.warn(f"params file {p}: keys data.dataset (the format) and data.name are deprecated: write "
                      "data.format and data.dataset (the name in the cache)", stacklevel=2)
    return data


class Params:
    """One command's view of params.yaml: ``<section>.<key>``, then ``data.<key>``, then ``model.<key>``."""

    def __init__(self, params: dict[str, Any], section: str) -> None:
        self.section = section
        self._own = params.get(section) or {}
        self._data = upgrade_data_group(params.get("data") or {})
        self._model = params.get("model") or {}
        for name, group in ((section, self._own), ("data", self._data), ("model", self._model)):
            if not isinstance(group, dict):
                raise PipelineError(f"params group {name!r} must be a mapping")

    def lookup(self, key: str, old_keys: tuple[str, ...] = ()) -> tuple[bool, Any, str, bool]:
        """(found, value, where, whether an old key name was used) for one setting."""
        for name in (key, *old_keys):
            if name in self._own:
                return True, self._own[name], f"{self.section}.{name}", name != key
        if key in DATA_KEYS and key in self._data:
            return True, self._data[key], f"data.{key}", False
        if key in MODEL_KEYS and MODEL_KEYS[key] in self._model:
            return True, self._model[MODEL_KEYS[key]], f"model.{MODEL_KEYS[key]}", False
        return False, None, "", False

    def get(self, key: str, default: Any = None) -> Any:
        """A key without a flag (world colours, the report's settings note)."""
        found, value, _, _ = self.lookup(key)
        return value if found else default

    def described(self) -> tuple[str | None, str | None]:
        """(format, dataset) of the params file's data group."""
        return self._data.get("format"), self._data.get("dataset")

    def described_model(self) -> str | None:
        """The model the params file's ``model`` group names (``model.name``)."""
        return self._model.get("name")

    def without_model(self) -> Params:
        """These settings with the ``model`` group dropped: its key, weights and flags belong to the model it
        names, never to another one given by --model."""
        other = Params({}, self.section)
        other._own, other._data = self._own, self._data
        return other

    def without_data(self) -> Params:
        """These settings with the ``data`` keys dropped: ``pipeline frames --format ucf101`` in a folder
        whose params.yaml describes the demo must not pick up the demo's root or cache name."""
        other = Params({"model": self._model}, self.section)
        other._own = {k: v for k, v in self._own.items() if k not in DATA_KEYS}
        return other


def upgrade_data_group(data: dict) -> dict:
    """The ``data`` group in today's spelling. Before 0.3 ``data.dataset`` was the format and ``data.name``
    the cache name; such a file still reads the same (``--format`` / ``--dataset`` now)."""
    if not isinstance(data, dict) or "name" not in data:
        return data
    upgraded = {k: v for k, v in data.items() if k != "name"}
    upgraded.setdefault("format", data.get("dataset"))
    upgraded["dataset"] = data["name"]
    return upgraded
