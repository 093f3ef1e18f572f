"""Full fine-tuning of the visual encoder on the frame store: heads, temporal modules, resume, DDP, views."""

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
import torch
from conftest import run_inproc
from test_frames_stage import run_cli

import pipeline
from pipeline.learning.clips import FrameClipSet, usable_rows
from pipeline.learning.evaluation import multilabel_metrics
from pipeline.learning.training import predict
from pipeline.learning.transforms import Normalization
from pipeline.models.classifier import CosineHead, build_video_classifier, classifier_for
from pipeline.models.clip import ModelSpec, load_clip
from pipeline.models.heads import sample_per_class
from pipeline.models.temporal import TokenT1D

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


@pytest.fixture(scope="module")
def ft_cache(extracted, tmp_path_factory) -> tuple[Path, list[str]]:
    """A private copy of the feature-store cache with every head kind built."""
    cache = tmp_path_factory.mktemp("ft") / "cache"
    shutil.copytree(extracted[0], cache)
    m = ["--model", f"local-dir:{extracted[1]}", "--cache", str(cache)]
    for kind in ("clip-text", "random", "orthogonal", "prototype"):
        run_inproc("heads", "-d", "toy", *m, "--head", kind, "--per-class", "3", "--replace-mismatched")
    run_inproc("lda", "-d", "toy", *m, "--per-class", "3", "--replace-mismatched")
    run_inproc("labels", "-d", "toy", *m, "--encoder", "hf:all-MiniLM-L6-v2", "--replace-mismatched")
    run_inproc("heads", "-d", "toy", *m, "--head", "text", "--encoder", "hf:all-MiniLM-L6-v2", "--replace-mismatched")
    return cache, m


def common(m: list[str], run: str, *extra: str) -> list[str]:
    # 60 training clips of 4 frames; augmentation without colour changes (the classes are colours)
    return ["finetune", "-d", "toy", *m, "--frames", "4", "--global-batch-size", "16", "--epochs", "1", "--lr", "1e-3",
            "--warmup-epochs", "0.3", "--min-lr", "1e-4", "--grayscale", "0", "--randaugment", "0", "0",
            "--crop-scale", "0.6", "1", "--workers", "0", "-q", "--run-name", run, *extra]


def load_state(cache: Path, run: str) -> dict:
    return torch.load(cache / "runs" / run / "checkpoint.pt", weights_only=True)["model"]


@pytest.mark.slow
def test_every_head_and_temporal_module_trains(ft_cache, extracted):
    cache, m = ft_cache
    clip = load_clip(ModelSpec(f"local-dir:{extracted[1]}"))
    initial = clip.model.visual.state_dict()
    for head, temporal in [("clip-text", "tap"), ("random", "tap"), ("orthogonal", "tap"), ("lda", "tap"),
                           ("prototype", "tap"), ("text", "tap"), ("learnable", "ttrans"), ("clip-text", "tokent1d")]:
        name = f"{head}-{temporal}"
        extra = ["--layers", "1"] if temporal == "ttrans" else []
        if head == "text":  # 384-d MiniLM rows on 32-d video embeddings: a learned projection bridges them
            extra += ["--encoder", "hf:all-MiniLM-L6-v2"]
        run_inproc(*common(m, name, "--head", head, "--temporal", temporal, *extra))
        metrics = json.loads((cache / "runs" / name / "metrics.json").read_text())
        assert metrics["steps"] == 4 and metrics["val_videos"] == 24, name
        state = load_state(cache, name)
        block = "visual.transformer.resblocks.0." + ("block." if temporal == "tokent1d" else "")
        assert not torch.equal(state[block + "mlp.c_fc.weight"], initial["transformer.resblocks.0.mlp.c_fc.weight"])
        if head != "learnable":  # the head is frozen: exactly the cached rows
            import zarr

            folder = "text-hf-all-MiniLM-L6-v2" if head == "text" else head
            cached = zarr.open_group(str(cache / "heads" / "toy" / "tiny-clip" / folder), mode="r")["head"][:]
            assert torch.equal(state["head.weight"], torch.from_numpy(cached).float()), name
        if head == "text":
            assert state["projection.weight"].shape == (384, 32)
        history = [json.loads(x) for x in (cache / "runs" / name / "history.jsonl").read_text().splitlines()]
        assert all(np.isfinite(h["loss"]) for h in history if h["kind"] == "step")
    live = json.loads((cache / "runs" / "clip-text-tap" / "dvclive" / "metrics.json").read_text())
    assert "val_top1" in live and (cache / "runs" / "clip-text-tap" / "dvclive" / "plots" / "metrics" / "train"
                                   / "loss.tsv").is_file()


@pytest.mark.slow
def test_loss_falls_on_a_learnable_task(ft_cache):
    cache, m = ft_cache
    run_inproc(*common(m, "learn", "--head", "learnable", "--epochs", "6", "--lr", "3e-3",
                       "--backbone-lr-ratio", "0.3"))
    losses = [json.loads(x)["loss"] for x in (cache / "runs" / "learn" / "history.jsonl").read_text().splitlines()
              if json.loads(x)["kind"] == "step"]
    assert len(losses) == 24 and np.mean(losses[-4:]) < 0.6 * np.mean(losses[:4])


def test_token_t1d_identity_init_keeps_the_encoder_and_shift_init_shifts(extracted):
    clip = load_clip(ModelSpec(f"local-dir:{extracted[1]}"))
    head = CosineHead(torch.randn(5, clip.embed_dim), learnable=False)
    x = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        plain = build_video_classifier(load_clip(ModelSpec(f"local-dir:{extracted[1]}")).model.visual,
                                       clip.embed_dim, head, "tap", 4)(x)
        t1d = build_video_classifier(clip.model.visual, clip.embed_dim, head, "tokent1d", 4, t1d_init="identity")(x)
    assert torch.allclose(plain, t1d, atol=1e-5)
    tokens = torch.randn(2 * 4, 3, 16)
    shifted = TokenT1D(16, "shift")(tokens, 4)
    assert torch.equal(shifted[:, 1:], tokens[:, 1:])  # patch tokens untouched
    cls, out = tokens[:, 0].view(2, 4, 16), shifted[:, 0].view(2, 4, 16)
    assert torch.equal(out[:, :-1, :4], cls[:, 1:, :4])  # the official shift: 1/4 of channels from the next frame
    assert torch.equal(out[:, 1:, 4:8], cls[:, :-1, 4:8])  # 1/4 from the previous frame
    assert torch.equal(out[:, :, 8:], cls[:, :, 8:])  # the rest stay


def wait_for_step(history: Path, step: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if history.exists() and any(json.loads(x).get("step", 0) >= step for x in history.read_text().splitlines()):
            return
        time.sleep(0.05)
    raise AssertionError(f"the run never reached step {step}: {proc.stderr.read().decode()[-800:]}")


@pytest.mark.slow
def test_sigkilled_run_resumes_bit_exact(ft_cache):
    cache, m = ft_cache
    args = common(m, "whole", "--head", "clip-text", "--temporal", "ttrans", "--layers", "1", "--epochs", "2",
                  "--checkpoint-every", "2", "--workers", "2", "--randaugment", "2", "5")
    run_inproc(*args)
    killed = ["killed" if a == "whole" else a for a in args]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *killed], cwd=Path(__file__).parent,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    wait_for_step(cache / "runs" / "killed" / "history.jsonl", 5, proc)
    # the main process only, mid-epoch 2, as the OOM killer does: its loader workers live on for seconds and must
    # not hold the run's lock (they did: the restart was refused, naming the dead pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (cache / "runs" / "killed" / "metrics.json").exists()
    try:
        run_inproc(*killed)  # at once
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # any worker still alive
        except ProcessLookupError:
            pass
    a, b = load_state(cache, "whole"), load_state(cache, "killed")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [json.loads(x)["step"] for x in (cache / "runs" / "killed" / "history.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "step"]
    assert steps == list(range(1, 9))  # the replayed steps replace the lost ones in the log


def test_few_shot_subset_is_seeded_and_repeated(ft_cache):
    cache, m = ft_cache
    import zarr

    labels = usable_rows(zarr.open_group(str(cache / "frames" / "toy" / "train"), mode="r"))[1]
    a, b, c = (sample_per_class(labels, 12, 2, s) for s in (0, 0, 1))
    assert np.array_equal(a, b) and not np.array_equal(a, c) and len(a) == 24
    run_inproc(*common(m, "two", "--head", "clip-text", "--shots", "2"))
    metrics = json.loads((cache / "runs" / "two" / "metrics.json").read_text())
    assert metrics["steps"] == 4  # 24 clips repeated to the full set's 60 per epoch


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "pipeline", *args],
                          cwd=Path(__file__).parent, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(ft_cache):
    cache, m = ft_cache
    args = common(m, "one", "--head", "clip-text", "--global-batch-size", "12", "--micro-batch", "4")
    run_inproc(*args)
    ddp = ["two-procs" if a == "one" else "--run-name" if a == "--run" else a for a in args]
    proc = torchrun(*ddp)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = load_state(cache, "one"), load_state(cache, "two-procs")
    for key in a:
        x, y = a[key], b[key]
        if key.endswith("attn.in_proj_bias"):
            # The key bias's gradient is zero in exact arithmetic (softmax ignores a shift shared by a
            # query's scores); AdamW divides its rounding noise by that noise's own size, so it moves
            # by about the learning rate either way. Compare the query and value biases only.
            d = x.numel() // 3
            x, y = torch.cat([x[:d], x[2 * d:]]), torch.cat([y[:d], y[2 * d:]])
        assert torch.allclose(x, y, atol=2e-5, rtol=1e-4), key
    # evaluation of the same weights: exactly the metrics of one process (24 videos, 2 ranks, no padding)
    single = json.loads(run_inproc("evaluate", "--run-name", "one", "--views", "2x3", "--batch-size", "5", "--json",
                                   "--cache", str(cache)))
    proc = torchrun("evaluate", "--run-name", "one", "--views", "2x3", "--batch-size", "5", "--json",
                    "--cache", str(cache))
    assert proc.returncode == 0, proc.stderr[-2000:]
    both = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert both == single and single["videos"] == 24


def test_multi_view_clips_and_averaging(ft_cache, extracted):
    cache, _ = ft_cache
    import zarr

    clip = load_clip(ModelSpec(f"local-dir:{extracted[1]}"))
    norm = Normalization(clip.image_size, clip.mean, clip.std)
    path = cache / "frames" / "toy" / "val"
    rows, labels = usable_rows(zarr.open_group(str(path), mode="r"))
    data = FrameClipSet(str(path), rows[:3], labels[:3], 2, norm, 0, views=(2, 3))
    x, _ = data.item(0, 0, False)
    assert x.shape == (6, 2, 3, 32, 32)
    single = FrameClipSet(str(path), rows[:3], labels[:3], 2, norm, 0).item(0, 0, False)[0]
    # T_cache 4, T 2: clip 0 takes frames (0, 2), clip 1 (1, 3); the single view, as the official sampler, each
    # segment's first frame = clip 0; square 32-px frames scaled to 37 px (256 per 224) first: the centre of the
    # 3 crops is the single view's
    assert single.shape == (1, 2, 3, 32, 32) and torch.equal(single[0], x[1]) and not torch.equal(x[3], x[5])
    assert not torch.equal(x[0], x[3])
    # predict() averages the views' raw embeddings before the head, as test.py:233-235
    head = CosineHead(torch.randn(12, clip.embed_dim), learnable=False)
    model = build_video_classifier(clip.model.visual, clip.embed_dim, head, "tap", 2).eval()
    logits, y = predict(model, data, batch_size=2)
    with torch.no_grad():
        emb = model.embed(x).mean(0, keepdim=True)
        assert np.allclose(logits[0], model.head(emb)[0].numpy(), atol=1e-5) and logits.shape == (3, 12)


def test_multilabel_map_on_a_constructed_example():
    targets = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 1], [1, 0, 0]])
    scores = np.array([[0.9, 0.1, 0.0], [0.1, 0.2, 0.8], [0.5, 0.1, 0.3], [0.2, 0.7, 0.1]])
    r = multilabel_metrics(scores, targets)
    # class 0: positives ranked 1st and 3rd -> AP (1 + 2/3) / 2; class 1: ranked 2nd -> 1/2; class 2: 1st, 2nd -> 1
    assert r["mAP"] == pytest.approx(100 * ((1 + 2 / 3) / 2 + 0.5 + 1) / 3)
    assert r["top1"] == pytest.approx(50.0)  # rows 0 and 1 hit; row 2 predicts 0, row 3 predicts 1


def test_evaluate_and_predict_with_a_run(ft_cache, extracted):
    cache, m = ft_cache
    run_inproc(*common(m, "pv", "--head", "clip-text"))
    out = run_inproc("evaluate", "--run-name", "pv", "--views", "2x3", "--cache", str(cache))
    assert "2x3 views, 24 videos: top1" in out
    single = json.loads(run_inproc("evaluate", "--run-name", "pv", "--json", "--cache", str(cache)))
    metrics = json.loads((cache / "runs" / "pv" / "metrics.json").read_text())
    assert single["top1"] == pytest.approx(metrics["val_top1"])  # the loop's evaluation is the 1x1 one
    video = sorted((extracted[0].parent / "world").rglob("*.mp4"))[0]
    out = run_inproc("predict", str(video), "--run-name", "pv", "--cache", str(cache))
    assert out.count("%") == 5
    out = run_inproc("predict", str(video), "--run-name", "pv", "--labels", "red thing,blue thing", "--cache",
                     str(cache))
    assert "red thing" in out and "blue thing" in out


@pytest.mark.slow
def test_contrastive_objective_offline_online_and_gathered(ft_cache):
    cache, m = ft_cache
    base = common(m, "c-off", "--head", "clip-text", "--objective", "contrastive", "--global-batch-size", "12")
    run_inproc(*base)
    run_inproc(*["c-off-nogather" if a == "c-off" else a for a in base], "--no-batch-gather")
    a, b = load_state(cache, "c-off"), load_state(cache, "c-off-nogather")
    assert all(torch.equal(a[k], b[k]) for k in a)  # one process: gathering changes nothing
    cached = pipeline.open_head(cache / "heads" / "toy" / "tiny-clip" / "clip-text").weights
    assert torch.equal(a["video.head.weight"], torch.from_numpy(cached))  # offline: the cached rows, frozen
    run_inproc(*["c-on" if a == "c-off" else a for a in base], "--text", "online", "--text-lr", "1e-3")
    online = load_state(cache, "c-on")
    from pipeline.models.clip import load_clip as load

    tower = load(ModelSpec(m[1])).model.state_dict()
    assert not torch.equal(online["video.head.text.ln_final.weight"], tower["ln_final.weight"])  # the tower trained
    out = json.loads(run_inproc("evaluate", "--run-name", "c-on", "--json", "--cache", str(cache)))
    assert out["videos"] == 24 and 0 <= out["top1"] <= 100
    # two processes: with gather each rank sees the other's clips as negatives, without it not
    for name, flag in (("c2-gather", "--batch-gather"), ("c2-local", "--no-batch-gather")):
        proc = torchrun(*[name if a == "c-off" else "--run-name" if a == "--run" else a for a in base], flag,
                        "--text", "online", "--text-lr", "1e-3")  # the trained tower under DDP too
        assert proc.returncode == 0, proc.stderr[-2000:]
    g, loc = load_state(cache, "c2-gather"), load_state(cache, "c2-local")
    key = "video.visual.transformer.resblocks.0.mlp.c_fc.weight"
    assert not torch.allclose(g[key], loc[key], atol=1e-6)


@pytest.mark.slow
def test_init_from_copies_a_runs_encoder_and_temporal_module_and_refuses_other_architectures(ft_cache, extracted,
                                                                                             tmp_path):
    from stages.runs import init_from_run

    cache, m = ft_cache
    run_inproc(*common(m, "src", "--head", "clip-text", "--temporal", "ttrans", "--layers", "1"))
    source = load_state(cache, "src")
    clip = load_clip(ModelSpec(f"local-dir:{extracted[1]}"))
    model = classifier_for(clip, torch.randn(12, clip.embed_dim), False, "ttrans", 4, 1, "shift")
    start = init_from_run(model, cache, "src")
    mine = model.state_dict()
    copied = [k for k in source if k.startswith(("visual.", "temporal."))]
    assert copied and all(torch.equal(mine[k], source[k]) for k in copied)
    # the trained logit scale too (the official code loads the whole state dict, train.py:245-250)
    fresh = classifier_for(clip, torch.randn(12, clip.embed_dim), False, "ttrans", 4, 1, "shift")
    assert not torch.equal(fresh.state_dict()["head.logit_scale"], source["head.logit_scale"])
    assert torch.equal(mine["head.logit_scale"], source["head.logit_scale"]) and start["logit_scale"]
    assert start["run"] == "src" and start["fingerprint"]
    # through the CLI: another head, the same architecture -> trains and records where it started
    run_inproc(*common(m, "dst", "--head", "random", "--temporal", "ttrans", "--layers", "1", "--init-from", "src"))
    info = json.loads((cache / "runs" / "dst" / "run.json").read_text())
    assert info["init_from"] == start
    proc = run_cli(*common(m, "bad", "--head", "random", "--temporal", "tokent1d", "--init-from", "src"), check=False)
    assert proc.returncode == 2 and "differs from this run's" in proc.stderr and "Traceback" not in proc.stderr


def test_few_shot_follows_the_released_configs_and_keeps_the_papers_epochs_as_a_preset(ft_cache, tmp_path):
    """The released few-shot configs train `solver.epochs: 30` on the repeated K-shot list; App. B.1 says 2 (K400)
    or 10 epochs: the code's by default, the paper's with --few-shot-recipe paper."""
    cache, m = ft_cache
    params = tmp_path / "p.yaml"
    params.write_text("finetune:\n  epochs: 3\n  few_shot_epochs: 2\n")
    base = ["finetune", "--frozen-backbone", "-d", "toy", *m, "--head", "clip-text", "--frames", "2", "--shots", "1",
            "--global-batch-size", "4", "--warmup-epochs", "0", "-q", "--params", str(params)]
    run_inproc(*base, "--run-name", "fs-code")
    assert json.loads((cache / "runs" / "fs-code" / "run.json").read_text())["config"]["epochs"] == 3
    run_inproc(*base, "--few-shot-recipe", "paper", "--run-name", "fs")
    assert json.loads((cache / "runs" / "fs" / "run.json").read_text())["config"]["epochs"] == 2
    run_inproc(*base, "--few-shot-recipe", "paper", "--epochs", "1", "--run-name", "fs1")  # a flag still wins
    assert json.loads((cache / "runs" / "fs1" / "run.json").read_text())["config"]["epochs"] == 1


def test_zero_shot_protocols_on_a_fine_tuned_run_score_only_the_chosen_classes(ft_cache, tmp_path):
    """`evaluate --run-name R --protocol subsets` (the K600 protocol: 160 of its new classes per split, the
    trained ones never competing) and `--protocol half` work on a fine-tuned run's logits."""
    cache, m = ft_cache
    base = ["finetune", "--frozen-backbone", "-d", "toy", *m, "--head", "clip-text", "--frames", "2", "--epochs", "1",
            "--global-batch-size", "8", "--warmup-epochs", "0", "-q"]
    run_inproc(*base, "--run-name", "zs")
    names = json.loads((cache / "runs" / "zs" / "run.json").read_text())["class_names"]
    split1, split2 = tmp_path / "split1.csv", tmp_path / "split2.csv"
    split1.write_text("id,name\n" + "".join(f"{i},{n}\n" for i, n in enumerate(names[:4])))  # the official format
    split2.write_text("\n".join(names[4:9]) + "\n")
    out = run_inproc("evaluate", "--run-name", "zs", "--cache", str(cache), "--protocol", "full", "--protocol", "half",
                     "--protocol", "subsets", "--subsets", str(split1), "--subsets", str(split2), "--json")
    result = json.loads(out[out.index("{"):])
    runs = result["subsets"]["runs"]
    assert [r["classes"] for r in runs] == [4, 5] and result["subsets"]["subsets"] == 2
    assert runs[0]["videos"] < result["videos"] and 0 <= result["subsets"]["top1"] <= 100
    assert result["half"]["classes_per_draw"] == 6 and len(result["half"]["runs"]) == 10
    from pipeline.learning.evaluation import half_draw  # `evaluate --json` lists each official draw's classes

    assert [r["class_indices"] for r in result["half"]["runs"]] == [half_draw(12, k).tolist() for k in range(10)]
    # scored among the subset only: its top-1 is at least the full-label-set top-1 on the same videos
    assert all(r["top5"] == 100.0 for r in runs[:1])  # 4 classes: every class is in the top 5


def test_official_k600_split_files_read_as_160_new_class_names():
    from stages.evaluate import read_subsets

    lists = Path(__file__).resolve().parents[2] / "shared" / "text4vis-lists" / "k600"
    if not lists.is_dir():
        pytest.skip("../shared/text4vis-lists is absent")
    splits = read_subsets([str(lists / f"k160_labels_split{i}.csv") for i in (1, 2, 3)])
    assert [len(s) for s in splits] == [160, 160, 160]
    assert all(not n.isdigit() for s in splits for n in s) and "acting in play" in splits[0]
    k400 = Path(__file__).resolve().parents[2] / "shared" / "text4vis-lists" / "labels" / "kinetics_400_labels.csv"
    if k400.is_file():
        seen = set(read_subsets([str(k400)])[0])
        assert not any(n in seen for s in splits for n in s)  # the K600 protocol never scores a K400 class


def test_coop_trains_its_context_not_the_text_tower_and_writes_a_reusable_head(ft_cache, extracted):
    """Table A.4: learnable prompt context in the frozen CLIP text tower, trained with the video side."""
    from pipeline.models.coop import CoOpHead

    cache, m = ft_cache
    clip = load_clip(ModelSpec(f"local-dir:{extracted[1]}"))
    names = ["a small red disc", "a large blue ring"]
    head = CoOpHead(clip.model, clip.tokenizer, names, n_ctx=4)
    # with the context set to the embedding of the placeholder word, the rows are exactly encode_text's
    x_id = int(head.tokens[0, 1])
    with torch.no_grad():
        head.ctx.copy_(clip.model.token_embedding.weight[x_id].expand(4, -1))
        assert torch.allclose(head.class_embeddings(), clip.model.encode_text(head.tokens), atol=1e-5)

    # no --coop-ctx: the paper's M = 4 (App. A, "We set the M to 4"), not CoOp's own 16
    assert CoOpHead(load_clip(ModelSpec(f"local-dir:{extracted[1]}")).model, clip.tokenizer, names).n_ctx == 4
    base = ["finetune", "--frozen-backbone", "-d", "toy", *m, "--head", "coop", "--coop-lr", "1e-2",
            "--frames", "2", "--epochs", "1", "--global-batch-size", "8", "--warmup-epochs", "0", "-q"]
    run_inproc(*base, "--run-name", "coop")
    state = load_state(cache, "coop")
    tower = load_clip(ModelSpec(f"local-dir:{extracted[1]}")).model.state_dict()
    text_keys = [k for k in state if k.startswith("head.text.")]
    assert text_keys and all(torch.equal(state[k], tower[k.removeprefix("head.text.")]) for k in text_keys)
    info = json.loads((cache / "runs" / "coop" / "run.json").read_text())
    assert info["coop_ctx"] == 4 and info["coop_lr"] == 1e-2 and state["head.ctx"].shape[0] == 4
    # the learned prompts are a cached head like any other: untuned evaluation reads it
    import zarr

    cached = zarr.open_group(str(cache / "heads" / "toy" / "tiny-clip" / "coop"), mode="r")
    assert cached["head"].shape[0] == 12 and cached.attrs["kind"] == "coop"
    out = run_inproc("evaluate", "-d", "toy", *m, "--head", "coop", "--json")
    assert json.loads(out[out.index("{"):])["head"] == "coop"
    result = json.loads(run_inproc("evaluate", "--run-name", "coop", "--cache", str(cache), "--json"))
    assert result["head"] == "coop" and 0 <= result["top1"] <= 100


def test_coop_context_vectors_are_what_training_changes(extracted, tmp_path):
    from pipeline.learning.training import TrainConfig, train
    from pipeline.models.classifier import CosineHead, FrameFeatureClassifier
    from pipeline.models.coop import CoOpHead
    from pipeline.models.temporal import TemporalMeanPool

    clip = load_clip(ModelSpec(f"local-dir:{extracted[1]}"))
    width = clip.embed_dim
    names = ["a small red disc", "a large blue ring", "a small green plus"]
    model = FrameFeatureClassifier(TemporalMeanPool(), CosineHead(torch.zeros(3, width), learnable=False), width,
                                   project=False)
    model.head = CoOpHead(clip.model, clip.tokenizer, names, n_ctx=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    class Toy:
        def __len__(self):
            return 12

        def item(self, i, epoch, train):
            x = torch.randn(2, width, generator=torch.Generator().manual_seed(i))
            return (x if train else x[None]), torch.as_tensor(i % 3)

    train(model, Toy(), None, TrainConfig(epochs=2, batch_size=6, lr=1e-2, warmup_epochs=0), tmp_path / "r", "fp")
    after = model.state_dict()
    assert not torch.equal(before["head.ctx"], after["head.ctx"])
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("head.text."))


def test_multiple_hard_templates_draw_one_template_per_step_and_evaluate_the_single_template(ft_cache, tmp_path):
    from pipeline.models.classifier import TemplateDrawHead

    bank = torch.randn(3, 4, 8)
    head = TemplateDrawHead(bank)
    video = torch.randn(2, 8)
    torch.manual_seed(0)
    drawn = {tuple(head(video).flatten().tolist()) for _ in range(12)}
    assert len(drawn) > 1  # training passes use different templates
    head.eval()
    normed = bank / bank.norm(dim=-1, keepdim=True)
    assert torch.allclose(head.weight, normed.mean(0)) and torch.equal(head(video), head(video))  # the ensemble

    cache, m = ft_cache
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\na video of a {}.\n{}, a shape.\n")
    run_inproc(*common(m, "hard", "--head", "clip-text", "--hard-templates", str(templates)))
    info = json.loads((cache / "runs" / "hard" / "run.json").read_text())
    assert info["hard_templates"] == ["a photo of a {}.", "a video of a {}.", "{}, a shape."]
    state = load_state(cache, "hard")
    assert state["head.bank"].shape[:2] == (3, 12)
    # evaluation with the single template, as the paper: the cached clip-text head's rows
    import zarr

    cached = zarr.open_group(str(cache / "heads" / "toy" / "tiny-clip" / "clip-text"), mode="r")["head"][:]
    assert info["hard_templates_eval"] == "single" and torch.equal(state["head.weight"], torch.from_numpy(cached))
    result = json.loads(run_inproc("evaluate", "--run-name", "hard", "--cache", str(cache), "--json"))
    assert 0 <= result["top1"] <= 100
    run_inproc(*common(m, "hard-ens", "--head", "clip-text", "--hard-templates", str(templates),
                       "--hard-templates-eval", "ensemble"))
    ensemble = load_state(cache, "hard-ens")
    assert torch.allclose(ensemble["head.weight"], ensemble["head.bank"].mean(0))


def test_a_run_evaluates_the_whole_dataset_with_split_all(ft_cache, extracted):
    cache, m = ft_cache
    run_inproc("frames", "--format", "csv", "--root", str(extracted[0].parent / "world"), "--dataset", "toy", "--split",
               "all", "--cache-frames", "4", "--height", "32", "--width", "32", "--block-size", "4", "--cache",
               str(cache), "-q")
    run_inproc("features", "-d", "toy", *m, "--model-key", "tiny-clip", "-q")
    base = ["finetune", "--frozen-backbone", "-d", "toy", *m, "--head", "clip-text", "--frames", "2", "--epochs", "1",
            "--global-batch-size", "8", "--warmup-epochs", "0", "-q", "--run-name", "all-splits"]
    run_inproc(*base)
    results = {split: json.loads(run_inproc("evaluate", "--run-name", "all-splits", "--cache", str(cache), "--split",
                                            split, "--json")) for split in ("train", "val", "all")}
    assert results["all"]["videos"] == results["train"]["videos"] + results["val"]["videos"] == 84
    hits = sum(results[s]["top1"] * results[s]["videos"] for s in ("train", "val")) / 84
    assert abs(results["all"]["top1"] - hits) < 1e-6


def _profile_stage_cmd(stage: str, item: str) -> list[str]:
    """The command of a foreach stage of data/profiles/dvc.yaml for one item, as DVC runs it."""
    import shlex

    import yaml

    profiles = Path(__file__).resolve().parents[1] / "data" / "profiles"
    cmd = yaml.safe_load((profiles / "dvc.yaml").read_text())["stages"][stage]["do"]["cmd"]
    args = shlex.split(cmd.replace("${item}", item))
    assert args[:2] == ["pipeline", "evaluate"]
    # the profile by its path (DVC runs in data/profiles)
    return [str(profiles / a) if a.endswith(".yaml") else a for a in args[1:]]


def test_the_activitynet_zero_shot_stage_runs_to_a_number_for_full_and_half(ft_cache, extracted, tmp_path):
    """table4@anet (data/profiles/dvc.yaml) on a small generated ActivityNet: the split all of whole training and
    validation videos with one label each, scored by the K400 run, all classes and half of them x 10."""
    cache, m = ft_cache
    world = extracted[0].parent / "world"
    classes = (world / "classes.txt").read_text().split("\n")[:4]
    videos = {c: sorted((world / "videos").glob(f"*/{c.replace(' ', '_')}/*.mp4"))[:3] for c in classes}
    root = tmp_path / "anet"
    root.mkdir()
    database = {}
    for k, (c, files) in enumerate(videos.items()):
        for n, f in enumerate(files):
            vid = f"c{k}n{n}"
            shutil.copyfile(f, root / f"v_{vid}.mp4")
            anns = [{"segment": [0.0, 1.0], "label": c}]
            if n == 2:  # a validation video with a second label (the majority stays its own class)
                anns += [{"segment": [0.5, 1.5], "label": c}, {"segment": [1.0, 1.5], "label": classes[k - 1]}]
            database[vid] = {"subset": "validation" if n == 2 else "training", "annotations": anns}
    (root / "activity_net.v1-3.min.json").write_text(json.dumps({"database": database}))
    out = run_inproc("frames", "--format", "anet", "--root", str(root), "--split", "all", "--cache-frames", "4",
                     "--height", "32", "--width", "32", "--block-size", "4", "--cache", str(cache), "-q")
    assert "anet/all: 12 videos, 12 ok" in out and "4 carry several labels" in out
    run_inproc("features", "-d", "anet", *m, "--model-key", "tiny-clip", "-q")
    run_inproc("labels", "-d", "anet", *m, "--model-key", "tiny-clip")
    run_inproc("heads", "-d", "anet", *m, "--model-key", "tiny-clip", "--head", "clip-text")
    run_inproc(*common(m, "k400-vitl14-ttrans", "--head", "clip-text", "--temporal", "ttrans", "--layers", "1"))
    args = _profile_stage_cmd("table4", "anet")
    args[args.index("--out") + 1] = str(tmp_path / "table4-anet.json")
    run_inproc(*args, "--cache", str(cache), "-q")
    result = json.loads((tmp_path / "table4-anet.json").read_text())
    assert result["split"] == "all" and result["videos"] == 12 and 0 <= result["top1"] <= 100
    assert len(result["half"]["runs"]) == 10 and 0 <= result["half"]["top1"] <= 100
    assert result["test_scale"] == 256 and result["views"] == "1x1"
