"""The wheel carries what users need: every module, every package, the resources.

The wheel's file list is derived by patterns in pyproject.toml; these tests hold the built
wheel against the source tree so the two cannot drift apart (a hand-kept list once shipped a
``zhiyi`` command that died with ``No module named 'external'``).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: top-level folders that are not part of the installed program
NOT_SHIPPED = {"tests", "bench", "examples", "scripts", "static", "build", "dist", "data"}
RESOURCES = ("schema.sql", "openapi.yaml", "static/index.html")


def build_wheel(out_dir: Path) -> Path:
    """Build the wheel from the source tree with hatchling, the project's build backend."""
    subprocess.run(
        [sys.executable, "-m", "hatchling", "build", "-t", "wheel", "-d", str(out_dir)],
        cwd=ROOT, check=True, capture_output=True, timeout=300,
    )
    (wheel,) = out_dir.glob("zhiyi-*.whl")
    return wheel


def source_packages() -> list[Path]:
    """Top-level folders that are Python packages (hold ``__init__.py``)."""
    return sorted(
        d for d in ROOT.iterdir()
        if d.is_dir() and d.name not in NOT_SHIPPED and not d.name.startswith(".")
        and (d / "__init__.py").is_file()
    )


def source_modules() -> set[str]:
    """Names of the source tree's top-level modules and packages."""
    modules = {p.stem for p in ROOT.glob("*.py")}
    return modules | {d.name for d in source_packages()}


def shipped_files(package_dir: Path) -> set[str]:
    """The files of a source package, as wheel paths, caches left out."""
    return {
        p.relative_to(ROOT).as_posix() for p in package_dir.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


def imported_top_names(source: str) -> set[str]:
    """Top-level names a module imports (absolute imports only, as the project uses)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="module")
def wheel_names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as zf:
        return set(zf.namelist())


def wheel_modules(names: set[str]) -> set[str]:
    """Top-level modules and packages in a wheel's file list."""
    modules = set()
    for name in names:
        first, _, rest = name.partition("/")
        if not rest and first.endswith(".py"):
            modules.add(first.removesuffix(".py"))
        elif rest == "__init__.py":
            modules.add(first)
    return modules


def test_every_top_level_module_and_package_is_in_the_wheel(wheel_names: set[str]) -> None:
    assert source_modules() - wheel_modules(wheel_names) == set(), (
        "pyproject.toml's wheel patterns leave these modules out"
    )
    assert wheel_modules(wheel_names) - source_modules() == set()


def test_every_file_of_a_package_is_in_the_wheel(wheel_names: set[str]) -> None:
    # The patterns ship *.py; a package that grows data files needs a pattern for them.
    for package in source_packages():
        missing = shipped_files(package) - wheel_names
        assert not missing, f"add these to the wheel's include patterns: {sorted(missing)}"


def test_the_wheel_holds_no_tests_benchmarks_or_stray_folders(wheel_names: set[str]) -> None:
    tops = {name.split("/")[0] for name in wheel_names if "/" in name}
    allowed = {"zhiyi_resources"} | {d.name for d in source_packages()}
    strays = {t for t in tops if t not in allowed and not t.endswith(".dist-info")}
    assert strays == set()


def test_everything_the_shipped_modules_import_from_the_project_is_shipped(
    wheel: Path, wheel_names: set[str]
) -> None:
    # Also catches a module that lives outside the patterns (say in examples/) but is imported.
    project_names = {p.stem for p in ROOT.glob("*.py")} | {
        d.name for d in ROOT.iterdir() if d.is_dir()
    }
    shipped = wheel_modules(wheel_names)
    with zipfile.ZipFile(wheel) as zf:
        for name in sorted(n for n in wheel_names if n.endswith(".py")):
            imported = imported_top_names(zf.read(name).decode("utf-8"))
            unshipped = (imported & project_names) - shipped
            assert not unshipped, f"{name} imports {sorted(unshipped)}, not in the wheel"


def test_resources_and_the_command_are_in_the_wheel(wheel: Path, wheel_names: set[str]) -> None:
    for resource in RESOURCES:
        assert f"zhiyi_resources/{resource}" in wheel_names
    statics = {p.relative_to(ROOT).as_posix() for p in (ROOT / "static").rglob("*") if p.is_file()}
    assert {f"zhiyi_resources/{s}" for s in statics} <= wheel_names
    with zipfile.ZipFile(wheel) as zf:
        (entry_points,) = (n for n in wheel_names if n.endswith(".dist-info/entry_points.txt"))
        assert "zhiyi = zhiyi_server:main" in zf.read(entry_points).decode()
