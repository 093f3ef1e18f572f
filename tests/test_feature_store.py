"""Feature store end to end with a tiny local-dir CLIP: features, labels, heads, evaluation, exports."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr
from conftest import run_inproc, sigkill_mid_run, write_tiny_clip
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from test_frames_stage import run_cli

from pipeline.core.errors import PipelineError
from pipeline.learning import evaluation
from pipeline.models.clip import LoadedClip, ModelSpec, load_clip, quick_gelu_for
from pipeline.models.heads import lda_head, orthogonal_head
from pipeline.models.text import KINETICS_TEMPLATES, encode_with_clip, resolve_templates
from pipeline.storage import store
from pipeline.storage.featurestore import preprocess


def model_args(tiny: Path) -> list[str]:
    return ["--model", f"local-dir:{tiny}"]


def test_extract_fills_frames_features_and_labels(extracted):
    cache, tiny = extracted
    status = json.loads(run_cli("status", "--json", "--cache", str(cache)).stdout)
    entries = {(e["stage"], e["split"]): e for e in status}
    assert entries[("features", "train")]["ok"] == 60 and entries[("features", "val")]["ok"] == 24
    assert entries[("labels", "-")]["total"] == 12
    g = zarr.open_group(str(cache / "features" / "toy" / "tiny-clip" / "train"), mode="r")
    assert g["features"].dtype == np.float16 and g["features"].shape == (60, 4, 32)
    # rows aligned with the frame store, and equal to encoding the stored frames directly
    frames = zarr.open_group(str(cache / "frames" / "toy" / "train"), mode="r")
    assert g["video_id"][:].tolist() == frames["video_id"][:].tolist()
    from pipeline.storage.framestore import read_frames

    clip = load_clip(ModelSpec(f"local-dir:{tiny}"))
    with torch.no_grad():
        direct = clip.model.encode_image(preprocess(read_frames(frames, 7), clip)).numpy()
    assert np.allclose(g["features"][7].astype(np.float32), direct, atol=2e-3)


def test_every_head_kind_and_lda_matches_sklearn(extracted):
    cache, tiny = extracted
    m = model_args(tiny)
    for kind in ("clip-text", "random", "orthogonal", "prototype"):
        run_inproc("heads", "-d", "toy", *m, "--head", kind, "--per-class", "3", "--cache", str(cache))
    run_inproc("lda", "-d", "toy", *m, "--per-class", "3", "--cache", str(cache))
    heads = cache / "heads" / "toy" / "tiny-clip"
    kinds = ("clip-text", "random", "orthogonal", "prototype", "lda")
    h = {k: zarr.open_group(str(heads / k), mode="r") for k in kinds}
    for g in h.values():
        assert g["head"].shape == (12, 32) and g["head"].dtype == np.float32
    orth = h["orthogonal"]["head"][:]
    assert np.allclose(orth @ orth.T, np.eye(12), atol=1e-5)
    labels = zarr.open_group(str(cache / "labels" / "toy" / "clip-tiny-clip"), mode="r")
    assert np.array_equal(h["clip-text"]["head"][:], labels["embeddings"][:])

    # LDA = scikit-learn's coef_ on the same sampled, time-averaged features
    feats = zarr.open_group(str(cache / "features" / "toy" / "tiny-clip" / "train"), mode="r")
    ids = feats["video_id"][:].tolist()
    sample = h["lda"]["sample_video_id"][:].tolist()
    assert len(sample) == 36 and len(set(sample)) == 36  # 3 per class
    rows = np.array([ids.index(v) for v in sample])
    x = feats["features"][:][rows].astype(np.float32).mean(axis=1)
    y = feats["label"][:][rows]
    expected = LinearDiscriminantAnalysis(solver="svd").fit(x.astype(np.float64), y).coef_
    assert np.allclose(h["lda"]["head"][:], expected, rtol=1e-4, atol=1e-4)
    # the prototype head is the normalised class means of the same sample
    means = np.stack([x[y == c].mean(0) for c in range(12)])
    assert np.allclose(h["prototype"]["head"][:], means / np.linalg.norm(means, axis=1, keepdims=True), atol=1e-5)
    # same seed, same sample; another seed, another sample
    run_inproc("lda", "-d", "toy", *m, "--per-class", "3", "--seed", "1", "--cache", str(cache), "--replace-mismatched")
    assert zarr.open_group(str(heads / "lda"), mode="r")["sample_video_id"][:].tolist() != sample

    png = run_inproc("plot-heads", "-d", "toy", *m, "--head", "clip-text", "--head", "lda", "--cache", str(cache))
    for kind in ("clip-text", "lda"):
        path = cache / "plots" / "toy" / f"head-correlation-{kind}.png"
        assert f"wrote {path}" in png and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_protocols_and_json(extracted, tmp_path):
    cache, tiny = extracted
    m = model_args(tiny)
    run_inproc("heads", "-d", "toy", *m, "--head", "prototype", "--per-class", "5", "--cache", str(cache),
               "--replace-mismatched")
    subset = tmp_path / "s1.csv"
    subset.write_text("a small red disc,a large blue ring\na small green ring\n")
    out = run_inproc("evaluate", "-d", "toy", *m, "--head", "prototype", "--protocol", "full", "--protocol", "half",
                     "--protocol", "subsets", "--subsets", str(subset), "--json", "--out", str(tmp_path / "m.json"),
                     "--cache", str(cache))
    result = json.loads(out)
    assert result == json.loads((tmp_path / "m.json").read_text())
    assert result["full"]["videos"] == 24 and 0 <= result["full"]["top1"] <= 100
    assert result["full"]["top5"] >= result["full"]["top1"]
    assert len(result["half"]["runs"]) == 10 and all(r["classes"] == 6 for r in result["half"]["runs"])
    assert result["subsets"]["runs"][0]["classes"] == 3
    again = json.loads(run_inproc("evaluate", "-d", "toy", *m, "--head", "prototype", "--protocol", "half", "--json",
                                  "--cache", str(cache)))
    assert again["half"] == result["half"]  # seeds 0..9: reproducible
    table = run_inproc("evaluate", "-d", "toy", *m, "--head", "prototype", "--protocol", "half", "--cache", str(cache))
    assert "+-" in table and "half" in table


def test_metrics_on_a_constructed_example():
    # 4 videos, 3 classes; logits chosen so that the answers are known
    logits = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1], [0.1, 0.3, 0.6]])
    labels = np.array([0, 1, 1, 0])
    m = evaluation.metrics(logits, labels)
    assert m["top1"] == 50.0  # videos 0 and 1
    assert m["top5"] == 100.0  # top-3 (C < 5) always contains the label
    assert m["mean_class"] == 50.0  # class 0: 1/2, class 1: 1/2
    feats = np.array([[1.0, 0.0], [0.0, 2.0]])
    head = np.array([[3.0, 0.0], [0.0, 1.0]])
    assert np.allclose(evaluation.cosine_logits(feats, head), np.eye(2))
    with pytest.raises(PipelineError, match="head width 3 differs from the feature width 2"):
        evaluation.cosine_logits(feats, np.ones((2, 3)))
    # restricted to classes {1, 2}: a video of class 1 chooses among those only (class 0 scores higher)
    r = evaluation.restricted(np.array([[2.0, 1.0, 0.2]]), np.array([1]), np.array([1, 2]))
    assert r["top1"] == 100.0 and r["classes"] == 1
    two = np.array([[2.0, 1.0, 0.2], [2.0, 1.0, 0.2]])
    assert evaluation.restricted(two, np.array([1, 0]), np.array([0, 1, 2]))["top1"] == 50.0  # class 0 competes
    # a drawn class without videos does not compete, as the official code (test_zeroshot.py:304)
    alone = evaluation.restricted(np.array([[2.0, 1.0, 0.2]]), np.array([1]), np.array([0, 1, 2]))
    assert alone["top1"] == 100.0 and alone["classes"] == 1


def test_orthogonal_head_rejects_more_classes_than_dimensions():
    with pytest.raises(PipelineError, match="classes <= width"):
        orthogonal_head(40, 32, 0)
    h = orthogonal_head(32, 32, 5)
    assert np.allclose(h @ h.T, np.eye(32), atol=1e-5) and np.array_equal(h, orthogonal_head(32, 32, 5))


def test_an_lda_fit_that_follows_float16_rounding_warns_and_shrinkage_steadies_it():
    """The demo's case (8 videos a class): a within-class direction about as thin as float16 rounding. The
    unshrunk head then moves by tens of percent when the features are rounded; the stage says so."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(12), 20)
    healthy = rng.standard_normal((240, 16)) + rng.standard_normal((12, 16))[y]
    q, _ = np.linalg.qr(rng.standard_normal((16, 16)))
    thin = healthy @ q
    thin[:, 0] = 3.0 + 3e-4 * rng.standard_normal(240)  # no class signal, spread near the rounding step
    thin = (thin @ q.T).astype(np.float32)
    rounded = thin.astype(np.float16).astype(np.float32)

    def fit(x, **kw):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            head = lda_head(x, y, 12, **kw)
        return head, [str(w.message) for w in caught]

    head, said = fit(healthy)
    assert said == []
    head, said = fit(thin)
    assert len(said) == 1 and said[0].startswith("the LDA fit is ill-conditioned") and "--shrinkage auto" in said[0]
    # what the warning claims: rounding the features to float16 moves the unshrunk head far, the shrunk one not
    moved = np.linalg.norm(fit(rounded)[0] - head) / np.linalg.norm(head)
    shrunk, said = fit(thin, solver="lsqr", shrinkage="auto")
    assert said == []
    shrunk_moved = np.linalg.norm(fit(rounded, solver="lsqr", shrinkage="auto")[0] - shrunk) / np.linalg.norm(shrunk)
    assert moved > 0.2 and shrunk_moved < 1e-3, (moved, shrunk_moved)


def test_the_lda_stage_prints_the_ill_conditioning_warning(extracted, tmp_path, monkeypatch):
    from pipeline.models import heads

    shared, tiny = extracted
    cache = tmp_path / "cache"  # its own copy: the shared cache's lda head stays the other tests'
    shutil.copytree(shared / "frames", cache / "frames")
    shutil.copytree(shared / "features", cache / "features")
    shutil.copytree(shared / "labels", cache / "labels")
    monkeypatch.setattr(heads, "MOVED_TOO_FAR", -1.0)  # the toy sample is well-conditioned: make any fit "too far"
    out = run_inproc("lda", "-d", "toy", *model_args(tiny), "--per-class", "3", "--cache", str(cache))
    assert out.count("warning: the LDA fit is ill-conditioned") == 1  # the check's second fit says nothing twice
    # a fit that fails still prints what the sampling said before it
    proc = run_cli("lda", "-d", "toy", *model_args(tiny), "--per-class", "100", "--shrinkage", "0.5", "--cache",
                   str(cache), "--replace-mismatched", check=False)
    assert proc.returncode == 2 and "needs solver 'lsqr' or 'eigen'" in proc.stderr
    assert "warning: 12 classes have fewer than 100 videos" in proc.stderr


def test_preprocessing_uses_the_models_constants(tiny_clip):
    clip = load_clip(ModelSpec(f"local-dir:{tiny_clip}"))
    frames = np.full((2, 48, 64, 3), 128, np.uint8)
    x = preprocess(frames, clip)
    assert x.shape == (2, 3, 32, 32)
    expected = (128 / 255 - np.array(clip.mean)) / np.array(clip.std)
    assert np.allclose(x[0, :, 5, 5].numpy(), expected, atol=1e-4)


def test_quick_gelu_follows_the_pretrained_tag():
    assert quick_gelu_for(ModelSpec("ViT-B-16", "openai")) is True
    assert quick_gelu_for(ModelSpec("ViT-B-16", "laion2b_s34b_b88k")) is False
    assert quick_gelu_for(ModelSpec("ViT-B-16", "/w.pt", quick_gelu=True)) is True
    assert ModelSpec("ViT-B-16", "openai").tag == "ViT-B-16-openai"


def test_missing_weights_offline_is_a_one_line_error_within_seconds(tmp_path):
    import time

    started = time.monotonic()
    with pytest.raises(PipelineError, match="not in open_clip's local cache and the hub cannot be reached.*"
                                            "--pretrained /path/to/the/file --quick-gelu") as e:
        load_clip(ModelSpec("ViT-B-16", "openai"))
    assert time.monotonic() - started < 20  # no minute of silent retries (model construction included)
    assert "huggingface.co/timm/vit_base_patch16_clip_224.openai" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(PipelineError, match="neither a checkpoint file nor a tag"):
        load_clip(ModelSpec("ViT-B-16", "no-such-tag"))
    with pytest.raises(PipelineError, match="no open_clip_config.json"):
        load_clip(ModelSpec(f"local-dir:{tmp_path}"))


def test_templates_and_prompt_ensembling(tiny_clip):
    assert len(KINETICS_TEMPLATES) == 28 and len(set(KINETICS_TEMPLATES)) == 28
    assert resolve_templates("paper") == ["a video of a person {}."]
    clip: LoadedClip = load_clip(ModelSpec(f"local-dir:{tiny_clip}"))
    names = ["jumping", "running"]
    both = encode_with_clip(clip, names, ["a photo of {}.", "a video of {}."], "cpu")
    a = encode_with_clip(clip, names, ["a photo of {}."], "cpu")
    b = encode_with_clip(clip, names, ["a video of {}."], "cpu")
    mean = (a + b) / np.linalg.norm(a + b, axis=1, keepdims=True)
    assert np.allclose(both, mean, atol=1e-5)


def test_hf_text_encoder_labels_and_text_head(extracted):
    cache, tiny = extracted
    m = model_args(tiny)
    run_inproc("labels", "-d", "toy", *m, "--encoder", "hf:all-MiniLM-L6-v2", "--cache", str(cache))
    g = zarr.open_group(str(cache / "labels" / "toy" / "hf-all-MiniLM-L6-v2"), mode="r")
    emb = g["embeddings"][:]
    assert emb.shape == (12, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    run_inproc("heads", "-d", "toy", *m, "--head", "text", "--encoder", "hf:all-MiniLM-L6-v2", "--cache", str(cache))
    proc = run_cli("evaluate", "-d", "toy", *m, "--head", "text", "--encoder", "hf:all-MiniLM-L6-v2",
                   "--cache", str(cache), check=False)
    assert proc.returncode == 2 and "only a trained run's projection can bridge it" in proc.stderr


def test_exports_round_trip(extracted, tmp_path):
    cache, tiny = extracted
    m = model_args(tiny)
    run_inproc("export", "--what", "features", "-d", "toy", "--split", "val", *m,
               "--out", str(tmp_path / "f.h5"), "--cache", str(cache))
    run_inproc("export", "--what", "labels", "-d", "toy", *m, "--out", str(tmp_path / "l.npz"),
               "--cache", str(cache))
    g = zarr.open_group(str(cache / "features" / "toy" / "tiny-clip" / "val"), mode="r")
    with h5py.File(tmp_path / "f.h5", "r") as f:
        assert np.array_equal(f["features"][:], g["features"][:]) and f["features"].dtype == np.float16
        assert [v.decode() for v in f["video_id"][:]] == g["video_id"][:].tolist()
        assert list(f.attrs["class_names"]) == list(g.attrs["class_names"])
    with np.load(tmp_path / "l.npz") as z:
        lab = zarr.open_group(str(cache / "labels" / "toy" / "clip-tiny-clip"), mode="r")
        assert np.array_equal(z["embeddings"], lab["embeddings"][:])


def test_npz_exports_equal_the_store_and_the_suffix_always_names_the_format(extracted, tmp_path):
    from pipeline.storage.framestore import read_frames
    from stages.export import FEATURE_ARRAYS, FRAME_ARRAYS

    cache, tiny = extracted
    run_inproc("export", "--what", "features", "-d", "toy", "--split", "train", *model_args(tiny),
               "--out", str(tmp_path / "f.npz"), "--cache", str(cache))
    run_inproc("export", "--what", "frames", "-d", "toy", "--split", "val", "--out", str(tmp_path / "v.npz"),
               "--cache", str(cache))
    for out, path, names in ((tmp_path / "f.npz", cache / "features" / "toy" / "tiny-clip" / "train", FEATURE_ARRAYS),
                             (tmp_path / "v.npz", cache / "frames" / "toy" / "val", FRAME_ARRAYS)):
        g = zarr.open_group(str(path), mode="r")
        with np.load(out) as z:  # allow_pickle=False: plain arrays only
            for name in names:
                want = read_frames(g, slice(None)) if name == "frames" else g[name][:]
                got = z[name]
                assert got.shape == want.shape and got.dtype.kind == ("U" if want.dtype.kind in "OTU" else
                                                                       want.dtype.kind), name
                assert np.array_equal(got, np.asarray(want.tolist()) if want.dtype.kind in "OT" else want), name
            assert z["attr_class_names"].tolist() == list(g.attrs["class_names"])
            assert str(z["attr_fingerprint"]) == g.attrs["fingerprint"]

    # the suffix names the format; the deprecated --format may only agree with it
    proc = run_cli("export", "--what", "labels", "-d", "toy", *model_args(tiny), "--out", str(tmp_path / "x.npz"),
                   "--format", "h5", "--cache", str(cache), check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines[-1].startswith("error: format h5 contradicts --out") and len(lines) == 2
    assert not (tmp_path / "x.npz").exists()
    proc = run_cli("export", "--what", "labels", "-d", "toy", *model_args(tiny), "--out", str(tmp_path / "x.dat"),
                   "--format", "npz", "--cache", str(cache), check=False)
    assert proc.returncode == 2 and "error: --out" in proc.stderr and "name it .npz" in proc.stderr
    run_inproc("export", "--what", "labels", "-d", "toy", *model_args(tiny), "--out", str(tmp_path / "x.h5"),
               "--format", "h5", "--cache", str(cache))
    assert (tmp_path / "x.h5").read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"
    assert (tmp_path / "f.npz").read_bytes()[:2] == b"PK"


def test_npz_export_streams_a_store_larger_than_a_block(tmp_path):
    """Peak memory of an .npz export is a few blocks, not the store (np.savez held it all)."""
    import tracemalloc

    from pipeline.storage.export import export_arrays

    rng = np.random.default_rng(0)
    n, rows = 2048, 16
    g = zarr.open_group(str(tmp_path / "store"), mode="w")
    feats = g.create_array("features", shape=(n, 8, 256), dtype="float16", chunks=(rows, 8, 256))
    feats[:] = rng.standard_normal((n, 8, 256)).astype(np.float16)  # 8 MiB
    labels = g.create_array("label", shape=(n,), dtype="int64", chunks=(rows,))
    labels[:] = rng.integers(0, 12, n)
    tracemalloc.start()
    try:
        export_arrays(tmp_path / "big.npz", None, {"features": feats, "label": labels}, {"fingerprint": "abc"},
                      rows_per_read=rows)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    total = feats.nbytes + labels.nbytes
    assert peak < total / 8, f"peak {peak / 2**20:.1f} MiB for a {total / 2**20:.1f} MiB store"
    with np.load(tmp_path / "big.npz") as z:
        assert np.array_equal(z["features"], feats[:]) and z["features"].dtype == np.float16
        assert np.array_equal(z["label"], labels[:]) and str(z["attr_fingerprint"]) == "abc"


@pytest.mark.slow
def test_features_kill_resume_identical_and_new_weights_never_mix(extracted, tmp_path):
    cache, tiny = extracted
    work = tmp_path / "cache"
    shutil.copytree(cache / "frames", work / "frames")
    args = ["features", "-d", "toy", "--model", f"local-dir:{tiny}", "--model-key", "tiny-clip", "--quiet",
            "--batch-size", "2", "--cache", str(work)]
    sigkill_mid_run(args, work / "features" / "toy" / "tiny-clip" / "train", tmp_path)
    group = zarr.open_group(str(work / "features" / "toy" / "tiny-clip" / "train"), mode="r")
    assert 0 < len(store.pending_blocks(group)) < 15, "the kill should land mid-run"
    run_inproc(*args)
    clean = tmp_path / "clean"
    shutil.copytree(cache / "frames", clean / "frames")
    run_inproc(*args[:-1], str(clean))  # uninterrupted, same parameters
    for split in ("train", "val"):
        a = zarr.open_group(str(work / "features" / "toy" / "tiny-clip" / split), mode="r")
        b = zarr.open_group(str(clean / "features" / "toy" / "tiny-clip" / split), mode="r")
        assert np.array_equal(a["features"][:], b["features"][:]) and np.array_equal(a["status"][:], b["status"][:])
    # another batch size is another output (row bits depend on it): refused, not mixed
    proc = run_cli(*[a if a != "2" else "4" for a in args], check=False)
    assert proc.returncode == 2 and "changed: batch_size" in proc.stderr

    # new weights under the same key: other fingerprint -> refused, never mixed, and the advice is a key of its
    # own (not deleting the other model's features)
    write_tiny_clip(tiny.parent / "retrained" / "tiny-clip", seed=1)
    other = ["features", "-d", "toy", "--model", f"local-dir:{tiny.parent / 'retrained' / 'tiny-clip'}",
             "--model-key", "tiny-clip", "--cache", str(work), "--quiet"]
    proc = run_cli(*other, check=False)
    assert proc.returncode == 2 and "weights_sha256" in proc.stderr and "its own --model-key" in proc.stderr
    # without --model-key the retrained model gets a key of its own: both models' features are kept
    run_cli(*[a for a in other if a not in ("--model-key", "tiny-clip")])
    assert len(list((work / "features" / "toy").iterdir())) == 2


def test_predict_labels_videos_zero_shot(tiny_clip, tmp_path):
    from videos import write_video

    from stages import predict as predict_stage

    video = write_video(tmp_path / "v.mp4", n_frames=12, width=48, height=32)
    out = run_inproc("predict", video, "--quiet", "--model", f"local-dir:{tiny_clip}", "--labels",
                     "jumping,running,swimming,juggling,surfing,rowing", "--frames", "4")
    lines = out.strip().splitlines()
    assert lines[0] == video and len(lines) == 6  # the video, then its top 5
    probs = [float(line.split("%")[0]) for line in lines[1:]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 100.05
    results = predict_stage.run([video, str(tmp_path / "missing.mp4")], ["a", "b"], ModelSpec(f"local-dir:{tiny_clip}"),
                                template="a video of {}.", frames=4, device="cpu", quiet=True)
    assert len(results[0]["top"]) == 2 and abs(sum(p for _, p in results[0]["top"]) - 1) < 1e-5
    assert "missing file" in results[1]["error"]
    with pytest.raises(PipelineError, match="at least two label names"):
        predict_stage.run([video], ["only"], ModelSpec(f"local-dir:{tiny_clip}"), template="{}", frames=4,
                          device="cpu", quiet=True)


def test_predict_takes_the_model_from_the_cache_like_every_reader(extracted, tmp_path):
    """No --model: the one model whose features the cache holds (any dataset; imported features have no model
    to encode a video with); several: a one-line error listing them, and --model-key chooses."""
    from videos import write_video

    cache, tiny = extracted
    work = tmp_path / "cache"
    shutil.copytree(cache / "features" / "toy", work / "features" / "toy")
    shutil.copytree(cache / "features" / "toy", work / "features" / "ext")  # features imported from elsewhere
    for split in ("train", "val"):
        zarr.open_group(str(work / "features" / "ext" / "tiny-clip" / split), mode="r+").attrs["model_spec"] = None
    video = write_video(tmp_path / "v.mp4", n_frames=12, width=48, height=32)
    labels = ["--labels", "red,green,blue", "--frames", "4", "--json", "--cache", str(work)]
    given = json.loads(run_inproc("predict", video, *model_args(tiny), *labels))
    assert json.loads(run_inproc("predict", video, *labels)) == given

    other = work / "features" / "other" / "other-clip"  # a second model, under another dataset
    shutil.copytree(work / "features" / "toy" / "tiny-clip", other)
    for split in ("train", "val"):
        zarr.open_group(str(other / split), mode="r+").attrs["model_spec"] = {"name": "ViT-B-16", "pretrained": None}
    proc = run_cli("predict", video, *labels, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: the cache holds features from several models (other-clip, tiny-clip): choose one with --model-key "
        "KEY (or --model)"]
    assert json.loads(run_inproc("predict", video, "--model-key", "tiny-clip", *labels)) == given


def test_a_no_op_rerun_of_extract_loads_no_model(extracted, tmp_path, monkeypatch):
    """Everything is cached already: frames, features and labels are left as they are, and neither
    stage loads the model (minutes for a ViT-L on a cold disk); a changed model file does load it."""
    import stages.features
    import stages.labels

    cache, tiny = extracted
    work = tmp_path / "cache"
    shutil.copytree(cache, work)
    world = Path(zarr.open_group(str(work / "frames" / "toy" / "train"), mode="r").attrs["params"]["root"])

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(stages.features, "load_clip", no_load)
    monkeypatch.setattr(stages.labels, "load_clip", no_load)
    args = ["extract", "--format", "csv", "--root", str(world), "--dataset", "toy", "--cache-frames", "4",
            "--height", "32", "--width", "32", "--block-size", "4", "--model", f"local-dir:{tiny}",
            "--model-key", "tiny-clip", "--cache", str(work), "--quiet"]
    out = run_inproc(*args)
    assert "features toy/train: 60 videos, 60 ok" in out and "labels toy: 12 classes" in out
    edited = tmp_path / "edited" / "tiny-clip"
    shutil.copytree(tiny, edited)
    config = json.loads((edited / "open_clip_config.json").read_text())
    config["preprocess_cfg"]["mean"] = [0.4, 0.4, 0.4]
    (edited / "open_clip_config.json").write_text(json.dumps(config))
    # another model under the same key: refused before it loads (not a no-op, and no minutes of loading)
    with pytest.raises(AssertionError, match="holds features of another model.*changed: config_sha256"):
        run_inproc(*[a if a != f"local-dir:{tiny}" else f"local-dir:{edited}" for a in args])
    # asked to replace them, it loads
    with pytest.raises(AssertionError, match="the model was loaded"):
        run_inproc(*[a if a != f"local-dir:{tiny}" else f"local-dir:{edited}" for a in args], "--replace-mismatched")


def test_class_names_file_embeds_the_official_lists_names_and_is_named_in_the_output(extracted, tmp_path):
    """`labels --class-names FILE` (e.g. the official code's lists/ucf_labels.csv: `id,name`, CamelCase names):
    the text encoder reads those names, the head keeps the dataset's class order, evaluate names the file."""
    from pipeline.models.clip import ModelSpec, load_clip
    from pipeline.models.text import encode_with_clip, resolve_templates

    cache, tiny = extracted
    work = tmp_path / "cache"
    shutil.copytree(cache, work)
    names = list(zarr.open_group(str(work / "frames" / "toy" / "train"), mode="r").attrs["class_names"])
    official = [n.title().replace(" ", "") for n in names]  # "ASmallRedDisc": another spelling, same order
    listing = tmp_path / "names.csv"
    listing.write_text("id,name\n" + "".join(f"{i},{n}\n" for i, n in reversed(list(enumerate(official)))))
    m = ["--model", f"local-dir:{tiny}", "--cache", str(work)]
    out = run_inproc("labels", "-d", "toy", *m, "--class-names", str(listing), "--replace-mismatched")
    assert f"class names from {listing}" in out
    stored = zarr.open_group(str(work / "labels" / "toy" / "clip-tiny-clip"), mode="r")
    clip = load_clip(ModelSpec(f"local-dir:{tiny}"))
    expected = encode_with_clip(clip, official, resolve_templates("paper"), "cpu")  # ordered by id, not by line
    assert np.allclose(stored["embeddings"][:], expected, atol=1e-5)
    assert list(stored.attrs["class_names"]) == names and list(stored.attrs["prompt_names"]) == official
    run_inproc("heads", "-d", "toy", *m, "--head", "clip-text", "--replace-mismatched")
    table = run_inproc("evaluate", "-d", "toy", *m, "--head", "clip-text")
    assert f"class names from {listing.resolve()}" in table
    (tmp_path / "short.txt").write_text("only one\n")
    proc = run_cli("labels", "-d", "toy", *m, "--class-names", str(tmp_path / "short.txt"), check=False)
    assert proc.returncode == 2 and "lists 1 class names; the dataset has 12" in proc.stderr


def test_split_all_evaluates_every_video_of_the_dataset(extracted, tmp_path):
    cache, tiny = extracted[0], extracted[1]
    shutil.copytree(cache, tmp_path / "cache")
    m = ["--model", f"local-dir:{tiny}", "--cache", str(tmp_path / "cache")]
    run_inproc("heads", "-d", "toy", *m, "--head", "clip-text", "--replace-mismatched")
    proc = run_cli("evaluate", "-d", "toy", *m, "--head", "clip-text", "--split", "all", check=False)
    assert proc.returncode == 2 and "run `pipeline frames --split all`" in proc.stderr  # never a union of splits
    run_inproc("frames", "--format", "csv", "--root", str(cache.parent / "world"), "--dataset", "toy", "--split", "all",
               "--cache-frames", "4", "--height", "32", "--width", "32", "--block-size", "4", "--cache",
               str(tmp_path / "cache"), "-q")
    run_inproc("features", "-d", "toy", *m, "--model-key", "tiny-clip", "-q")
    whole = json.loads(run_inproc("evaluate", "-d", "toy", *m, "--head", "clip-text", "--split", "all", "--json"))
    parts = [json.loads(run_inproc("evaluate", "-d", "toy", *m, "--head", "clip-text", "--split", s, "--json"))
             for s in ("train", "val")]
    assert whole["full"]["videos"] == sum(p["full"]["videos"] for p in parts) == 84
    hits = sum(p["full"]["top1"] * p["full"]["videos"] for p in parts) / 84
    assert abs(whole["full"]["top1"] - hits) < 1e-9
