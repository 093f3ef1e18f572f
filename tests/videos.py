"""Videos the tests make with PyAV: real containers and codecs, content that encodes the frame index."""

from __future__ import annotations

import os
from fractions import Fraction

import av
import numpy as np

CODECS = {".mp4": "libx264", ".avi": "mpeg4", ".webm": "libvpx-vp9", ".mkv": "libx264"}


def frame_image(i: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    """An RGB frame whose brightness tells its index (frames 0..31 stay distinguishable)."""
    img = np.full((height, width, 3), (i * 8) % 256, np.uint8)
    rng = np.random.default_rng(seed)
    img[..., 0] = (img[..., 0].astype(int) + rng.integers(0, 4)) % 256
    img[..., 2] = np.linspace(0, 255, width)[None, :].astype(np.uint8)  # left-to-right ramp: shows rotation
    x = (i * 3) % max(1, width - 8)
    img[: height // 4, x : x + 8] = (255, 0, 0)  # a moving red mark, top quarter
    return img


def write_video(path: str | os.PathLike, n_frames: int = 20, width: int = 96, height: int = 64,
                fps: int = 25, codec: str | None = None, rotation: int = 0, vfr: bool = False,
                seed: int = 0) -> str:
    """Write a real video; ``vfr`` gives irregular frame durations, ``rotation`` a display matrix."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    path = str(path)
    codec = codec or CODECS[os.path.splitext(path)[1]]
    with av.open(path, "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "crf": "12"}
        if rotation:
            stream.set_display_rotation(rotation)
        if vfr:
            stream.codec_context.time_base = Fraction(1, 1000)
        pts = 0
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(frame_image(i, width, height, seed), format="rgb24")
            if vfr:
                frame.pts = pts
                frame.time_base = Fraction(1, 1000)
                pts += 20 if i % 2 else 60  # alternating 20 ms / 60 ms frames
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def brightness_index(frame: np.ndarray) -> int:
    """Recover the frame index that :func:`frame_image` encoded (from the lower, unmarked part)."""
    h = frame.shape[0]
    return int(round(float(frame[h // 2 :, :, 1].mean()) / 8))
