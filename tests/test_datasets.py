"""Each adapter on a small tree in its dataset's official layout."""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from pathlib import Path

import pytest
from conftest import copy_video

from pipeline.core.errors import PipelineError
from pipeline.media.datasets import load_manifest
from pipeline.media.datasets.common import index_videos


def test_kinetics_trimmed_per_class_and_split_folders(tmp_path, template):
    root = tmp_path / "k400"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "train.csv").write_text(
        "label,youtube_id,time_start,time_end,split\n"
        "abseiling,aaa,10,20,train\n"
        "air drumming,bbb,0,10,train\n"
        "abseiling,ccc,5,15,train\n")
    (root / "annotations" / "val.csv").write_text(
        "label,youtube_id,time_start,time_end,split\nair drumming,ddd,30,40,val\n")
    (root / "annotations" / "test.csv").write_text("youtube_id,time_start,time_end,split\neee,0,10,test\n")
    copy_video(template, root / "train" / "abseiling" / "aaa_000010_000020.mp4")
    copy_video(template, root / "train" / "air drumming" / "bbb_000000_000010.webm")
    copy_video(template, root / "val" / "ddd_000030_000040.mkv")
    copy_video(template, root / "test" / "eee_000000_000010.mp4")
    m = load_manifest("k400", str(root))
    assert m.class_names == ["abseiling", "air drumming"]
    by_id = {r.video_id: r for r in m.records}
    assert by_id["aaa_000010_000020"].path.endswith("train/abseiling/aaa_000010_000020.mp4")
    assert by_id["bbb_000000_000010"].path.endswith(".webm") and by_id["bbb_000000_000010"].label == 1
    assert by_id["ccc_000005_000015"].path == ""  # annotated but not downloaded: reported later, not fatal
    assert by_id["ddd_000030_000040"].split == "val"
    assert by_id["eee_000000_000010"].label == -1 and by_id["eee_000000_000010"].split == "test"
    assert math.isnan(by_id["aaa_000010_000020"].start)  # trimmed files are decoded whole


def test_kinetics_untrimmed_cuts_the_segment(tmp_path, template):
    root = tmp_path / "k600"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "val.csv").write_text(
        "label,youtube_id,time_start,time_end,split\nsinging,xyz,3,13,val\n")
    copy_video(template, root / "raw" / "xyz.mp4")
    m = load_manifest("k600", str(root), untrimmed=True)
    (r,) = m.records
    assert r.path.endswith("xyz.mp4") and (r.start, r.end) == (3.0, 13.0)


def test_kinetics_bad_annotation_is_one_line_error(tmp_path):
    root = tmp_path / "k700"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "train.csv").write_text("foo,bar\n1,2\n")
    with pytest.raises(PipelineError, match="unreadable annotation file"):
        load_manifest("k700", str(root))


def test_ucf101_official_lists_and_readable_names(tmp_path, template):
    root = tmp_path / "ucf"
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 HandstandPushups\n3 YoYo\n")
    for n in (1, 2, 3):
        (lists / f"trainlist0{n}.txt").write_text(
            "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\nHandstandPushups/v_HandStandPushups_g08_c01.avi 2\n")
        (lists / f"testlist0{n}.txt").write_text("YoYo/v_YoYo_g01_c01.avi\n")
    for rel in ("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", "HandstandPushups/v_HandStandPushups_g08_c01.avi",
                "YoYo/v_YoYo_g01_c01.avi"):
        copy_video(template, root / "UCF-101" / rel)
    m = load_manifest("ucf101", str(root), split_id=2)
    assert m.class_names == ["apply eye makeup", "handstand pushups", "yo yo"]
    assert [(r.video_id, r.label, r.split) for r in m.records] == [
        ("v_ApplyEyeMakeup_g08_c01", 0, "train"), ("v_HandStandPushups_g08_c01", 1, "train"),
        ("v_YoYo_g01_c01", 2, "test")]
    assert all(r.path for r in m.records)
    with pytest.raises(PipelineError, match="splits 1, 2 and 3"):
        load_manifest("ucf101", str(root), split_id=4)


def test_hmdb51_split_files_side_by_side(tmp_path, template):
    root = tmp_path / "hmdb"
    splits = root / "testTrainMulti_7030_splits"
    splits.mkdir(parents=True)
    (splits / "brush_hair_test_split1.txt").write_text("a.avi 1\nb.avi 2\nc.avi 0\n")
    (splits / "cartwheel_test_split1.txt").write_text("d.avi 2 \n")
    (splits / "cartwheel_test_split2.txt").write_text("d.avi 1\n")
    for rel in ("brush_hair/a.avi", "brush_hair/b.avi", "brush_hair/c.avi", "cartwheel/d.avi"):
        copy_video(template, root / rel)
    m = load_manifest("hmdb51", str(root), split_id=1)
    assert m.class_names == ["brush hair", "cartwheel"]
    assert [(r.video_id, r.label, r.split) for r in m.records] == [
        ("a", 0, "train"), ("b", 0, "test"), ("d", 1, "test")]  # tag 0 = unused, dropped


def test_activitynet_segments_and_multilabel_validation(tmp_path, template):
    root = tmp_path / "anet"
    root.mkdir()
    db = {"database": {
        "abc": {"subset": "training", "duration": 30.0,
                "annotations": [{"segment": [1.0, 5.5], "label": "Surfing"},
                                {"segment": [10.0, 20.0], "label": "Surfing"}]},
        "def": {"subset": "validation", "duration": 30.0,
                "annotations": [{"segment": [0.0, 4.0], "label": "Ballet"},
                                {"segment": [5.0, 9.0], "label": "Surfing"}]},
        "ghi": {"subset": "testing", "duration": 30.0, "annotations": []}}}
    (root / "activity_net.v1-3.min.json").write_text(json.dumps(db))
    copy_video(template, root / "v1-3" / "train_val" / "v_abc.mp4")
    copy_video(template, root / "v1-3" / "train_val" / "v_def.mkv")
    m = load_manifest("anet", str(root))
    assert m.class_names == ["Ballet", "Surfing"]
    train = m.split("train").records
    assert [(r.video_id, r.start, r.end, r.label) for r in train] == [
        ("v_abc_0", 1.0, 5.5, 1), ("v_abc_1", 10.0, 20.0, 1)]
    (val,) = m.split("val").records
    assert val.labels == (0, 1) and val.path.endswith("v_def.mkv") and math.isnan(val.start)
    (test,) = m.split("test").records
    assert test.path == "" and test.label == -1
    assert m.multi_label


def test_generic_csv_and_folder(tmp_path, template):
    root = tmp_path / "mine"
    copy_video(template, root / "clips" / "one.mp4")
    copy_video(template, root / "clips" / "two.mp4")
    (root / "videos.csv").write_text("path,label,split,start,end\nclips/one.mp4,jump,train,,\n"
                                     "clips/two.mp4,run,val,0.1,0.3\n")
    m = load_manifest("csv", str(root / "videos.csv"))
    assert m.class_names == ["jump", "run"]
    assert [r.split for r in m.records] == ["train", "val"]
    assert m.records[0].path == str(root / "clips" / "one.mp4") and m.records[1].start == 0.1
    (root / "classes.txt").write_text("run\njump\n")
    assert load_manifest("csv", str(root)).class_names == ["run", "jump"]  # classes.txt fixes the order

    folder = tmp_path / "f"
    copy_video(template, folder / "train" / "play_ball" / "a.mp4")
    copy_video(template, folder / "val" / "play_ball" / "b.avi")
    copy_video(template, folder / "val" / "sit" / "c.mp4")
    m = load_manifest("folder", str(folder))
    assert m.class_names == ["play ball", "sit"]
    assert [(r.video_id, r.label, r.split) for r in m.records] == [
        ("train/play_ball/a", 0, "train"), ("val/play_ball/b", 0, "val"), ("val/sit/c", 1, "val")]


def test_folder_ids_never_collide_hidden_files_are_skipped_and_empty_folders_are_not_classes(tmp_path, template):
    root = tmp_path / "clips"
    for rel in ("jump/x.mp4", "jump/x.webm", "jump/y.mp4", "run/r.mp4",
                "jump/._x.mp4", "jump/.hidden.mp4", ".Trash/z.mp4", "run/.cache/w.mp4"):  # the last three: hidden
        copy_video(template, root / rel)
    (root / "jump" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "empty").mkdir()
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("no videos here\n")
    with pytest.warns(UserWarning, match=r"2 class folder\(s\) under .* hold no videos and are not classes: "
                                         r"empty, notes"):
        m = load_manifest("folder", str(root))
    assert m.class_names == ["jump", "run"]
    assert [(r.video_id, os.path.basename(r.path), r.label) for r in m.records] == [
        ("train/jump/x.mp4", "x.mp4", 0), ("train/jump/x.webm", "x.webm", 0), ("train/jump/y", "y.mp4", 0),
        ("train/run/r", "r.mp4", 1)]
    # annotation-driven adapters index no hidden copy either (a deleted video in .Trash is not "found")
    assert set(index_videos(root)) == {"x", "y", "r"}
    shutil.rmtree(root / "notes")
    (root / "empty").rmdir()
    copy_video(template, root / "jump" / "x.mp4.avi")  # its stem is x.mp4: no readable id would be unique
    with pytest.raises(PipelineError, match="would share the video id 'train/jump/x.mp4': rename one"):
        load_manifest("folder", str(root))


def test_val_fraction_that_leaves_a_class_without_training_videos_warns_naming_it(tmp_path, template):
    root = tmp_path / "clips"
    for c, n in (("many", 10), ("pair", 2), ("trio", 3)):
        for i in range(n):
            copy_video(template, root / c / f"v{i}.mp4")
    m = load_manifest("folder", str(root))
    with pytest.warns(UserWarning, match=r"holding out 0.75 .* leaves 1 class\(es\) without any \(all in 'val'\): "
                                         r"pair; a smaller --val-fraction"):
        held = m.hold_out(0.75)  # pair: round(1.5) = 2 of 2 go; trio: 2 of 3; many: 8 of 10
    assert {r.label for r in held.records if r.split == "train"} == {0, 2}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        held = m.hold_out(0.5)
    assert {r.label for r in held.records if r.split == "train"} == {0, 1, 2}


def test_clear_errors_for_unknown_dataset_and_missing_root(tmp_path):
    with pytest.raises(PipelineError, match="unknown dataset 'k401'"):
        load_manifest("k401", str(tmp_path))
    with pytest.raises(PipelineError, match="ucf101 root not found"):
        load_manifest("ucf101", str(tmp_path / "nope"))
    with pytest.raises(PipelineError, match="UCF101 video folder not found"):
        load_manifest("ucf101", str(tmp_path))


SHARED = Path(__file__).resolve().parents[2] / "shared"


def _official_list(name: str) -> list[tuple[str, int]]:
    """(video id, label id) of the official whole-dataset zero-shot list (lists/<ds>/<name>)."""
    import gzip

    path = SHARED / "text4vis-lists" / "zeroshot" / f"{name}.gz"
    if not path.is_file():
        pytest.skip(f"../shared/text4vis-lists/zeroshot/{name}.gz is absent")
    rows = [line.split() for line in gzip.open(path, "rt").read().splitlines() if line.strip()]
    return [(row[0].rstrip("/").split("/")[-1], int(row[-1])) for row in rows]


def test_ucf101_split_all_is_the_official_whole_dataset_list(tmp_path):
    """ucf_full_for_zeroshot.txt (configs/ucf101/ucf_zero_shot.yaml:12): all 13,320 videos with their labels."""
    import gzip

    official = _official_list("ucf_full_for_zeroshot.txt")
    src = SHARED / "real-annotations" / "ucf101"
    if not (src / "trainlist01.txt.gz").is_file():
        pytest.skip("../shared/real-annotations/ucf101 is absent")
    lists = tmp_path / "ucf101" / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (tmp_path / "ucf101" / "UCF-101").mkdir()
    for f in src.glob("*.txt.gz"):
        (lists / f.name[:-3]).write_bytes(gzip.open(f).read())
    m = load_manifest("ucf101", str(tmp_path / "ucf101"), split_id=1, whole=True)
    whole = m.split("all").records
    assert len(whole) == len(official) == 13320
    assert sorted((r.video_id, r.label) for r in whole) == sorted(official)
    assert "all" not in load_manifest("ucf101", str(tmp_path / "ucf101")).splits  # only when asked for


def test_hmdb51_split_all_keeps_the_unused_videos_as_the_official_list(tmp_path):
    """hmdb_full_for_zeroshot.txt (configs/hmdb51/hmdb_zero_shot.yaml:12): all 6,766 videos, the 1,666 a split
    tags 0 (unused) included; train + test alone are 5,100."""
    import tarfile

    official = _official_list("hmdb_full_for_zeroshot.txt")
    tarball = SHARED / "real-annotations" / "hmdb51" / "testTrainMulti_7030_splits.tar.gz"
    if not tarball.is_file():
        pytest.skip("../shared/real-annotations/hmdb51 is absent")
    with tarfile.open(tarball) as tar:
        tar.extractall(tmp_path / "hmdb51", filter="data")
    m = load_manifest("hmdb51", str(tmp_path / "hmdb51"), split_id=1, whole=True)
    assert len(m.split("train").records) + len(m.split("test").records) == 5100
    whole = m.split("all").records
    assert len(whole) == len(official) == 6766
    assert sorted((r.video_id, r.label) for r in whole) == sorted(official)


def test_activitynet_split_all_is_every_training_and_validation_video_whole_with_one_label(tmp_path, template):
    """anet_full_for_zeroshot.txt: the 10,024 + 4,926 training and validation videos, whole, one label each
    (its 14,950 rows counted when ../shared is present); a video of several labels keeps its majority label."""
    root = tmp_path / "anet"
    root.mkdir()
    db = {"database": {
        "abc": {"subset": "training", "annotations": [{"segment": [1.0, 5.5], "label": "Surfing"},
                                                      {"segment": [10.0, 20.0], "label": "Surfing"}]},
        "def": {"subset": "validation", "annotations": [{"segment": [0.0, 4.0], "label": "Ballet"},
                                                        {"segment": [5.0, 9.0], "label": "Surfing"},
                                                        {"segment": [9.0, 12.0], "label": "Surfing"}]},
        "jkl": {"subset": "validation", "annotations": [{"segment": [0.0, 4.0], "label": "Ballet"},
                                                        {"segment": [5.0, 9.0], "label": "Surfing"}]},
        "ghi": {"subset": "testing", "annotations": []}}}
    (root / "activity_net.v1-3.min.json").write_text(json.dumps(db))
    copy_video(template, root / "v_abc.mp4")
    m = load_manifest("anet", str(root), whole=True)
    whole = m.split("all")
    assert [(r.video_id, r.label, r.labels) for r in whole.records] == [
        ("v_abc", 1, ()), ("v_def", 1, ()), ("v_jkl", 0, ())]  # majority; a tie: the first annotated
    assert all(math.isnan(r.start) and math.isnan(r.end) for r in whole.records) and not whole.multi_label
    assert "3 whole training and validation videos" in whole.notes["all"][0] and "2 carry several" in \
        whole.notes["all"][0]
    assert m.split("val").multi_label  # the validation split itself stays multi-label (mAP)
    path = SHARED / "text4vis-lists" / "zeroshot" / "anet_full_for_zeroshot.txt.gz"
    if path.is_file():
        official = _official_list("anet_full_for_zeroshot.txt")
        assert len(official) == len({v for v, _ in official}) == 10024 + 4926
