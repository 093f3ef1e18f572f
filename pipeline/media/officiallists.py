"""The official Text4Vis code's list files (class names, K600 zero-shot splits), read from a path the user
gives or, named ``text4vis:<path under lists/>``, downloaded once from the repository when online.

They are never shipped with this project: ``text4vis:k600/k160_labels_split1.csv`` is fetched from
``https://raw.githubusercontent.com/whwu95/Text4Vis/main/lists/k600/k160_labels_split1.csv`` into
``~/.cache/text4vis-lists`` (``PIPELINE_LISTS_CACHE``) on first use.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.core.files import write_atomic

PREFIX = "text4vis:"
BASE_URL = "https://raw.githubusercontent.com/whwu95/Text4Vis/main/lists/"


def resolve_list(name: str) -> Path:
    """A local path as given, or the cached download of ``text4vis:<path>``."""
    if not name.startswith(PREFIX):
        return Path(name)
    rel = name[len(PREFIX):].lstrip("/")
    if not rel or ".." in Path(rel).parts:
        raise PipelineError(f"{name!r}: name a file under the official lists/ folder, e.g. "
                            "text4vis:k600/k160_labels_split1.csv")
    cache = Path(os.environ.get("PIPELINE_LISTS_CACHE") or Path.home() / ".cache" / "text4vis-lists")
    target = cache / rel
    if target.is_file():
        return target
    url = os.environ.get("PIPELINE_TEXT4VIS_URL", BASE_URL).rstrip("/") + "/" + rel
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise PipelineError(f"could not download {url} ({reason}): offline? pass the file from a clone of "
                            "whwu95/Text4Vis instead") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, data)
    return target
