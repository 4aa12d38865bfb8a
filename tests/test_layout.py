"""The shape of the code: small modules, doit only in tasks/, and a wheel without `tasks`."""

from __future__ import annotations

import ast
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MAX_LINES = 500


def _modules(*tops: str) -> list[Path]:
    return sorted(p for top in tops for p in (REPO / top).rglob("*.py"))


def _imported(path: Path) -> set[str]:
    """Top-level names of every module `path` imports, lazily or not."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_module_of_the_library_or_the_tasks_is_over_500_lines() -> None:
    long = {
        str(p.relative_to(REPO)): n
        for p in _modules("archkernel", "tasks")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_only_tasks_import_doit() -> None:
    importers = {
        str(p.relative_to(REPO)) for p in _modules("archkernel", "tasks") if "doit" in _imported(p)
    }
    assert importers, "the tasks must import doit somewhere"
    assert all(name.startswith("tasks/") for name in importers), importers


def test_the_library_never_imports_the_tasks() -> None:
    offenders = [
        str(p.relative_to(REPO))
        for p in _modules("archkernel")
        if {"tasks", "archkernel_tasks"} & _imported(p)
    ]
    assert offenders == []


def test_the_tasks_import_their_own_package_relatively() -> None:
    # Installed, the folder is the package `archkernel_tasks`; `tasks` exists only here.
    offenders = [str(p.relative_to(REPO)) for p in _modules("tasks") if "tasks" in _imported(p)]
    assert offenders == []


def test_test_modules_do_not_import_each_other() -> None:
    offenders = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module.split(".")[-1].startswith("test_"):
                    offenders.append(f"{path.name}: {node.module}")
            elif isinstance(node, ast.Import):
                offenders += [
                    f"{path.name}: {a.name}"
                    for a in node.names
                    if a.name.split(".")[-1].startswith("test_")
                ]
    assert offenders == []


@pytest.mark.integration
def test_the_wheel_has_every_library_package_and_no_top_level_tasks(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"archkernel", "archkernel_tasks"}
    packages = {str(p.parent.relative_to(REPO)) for p in (REPO / "archkernel").rglob("__init__.py")}
    shipped = {n.rsplit("/", 1)[0] for n in names if n.endswith("/__init__.py")}
    assert packages <= shipped
    assert "archkernel_tasks/cli.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "archkernel = archkernel_tasks.cli:main" in text
    assert "archkernel_tasks.state:DurableJsonDB" in text
