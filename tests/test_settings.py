"""Settings: one typed source of defaults, flag > params.yaml > default, deprecated spellings, help."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.core import settings as S
from pipeline.learning.training import TrainConfig
from pipeline.learning.transforms import AugmentConfig
from pipeline.media.video import FrameSpec

README = Path(__file__).resolve().parents[1] / "README.md"


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def config_lines(output: str) -> dict[str, tuple[str, str]]:
    """`pipeline config` output as flag -> (value, source)."""
    rows = {}
    for line in output.splitlines()[1:]:
        parts = re.split(r"\s{2,}", line.strip())
        rows[parts[0]] = (parts[1], parts[2]) if len(parts) == 3 else ("", parts[-1])
    return rows


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PIPELINE_CACHE", raising=False)
    return tmp_path


def test_flag_beats_params_beats_default_and_each_value_says_where_it_came_from(workdir):
    (workdir / "params.yaml").write_text("finetune:\n  lr: 5e-4\n  frames: 4\nmodel:\n  key: mine\n")
    rows = config_lines(invoke("finetune", "--frames", "2", "--print-config").output)
    assert rows["--frames"] == ("2", "flag")
    assert rows["--lr"] == ("0.0005", "params: finetune.lr")  # PyYAML's text 5e-4 became a number
    assert rows["--epochs"] == (str(TrainConfig.epochs), "default")
    assert rows["--model-key"] == ("mine", "params: model.key")
    # pipeline config: the same without flags; --no-params: defaults only
    assert config_lines(invoke("config", "finetune").output)["--frames"] == ("4", "params: finetune.frames")
    assert config_lines(invoke("config", "finetune", "--no-params").output)["--frames"] == ("8", "default")
    assert config_lines(invoke("finetune", "--no-params", "--print-config").output)["--lr"][1] == "default"


def test_the_library_dataclasses_take_their_defaults_from_the_settings():
    ft, fr = S.FinetuneSettings(), S.FramesSettings()
    assert (TrainConfig().lr, TrainConfig().batch_size, TrainConfig().warmup_epochs) == \
        (ft.lr, ft.global_batch_size, ft.warmup_epochs)
    assert AugmentConfig().crop_scale == ft.crop_scale
    assert (AugmentConfig().randaugment_ops, AugmentConfig().randaugment_magnitude) == ft.randaugment
    assert (FrameSpec().num_frames, FrameSpec().height, FrameSpec().width) == (fr.cache_frames, fr.height, fr.width)


def test_no_option_carries_a_default_of_its_own():
    """Defaults live in the settings only: every click option of every command defaults to "not given"."""
    for name, command in cli.commands.items():
        for param in command.params:
            if isinstance(param, click.Option) and not param.is_flag and param.name not in ("help",):
                unset = param.default is None or param.default == () or type(param.default).__name__ == "Sentinel"
                assert unset, f"{name} {param.opts}: default {param.default!r}"


def test_no_stage_function_carries_a_default_of_its_own():
    """A default is written once, in pipeline/core/settings.py: the stages' functions take every setting from their
    caller (the CLI passes the resolved settings), so none of their parameters defaults to anything but None
    ("not given")."""
    import ast

    stages_dir = Path(__file__).resolve().parents[1] / "stages"
    found = []
    for path in sorted(stages_dir.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                args = node.args
                pairs = list(zip(args.args[len(args.args) - len(args.defaults):], args.defaults, strict=True))
                pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d is not None]
                found += [f"{path.name}:{node.name}({a.arg}={ast.unparse(d)})" for a, d in pairs
                          if not (isinstance(d, ast.Constant) and d.value is None)]
    assert not found, "stage functions with defaults of their own: " + ", ".join(found)


def test_help_shows_the_effective_default_marked_when_it_comes_from_params(workdir):
    plain = invoke("finetune", "--help").output
    assert re.search(r"--frames INTEGER RANGE\s+Frames per clip, T.\s+\[default: 8;", plain)
    (workdir / "params.yaml").write_text("finetune:\n  frames: 4\n")
    marked = " ".join(invoke("finetune", "--help").output.split())
    assert "[default: 4 from params.yaml finetune.frames; built in: 8;" in marked


@pytest.mark.parametrize("old, new, field, value", [
    (["--kind", "lda"], ["--head", "lda"], "--head", "lda"),
    (["--run", "r1"], ["--run-name", "r1"], "--run-name", "r1"),
])
def test_old_spellings_still_work_with_one_warning_line(workdir, old, new, field, value):
    command = "heads" if field == "--head" else "finetune"
    result = invoke(command, *old, "--print-config")
    assert config_lines(result.stdout)[field] == (value, "flag")
    assert result.stderr.strip() == f"warning: {old[0]} is deprecated: use {new[0]}"
    assert invoke(command, *new, "--print-config").stderr == ""


def test_format_and_dataset_name_and_the_old_dataset_name_pair(workdir):
    rows = config_lines(invoke("frames", "--format", "folder", "--root", "/data/my clips", "--print-config").output)
    assert rows["--format"] == ("folder", "flag") and rows["--dataset"][0] == "my clips"  # the folder's stem
    rows = config_lines(invoke("frames", "--dataset", "ucf101", "--print-config").output)
    assert rows["--format"][0] == rows["--dataset"][0] == "ucf101"  # a format alone names the cache too
    old = invoke("frames", "-d", "csv", "--root", "v.csv", "--name", "demo", "--print-config")
    rows = config_lines(old.stdout)
    assert rows["--format"][0] == "csv" and rows["--dataset"][0] == "demo"
    assert "--name is deprecated" in old.stderr
    (workdir / "params.yaml").write_text("data:\n  dataset: csv\n  name: demo\n  root: v.csv\n")  # before the rename
    result = CliRunner().invoke(cli, ["config", "frames"])
    rows = config_lines(result.stdout)
    assert rows["--format"][0] == "csv" and rows["--dataset"][0] == "demo"


def test_pretrain_and_finetune_say_global_batch_size_and_params_keys_follow(workdir):
    (workdir / "params.yaml").write_text("finetune:\n  batch_size: 32\n")
    result = invoke("config", "finetune")
    assert config_lines(result.stdout)["--global-batch-size"] == ("32", "params: finetune.batch_size")
    assert "params key finetune.batch_size is deprecated: use finetune.global_batch_size" in result.stderr


def test_a_params_value_of_the_wrong_type_is_one_error_line(workdir):
    (workdir / "params.yaml").write_text("finetune:\n  epochs: many\n")
    result = CliRunner().invoke(cli, ["config", "finetune"])
    assert result.exit_code != 0
    assert "finetune.epochs in the params file: Input should be a valid integer" in str(result.exception)


def test_the_readme_lists_every_command_and_every_renamed_flag_exists():
    text = README.read_text()
    table = text[text.index("## Commands"):text.index("## Documentation")]
    listed = set(re.findall(r"^\| `pipeline ([a-z-]+)", table, re.M))
    assert listed == set(cli.commands), listed ^ set(cli.commands)
    commands_doc = (README.parent / "docs" / "commands.md").read_text()
    flags = set(re.findall(r"^\| `(--[a-z-]+)`", commands_doc, re.M))
    every = {opt for c in cli.commands.values() for p in c.params for opt in getattr(p, "opts", [])}
    assert flags and flags <= every, flags - every


def test_every_command_has_help_and_every_settings_command_a_config(workdir):
    for name in cli.commands:
        result = CliRunner().invoke(cli, [name, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output, name
    for name, cls in S.COMMANDS.items():
        rows = config_lines(invoke("config", name).output)
        assert {S.flag_of(f) for f in S.settings_fields(cls)} == set(rows), name


def test_messages_use_todays_flag_names():
    """No message, help or docstring names a flag that is now only an old spelling (--kind, --run, --num-frames,
    --model-tag, ...): a user told to pass one would be sent to a deprecated or, in another command, wrong flag."""
    import ast

    options = [p for command in cli.commands.values() for p in command.params if isinstance(p, click.Option)]
    current = {opt for p in options if not p.hidden for opt in p.opts}
    old = {opt for p in options if p.hidden for opt in p.opts}
    retired = sorted(old - current)
    assert {"--num-frames", "--model-tag", "--run"} <= set(retired)
    pattern = re.compile("|".join(r"(?<![\w-])" + re.escape(o) + r"(?![\w-])" for o in retired))
    root = Path(__file__).resolve().parents[1]
    found = []
    for path in [*root.glob("pipeline/**/*.py"), *root.glob("stages/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value not in old \
                    and "deprecated" not in node.value:  # the warnings that name an old spelling
                found += [f"{path.relative_to(root)}:{node.lineno}: {m}" for m in pattern.findall(node.value)]
                if re.search(r"--kind(?![\w-])", node.value) and "--kind order" not in node.value:
                    found.append(f"{path.relative_to(root)}:{node.lineno}: --kind (heads take --head)")
    assert not found, found
