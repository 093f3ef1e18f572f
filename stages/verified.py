"""When each output was last verified (read whole by ``pipeline verify``), and what was found.

One small JSON file in the cache, ``.verified.json``: {output path relative to the cache: {"at": ISO time,
"ok": bool, "fingerprint": the output's fingerprint then}}. ``status`` shows it beside each output; an
entry of an output rebuilt since (another fingerprint) no longer counts. Kept outside the outputs: writing
into a store would change what DVC hashes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline.core.cachefs import as_path
from pipeline.core.files import write_atomic

LEDGER = ".verified.json"


def _read(cache: Path) -> dict:
    try:
        data = json.loads((as_path(cache) / LEDGER).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def last_verified(cache: Path) -> dict[str, dict]:
    """{output key: {"at", "ok", "fingerprint"}} as recorded by the last ``verify`` of each output."""
    return _read(cache)


def record(cache: Path, results: list[tuple[str, bool, str | None]]) -> None:
    """Record ``(output key, ok, fingerprint)`` of outputs verified just now."""
    data = _read(cache)
    at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    for key, ok, fp in results:
        data[key] = {"at": at, "ok": ok, "fingerprint": fp}
    write_atomic(as_path(cache) / LEDGER, json.dumps(data, indent=1, sort_keys=True))


def current(entry: dict | None, fingerprint: str | None) -> dict | None:
    """The recorded verification if it is of the output as it is now (same fingerprint), else None."""
    if entry and entry.get("fingerprint") == fingerprint:
        return entry
    return None
