"""The README is the front page and docs/ holds the rest: what a test can check of them, it checks."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import cli

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))


def test_the_readme_is_a_front_page_that_links_every_page_of_the_docs():
    text = README.read_text()
    assert len(text.splitlines()) < 150
    linked = set(re.findall(r"\]\((docs/[a-z-]+\.md)\)", text))
    assert {f"docs/{p.name}" for p in DOCS} <= linked, {f"docs/{p.name}" for p in DOCS} - linked


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
        assert (page.parent / target).exists(), f"{page.name} links {target}, which does not exist"


def test_every_command_has_help_with_examples():
    for name in cli.commands:
        out = CliRunner().invoke(cli, [name, "--help"]).output
        assert "Example" in out, f"`pipeline {name} --help` shows no example"


def test_every_test_the_reliability_page_names_exists():
    """Each guarantee names the tests that hold it: each must be a test function of the module it is credited to
    (`test_x.py::name`, or `::name` after it for the same module), so a renamed, moved or deleted test is noticed."""
    text = (ROOT / "docs" / "reliability.md").read_text()
    named = re.findall(r"`(?:tests/)?(test_\w+\.py)?(?:::(\w+))?`", text)
    named = [(file, function) for file, function in named if file or function]
    assert len(named) > 20
    module = None
    for file, function in named:
        module = file or module
        assert module, f"::{function} follows no module"
        source = ROOT / "tests" / module
        assert source.is_file(), f"{module} does not exist"
        if function:
            defined = {n.name for n in ast.parse(source.read_text()).body if isinstance(n, ast.FunctionDef)}
            assert function in defined, f"{module}::{function} does not exist"


def test_every_measurement_names_the_command_that_makes_it():
    """A number without the command that produced it cannot be re-run: each section of measurements.md with a
    table names a benchmark script or make target."""
    text = (ROOT / "docs" / "measurements.md").read_text()
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        if "\n|" in section:
            title = section.splitlines()[0]
            assert re.search(r"`(python )?benchmarks/\w+\.py|`make \w+", section), f"section {title!r} names no command"
            script = re.search(r"benchmarks/(\w+\.py)", section)
            if script:
                assert (ROOT / "benchmarks" / script.group(1)).is_file(), script.group(1)


def test_the_readme_results_are_the_reports_tables_regenerated(tmp_path):
    """`make readme-results` copies the report's tables and verdicts between the README's markers, and only
    those: a second run replaces the block instead of stacking a second one."""
    import subprocess
    import sys

    report = tmp_path / "report.md"
    report.write_text("# Report\n\n## Table 6: heads\n\nprose\n\n| head | top-1 |\n|---|---|\n| lda | 91.0 |\n\n"
                      "*Finding (holds): text heads beat random.*\n\n## Fig. 1\n\n| x |\n|---|\n| 1 |\n")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- demo-results:begin (generated) -->\nSTALE BLOCK\n<!-- demo-results:end -->\noutro\n")
    for minutes in ("12.3", "11.0"):
        subprocess.run([sys.executable, str(ROOT / "docs" / "readme_results.py"), str(report), str(readme),
                        "--minutes", minutes], check=True, capture_output=True)
    text = readme.read_text()
    block = text.split("<!-- demo-results:begin (generated) -->\n")[1].split("<!-- demo-results:end -->")[0]
    assert "STALE BLOCK" not in block and "| lda | 91.0 |" in block and "*Finding (holds)" in block
    assert "**11.0 min**" in block and "12.3" not in block and "| x |" not in block  # Fig. 1 is no table we copy
    assert text.startswith("intro\n") and text.endswith("outro\n")
