"""Layer 1 of 5, the bottom: errors, settings and params files, atomic files, progress, the cache's filesystem,
dask block runs, plots. Imports nothing else of the project (tests/test_layers.py holds the order)."""
