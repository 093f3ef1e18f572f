"""The store's life cycle: a dataset that gains, loses and fixes videos is added to, masked and retried row by
row, never rebuilt; every change is a snapshot that runs, heads and evaluations record."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import Crash, run_inproc
from test_frames_stage import _dvc, run_cli
from videos import write_video

from pipeline.storage import store

SMALL = ["--cache-frames", "4", "--height", "32", "--width", "32", "--quiet"]
DATA_ARRAYS = ("frames", "frame_index", "timestamp", "source_frames", "box")


def make_videos(root: Path, names: list[str], n_frames: int = 12) -> Path:
    for i, name in enumerate(names):
        write_video(root / f"{name}.mp4", n_frames=n_frames + i % 3, width=48, height=32, seed=hash(name) % 97)
    return root


def write_csv(root: Path, rows: list[tuple[str, str]]) -> None:
    """``videos.csv`` of (name, class) rows (no split column: every row is train)."""
    (root / "videos.csv").write_text("path,label\n" + "".join(f"{n}.mp4,{c}\n" for n, c in rows))


def frames(cache: Path, root: Path, *extra: str) -> str:
    return run_inproc("frames", "-d", "csv", "--root", str(root), "--cache", str(cache), *SMALL, *extra)


def features(cache: Path, tiny: Path, *extra: str) -> str:
    return run_inproc("features", "-d", "csv", "--model", f"local-dir:{tiny}", "--model-key", "tiny", "--cache",
                      str(cache), "--quiet", *extra)


def files(path: Path) -> dict[str, bytes]:
    """Every file of a store, by its path inside it."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def chunk_files(path: Path, names=DATA_ARRAYS) -> dict[str, bytes]:
    return {k: v for k, v in files(path).items() if k.split("/")[0] in names and "/c/" in f"/{k}"}


def column(group: zarr.Group, name: str) -> list:
    return group[name][:].tolist()


@pytest.fixture
def decodes(monkeypatch) -> list[str]:
    """The path of every video the frame stage decodes in this process."""
    from pipeline.storage import framestore

    seen: list[str] = []
    real = framestore.decode_clip

    def counted(path, *args, **kwargs):  # noqa: ANN001, ANN202
        seen.append(os.path.basename(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(framestore, "decode_clip", counted)
    return seen


def test_one_new_video_is_decoded_alone_and_every_stored_byte_stays(tmp_path, decodes):
    root = make_videos(tmp_path / "data", ["v0", "v1", "v2", "v3"])
    write_csv(root, [("v0", "a"), ("v1", "b"), ("v2", "a")])
    cache, fresh = tmp_path / "cache", tmp_path / "fresh"
    frames(cache, root, "--block-size", "2")
    path = cache / "frames" / "csv" / "train"
    before = files(path)
    decodes.clear()
    write_csv(root, [("v0", "a"), ("v1", "b"), ("v2", "a"), ("v3", "c")])  # a new video, of a new class
    out = frames(cache, root, "--block-size", "2")
    assert decodes == ["v3.mp4"], decodes
    assert "1 added, 1 new classes -> snapshot 2" in out
    after = files(path)
    old_chunks = chunk_files(path)
    # the finished blocks' files (all their per-video arrays) are the bytes they were
    for key, data in before.items():
        if key.split("/")[0] in DATA_ARRAYS and "/c/" in f"/{key}":
            assert after[key] == data, key
    assert set(old_chunks) - set(before)  # the new block's files are new files
    g = zarr.open_group(str(path), mode="r")
    # block 1 was short (row 2): row 3 pads it, the new video starts block 2
    assert column(g, "video_id") == ["v0", "v1", "v2", "", "v3"]
    assert column(g, "status") == [store.OK, store.OK, store.OK, store.VOID, store.OK]
    assert column(g, store.ADDED) == [1, 1, 1, 0, 2] and column(g, store.DROPPED) == [0] * 5
    assert list(g.attrs["class_names"]) == ["a", "b", "c"] and column(g, "label") == [0, 1, 0, 0, 2]
    # the new row is what a fresh build of the grown dataset stores for that video
    frames(fresh, root, "--block-size", "2")
    f = zarr.open_group(str(fresh / "frames" / "csv" / "train"), mode="r")
    assert f.attrs["fingerprint"] == g.attrs["fingerprint"]  # the same settings: the same output
    for name in DATA_ARRAYS:
        assert np.array_equal(g[name][4], f[name][3]), name
    from pipeline.learning.clips import usable_rows

    assert usable_rows(g)[0].tolist() == [0, 1, 2, 4]
    assert "0 of 1 outputs damaged" in run_cli("verify", "--cache", str(cache)).stdout  # digests of written rows
    decodes.clear()
    frames(cache, root, "--block-size", "2")  # nothing changed: nothing decoded, no new snapshot
    assert decodes == [] and zarr.open_group(str(path), mode="r").attrs["version"] == 2
    assert files(path) == after


def test_features_encode_only_the_frame_rows_they_lack(tmp_path, decodes, tiny_clip, monkeypatch):
    from pipeline.storage import featurestore

    root = make_videos(tmp_path / "data", [f"v{i}" for i in range(5)])
    write_csv(root, [(f"v{i}", "ab"[i % 2]) for i in range(4)])
    cache, fresh = tmp_path / "cache", tmp_path / "fresh"
    frames(cache, root, "--block-size", "4")
    features(cache, tiny_clip)
    path = cache / "features" / "csv" / "tiny" / "train"
    before = files(path)
    write_csv(root, [(f"v{i}", "ab"[i % 2]) for i in range(5)])
    frames(cache, root, "--block-size", "4")
    encoded: list[int] = []
    real = featurestore.encode_stored
    monkeypatch.setattr(featurestore, "encode_stored",
                        lambda stored, *a, **k: encoded.append(len(stored)) or real(stored, *a, **k))
    out = run_inproc("features", "-d", "csv", "--model", f"local-dir:{tiny_clip}", "--model-key", "tiny", "--cache",
                     str(cache))
    assert encoded == [4], encoded  # one video's 4 stored frames
    assert "features csv/train: 1 added -> snapshot 2" in out
    after = files(path)
    assert after["features/c/0/0/0"] == before["features/c/0/0/0"]  # block 0, untouched
    g = zarr.open_group(str(path), mode="r")
    assert column(g, "video_id") == [f"v{i}" for i in range(5)] and g.attrs["version"] == 2
    frames(fresh, root, "--block-size", "4")
    features(fresh, tiny_clip)
    f = zarr.open_group(str(fresh / "features" / "csv" / "tiny" / "train"), mode="r")
    assert np.array_equal(g["features"][:], f["features"][:])  # old rows and the new one: a fresh build's
    assert f.attrs["fingerprint"] == g.attrs["fingerprint"]
    encoded.clear()
    features(cache, tiny_clip)
    assert encoded == [] and files(path) == after  # a re-run: nothing to encode


def test_a_dropped_video_is_never_read_and_compact_removes_it(tmp_path, tiny_clip):
    import pipeline
    from pipeline.learning.clips import usable_rows

    root = make_videos(tmp_path / "data", [f"v{i}" for i in range(6)])
    rows = [(f"v{i}", "ab"[i % 2]) for i in range(6)]
    write_csv(root, rows)
    cache = tmp_path / "cache"
    frames(cache, root, "--block-size", "2")
    features(cache, tiny_clip)
    m = ["--model", f"local-dir:{tiny_clip}", "--model-key", "tiny", "--cache", str(cache)]
    run_inproc("heads", "-d", "csv", *m, "--head", "prototype", "--per-class", "3")
    first = json.loads(run_inproc("evaluate", "-d", "csv", *m, "--head", "prototype", "--split", "train", "--json"))
    write_csv(root, [r for r in rows if r[0] != "v1"])
    out = frames(cache, root, "--block-size", "2")
    assert "1 dropped -> snapshot 2" in out and "5 videos, 5 ok, 0 failed, 1 dropped" in out
    features(cache, tiny_clip)
    fpath, epath = cache / "frames" / "csv" / "train", cache / "features" / "csv" / "tiny" / "train"
    for path in (fpath, epath):
        g = zarr.open_group(str(path), mode="r")
        assert column(g, store.DROPPED) == [0, 2, 0, 0, 0, 0]
        assert usable_rows(g)[0].tolist() == [0, 2, 3, 4, 5]
        assert usable_rows(g, snapshot=1)[0].tolist() == [0, 1, 2, 3, 4, 5]
    api = pipeline.open_features(epath)
    assert "v1" not in api.table()["video_id"].tolist() and api.video_features()[2].tolist() == [0, 2, 3, 4, 5]
    assert "v1" in api.table(dropped=True)["video_id"].tolist()
    run_inproc("export", "--what", "features", "-d", "csv", "--split", "train", *m, "--out", str(tmp_path / "f.npz"))
    with np.load(tmp_path / "f.npz") as z:
        assert "v1" not in z["video_id"].tolist() and z["row"].tolist() == [0, 2, 3, 4, 5]
        assert int(z["attr_snapshot"]) == 2
    status = {e["name"]: e for e in json.loads(run_cli("status", "--json", "--cache", str(cache)).stdout)}
    assert (status["csv/train"]["total"], status["csv/train"]["dropped"]) == (5, 1)
    assert "older snapshot" not in json.dumps(status["csv/tiny/train"])
    head = status["csv/tiny/prototype"]
    assert "made from an older snapshot (features: snapshot 1, now 2)" in head["older_snapshot"]
    # the old number, reproduced; the head of snapshot 1 made again first (a later one would sample otherwise)
    again = json.loads(run_inproc("evaluate", "-d", "csv", *m, "--head", "prototype", "--split", "train", "--json",
                                  "--snapshot", "1"))
    assert again["full"] == first["full"] and again["snapshots"]["features"]["train"]["version"] == 1
    # the head follows the new snapshot without --replace-mismatched
    run_inproc("heads", "-d", "csv", *m, "--head", "prototype", "--per-class", "3")
    hg = zarr.open_group(str(cache / "heads" / "csv" / "tiny" / "prototype"), mode="r")
    assert hg.attrs["inputs"]["features"]["version"] == 2 and "v1" not in column(hg, "sample_video_id")
    now = json.loads(run_inproc("evaluate", "-d", "csv", *m, "--head", "prototype", "--split", "train", "--json"))
    kept = features_of(epath)
    out = run_inproc("compact", "-d", "csv", "--cache", str(cache))
    assert "1 dropped videos removed, 5 kept -> snapshot 3" in out
    for path in (fpath, epath):
        g = zarr.open_group(str(path), mode="r")
        assert column(g, "video_id") == ["v0", "v2", "v3", "v4", "v5"] and column(g, store.DROPPED) == [0] * 5
        assert g.attrs["snapshots"][-1]["hash"] == g.attrs["snapshots"][-2]["hash"]  # the same live videos
    assert np.array_equal(features_of(epath), kept[[0, 2, 3, 4, 5]])
    assert "0 of 3 outputs damaged" in run_cli("verify", "--cache", str(cache), "-q").stdout  # frames, features, head
    assert not [p for p in fpath.parent.iterdir() if p.name.startswith(".train.") and p.name != ".train.lock"]
    # compacted rows are another output: what was made from the old rows is stale, and says so
    proc = run_cli("evaluate", "-d", "csv", *m, "--head", "prototype", "--split", "train", check=False)
    assert proc.returncode == 2 and "stale" in proc.stderr and "pipeline heads" in proc.stderr
    run_inproc("heads", "-d", "csv", *m, "--head", "prototype", "--per-class", "3", "--replace-mismatched")
    compacted = json.loads(run_inproc("evaluate", "-d", "csv", *m, "--head", "prototype", "--split", "train",
                                      "--json"))
    assert compacted["full"] == now["full"]
    proc = run_cli("evaluate", "-d", "csv", *m, "--head", "prototype", "--split", "train", "--snapshot", "1",
                   check=False)
    assert proc.returncode == 2 and "has snapshots 2 to 3; not 1 (`pipeline compact` removed" in proc.stderr
    assert "5 videos, 5 ok, 0 failed ->" in frames(cache, root, "--block-size", "2")  # matches: nothing redone
    assert "features csv/train: 5 videos" in run_inproc(
        "features", "-d", "csv", "--model", f"local-dir:{tiny_clip}", "--model-key", "tiny", "--cache", str(cache))


def features_of(path: Path) -> np.ndarray:
    return zarr.open_group(str(path), mode="r")["features"][:]


def test_a_changed_file_is_redone_alone_and_a_touched_one_is_not(tmp_path, decodes, tiny_clip, monkeypatch):
    from pipeline.storage import featurestore

    root = make_videos(tmp_path / "data", ["v0", "v1", "v2"])
    write_csv(root, [("v0", "a"), ("v1", "b"), ("v2", "a")])
    cache = tmp_path / "cache"
    frames(cache, root, "--block-size", "2")
    features(cache, tiny_clip)
    feature_path = cache / "features" / "csv" / "tiny" / "train"
    features_before = files(feature_path)
    path = cache / "frames" / "csv" / "train"
    before = chunk_files(path)
    old = zarr.open_group(str(path), mode="r")["frames"][1]
    # other bytes under the same path: that row is dropped and its video appended again
    write_video(root / "v1.mp4", n_frames=30, width=48, height=32, seed=5)
    decodes.clear()
    out = frames(cache, root, "--block-size", "2")
    assert decodes == ["v1.mp4"] and "1 redone -> snapshot 2" in out
    g = zarr.open_group(str(path), mode="r")
    assert column(g, "video_id") == ["v0", "v1", "v2", "", "v1"] and column(g, store.DROPPED) == [0, 2, 0, 0, 0]
    assert not np.array_equal(g["frames"][4], old) and np.array_equal(g["frames"][1], old)
    assert all(chunk_files(path)[k] == v for k, v in before.items())
    # downstream, only the redone row is encoded: the old one leaves the live rows, the other rows stay
    encoded: list[int] = []
    real = featurestore.encode_stored
    monkeypatch.setattr(featurestore, "encode_stored",
                        lambda stored, *a, **k: encoded.append(len(stored)) or real(stored, *a, **k))
    features(cache, tiny_clip)
    f = zarr.open_group(str(feature_path), mode="r")
    assert encoded == [4] and column(f, "video_id") == column(g, "video_id")
    assert column(f, store.DROPPED) == [0, 2, 0, 0, 0]
    assert files(feature_path)["features/c/0/0/0"] == features_before["features/c/0/0/0"]
    # the same bytes with a new mtime (a copy, a regenerated world): hashed, not decoded; no new snapshot
    stamp = time.time_ns() + 10**9
    os.utime(root / "v0.mp4", ns=(stamp, stamp))
    decodes.clear()
    frames(cache, root, "--block-size", "2")
    g = zarr.open_group(str(path), mode="r")
    assert decodes == [] and g.attrs["version"] == 2 and g["file_mtime_ns"][0] == stamp
    # the same size, other bytes and a new mtime: the hash tells, and the row is redone
    data = bytearray((root / "v2.mp4").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (root / "v2.mp4").write_bytes(bytes(data))
    decodes.clear()
    assert "1 redone -> snapshot 3" in frames(cache, root, "--block-size", "2")
    assert decodes == ["v2.mp4"]


def test_a_failed_video_is_retried_when_its_file_changes_or_on_request(tmp_path, decodes):
    root = make_videos(tmp_path / "data", ["v0"])
    (root / "v1.mp4").write_text("not a video\n" * 10)
    write_csv(root, [("v0", "a"), ("v1", "a"), ("v2", "b")])  # v2: no file
    cache = tmp_path / "cache"
    out = frames(cache, root, "--block-size", "2")
    assert "3 videos, 1 ok, 2 failed" in out
    decodes.clear()
    out = frames(cache, root, "--block-size", "2", "--retry-failed")  # a fixed decoder, say: tried again
    assert decodes == ["v1.mp4"] and "2 retried -> snapshot 2" in out and "3 videos, 1 ok, 2 failed" in out
    make_videos(root, ["v1"])  # the broken file replaced by a good one
    decodes.clear()
    out = frames(cache, root, "--block-size", "2")
    assert decodes == ["v1.mp4"] and "1 retried -> snapshot 3" in out and "3 videos, 2 ok, 1 failed" in out
    make_videos(root, ["v2"])  # the missing file appears
    decodes.clear()
    out = frames(cache, root, "--block-size", "2")
    assert decodes == ["v2.mp4"] and "3 videos, 3 ok, 0 failed" in out
    g = zarr.open_group(str(cache / "frames" / "csv" / "train"), mode="r")
    live = store.live_mask(g)
    assert sorted(np.asarray(column(g, "video_id"))[live].tolist()) == ["v0", "v1", "v2"]
    assert (g["status"][:][live] == store.OK).all()


@pytest.mark.slow
def test_a_run_resumed_after_its_dataset_grew_is_bit_exact_and_a_new_run_takes_the_new_snapshot(tmp_path,
                                                                                                tiny_clip,
                                                                                                monkeypatch):
    import torch

    from pipeline.media.world import WorldSpec, generate_world
    from stages import runs

    world = tmp_path / "world"
    generate_world(world, WorldSpec(colours=("red", "green"), shapes=("disc", "ring"), sizes=("small",),
                                    train_per_class=5, val_per_class=2, frames=8, size=32, seed=1))
    cache = tmp_path / "cache"
    m = ["--model", f"local-dir:{tiny_clip}", "--model-key", "tiny", "--cache", str(cache)]
    run_inproc("extract", "--format", "csv", "--root", str(world), "--dataset", "w", *SMALL, "--block-size", "4",
               *m[:-2], "--model-key", "tiny", "--cache", str(cache))
    run_inproc("heads", "-d", "w", *m, "--head", "clip-text")
    train = ["finetune", "-d", "w", *m, "--frames", "2", "--global-batch-size", "8", "--epochs", "1", "--lr", "1e-3",
             "--warmup-epochs", "0", "--grayscale", "0", "--randaugment", "0", "0", "--checkpoint-every", "1",
             "--workers", "0", "-q"]
    run_inproc(*train, "--run-name", "whole")
    real = runs.Reporter.__call__

    def crash(self, kind, values):  # noqa: ANN001, ANN202
        real(self, kind, values)
        if kind == "step" and values["step"] == 2:
            raise Crash

    monkeypatch.setattr(runs.Reporter, "__call__", crash)
    with pytest.raises(AssertionError, match="Crash"):
        run_inproc(*train, "--run-name", "killed")
    monkeypatch.setattr(runs.Reporter, "__call__", real)
    # the dataset grows while the run is down: a new training clip
    csv = (world / "videos.csv").read_text()
    first = csv.splitlines()[1].split(",")
    shutil.copyfile(world / first[0], world / "videos" / "extra.mp4")
    (world / "videos.csv").write_text(csv + f"videos/extra.mp4,{first[1]},train\n")
    assert "1 added -> snapshot 2" in run_inproc("frames", "--format", "csv", "--root", str(world), "--dataset", "w",
                                                 *SMALL, "--block-size", "4", "--cache", str(cache))
    run_inproc(*train, "--run-name", "killed")  # resumed: the snapshot it started with
    a = torch.load(cache / "runs" / "whole" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(cache / "runs" / "killed" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    info = json.loads((cache / "runs" / "killed" / "run.json").read_text())
    assert info["snapshots"]["train"]["version"] == 1 and info["snapshot"] == {"train": 1, "val": 1}
    run_inproc(*train, "--run-name", "new")
    new = json.loads((cache / "runs" / "new" / "run.json").read_text())
    assert new["snapshots"]["train"]["version"] == 2
    steps = [json.loads(x) for x in (cache / "runs" / "new" / "history.jsonl").read_text().splitlines()]
    assert max(s["step"] for s in steps) == 3  # 21 training clips, batches of 8 (20 before: 3 steps too)
    status = {e["name"]: e for e in json.loads(run_cli("status", "--json", "--cache", str(cache)).stdout)}
    assert "trained on an older snapshot (train: snapshot 1, now 2)" in status["whole"]["older_snapshot"]
    assert status["new"].get("older_snapshot") is None
    # the finished run is not silently kept on its old data: another snapshot is a change, named
    proc = run_cli(*train, "--run-name", "whole", check=False)
    assert proc.returncode == 2 and "snapshot.train (its training store has another snapshot" in proc.stderr


# Decoding waits for a gate file: the appender holds its lock until the test opens the gate, however
# long a loaded machine takes to start the second command (a fixed 1 s per clip was a race).
SLOW_DECODE = """
import os, sys, time
from pipeline.storage import framestore
from pipeline.cli import main
real = framestore.decode_clip
def slow(*args, **kwargs):
    deadline = time.monotonic() + 120
    while not os.path.exists(os.environ["DECODE_GATE"]) and time.monotonic() < deadline:
        time.sleep(0.02)
    return real(*args, **kwargs)
framestore.decode_clip = slow
sys.argv = ["pipeline", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
def test_two_appenders_at_once_one_is_refused_and_nothing_is_lost(tmp_path):
    root = make_videos(tmp_path / "data", [f"v{i}" for i in range(6)])
    write_csv(root, [("v0", "a"), ("v1", "b")])
    cache = tmp_path / "cache"
    args = ["frames", "-d", "csv", "--root", str(root), "--cache", str(cache), *SMALL, "--block-size", "2"]
    run_cli(*args)
    write_csv(root, [(f"v{i}", "ab"[i % 2]) for i in range(5)])
    gate = tmp_path / "gate"
    first = subprocess.Popen([sys.executable, "-c", SLOW_DECODE, *args], cwd=Path(__file__).parent,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "DECODE_GATE": str(gate)})
    lock = store.lock_path(cache / "frames" / "csv" / "train")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (lock.exists() and lock.read_text() == str(first.pid)):
        time.sleep(0.02)
    write_csv(root, [(f"v{i}", "ab"[i % 2]) for i in range(6)])  # a sixth video meanwhile
    second = run_cli(*args, check=False)
    assert second.returncode == 2 and f"being written by another process (pid {first.pid})" in second.stderr
    gate.touch()
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert "3 added -> snapshot 2" in out
    assert "1 added -> snapshot 3" in run_cli(*args).stdout  # the refused one, run again: its video comes in
    g = zarr.open_group(str(cache / "frames" / "csv" / "train"), mode="r")
    live = store.live_mask(g)
    ids = np.asarray(column(g, "video_id"))[live].tolist()
    assert sorted(ids) == [f"v{i}" for i in range(6)] and (g["status"][:][live] == store.OK).all()


KILL_AT = """
import os, signal, sys
import zarr
from pipeline.storage import store
from pipeline.cli import main
point = sys.argv[1]
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
if point == "resize":
    zarr.Array.resize = die
else:
    setattr(store, point, die)
sys.argv = ["pipeline", *sys.argv[2:]]
main()
"""


@pytest.mark.slow
def test_a_sigkill_anywhere_in_an_append_reruns_to_the_same_bytes(tmp_path):
    root = make_videos(tmp_path / "data", [f"v{i}" for i in range(7)])
    write_csv(root, [(f"v{i}", "ab"[i % 2]) for i in range(3)])
    base = tmp_path / "base"
    args = ["frames", "-d", "csv", "--root", str(root), *SMALL, "--block-size", "2"]
    run_cli(*args, "--cache", str(base))
    write_csv(root, [(f"v{i}", "ab"[i % 2]) for i in range(7) if i != 1])  # 4 added, 1 dropped
    clean = tmp_path / "clean"
    shutil.copytree(base, clean)
    run_cli(*args, "--cache", str(clean))
    expected = files(clean / "frames" / "csv" / "train")
    # killed: after the journal is written (first resize), after the columns and drop marks (before their
    # digests), before the commit (the snapshot's hash), and while the new blocks are decoded
    for point in ("resize", "_refresh_digests", "snapshot_hash", "decode"):
        killed = tmp_path / point
        shutil.copytree(base, killed)
        path = killed / "frames" / "csv" / "train"
        if point == "decode":
            from conftest import sigkill_mid_run

            sigkill_mid_run([*args, "--cache", str(killed)], path, tmp_path)
        else:
            proc = subprocess.run([sys.executable, "-c", KILL_AT, point, *args, "--cache", str(killed)],
                                  cwd=tmp_path, capture_output=True, text=True)
            assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
            assert zarr.open_group(str(path), mode="r").attrs["change"], point  # the change is in progress
            refused = run_cli("export", "--what", "frames", "-d", "csv", "--split", "train", "--cache", str(killed),
                              "--out", str(tmp_path / "x.npz"), check=False)
            assert refused.returncode == 2 and "was being changed" in refused.stderr, point
            status = json.loads(run_cli("status", "--json", "--cache", str(killed)).stdout)[0]
            assert "interrupted" in status["interrupted"], point
        out = run_cli(*args, "--cache", str(killed)).stdout
        assert "6 videos, 6 ok" in out, (point, out)
        assert files(path) == expected, point


def test_labels_embed_only_new_class_names_and_a_clip_text_head_follows(tmp_path, tiny_clip, monkeypatch):
    from stages import labels

    root = make_videos(tmp_path / "data", ["v0", "v1", "v2"])
    write_csv(root, [("v0", "a"), ("v1", "b")])
    cache = tmp_path / "cache"
    m = ["--model", f"local-dir:{tiny_clip}", "--model-key", "tiny", "--cache", str(cache)]
    frames(cache, root)
    features(cache, tiny_clip)
    run_inproc("labels", "-d", "csv", *m)
    run_inproc("heads", "-d", "csv", *m, "--head", "clip-text")
    before = json.loads(run_inproc("evaluate", "-d", "csv", *m, "--head", "clip-text", "--split", "train", "--json"))
    lpath = cache / "labels" / "csv" / "clip-tiny"
    old = zarr.open_group(str(lpath), mode="r")["embeddings"][:]
    old_chunk = (lpath / "embeddings" / "c" / "0" / "0").read_bytes()
    write_csv(root, [("v0", "a"), ("v1", "b"), ("v2", "new class")])
    frames(cache, root)
    features(cache, tiny_clip)
    status = {e["name"]: e for e in json.loads(run_cli("status", "--json", "--cache", str(cache)).stdout)}
    assert "embeds 2 of the 3 classes csv has now" in status["csv/clip-tiny"]["older_snapshot"]
    proc = run_cli("heads", "-d", "csv", *m, "--head", "clip-text", check=False)
    assert proc.returncode == 2 and "cover 2 of its 3 classes" in proc.stderr and "pipeline labels" in proc.stderr
    embedded: list[list[str]] = []
    real = labels.encode_with_clip
    monkeypatch.setattr(labels, "encode_with_clip", lambda clip, names, *a: embedded.append(list(names)) or real(
        clip, names, *a))
    run_inproc("labels", "-d", "csv", *m)
    assert embedded == [["new class"]]
    g = zarr.open_group(str(lpath), mode="r")
    assert np.array_equal(g["embeddings"][:2], old)
    assert (lpath / "embeddings" / "c" / "0" / "0").read_bytes() == old_chunk  # the old rows' chunk, not rewritten
    assert list(g.attrs["class_names"]) == ["a", "b", "new class"] and g.attrs["version"] == 2
    fresh = tmp_path / "fresh"
    shutil.copytree(cache / "frames", fresh / "frames")
    monkeypatch.setattr(labels, "encode_with_clip", real)
    run_inproc("labels", "-d", "csv", *m[:-1], str(fresh))
    assert np.allclose(zarr.open_group(str(fresh / "labels" / "csv" / "clip-tiny"), mode="r")["embeddings"][2],
                       g["embeddings"][2], atol=1e-6)
    run_inproc("heads", "-d", "csv", *m, "--head", "clip-text")  # the head of more classes, without asking
    hg = zarr.open_group(str(cache / "heads" / "csv" / "tiny" / "clip-text"), mode="r")
    assert hg["head"].shape[0] == 3 and hg.attrs["inputs"]["labels"]["classes"] == 3
    again = json.loads(run_inproc("evaluate", "-d", "csv", *m, "--head", "clip-text", "--split", "train", "--json",
                                  "--snapshot", "1"))
    assert again["full"] == before["full"]  # snapshot 1: its videos, its two classes' rows of the head


def test_a_store_of_the_previous_format_is_read_and_refused_for_writing_in_one_line(tmp_path):
    root = make_videos(tmp_path / "data", ["v0", "v1"])
    write_csv(root, [("v0", "a"), ("v1", "b")])
    cache = tmp_path / "cache"
    frames(cache, root)
    path = cache / "frames" / "csv" / "train"
    g = zarr.open_group(str(path), mode="r+")  # what format 2 wrote: no life cycle, another fingerprint
    for name in (store.ADDED, store.DROPPED, "file_size", "file_mtime_ns", "file_sha256"):
        shutil.rmtree(path / name)
    attrs = {k: v for k, v in g.attrs.items() if k not in ("version", "snapshots", "oldest_snapshot", "change")}
    attrs.update(format_version=2, fingerprint="0" * 64,
                 arrays=[a for a in attrs["arrays"] if a in {p.name for p in path.iterdir()}])
    g.attrs.put(attrs)
    import pipeline

    frames_api = pipeline.open_frames(path)
    assert frames_api.live_rows().tolist() == [0, 1] and frames_api.snapshot["version"] == 0
    proc = run_cli("frames", "-d", "csv", "--root", str(root), "--cache", str(cache), *SMALL, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr
    assert "made by an older version of the pipeline (store format 2" in errors[0]
    assert "--replace-mismatched" in proc.stderr
    run_cli("frames", "-d", "csv", "--root", str(root), "--cache", str(cache), *SMALL, "--replace-mismatched")
    assert zarr.open_group(str(path), mode="r").attrs["format_version"] == store.FORMAT_VERSION


@pytest.mark.slow
def test_dvc_repro_after_a_new_video_decodes_it_alone(tmp_path, template):
    """A DVC stage (persist: true) re-run after its dataset grew: the new video only."""
    import yaml

    root = Path(__file__).parents[1]
    repo = tmp_path / "repo"
    for name in ("pipeline", "stages"):
        shutil.copytree(root / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    profiles = repo / "data" / "profiles"
    shutil.copytree(root / "data" / "profiles", profiles, ignore=shutil.ignore_patterns("cache", "tmp"))
    videos = tmp_path / "videos"  # train/ and val/ folders: no held-out draw (it moves with the class size)
    make_videos(videos / "train" / "jump", ["j0", "j1"])
    make_videos(videos / "train" / "run", ["r0", "r1"])
    make_videos(videos / "val" / "jump", ["j2"])
    make_videos(videos / "val" / "run", ["r3"])
    datasets = yaml.safe_load((profiles / "datasets.yaml").read_text())
    datasets["datasets"]["custom"]["root"] = str(videos)
    (profiles / "datasets.yaml").write_text(yaml.safe_dump(datasets))
    custom = yaml.safe_load((profiles / "custom.yaml").read_text())
    custom["frames"].update(cache_frames=2, height=16, width=24, workers=1, block_size=2)
    custom["data"].pop("val_fraction")
    (profiles / "custom.yaml").write_text(yaml.safe_dump(custom))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    proc = _dvc("repro", "frames@custom", cwd=profiles)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    path = profiles / "cache" / "frames" / "custom" / "train"
    before = chunk_files(path)
    make_videos(videos / "train" / "run", ["r2"])
    proc = _dvc("repro", "frames@custom", cwd=profiles)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    g = zarr.open_group(str(path), mode="r")
    assert g.attrs["version"] == 2 and g.attrs["snapshots"][-1]["added"] == 1
    assert column(g, "video_id")[-1] == "train/run/r2" and column(g, store.ADDED) == [1, 1, 1, 1, 2]
    assert all(chunk_files(path)[k] == v for k, v in before.items())
    assert zarr.open_group(str(path.parent / "val"), mode="r").attrs["version"] == 1  # val did not change


KILL_SWAP = """
import os, signal, sys
from pipeline.storage import store
from pipeline.cli import main
real, calls, at = store.swap_in, [], int(sys.argv[1])
def swap(*args):
    calls.append(args)
    if len(calls) == at:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args)
store.swap_in = swap
sys.argv = ["pipeline", *sys.argv[2:]]
main()
"""


@pytest.mark.slow
def test_a_compaction_killed_between_its_swaps_is_finished_by_the_next(tmp_path, tiny_clip):
    root = make_videos(tmp_path / "data", [f"v{i}" for i in range(5)])
    write_csv(root, [(f"v{i}", "ab"[i % 2]) for i in range(5)])
    base = tmp_path / "base"
    frames(base, root, "--block-size", "2")
    features(base, tiny_clip)
    write_csv(root, [(f"v{i}", "ab"[i % 2]) for i in range(5) if i != 2])
    frames(base, root, "--block-size", "2")
    features(base, tiny_clip)
    clean = tmp_path / "clean"
    shutil.copytree(base, clean)
    run_cli("compact", "-d", "csv", "--cache", str(clean))
    stores = [Path("frames") / "csv" / "train", Path("features") / "csv" / "tiny" / "train"]
    expected = {str(s): files(clean / s) for s in stores}
    for call in (1, 2):  # before the frame store is swapped in; after it, before its features are
        killed = tmp_path / f"killed{call}"
        shutil.copytree(base, killed)
        proc = subprocess.run([sys.executable, "-c", KILL_SWAP, str(call), "compact", "-d", "csv", "--cache",
                               str(killed)], cwd=tmp_path, capture_output=True, text=True)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        run_cli("compact", "-d", "csv", "--cache", str(killed))
        for s in stores:
            assert files(killed / s) == expected[str(s)], (call, s)
        assert sorted(p.name for p in (killed / stores[0]).parent.iterdir()) == [".train.lock", "train"]
