"""The shape of the package: what is installed, who imports whom, and where a task is declared."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

from cellarena.tasks import TASK_IDS

REPO = Path(__file__).resolve().parent.parent
# the installed package's modules: folder -> import name (metrics/ and leaderboard/ install inside cellarena)
ROOTS = {"cellarena": "cellarena", "metrics": "cellarena.metrics", "leaderboard": "cellarena.leaderboard"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, name in ROOTS.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            out[".".join((name, *parts)).removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _imports(path: Path):
    """(module imported, names taken) of every import in a file, lazy ones included."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def test_every_package_folder_is_installed():
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    folders = {name for name, path in MODULES.items() if path.name == "__init__.py"}
    assert set(packages) == folders


def test_no_top_level_metrics_or_leaderboard_import():
    for name, path in MODULES.items():
        for module, _ in _imports(path):
            assert module.split(".")[0] not in ("metrics", "leaderboard"), f"{path}: import {module}"


def test_no_import_cycle_and_no_borrowed_private_name():
    graph = {m: set() for m in MODULES}
    for m, path in MODULES.items():
        for module, names in _imports(path):
            if module in MODULES and module != m:
                graph[m].add(module)
                borrowed = [n for n in names if n.startswith("_") and not n.startswith("__")]
                assert not borrowed, f"{m} takes private names {borrowed} from {module}"
            for n in names:  # `from package import module`
                if f"{module}.{n}" in MODULES and f"{module}.{n}" != m:
                    graph[m].add(f"{module}.{n}")
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(n):] + [m, n]))
            if not state.get(n):
                visit(n, stack + [m])
        state[m] = 2

    for m in sorted(graph):
        if not state.get(m):
            visit(m, [])


def _task_id_lists(path: Path) -> list[int]:
    """Lines where a literal collection names two or more task ids (a task list spelled out)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        items = (node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set))
                 else node.keys if isinstance(node, ast.Dict) else [])
        named = {i.value for i in items if isinstance(i, ast.Constant) and i.value in TASK_IDS}
        if len(named) >= 2:
            lines.append(node.lineno)
    return lines


def test_the_tasks_are_spelled_out_in_one_place_only():
    scripts = sorted((REPO / "benchmarks").glob("*.py")) + sorted((REPO / "models").glob("*/model.py"))
    spelled = {str(path.relative_to(REPO)): lines for path in [*MODULES.values(), *scripts]
               if (lines := _task_id_lists(path))}
    assert spelled == {}, "task ids listed outside cellarena/tasks.py (read them from cellarena.tasks)"


def test_the_workflow_spells_out_no_task_list():
    import re  # noqa: PLC0415

    quoted = re.compile("|".join(rf"[\"']{t}[\"']" for t in TASK_IDS))
    for path in [REPO / "Snakefile", *sorted((REPO / "workflow" / "rules").glob("*.smk"))]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert len(quoted.findall(line)) < 2, f"{path}:{number} lists task ids: {line.strip()}"
