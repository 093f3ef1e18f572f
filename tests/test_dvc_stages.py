"""DVC tells the truth: every stage of dvc.yaml and data/profiles/dvc.yaml depends on exactly the code its
commands import, and declares every params key its commands read. Stages are read with DVC's own parser, so
stages added later are checked too."""

from __future__ import annotations

import functools

import pytest
from dvcstages import ROOT, code_problems, declared, invocations, load_stages, params_read, print_configs

PROJECTS = {"demo": ROOT, "profiles": ROOT / "data" / "profiles"}


@functools.cache
def stages_of(project: str) -> tuple:
    return tuple(load_stages(PROJECTS[project]))


@pytest.mark.parametrize("project", list(PROJECTS))
def test_every_stage_depends_on_the_code_it_imports_and_no_other(project):
    # The import graph over-approximates (every import of a module reached counts), so no import can escape
    # the deps; and a code dep the commands never import is refused, so a comment in stages/report.py
    # reruns `report` and nothing upstream of it.
    problems = [p for st in stages_of(project) for p in code_problems(st)]
    assert not problems, "\n".join(problems + ["(`python tests/dvcstages.py [data/profiles]` lists each "
                                               "stage's code deps)"])


def test_the_world_stage_does_not_run_the_report_code():
    # The check above is only as good as its import graph: both stages run the CLI, not the same stage code.
    deps = {st.name: st.deps for st in stages_of("demo")}
    assert {ROOT / "pipeline" / "cli.py", ROOT / "stages" / "world.py"} <= set(deps["world"])
    assert ROOT / "stages" / "report.py" in deps["report"]
    assert not any(d == ROOT / "stages" / "report.py" or d in (ROOT / "pipeline", ROOT / "stages")
                   for d in deps["world"])


@pytest.mark.parametrize("project", list(PROJECTS))
def test_every_stage_declares_every_params_key_its_commands_read(project):
    # `--print-config` says where each setting came from ("params: finetune.frames"); each such key of the
    # params file the command uses must be a declared param of the stage (a declared group holds its keys),
    # or DVC would not rerun the stage when it changes. Commands chained with && and torchrun launchers count;
    # ${...} are filled in by DVC's own parser.
    stages = stages_of(project)
    printed = print_configs(PROJECTS[project], [i.args for st in stages for i in invocations(st.cmd)])
    problems = []
    for st in stages:
        for inv in invocations(st.cmd):
            text = printed[inv.args]
            assert "params file:" in text, f"{st.name}: pipeline {' '.join(inv.args)} --print-config:\n{text}"
            params_file, keys = params_read(text, st.wdir)
            problems += [f"{st.name}: `pipeline {inv.subcommand}` reads {params_file.name}:{k}, not declared"
                         for k in keys if not declared(k, st.params.get(params_file, []))]
    assert not problems, "\n".join(problems)
