"""No silently wrong result, round two (#19): what a new user and a fault-injection review got wrong without a word.

Each test fails if its guarantee regresses; README "Reliability" lists them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import TINY_CLIP, run_inproc, write_tiny_clip
from test_frames_stage import run_cli

from pipeline.core.errors import DamagedStore, PipelineError
from pipeline.storage import store


@pytest.fixture
def cache(tmp_path, extracted) -> tuple[Path, Path]:
    """A private copy of the session's extracted cache (frames, features, labels of 12 classes, model key tiny-clip)."""
    src, tiny = extracted
    dst = tmp_path / "cache"
    shutil.copytree(src, dst, symlinks=True)
    return dst, tiny


def m(tiny: Path) -> list[str]:
    return ["--model", f"local-dir:{tiny}", "--model-key", "tiny-clip"]


def status_of(cache: Path) -> list[dict]:
    return json.loads(run_cli("status", "--json", "--cache", str(cache)).stdout)


def entry(entries: list[dict], stage: str, name: str) -> dict:
    return next(e for e in entries if e["stage"] == stage and e["name"] == name)


# ---- 1. random weights never pass silently ---------------------------------------------------------

@pytest.fixture
def builtin_tiny(tmp_path):
    """A tiny architecture registered as a built-in open_clip name (as ViT-B-16 is), in this process."""
    import open_clip

    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "TinyBuiltin.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(folder)
    return "TinyBuiltin"


def test_a_builtin_architecture_without_weights_is_refused_unless_asked_and_then_shown(cache, builtin_tiny):
    c, _ = cache
    with pytest.raises(AssertionError, match="would have random weights.*--random-weights"):
        run_inproc("features", "-d", "toy", "-m", builtin_tiny, "--split", "val", "--cache", str(c), "-q")
    run_inproc("features", "-d", "toy", "-m", builtin_tiny, "--random-weights", "--split", "val", "--cache", str(c),
               "-q")
    attrs = zarr.open_group(str(c / "features" / "toy" / "TinyBuiltin-random" / "val"), mode="r").attrs
    assert attrs["model"]["random_weights"] is True and attrs["model_spec"]["random_weights"] is True
    shown = entry(status_of(c), "features", "toy/TinyBuiltin-random/val")
    assert shown["random_weights"] is True
    assert "RANDOM WEIGHTS" in run_cli("status", "--cache", str(c)).stdout
    out = c.parent / "f.npz"
    run_inproc("export", "--what", "features", "-d", "toy", "--model-key", "TinyBuiltin-random", "--split", "val",
               "--out", str(out), "--cache", str(c))
    with np.load(out) as z:
        assert json.loads(str(z["attr_model"]))["random_weights"] is True


# ---- 2. a params file's model key stays with its model ----------------------------------------------

def test_a_params_files_model_key_never_lands_on_another_model(cache, tmp_path):
    c, tiny = cache
    other = write_tiny_clip(tmp_path / "other" / "tiny-clip", seed=5)
    work = tmp_path / "work"
    work.mkdir()
    (work / "params.yaml").write_text(f"model:\n  name: local-dir:{tiny}\n  key: tiny-clip\n")
    proc = run_cli("features", "-d", "toy", "--model", f"local-dir:{other}", "--split", "val", "--cache", str(c),
                   "-q", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert "model.* keys (key, pretrained, ...) are ignored" in proc.stderr
    keys = sorted(p.name for p in (c / "features" / "toy").iterdir())
    assert len(keys) == 2 and "tiny-clip" in keys  # the other model got a key of its own
    # the file's own model keeps its key
    proc = run_cli("config", "features", cwd=work)
    assert "tiny-clip" in proc.stdout


# ---- 4. damage shows where people look -----------------------------------------------------------

def test_status_flags_deleted_chunks_and_array_metadata_and_says_when_it_last_verified(cache):
    c, tiny = cache
    feats = c / "features" / "toy" / "tiny-clip" / "train"
    run_inproc("heads", "-d", "toy", *m(tiny), "--head", "random", "--cache", str(c))
    assert "outputs never read whole since they were made" in run_cli("status", "--cache", str(c)).stdout
    run_cli("verify", "--cache", str(c))
    e = entry(status_of(c), "features", "toy/tiny-clip/train")
    assert e["damaged"] is None and e["verified"]["ok"] is True
    (feats / "features" / "c" / "1" / "0" / "0").unlink()
    e = entry(status_of(c), "features", "toy/tiny-clip/train")
    assert "features: 1 chunk file(s) of finished blocks are missing (block 1)" in e["damaged"]
    # the metadata of a bookkeeping array: the store is no longer read as "3 videos, 3 ok"
    (c / "features" / "toy" / "tiny-clip" / "val" / "status" / "zarr.json").unlink()
    e = entry(status_of(c), "features", "toy/tiny-clip/val")
    assert e["damaged"] == "array 'status' is missing" and e["ok"] == 0
    with pytest.raises(AssertionError, match="array 'status' is missing"):
        run_inproc("evaluate", "-d", "toy", "--head", "clip-text", "--cache", str(c))
    # a truncated chunk file (features are stored uncompressed: its size is known without reading it)
    chunk = feats / "features" / "c" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-8])
    e = entry(status_of(c), "features", "toy/tiny-clip/train")
    assert f"chunk file features/c/0/0/0 has {chunk.stat().st_size} bytes, not {chunk.stat().st_size + 8}" \
        in e["damaged"]
    # an altered head: its values no longer hash to the sha256 recorded when it was made
    head = zarr.open_group(str(c / "heads" / "toy" / "tiny-clip" / "random"), mode="r+")
    assert entry(status_of(c), "heads", "toy/tiny-clip/random")["damaged"] is None
    head["head"][0, 0] = head["head"][0, 0] + 1
    assert "head: a chunk is missing or altered" in entry(status_of(c), "heads", "toy/tiny-clip/random")["damaged"]


@pytest.mark.slow
def test_verify_covers_runs_a_truncated_or_flipped_checkpoint_is_found_and_never_loaded(cache):
    c, tiny = cache
    run_inproc("heads", "-d", "toy", *m(tiny), "--head", "clip-text", "--cache", str(c))
    args = ["finetune", "--frozen-backbone", "-d", "toy", "--head", "clip-text", "--frames", "2", "--epochs", "1",
            "--global-batch-size", "16", "--warmup-epochs", "0.2", "--run-name", "r", "--cache", str(c), "-q"]
    run_inproc(*args)
    ck = c / "runs" / "r" / "checkpoint.pt"
    good = ck.read_bytes()
    assert run_cli("verify", "--cache", str(c)).returncode == 0
    ck.write_bytes(good[: len(good) - 100])
    proc = run_cli("verify", "--json", "--cache", str(c), check=False)
    damaged = [r for r in json.loads(proc.stdout) if not r["ok"]]
    assert proc.returncode == 1 and damaged[0]["kind"] == "run" and damaged[0]["damaged_files"] == ["checkpoint.pt"]
    assert entry(status_of(c), "run", "r")["state"] == "damaged"
    # four flipped bytes in the weights: the zip's CRC-32s catch them, on load and in verify
    flipped = bytearray(good)
    for i in (len(good) // 3, len(good) // 2, len(good) // 2 + 7, 2 * len(good) // 3):
        flipped[i] ^= 0x5A
    ck.write_bytes(bytes(flipped))
    proc = run_cli("evaluate", "--run-name", "r", "--cache", str(c), check=False)
    assert proc.returncode == 2 and "checkpoint" in proc.stderr and "damaged" in proc.stderr
    assert proc.stderr.count("\n") == 1
    assert run_cli("verify", "--cache", str(c), check=False).returncode == 1
    # repair deletes the run (a damaged checkpoint cannot be resumed from); the command trains it again
    run_cli("verify", "--repair", "--cache", str(c))
    assert not (c / "runs" / "r").exists()
    run_inproc(*args)
    assert ck.read_bytes() == good


def test_damaged_run_files_never_crash_status_or_evaluate(cache):
    c, tiny = cache
    run_inproc("heads", "-d", "toy", *m(tiny), "--head", "clip-text", "--cache", str(c))
    run_inproc("finetune", "--frozen-backbone", "-d", "toy", "--head", "clip-text", "--frames", "2", "--epochs", "1",
               "--global-batch-size", "16", "--warmup-epochs", "0.2", "--run-name", "r", "--cache", str(c), "-q")
    run_dir = c / "runs" / "r"
    lines = (run_dir / "history.jsonl").read_text().splitlines()
    (run_dir / "history.jsonl").write_text("\n".join(["{garbage"] + lines[1:]) + "\n")
    (run_dir / "metrics.json").write_text("{")
    e = entry(status_of(c), "run", "r")
    assert e["state"] == "damaged" and "history.jsonl" in e["damaged"] and "metrics.json" in e["damaged"]
    (run_dir / "run.json").write_text("not json")
    proc = run_cli("evaluate", "--run-name", "r", "--cache", str(c), check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


# ---- 5. a restart right after a crash works --------------------------------------------------------

def test_a_forked_child_never_keeps_a_dead_writers_lock(tmp_path):
    path = tmp_path / "cache" / "frames" / "x" / "train"
    code = ("import os, signal, time\nfrom pipeline.storage import store\n"
            f"with store.writer_lock({str(path)!r}):\n"
            "    if os.fork() == 0:\n        time.sleep(60)\n        os._exit(0)\n"  # a loader worker, say
            "    print('locked', flush=True)\n    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        proc.kill()  # the writer only, as the OOM killer does; its child lives on
        proc.wait()
        with store.writer_lock(path):  # at once
            pass
    finally:
        os.killpg(proc.pid, signal.SIGKILL)


# ---- 6. settings that cannot be mistyped ------------------------------------------------------------

def test_settings_cannot_be_mistyped(tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("frames:\n  heigth: 100\n")
    proc = run_cli("frames", "--params", str(params), "--format", "csv", "--root", "x", check=False)
    assert proc.returncode == 2 and proc.stderr == (f"error: {params}: unknown params key frames.heigth; did you mean "
                                                    "frames.height?\n")
    params.write_text("finetun:\n  lr: 1\n")
    proc = run_cli("finetune", "--params", str(params), check=False)
    assert proc.returncode == 2 and "unknown params group 'finetun'; did you mean 'finetune'?" in proc.stderr
    params.write_text("frames:\n  block_size: -3\n")
    proc = run_cli("frames", "--params", str(params), "--format", "csv", "--root", "x", check=False)
    assert proc.returncode == 2 and "frames.block_size" in proc.stderr and proc.stderr.count("\n") == 1
    params.write_text("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n")
    proc = run_cli("frames", "--params", str(params), check=False)
    assert proc.returncode == 2 and "aliases" in proc.stderr
    for args in (["finetune", "-d", "x", "--seed", "-1"], ["frames", "--cache-frames", "1000000000"],
                 ["frames", "--height", "100000"], ["finetune", "--layers", "1000000"],
                 ["finetune", "--coop-ctx", "1e9"], ["evaluate", "--run-name", "r", "--views", "100000x1"]):
        proc = run_cli(*args, "--no-params", check=False)
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, args
    # --help shows the values of the params file in use, wherever --params stands
    params.write_text("finetune:\n  epochs: 7\n")
    for order in (["--help", "--params", str(params)], ["--params", str(params), "--help"]):
        text = "".join(run_cli("finetune", *order).stdout.split())  # a long path may wrap anywhere
        assert f"[default:7from{params}finetune.epochs;builtin:30" in text
    text = " ".join(run_cli("finetune", "--help", "--no-params", cwd=Path(__file__).parents[1]).stdout.split())
    assert "--epochs INTEGER RANGE Epochs. [default: 30;" in text


def test_quiet_prints_less_than_the_default(tmp_path):
    from pipeline.media.world import WorldSpec, generate_world

    generate_world(tmp_path / "world", WorldSpec(colours=("red", "blue"), shapes=("disc",), sizes=("small",),
                                                 train_per_class=4, val_per_class=1, frames=4, size=32))
    base = ["frames", "--format", "csv", "--root", str(tmp_path / "world"), "--height", "32", "--width", "32",
            "--block-size", "1", "--cache-frames", "2"]
    loud = run_cli(*base, "--cache", str(tmp_path / "a"))
    quiet = run_cli(*base, "--cache", str(tmp_path / "b"), "-q")
    assert quiet.stderr == "" and len(loud.stderr) > 0
    assert len(quiet.stdout) + len(quiet.stderr) < len(loud.stdout) + len(loud.stderr)


# ---- 10. what a fault-injection review found ---------------------------------------------------------

def test_unfinished_stores_are_refused_by_export_and_the_python_api(cache, tmp_path):
    from pipeline import open_features

    c, tiny = cache
    feats = c / "features" / "toy" / "tiny-clip" / "train"
    group = zarr.open_group(str(feats), mode="r+")
    group[store.DONE_ARRAY][2:] = 0  # as a killed run leaves it
    group["status"][8:] = store.PENDING
    proc = run_cli("export", "--what", "features", "-d", "toy", "--split", "train", "--out", str(tmp_path / "f.h5"),
                   "--cache", str(c), check=False)
    assert proc.returncode == 2 and "unfinished" in proc.stderr and not (tmp_path / "f.h5").exists()
    with pytest.raises(PipelineError, match="unfinished"):
        open_features(feats)
    with pytest.warns(UserWarning, match="reading the 8 finished of its 60 videos"):
        assert open_features(feats, partial=True).video_features()[0].shape[0] == 8


def test_lost_chunks_of_every_array_are_never_read_as_zeros(cache, tmp_path):
    c, tiny = cache
    frames = c / "frames" / "toy" / "val"
    # the box of block 1: its videos' crop would be (0, 0, 0, 0)
    (frames / "box" / "c" / "1" / "0").unlink()
    verify = json.loads(run_cli("verify", "--json", "--cache", str(c), check=False).stdout)
    report = next(r for r in verify if r["path"] == str(frames))
    assert report["damaged_blocks"] == [1] and "box" in " ".join(report["problems"])
    assert "box: 1 chunk file(s)" in entry(status_of(c), "frames", "toy/val")["damaged"]
    with pytest.raises(DamagedStore, match="box"):
        store.open_existing(frames, "frame store")
    # the digest of a block covers all its arrays: an altered frame_index with a valid checksum is found too
    group = zarr.open_group(str(frames), mode="r+")
    group["frame_index"][8:12] = group["frame_index"][8:12] + 1
    verify = json.loads(run_cli("verify", "--json", "--cache", str(c), check=False).stdout)
    report = next(r for r in verify if r["path"] == str(frames))
    assert report["damaged_blocks"] == [1, 2]
    # repair deletes the damaged blocks' files; the stage rewrites them and the store verifies again
    run_cli("verify", "--repair", "--cache", str(c))
    world = Path(zarr.open_group(str(c / "frames" / "toy" / "train"), mode="r").attrs["params"]["root"])
    run_cli("frames", "--format", "csv", "--root", str(world), "--dataset", "toy", "--cache-frames", "4",
            "--height", "32", "--width", "32", "--block-size", "4", "--cache", str(c), "-q")
    assert run_cli("verify", "--cache", str(c)).returncode == 0


@pytest.mark.slow
def test_a_truncated_frames_chunk_is_repaired_and_the_stage_finishes_the_store(cache):
    """Deleted timestamp and source_frames chunks are damage as a deleted box is; a truncated frames chunk of
    the last block (a short block: the stage must write it afresh, never read the old one back) is marked
    pending by `verify --repair`, and the frame stage finishes the store: it is never left stuck."""
    c, tiny = cache
    frames = c / "frames" / "toy" / "val"
    world = Path(zarr.open_group(str(frames), mode="r").attrs["params"]["root"])
    for name, chunk in (("timestamp", "c/3/0"), ("source_frames", "c/4")):
        (frames / name / chunk).unlink()
        assert f"{name}: 1 chunk file(s)" in entry(status_of(c), "frames", "toy/val")["damaged"]
    with pytest.raises(DamagedStore, match="timestamp"):  # readers refuse (they name the first problem)
        store.open_existing(frames, "frame store")
    # a truncated frames chunk of the last block: repair marks it pending, and the stage finishes the store
    last = max((frames / "frames" / "c").iterdir(), key=lambda p: int(p.name))
    shard = last / "0"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    verify = json.loads(run_cli("verify", "--json", "--cache", str(c), check=False).stdout)
    assert next(r for r in verify if r["path"] == str(frames))["damaged_blocks"] == [3, 4, int(last.name)]
    run_cli("verify", "--repair", "--cache", str(c))
    run_cli("frames", "--format", "csv", "--root", str(world), "--dataset", "toy", "--cache-frames", "4",
            "--height", "32", "--width", "32", "--block-size", "4", "--cache", str(c), "-q")
    assert run_cli("verify", "--cache", str(c)).returncode == 0
    assert run_cli("verify", "--repair", "--cache", str(c)).returncode == 0


def test_a_raw_store_with_a_deleted_shard_is_refused_not_read_black(tmp_path, extracted):
    from pipeline import open_frames

    c, tiny = extracted
    world = Path(zarr.open_group(str(c / "frames" / "toy" / "train"), mode="r").attrs["params"]["root"])
    raw = tmp_path / "raw"
    run_inproc("frames", "--format", "csv", "--root", str(world), "--dataset", "toy", "--cache-frames", "2",
               "--height", "32", "--width", "32", "--block-size", "4", "--codec", "raw", "--split", "val",
               "--cache", str(raw), "-q")
    shard = raw / "frames" / "toy" / "val" / "frames" / "c" / "2" / "0" / "0" / "0" / "0"
    assert shard.is_file()
    shard.unlink()
    with pytest.raises(PipelineError, match="frames: 1 chunk file"):
        open_frames(raw / "frames" / "toy" / "val")
    proc = run_cli("features", "-d", "toy", "--model", f"local-dir:{tiny}", "--cache", str(raw), check=False)
    assert proc.returncode == 2 and "damaged" in proc.stderr
    proc = run_cli("export", "--what", "frames", "-d", "toy", "--split", "val", "--out", str(tmp_path / "x.h5"),
                   "--cache", str(raw), check=False)
    assert proc.returncode == 2 and "damaged" in proc.stderr


def test_the_model_identity_is_of_the_weights_loaded_and_runs_check_their_heads_model(cache, tmp_path):
    from pipeline.models.clip import ModelSpec, load_clip

    c, tiny = cache
    folder = tmp_path / "m" / "tiny-clip"
    shutil.copytree(tiny, folder)
    before = load_clip(ModelSpec(f"local-dir:{folder}")).identity["weights_sha256"]
    # open_clip prefers a .safetensors beside the .bin: the identity follows every weights file in the folder
    from safetensors.torch import save_file

    other = load_clip(ModelSpec(f"local-dir:{write_tiny_clip(tmp_path / 'o', seed=3)}")).model
    save_file(other.state_dict(), folder / "open_clip_pytorch_model.safetensors")
    assert load_clip(ModelSpec(f"local-dir:{folder}")).identity["weights_sha256"] != before
    # weights replaced in place after the head was made: the run refuses to train against the old model's head
    run_inproc("heads", "-d", "toy", *m(tiny), "--head", "clip-text", "--cache", str(c))
    swapped = tmp_path / "sw" / "tiny-clip"
    shutil.copytree(tiny, swapped)
    shutil.copyfile(tmp_path / "o" / "open_clip_pytorch_model.bin", swapped / "open_clip_pytorch_model.bin")
    proc = run_cli("finetune", "-d", "toy", "--model", f"local-dir:{swapped}", "--model-key", "tiny-clip",
                   "--head", "clip-text", "--frames", "2", "--epochs", "1", "--global-batch-size", "8",
                   "--workers", "0", "--run-name", "x", "--cache", str(c), "-q", check=False)
    assert proc.returncode == 2 and "made with another model" in proc.stderr and "weights_sha256" in proc.stderr


def test_temporary_files_are_never_written_through_a_planted_link(tmp_path):
    from pipeline.core.files import append_line, write_atomic

    precious = tmp_path / "precious"
    precious.write_text("keep")
    target = tmp_path / "run" / "metrics.json"
    target.parent.mkdir()
    (target.parent / "metrics.json.partial").symlink_to(precious)
    write_atomic(target, "{}")
    assert precious.read_text() == "keep" and target.read_text() == "{}" and not target.is_symlink()
    (target.parent / "history.jsonl").symlink_to(precious)
    with pytest.raises(OSError):
        append_line(target.parent / "history.jsonl", "{}")
    assert precious.read_text() == "keep"


def test_a_full_disk_while_a_checkpoint_is_written_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import torch

    from pipeline.core import files

    monkeypatch.setattr(files, "nearly_full", lambda folder, margin=0: True)

    def writer(f):  # what torch.save's zip writer raises when a write fails
        f.write(b"x" * 10)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    with pytest.raises(PipelineError, match="no space left on the device"):
        files.write_atomic(tmp_path / "checkpoint.pt", writer)
    assert list(tmp_path.iterdir()) == []
    files.write_atomic(tmp_path / "ok.pt", lambda f: torch.save({"a": 1}, f))


def test_an_hdf5_export_on_a_full_disk_is_one_line_not_a_crash(extracted, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (not root)")
    try:
        c, tiny = extracted
        for fmt in ("h5", "npz"):
            proc = run_cli("export", "--what", "frames", "-d", "toy", "--split", "train",
                           "--out", str(small / f"frames.{fmt}"), "--cache", str(c), check=False)
            assert proc.returncode == 2 and "no space left" in proc.stderr and proc.stderr.count("\n") == 1, proc
            assert os.listdir(small) == []
    finally:
        subprocess.run(["umount", str(small)])


@pytest.mark.slow
def test_a_corrupt_array_metadata_is_reported_by_verify_and_status_and_repaired(cache):
    c, tiny = cache
    meta = c / "features" / "toy" / "tiny-clip" / "val" / "features" / "zarr.json"
    meta.write_text(meta.read_text()[:40])
    assert "unreadable metadata" in entry(status_of(c), "features", "toy/tiny-clip/val")["damaged"]
    proc = run_cli("verify", "--cache", str(c), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "unreadable metadata" in proc.stdout
    run_cli("verify", "--repair", "--cache", str(c))
    run_cli("features", "-d", "toy", *m(tiny), "--cache", str(c), "-q")
    assert run_cli("verify", "--cache", str(c)).returncode == 0


def test_status_summarises_failures_by_reason(tmp_path, template):
    root = tmp_path / "data"
    root.mkdir()
    shutil.copyfile(template, root / "ok.mp4")
    rows = "".join(f"gone{i}.mp4,a,train\n" for i in range(30))
    (root / "videos.csv").write_text("path,label,split\nok.mp4,a,train\n" + rows)
    c = tmp_path / "cache"
    out = run_cli("frames", "-d", "csv", "--root", str(root), "--height", "16", "--width", "16", "--cache-frames",
                  "2", "--cache", str(c), "-q").stdout
    assert "31 videos, 1 ok, 30 failed" in out
    e = status_of(c)[0]
    assert e["failure_reasons"] == {"missing file": 30} and len(e["failures"]) == 20
    every = json.loads(run_cli("status", "--json", "--all-failures", "--cache", str(c)).stdout)[0]
    assert len(every["failures"]) == 30


# ---- 3. one empty draw does not lose every result -------------------------------------------------

def test_an_empty_draw_is_named_and_the_other_protocols_stand(cache):
    from pipeline.learning import evaluation

    # the unit: draws whose classes have no videos are named and left out of the mean, never scored 0
    rng = np.random.default_rng(0)
    logits, labels = rng.standard_normal((40, 8)), np.repeat([0, 1], 20)
    half = evaluation.half_classes(logits, labels)
    drawn = [set(r["class_indices"]) for r in half["runs"]]
    empty = [f"draw {k}" for k, classes in enumerate(drawn) if not classes & {0, 1}]
    assert half["empty"] == empty and half["used"] == 10 - len(empty) and 0 < len(empty) < 10
    # as the official code, a draw chooses among its classes that have videos (test_zeroshot.py:304)
    one = next(r for r in half["runs"] if not r.get("empty"))
    assert one["classes"] == len(set(one["class_indices"]) & {0, 1})
    # through the CLI: every video of classes 1..11 failed to decode (their rows recorded failed)
    c, tiny = cache
    run_inproc("heads", "-d", "toy", *m(tiny), "--head", "clip-text", "--cache", str(c))
    val = zarr.open_group(str(c / "features" / "toy" / "tiny-clip" / "val"), mode="r+")
    lost = val["label"][:] != 0
    status, reason = val["status"][:], np.asarray(val["reason"][:], dtype=object)
    status[lost], reason[lost] = store.FAILED, "frames: not a decodable video"
    val["status"][:], val["reason"][:] = status, np.array(reason.tolist(), dtype=np.str_)
    out = run_inproc("evaluate", "-d", "toy", "--head", "clip-text", "--protocol", "full", "--protocol", "half",
                     "--cache", str(c))
    assert "full" in out and "no videos of their classes in: draw" in out
    out = json.loads(run_cli("evaluate", "-d", "toy", "--head", "clip-text", "--protocol", "full", "--protocol",
                             "half", "--json", "--cache", str(c)).stdout)
    assert out["full"]["videos"] == int((~lost).sum()) and out["half"]["empty"] and out["half"]["used"] >= 1
    # subsets: one whose classes lost every video is named; the full result and the other subset stand
    names = list(val.attrs["class_names"])
    kept, gone = c.parent / "kept.csv", c.parent / "gone.csv"
    kept.write_text(f"{names[0]}\n{names[1]}\n")
    gone.write_text(f"{names[2]}\n{names[3]}\n")
    out = json.loads(run_cli("evaluate", "-d", "toy", "--head", "clip-text", "--protocol", "full", "--protocol",
                             "subsets", "--subsets", str(kept), "--subsets", str(gone), "--json", "--cache",
                             str(c)).stdout)
    assert out["full"]["videos"] == int((~lost).sum())
    assert out["subsets"]["empty"] == ["subset 2"] and out["subsets"]["used"] == 1 and out["subsets"]["of"] == 2
    assert out["subsets"]["runs"][0]["videos"] == int((~lost).sum())


# ---- 10. a run whose data were rebuilt says so -------------------------------------------------------

@pytest.mark.slow
def test_a_run_whose_stores_were_rebuilt_is_marked_stale_and_its_evaluation_warns(cache):
    c, tiny = cache
    run_inproc("heads", "-d", "toy", *m(tiny), "--head", "clip-text", "--cache", str(c))
    run_inproc("finetune", "--frozen-backbone", "-d", "toy", "--head", "clip-text", "--frames", "2", "--epochs", "1",
               "--global-batch-size", "16", "--warmup-epochs", "0.2", "--run-name", "r", "--cache", str(c), "-q")
    assert entry(status_of(c), "run", "r")["stale"] is None
    assert "were rebuilt since run" not in run_cli("evaluate", "--run-name", "r", "--cache", str(c)).stderr
    # the validation frames are rebuilt with other settings, and their features after them
    world = Path(zarr.open_group(str(c / "frames" / "toy" / "val"), mode="r").attrs["params"]["root"])
    run_cli("frames", "--format", "csv", "--root", str(world), "--dataset", "toy", "--split", "val",
            "--cache-frames", "4", "--height", "32", "--width", "32", "--block-size", "2", "--replace-mismatched",
            "--cache", str(c), "-q")
    run_cli("features", "-d", "toy", *m(tiny), "--split", "val", "--replace-mismatched", "--cache", str(c), "-q")
    stale = entry(status_of(c), "run", "r")["stale"]
    assert stale and "features toy/val was rebuilt since it was trained" in stale
    proc = run_cli("evaluate", "--run-name", "r", "--cache", str(c))
    assert "the features of toy/val were rebuilt since run r was trained" in proc.stderr
