"""Text4Vis pipeline: transfer CLIP to video recognition with frozen text-embedding classifiers.

The library (everything in this package except ``cli``) knows nothing of DVC or of cache
layout; the ``stages`` package wires it to the cache, and ``pipeline.cli`` to the command line.
"""

__version__ = "0.1.0"
