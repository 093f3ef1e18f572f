"""The demo world: a deterministic synthetic video dataset, written as real H.264 MP4 files.

Each class is an object described in words ("a small red ring"); every clip shows that object
drifting over a noisy background. The ``order`` kind holds the classes where time matters: "a red
object then a blue object" shows one colour in the first half of the clip and the other after it
(random shape and size), so the reverse order has exactly the same frames in another order.
The world is laid out for the generic ``csv`` adapter
(``videos.csv`` + ``classes.txt``), so nothing downstream knows it is synthetic.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import av
import numpy as np

COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230),
    "yellow": (235, 215, 40), "purple": (150, 50, 200), "cyan": (40, 200, 210),
}
SHAPES = ("disc", "ring", "plus", "bar")
SIZES = {"small": 0.12, "large": 0.24}  # radius as a fraction of the frame side


@dataclass(frozen=True)
class WorldSpec:
    colours: tuple[str, ...] = tuple(COLOURS)
    shapes: tuple[str, ...] = SHAPES
    sizes: tuple[str, ...] = tuple(SIZES)
    train_per_class: int = 8
    val_per_class: int = 4
    frames: int = 16
    size: int = 64
    fps: int = 8
    seed: int = 0
    kind: str = "objects"  # objects: "a small red ring"; order: "a red object then a blue object"

    def __post_init__(self) -> None:
        if self.kind not in ("objects", "order"):
            raise ValueError(f"unknown world kind {self.kind!r} (objects, order)")
        for what, chosen, known in (("colour", self.colours, COLOURS), ("shape", self.shapes, SHAPES),
                                    ("size", self.sizes, SIZES)):
            unknown = [c for c in chosen if c not in known]
            if unknown or not chosen:
                raise ValueError(f"unknown {what} {unknown[0]!r} (choose from {', '.join(known)})" if unknown
                                 else f"the world needs at least one {what}")

    def class_names(self) -> list[str]:
        if self.kind == "order":
            return [f"a {a} object then a {b} object" for a, b in self.classes()]
        return [f"a {s} {c} {sh}" for s, c, sh in self.classes()]

    def classes(self) -> list[tuple[str, ...]]:
        if self.kind == "order":
            return list(itertools.permutations(self.colours, 2))
        return list(itertools.product(self.sizes, self.colours, self.shapes))


def shape_mask(shape: str, radius: float, cx: float, cy: float, n: int) -> np.ndarray:
    y, x = np.mgrid[0:n, 0:n].astype(np.float32)
    dx, dy = x - cx, y - cy
    d2 = dx * dx + dy * dy
    thick = max(1.5, radius * 0.35)
    if shape == "disc":
        return d2 <= radius * radius
    if shape == "ring":
        return (d2 <= radius * radius) & (d2 >= (radius - thick) ** 2)
    if shape == "plus":
        vertical = (np.abs(dx) <= thick / 2) & (np.abs(dy) <= radius)
        return vertical | ((np.abs(dy) <= thick / 2) & (np.abs(dx) <= radius))
    if shape == "bar":
        return (np.abs(dx) <= radius) & (np.abs(dy) <= thick / 2)
    raise ValueError(f"unknown shape {shape!r}")


def render_clip(spec: WorldSpec, size_name: str, colour: str, shape: str, rng: np.random.Generator) -> np.ndarray:
    """uint8 [T, S, S, 3]: the object drifting in a straight line over a noisy grey background."""
    n, t = spec.size, spec.frames
    radius = SIZES[size_name] * n
    margin = radius + 2
    start = rng.uniform(margin, n - margin, size=2)
    end = rng.uniform(margin, n - margin, size=2)
    background = rng.integers(70, 110, size=(n, n, 1), dtype=np.int16)
    tone = rng.integers(-20, 21, size=3)
    frames = np.empty((t, n, n, 3), np.uint8)
    for k in range(t):
        cx, cy = start + (end - start) * (k / max(1, t - 1))
        img = np.repeat(background, 3, axis=2) + rng.integers(-6, 7, size=(n, n, 1), dtype=np.int16)
        img[shape_mask(shape, radius, cx, cy, n)] = np.clip(np.array(COLOURS[colour]) + tone, 0, 255)
        frames[k] = np.clip(img, 0, 255).astype(np.uint8)
    return frames


def render_order_clip(spec: WorldSpec, first: str, then: str, rng: np.random.Generator) -> np.ndarray:
    """uint8 [T, S, S, 3]: an object of colour ``first`` for the first half of the clip, then ``then``."""
    shape = spec.shapes[rng.integers(len(spec.shapes))]
    size_name = spec.sizes[rng.integers(len(spec.sizes))]
    half = spec.frames // 2
    a = render_clip(WorldSpec(**{**asdict(spec), "frames": half}), size_name, first, shape, rng)
    b = render_clip(WorldSpec(**{**asdict(spec), "frames": spec.frames - half}), size_name, then, shape, rng)
    return np.concatenate([a, b])


def rgb_to_yuv420p(image: np.ndarray) -> np.ndarray:
    """uint8 [S*3/2, S] (the Y plane, then U and V) of an RGB image: BT.601 limited range, in integers.

    Done here rather than by swscale so that the bytes handed to the encoder do not depend on which
    SIMD path (or how many threads) FFmpeg picks on this machine. Chroma is the 2x2 mean."""
    h, w = image.shape[:2]
    if h % 2 or w % 2:
        raise ValueError(f"4:2:0 video needs even sides, got {w}x{h}")
    rgb = image.astype(np.int32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = ((66 * r + 129 * g + 25 * b + 128) >> 8) + 16
    mean = (rgb.reshape(h // 2, 2, w // 2, 2, 3).sum(axis=(1, 3)) + 2) >> 2
    r, g, b = mean[..., 0], mean[..., 1], mean[..., 2]
    u = ((-38 * r - 74 * g + 112 * b + 128) >> 8) + 128
    v = ((112 * r - 94 * g - 18 * b + 128) >> 8) + 128
    planes = [y.reshape(-1), u.reshape(-1), v.reshape(-1)]
    return np.concatenate(planes).clip(0, 255).astype(np.uint8).reshape(h * 3 // 2, w)


# x264's assembly reads memory it never wrote: with AVX-512 and macroblock-tree rate control, 68 of
# the 576 demo clips changed with the heap's leftover contents (MALLOC_PERTURB_), so a regeneration
# whose allocations followed another timing (a progress bar's redraws under load) changed bytes.
# Its C code (asm=0) reads only what it wrote, and does not vary with the CPU's instruction sets (with
# assembly, SSE4/AVX2 machines and AVX-512 ones encode differently). Cost: the 720 demo clips take 12 s,
# not 7 s.
X264_OPTIONS = {"preset": "veryfast", "crf": "18", "x264-params": "asm=0"}


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int) -> None:
    """H.264 in MP4 whose bytes depend on the pixels alone: not on the CPU, the load, the clock or
    the process's history (single-threaded x264 without assembly, our own RGB -> YUV, and a muxer
    that writes no library version)."""
    with av.open(str(path), "w", format="mp4", options={"fflags": "+bitexact"}) as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1  # PyAV's default is 0: one thread per CPU
        stream.options = dict(X264_OPTIONS)
        for image in frames:
            frame = av.VideoFrame.from_ndarray(rgb_to_yuv420p(image), format="yuv420p")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def generate_world(out: str | os.PathLike, spec: WorldSpec, progress=None) -> Path:
    """Write the world under ``out``: ``videos/<split>/<class>/<n>.mp4``, ``videos.csv``, ``classes.txt``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for ci, (attributes, name) in enumerate(zip(spec.classes(), spec.class_names(), strict=True)):
        folder = name.replace(" ", "_")
        for split, count in (("train", spec.train_per_class), ("val", spec.val_per_class)):
            for k in range(count):
                # One generator per clip, seeded by (world seed, class, split, index): any clip can
                # be regenerated alone and the world does not depend on generation order.
                rng = np.random.default_rng([spec.seed, ci, 0 if split == "train" else 1, k])
                rel = Path("videos") / split / folder / f"{k:03d}.mp4"
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                frames = (render_order_clip(spec, *attributes, rng) if spec.kind == "order"
                          else render_clip(spec, *attributes, rng))
                write_mp4(out / rel, frames, spec.fps)
                rows.append((str(rel), name, split))
                if progress is not None:
                    progress.update(1)
    with open(out / "videos.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)
    (out / "classes.txt").write_text("".join(f"{c}\n" for c in spec.class_names()))
    (out / "world.json").write_text(json.dumps(asdict(spec), indent=2))
    return out
