"""The real-data profiles and their DVC project (data/profiles): one stage per paper number, each on the released
recipe, with the official class names."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.core import settings as S
from pipeline.core.params import Params
from pipeline.core.settings import load_params

PROFILES = Path(__file__).resolve().parents[1] / "data" / "profiles"
SHARED_LABELS = Path(__file__).resolve().parents[2] / "shared" / "text4vis-lists" / "labels"


def resolved(profile: str, cls: type):
    """A command's settings as `--params data/profiles/<profile>.yaml` resolves them."""
    loaded = load_params(str(PROFILES / f"{profile}.yaml"))
    return S.resolve(cls, lambda section: Params(loaded, section), {}).values


def stages() -> dict:
    return yaml.safe_load((PROFILES / "dvc.yaml").read_text())["stages"]


def test_dvc_dag_has_one_stage_per_paper_number():
    dvc = Path(sys.executable).with_name("dvc")
    if not dvc.exists() and not shutil.which("dvc"):
        pytest.skip("dvc is not installed")
    proc = subprocess.run([str(dvc) if dvc.exists() else "dvc", "stage", "list"], cwd=PROFILES, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    names = {line.split()[0] for line in proc.stdout.splitlines() if line.strip()}
    wanted = {"table1@1x1", "table1@4x3", "table4@ucf101", "table4@hmdb51", "table4@anet", "table4-k600",
              "table6@random", "table6@orthogonal", "table6@lda", "table6@distilbert", "finetune-k400",
              "finetune-k400-vitl14", "table1-vitl14@1x1", "table1-vitl14@4x3"}
    wanted |= {f"table3@{d}-{k}shot" for d in ("ucf101", "hmdb51", "anet", "k400") for k in (2, 4, 8, 16)}
    assert wanted <= names, sorted(wanted - names)
    assert not {n for n in names if "tap" in n}  # the K400 runs are named by what they train (T-Trans)
    dag = subprocess.run([str(dvc) if dvc.exists() else "dvc", "dag"], cwd=PROFILES, capture_output=True, text=True)
    assert dag.returncode == 0, dag.stderr


def test_the_paper_number_stages_use_the_runs_of_the_official_recipe():
    s = stages()
    assert "--run-name k400-vitb16-ttrans" in s["finetune-k400"]["cmd"]
    assert "--run-name k400-vitb16-ttrans" in s["table1"]["do"]["cmd"] and s["table1"]["foreach"] == ["1x1", "4x3"]
    # zero-shot: the K400 ViT-L/14 T-Trans run, the whole dataset (the profiles' evaluate.split: all)
    assert "--run-name k400-vitl14-ttrans" in s["finetune-k400-vitl14"]["cmd"]
    assert "--params k400-vitl14.yaml" in s["finetune-k400-vitl14"]["cmd"]
    own = s["table1-vitl14"]  # the same run's own K400 accuracy, both test protocols of table1
    assert "--run-name k400-vitl14-ttrans" in own["do"]["cmd"] and "--params k400-vitl14.yaml" in own["do"]["cmd"]
    assert own["foreach"] == ["1x1", "4x3"] and "--views ${item}" in own["do"]["cmd"]
    assert "--run-name k400-vitl14-ttrans" in s["table4"]["do"]["cmd"]
    k600 = s["table4-k600"]["cmd"]
    assert "--run-name k400-vitl14-ttrans" in k600 and "--protocol subsets" in k600
    for name, item in s["table3"]["foreach"].items():
        assert f"-{item['shots']}shot" in name and item["profile"] in ("ucf101", "hmdb51", "anet", "k400-fewshot")


def test_k400_profiles_follow_the_released_configs():
    for profile, model, temporal, micro in (("k400", "ViT-B-16", "ttrans", 32),
                                            ("k400-vitl14", "ViT-L-14", "ttrans", 8),
                                            ("k400-fewshot", "ViT-L-14", "tap", 8)):
        ft = resolved(profile, S.FinetuneSettings)
        assert ft.model == model and ft.temporal == temporal and ft.micro_batch == micro, profile
        assert (ft.frames, ft.epochs, ft.lr, ft.backbone_lr_ratio, ft.warmup_epochs, ft.min_lr, ft.weight_decay) == (
            8, 30, 5e-5, 0.1, 5.0, 0.0, 0.2), profile
        assert tuple(ft.betas) == (0.9, 0.999) and tuple(ft.randaugment) == (2, 9) and ft.test_scale == 256, profile
    assert resolved("k400", S.FinetuneSettings).layers == resolved("k400-vitl14", S.FinetuneSettings).layers == 6
    assert resolved("k400", S.FinetuneSettings).global_batch_size == 256
    assert resolved("k400-fewshot", S.FinetuneSettings).few_shot_recipe == "code"
    assert resolved("k400-fewshot", S.FinetuneSettings).few_shot_epochs == 2  # App. B.1, the paper preset
    ev = resolved("k400", S.EvaluateSettings)
    assert ev.views == "4x3" and ev.test_scale == 256 and ev.split == "val"


@pytest.mark.parametrize("profile", ["ucf101", "hmdb51", "anet"])
def test_zero_and_few_shot_profiles_are_vitl14_on_the_whole_dataset_and_the_released_few_shot_config(profile):
    ev = resolved(profile, S.EvaluateSettings)
    assert ev.model == "ViT-L-14" and ev.split == "all" and ev.views == "1x1" and ev.protocols == ["full", "half"]
    assert "all" in resolved(profile, S.FramesSettings).splits
    ft = resolved(profile, S.FinetuneSettings)
    assert (ft.model, ft.temporal, ft.frames, ft.epochs, ft.few_shot_recipe, ft.few_shot_epochs) == (
        "ViT-L-14", "tap", 8, 30, "code", 10)
    assert tuple(ft.randaugment) == (0, 0)  # the released few-shot configs have no randaug outside K400
    assert ft.global_batch_size == 64 and ft.micro_batch == 8  # batch_size 8 per GPU x 8 GPUs


@pytest.mark.parametrize("profile, listing, classes", [("ucf101", "ucf_labels.csv", 101),
                                                       ("hmdb51", "hmdb51_labels.csv", 51),
                                                       ("anet", "anet1.3_labels.csv", 200),
                                                       ("k400", "kinetics_400_labels.csv", 400),
                                                       ("k400-vitl14", "kinetics_400_labels.csv", 400),
                                                       ("k400-fewshot", "kinetics_400_labels.csv", 400)])
def test_profiles_that_reproduce_a_paper_number_embed_the_official_class_names(profile, listing, classes):
    assert resolved(profile, S.LabelsSettings).class_names == f"text4vis:{listing}"
    assert resolved(profile, S.ExtractSettings).class_names == f"text4vis:{listing}"  # `extract` embeds them too
    if not (SHARED_LABELS / listing).is_file():
        pytest.skip("../shared/text4vis-lists is absent")
    rows = list(csv.reader((SHARED_LABELS / listing).open()))
    assert rows[0] == ["id", "name"] and len(rows) - 1 == classes


def test_the_labels_stage_says_it_embedded_the_official_names(extracted, tmp_path, monkeypatch):
    """`labels --class-names text4vis:...` reads the official list (here from a local copy, as
    PIPELINE_LISTS_CACHE pointed at a clone's lists/ does offline) and says whose names it embedded."""
    import zarr
    from conftest import run_inproc

    cache, tiny = extracted
    names = list(zarr.open_group(str(cache / "frames" / "toy" / "train"), mode="r").attrs["class_names"])
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "toy_labels.csv").write_text("id,name\n" + "".join(f"{i},{n.title()}\n" for i, n in enumerate(names)))
    monkeypatch.setenv("PIPELINE_LISTS_CACHE", str(lists))
    work = tmp_path / "cache"
    shutil.copytree(cache, work)
    m = ["--model", f"local-dir:{tiny}", "--cache", str(work)]
    out = run_inproc("labels", "-d", "toy", *m, "--class-names", "text4vis:toy_labels.csv", "--replace-mismatched")
    assert "the official code's class names from text4vis:toy_labels.csv" in out
    out = run_inproc("labels", "-d", "toy", *m, "--replace-mismatched")
    assert "the dataset's readable class names" in out
