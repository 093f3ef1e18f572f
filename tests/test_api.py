"""The public Python API and xarray: what a user reads from the cache without the command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import run_inproc

import pipeline
from pipeline.core.errors import DamagedStore, PipelineError


@pytest.fixture(scope="module")
def api_cache(extracted, tmp_path_factory):
    src, tiny = extracted
    cache = tmp_path_factory.mktemp("api") / "cache"
    shutil.copytree(src, cache)
    m = ["--model", f"local-dir:{tiny}", "--cache", str(cache)]
    run_inproc("heads", "-d", "toy", *m, "--head", "prototype", "--per-class", "3", "--replace-mismatched")
    run_inproc("finetune", "--frozen-backbone", "-d", "toy", *m, "--head", "prototype", "--frames", "2",
               "--epochs", "1", "--global-batch-size", "16", "--run-name", "r", "-q")
    return cache


def test_open_functions_return_arrays_and_a_table_of_videos(api_cache):
    frames = pipeline.open_frames(api_cache / "frames" / "toy" / "val")
    table = frames.table()
    assert list(table.columns) == ["video_id", "path", "label", "class_name", "status", "reason", "added_in",
                                   "dropped_in"]
    assert len(table) == 24 and set(table["status"]) == {"ok"}
    assert table["class_name"].tolist() == [frames.class_names[y] for y in table["label"]]
    assert frames.frames(3).shape == (4, 32, 32, 3) and frames.frames(3).dtype == np.uint8
    feats = pipeline.open_features(api_cache / "features" / "toy" / "tiny-clip" / "val")
    x, y, rows = feats.video_features()
    assert x.shape == (24, 32) and np.allclose(x[5], feats.features[5].astype(np.float64).mean(0), atol=1e-3)
    head = pipeline.open_head(api_cache / "heads" / "toy" / "tiny-clip" / "prototype")
    assert head.weights.shape == (12, 32) and head.fingerprint == head.attrs["fingerprint"]
    run = pipeline.open_run(api_cache / "runs" / "r")
    assert run.info["head"] == "prototype" and run.metrics["steps"] == len(
        [h for h in run.history if h["kind"] == "step"])
    assert set(run.state_dict()) and all(hasattr(v, "shape") for v in run.state_dict().values())
    with pytest.raises(PipelineError, match="not 'frames'"):
        pipeline.open_frames(api_cache / "features" / "toy" / "tiny-clip" / "val")
    with pytest.raises(AttributeError):
        pipeline.open_nothing  # noqa: B018


def test_opening_checks_integrity(api_cache, tmp_path):
    copy = tmp_path / "prototype"
    shutil.copytree(api_cache / "heads" / "toy" / "tiny-clip" / "prototype", copy)
    (copy / "head" / "c" / "0" / "0").unlink()
    with pytest.raises(DamagedStore):
        pipeline.open_head(copy)


def test_xarray_opens_every_output_with_named_dimensions(api_cache):
    xr = pytest.importorskip("xarray")
    ds = xr.open_zarr(api_cache / "features" / "toy" / "tiny-clip" / "train", consolidated=False)
    assert ds["features"].dims == ("video", "frame", "feature") and ds.sizes["video"] == 60
    assert ds["status"].dims == ("video",) and ds["block_done"].dims == ("block",)
    group = zarr.open_group(str(api_cache / "features" / "toy" / "tiny-clip" / "train"), mode="r")
    assert np.array_equal(ds["features"].values, group["features"][:])
    frames = xr.open_zarr(api_cache / "frames" / "toy" / "val", consolidated=False)
    assert frames["frames"].dims == ("video", "frame") and frames["frame_index"].dims == ("video", "frame")
    head = xr.open_zarr(api_cache / "heads" / "toy" / "tiny-clip" / "prototype", consolidated=False)
    assert head["head"].dims == ("class", "feature")
    labels = xr.open_zarr(api_cache / "labels" / "toy" / "clip-tiny-clip", consolidated=False)
    assert labels["embeddings"].dims == ("class", "feature")


def test_status_lists_runs_with_state_and_stores_with_kind_and_model(api_cache):
    from test_frames_stage import run_cli

    entries = json.loads(run_cli("status", "--json", "--cache", str(api_cache)).stdout)
    run = next(e for e in entries if e["stage"] == "run")
    assert run["name"] == "r" and run["state"] == "complete" and run["kind"] == "prototype"
    assert run["step"] == run["steps"] > 0 and run["model"] == "tiny-clip"
    head = next(e for e in entries if e["stage"] == "heads" and e["kind"] == "prototype")
    assert head["name"] == "toy/tiny-clip/prototype" and head["model"] == "tiny-clip"
    text = run_cli("status", "--cache", str(api_cache)).stdout
    assert "heads    toy/tiny-clip/prototype" in text and "run      r" in text and "complete, step" in text


def test_exports_carry_provenance(api_cache, tmp_path):
    import h5py
    from test_frames_stage import run_cli

    out = tmp_path / "val.h5"
    run_cli("export", "--what", "features", "-d", "toy", "--model", "tiny-clip", "--split", "val",
            "--out", str(out), "--cache", str(api_cache))
    with h5py.File(out, "r") as f:
        provenance = json.loads(f.attrs["provenance"])
        assert f.attrs["model_tag"] == "tiny-clip" and f.attrs["precision"] == "fp32"
        assert json.loads(f.attrs["model"])["weights_sha256"] == provenance["model"]["weights_sha256"]
        assert provenance["frames_fingerprint"] == f.attrs["frames_fingerprint"]
        assert f["video_id"].asstr()[0] == pipeline.open_features(
            api_cache / "features" / "toy" / "tiny-clip" / "val").table()["video_id"][0]


def test_a_flat_folder_warns_without_a_validation_split_and_val_fraction_holds_one_out(tmp_path, template):
    from test_frames_stage import SMALL, run_cli

    root = tmp_path / "clips"
    for c in ("jump rope", "wave"):
        (root / c).mkdir(parents=True)
        for i in range(10):
            shutil.copyfile(template, root / c / f"v{i}.mp4")
    proc = run_cli("frames", "--dataset", "folder", "--root", str(root), "--cache", str(tmp_path / "a"), *SMALL)
    assert "warning: folder has no validation split" in proc.stderr and "--val-fraction" in proc.stderr
    args = ["frames", "--dataset", "folder", "--root", str(root), "--val-fraction", "0.2", *SMALL]
    proc = run_cli(*args, "--cache", str(tmp_path / "b"))
    assert "warning" not in proc.stderr
    val = pipeline.open_frames(tmp_path / "b" / "frames" / "folder" / "val").table()
    train = pipeline.open_frames(tmp_path / "b" / "frames" / "folder" / "train").table()
    assert val["class_name"].value_counts().to_dict() == {"jump rope": 2, "wave": 2} and len(train) == 16
    run_cli(*args, "--cache", str(tmp_path / "c"))  # seeded: the same videos each time
    again = pipeline.open_frames(tmp_path / "c" / "frames" / "folder" / "val").table()
    assert again["video_id"].tolist() == val["video_id"].tolist()


def test_warm_up_longer_than_the_run_and_half_protocol_on_few_classes_warn(api_cache, extracted):
    import warnings

    from test_frames_stage import run_cli

    proc = run_cli("finetune", "--frozen-backbone", "-d", "toy", "--model", f"local-dir:{extracted[1]}", "--head",
                   "prototype", "--frames", "2", "--epochs", "1", "--warmup-epochs", "5", "--global-batch-size", "16",
                   "--run-name", "w", "-q", "--cache", str(api_cache))
    assert "warning: the warm-up (5 epochs, 20 steps) is as long as the whole run (4 steps)" in proc.stderr

    from pipeline.learning.evaluation import half_classes

    rng = np.random.default_rng(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        half_classes(rng.standard_normal((6, 3)), np.array([0, 1, 2, 0, 1, 2]))
    assert any("scores 1 class(es) per draw" in str(w.message) for w in caught)


@pytest.mark.parametrize("mode", ["shortest", "longest", "squash"])
def test_preprocessing_follows_the_models_resize_mode(mode):
    import torch
    from torchvision.transforms.v2 import functional as F

    from pipeline.models.clip import LoadedClip
    from pipeline.storage.featurestore import preprocess

    frame = np.zeros((1, 32, 64, 3), np.uint8)
    frame[:, :, 32:] = 255  # left half black, right half white
    clip = LoadedClip(model=None, tokenizer=None, image_size=16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                      interpolation="bilinear", resize_mode=mode)
    out = preprocess(frame, clip)[0]
    assert out.shape == (3, 16, 16)
    x = torch.from_numpy(frame).permute(0, 3, 1, 2).float() / 255
    if mode == "squash":  # the whole frame, aspect ratio not kept: both halves present
        expected = F.resize(x, [16, 16], interpolation=F.InterpolationMode.BILINEAR, antialias=True)[0]
        assert torch.allclose(out, expected) and out[:, :, 0].max() < 0.05 and out[:, :, -1].min() > 0.95
    elif mode == "longest":  # the whole frame in 16 x 8, black bands above and below
        assert out[:, :4].abs().max() == 0 and out[:, -4:].abs().max() == 0 and out[:, 8, -1].min() > 0.95
    else:  # the centre 32 x 32 square, resized: its left half black, its right half white
        assert out[:, 8, 0].max() < 0.05 and out[:, 8, -1].min() > 0.95 and out[:, 0].abs().sum() > 0


def test_a_models_resize_mode_comes_from_its_open_clip_config(tiny_clip, tmp_path):
    from pipeline.models.clip import ModelSpec, load_clip

    folder = tmp_path / "squash-clip"
    shutil.copytree(tiny_clip, folder)
    config = json.loads((folder / "open_clip_config.json").read_text())
    config["preprocess_cfg"]["resize_mode"] = "squash"
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    clip = load_clip(ModelSpec(f"local-dir:{folder}"))
    assert clip.resize_mode == "squash" and clip.identity["preprocess"]["resize_mode"] == "squash"
    assert load_clip(ModelSpec(f"local-dir:{tiny_clip}")).resize_mode == "shortest"


@pytest.mark.slow
def test_commands_that_read_the_cache_take_its_one_model_and_list_them_when_several(api_cache, tmp_path, extracted):
    from test_frames_stage import run_cli

    cache = tmp_path / "cache"
    shutil.copytree(api_cache, cache)
    out = run_cli("evaluate", "-d", "toy", "--head", "prototype", "--cache", str(cache)).stdout  # no --model
    assert "model tiny-clip" in out
    other = tmp_path / "tiny-clip-b"
    shutil.copytree(extracted[1], other)
    run_cli("features", "-d", "toy", "--model", f"local-dir:{other}", "--split", "val", "--quiet",
            "--cache", str(cache))
    proc = run_cli("evaluate", "-d", "toy", "--head", "prototype", "--cache", str(cache), check=False)
    assert proc.returncode == 2 and "several models (tiny-clip, tiny-clip-b-" in proc.stderr
    assert "--model-key" in proc.stderr
    out = run_cli("evaluate", "-d", "toy", "--head", "prototype", "--model-key", "tiny-clip", "--cache", str(cache))
    assert "model tiny-clip" in out.stdout


@pytest.mark.slow
def test_two_checkpoints_with_the_same_name_get_their_own_cache_keys(api_cache, tmp_path, extracted):
    """The key is the name plus a hash of the weights: two folders called tiny-clip (other weights) never
    share features, and nothing advises deleting the other model's outputs."""
    from conftest import write_tiny_clip
    from test_frames_stage import run_cli

    from pipeline.models.clip import ModelSpec

    first = tmp_path / "a" / "tiny-clip"
    second = write_tiny_clip(tmp_path / "b" / "tiny-clip", seed=1)
    shutil.copytree(extracted[1], first)
    keys = [ModelSpec(name=f"local-dir:{m}").tag for m in (first, second)]
    assert keys[0] != keys[1] and all(k.startswith("tiny-clip-") and len(k) == len("tiny-clip-") + 8 for k in keys)
    assert ModelSpec(name=f"local-dir:{first}").tag == ModelSpec(name=f"local-dir:{extracted[1]}").tag  # same weights
    cache = tmp_path / "cache"
    shutil.copytree(api_cache, cache)
    for model in (first, second):
        run_cli("features", "-d", "toy", "--model", f"local-dir:{model}", "--split", "val", "--quiet",
                "--cache", str(cache))
    stored = sorted(p.name for p in (cache / "features" / "toy").iterdir())
    assert stored == sorted(["tiny-clip", *keys])
    # --model finds its own features again (no --model-key needed)
    out = run_cli("evaluate", "-d", "toy", "--head", "prototype", "--model", f"local-dir:{extracted[1]}",
                  "--cache", str(cache))
    assert "model tiny-clip" in out.stdout


def test_no_params_ignores_the_repositorys_params_file(tmp_path, template):
    from test_frames_stage import run_cli

    root = tmp_path / "clips"
    (root / "a").mkdir(parents=True)
    shutil.copyfile(template, root / "a" / "v.mp4")
    repo = Path(__file__).resolve().parents[1]  # holds the demo's params.yaml (64 x 64 frames)
    args = ["frames", "--dataset", "folder", "--root", str(root), "--cache-frames", "2", "--quiet"]
    run_cli(*args, "--cache", str(tmp_path / "with"), cwd=repo)
    run_cli(*args, "--no-params", "--cache", str(tmp_path / "without"), cwd=repo)
    spec = lambda c: pipeline.open_frames(tmp_path / c / "frames" / "folder" / "train").attrs["spec"]  # noqa: E731
    assert (spec("with")["height"], spec("with")["width"]) == (64, 64)
    assert (spec("without")["height"], spec("without")["width"]) == (256, 456)
    proc = run_cli(*args, "--no-params", "--params", "x.yaml", "--cache", str(tmp_path / "c"), cwd=repo, check=False)
    assert proc.returncode == 2 and "exclude each other" in proc.stderr
