"""Every DVC stage depends on exactly the code it runs, so no edit can leave a stale result.

Each stage's command is ``sdip <command>``: the code it runs is the import closure of
``stages.cli`` and of the module of that command (``stages.cli.COMMANDS``), read from the source
with :mod:`ast` (imports inside functions count; ``if TYPE_CHECKING:`` blocks do not run). The
test fails when a stage misses a file of its closure (an edit would not rerun it) or lists a
project file outside it (an edit would rerun it for nothing).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from stages.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages")


def module_file(name: str) -> Path | None:
    """The project file of module ``name``, None for third-party modules and non-modules."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT / name.replace(".", "/")
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def runtime_imports(tree: ast.AST) -> list[str]:
    """Modules imported by ``tree`` when it runs: everything but ``if TYPE_CHECKING:`` bodies."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING",):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
            found.extend(f"{node.module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def closure(*modules: str) -> set[str]:
    """Project files that importing ``modules`` runs, parents' ``__init__.py`` included."""
    seen: set[Path] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        path = module_file(name)
        if path is None or path in seen:
            continue
        seen.add(path)
        todo.extend(runtime_imports(ast.parse(path.read_text())))
    return {path.relative_to(ROOT).as_posix() for path in seen}


def stages() -> dict[str, dict]:
    with open(ROOT / "dvc.yaml") as handle:
        definitions = yaml.safe_load(handle)["stages"]
    return {name: stage.get("do", stage) for name, stage in definitions.items()}


def code_deps(stage: dict) -> set[str]:
    deps = [dep if isinstance(dep, str) else next(iter(dep)) for dep in stage["deps"]]
    return {dep for dep in deps if dep.split("/")[0] in PACKAGES}


@pytest.mark.parametrize("name", sorted(stages()))
def test_each_stage_depends_on_exactly_the_code_it_runs(name: str) -> None:
    stage = stages()[name]
    words = stage["cmd"].split()
    assert words[0] == "sdip", stage["cmd"]
    module = COMMANDS[words[1]].partition(":")[0]
    needed = closure("stages.cli", module)
    listed = code_deps(stage)
    assert not needed - listed, f"{name} misses {sorted(needed - listed)}"
    assert not listed - needed, f"{name} lists {sorted(listed - needed)}, which it never runs"


def test_the_closure_follows_lazy_imports_and_skips_type_checking_blocks(tmp_path: Path) -> None:
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "import pipeline.errors\n"
        "if TYPE_CHECKING:\n    from pipeline.fit import FitConfig\n"
        "def f():\n    from pipeline.layout import RUNS\n"
    )
    assert runtime_imports(tree) == [
        "typing",
        "typing.TYPE_CHECKING",
        "pipeline.errors",
        "pipeline.layout",
        "pipeline.layout.RUNS",
    ]
    assert closure("pipeline.errors") == {"pipeline/__init__.py", "pipeline/errors.py"}
