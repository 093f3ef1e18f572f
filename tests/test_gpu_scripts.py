"""The GPU scripts on the CPU (issue #22): benchmarks/gpu_throughput.py waits for a lent GPU, and one short run there
must turn into figures. Its smoke mode keeps it runnable meanwhile, a killed run keeps what it measured, and a row
that raises costs that row only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / name), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=Path(__file__).parent)


def read_rows(path: Path) -> list[dict]:
    try:
        return json.loads(path.read_text())["rows"]
    except (OSError, ValueError):  # not written yet (it is replaced atomically, never torn)
        return []


def test_a_killed_throughput_run_leaves_every_row_it_measured(tmp_path):
    out = tmp_path / "table.json"
    proc = subprocess.Popen([sys.executable, str(BENCH / "gpu_throughput.py"), "--smoke", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and len(read_rows(out)) < 2:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it was killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert not report["complete"] and 2 <= len(rows) < len(report["planned"])
    assert [r["key"] for r in rows[:2]] == ["features", "train-ttrans-b32"]  # the headline rows come first
    assert all(r["per_s"] > 0 for r in rows) and rows[1]["gflop_per_clip"] > 0
    table = out.with_suffix(".md").read_text()
    assert "| features |" in table and "| train ttrans |" in table and "INCOMPLETE" in table


def test_a_throughput_row_that_raises_leaves_an_error_row_and_the_later_rows(tmp_path):
    out = tmp_path / "table.json"
    proc = run_script("gpu_throughput.py", "--smoke", "--out", str(out), "--rows",
                      "train-ttrans-b32,train-tokent1d-b32,train-tap-b64", "--fail-row", "train-tokent1d-b32")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert report["complete"] and [r["key"] for r in rows] == ["train-ttrans-b32", "train-tokent1d-b32",
                                                               "train-tap-b64"]  # the plan's order
    assert "injected failure" in rows[1]["error"] and "per_s" not in rows[1]
    assert rows[0]["per_s"] > 0 and rows[2]["per_s"] > 0 and rows[2]["batch"] == 8  # smoke: an eighth of 64
    assert "**error**" in out.with_suffix(".md").read_text()
    assert "injected failure" in proc.stderr  # its traceback, for whoever reads the log
