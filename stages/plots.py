"""Plots stage: correlation maps of the cached heads."""

from __future__ import annotations

from pathlib import Path

from pipeline.core.cachefs import as_path
from pipeline.core.errors import PipelineError
from pipeline.core.plots import plot_correlation

from .inputs import open_fresh


def choose_classes(class_names: list[str], classes: str) -> list[int]:
    if classes.isdigit():
        return list(range(min(int(classes), len(class_names))))
    path = Path(classes)
    if not path.is_file():
        raise PipelineError(f"--classes must be a number or a file of class names; {classes!r} is neither")
    wanted = [n.strip() for n in path.read_text().splitlines() if n.strip()]
    index = {n: i for i, n in enumerate(class_names)}
    missing = [n for n in wanted if n not in index]
    if missing:
        raise PipelineError(f"class {missing[0]!r} is not a class of this dataset")
    return [index[n] for n in wanted]


def run(cache: Path, dataset: str, model_tag: str, kinds: list[str], classes: str, out: Path | None) -> list[Path]:
    base = as_path(cache) / "heads" / dataset / model_tag
    found = sorted(p.name for p in base.iterdir() if (p / "zarr.json").exists()) if base.is_dir() else []
    chosen = kinds or found
    if not chosen:
        raise PipelineError(f"no heads cached for {dataset} with model {model_tag}: run `pipeline heads` first")
    out = out or as_path(cache) / "plots" / dataset
    written = []
    for name in chosen:
        match = [f for f in found if f == name or f.startswith(f"{name}-")]
        if not match:
            raise PipelineError(f"no {name} head cached for {dataset} with model {model_tag} "
                                f"(have: {', '.join(found)})")
        group = open_fresh(cache, base / match[0], f"{name} head")
        names = list(group.attrs["class_names"])
        rows = choose_classes(names, classes)
        written.append(plot_correlation(group["head"][:][rows], [names[i] for i in rows],
                                        out / f"head-correlation-{match[0]}.png", f"{dataset}: {match[0]} head"))
    return written
