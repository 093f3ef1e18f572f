"""The bookkeeping benchmarks run to their end at a small size.

They run on demand, so nothing else notices when a library change breaks them (a stage's new argument,
a store that now needs its chunk files): these runs do, in seconds. The figures are not checked here;
the benchmarks print them, and docs/measurements.md quotes them with the command that made them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(name: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.slow
def test_bench_scale_runs_and_its_summary_counts_every_failure():
    out = run_benchmark("bench_scale.py", "--rows", "3000")
    assert "summary, every failure listed" in out and "summary speed-up over the per-element baseline" in out


@pytest.mark.slow
def test_bench_append_runs_and_decodes_only_the_new_videos():
    out = run_benchmark("bench_append.py", "--rows", "2000", "--append", "0.02")
    assert "append of 40 videos (2.0%)" in out and "append / full build" in out
