"""The demo world: deterministic bytes, readable by the regular csv adapter."""

from __future__ import annotations

import hashlib

from pipeline.datasets import load_manifest
from pipeline.world import WorldSpec, generate_world

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
