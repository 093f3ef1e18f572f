"""The batched data path (decode + augmentation a batch at a time on the training device), run on the CPU device.

It must make the same clips as the per-clip path (same seeded draws, same kernels), keep resume bit-exact,
and fail in one line where it cannot run. On a GPU, tests/test_gpu.py holds the device against this path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from conftest import Crash, crash_at_step, run_inproc
from test_frames_stage import run_cli

from pipeline.learning.clips import FrameClipSet, usable_rows
from pipeline.learning.training import TrainConfig, _collate, to_device, train
from pipeline.learning.transforms import AugmentConfig, Normalization
from pipeline.media.world import WorldSpec, generate_world
from pipeline.models.classifier import CosineHead, build_video_classifier
from pipeline.models.clip import ModelSpec, load_clip

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
NORM = Normalization(32, MEAN, STD)
# one grey level after normalisation: what an interpolation or rounding difference may move a pixel by
GREY_LEVEL = 1 / 255 / min(STD)


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, str]:
    """JPEG and raw frame stores of 48 x 64 videos in a 48 x 96 box: every video is padded (boxes matter)."""
    base = tmp_path_factory.mktemp("dp")
    generate_world(base / "world", WorldSpec(train_per_class=2, val_per_class=1, frames=16, size=48, seed=3))
    out = {}
    for codec in ("jpeg", "raw"):
        run_inproc("frames", "--format", "csv", "--root", str(base / "world"), "--dataset", "dp", "--cache-frames",
                   "12", "--height", "48", "--width", "96", "--split", "train", "--codec", codec, "--cache",
                   str(base / codec), "-q")
        out[codec] = str(base / codec / "frames" / "dp" / "train")
    return out


def both_paths(path: str, aug: AugmentConfig | None = None, views=(1, 1), frames: int = 8):
    rows, labels = usable_rows(zarr.open_group(path, mode="r"))
    per_clip = FrameClipSet(path, rows, labels, frames, NORM, 7, aug, views=views)
    batched = FrameClipSet(path, rows, labels, frames, NORM, 7, aug, views=views, batched=True)
    return per_clip, batched


def batched_inputs(data: FrameClipSet, indices: list[int], epoch: int, train: bool) -> torch.Tensor:
    _, x, _ = _collate([(i, *pair) for i, pair in zip(indices, data.items(indices, epoch, train), strict=True)])
    assert isinstance(x, list)  # the workers handed over bytes, not pixels
    return to_device(data, x, torch.device("cpu"), train)


@pytest.mark.parametrize("codec", ["jpeg", "raw"])
@pytest.mark.parametrize("per_frame", [True, False])
def test_batched_training_clips_equal_the_per_clip_path(stores, codec, per_frame):
    box = tuple(zarr.open_group(stores[codec], mode="r")["box"][0])
    assert box[3] - box[2] < 96  # narrower than the box: padding the crops must not see
    aug = AugmentConfig(randaugment_per_frame=per_frame)  # the official recipe: RA 2/9, flip, grayscale
    per_clip, batched = both_paths(stores[codec], aug)
    indices = list(range(len(per_clip)))[::-1]  # any order: each clip's draws are its own
    for epoch in (0, 5):
        want = torch.stack([per_clip.item(i, epoch, True)[0] for i in indices])
        got = batched_inputs(batched, indices, epoch, True)
        assert got.shape == want.shape == (len(indices), 8, 3, 32, 32)
        torch.testing.assert_close(got, want, atol=GREY_LEVEL, rtol=0)
        assert (got == want).float().mean() > 0.999  # equal, up to a rare rounding of a batched kernel
    other = batched_inputs(batched, indices, 6, True)
    assert not torch.allclose(other, got)  # the draws do change with the epoch


def test_gaussian_blur_and_solarization_draw_and_apply_alike_on_both_paths(stores):
    """The released GroupGaussianBlur(p) and GroupSolarization(p) (datasets/transforms.py:478-499) as options:
    one draw per clip after grayscale, sigma in [0.1, 2], pixels >= 128 inverted; the same clips on both paths."""
    from pipeline.learning.batchclips import ClipDrawer

    aug = AugmentConfig(randaugment_ops=0, gaussian_blur=0.5, solarization=0.5)
    draws = [ClipDrawer(32, aug).draw(8, 48, 64, seed) for seed in range(40)]
    blurred = [d.blur_sigma for d in draws if d.blur_sigma is not None]
    assert 8 < len(blurred) < 32 and all(0.1 <= s <= 2.0 for s in blurred)
    assert 8 < sum(d.solarize for d in draws) < 32
    assert all(d.blur_sigma is None and not d.solarize for d in (ClipDrawer(32, AugmentConfig()).draw(8, 48, 64, s)
                                                                  for s in range(10)))  # off by default (p = 0)
    per_clip, batched = both_paths(stores["jpeg"], aug)
    indices = list(range(len(per_clip)))
    want = torch.stack([per_clip.item(i, 0, True)[0] for i in indices])
    got = batched_inputs(batched, indices, 0, True)
    torch.testing.assert_close(got, want, atol=GREY_LEVEL, rtol=0)
    plain_clip, _ = both_paths(stores["jpeg"], AugmentConfig(randaugment_ops=0))
    plain = torch.stack([plain_clip.item(i, 0, True)[0] for i in indices])
    assert not torch.allclose(plain, want)  # some clips were blurred or solarized


def test_batched_evaluation_views_equal_the_per_clip_path(stores):
    per_clip, batched = both_paths(stores["jpeg"], views=(2, 3), frames=4)
    indices = list(range(len(per_clip)))
    want = torch.stack([per_clip.item(i, 0, False)[0] for i in indices])
    got = batched_inputs(batched, indices, 0, False)
    assert got.shape == want.shape == (len(indices), 6, 4, 3, 32, 32)
    torch.testing.assert_close(got, want, atol=GREY_LEVEL, rtol=0)


def make_model(clip_dir, seed=0):
    clip = load_clip(ModelSpec(f"local-dir:{clip_dir}"))
    torch.manual_seed(seed)
    return build_video_classifier(clip.model.visual, clip.embed_dim, CosineHead(torch.randn(4, clip.embed_dim), False),
                                  "tap", 4)


@pytest.mark.slow
def test_training_on_the_batched_path_resumes_bit_exact_and_matches_the_per_clip_path(stores, tiny_clip, tmp_path):
    per_clip, batched = both_paths(stores["jpeg"], AugmentConfig(), frames=4)
    per_clip.labels, batched.labels = per_clip.labels % 4, batched.labels % 4
    cfg = TrainConfig(epochs=2, batch_size=4, lr=1e-3, warmup_epochs=0.5, checkpoint_every=3)
    full = make_model(tiny_clip)
    train(full, batched, None, cfg, tmp_path / "a", "fp")
    with pytest.raises(Crash):
        train(make_model(tiny_clip), batched, None, cfg, tmp_path / "b", "fp", callback=crash_at_step(5))
    resumed = make_model(tiny_clip, seed=1)
    # resumed with a loader worker process: the items cross a process boundary as bytes
    train(resumed, batched, None, TrainConfig(**{**cfg.as_dict(), "workers": 1}), tmp_path / "b", "fp")
    per_clip_model = make_model(tiny_clip)
    train(per_clip_model, per_clip, None, cfg, tmp_path / "c", "fp")
    for (name, a), (_, b), (_, c) in zip(full.state_dict().items(), resumed.state_dict().items(),
                                         per_clip_model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-4)


def test_data_device_cuda_without_a_gpu_run_is_one_line(extracted):
    cache, clip_dir = extracted
    proc = run_cli("finetune", "-d", "toy", "--model", f"local-dir:{clip_dir}", "--cache", str(cache), "--device",
                   "cpu", "--data-device", "cuda", "--epochs", "1", "-q", "--run-name", "no-gpu", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--data-device cuda decodes on the training GPU" in proc.stderr


def test_open_clip_attention_runs_through_sdpa(tiny_clip, monkeypatch):
    """Fused attention kernels (flash / memory-efficient on a GPU) are reached only through SDPA."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return sdpa(*args, **kwargs)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    model = make_model(tiny_clip).train()
    model(torch.randn(2, 4, 3, 32, 32)).sum().backward()
    assert len(calls) == 2  # one per layer of the tiny tower, in training mode (the slow path would skip it)


def test_compile_option_trains_like_eager(stores, tiny_clip, tmp_path):
    _, batched = both_paths(stores["jpeg"], AugmentConfig(randaugment_ops=0), frames=4)
    batched.labels = batched.labels % 4
    cfg = TrainConfig(epochs=1, batch_size=8, lr=1e-3, warmup_epochs=0)
    eager, compiled = make_model(tiny_clip), make_model(tiny_clip)
    losses = {}
    for name, model, compile_ in (("eager", eager, False), ("compiled", compiled, True)):
        seen = []
        train(model, batched, None, TrainConfig(**{**cfg.as_dict(), "compile": compile_}), tmp_path / name, "fp",
              callback=lambda kind, values, seen=seen: seen.append(values["loss"]) if kind == "step" else None)
        losses[name] = seen
    assert np.allclose(losses["eager"], losses["compiled"], rtol=1e-4)
    assert any(k.startswith("visual.") for k in compiled.state_dict())  # compiled in place: checkpoint keys kept
    assert compiled.state_dict().keys() == eager.state_dict().keys()


@pytest.mark.slow
def test_features_of_two_dask_processes_equal_one_process_with_read_ahead(tmp_path, tiny_clip):
    """Blocks are the unit of work: 2 processes (each block one writer) write the store that 1 process writes
    reading each next block ahead; the device decode gives the pixels Pillow gives."""
    generate_world(tmp_path / "world", WorldSpec(train_per_class=2, val_per_class=1, frames=16, size=48, seed=3))
    stores = {}
    for workers in ("1", "2"):
        cache = tmp_path / f"w{workers}"
        run_inproc("frames", "--format", "csv", "--root", str(tmp_path / "world"), "--dataset", "dp", "--cache-frames",
                   "3", "--height", "48", "--width", "96", "--split", "train", "--block-size", "5", "--cache",
                   str(cache), "-q")
        run_cli("features", "-d", "dp", "--model", f"local-dir:{tiny_clip}", "--model-key", "tiny", "--device", "cpu",
                "--batch-size", "4", "--workers", workers, "--cache", str(cache), "-q")
        stores[workers] = zarr.open_group(str(cache / "features" / "dp" / "tiny" / "train"), mode="r")
    one, two = stores["1"], stores["2"]
    assert one.attrs["fingerprint"] == two.attrs["fingerprint"] and int(one.attrs["n"]) > 2 * 5  # 3+ blocks
    assert np.array_equal(one["features"][:], two["features"][:]) and one["features"][:].any()
    assert one["status"][:].tolist() == two["status"][:].tolist()
    # the frames decoded with Pillow and encoded on the CPU give the same rows
    from pipeline.storage.featurestore import encode_frames
    from pipeline.storage.framestore import read_frames

    frames_group = zarr.open_group(str(tmp_path / "w1" / "frames" / "dp" / "train"), mode="r")
    y0, y1, x0, x1 = (int(v) for v in frames_group["box"][0])
    pixels = read_frames(frames_group, slice(0, 1))[0][:, y0:y1, x0:x1]
    want = encode_frames(pixels, load_clip(ModelSpec(f"local-dir:{tiny_clip}")), "cpu", 4)
    assert np.array_equal(one["features"][0], want.astype(np.float16))
