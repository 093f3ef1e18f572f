"""data/profiles with one dataset, as a user has it: the other datasets' stages were never built (their
folders do not even exist), and `dvc checkout`, `dvc exp apply` and `dvc status` must still work."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.media.world import WorldSpec, generate_world

pytestmark = pytest.mark.slow  # end to end, minutes: `make test` runs it, `make test-fast` does not

ROOT = Path(__file__).resolve().parents[1]
GIT = ["git", "-c", "user.name=ci", "-c", "user.email=ci@localhost"]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT), "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def dvc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run(str(Path(sys.executable).with_name("dvc")), *args, cwd=cwd)


def test_one_dataset_built_checkout_exp_apply_and_status_work(tmp_path):
    repo = tmp_path / "repo"
    for name in ("pipeline", "stages", "data/profiles"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("cache", "tmp", "__pycache__"))
    profiles = repo / "data" / "profiles"
    # the user's one dataset: `custom`, a flat folder of class folders (a small world's training clips)
    world = generate_world(tmp_path / "world", WorldSpec(colours=("red", "blue"), shapes=("ring",), sizes=("small",),
                                                         train_per_class=10, val_per_class=1, frames=8, size=32))
    datasets = yaml.safe_load((profiles / "datasets.yaml").read_text())
    datasets["datasets"]["custom"]["root"] = str(world / "videos" / "train")
    (profiles / "datasets.yaml").write_text(yaml.safe_dump(datasets, sort_keys=False))
    assert run("git", "init", "-q", cwd=repo).returncode == 0
    assert run(*GIT, "add", "-A", cwd=repo).returncode == 0
    assert run(*GIT, "commit", "-qm", "profiles", cwd=repo).returncode == 0

    proc = dvc("repro", "frames@custom", cwd=profiles)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert run(*GIT, "add", "-A", cwd=repo).returncode == 0 and run(*GIT, "commit", "-qm", "frames", cwd=repo)

    # every other output was never built: checkout restores what exists and says nothing failed
    proc = dvc("checkout", cwd=profiles)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]

    proc = dvc("exp", "run", "frames@custom", "-S", "custom.yaml:frames.cache_frames=4", "-n", "four", cwd=profiles)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert run("git", "checkout", "-q", "--", ".", cwd=profiles).returncode == 0
    assert yaml.safe_load((profiles / "custom.yaml").read_text())["frames"]["cache_frames"] == 8
    proc = dvc("exp", "apply", "four", cwd=profiles)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert yaml.safe_load((profiles / "custom.yaml").read_text())["frames"]["cache_frames"] == 4

    # the one dataset's status: its chain only, frames up to date, the rest never built
    proc = dvc("status", "evaluate@custom", "--with-deps", cwd=profiles)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    listed = set(re.findall(r"^(\S+):\s*$", proc.stdout, flags=re.M))
    assert listed == {f"{s}@custom" for s in ("features", "labels", "heads", "evaluate")}, proc.stdout
