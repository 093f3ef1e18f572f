"""Video decoding: uniform-segment frame sampling with PyAV, resized by swscale.

One place decodes video in this project. The fast path decodes forward once, never seeks
backwards, and converts and resizes only the frames it keeps (one ``reformat`` call each).
Every way a file can be unusable raises :class:`DecodeError` with a short reason; nothing is
substituted silently.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import av
import numpy as np

from pipeline.core.settings import INTERPOLATIONS, SEEK_MODES, FramesSettings

_S = FramesSettings.defaults()  # the defaults

# Largest frame (width x height) we agree to decode: 8K UHD. Larger streams are refused as
# failed instead of allocating decoder buffers of unbounded size.
MAX_PIXELS = 7680 * 4320
MAX_SECONDS = 365 * 24 * 3600.0  # a segment time past this is an annotation error


class DecodeError(Exception):
    """A video (or segment) that cannot give frames; the message is the recorded reason."""


MAX_VIDEO_BYTES = 2 << 30  # one video's decoded frames, held in memory by a decoder


@dataclass(frozen=True)
class FrameSpec:
    """How frames are taken from a video. Every field is part of the frame store's fingerprint."""

    num_frames: int = _S.cache_frames  # T_cache: frames kept per video, at the centres of uniform segments
    height: int = _S.height  # output box: the short side is scaled to ``height`` ...
    width: int = _S.width  # ... then the result is centre-cropped or zero-padded to height x width
    interpolation: str = _S.interpolation  # swscale filter used for the resize
    seek: str = _S.seek  # "keyframes": decode keyframes only (fast, approximate positions)
    min_decoded_fraction: float = 0.9  # fewer decodable frames than this x declared = truncated
    max_pixels: int = MAX_PIXELS

    def __post_init__(self) -> None:
        if self.num_frames < 1 or self.height < 1 or self.width < 1:
            raise ValueError("num_frames, height and width must be positive")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}")
        if self.seek not in SEEK_MODES:
            raise ValueError(f"seek must be one of {SEEK_MODES}")
        if self.num_frames * self.height * self.width * 3 > MAX_VIDEO_BYTES:
            raise ValueError(f"{self.num_frames} frames of {self.height} x {self.width} are "
                             f"{self.num_frames * self.height * self.width * 3 / 2**30:.1f} GiB a video, more than a "
                             f"decoder holds ({MAX_VIDEO_BYTES >> 30} GiB): fewer --cache-frames or a smaller box")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Clip:
    frames: np.ndarray  # uint8 [T, H, W, 3], upright
    frame_index: np.ndarray  # int32 [T]: index of each kept frame in the video (or segment)
    timestamp: np.ndarray  # float64 [T]: its presentation time in seconds
    source_frames: int  # frames the video (or segment) holds, as decoded or estimated
    box: tuple[int, int, int, int] | None = None  # (y0, y1, x0, x1): the video's pixels in the H x W box (the
    # rest is padding); None: the whole box

def segment_centres(n: int, t: int) -> np.ndarray:
    """Indices of the centre frames of ``t`` equal segments of ``n`` frames (TSN test sampling).

    With fewer frames than segments, frames repeat (each segment still maps to the frame at its
    centre), so short videos give ``t`` frames instead of failing.
    """
    return np.minimum(((np.arange(t) + 0.5) * n / t).astype(np.int64), n - 1)


def check_path(path: str) -> None:
    """Reject what cannot be a video file before FFmpeg sees it, with a precise reason."""
    if not path:
        raise DecodeError("missing file: not found under the dataset root")
    if os.path.islink(path) and not os.path.exists(path):
        raise DecodeError(f"dangling symlink -> {os.readlink(path)}")
    if not os.path.exists(path):
        raise DecodeError("missing file")
    if os.path.isdir(path):
        raise DecodeError("is a directory, not a video file")
    if os.path.getsize(path) == 0:
        raise DecodeError("empty file (0 bytes)")


def decode_clip(path: str, spec: FrameSpec, start: float = math.nan, end: float = math.nan,
                threads: int = 1) -> Clip:
    """Decode ``spec.num_frames`` frames of ``path`` (or of its [start, end] segment, in seconds)."""
    check_path(path)
    try:
        if spec.seek == "keyframes":
            return _decode_keyframes(path, spec, start, end, threads)
        clip = _decode_planned(path, spec, start, end, threads)
        if clip is None:  # packets without timestamps, or frames the plan did not find: count by decoding
            clip = _decode_exact(path, spec, start, end, threads, known_count=None)
        if clip is None:  # the container over-declared its frames: sample the frames that exist
            clip = _decode_exact(path, spec, start, end, threads, known_count=_count_frames(path, start, end))
        assert clip is not None
        return clip
    except DecodeError:
        raise
    except av.error.FFmpegError as e:
        raise DecodeError(f"not a decodable video: {_ffmpeg_reason(e)}") from None
    except (OSError, ValueError, OverflowError, MemoryError) as e:
        raise DecodeError(f"{type(e).__name__}: {e}") from None


def _ffmpeg_reason(e: av.error.FFmpegError) -> str:
    msg = getattr(e, "strerror", None) or str(e)
    return " ".join(str(msg).split())[:200]


def _open(path: str, threads: int, max_pixels: int = MAX_PIXELS):
    container = av.open(path, metadata_errors="ignore")
    if not container.streams.video:
        container.close()
        raise DecodeError("no video stream (audio-only or not a video)")
    stream = container.streams.video[0]
    ctx = stream.codec_context
    if ctx.width * ctx.height > max_pixels:
        container.close()
        raise DecodeError(f"frame size {ctx.width}x{ctx.height} exceeds the limit of {max_pixels} pixels")
    if ctx.width <= 0 or ctx.height <= 0:
        container.close()
        raise DecodeError("video stream has no frame size")
    # Frame threads multiply memory (one frame buffer each) and fight with other workers for
    # cores; the caller passes its share of the machine.
    stream.thread_type = "AUTO"
    stream.thread_count = max(1, threads)
    return container, stream


def _segment(start: float, end: float) -> tuple[float, float]:
    """[start, end) in seconds; the whole stream when start/end are NaN."""
    s = 0.0 if math.isnan(start) else max(0.0, start)
    e = math.inf if math.isnan(end) else end
    # A start must be a real time a seek can reach (1e300 s overflows the seek's int64 timestamp);
    # a video longer than a year is not one we decode.
    if not math.isfinite(s) or s > MAX_SECONDS:
        raise DecodeError(f"segment start {start} is not a usable time")
    if e <= s:
        raise DecodeError(f"empty segment [{start}, {end}]")
    return s, e


def _rate(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 25.0


def _estimate_count(container, stream, s: float, e: float) -> int | None:
    """Frames in [s, e) from metadata, or None when the container does not say."""
    whole = s == 0.0 and math.isinf(e)
    if whole and stream.frames and stream.frames > 0:
        return int(stream.frames)
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / av.time_base
    else:
        return None
    span = min(e, duration) - s
    if span <= 0:
        raise DecodeError(f"segment starts at {s:.2f}s, after the end of the video ({duration:.2f}s)")
    return max(1, round(span * _rate(stream)))


def _seek_to(container, stream, s: float) -> None:
    if s > 0:
        # One forward seek to the keyframe at or before the segment start.
        container.seek(int(s / stream.time_base), stream=stream, backward=True, any_frame=False)


def _plan(path: str, spec: FrameSpec, s: float, e: float) -> list[int] | None:
    """Presentation timestamps (stream time base) of every frame in [s, e), in display order.

    One demux pass (no decoding: about 2 ms for a 10-s clip) gives the exact frame count and the
    timestamp of each target, even where the container declares no count (WebM). None when packets
    carry no or duplicate timestamps (some AVI files): the caller then counts by decoding.
    """
    container, stream = _open(path, 1, spec.max_pixels)
    with container:
        tb = stream.time_base
        _seek_to(container, stream, s)
        stamps = []
        for packet in container.demux(stream):
            if packet.size == 0:
                continue
            if packet.pts is None:
                return None
            if packet.dts is not None and packet.dts * tb >= e:
                break  # decode order: every later packet is shown at or after its dts
            t = float(packet.pts * tb)
            if s - 1e-6 <= t < e:
                stamps.append(packet.pts)
        declared = stream.frames if (s == 0.0 and math.isinf(e)) else 0
    stamps.sort()
    if not stamps or len(set(stamps)) != len(stamps):
        return None
    if declared and len(stamps) < spec.min_decoded_fraction * declared:
        raise DecodeError(f"truncated: {len(stamps)} of {declared} frames present")
    return stamps


def _decode_planned(path: str, spec: FrameSpec, start: float, end: float, threads: int) -> Clip | None:
    """The fast path: decode forward, skipping non-reference frames that are not kept.

    The decoder must still decode every reference frame (later frames are predicted from them),
    but a non-reference frame that is not a target is dropped before decoding (``skip_frame =
    NONREF``, set per packet): with B-frames that is about 40% of the decoding work.
    """
    s, e = _segment(start, end)
    stamps = _plan(path, spec, s, e)
    if stamps is None:
        return None
    n = len(stamps)
    targets = segment_centres(n, spec.num_frames)
    wanted = {stamps[i] for i in targets.tolist()}
    images: dict[int, np.ndarray] = {}
    box = None
    container, stream = _open(path, threads, spec.max_pixels)
    with container:
        ctx = stream.codec_context
        _seek_to(container, stream, s)
        mode = None
        for packet in container.demux(stream):
            want = "DEFAULT" if (packet.pts in wanted or packet.size == 0) else "NONREF"
            if want != mode:
                ctx.skip_frame = mode = want
            for frame in stream.decode(packet):
                if frame.pts in wanted and frame.pts not in images:
                    images[frame.pts], box = rgb_in_box(frame, spec)
            if len(images) == len(wanted):
                break
    if len(images) != len(wanted):
        return None  # some target did not come out of the decoder: fall back to counting
    tb = float(stream.time_base)
    chosen = [stamps[i] for i in targets.tolist()]
    return Clip(
        frames=np.stack([images[p] for p in chosen]),
        frame_index=targets.astype(np.int32),
        timestamp=np.array([p * tb for p in chosen], np.float64),
        source_frames=n,
        box=box,
    )


def _frames_in(container, stream, s: float, e: float):
    """Decoded frames of [s, e) in presentation order, with their index within the segment."""
    _seek_to(container, stream, s)
    index = 0
    rate = _rate(stream)
    for frame in container.decode(stream):
        t = frame.time if frame.time is not None else index / rate
        if t < s - 1e-6:
            continue
        if t >= e:
            break
        yield index, t, frame
        index += 1


def _count_frames(path: str, start: float, end: float) -> int:
    container, stream = _open(path, threads=1)
    with container:
        s, e = _segment(start, end)
        n = sum(1 for _ in _frames_in(container, stream, s, e))
    if n == 0:
        raise DecodeError("no decodable frames")
    return n


def _decode_exact(path: str, spec: FrameSpec, start: float, end: float, threads: int,
                  known_count: int | None) -> Clip | None:
    container, stream = _open(path, threads, spec.max_pixels)
    with container:
        s, e = _segment(start, end)
        declared = known_count or _estimate_count(container, stream, s, e)
        if declared is None:
            return None
        targets = segment_centres(declared, spec.num_frames)
        frames = np.zeros((spec.num_frames, spec.height, spec.width, 3), np.uint8)
        index = np.zeros(spec.num_frames, np.int32)
        stamps = np.zeros(spec.num_frames, np.float64)
        k = 0  # next target to fill
        box = None
        seen = 0
        for i, t, frame in _frames_in(container, stream, s, e):
            seen = i + 1
            if i < targets[k]:
                continue
            image, box = rgb_in_box(frame, spec)
            while k < len(targets) and targets[k] <= i:
                frames[k], index[k], stamps[k] = image, i, t
                k += 1
            if k == len(targets):
                break
    if k == len(targets):
        return Clip(frames, index, stamps, declared, box)
    if known_count is None and seen >= spec.min_decoded_fraction * declared and seen > 0:
        return None  # metadata over-counted a little: resample over the frames that exist
    if seen == 0:
        raise DecodeError("no decodable frames")
    raise DecodeError(f"truncated: decoded {seen} of {declared} frames")


def _decode_keyframes(path: str, spec: FrameSpec, start: float, end: float, threads: int) -> Clip:
    """Nearest keyframe to each segment centre, decoding keyframes only (approximate, fast)."""
    container, stream = _open(path, threads, spec.max_pixels)
    with container:
        s, e = _segment(start, end)
        count = _estimate_count(container, stream, s, e)
        rate = _rate(stream)
        duration = (count / rate) if count else None
        stream.codec_context.skip_frame = "NONKEY"
        keyframes: list[tuple[float, np.ndarray]] = []
        box = None
        for _, t, frame in _frames_in(container, stream, s, e):
            image, box = rgb_in_box(frame, spec)
            keyframes.append((t, image))
    if not keyframes:
        raise DecodeError("no decodable keyframes")
    if duration is None:
        duration = keyframes[-1][0] - s + 1.0 / rate
    centres = s + (np.arange(spec.num_frames) + 0.5) * duration / spec.num_frames
    times = np.array([t for t, _ in keyframes])
    nearest = np.abs(times[None, :] - centres[:, None]).argmin(axis=1)
    frames = np.stack([keyframes[j][1] for j in nearest])
    stamps = times[nearest]
    index = np.round((stamps - s) * rate).astype(np.int32)
    return Clip(frames, index, stamps, count or round(duration * rate), box)


def box_size(width: int, height: int, box_h: int) -> tuple[int, int]:
    """Size after scaling the short side to ``box_h`` (aspect kept)."""
    scale = box_h / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def to_rgb_box(frame: av.VideoFrame, spec: FrameSpec) -> np.ndarray:
    """Upright RGB uint8 [H, W, 3]: short side to H by swscale, then centre crop / pad to W."""
    return rgb_in_box(frame, spec)[0]


def rgb_in_box(frame: av.VideoFrame, spec: FrameSpec) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """(:func:`to_rgb_box`'s image, the (y0, y1, x0, x1) box of the video's own pixels in it)."""
    rotation = (frame.rotation or 0) % 360
    quarter = rotation in (90, 270)
    shown_w, shown_h = (frame.height, frame.width) if quarter else (frame.width, frame.height)
    out_w, out_h = box_size(shown_w, shown_h, spec.height)
    if quarter:
        out_w, out_h = out_h, out_w
    image = frame.reformat(width=out_w, height=out_h, format="rgb24",
                           interpolation=spec.interpolation).to_ndarray()
    if rotation:
        # DISPLAYMATRIX rotation is counterclockwise; np.rot90 with k>0 also turns counterclockwise.
        image = np.rot90(image, k=rotation // 90)
    ih, iw = image.shape[:2]
    dy, dx = max(0, (spec.height - ih) // 2), max(0, (spec.width - iw) // 2)
    box = (dy, dy + min(spec.height, ih), dx, dx + min(spec.width, iw))
    return _crop_or_pad(image, spec.height, spec.width), box


def _crop_or_pad(image: np.ndarray, h: int, w: int) -> np.ndarray:
    out = np.zeros((h, w, 3), np.uint8)
    ih, iw = image.shape[:2]
    sy, dy = max(0, (ih - h) // 2), max(0, (h - ih) // 2)
    sx, dx = max(0, (iw - w) // 2), max(0, (w - iw) // 2)
    ch, cw = min(h, ih), min(w, iw)
    out[dy:dy + ch, dx:dx + cw] = image[sy:sy + ch, sx:sx + cw]
    return out
