"""Run independent blocks of work in this process or on a dask.distributed cluster."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from pipeline.core.errors import PipelineError


def threads_per_worker(workers: int) -> int:
    """Decoder threads each worker may use so that ``workers`` processes share the cores."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def run_blocks(fn: Callable[..., Any], calls: Sequence[tuple], *, workers: int = 1,
               scheduler_address: str | None = None, on_result: Callable[[Any], None]) -> list[str]:
    """Call ``fn(*args)`` for each args tuple; hand each result to ``on_result`` as it arrives.

    ``workers <= 1`` without a scheduler runs in this process (no cluster start-up cost).
    Otherwise the calls run on a dask LocalCluster of ``workers`` single-threaded processes, or on
    the existing scheduler at ``scheduler_address``. Each call is a separate task, so each block
    has exactly one writer. Returns the error messages of calls that failed (e.g. a worker that
    died); their blocks stay pending and a re-run retries them.
    """
    if workers <= 1 and not scheduler_address:
        for args in calls:
            on_result(fn(*args))
        return []
    from dask.distributed import Client, LocalCluster, as_completed

    for name in ("distributed", "distributed.scheduler", "distributed.core"):
        logging.getLogger(name).setLevel(logging.WARNING)  # keep the user's terminal to our progress bar
    cluster = None
    try:
        if scheduler_address:
            client = Client(scheduler_address, timeout="30s")
        else:
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                   dashboard_address=None, silence_logs=logging.ERROR)
            client = Client(cluster)
    except OSError as e:
        raise PipelineError(f"cannot reach the dask scheduler {scheduler_address}: {e}") from None
    errors = []
    try:
        futures = [client.submit(fn, *args, pure=False) for args in calls]
        for future in as_completed(futures):
            try:
                on_result(future.result())
            except Exception as e:  # a worker died or the task raised: leave the block pending
                errors.append(f"{type(e).__name__}: {e}")
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return errors
