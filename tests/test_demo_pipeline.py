"""The demo's whole DVC pipeline, shortened: a smaller world, fewer steps, the same dvc.yaml and commands.

Runs `dvc repro` in a copy of the repository with a small params.yaml, then checks that the report
holds every table with numbers in range, that a second `dvc repro` does nothing, and that changing
lda.per_class reruns only the LDA chain.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# End to end, minutes: `make test` runs it, `make test-fast` does not. One xdist group: the module's `dvc repro`
# fixture is built once, on one worker (split across workers, each would build it).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("demo")]

ROOT = Path(__file__).resolve().parents[1]

SMALL = {
    "world": {"colours": ["red", "green", "blue"], "shapes": ["disc", "ring"], "sizes": ["small", "large"],
              "train_per_class": 4, "val_per_class": 2, "frames": 8, "size": 32, "seed": 0},
    "order_world": {"colours": ["red", "green", "blue"], "train_per_class": 4, "val_per_class": 2, "frames": 8,
                    "size": 32, "seed": 0},
    "frames": {"num_frames": 8, "height": 32, "width": 32, "block_size": 8, "workers": 1},
    "pretrain": {"steps": 30, "batch_size": 32, "heldout": ["a large blue ring"]},
    "heads": {"per_class": 4}, "lda": {"per_class": 4},
    "finetune": {"seed": [0, 1], "frames": 4, "epochs": 1, "global_batch_size": 8, "workers": 0},
    "temporal": {"frames": 4, "layers": 1, "epochs": 3, "global_batch_size": 8},
    "contrastive": {"epochs": 2, "global_batch_size": 8},
}


def small_params() -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for group, values in SMALL.items():
        params.setdefault(group, {}).update(values)
    return params


def dvc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # Every Python process DVC starts records the project modules it imported (tests/importlog), beside the copy.
    (cwd.parent / "imports").mkdir(exist_ok=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1", "PIPELINE_IMPORT_LOG": str(cwd.parent / "imports"),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "importlog"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([str(Path(sys.executable).with_name("dvc")), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=1500)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("demo") / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", ".dvc", ".dvcignore", "pipeline", "stages"):  # the code: every stage's dependency
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("tmp", "cache", "__pycache__"))
        elif src.exists():
            shutil.copyfile(src, repo / name)
    (repo / "params.yaml").write_text(yaml.safe_dump(small_params(), sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.name=ci", "-c", "user.email=ci@localhost", "commit", "-q", "--allow-empty",
                    "-m", "demo copy"], cwd=repo, check=True)
    proc = dvc("repro", cwd=repo)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return repo


def table(text: str, title: str) -> list[list[str]]:
    section = text.split(f"## {title}")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows[1:]]


def numbers(cell: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+\.\d+", cell)]


def test_report_holds_every_table_with_numbers_in_range(demo):
    text = (demo / "cache" / "report" / "report.md").read_text()
    for title, rows in (("Table 6", 6), ("Table 7", 3), ("Table 8", 4), ("Table 9", 5), ("Zero-shot", 4)):
        found = table(text, title)
        assert len(found) == rows, (title, found)
        for row in found:
            assert "not run" not in " ".join(row), (title, row)
            for value in (v for cell in row[1:] for v in numbers(cell)):
                assert -100 <= value <= 100 or title == "Table 9", (title, row)
    t6 = {row[0]: numbers(row[2]) for row in table(text, "Table 6") if "prototype" not in row[0]}
    assert len(t6) == 5 and all(len(v) == 2 for v in t6.values())  # mean and std over the 2 seeds
    summary = json.loads((demo / "cache" / "report" / "report.json").read_text())
    assert set(summary["findings"]) == {"table6", "table7", "table8", "table9_accuracy", "table9_cost", "zero_shot"}
    assert "Finding" in text and (demo / "cache" / "report" / "figA4-loss.png").stat().st_size > 10_000
    assert (demo / "cache" / "report" / "fig1-clip-text.png").is_file()


def test_second_repro_does_nothing_and_lda_change_reruns_only_its_chain(demo):
    proc = dvc("repro", cwd=demo)
    assert proc.returncode == 0 and "Running stage" not in proc.stdout, proc.stdout[-2000:]
    params = yaml.safe_load((demo / "params.yaml").read_text())
    params["lda"]["per_class"] = 3
    (demo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = dvc("repro", cwd=demo)  # (a --dry run cannot know that lda's output will change)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    stages = set(re.findall(r"Running stage '([^']+)'", proc.stdout))
    assert stages == {"lda", "evaluate@lda", "t6@lda", "plot-heads", "report"}, stages


def test_dvc_tracks_code_and_params_as_users_expect(demo):
    # a setting that no fingerprint holds (the worker count) reruns its stage, which changes nothing:
    # no stage downstream reruns (the lock files beside the stores are not part of any output)
    params = yaml.safe_load((demo / "params.yaml").read_text())
    params["frames"]["workers"] = 2
    (demo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = dvc("repro", cwd=demo)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    reran = set(re.findall(r"Running stage '([^']+)'", proc.stdout))
    assert reran == {"frames", "frames-order"}, proc.stdout[-2000:]  # the two stages that read frames.*
    # stage names say what they are
    listed = dvc("stage", "list", cwd=demo).stdout
    assert "labels@clip" in listed and "labels@minilm" in listed
    # small outputs are in DVC's cache (restorable by dvc checkout / exp apply / pull)
    head = demo / "cache" / "heads" / "demo" / "tiny-clip" / "clip-text"
    shutil.rmtree(head)
    assert dvc("checkout", "cache/heads/demo/tiny-clip/clip-text", cwd=demo).returncode == 0
    assert (head / "zarr.json").is_file()
    # a change to the code marks the stages that import it, and only those
    with open(demo / "stages" / "heads.py", "a") as f:
        f.write("\n# changed\n")
    status = dvc("status", cwd=demo).stdout
    assert "heads@clip-text:" in status and "modified:           stages/heads.py" in status
    assert not {"world:", "frames:", "features:", "pretrain:"} & set(status.split()), status


def test_dvc_exp_run_then_apply_restores_that_experiments_head(demo):
    """`dvc exp run -S lda.per_class=2`, back to the baseline, then `dvc exp apply`: the experiment's LDA
    head comes back from DVC's cache, byte for byte, with its params."""
    shutil.copyfile(ROOT / "stages" / "heads.py", demo / "stages" / "heads.py")  # undo the code change above
    assert dvc("repro", cwd=demo).returncode == 0
    git = ["git", "-c", "user.name=ci", "-c", "user.email=ci@localhost"]
    subprocess.run([*git, "add", "-A"], cwd=demo, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "baseline"], cwd=demo, check=True)
    lda = demo / "cache" / "heads" / "demo" / "tiny-clip" / "lda"

    def head_digest() -> str:
        import zarr

        return zarr.open_group(str(lda), mode="r")["head"].attrs["sha256"]

    baseline = head_digest()
    proc = dvc("exp", "run", "-S", "lda.per_class=2", "-n", "lda2", cwd=demo)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    experiment = head_digest()
    assert experiment != baseline
    subprocess.run(["git", "checkout", "-q", "--", "params.yaml", "dvc.lock"], cwd=demo, check=True)
    assert dvc("checkout", "--force", cwd=demo).returncode == 0
    assert head_digest() == baseline
    proc = dvc("exp", "apply", "lda2", cwd=demo)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert yaml.safe_load((demo / "params.yaml").read_text())["lda"]["per_class"] == 2
    assert head_digest() == experiment


def test_each_stage_imported_only_code_it_depends_on(demo):
    """What the real `dvc repro` imported, process by process (DVC sets DVC_STAGE for each command and its
    children: torchrun workers, dask workers): every project module is a dep of that stage. The static
    check (tests/test_dvc_stages.py) covers every stage; this one, the imports that really happened."""
    sys.path.insert(0, str(ROOT / "tests"))
    from dvcstages import covered, load_stages, modules

    deps = {st.name: st.deps for st in load_stages(demo)}
    records = [json.loads(p.read_text()) for p in (demo.parent / "imports").glob("*.json")]
    ran = [r for r in records if r["stage"] in deps and r["modules"]]
    assert {r["stage"] for r in ran} >= {"world", "frames", "report", "t9@ours"}, sorted({r["stage"] for r in ran})
    missing = sorted({f"{r['stage']}: {m}" for r in ran for m in r["modules"] if m in modules()
                      and not covered(demo / modules()[m].relative_to(ROOT), deps[r["stage"]])})
    assert not missing, missing
