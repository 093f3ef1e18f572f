"""Beyond one process: remote dask workers in another directory, two torchrun launchers as two nodes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import zarr
from conftest import WORLD, run_inproc
from test_frames_stage import run_cli

from pipeline.media.world import generate_world

pytestmark = pytest.mark.slow  # end to end, minutes: `make test` runs it, `make test-fast` does not

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def dask_cluster(tmp_path):
    """A dask scheduler and one worker, each started in a directory of its own (not the caller's)."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    dirs = [tmp_path / "scheduler-cwd", tmp_path / "worker-cwd"]
    for d in dirs:
        d.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], cwd=dirs[0], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    procs.append(subprocess.Popen([str(BIN / "dask"), "worker", address, "--nthreads", "1", "--nworkers", "1",
                                   "--no-dashboard"], cwd=dirs[1], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        from dask.distributed import Client

        deadline = time.monotonic() + 90
        while True:
            try:
                with Client(address, timeout="5s") as client:
                    client.wait_for_workers(1, timeout=60)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield address
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def test_remote_workers_in_another_directory_write_the_stores_of_a_local_run(tmp_path, tiny_clip, dask_cluster):
    user = tmp_path / "user"  # the caller's directory: every path given relative to it
    user.mkdir()
    generate_world(user / "world", WORLD)
    shutil.copytree(tiny_clip, user / "tiny-clip")
    frames = ["frames", "--format", "csv", "--root", "world", "--dataset", "toy", "--cache-frames", "2", "--height",
              "32",
              "--width", "32", "--block-size", "8", "--quiet"]
    features = ["features", "-d", "toy", "--model", "local-dir:tiny-clip", "--model-key", "tiny-clip", "--quiet"]
    for args in (frames, features):
        run_cli(*args, "--cache", "local", cwd=user)
        run_cli(*args, "--cache", "remote", "--scheduler-address", dask_cluster, cwd=user)
    for stage, parts in (("frames", ("toy",)), ("features", ("toy", "tiny-clip"))):
        for split in ("train", "val"):
            a = zarr.open_group(str(user.joinpath("local", stage, *parts, split)), mode="r")
            b = zarr.open_group(str(user.joinpath("remote", stage, *parts, split)), mode="r")
            assert a.attrs["fingerprint"] == b.attrs["fingerprint"]
            for name in ("frames" if stage == "frames" else "features", "status", "reason"):
                assert a[name][:].tolist() == b[name][:].tolist(), (stage, split, name)
    # the stores record absolute paths: another directory reads them too
    paths = zarr.open_group(str(user / "remote" / "frames" / "toy" / "train"), mode="r")["path"][:]
    assert all(Path(str(p)).is_absolute() for p in paths)


def two_nodes(args: list[str], cwd: Path, timeout: float = 300) -> list[subprocess.Popen]:
    """Two torchrun launchers on this machine, one process each, meeting through a c10d rendezvous."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return [subprocess.Popen([str(BIN / "torchrun"), "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node",
                              "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id",
                              "test", "-m", "pipeline", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
            for rank in (0, 1)]


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> None:
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-3000:]


def test_two_torchrun_nodes_train_the_weights_of_one_process_and_resume_after_a_kill(extracted, tmp_path):
    cache, tiny = extracted
    local = tmp_path / "cache"
    shutil.copytree(cache, local)
    m = ["--model", f"local-dir:{tiny}", "--cache", str(local)]
    run_inproc("heads", "-d", "toy", *m, "--head", "clip-text", "--replace-mismatched")
    common = ["finetune", "-d", "toy", *m, "--head", "clip-text", "--frames", "2", "--global-batch-size", "12",
              "--micro-batch", "3", "--epochs", "2", "--lr", "1e-3", "--warmup-epochs", "0.3", "--grayscale", "0",
              "--randaugment", "0", "0", "--workers", "0", "--checkpoint-every", "2", "-q"]
    run_inproc(*common, "--run-name", "one")
    finish(two_nodes([*common, "--run-name", "nodes"], tmp_path))
    state = lambda run: torch.load(local / "runs" / run / "checkpoint.pt", weights_only=True)["model"]  # noqa: E731
    a, b = state("one"), state("nodes")
    for key in a:
        x, y = a[key], b[key]
        if key.endswith("attn.in_proj_bias"):  # see test_finetune: the key bias's update is rounding noise
            d = x.numel() // 3
            x, y = torch.cat([x[:d], x[2 * d:]]), torch.cat([y[:d], y[2 * d:]])
        assert torch.allclose(x, y, atol=2e-5, rtol=1e-4), key
    # kill both launchers (and their workers) mid-run, then start them again: it resumes to the same weights
    procs = two_nodes([*common, "--run-name", "killed"], tmp_path)
    history = local / "runs" / "killed" / "history.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (history.exists() and history.read_text().count('"step"') >= 5):
        time.sleep(0.05)
    for p in procs:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    assert not (local / "runs" / "killed" / "metrics.json").exists()
    finish(two_nodes([*common, "--run-name", "killed"], tmp_path))
    c = state("killed")
    for key in b:
        assert torch.equal(b[key], c[key]), key
    steps = [json.loads(x)["step"] for x in history.read_text().splitlines() if json.loads(x)["kind"] == "step"]
    assert steps == list(range(1, len(steps) + 1))
