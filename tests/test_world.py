"""The demo world: deterministic bytes, readable by the regular csv adapter."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.media.datasets import load_manifest
from pipeline.media.world import WorldSpec, generate_world

SPEC = WorldSpec(colours=("red", "blue"), shapes=("ring", "bar"), sizes=("small", "large"), train_per_class=2,
                 val_per_class=1, frames=4, size=32, seed=5)


def digest(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_videos(tmp_path):
    a = digest(generate_world(tmp_path / "a", SPEC))
    assert a == digest(generate_world(tmp_path / "b", SPEC))
    assert len(a) == 8 * 3 + 3  # 24 clips + videos.csv, classes.txt, world.json
    c = digest(generate_world(tmp_path / "c", WorldSpec(**{**SPEC.__dict__, "seed": 6})))
    differing = [k for k, v in c.items() if k.endswith(".mp4") and a[k] != v]
    assert len(differing) == 24


def test_world_is_a_generic_csv_dataset(tmp_path):
    m = load_manifest("csv", str(generate_world(tmp_path / "w", SPEC)))
    assert m.class_names == SPEC.class_names() and len(m.class_names) == 8
    assert [len(m.split(s).records) for s in ("train", "val")] == [16, 8]
    assert all(r.path.endswith(".mp4") for r in m.records)


# A worker renders and encodes two small worlds (objects and order) and prints each clip's sha256. Each
# worker starts from another heap: MALLOC_PERTURB_ fills glibc's fresh and freed memory with its own
# byte, and a clock-dependent amount of allocations precedes the render (as a progress bar's redraws
# would). x264's AVX-512 assembly once read such leftovers: 68 of the 576 demo clips changed with them.
WORKER = """
import hashlib, json, sys, time
from pathlib import Path
from pipeline.media.world import WorldSpec, generate_world
junk = [bytearray(1000 + 37 * k) for k in range(int(time.monotonic_ns()) % 500)]
out = Path(sys.argv[1])
small = dict(train_per_class=2, val_per_class=1)
generate_world(out / "objects", WorldSpec(colours=("cyan", "purple", "red"), **small))
generate_world(out / "order", WorldSpec(colours=("red", "blue", "cyan"), kind="order", **small))
print(json.dumps({str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
                  for p in sorted(out.rglob("*")) if p.is_file()}))
"""


@pytest.mark.slow
def test_same_bytes_in_parallel_processes_under_load(tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    load = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(3)]
    try:
        workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path / f"w{i}")], stdout=subprocess.PIPE,
                                    text=True, env={**env, "MALLOC_PERTURB_": str(1 + 50 * i)})
                   for i in range(4)]
        digests = [json.loads(w.communicate(timeout=300)[0]) for w in workers]
    finally:
        for p in load:
            p.kill()
            p.wait()
    assert all(w.returncode == 0 for w in workers)
    assert len(digests[0]) == 24 * 3 + 6 * 3 + 6  # clips, and each world's videos.csv, classes.txt, world.json
    for i, d in enumerate(digests[1:], 1):
        differing = sorted(k for k in d if d[k] != digests[0][k])
        assert not differing, f"worker {i}: {len(differing)} files differ from worker 0's, e.g. {differing[:3]}"


def test_order_world_reads_its_own_params_group_and_print_config_says_so(tmp_path):
    # `pipeline world --kind order` takes order_world.*: the run, and --print-config, which DVC's params check reads
    root = Path(__file__).resolve().parents[1]
    params = tmp_path / "p.yaml"
    params.write_text("world: {train_per_class: 2, val_per_class: 2, frames: 4, size: 32}\norder_world: "
                      "{colours: [red, blue], train_per_class: 1, val_per_class: 1, frames: 4, size: 32}\n")
    run = [sys.executable, "-m", "pipeline", "world", "--kind", "order", "--params", str(params), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(root)}
    shown = subprocess.run([*run, "--print-config"], env=env, capture_output=True, text=True, check=True).stdout
    assert "params: order_world.train_per_class" in shown and "params: world." not in shown
    subprocess.run([*run, "--out", str(tmp_path / "w")], env=env, capture_output=True, check=True)
    assert len(list((tmp_path / "w" / "videos").rglob("*.mp4"))) == 2 * (1 + 1)  # 2 ordered pairs, 1 + 1 clips
