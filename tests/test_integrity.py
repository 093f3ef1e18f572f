"""No silent wrong numbers: fault injection for locks, stale inputs, damaged chunks and path escapes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import zarr
from conftest import run_inproc
from test_frames_stage import SMALL, run_cli

from pipeline.core.errors import DamagedStore, PipelineError, StoreLocked
from pipeline.storage import store
from pipeline.storage.framestore import read_frames


@pytest.fixture
def cache(tmp_path, extracted) -> tuple[Path, Path]:
    """A private copy of the session's extracted cache (frames, features, labels of 12 classes)."""
    src, tiny = extracted
    dst = tmp_path / "cache"
    shutil.copytree(src, dst, symlinks=True)
    return dst, tiny


def m(tiny: Path) -> list[str]:
    return ["--model", f"local-dir:{tiny}"]


def hold(lock: str, path: Path) -> subprocess.Popen:
    """Another process holding ``store.<lock>`` on ``path`` until killed."""
    proc = subprocess.Popen([sys.executable, "-c", (
        "import time; from pipeline.storage import store\n"
        f"with store.{lock}({str(path)!r}):\n    print('locked', flush=True); time.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


# ---- 1, 2, 7: locks ----------------------------------------------------------------------------

def test_the_writer_lock_exists_before_the_store_and_survives_its_creation(tmp_path):
    path = tmp_path / "cache" / "frames" / "x" / "train"
    with store.writer_lock(path):
        group = store.open_output(path, "fp", {}, replace_mismatched=False,
                                  init=lambda g: store.create_bookkeeping(g, 3, 2))
        group.attrs.update({"n": 3, "block_size": 2})
        assert store.lock_path(path).is_file() and not (path / ".lock").exists()
        probe = subprocess.run([sys.executable, "-c", (
            f"from pipeline.storage import store\nwith store.writer_lock({str(path)!r}): pass\n")],
            capture_output=True, text=True)
        assert probe.returncode != 0 and "being written by another process" in probe.stderr
        # a second writer asking to replace the store is refused too, and the store is intact
        with pytest.raises(StoreLocked):
            with store.writer_lock(path):
                pass
    assert (path / "zarr.json").is_file()


def test_a_read_store_cannot_be_rebuilt_under_its_reader(cache, tmp_path):
    c, _ = cache
    frames = c / "frames" / "toy" / "train"
    reader = hold("reader_lock", frames)
    try:
        world = Path(zarr.open_group(str(frames), mode="r").attrs["params"]["root"])
        proc = run_cli("frames", "--format", "csv", "--root", str(world), "--dataset", "toy", "--cache-frames", "3",
                       "--height", "32", "--width", "32", "--block-size", "4", "--replace-mismatched",
                       "--cache", str(c), "--quiet", check=False)
        assert proc.returncode == 2 and "being read by another process" in proc.stderr
        assert zarr.open_group(str(frames), mode="r")["frame_index"].shape[1] == 4  # untouched
    finally:
        reader.kill()
        reader.wait()


def test_a_planted_symlink_lock_is_refused_and_its_target_untouched(tmp_path):
    path = tmp_path / "cache" / "frames" / "x" / "train"
    path.parent.mkdir(parents=True)
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    store.lock_path(path).symlink_to(precious)
    with pytest.raises(PipelineError, match="symbolic link"):
        with store.writer_lock(path):
            pass
    assert precious.read_text() == "keep me"


# ---- 3, 4: stale inputs and model identity ------------------------------------------------------

@pytest.mark.slow
def test_every_consumer_refuses_outputs_made_from_rebuilt_inputs(cache):
    c, tiny = cache
    run_inproc("heads", "-d", "toy", *m(tiny), "--head", "prototype", "--per-class", "3", "--replace-mismatched",
               "--cache", str(c))
    run_inproc("heads", "-d", "toy", *m(tiny), "--head", "clip-text", "--replace-mismatched", "--cache", str(c))
    run_inproc("evaluate", "-d", "toy", *m(tiny), "--head", "prototype", "--cache", str(c))
    frames = c / "frames" / "toy" / "val"
    world = Path(zarr.open_group(str(frames), mode="r").attrs["params"]["root"])
    # the frame store is rebuilt with other parameters: the features made from it are stale
    run_cli("frames", "--format", "csv", "--root", str(world), "--dataset", "toy", "--split", "val",
            "--cache-frames", "4",
            "--height", "32", "--width", "32", "--block-size", "2", "--replace-mismatched", "--cache", str(c),
            "--quiet")
    proc = run_cli("evaluate", "-d", "toy", *m(tiny), "--head", "prototype", "--cache", str(c), check=False)
    assert proc.returncode == 2 and "stale" in proc.stderr and "pipeline features" in proc.stderr
    status = {(e["stage"], e["split"]): e for e in json.loads(run_cli("status", "--json", "--cache", str(c)).stdout)}
    assert status[("features", "val")]["stale"] and not status[("features", "train")]["stale"]
    # recomputed features of the training split: the prototype head fitted on the old ones is stale
    run_inproc("features", "-d", "toy", *m(tiny), "--split", "val", "--replace-mismatched", "--cache", str(c))
    run_inproc("evaluate", "-d", "toy", *m(tiny), "--head", "prototype", "--cache", str(c))
    run_cli("features", "-d", "toy", *m(tiny), "--split", "train", "--batch-size", "7", "--replace-mismatched",
            "--cache", str(c), "--quiet")
    for args in (["evaluate", "-d", "toy", *m(tiny), "--head", "prototype"],
                 ["export", "--what", "head", "-d", "toy", *m(tiny), "--head", "prototype",
                  "--out", str(c / "h.npz")]):
        proc = run_cli(*args, "--cache", str(c), check=False)
        assert proc.returncode == 2 and "stale" in proc.stderr and "pipeline heads" in proc.stderr, args
    # features of another model under the same tag: the CLIP-text head's text tower no longer matches
    other = tiny.parent.parent / "other" / tiny.name
    from conftest import write_tiny_clip

    write_tiny_clip(other, seed=1)
    for split in ("train", "val"):
        run_cli("features", "-d", "toy", "--model", f"local-dir:{other}", "--model-key", "tiny-clip", "--split", split,
                "--replace-mismatched", "--cache", str(c), "--quiet")
    proc = run_cli("evaluate", "-d", "toy", "--model", f"local-dir:{other}", "--model-key", "tiny-clip", "--head",
                   "clip-text", "--cache", str(c), check=False)
    assert proc.returncode == 2 and "not the model of the cached features" in proc.stderr


def test_model_identity_covers_config_preprocessing_and_weights(tmp_path, tiny_clip):
    from pipeline.models.clip import ModelSpec, load_clip

    folder = tmp_path / "tiny-clip"
    shutil.copytree(tiny_clip, folder)
    before = load_clip(ModelSpec(f"local-dir:{folder}")).identity
    config = json.loads((folder / "open_clip_config.json").read_text())
    config["preprocess_cfg"]["mean"] = [0.5, 0.5, 0.5]
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    after = load_clip(ModelSpec(f"local-dir:{folder}")).identity
    assert after["preprocess"]["mean"] == [0.5, 0.5, 0.5] and after["config_sha256"] != before["config_sha256"]
    assert after["weights_sha256"] == before["weights_sha256"]


def test_a_resume_with_an_edited_model_config_is_refused(cache, tmp_path):
    c, tiny = cache
    folder = tmp_path / "edited" / tiny.name
    shutil.copytree(tiny, folder)
    run_inproc("features", "-d", "toy", "--model", f"local-dir:{folder}", "--split", "val", "--replace-mismatched",
               "--cache", str(c))
    config = json.loads((folder / "open_clip_config.json").read_text())
    config["preprocess_cfg"]["std"] = [0.2, 0.2, 0.2]
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    proc = run_cli("features", "-d", "toy", "--model", f"local-dir:{folder}", "--split", "val", "--cache", str(c),
                   check=False)
    # refused before the model loads, naming what changed
    assert proc.returncode == 2 and "another model" in proc.stderr and "changed: config_sha256" in proc.stderr


# ---- 5: damaged and missing chunks --------------------------------------------------------------

@pytest.mark.slow
def test_a_deleted_frames_shard_is_found_refused_and_recomputed_after_repair(cache):
    c, tiny = cache
    path = c / "frames" / "toy" / "train"
    before = zarr.open_group(str(path), mode="r")["frames"][:]
    shard = path / "frames" / "c" / "1" / "0"
    assert shard.is_file()
    shard.unlink()
    with pytest.raises(DamagedStore, match="verify --repair"):
        read_frames(zarr.open_group(str(path), mode="r"), slice(4, 8))
    proc = run_cli("verify", "--cache", str(c), check=False)
    assert proc.returncode == 1 and "DAMAGED" in proc.stdout and "block 1" in proc.stdout
    proc = run_cli("features", "-d", "toy", *m(tiny), "--split", "train", "--batch-size", "5",
                   "--replace-mismatched", "--cache", str(c), check=False)
    assert proc.returncode == 2 and "damaged" in proc.stderr and "Traceback" not in proc.stderr
    out = run_cli("verify", "--repair", "--cache", str(c)).stdout
    assert "1 blocks marked pending" in out
    world = Path(zarr.open_group(str(path), mode="r").attrs["params"]["root"])
    run_cli("frames", "--format", "csv", "--root", str(world), "--dataset", "toy", "--split", "train",
            "--cache-frames", "4",
            "--height", "32", "--width", "32", "--block-size", "4", "--cache", str(c), "--quiet")
    after = zarr.open_group(str(path), mode="r")["frames"][:]
    assert after.tolist() == before.tolist()  # byte-identical JPEGs
    assert run_cli("verify", "--cache", str(c)).returncode == 0


@pytest.mark.slow
def test_flipped_bytes_in_a_features_chunk_fail_the_checksum(cache):
    c, tiny = cache
    chunk = c / "features" / "toy" / "tiny-clip" / "val" / "features" / "c" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    run_inproc("heads", "-d", "toy", *m(tiny), "--head", "clip-text", "--replace-mismatched", "--cache", str(c))
    proc = run_cli("evaluate", "-d", "toy", *m(tiny), "--head", "clip-text", "--cache", str(c), check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert "verify --repair" in proc.stderr and proc.stderr.count("\n") == 1  # no asyncio noise, no raw bytes
    report = json.loads(run_cli("verify", "--json", "--cache", str(c), check=False).stdout)
    damaged = [r for r in report if not r["ok"]]
    assert [Path(r["path"]).parts[-4:] for r in damaged] == [("features", "toy", "tiny-clip", "val")]
    assert damaged[0]["damaged_blocks"] == [0]
    run_cli("verify", "--repair", "--cache", str(c))
    run_cli("features", "-d", "toy", *m(tiny), "--cache", str(c), "--quiet")
    run_inproc("evaluate", "-d", "toy", *m(tiny), "--head", "clip-text", "--cache", str(c))


@pytest.mark.slow
def test_deleted_features_head_and_status_chunks_are_never_read_as_zeros(cache):
    c, tiny = cache
    run_inproc("heads", "-d", "toy", *m(tiny), "--head", "clip-text", "--replace-mismatched", "--cache", str(c))
    head = c / "heads" / "toy" / "tiny-clip" / "clip-text"
    (head / "head" / "c" / "0" / "0").unlink()
    proc = run_cli("evaluate", "-d", "toy", *m(tiny), "--head", "clip-text", "--cache", str(c), check=False)
    assert proc.returncode == 2 and "damaged" in proc.stderr
    feats = c / "features" / "toy" / "tiny-clip" / "train"
    (feats / "features" / "c" / "2" / "0" / "0").unlink()
    with pytest.raises(DamagedStore):
        from pipeline.storage.featurestore import video_features

        video_features(zarr.open_group(str(feats), mode="r"))
    status_chunk = c / "frames" / "toy" / "val" / "status" / "c" / "0"
    status_chunk.unlink()
    entries = json.loads(run_cli("status", "--json", "--cache", str(c)).stdout)
    damaged = {(e["stage"], e["split"]) for e in entries if e.get("damaged")}
    assert ("frames", "val") in damaged
    text = run_cli("status", "--cache", str(c)).stdout
    assert "DAMAGED" in text
    # verify --repair: the head is deleted (recomputed by `heads`), the blocks marked pending
    run_cli("verify", "--repair", "--cache", str(c))
    assert not head.exists()
    run_inproc("heads", "-d", "toy", *m(tiny), "--head", "clip-text", "--replace-mismatched", "--cache", str(c))
    pending = {(e["stage"], e["split"]): e["pending"] for e in json.loads(run_cli("status", "--json", "--cache",
                                                                                  str(c)).stdout)}
    assert pending[("features", "train")] == 4 and pending[("frames", "val")] == 24
    world = Path(zarr.open_group(str(c / "frames" / "toy" / "train"), mode="r").attrs["params"]["root"])
    run_cli("frames", "--format", "csv", "--root", str(world), "--dataset", "toy", "--cache-frames", "4",
            "--height", "32",
            "--width", "32", "--block-size", "4", "--cache", str(c), "--quiet")
    run_cli("features", "-d", "toy", *m(tiny), "--cache", str(c), "--quiet")
    assert run_cli("verify", "--cache", str(c)).returncode == 0


def test_a_broken_zarr_json_is_reported_not_dropped(cache):
    c, tiny = cache
    meta = c / "features" / "toy" / "tiny-clip" / "val" / "zarr.json"
    meta.write_text(meta.read_text()[:50])
    entries = json.loads(run_cli("status", "--json", "--cache", str(c)).stdout)
    assert any(e.get("damaged") and e["path"] == str(meta.parent) for e in entries)
    proc = run_cli("evaluate", "-d", "toy", *m(tiny), "--head", "clip-text", "--cache", str(c), check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


# ---- 6, 8, 9: names, block sizes, segment times -------------------------------------------------

def test_a_split_or_name_that_leaves_the_cache_is_refused_and_nothing_is_deleted(tmp_path, template):
    root = tmp_path / "data"
    root.mkdir()
    shutil.copyfile(template, root / "a.mp4")
    shutil.copyfile(template, root / "b.mp4")
    precious = tmp_path / "precious2"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    (root / "videos.csv").write_text("path,label,split\na.mp4,x,train\nb.mp4,x,../../../precious2\n")
    cache = tmp_path / "deep" / "er" / "cache"
    for extra in ([], ["--replace-mismatched"]):
        proc = run_cli("frames", "-d", "csv", "--root", str(root), "--cache", str(cache), *SMALL, *extra, check=False)
        assert proc.returncode == 2 and "split name '../../../precious2'" in proc.stderr
    assert (precious / "thesis.tex").read_text() == "years of work" and not (cache / "frames").exists()
    (root / "videos.csv").write_text("path,label,split\na.mp4,x,train\n")
    for name in ("../../../x", "..", ".hidden", "a/b"):
        proc = run_cli("frames", "--format", "csv", "--root", str(root), "--dataset", name, "--cache",
                       str(cache), *SMALL,
                       check=False)
        assert proc.returncode == 2 and "cannot name a folder of the cache" in proc.stderr, name
    proc = run_cli("evaluate", "--run-name", "../../x", "--cache", str(cache), check=False)
    assert proc.returncode == 2 and "run name" in proc.stderr


def test_block_size_is_bounded_and_bad_segment_times_fail_one_video(tmp_path, template):
    root = tmp_path / "data"
    root.mkdir()
    for name in ("a", "b", "c"):
        shutil.copyfile(template, root / f"{name}.mp4")
    (root / "videos.csv").write_text("path,label,split,start,end\na.mp4,x,train,,\nb.mp4,x,train,1e300,inf\n"
                                     "c.mp4,y,train,0,1\n")
    cache = tmp_path / "cache"
    args = ["frames", "-d", "csv", "--root", str(root), "--cache", str(cache), "--cache-frames", "2", "--height", "16",
            "--width", "16", "--block-size", "1000000000", "--quiet"]
    out = run_cli(*args).stdout
    assert "3 videos, 2 ok, 1 failed" in out and "not a usable time" in out
    group = zarr.open_group(str(cache / "frames" / "csv" / "train"), mode="r")
    # bounded (4096 rows), but not by the rows there are: a store keeps its block size (and fingerprint) as it grows
    assert group.attrs["block_size"] == store.MAX_BLOCK_ROWS and group["frames"].shards == (store.MAX_BLOCK_ROWS, 2)
    shard = cache / "frames" / "csv" / "train" / "frames" / "c" / "0" / "0"
    assert shard.stat().st_size < 100_000  # the shard index of 4096 chunks, and 3 videos
    assert "3 videos, 2 ok, 1 failed" in run_cli(*args).stdout  # a re-run has nothing to do and does not crash


# ---- 10, 11, 12: errors of the environment and of the user, stuck runs ---------------------------

FULL_DISK = """
import errno, sys
import zarr.storage
from pipeline.cli import main
writes = {"n": 0}
limit = int(sys.argv[1])
real_set = zarr.storage.LocalStore.set
async def full_after(self, key, value):
    writes["n"] += 1
    if writes["n"] > limit and "/c/" in key:
        raise OSError(errno.ENOSPC, "No space left on device", key)
    return await real_set(self, key, value)
zarr.storage.LocalStore.set = full_after
sys.argv = ["pipeline", *sys.argv[2:]]
main()
"""


def test_a_full_disk_is_one_line_and_the_resumed_store_is_exact(tmp_path, template):
    root = tmp_path / "data"
    root.mkdir()
    for i in range(8):
        shutil.copyfile(template, root / f"v{i}.mp4")
    (root / "videos.csv").write_text("path,label\n" + "".join(f"v{i}.mp4,{'ab'[i % 2]}\n" for i in range(8)))
    args = ["frames", "-d", "csv", "--root", str(root), "--cache-frames", "2", "--height", "16", "--width", "16",
            "--block-size", "2", "--quiet"]
    run_cli(*args, "--cache", str(tmp_path / "clean"))
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, "30", *args, "--cache", str(tmp_path / "full")],
                          capture_output=True, text=True, cwd=Path(__file__).parent)
    last = proc.stderr.splitlines()[-1]  # after the warning that this CSV has no validation split
    assert proc.returncode == 2 and last.startswith("error: no space left") and proc.stderr.count("error:") == 1
    assert "Traceback" not in proc.stderr
    run_cli(*args, "--cache", str(tmp_path / "full"))  # space again: the run resumes
    a = zarr.open_group(str(tmp_path / "clean" / "frames" / "csv" / "train"), mode="r")
    b = zarr.open_group(str(tmp_path / "full" / "frames" / "csv" / "train"), mode="r")
    for name in ("frames", "status", "frame_index", "reason"):
        assert a[name][:].tolist() == b[name][:].tolist(), name


def test_a_read_only_cache_is_one_line_for_a_writer(tmp_path, monkeypatch):
    import errno
    import os

    real_open = os.open

    def read_only(path, flags, *args):
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(PipelineError, match="read-only cache can be read"):
        with store.writer_lock(tmp_path / "cache" / "frames" / "x" / "train"):
            pass
    with store.reader_lock(tmp_path / "cache" / "frames" / "x" / "train"):  # readers go on without a lock
        pass


@pytest.mark.parametrize("args, expected", [
    (["frames", "--nosuch"], "No such option '--nosuch'"),
    (["status", "--json", "extra"], "Got unexpected extra argument"),
    (["frames", "-d", "csv", "--root", "MISSING", "--block-size", "0"], "0 is not in the range x>=1"),
    (["labels", "-d", "toy", "--model", "local-dir:MODEL", "--template", "{}{}"], "exactly one '{}'"),
    (["labels", "-d", "toy", "--model", "local-dir:MODEL", "--template", "{}{0.__class__}"], "exactly one '{}'"),
    (["lda", "-d", "toy", "--model", "local-dir:MODEL", "--per-class", "1"], "more videos than classes"),
    (["heads", "-d", "toy", "--model", "local-dir:MODEL", "--head", "lda", "--solver", "lsqr", "--shrinkage", "5"],
     "in [0, 1], not 5.0"),
    (["finetune", "-d", "toy", "--model", "local-dir:MODEL", "--crop-scale", "1.5", "0.2"], "crop scale"),
    (["finetune", "-d", "toy", "--model", "local-dir:MODEL", "--lr", "nan"], "lr must be a finite number"),
    (["finetune", "-d", "toy", "--model", "local-dir:MODEL", "--randaugment", "-1", "99"], "RandAugment N"),
    (["evaluate", "-d", "toy", "--model", "local-dir:MODEL", "--head", "clip-text", "--out", "FILE/x.json"],
     "a file is in the way of a folder"),
    (["report", "-d", "nosuch"], "nothing cached for dataset 'nosuch'"),
])
def test_bad_input_is_one_error_line(cache, tmp_path, args, expected):
    c, tiny = cache
    clip_text_head(c, tiny)
    (tmp_path / "file").write_text("a file where a folder would go")
    args = [a.replace("MODEL", str(tiny)).replace("FILE", str(tmp_path / "file")) for a in args]
    proc = run_cli(*args, "--cache", str(c), check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert expected in proc.stderr


def test_bad_csv_rows_and_params_values_are_one_error_line(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    for text, expected in (("path,label,split\nx.mp4\n", "line 2: 1 fields, the header has 3"),
                           ("path,label,split\n", "has a header but no rows")):
        (root / "videos.csv").write_text(text)
        proc = run_cli("frames", "-d", "csv", "--root", str(root), "--cache", str(tmp_path / "c"), check=False)
        assert proc.returncode == 2 and expected in proc.stderr and proc.stderr.count("\n") == 1
    params = tmp_path / "p.yaml"
    params.write_text("frames:\n  block_size: abc\n")
    (root / "videos.csv").write_text("path,label\nx.mp4,a\n")
    proc = run_cli("frames", "-d", "csv", "--root", str(root), "--params", str(params), "--cache", str(tmp_path / "c"),
                   check=False)
    assert proc.returncode == 2 and "'abc'" in proc.stderr
    assert "frames.block_size in the params file: Input should be a valid integer" in proc.stderr


def clip_text_head(c: Path, tiny: Path) -> None:
    run_inproc("heads", "-d", "toy", "--model", f"local-dir:{tiny}", "--head", "clip-text", "--replace-mismatched",
               "--cache", str(c))


def frozen(tiny: Path, c: Path, run: str, *extra: str) -> list[str]:
    return ["finetune", "--frozen-backbone", "-d", "toy", "--model", f"local-dir:{tiny}", "--head", "clip-text",
            "--frames", "2", "--epochs", "1", "--warmup-epochs", "0.2", "--global-batch-size", "16", "--run-name", run,
            "--cache", str(c), "-q", *extra]


def test_damaged_run_files_are_one_line_and_replace_mismatched_recovers(cache):
    c, tiny = cache
    clip_text_head(c, tiny)
    run_inproc(*frozen(tiny, c, "r"))
    run_dir = c / "runs" / "r"
    assert not list(run_dir.glob("*.partial"))
    weights = (run_dir / "checkpoint.pt").read_bytes()
    # a torn last line of the history (a kill mid-write) is dropped on resume
    with open(run_dir / "history.jsonl", "a") as f:
        f.write('{"kind": "step", "st')
    run_inproc(*frozen(tiny, c, "r"))
    assert all(json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines())
    # a truncated checkpoint
    (run_dir / "checkpoint.pt").write_bytes(weights[: len(weights) // 2])
    proc = run_cli(*frozen(tiny, c, "r"), check=False)
    assert proc.returncode == 2 and "checkpoint" in proc.stderr and "damaged" in proc.stderr
    assert proc.stderr.count("\n") == 1
    run_inproc(*frozen(tiny, c, "r", "--replace-mismatched"))
    assert (run_dir / "checkpoint.pt").read_bytes() == weights  # the same run again, bit for bit
    # an empty run.json beside this run's own checkpoint: the checkpoint says whose run it is, and it is rewritten
    info = (run_dir / "run.json").read_text()
    (run_dir / "run.json").write_text("")
    run_inproc(*frozen(tiny, c, "r"))
    assert json.loads((run_dir / "run.json").read_text())["fingerprint"] == json.loads(info)["fingerprint"]
    assert (run_dir / "checkpoint.pt").read_bytes() == weights


def test_a_run_without_run_json_beside_another_settings_checkpoint_is_not_stuck(cache):
    c, tiny = cache
    clip_text_head(c, tiny)
    run_inproc(*frozen(tiny, c, "s", "--lr", "1e-3"))
    (c / "runs" / "s" / "run.json").unlink()
    proc = run_cli(*frozen(tiny, c, "s"), check=False)
    assert proc.returncode == 2 and "--replace-mismatched" in proc.stderr
    run_inproc(*frozen(tiny, c, "s", "--replace-mismatched"))
    assert json.loads((c / "runs" / "s" / "run.json").read_text())["config"]["lr"] != 1e-3


@pytest.mark.slow
def test_a_truncated_shard_and_a_store_without_fingerprint_are_reported(cache):
    c, tiny = cache
    shard = c / "frames" / "toy" / "val" / "frames" / "c" / "2" / "0"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    proc = run_cli("verify", "--json", "--cache", str(c), check=False)
    damaged = [r for r in json.loads(proc.stdout) if not r["ok"]]
    assert proc.returncode == 1 and [r["damaged_blocks"] for r in damaged] == [[2]]
    proc = run_cli("features", "-d", "toy", *m(tiny), "--split", "val", "--batch-size", "3", "--replace-mismatched",
                   "--cache", str(c), "--quiet", check=False)
    last = proc.stderr.splitlines()[-1]  # after the progress log lines of the blocks before it
    assert proc.returncode == 2 and last.startswith("error: ") and "verify --repair" in last
    assert proc.stderr.count("error:") == 1 and "Traceback" not in proc.stderr
    # a creation interrupted before its fingerprint was written: listed as unfinished, no crash
    meta = c / "labels" / "toy" / "clip-tiny-clip" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"].pop("fingerprint")
    meta.write_text(json.dumps(doc))
    text = run_cli("status", "--cache", str(c)).stdout
    assert any(line.startswith("labels") and "unfinished" in line for line in text.splitlines())


def test_few_shot_warnings_name_classes_on_stderr_and_the_run_records_what_it_had(cache):
    c, tiny = cache
    clip_text_head(c, tiny)
    proc = run_cli(*frozen(tiny, c, "k", "--shots", "100"))
    assert "warning: 12 classes have fewer than 100 videos" in proc.stderr and "'a small red disc'" in proc.stderr
    assert "warning:" not in proc.stdout
    info = json.loads((c / "runs" / "k" / "run.json").read_text())
    assert info["shots"] == 100 and info["shots_per_class"] == {"min": 5, "max": 5}
