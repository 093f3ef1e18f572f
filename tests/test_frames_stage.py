"""The frame stage through the CLI: stores, failures, status, export, fingerprints, locks, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr
from conftest import copy_video, make_broken_files, sigkill_mid_run
from videos import brightness_index, write_video

from pipeline.storage import store
from pipeline.storage.framestore import read_frames

ARRAYS = ("frames", "frame_index", "timestamp", "source_frames", "status", "reason", "video_id", "label")
SMALL = ["--cache-frames", "4", "--height", "32", "--width", "32", "--block-size", "2", "--quiet"]


def run_cli(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    # From the tests folder by default: the repository's own params.yaml (the demo) stays out of it.
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True,
                          cwd=cwd or Path(__file__).parent)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def load(path: Path) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(path), mode="r")
    arrays = {name: g[name][:] for name in ARRAYS}
    arrays["stored"] = arrays["frames"]  # as stored (JPEG bytes by default)
    arrays["frames"] = read_frames(g, slice(None))  # decoded uint8
    return arrays


@pytest.fixture
def ucf_tree(tmp_path, template) -> Path:
    """UCF101 layout: 6 good videos in 2 classes, every kind of broken file, one missing entry."""
    root = tmp_path / "ucf"
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_text("1 JumpRope\n2 Broken\n")
    train = [f"JumpRope/v_JumpRope_g0{i}_c01.avi" for i in range(1, 7)]
    for i, rel in enumerate(train):
        write_video(root / "UCF-101" / rel, n_frames=10 + i, width=48, height=32)
    broken = make_broken_files(root / "UCF-101" / "Broken", template)
    test = [f"Broken/{p.name}" for p in broken.values()] + ["Broken/v_Broken_g01_c09.avi"]  # last: missing
    (lists / "trainlist01.txt").write_text("".join(f"{r} 1\n" for r in train))
    (lists / "testlist01.txt").write_text("".join(f"{r}\n" for r in test))
    return root


def test_ucf101_frames_store_every_decodable_video_and_report_every_broken_one(tmp_path, ucf_tree):
    cache = tmp_path / "cache"
    out = run_cli("frames", "--dataset", "ucf101", "--root", str(ucf_tree), "--cache", str(cache), *SMALL)
    assert "ucf101/train: 6 videos, 6 ok, 0 failed" in out.stdout
    assert "ucf101/test: 8 videos, 0 ok, 8 failed" in out.stdout

    entries = json.loads(run_cli("status", "--json", "--cache", str(cache)).stdout)
    by_split = {e["split"]: e for e in entries}
    assert set(by_split) == {"train", "test"}
    train, test = by_split["train"], by_split["test"]
    assert (train["total"], train["ok"], train["failed"], train["stage"], train["dataset"]) == \
        (6, 6, 0, "frames", "ucf101")
    assert Path(train["path"]) == cache / "frames" / "ucf101" / "train" and len(train["fingerprint"]) == 64
    reasons = {Path(f["video_id"]).name: f["reason"] for f in test["failures"]}
    assert "empty file" in reasons["empty"]
    assert "not a decodable video" in reasons["truncated"]
    assert "not a decodable video" in reasons["random"]
    assert "no video stream" in reasons["audio"]
    assert "not a decodable video" in reasons["notes"]
    assert "is a directory" in reasons["folder"]
    assert "dangling symlink" in reasons["dangling"]
    assert "missing file" in reasons["v_Broken_g01_c09"]

    data = load(cache / "frames" / "ucf101" / "train")
    assert data["frames"].shape == (6, 4, 32, 32, 3)
    for i in range(6):  # video i has 10 + i frames; stored frames are its segment centres
        n = 10 + i
        expected = [int((k + 0.5) * n / 4) for k in range(4)]
        assert data["frame_index"][i].tolist() == expected
        assert [brightness_index(f) for f in data["frames"][i]] == expected
    failed = load(cache / "frames" / "ucf101" / "test")
    assert (failed["status"] == 2).all() and failed["frames"].max() == 0  # nothing substituted

    strict = run_cli("frames", "--dataset", "ucf101", "--root", str(ucf_tree), "--cache", str(cache), *SMALL,
                     "--strict", check=False)
    assert strict.returncode == 1  # resumed (nothing to do), but failures exist


def test_export_npz_and_h5_round_trip(tmp_path, ucf_tree):
    cache = tmp_path / "cache"
    run_cli("frames", "-d", "ucf101", "--root", str(ucf_tree), "--cache", str(cache), *SMALL, "--split", "train")
    stored = load(cache / "frames" / "ucf101" / "train")
    npz, h5 = tmp_path / "o.npz", tmp_path / "o.h5"
    for fmt, out in (("npz", npz), ("h5", h5)):
        run_cli("export", "--what", "frames", "--dataset", "ucf101", "--split", "train", "--format", fmt,
                "--out", str(out), "--cache", str(cache))
    with np.load(npz) as z:
        assert np.array_equal(z["frames"], stored["frames"]) and z["frames"].shape == (6, 4, 32, 32, 3)
        assert np.array_equal(z["frame_index"], stored["frame_index"])
        assert z["video_id"].tolist() == stored["video_id"].tolist()
        assert z["attr_class_names"].tolist() == ["jump rope", "broken"]
    with h5py.File(h5, "r") as f:
        assert np.array_equal(f["frames"][:], stored["frames"])
        assert np.array_equal(f["label"][:], stored["label"]) and np.array_equal(f["status"][:], stored["status"])
        assert [v.decode() for v in f["video_id"][:]] == stored["video_id"].tolist()
        assert list(f.attrs["class_names"]) == ["jump rope", "broken"]


def test_fingerprint_mismatch_stops_and_replace_flag_rebuilds(tmp_path, ucf_tree):
    cache = tmp_path / "cache"
    base = ["frames", "-d", "ucf101", "--root", str(ucf_tree), "--cache", str(cache), "--split", "train"]
    run_cli(*base, *SMALL)
    before = load(cache / "frames" / "ucf101" / "train")
    other = [a if a != "4" else "3" for a in SMALL]  # --num-frames 3
    proc = run_cli(*base, *other, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "changed: num_frames" in proc.stderr
    assert "--replace-mismatched" in proc.stderr and "Traceback" not in proc.stderr
    assert np.array_equal(load(cache / "frames" / "ucf101" / "train")["frames"], before["frames"])  # untouched
    run_cli(*base, *other, "--replace-mismatched")
    assert load(cache / "frames" / "ucf101" / "train")["frames"].shape == (6, 3, 32, 32, 3)
    # a matching fingerprint with the flag resumes instead of rebuilding
    path = cache / "frames" / "ucf101" / "train"
    stamp = (path / "zarr.json").stat().st_mtime_ns
    run_cli(*base, *other, "--replace-mismatched")
    assert (path / "zarr.json").stat().st_mtime_ns == stamp


def test_second_writer_is_refused(tmp_path, ucf_tree):
    cache = tmp_path / "cache"
    path = cache / "frames" / "ucf101" / "train"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pipeline.storage import store\n"
        f"with store.writer_lock({str(path)!r}):\n    print('locked', flush=True); time.sleep(30)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = run_cli("frames", "-d", "ucf101", "--root", str(ucf_tree), "--cache", str(cache), "--split",
                       "train", *SMALL, check=False)
        assert proc.returncode == 2
        assert f"being written by another process (pid {holder.pid})" in proc.stderr
    finally:
        holder.kill()
        holder.wait()
    run_cli("frames", "-d", "ucf101", "--root", str(ucf_tree), "--cache", str(cache), "--split", "train", *SMALL)


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_arrays(tmp_path):
    root = tmp_path / "many"
    root.mkdir()
    rows = []
    for i in range(48):
        write_video(root / f"v{i:02d}.mp4", n_frames=40 + i % 7, width=320, height=240, seed=i)
        rows.append(f"v{i:02d}.mp4,{'ab'[i % 2]},train\n")
    (root / "videos.csv").write_text("path,label,split\n" + "".join(rows))
    args = ["frames", "-d", "csv", "--root", str(root), "--cache-frames", "8", "--height", "64", "--width", "80",
            "--block-size", "2", "--quiet"]
    run_cli(*args, "--cache", str(tmp_path / "clean"))
    expected = load(tmp_path / "clean" / "frames" / "csv" / "train")

    killed = tmp_path / "killed"
    sigkill_mid_run([*args, "--cache", str(killed)], killed / "frames" / "csv" / "train", tmp_path)
    group = zarr.open_group(str(killed / "frames" / "csv" / "train"), mode="r")
    pending = store.pending_blocks(group)
    assert 0 < len(pending) < 24, "the kill should land mid-run"
    run_cli(*args, "--cache", str(killed))  # not blocked by the dead process's lock
    got = load(killed / "frames" / "csv" / "train")
    for name in (*ARRAYS, "stored"):
        assert np.array_equal(got[name], expected[name]), name


@pytest.mark.slow
def test_two_dask_workers_write_the_same_store_as_one(tmp_path, ucf_tree):
    one, two = tmp_path / "one", tmp_path / "two"
    base = ["frames", "-d", "ucf101", "--root", str(ucf_tree), *SMALL]
    run_cli(*base, "--cache", str(one))
    out = run_cli(*base, "--cache", str(two), "--workers", "2")
    assert "ucf101/test: 8 videos, 0 ok, 8 failed" in out.stdout
    for split in ("train", "test"):
        a, b = load(one / "frames" / "ucf101" / split), load(two / "frames" / "ucf101" / split)
        for name in (*ARRAYS, "stored"):
            assert np.array_equal(a[name], b[name]), (split, name)
    fp = lambda c, s: zarr.open_group(str(c / "frames" / "ucf101" / s), mode="r").attrs["fingerprint"]  # noqa: E731
    assert fp(one, "train") == fp(two, "train")  # worker count is not part of the content


def test_params_file_keys_and_flag_override(tmp_path, template):
    root = tmp_path / "f"
    copy_video(template, root / "a" / "x.mp4")
    copy_video(template, root / "b" / "y.mp4")
    (tmp_path / "params.yaml").write_text(
        f"data:\n  format: folder\n  root: {root}\n  dataset: toy\n"
        "frames:\n  cache_frames: 2\n  height: 16\n  width: 24\n  block_size: 1\n")
    run_cli("frames", "--quiet", "--cache-frames", "3", cwd=tmp_path)  # ./params.yaml is read by default
    g = zarr.open_group(str(tmp_path / "cache" / "frames" / "toy" / "train"), mode="r")
    assert read_frames(g, slice(None)).shape == (2, 3, 16, 24, 3)  # flag beat the key; the rest from the file
    # data.* keys describe one dataset: naming another one on the command line drops them
    other = run_cli("frames", "--dataset", "ucf101", "--quiet", check=False, cwd=tmp_path)
    assert other.returncode == 2 and "no root given for dataset 'ucf101'" in other.stderr
    env_cache = tmp_path / "envcache"
    proc = subprocess.run([sys.executable, "-m", "pipeline", "frames", "--quiet"], cwd=tmp_path, text=True,
                          capture_output=True, env={**os.environ, "PIPELINE_CACHE": str(env_cache)})
    assert proc.returncode == 0 and (env_cache / "frames" / "toy" / "train" / "zarr.json").exists()


def test_user_mistakes_are_one_line_errors(tmp_path):
    for args, message in [
        (["frames", "-d", "ucf101", "--root", str(tmp_path / "nope")], "error: ucf101 root not found"),
        (["frames", "--params", str(tmp_path / "p.yaml")], "error: params file not found"),
        (["frames", "--cache", str(tmp_path)], "error: no dataset given"),
        (["export", "-d", "x", "--split", "train", "--out", "o.h5", "--cache", str(tmp_path)],
         "error: no frame store for x/train"),
    ]:
        proc = run_cli(*args, check=False, cwd=tmp_path)
        assert proc.returncode == 2, args
        assert proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr
        assert "Traceback" not in proc.stderr
    proc = run_cli("frames", "--dataset", "k401", check=False)
    assert proc.returncode == 2 and "'k401' is not a dataset format" in proc.stderr


def test_help_lists_commands_with_examples():
    out = run_cli("--help").stdout
    for command in ("frames", "extract", "status", "export"):
        assert command in out
    for command in ("frames", "extract", "status", "export"):
        assert "Example" in run_cli(command, "--help").stdout


def test_raw_codec_is_lossless_and_jpeg_is_close(tmp_path, ucf_tree):
    base = ["frames", "-d", "ucf101", "--root", str(ucf_tree), "--split", "train", *SMALL]
    run_cli(*base, "--cache", str(tmp_path / "jpeg"))
    run_cli(*base, "--cache", str(tmp_path / "raw"), "--codec", "raw")
    jpeg = load(tmp_path / "jpeg" / "frames" / "ucf101" / "train")
    raw = load(tmp_path / "raw" / "frames" / "ucf101" / "train")
    assert jpeg["stored"].dtype == object and isinstance(jpeg["stored"][0, 0], bytes)
    assert raw["stored"].dtype == np.uint8 and np.array_equal(raw["stored"], raw["frames"])
    assert np.abs(jpeg["frames"].astype(int) - raw["frames"].astype(int)).mean() < 3
    assert sum(len(b) for b in jpeg["stored"].ravel()) < raw["frames"].nbytes / 4


@pytest.mark.parametrize("profile", ["k400", "k600", "ucf101", "hmdb51", "anet"])
def test_real_data_profiles_are_valid(profile):
    from pipeline.core import settings as S
    from pipeline.core.params import Params
    from pipeline.core.settings import load_params
    from pipeline.storage.framestore import FrameCodec

    params = load_params(Path(__file__).parents[1] / "data" / "profiles" / f"{profile}.yaml")

    def resolved(cls):
        r = S.resolve(cls, lambda section: Params(params, section), {})
        assert not r.notes, r.notes  # no deprecated keys in a shipped profile
        return r.values

    frames = resolved(S.FramesSettings)
    # K400's 4x3 views need 4 clips x 8 distinct frames; the one-view profiles store 2 a segment (measured enough,
    # benchmarks/bench_cache_frames.py); whole 16:9 frames
    assert frames.cache_frames == (32 if profile == "k400" else 16) and (frames.height, frames.width) == (256, 456)
    FrameCodec(frames.codec, frames.jpeg_quality)
    assert frames.format == frames.dataset == profile
    # Table 1's K400 run is ViT-B/16; the zero-shot and few-shot configs use ViT-L/14
    assert resolved(S.FeaturesSettings).model == ("ViT-B-16" if profile == "k400" else "ViT-L-14")
    assert resolved(S.LdaSettings).per_class == 60


def test_a_profile_runs_with_a_root_override(tmp_path, ucf_tree):
    profile = Path(__file__).parents[1] / "data" / "profiles" / "ucf101.yaml"
    out = run_cli("frames", "--params", str(profile), "--root", str(ucf_tree), "--workers", "1", "--split", "train",
                  "--cache", str(tmp_path / "c"), "-q")
    assert "ucf101/train: 6 videos, 6 ok" in out.stdout
    g = zarr.open_group(str(tmp_path / "c" / "frames" / "ucf101" / "train"), mode="r")
    assert g.attrs["spec"]["num_frames"] == 16 and read_frames(g, 0).shape == (16, 256, 456, 3)


def _dvc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    import shutil

    dvc = shutil.which("dvc") or str(Path(sys.executable).parent / "dvc")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1"}
    return subprocess.run([dvc, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


def test_profile_pipelines_are_valid_dvc_stages_and_stay_out_of_the_demos_status():
    root = Path(__file__).parents[1]
    out = _dvc("stage", "list", cwd=root / "data" / "profiles")
    assert out.returncode == 0, out.stderr
    for profile in ("k400", "k600", "ucf101", "hmdb51", "anet", "custom"):
        for stage in ("frames", "features", "labels", "heads", "evaluate"):
            assert f"{stage}@{profile}" in out.stdout
    for stage in ("finetune-k400", "table1@4x3", "table4@ucf101", "table4-k600", "finetune-k400-vitl14"):
        assert stage in out.stdout
    demo = _dvc("stage", "list", cwd=root)  # the root project: the demo only
    assert demo.returncode == 0 and "frames@k400" not in demo.stdout and "world" in demo.stdout


def test_a_custom_profile_chain_runs_and_depends_on_its_videos(tmp_path, template):
    """data/profiles/custom.yaml with your own folder: `dvc repro frames@custom` in the profiles project,
    then a new video marks it changed."""
    import shutil

    import yaml

    root = Path(__file__).parents[1]
    repo = tmp_path / "repo"
    for name in ("pipeline", "stages"):
        shutil.copytree(root / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    profiles = repo / "data" / "profiles"
    shutil.copytree(root / "data" / "profiles", profiles, ignore=shutil.ignore_patterns("cache", "tmp"))
    videos = tmp_path / "my videos"
    for cls in ("jump", "run"):
        for i in range(3):
            copy_video(template, videos / cls / f"{cls} {i}.mp4")
    datasets = yaml.safe_load((profiles / "datasets.yaml").read_text())
    datasets["datasets"]["custom"]["root"] = str(videos)
    (profiles / "datasets.yaml").write_text(yaml.safe_dump(datasets))
    custom = yaml.safe_load((profiles / "custom.yaml").read_text())
    custom["frames"].update(cache_frames=2, height=16, width=24, workers=1)
    custom["data"]["val_fraction"] = 0.34
    (profiles / "custom.yaml").write_text(yaml.safe_dump(custom))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    proc = _dvc("repro", "frames@custom", cwd=profiles)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    stored = zarr.open_group(str(profiles / "cache" / "frames" / "custom" / "train"), mode="r")
    assert stored["status"].shape[0] == 4  # 2 of 6 videos held out as val
    assert "changed" not in _dvc("status", "frames@custom", cwd=profiles).stdout
    copy_video(template, videos / "run" / "run 3.mp4")
    status = _dvc("status", "frames@custom", cwd=profiles).stdout
    assert "frames@custom" in status and "modified" in status and str(videos) in status


def test_k400_profile_holds_the_papers_finetuning_recipe():
    from pipeline.core import settings as S
    from pipeline.core.params import Params
    from pipeline.core.settings import load_params

    params = load_params(Path(__file__).parents[1] / "data" / "profiles" / "k400.yaml")
    r = S.resolve(S.FinetuneSettings, lambda section: Params(params, section), {})
    ft = r.values
    assert not r.notes, r.notes
    assert (ft.frames, ft.epochs, ft.global_batch_size) == (8, 30, 256)
    assert r.sources["global_batch_size"] == "params: finetune.global_batch_size"
    assert ft.lr == 5e-5 and ft.backbone_lr_ratio == 0.1
    assert ft.randaugment == (2, 9) and ft.grayscale == 0.2
