"""The cache on object storage: a real S3-compatible server (moto's server mode) on 127.0.0.1.

frames -> features -> labels -> heads -> evaluate with ``--cache s3://bucket/cache`` give the arrays
and numbers of a local cache; a SIGKILLed run resumes to the same store once its lease expires; a
second writer is refused; an unknown URL scheme is a one-line error.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import WORLD
from test_frames_stage import run_cli

from pipeline.media.world import generate_world
from pipeline.storage import store

pytestmark = pytest.mark.slow  # end to end, minutes: `make test` runs it, `make test-fast` does not

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

LEASE = "2"  # seconds: a killed writer's lease expires quickly in these tests


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on a free loopback port, with one bucket; the environment that reaches it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "PIPELINE_LEASE_SECONDS": LEASE}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("bucket")
    yield env
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def same(x: np.ndarray, y: np.ndarray) -> bool:
    if x.dtype.kind == "f":
        return np.array_equal(x, y, equal_nan=True)
    return x.tolist() == y.tolist()


def cli(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    return run_cli(*args, cwd=cwd, check=check)


def pipeline_steps(world: Path, tiny: Path) -> list[list[str]]:
    m = ["--model", f"local-dir:{tiny}"]
    return [["frames", "--format", "csv", "--root", str(world), "--dataset", "toy", "--cache-frames", "2",
            "--height", "32",
             "--width", "32", "--block-size", "4", "--quiet"],
            ["features", "-d", "toy", *m, "--model-key", "tiny-clip", "--quiet"],
            ["labels", "-d", "toy", *m],
            ["heads", "-d", "toy", *m, "--head", "clip-text"],
            ["heads", "-d", "toy", *m, "--head", "prototype", "--per-class", "3"]]


def test_the_whole_feature_store_on_s3_matches_a_local_cache(tmp_path, tiny_clip, s3):
    generate_world(tmp_path / "world", WORLD)
    local, remote = str(tmp_path / "local"), "s3://bucket/run1/cache"
    for step in pipeline_steps(tmp_path / "world", tiny_clip):
        cli(*step, "--cache", local, cwd=tmp_path)
        cli(*step, "--cache", remote, cwd=tmp_path)
    for rel in ("frames/toy/train", "frames/toy/val", "features/toy/tiny-clip/train", "features/toy/tiny-clip/val",
                "labels/toy/clip-tiny-clip", "heads/toy/tiny-clip/clip-text", "heads/toy/tiny-clip/prototype"):
        a = zarr.open_group(f"{local}/{rel}", mode="r")
        b = zarr.open_group(f"{remote}/{rel}", mode="r")
        assert a.attrs["fingerprint"] == b.attrs["fingerprint"], rel
        for name in sorted(a.array_keys()):
            assert same(a[name][:], b[name][:]), (rel, name)
    scores = []
    for cache in (local, remote):
        out = cli("evaluate", "-d", "toy", "--model", f"local-dir:{tiny_clip}", "--head", "prototype", "--json",
                  "--cache", cache, cwd=tmp_path).stdout
        scores.append(json.loads(out[out.index("{"):])["full"])
    assert scores[0] == scores[1]
    # a run (checkpoint, run.json, history, metrics) and the PNGs of plot-heads live there too
    train = ["finetune", "--frozen-backbone", "-d", "toy", "--model", f"local-dir:{tiny_clip}", "--head", "clip-text",
             "--temporal", "ttrans", "--layers", "1", "--frames", "2", "--epochs", "2", "--global-batch-size", "16",
             "--checkpoint-every", "2", "--run-name", "r", "-q"]
    for cache in (local, remote):
        cli(*train, "--cache", cache, cwd=tmp_path)
    import torch
    from upath import UPath

    with open(f"{local}/runs/r/checkpoint.pt", "rb") as f, UPath(f"{remote}/runs/r/checkpoint.pt").open("rb") as g:
        a, b = torch.load(f, weights_only=True)["model"], torch.load(g, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(UPath(f"{remote}/runs/r/history.jsonl").read_text().splitlines()) == len(
        Path(f"{local}/runs/r/history.jsonl").read_text().splitlines())
    outs = [cli("evaluate", "--run-name", "r", "--json", "--cache", cache, cwd=tmp_path).stdout
            for cache in (local, remote)]
    evals = [json.loads(out[out.index("{"):]) for out in outs]
    # the snapshots read: the same (number and hash), of stores at their own places (a path, an s3:// URL)
    where = [e.pop("snapshots") for e in evals]
    assert where[1]["evaluated"]["val"]["path"].startswith("s3://")
    assert [{k: v for k, v in w["evaluated"]["val"].items() if k != "path"} for w in where] == [
        {"version": 1, "hash": where[0]["evaluated"]["val"]["hash"]}] * 2
    assert evals[0] == evals[1]
    cli("plot-heads", "-d", "toy", "--model", f"local-dir:{tiny_clip}", "--cache", remote, cwd=tmp_path)
    png = UPath(f"{remote}/plots/toy/head-correlation-clip-text.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    status = json.loads(cli("status", "--json", "--cache", remote, cwd=tmp_path).stdout)
    assert {e["stage"] for e in status} == {"frames", "features", "labels", "heads", "run"}
    stores = [e for e in status if e["stage"] != "run"]
    assert all(e["complete"] and not e.get("damaged") and not e.get("stale") for e in stores)
    assert [(e["name"], e["state"], e["kind"]) for e in status if e["stage"] == "run"] == [("r", "complete",
                                                                                            "clip-text")]
    assert cli("verify", "--cache", remote, cwd=tmp_path).returncode == 0


def test_a_killed_writer_on_s3_resumes_after_its_lease_and_a_second_writer_is_refused(tmp_path, s3):
    import s3fs

    generate_world(tmp_path / "world", WORLD)
    frames = pipeline_steps(tmp_path / "world", Path("unused"))[0]
    frames = [a if a != "4" else "2" for a in frames]  # blocks of 2: more of them to kill in between
    local, remote = str(tmp_path / "local"), "s3://bucket/run2/cache"
    cli(*frames, "--cache", local, cwd=tmp_path)
    fs = s3fs.S3FileSystem()

    def marked() -> bool:  # every chunk is written (zeros too): wait for a set marker
        fs.invalidate_cache()
        try:
            return bool(zarr.open_group(f"{remote}/frames/toy/train", mode="r")["block_done"][:].any())
        except Exception:  # noqa: BLE001 - not created yet
            return False

    # this writer's lease outlasts a loaded machine's start-up of the next command (a 2 s one did not, in CI)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *frames, "--cache", remote], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PIPELINE_LEASE_SECONDS": "20"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not marked():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    group = zarr.open_group(f"{remote}/frames/toy/train", mode="r")
    done = group["block_done"][:]
    assert 0 < done.sum() < done.size, "the kill should land mid-run"
    # the killed writer's lease is still valid: a new writer waits for it to expire
    refused = cli(*frames, "--cache", remote, cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "being written by another process" in refused.stderr
    lease = store.lock_path(f"{remote}/frames/toy/train")
    expires = json.loads(lease.fs.cat_file(lease.path))["expires"]
    time.sleep(max(0.0, expires - time.time()) + 0.5)  # the killed writer's last renewal runs out
    cli(*frames, "--cache", remote, cwd=tmp_path)
    a = zarr.open_group(f"{local}/frames/toy/train", mode="r")
    b = zarr.open_group(f"{remote}/frames/toy/train", mode="r")
    for name in sorted(a.array_keys()):
        assert same(a[name][:], b[name][:]), name
    # a live writer (its lease renewed) keeps a second one out
    store_url = remote + "/frames/toy/train"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from pipeline.storage import store\n"
        f"with store.writer_lock({store_url!r}):\n    print('locked', flush=True); time.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert holder.stdout.readline().strip() == "locked"
        time.sleep(float(LEASE) + 0.5)  # past one lease period: renewal keeps it held
        refused = cli(*frames, "--cache", remote, cwd=tmp_path, check=False)
        assert refused.returncode == 2 and "being written by another process" in refused.stderr
    finally:
        holder.kill()
        holder.wait()


def test_a_store_on_s3_grows_and_shrinks_as_a_local_one(tmp_path, s3):
    """An append (and a drop) on object storage, under its lease: the new videos only, the rows of a local cache."""
    from pipeline.media.world import WorldSpec

    world = tmp_path / "world"
    generate_world(world, WorldSpec(colours=("red", "green"), shapes=("disc",), sizes=("small",), train_per_class=4,
                                    val_per_class=1, frames=8, size=32, seed=3))
    frames = [a if a != "4" else "2" for a in pipeline_steps(world, Path("unused"))[0]]
    csv = (world / "videos.csv").read_text().splitlines()
    train = [i for i, line in enumerate(csv) if line.endswith(",train")]
    # first: all but the last two training clips; then those two come, and the first one leaves
    (world / "videos.csv").write_text("\n".join(x for i, x in enumerate(csv) if i not in train[-2:]) + "\n")
    local, remote = str(tmp_path / "local"), "s3://bucket/grow/cache"
    for cache in (local, remote):
        cli(*frames, "--cache", cache, cwd=tmp_path)
    (world / "videos.csv").write_text("\n".join(x for i, x in enumerate(csv) if i != train[0]) + "\n")
    for cache in (local, remote):
        out = cli(*frames, "--cache", cache, cwd=tmp_path).stdout
        assert "frames toy/train: 2 added, 1 dropped -> snapshot 2" in out, out
    a = zarr.open_group(f"{local}/frames/toy/train", mode="r")
    b = zarr.open_group(f"{remote}/frames/toy/train", mode="r")
    assert b.attrs["version"] == 2 and b.attrs["snapshots"] == a.attrs["snapshots"]
    for name in sorted(a.array_keys()):
        assert same(a[name][:], b[name][:]), name
    assert not b.attrs.get("change") and cli("verify", "--cache", remote, cwd=tmp_path).returncode == 0


def test_an_unknown_url_scheme_is_one_error_line(tmp_path):
    proc = cli("status", "--cache", "nosuch://bucket/cache", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "storage 'nosuch' is unknown" in proc.stderr and not (tmp_path / "nosuch:").exists()
