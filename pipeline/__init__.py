"""Text4Vis pipeline: transfer CLIP to video recognition with frozen text-embedding classifiers.

The library (everything in this package except ``cli``) knows nothing of DVC or of cache
layout; the ``stages`` package wires it to the cache, and ``pipeline.cli`` to the command line.

Reading outputs from Python (see :mod:`pipeline.api`)::

    from pipeline import open_frames, open_features, open_head, open_run
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["open_features", "open_frames", "open_head", "open_run"]


def __getattr__(name: str) -> Any:
    # Lazy: the command line imports this package too, and needs none of it.
    if name in __all__:
        from pipeline import api

        return getattr(api, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
