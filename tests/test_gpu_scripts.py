"""The GPU scripts on the CPU (issue #22): benchmarks/gpu_check.py and benchmarks/gpu_throughput.py wait for a lent GPU,
and one short run there must turn into figures. Their smoke modes keep them runnable meanwhile, a killed throughput
run keeps what it measured, and a row that raises costs that row only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # end to end, minutes: `make test` runs it, `make test-fast` does not

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SECTIONS = ("environment", "gpu_tests", "pipeline", "throughput", "targets", "verdict")


def run_script(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / name), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=Path(__file__).parent)


def test_gpu_check_in_smoke_mode_runs_every_step_and_writes_every_section(tmp_path):
    proc = run_script("gpu_check.py", "--smoke", "--out-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = summary["sections"]
    assert tuple(sections) == SECTIONS
    assert sections["environment"]["status"] == "ok" and sections["environment"]["info"]["packages"]["torch"]
    tests = sections["gpu_tests"]
    # no visible GPU in smoke mode: every GPU test is reported skipped, with its reason
    assert tests["status"] == "skipped" and len(tests["tests"]) >= 10
    assert all(t["outcome"] == "skipped" and "no CUDA device" in t["message"] for t in tests["tests"])
    steps = {s["step"]: s for s in sections["pipeline"]["steps"]}
    assert sections["pipeline"]["status"] == "ok" and list(steps) == [
        "model", "world", "frames", "features", "labels", "heads", "evaluate", "finetune", "evaluate-run"]
    assert all(s["rc"] == 0 for s in steps.values())
    clips = steps["world"]["figures"]["clips"]
    assert clips == steps["frames"]["figures"]["videos"] == steps["features"]["figures"]["videos"] == 72
    assert steps["finetune"]["figures"]["steps"] == 6 and steps["evaluate-run"]["figures"]["videos"] == 24
    assert 0 <= steps["evaluate"]["figures"]["top1"] <= 100
    rows = {r["key"]: r for r in sections["throughput"]["table"]["rows"]}
    assert sections["throughput"]["status"] == "ok" and set(rows) == {"features", "train-ttrans-b32",
                                                                       "data-path-worker", "data-path-device"}
    assert all(r["per_s"] > 0 for r in rows.values())
    assert sections["targets"]["status"] == "skipped" and sections["targets"]["checks"]
    assert sections["verdict"]["status"] == "pass"
    text = (tmp_path / "gpu_check.md").read_text()
    for heading in ("## environment", "## GPU tests", "## pipeline", "## throughput", "## targets", "## verdict"):
        assert heading in text, heading
    assert "| evaluate-run | 0 |" in text and "| train ttrans | 4 |" in text


def test_gpu_check_without_a_gpu_fails_and_still_writes_its_summary(tmp_path):
    proc = run_script("gpu_check.py", "--out-dir", str(tmp_path), timeout=120)
    assert proc.returncode == 1
    assert "run this on a GPU machine, or --smoke" in proc.stdout
    sections = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert sections["environment"]["status"] == "failed"
    assert [sections[n]["status"] for n in ("gpu_tests", "pipeline", "throughput")] == ["not run"] * 3
    assert sections["verdict"]["status"] == "fail" and "# GPU check: FAIL" in (tmp_path / "gpu_check.md").read_text()


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
