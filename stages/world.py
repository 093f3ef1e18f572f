"""World stage: generate the demo dataset (deterministic given its parameters)."""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.core.progress import Progress
from pipeline.media.world import WorldSpec, generate_world


def run(out: Path, spec: WorldSpec, quiet: bool) -> Path:
    # The world is cheap to regenerate and has no blocks: rebuild it whole so that no clip of an
    # older spec survives.
    if out.exists():
        shutil.rmtree(out)
    total = len(spec.classes()) * (spec.train_per_class + spec.val_per_class)
    with Progress(total, "world", quiet, unit="clip") as bar:
        return generate_world(out, spec, progress=bar)
