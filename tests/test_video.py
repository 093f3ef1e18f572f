"""The decoder on real codecs and containers, and on every kind of broken input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import make_broken_files
from videos import brightness_index, frame_image, write_video

from pipeline.media.video import DecodeError, FrameSpec, box_size, decode_clip, segment_centres

SPEC = FrameSpec(num_frames=8, height=32, width=48)


def test_segment_centres_uniform_and_repeating():
    assert segment_centres(20, 8).tolist() == [1, 3, 6, 8, 11, 13, 16, 18]
    assert segment_centres(3, 6).tolist() == [0, 0, 1, 1, 2, 2]  # fewer frames than segments: repeats
    assert segment_centres(1, 4).tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("ext", [".mp4", ".avi", ".webm", ".mkv"])
def test_codecs_give_segment_centre_frames(tmp_path, ext):
    path = write_video(tmp_path / f"v{ext}", n_frames=20)
    clip = decode_clip(path, SPEC)
    assert clip.frames.shape == (8, 32, 48, 3) and clip.frames.dtype == np.uint8
    assert clip.frame_index.tolist() == segment_centres(20, 8).tolist()
    # the pixels really are those frames (each frame's brightness encodes its index)
    assert [brightness_index(f) for f in clip.frames] == clip.frame_index.tolist()
    assert clip.source_frames == 20
    assert np.all(np.diff(clip.timestamp) > 0)


def test_variable_frame_rate_keeps_frame_order_and_times(tmp_path):
    path = write_video(tmp_path / "vfr.mp4", n_frames=20, vfr=True)
    clip = decode_clip(path, SPEC)
    assert [brightness_index(f) for f in clip.frames] == clip.frame_index.tolist()
    # alternating 60 ms / 20 ms frames: frame k starts at 40 ms * k rounded to the pattern
    expected = [sum(60 if j % 2 == 0 else 20 for j in range(i)) / 1000 for i in clip.frame_index]
    assert np.allclose(clip.timestamp - clip.timestamp[0], np.array(expected) - expected[0], atol=1e-3)


def test_fewer_frames_than_segments_repeats(tmp_path):
    clip = decode_clip(write_video(tmp_path / "short.mp4", n_frames=3), SPEC)
    assert clip.frame_index.tolist() == segment_centres(3, 8).tolist()
    assert [brightness_index(f) for f in clip.frames] == clip.frame_index.tolist()


def test_rotated_video_comes_out_upright(tmp_path):
    # Stored 96x64 with a 90-degree display matrix: shown as 64 wide x 96 tall.
    spec = FrameSpec(num_frames=1, height=64, width=64)
    path = write_video(tmp_path / "r.mp4", n_frames=4, width=96, height=64, rotation=90)
    shown = decode_clip(path, spec).frames[0].astype(int)
    stored = frame_image(2, 96, 64)  # the frame that was encoded (segment centre of 4 = index 2)

    def centre(img):
        top = (img.shape[0] - 64) // 2
        return img[top:top + 64, :64].astype(int)

    upright = np.abs(shown - centre(np.rot90(stored, k=1))).mean()  # counterclockwise, as displayed
    wrong_way = np.abs(shown - centre(np.rot90(stored, k=-1))).mean()
    assert upright < 6 < wrong_way


def test_box_resize_short_side_then_centre_crop(tmp_path):
    assert box_size(640, 272, 256) == (602, 256)
    assert box_size(272, 640, 256) == (256, 602)
    clip = decode_clip(write_video(tmp_path / "wide.mp4", n_frames=4, width=128, height=32),
                       FrameSpec(num_frames=2, height=16, width=24))
    assert clip.frames.shape == (2, 16, 24, 3)


def test_segment_of_untrimmed_video(tmp_path):
    path = write_video(tmp_path / "long.mp4", n_frames=30, fps=10)  # 3 s
    clip = decode_clip(path, FrameSpec(num_frames=4, height=32, width=48), start=1.0, end=2.6)
    # 16 frames in [1 s, 2.6 s): segment centres 2, 6, 10, 14 within it = video frames 12, 16, 20, 24
    assert clip.frame_index.tolist() == [2, 6, 10, 14]
    assert [brightness_index(f) for f in clip.frames] == [12, 16, 20, 24]
    assert np.allclose(clip.timestamp, [1.2, 1.6, 2.0, 2.4])
    with pytest.raises(DecodeError, match="after the end"):
        decode_clip(path, SPEC, start=9.0, end=10.0)


def test_keyframe_mode_is_approximate_but_valid(tmp_path):
    path = write_video(tmp_path / "k.mp4", n_frames=40)
    clip = decode_clip(path, FrameSpec(num_frames=4, height=32, width=48, seek="keyframes"))
    assert clip.frames.shape == (4, 32, 48, 3)
    assert clip.frames.max() > 0


def test_every_broken_input_is_a_decode_error(tmp_path, template):
    files = make_broken_files(tmp_path / "broken", template)
    expected = {"empty": "empty file", "truncated": "not a decodable video", "random": "not a decodable video",
                "audio": "no video stream", "text": "not a decodable video", "directory": "is a directory",
                "dangling": "dangling symlink"}
    for kind, path in files.items():
        with pytest.raises(DecodeError, match=expected[kind]):
            decode_clip(str(path), SPEC)
    with pytest.raises(DecodeError, match="missing file"):
        decode_clip(str(tmp_path / "nope.mp4"), SPEC)
    with pytest.raises(DecodeError, match="missing file"):
        decode_clip("", SPEC)


def test_truncated_stream_with_intact_header_is_reported(tmp_path):
    # AVI keeps its header (with the frame count) at the start: cutting the file loses frames.
    path = write_video(tmp_path / "t.avi", n_frames=60, width=96, height=64)
    data = open(path, "rb").read()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(DecodeError, match="truncated|not a decodable"):
        decode_clip(str(cut), SPEC)


def test_oversized_frames_are_refused_not_allocated(tmp_path):
    path = write_video(tmp_path / "big.mp4", n_frames=2, width=96, height=64)
    with pytest.raises(DecodeError, match="exceeds the limit"):
        decode_clip(path, FrameSpec(num_frames=2, height=16, width=16, max_pixels=96 * 64 - 1))


def test_4k_video_decodes_in_bounded_memory(tmp_path):
    path = write_video(tmp_path / "uhd.mp4", n_frames=6, width=3840, height=2160)
    clip = decode_clip(path, FrameSpec(num_frames=4, height=64, width=80), threads=2)
    assert clip.frames.shape == (4, 64, 80, 3)
    assert [brightness_index(f) for f in clip.frames] == clip.frame_index.tolist()


def test_nan_segment_means_whole_video(tmp_path):
    path = write_video(tmp_path / "w.mp4", n_frames=10)
    a = decode_clip(path, SPEC)
    b = decode_clip(path, SPEC, start=math.nan, end=math.nan)
    assert np.array_equal(a.frames, b.frames)


@pytest.mark.parametrize("ext,kw", [(".mp4", {}), (".avi", {}), (".webm", {}), (".mkv", {}), (".mp4", {"vfr": True}),
                                    (".mp4", {"n_frames": 5})])
def test_fast_path_is_taken_and_matches_the_counting_decoder(tmp_path, ext, kw):
    from pipeline.media.video import _decode_exact, _decode_planned

    path = write_video(tmp_path / f"v{ext}", **{"n_frames": 30, **kw})
    fast = _decode_planned(path, SPEC, math.nan, math.nan, threads=1)
    assert fast is not None, "the pts plan should cover this container"
    slow = _decode_exact(path, SPEC, math.nan, math.nan, threads=1, known_count=None)
    assert np.array_equal(fast.frames, slow.frames)
    assert fast.frame_index.tolist() == slow.frame_index.tolist()
    assert np.allclose(fast.timestamp, slow.timestamp)
