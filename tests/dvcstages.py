"""What the DVC stages run: each stage's interpolated commands (DVC's own parser), the ``pipeline`` command
lines in them, and the project files such a command can import.

The import graph is read from the source (ast), not by running the commands (a stage runs for minutes to
days). It over-approximates: every import of a library or stage module counts, even one inside a function
the command may never call, so a dependency it finds may be unneeded, but one it does not find cannot be
imported. ``pipeline/cli.py`` is the exception, because it imports every stage lazily: there only the code
that runs for one sub-command counts (the module's top level, its decorators, ``main``, the sub-command's
function), following calls by name to the functions and classes of the module.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages")
CLI = "pipeline.cli"


@dataclass(frozen=True)
class Stage:
    name: str
    cmd: str
    wdir: Path  # the folder the command runs in; deps and params files are relative to it
    deps: tuple[Path, ...]  # absolute
    params: dict[Path, list[str]]  # params file (absolute) -> declared keys (a group, or group.key)


def load_stages(project: Path) -> list[Stage]:
    """Every stage of ``project``'s dvc.yaml as DVC resolves it (foreach/matrix expanded, ``${...}`` filled)."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    found = []
    with Repo(str(project)) as repo:
        for st in repo.index.stages:
            wdir = Path(st.wdir)
            params: dict[Path, list[str]] = {}
            for d in st.deps:
                if isinstance(d, ParamsDependency):
                    params.setdefault((wdir / d.def_path).resolve(), []).extend(d.params)
            deps = tuple((wdir / d.def_path).resolve() for d in st.deps if not isinstance(d, ParamsDependency))
            cmd = st.cmd if isinstance(st.cmd, str) else " && ".join(st.cmd)
            found.append(Stage(st.addressing.rpartition(":")[2], cmd, wdir, deps, params))
    return found


@dataclass(frozen=True)
class Invocation:
    args: tuple[str, ...]  # after `pipeline`
    as_module: bool  # `python -m pipeline` / `torchrun ... -m pipeline`: pipeline/__main__.py runs too

    @property
    def subcommand(self) -> str:
        return next(a for a in self.args if not a.startswith("-"))


def invocations(cmd: str) -> list[Invocation]:
    """The ``pipeline`` command lines of a stage's command (``a && b``; launchers such as torchrun stripped)."""
    found = []
    for part in cmd.split("&&"):
        argv = shlex.split(part)
        if argv and argv[0] == "pipeline":
            found.append(Invocation(tuple(argv[1:]), False))
        elif "-m" in argv and argv[argv.index("-m") + 1] == "pipeline":
            found.append(Invocation(tuple(argv[argv.index("-m") + 2:]), True))
        else:
            raise AssertionError(f"not a pipeline command: {part.strip()!r}")
    return found


@functools.cache
def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> tuple[set[str], set[str]]:
    """The project modules an import statement loads, and the packages it asks for a non-module attribute
    (which a package's lazy ``__getattr__`` may import)."""
    mods = modules()
    loaded, attributes = set(), set()
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module if mods[module].name == "__init__.py" else module.rpartition(".")[0]
            parts = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(parts + ([base] if base else []))
        names = [base]
        for alias in node.names:
            if f"{base}.{alias.name}" in mods:
                names.append(f"{base}.{alias.name}")
            elif base in mods:
                attributes.add(base)
    for name in names:
        parts = name.split(".")
        loaded.update(p for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if p in mods)
    return loaded, attributes


@functools.cache
def _module_imports(module: str) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """(modules imported anywhere but a module-level ``__getattr__``, packages asked for attributes,
    modules imported by the module-level ``__getattr__``)."""
    tree = ast.parse(modules()[module].read_text())
    lazy_nodes = {id(n) for top in tree.body if isinstance(top, ast.FunctionDef) and top.name == "__getattr__"
                  for n in ast.walk(top)}
    eager, attributes, lazy = set(), set(), set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            loaded, asked = _targets(module, node)
            (lazy if id(node) in lazy_nodes else eager).update(loaded)
            attributes.update(asked)
    return frozenset(eager), frozenset(attributes), frozenset(lazy)


def _is_command(node: ast.AST, name: str) -> bool:
    """``@command("name", ...)`` or ``@cli.command("name")``."""
    for d in getattr(node, "decorator_list", []):
        if isinstance(d, ast.Call) and d.args and isinstance(d.args[0], ast.Constant) and d.args[0].value == name:
            if (isinstance(d.func, ast.Name) and d.func.id == "command") or (
                    isinstance(d.func, ast.Attribute) and d.func.attr == "command"):
                return True
    return False


def _cli_imports(subcommand: str) -> set[str]:
    """The modules pipeline/cli.py imports when it runs ``subcommand``."""
    tree = ast.parse(modules()[CLI].read_text())
    defined = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    commands = [n for n in tree.body if _is_command(n, subcommand)]
    assert commands, f"pipeline/cli.py has no sub-command {subcommand!r}"
    # What runs at import: every statement but the bodies of functions (their decorators do run).
    todo: list[ast.AST] = [*commands, defined["main"]]
    for stmt in tree.body:
        if isinstance(stmt, ast.FunctionDef):
            todo.extend(n for n in [*stmt.decorator_list, *stmt.args.defaults, *stmt.args.kw_defaults] if n)
        elif not isinstance(stmt, ast.ClassDef):
            todo.append(stmt)
    loaded: set[str] = set()
    seen: set[str] = set()
    while todo:
        for node in ast.walk(todo.pop()):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                imported, asked = _targets(CLI, node)
                loaded |= imported
                loaded |= {m for p in asked for m in _module_imports(p)[2]}
            elif isinstance(node, ast.Name) and node.id in defined and node.id not in seen:
                seen.add(node.id)
                todo.append(defined[node.id])
    return loaded


def code_files(invocation: Invocation) -> set[Path]:
    """Every project file the command line can import."""
    todo = [CLI, "pipeline", *(["pipeline.__main__"] if invocation.as_module else []),
            *_cli_imports(invocation.subcommand)]
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        if module == CLI:
            continue  # its imports are the sub-command's, above
        eager, attributes, _ = _module_imports(module)
        todo.extend(eager)
        todo.extend(m for p in attributes for m in _module_imports(p)[2])
    return {modules()[m] for m in seen}


def covered(path: Path, deps: tuple[Path, ...]) -> bool:
    return any(path == d or d in path.parents for d in deps)


def needed_code(stage: Stage) -> set[Path]:
    """The project files a stage's command lines can import."""
    return set().union(*(code_files(i) for i in invocations(stage.cmd)))


def code_deps(needed: set[Path]) -> list[Path]:
    """``needed`` as DVC deps: a folder where every Python file under it is needed, else the files."""
    deps: list[Path] = []
    for path in sorted(needed):
        folder = next((f for f in reversed(path.parents) if ROOT in f.parents and f.is_dir()
                       and set(f.rglob("*.py")) <= needed), None)
        dep = folder or path
        if dep not in deps:
            deps.append(dep)
    return deps


def code_problems(stage: Stage) -> list[str]:
    """What the stage's deps miss of the code it runs, and which code deps it does not run."""
    needed = needed_code(stage)
    problems = [f"{stage.name}: imports {p.relative_to(ROOT)}, not in its deps"
                for p in sorted(needed) if not covered(p, stage.deps)]
    for dep in stage.deps:
        if any(dep == ROOT / p or ROOT / p in dep.parents for p in PACKAGES):
            files = set(dep.rglob("*.py")) if dep.is_dir() else {dep}
            if not files <= needed:
                problems.append(f"{stage.name}: depends on {dep.relative_to(ROOT)}, but never imports "
                                f"{', '.join(str(f.relative_to(ROOT)) for f in sorted(files - needed))}")
    return problems


_PRINT_CONFIG = """
import contextlib, io, json, sys
from pipeline.cli import cli
found = {}
for args in json.loads(sys.stdin.read()):
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            cli.main([*args, "--print-config"], prog_name="pipeline", standalone_mode=False)
    except BaseException as e:  # a command that cannot even resolve its settings: the test shows why
        out.write(f"failed: {type(e).__name__}: {e}")
    found[json.dumps(args)] = out.getvalue()
print(json.dumps(found))
"""


def print_configs(cwd: Path, argvs: list[tuple[str, ...]]) -> dict[tuple[str, ...], str]:
    """``pipeline ARGS --print-config`` of each command line, run in ``cwd`` (one process for all of them)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _PRINT_CONFIG], input=json.dumps(sorted(set(argvs))), cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300, check=True)
    return {tuple(json.loads(k)): v for k, v in json.loads(proc.stdout.splitlines()[-1]).items()}


def params_read(printed: str, cwd: Path) -> tuple[Path, list[str]]:
    """The params file a ``--print-config`` output names, and the keys it says it took from that file."""
    header = re.search(r"params file: ([^;)]+)", printed)
    assert header, printed
    keys = re.findall(r" params: (\S+)$", printed, flags=re.M)
    return (cwd / header.group(1).strip()).resolve(), keys


def declared(key: str, keys: list[str]) -> bool:
    """``group.key`` is declared by ``group.key`` itself or by a group that holds it."""
    return any(key == d or key.startswith(d + ".") for d in keys)


def write_code_deps(project: Path) -> list[str]:
    """Rewrite ``project``'s dvc.yaml so that each stage definition's code deps are exactly what its commands
    import (other deps, params and comments kept); returns the names of the definitions it changed."""
    from ruamel.yaml import YAML

    by_definition: dict[str, set[Path]] = {}
    for st in load_stages(project):
        by_definition.setdefault(st.name.partition("@")[0], set()).update(needed_code(st))
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)
    path = project / "dvc.yaml"
    doc = yaml.load(path.read_text())
    changed = []
    for name, definition in doc["stages"].items():
        body = definition.get("do", definition)
        if name not in by_definition or "deps" not in body:
            continue
        code = [os.path.relpath(d, project) for d in code_deps(by_definition[name])]
        is_code = [any(os.path.normpath(os.path.join(project, str(d))).startswith(str(ROOT / p)) for p in PACKAGES)
                   and "${" not in str(d) for d in body["deps"]]
        others = [d for d, c in zip(body["deps"], is_code, strict=True) if not c]
        if [str(d) for d, c in zip(body["deps"], is_code, strict=True) if c] != code:
            changed.append(name)
        body["deps"].clear()
        body["deps"].extend(code + others)
    # params: every key a command reads from a params file (its --print-config) is declared, in the entry of
    # the stage definition that names that file (``${key}.yaml`` for a foreach over profiles)
    stages = load_stages(project)
    printed = print_configs(project, [i.args for st in stages for i in invocations(st.cmd)])
    for st in stages:
        name = st.name.partition("@")[0]
        body = doc["stages"][name].get("do", doc["stages"][name])
        for inv in invocations(st.cmd):
            params_file, keys = params_read(printed[inv.args], st.wdir)
            missing = [k for k in keys if not declared(k, st.params.get(params_file, []))]
            if not missing:
                continue
            entries = [e for e in body.setdefault("params", []) if isinstance(e, dict)
                       and str(next(iter(e))) != "datasets.yaml"]
            if params_file.name == "params.yaml" and not entries:  # the default file: plain keys
                target = body["params"]
            else:
                target = next(iter(entries[0].values())) if entries else None
            if target is None:
                continue
            for k in missing:
                if k not in target:
                    target.append(k)
                    st.params.setdefault(params_file, []).append(k)
            if name not in changed:
                changed.append(name)
    with path.open("w") as f:
        yaml.dump(doc, f)
    return changed


if __name__ == "__main__":  # python tests/dvcstages.py [--write] [PROJECT]: each stage definition's code deps
    args = sys.argv[1:]
    write = "--write" in args
    args = [a for a in args if a != "--write"]
    project = Path(args[0] if args else ROOT).resolve()
    if write:
        print("rewrote the code deps of:", ", ".join(write_code_deps(project)) or "nothing")
        sys.exit(0)
    by_definition: dict[str, set[Path]] = {}
    for st in load_stages(project):
        by_definition.setdefault(st.name.partition("@")[0], set()).update(needed_code(st))
    for name, needed in by_definition.items():
        print(f"{name}:\n  deps:")
        for dep in code_deps(needed):
            print(f"    - {os.path.relpath(dep, project)}")
