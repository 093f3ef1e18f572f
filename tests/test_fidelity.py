"""Paper fidelity: the modules and the optimiser as the official code (whwu95/Text4Vis) builds them."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_training import ToySet

from pipeline.learning.training import TrainConfig, param_groups, train
from pipeline.models.classifier import CosineHead, FrameFeatureClassifier
from pipeline.models.temporal import QuickGELU, TemporalTransformer, TokenT1D, TokenT1DBlock


def reference_shift(x: torch.Tensor, frames: int) -> torch.Tensor:
    """The official TokenT1D at its initialisation, by hand: on the CLS token only, a quarter of the
    channels take frame t+1's value, a quarter frame t-1's (zero past the ends), the rest stay."""
    bt, _, width = x.shape
    fold = width // 4
    cls = x[:, 0].reshape(bt // frames, frames, width)
    out = cls.clone()
    out[:, :, :2 * fold] = 0
    out[:, :-1, :fold] = cls[:, 1:, :fold]
    out[:, 1:, fold:2 * fold] = cls[:, :-1, fold:2 * fold]
    y = x.clone()
    y[:, 0] = out.reshape(bt, width)
    return y


def test_token_t1d_is_the_official_shift_before_attention_and_again_before_the_mlp():
    from open_clip.transformer import ResidualAttentionBlock

    torch.manual_seed(0)
    width, frames, videos, tokens = 16, 4, 2, 5
    block = ResidualAttentionBlock(width, 2)
    wrapped = TokenT1DBlock(block, width, "shift")
    wrapped.frames = frames
    x = torch.randn(videos * frames, tokens, width)
    with torch.no_grad():
        ref = reference_shift(x, frames)
        ref = ref + block.attention(q_x=block.ln_1(ref))
        ref = reference_shift(ref, frames)
        ref = ref + block.mlp(block.ln_2(ref))
        got = wrapped(x)
    assert torch.allclose(got, ref, atol=1e-6)
    # the patch tokens never mix over time, and the identity init leaves the block as it was
    assert not torch.allclose(got, block(x), atol=1e-3)
    same = TokenT1DBlock(block, width, "identity")
    same.frames = frames
    with torch.no_grad():
        assert torch.allclose(same(x), block(x), atol=1e-6)
    assert TokenT1D(width).conv.weight[:, 0].sum(dim=1).eq(1).all()  # default: the shift, each channel one tap


def test_ttrans_is_the_official_module():
    torch.manual_seed(0)
    width, frames = 64, 8
    m = TemporalTransformer(width, layers=1, max_frames=frames).eval()
    block = m.encoder.layers[0]
    assert m.position.shape == (77, width) and m.position.requires_grad  # learned, CLIP's context length
    assert block.norm1.eps == block.norm2.eps == 1e-12 and isinstance(block.activation, QuickGELU)
    assert block.norm_first and block.self_attn.num_heads == width // 64
    for linear in (block.linear1, block.linear2, block.self_attn.out_proj):
        assert 0.017 < float(linear.weight.detach().std()) < 0.023 and not linear.bias.any()
    x = torch.randn(3, frames, width)
    with torch.no_grad():
        y = x + m.position[:frames]
        h = block.norm1(y)
        y = y + block.self_attn(h, h, h, need_weights=False)[0]
        y = y + block.linear2(block.activation(block.linear1(block.norm2(y))))
        assert torch.allclose(m(x), (y + x).mean(dim=1), atol=1e-5)  # residual around the blocks, then TAP
        tap = TemporalTransformer(width, layers=1, max_frames=frames, init="tap").eval()
        assert torch.allclose(tap(x), x.mean(dim=1), atol=1e-6)  # the named variant starts exactly as TAP


def test_the_logit_scale_gradient_survives_at_100_and_the_step_clamps_it(tmp_path):
    head = CosineHead(torch.randn(5, 8), learnable=False, logit_scale=math.log(100.0))
    loss = F.cross_entropy(head(torch.randn(4, 8)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert head.logit_scale.grad is not None and float(head.logit_scale.grad.abs()) > 0

    # a real run whose every step pushes the scale up (an objective that rewards a larger scale): the
    # training loop clamps it at ln 100 after each step
    torch.manual_seed(0)
    data = ToySet()
    model = FrameFeatureClassifier(TemporalTransformer(16, layers=1, max_frames=8), CosineHead(
        torch.randn(6, 16), learnable=True, logit_scale=math.log(100.0) - 1e-3), 16, project=False)

    def larger_scale(net, x, y):
        return F.cross_entropy(net(x), y) * 0 - net.head.logit_scale

    cfg = TrainConfig(epochs=2, batch_size=8, lr=5e-2, warmup_epochs=0, min_lr=0.0, weight_decay=0.0)
    train(model, data, data, cfg, tmp_path / "run", "fp", objective=larger_scale)
    assert abs(float(model.head.logit_scale.detach()) - math.log(100.0)) < 1e-6


def test_weight_decay_reaches_every_trained_parameter_as_in_the_official_code():
    model = FrameFeatureClassifier(TemporalTransformer(16, layers=1, max_frames=8),
                                   CosineHead(torch.randn(6, 16), learnable=False), 16, project=False)
    groups = param_groups(model, TrainConfig(weight_decay=0.2), lambda name: 1e-3)
    decayed = {id(p) for g in groups if g["weight_decay"] == 0.2 for p in g["params"]}
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    assert {"head.logit_scale", "temporal.position"} <= set(trained)
    assert all(id(p) in decayed for name, p in model.named_parameters() if p.requires_grad)


def test_the_schedule_decays_to_zero_by_default():
    from pipeline.learning.training import lr_at

    cfg = TrainConfig()
    assert cfg.min_lr == 0.0 and lr_at(999, 1000, 10, cfg.lr, cfg.min_lr) < 1e-9


def test_activitynet_map_as_the_official_code_next_to_ours():
    import numpy as np

    from pipeline.learning.evaluation import multilabel_metrics, official_anet_map

    rng = np.random.default_rng(0)
    targets = np.zeros((40, 5), dtype=bool)
    targets[np.arange(40), rng.integers(0, 5, 40)] = True
    logits = 100 * rng.uniform(-0.2, 0.3, (40, 5)) + 10 * targets
    # the official path by hand: softmax twice, then torchnet's per-class AP averaged over all classes
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p = np.exp(p - p.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    aps = []
    for k in range(5):
        order = np.argsort(-p[:, k], kind="stable")
        hits = targets[order, k]
        precision = np.cumsum(hits) / np.arange(1, 41)
        aps.append(precision[hits].mean())
    assert abs(official_anet_map(logits, targets) - 100 * np.mean(aps)) < 1e-9
    both = multilabel_metrics(logits, targets)
    assert {"mAP", "mAP_official"} <= set(both) and 0 < both["mAP_official"] <= 100


def test_randaugment_comes_first_and_draws_per_frame_as_the_official_group_transform():
    from pipeline.learning.transforms import AugmentConfig, Normalization, PerFrame, train_transform

    norm = Normalization(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    frame = torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    clip = frame.expand(8, -1, -1, -1).clone()  # 8 identical frames
    fixed = dict(crop_scale=(1.0, 1.0), flip=0.0, grayscale=0.0, randaugment_ops=2, randaugment_magnitude=9)
    per_frame = train_transform(norm, AugmentConfig(**fixed))
    per_clip = train_transform(norm, AugmentConfig(**fixed, randaugment_per_frame=False))
    assert isinstance(per_frame.transforms[0], PerFrame)  # before the crop, as logged
    torch.manual_seed(0)
    out = per_frame(clip)
    assert len({tuple(f.flatten()[:64].tolist()) for f in out}) > 1  # frames got their own operations
    torch.manual_seed(0)
    same = per_clip(clip)
    assert all(torch.equal(same[0], f) for f in same)  # one draw for the clip: identical frames stay identical


def test_an_image_folder_runs_frames_features_finetune_evaluate(tmp_path, tiny_clip):
    """App. A: ImageNet-style train/<wnid>/*.JPEG as one-frame videos through the same stages."""
    import json

    import numpy as np
    from conftest import run_inproc
    from PIL import Image

    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    colours = {"n001": (220, 30, 30), "n002": (30, 200, 40), "n003": (40, 40, 210)}
    for split, count in (("train", 6), ("val", 2)):
        for wnid, rgb in colours.items():
            (root / split / wnid).mkdir(parents=True)
            for k in range(count):
                pixels = np.clip(np.array(rgb) + rng.normal(0, 20, (40, 48, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / wnid / f"{wnid}_{k}.JPEG", quality=90)
    (root / "LOC_synset_mapping.txt").write_text("n001 red thing, crimson\nn002 green thing\nn003 blue thing\n")
    cache = str(tmp_path / "cache")
    m = ["--model", f"local-dir:{tiny_clip}", "--cache", cache]
    out = run_inproc("frames", "--format", "imagefolder", "--root", str(root), "--cache-frames", "1", "--height",
                     "32", "--width", "32", "--cache", cache, "-q")
    assert "images/train: 18 videos, 18 ok" in out and "images/val: 6 videos, 6 ok" in out
    run_inproc("features", "-d", "images", *m, "-q")
    run_inproc("labels", "-d", "images", *m, "--template", "a photo of a {}")
    run_inproc("heads", "-d", "images", *m, "--head", "clip-text")
    run_inproc("finetune", "-d", "images", *m, "--frames", "1", "--epochs", "1", "--global-batch-size", "6",
               "--warmup-epochs", "0", "--flip", "0", "--grayscale", "0", "--randaugment", "0", "0", "--workers", "0",
               "--run-name", "img", "-q")
    info = json.loads((tmp_path / "cache" / "runs" / "img" / "run.json").read_text())
    assert info["class_names"] == ["red thing", "green thing", "blue thing"] and info["frames"] == 1
    result = json.loads(run_inproc("evaluate", "--run-name", "img", "--cache", cache, "--json"))
    assert result["videos"] == 6 and 0 <= result["top1"] <= 100


def test_the_frame_store_keeps_each_videos_whole_frame_and_its_box(tmp_path):
    """Short side to the box height at the video's own aspect ratio: a 16:9 video keeps its whole width (not a
    256 x 320 centre crop), a 4:3 one is padded; the box of each video's pixels is recorded and every reader
    (training crops, evaluation views, features) sees only those pixels."""
    import numpy as np
    import zarr
    from conftest import run_inproc
    from videos import write_video

    from pipeline.learning.clips import FrameClipSet
    from pipeline.learning.transforms import Normalization
    from pipeline.storage.framestore import read_frames, video_box

    root = tmp_path / "clips"
    write_video(root / "a" / "wide.mp4", n_frames=8, width=96, height=54)  # 16:9 -> 57 x 32
    write_video(root / "b" / "narrow.mp4", n_frames=8, width=64, height=48)  # 4:3 -> 43 x 32
    cache = tmp_path / "cache"
    run_inproc("frames", "--format", "folder", "--root", str(root), "--dataset", "v", "--cache-frames", "2",
               "--height", "32", "--width", "64", "--cache", str(cache), "-q")
    group = zarr.open_group(str(cache / "frames" / "v" / "train"), mode="r")
    ids = [str(v) for v in group["video_id"][:]]
    wide, narrow = ids.index("train/a/wide"), ids.index("train/b/narrow")
    assert video_box(group, wide) == (0, 32, 3, 60) and video_box(group, narrow) == (0, 32, 10, 53)
    frames = read_frames(group, narrow)
    # padding (black, up to JPEG ringing next to the edge) around the video's own pixels
    assert frames[:, :, :8].mean() < 4 and frames[:, :, 55:].mean() < 4 and frames[:, :, 12:51].mean() > 20

    # evaluation: 3 crops spanning the video's own width (short side to 256/224 x S = 18, left / centre / right)
    s = 16
    norm = Normalization(s, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "bilinear")
    views = FrameClipSet(str(cache / "frames" / "v" / "train"), np.array([wide]), np.array([0]), 2, norm, 0,
                         views=(1, 3)).item(0, 0, False)[0]
    import torch
    from torchvision.transforms.v2 import functional as F

    own = torch.from_numpy(read_frames(group, wide)[:, 0:32, 3:60]).permute(0, 3, 1, 2)
    resized = F.resize(own, [18], interpolation=F.InterpolationMode.BILINEAR, antialias=True).float() / 255
    assert resized.shape[-1] == 32
    assert torch.allclose(views[0], resized[..., :s, :s], atol=1e-6)  # the left crop starts at the video's left edge
    assert torch.allclose(views[2], resized[..., :s, -s:], atol=1e-6)  # the right crop ends at its right edge


def test_official_lists_download_once_from_the_repository_and_fail_in_one_line_offline(tmp_path, monkeypatch):
    """`--subsets text4vis:k600/k160_labels_split1.csv` (or `--class-names text4vis:...`) fetches the official
    file on first use; here a local server stands in for GitHub, serving ../shared's copy."""
    import functools
    import http.server
    import threading
    from pathlib import Path

    import pytest

    from pipeline.core.errors import PipelineError
    from pipeline.media.officiallists import resolve_list

    lists = Path(__file__).resolve().parents[2] / "shared" / "text4vis-lists"
    if not (lists / "k600" / "k160_labels_split1.csv").is_file():
        pytest.skip("../shared/text4vis-lists is absent")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(lists))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("PIPELINE_TEXT4VIS_URL", f"http://127.0.0.1:{server.server_port}/")
    monkeypatch.setenv("PIPELINE_LISTS_CACHE", str(tmp_path / "lists"))
    try:
        got = resolve_list("text4vis:k600/k160_labels_split1.csv")
    finally:
        server.shutdown()
        server.server_close()
    assert got.read_bytes() == (lists / "k600" / "k160_labels_split1.csv").read_bytes()
    assert resolve_list("text4vis:k600/k160_labels_split1.csv") == got  # cached: no server needed any more
    with pytest.raises(PipelineError, match="could not download .*offline\\? pass the file from a clone"):
        resolve_list("text4vis:k600/k160_labels_split2.csv")
    with pytest.raises(PipelineError, match="under the official lists/ folder"):
        resolve_list("text4vis:../secret")


def test_evaluation_scales_the_short_side_to_256_per_224_before_the_crop():
    """test.py:94 (scale_size 256 for a 224 input), then GroupCenterCrop (test.py:102-103) or GroupFullResSample's
    left / right / centre at 0, 4 and 2 steps of (w - 224) // 4 (datasets/transforms.py:189-195)."""
    from conftest import run_inproc
    from torchvision.transforms.v2 import functional as TF

    from pipeline.core.settings import EvaluateSettings, FinetuneSettings, PredictSettings
    from pipeline.learning.transforms import Normalization, eval_views

    assert {cls.defaults().test_scale for cls in (FinetuneSettings, EvaluateSettings, PredictSettings)} == {256}
    assert Normalization(224, (0.0,) * 3, (1.0,) * 3).test_size == 256
    norm = Normalization(32, (0.0,) * 3, (1.0,) * 3, "bilinear")  # a 32-px input: 256 / 224 x 32 = 37 px
    clip = torch.randint(0, 256, (2, 3, 40, 60), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    scaled = TF.resize(clip, [37], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    assert scaled.shape[-2:] == (37, 55)
    one = eval_views(clip, norm, 1)[0]
    assert torch.equal(one, TF.center_crop(scaled, [32, 32]).float() / 255)  # torchvision's CenterCrop, as official
    three = eval_views(clip, norm, 3)
    step, top = (55 - 32) // 4, 2 * ((37 - 32) // 4)
    for view, left in zip(three, (0, 2 * step, 4 * step), strict=True):
        assert torch.equal(view, scaled[..., top:top + 32, left:left + 32].float() / 255)
    # the old view (short side straight to the input size) sees a wider field: not what the official code scores
    old = TF.center_crop(TF.resize(clip, [32], interpolation=TF.InterpolationMode.BILINEAR, antialias=True), [32, 32])
    assert not torch.allclose(one, old.float() / 255, atol=0.05)
    with pytest.raises(ValueError, match="under the 32-px input"):
        Normalization(32, (0.0,) * 3, (1.0,) * 3, test_scale=200)
    for command in ("evaluate", "finetune"):
        line = next(x for x in run_inproc("config", command, "--no-params").splitlines() if "--test-scale" in x)
        assert line.split()[1] == "256"


def test_adamw_betas_are_the_released_codes_and_the_papers_are_an_option(tmp_path, monkeypatch):
    """train.py:278-281 and utils/solver.py:30-33 build AdamW with betas (0.9, 0.999); the paper's Table A.3 says
    0.98: the default is the code's, ``--betas 0.9 0.98`` the paper's."""
    from conftest import run_inproc

    from pipeline.core.settings import FinetuneSettings

    assert FinetuneSettings.defaults().betas == TrainConfig().betas == (0.9, 0.999)
    for betas in ((0.9, 0.999), (0.9, 0.98)):
        model = FrameFeatureClassifier(TemporalTransformer(16, layers=1, max_frames=8),
                                       CosineHead(torch.randn(6, 16), learnable=False), 16, project=False)
        cfg = TrainConfig(epochs=1, batch_size=8, warmup_epochs=0, betas=betas)
        train(model, ToySet(), None, cfg, tmp_path / str(betas[1]), "fp")
        saved = torch.load(tmp_path / str(betas[1]) / "checkpoint.pt", weights_only=True)["optimizer"]
        assert {tuple(g["betas"]) for g in saved["param_groups"]} == {betas}
    with pytest.raises(ValueError, match="betas"):
        TrainConfig(betas=(0.9, 1.0))
    shown = run_inproc("config", "finetune", "--no-params")
    assert next(x for x in shown.splitlines() if "--betas" in x).split()[1:3] == ["0.9", "0.999"]
    flagged = run_inproc("finetune", "--no-params", "--betas", "0.9", "0.98", "--print-config")
    assert next(x for x in flagged.splitlines() if "--betas" in x).split()[1:4] == ["0.9", "0.98", "flag"]
    # the report's settings note reads the setting (it used to print (0.9, 0.98) whatever the run used)
    from stages import report as report_stage

    notes = []
    monkeypatch.setattr(report_stage, "run", lambda cache, out, dataset, order_dataset, model_tag, settings_note: (
        notes.append(settings_note), (out, ""))[1])
    params = tmp_path / "p.yaml"
    params.write_text("data:\n  dataset: demo\nfinetune:\n  betas: [0.9, 0.98]\n")
    run_inproc("report", "--params", str(params), "--cache", str(tmp_path / "c"))
    assert "AdamW betas (0.9, 0.98)" in notes[0]


# test_zeroshot.py:301-302 run with numpy's legacy generator for C = 101, split 0: np.random.seed(0);
# np.random.permutation(101)[:50], sorted. Written out, so that a change of generator cannot pass unnoticed.
OFFICIAL_FIRST_DRAW_101 = [1, 2, 3, 4, 5, 6, 7, 8, 13, 15, 16, 17, 18, 22, 24, 26, 27, 30, 33, 38, 40, 41, 42, 43, 45,
                           48, 51, 53, 54, 55, 56, 60, 61, 62, 63, 68, 71, 73, 74, 75, 76, 78, 80, 82, 86, 91, 93, 94,
                           96, 100]


def test_half_classes_are_the_official_legacy_draws_and_are_listed():
    import numpy as np

    from pipeline.learning.evaluation import half_classes, half_draw

    before = np.random.get_state()[1].copy()
    assert half_draw(101, 0).tolist() == OFFICIAL_FIRST_DRAW_101
    assert np.array_equal(np.random.get_state()[1], before)  # numpy's global stream is left alone
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 101, 600)
    logits = rng.normal(size=(600, 101)) + 3 * np.eye(101)[labels]
    result = half_classes(logits, labels)
    assert [r["seed"] for r in result["runs"]] == list(range(10)) and result["classes_per_draw"] == 50
    assert result["runs"][0]["class_indices"] == OFFICIAL_FIRST_DRAW_101
    assert all(r["class_indices"] == half_draw(101, r["seed"]).tolist() for r in result["runs"])
    assert len({tuple(r["class_indices"]) for r in result["runs"]}) == 10


def test_activitynet_map_official_scores_100_cos_whatever_the_trained_scale():
    """test_anet.py:244 scores `100.0 * image_features @ text_features.T`: mAP_official uses 100 x cos, not the
    run's exp(s) x cos (here s = ln 20)."""
    import numpy as np

    from pipeline.learning.evaluation import official_anet_map
    from pipeline.learning.training import evaluate

    class MultiLabel:
        def __init__(self) -> None:
            g = np.random.default_rng(1)
            self.t = np.zeros((48, 6), dtype=np.int64)
            self.t[np.arange(48), g.integers(0, 6, 48)] = 1
            self.t[:8, 0] = 1  # some videos carry a second label
            self.x = (g.standard_normal((48, 4, 16)) + 0.8 * (self.t @ g.standard_normal((6, 16)))[:, None])
            self.x = self.x.astype(np.float32)

        def __len__(self) -> int:
            return len(self.t)

        def item(self, i: int, epoch: int, train: bool):
            return torch.from_numpy(self.x[i])[None], torch.from_numpy(self.t[i])

    rows = torch.randn(6, 16)
    model = FrameFeatureClassifier(TemporalTransformer(16, layers=1, max_frames=8, init="tap"),
                                   CosineHead(rows, learnable=False, logit_scale=math.log(20.0)), 16, project=False)
    data = MultiLabel()
    got = evaluate(model, data, batch_size=8)
    video = torch.from_numpy(data.x).mean(dim=1)
    cos = (F.normalize(video, dim=-1) @ F.normalize(rows, dim=-1).t()).numpy()
    assert got["mAP_official"] == pytest.approx(official_anet_map(100 * cos, data.t.astype(bool)), abs=1e-6)
    assert abs(got["mAP_official"] - official_anet_map(20 * cos, data.t.astype(bool))) > 1e-3


def test_test_time_frames_are_the_official_samplers():
    """datasets/datasets.py:141-149 (test) and :122-123 (validation): view c of C starts at
    int(linspace(0, tick - 1, C))[c] in each segment of tick = n / t frames; one view takes each segment's first."""
    import numpy as np

    from pipeline.media.sampling import view_indices

    for n, t, clips in [(32, 8, 1), (32, 8, 4), (300, 8, 4), (250, 8, 1), (5, 8, 2), (37, 8, 3)]:
        tick = n / t
        starts = [int(s) for s in np.linspace(0, tick - 1, num=clips).tolist()]  # the official `dtype=int`
        for c, start in enumerate(starts):
            official = [int(start + tick * x) % n for x in range(t)]
            assert view_indices(n, t, c, clips).tolist() == official, (n, t, clips, c)
    assert view_indices(32, 8).tolist() == list(range(0, 32, 4))  # one view: each segment's first stored frame
