from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import av
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from videos import write_video  # noqa: E402

from pipeline.media.world import WorldSpec, generate_world  # noqa: E402

# No test may reach a model hub: these machines (and many clusters) are offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}}


def write_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A tiny open_clip CLIP with random weights, saved as a ``local-dir:`` model."""
    import open_clip
    import torch

    from pipeline.models.clip import save_local_dir

    torch.manual_seed(seed)
    return save_local_dir(open_clip.model.CLIP(**TINY_CLIP), TINY_CLIP, folder)


def sigkill_mid_run(args: list[str], store_path: Path, cwd: Path, timeout: float = 120) -> None:
    """Run ``python -m pipeline *args`` and SIGKILL it once ``store_path`` has recorded its first finished blocks.

    The coordinator records the first finished block at once, then batches its records (every 2 s).
    """
    import signal
    import subprocess
    import time

    import zarr

    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=cwd)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:  # every chunk is written (zeros too): a marker counts once it is set
            if zarr.open_group(str(store_path), mode="r")["block_done"][:].any():
                break
        except Exception:  # noqa: BLE001 - not created yet, or being written
            pass
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


class Crash(Exception):
    """Raised by :func:`crash_at_step`: a training run dying mid-way, in process."""


def crash_at_step(step: int):
    """A training callback that kills the run at ``step`` (after that step, before any later checkpoint)."""
    def callback(kind: str, values: dict) -> None:
        if kind == "step" and values["step"] == step:
            raise Crash
    return callback


def run_inproc(*args: str) -> str:
    """Run the CLI in this process (torch and open_clip are imported once per test session).

    Like ``python -m pipeline``, a PipelineError fails the call; the cwd is the tests folder,
    so the repository's own params.yaml stays out of it.
    """
    from click.testing import CliRunner

    from pipeline.cli import cli

    old = os.getcwd()
    os.chdir(Path(__file__).parent)
    try:
        result = CliRunner().invoke(cli, list(args), catch_exceptions=True)
    finally:
        os.chdir(old)
    if result.exit_code != 0:
        raise AssertionError(f"exit {result.exit_code}: {result.output}\n{result.exception!r}")
    return result.output


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip")


@pytest.fixture(scope="session")
def template(tmp_path_factory) -> Path:
    """One small valid H.264 clip that adapter trees copy under many names."""
    return Path(write_video(tmp_path_factory.mktemp("tpl") / "t.mp4", n_frames=12, width=48, height=32))


def copy_video(template: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, dest)
    return dest


def write_audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=16000)
        for i in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate = 16000
            frame.pts = i * 1024
            for p in stream.encode(frame):
                out.mux(p)
        for p in stream.encode():
            out.mux(p)
    return path


def make_broken_files(folder: Path, template: Path) -> dict[str, Path]:
    """Each kind of unusable input the frame stage must record and skip."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    files["empty"] = folder / "empty.mp4"
    files["empty"].write_bytes(b"")
    data = template.read_bytes()
    files["truncated"] = folder / "truncated.mp4"
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["random"] = folder / "random.mp4"
    files["random"].write_bytes(np.random.default_rng(0).bytes(4096))
    files["audio"] = write_audio_only(folder / "audio.mp4")
    files["text"] = folder / "notes.mp4"
    files["text"].write_text("this is not a video\n" * 20)
    files["directory"] = folder / "folder.mp4"
    files["directory"].mkdir()
    files["dangling"] = folder / "dangling.mp4"
    os.symlink(folder / "does-not-exist.mp4", files["dangling"])
    return files


WORLD = WorldSpec(colours=("red", "green", "blue"), shapes=("disc", "ring"), sizes=("small", "large"),
                  train_per_class=5, val_per_class=2, frames=8, size=32, seed=3)  # 12 classes


@pytest.fixture(scope="session")
def extracted(tmp_path_factory, tiny_clip) -> tuple[Path, Path]:
    """A cache with frames, features and CLIP label embeddings of a 12-class world."""
    base = tmp_path_factory.mktemp("fs")
    generate_world(base / "world", WORLD)
    cache = base / "cache"
    run_inproc("extract", "--format", "csv", "--root", str(base / "world"), "--dataset", "toy", "--cache-frames", "4",
            "--height", "32", "--width", "32", "--block-size", "4", "--model", f"local-dir:{tiny_clip}",
            "--model-key", "tiny-clip",
            "--cache", str(cache), "--quiet")
    return cache, tiny_clip
