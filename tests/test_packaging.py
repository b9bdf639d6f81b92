"""The wheel carries what users need: every module, every package, the resources.

The wheel's file list is derived by patterns in pyproject.toml; these tests hold the built
wheel against the source tree so the two cannot drift apart (a hand-kept list once shipped a
``zhiyi`` command that died with ``No module named 'external'``).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import aiohttp
import pytest
from helpers import SSEReader
from page_helpers import ZhiyiServer, base_env

from engines import pseudo_localize

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


# ------------------------------------------------- the installed program, end to end
def install_wheel(wheel: Path, venv_dir: Path) -> Path:
    """A fresh venv with the wheel installed (not editable); its ``bin`` folder.

    pip reuses its cache and the machine's configured indexes for the dependencies.
    """
    venv.EnvBuilder(with_pip=True).create(venv_dir)
    bin_dir = venv_dir / "bin"
    subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "-q", str(wheel)],
                   check=True, capture_output=True, timeout=600, env=base_env())
    return bin_dir


def run_installed(bin_dir: Path, *args: str, cwd: Path) -> str:
    done = subprocess.run([str(bin_dir / args[0]), *args[1:]], cwd=cwd, env=base_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``bin`` folder of a fresh venv holding the wheel; checks nothing comes from here."""
    assert "PYTHONPATH" not in os.environ, "the installed program must not see the source tree"
    root = tmp_path_factory.mktemp("installed")
    bin_dir = install_wheel(wheel, root / "venv")
    where = run_installed(bin_dir, "python", "-c",
                          "import zhiyi_server; print(zhiyi_server.__file__)", cwd=root)
    assert Path(where.strip()).is_relative_to(root / "venv"), where
    return bin_dir


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_the_installed_wheel_serves_a_task_end_to_end(
    installed: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    out = run_installed(installed, "zhiyi", "user", "add", "alice", "--credits", "50",
                        "--data", str(data), cwd=tmp_path)
    token = out.strip().splitlines()[-1]
    server = ZhiyiServer(data, command=[str(installed / "zhiyi"), "serve", "--port", "{port}",
                                        "--data", "{data}"])
    server.start(timeout=60)
    try:
        await _complete_a_task(server.url, token)
    finally:
        server.stop()
    assert "Traceback" not in server.log()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_installed_modules_refuse_an_app_module_of_the_same_name(
    installed: Path, tmp_path: Path
) -> None:
    (tmp_path / "worker.py").write_text("")  # an app's own module, in the folder it runs from
    done = subprocess.run([str(installed / "python"), "-c", "import zhiyi_server"],
                          cwd=tmp_path, env=base_env(), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0
    assert f"'worker' resolves to {tmp_path / 'worker.py'}, not to Zhiyi's own" in done.stderr


async def _complete_a_task(base: str, token: str) -> None:
    """Resources from the wheel, then upload → SSE to completion → download, over HTTP."""
    auth = {"Authorization": f"Bearer {token}"}
    text = "Hello world.\n\nSecond paragraph.\n"
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(base, timeout=timeout) as http:
        async with http.get("/") as page:  # static/ and openapi.yaml come from zhiyi_resources
            assert page.status == 200 and "<html" in (await page.text()).lower()
        async with http.get("/static/app.js") as script:
            assert await script.read() == (ROOT / "static" / "app.js").read_bytes()
        async with http.get("/api/openapi.yaml") as spec:
            assert await spec.read() == (ROOT / "openapi.yaml").read_bytes()

        form = aiohttp.FormData()
        form.add_field("taskType", "translate")
        form.add_field("params", '{"targetLang": "zh", "engine": "pseudo"}')
        form.add_field("file", text.encode(), filename="hello.txt")
        async with http.post("/api/tasks/create", data=form, headers=auth) as created:
            body = await created.json()
            assert created.status == 201, body

        async with http.get(body["sseUrl"], headers=auth) as stream:
            assert stream.status == 200
            messages = await SSEReader(stream).collect_until_final(timeout=60)
        final = messages[-1].payload
        assert final["status"] == "completed", final

        async with http.get(f"/api/tasks/{body['taskId']}", headers=auth) as got:
            result_url = (await got.json())["task"]["resultUrl"]
        async with http.get(result_url, headers=auth) as result:
            assert result.status == 200
            translated = await result.text()
    assert translated == "\n\n".join(
        pseudo_localize(p) for p in ("Hello world.", "Second paragraph.")) + "\n"


# ------------------------------------------------------------------- module names
def import_in_subprocess(code: str, path_first: Path, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``code`` with ``path_first`` at the head of sys.path, as an embedding app would."""
    env = {**base_env(), "PYTHONPATH": str(path_first)}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def test_the_guarded_names_are_every_module_zhiyi_ships() -> None:
    import zhiyi_modules

    guarded = set(zhiyi_modules.EAGER_MODULES) | {
        "cli", "client", "storage_pg", "zhiyi_server", "zhiyi_modules"}
    assert guarded == source_modules(), (
        "a new top-level module belongs in zhiyi_modules.EAGER_MODULES (or is imported "
        "lazily and checked where it is, like client)"
    )


@pytest.mark.parametrize("shadow", ["storage.py", "sse.py", "formats/__init__.py"])
def test_an_app_module_earlier_on_sys_path_is_refused_naming_both_files(
    tmp_path: Path, shadow: str
) -> None:
    app = tmp_path / "app"
    (app / shadow).parent.mkdir(parents=True, exist_ok=True)
    (app / shadow).write_text("TaskStore = None  # the app's own module\n")
    done = import_in_subprocess("import zhiyi_server", app, cwd=tmp_path)
    name = shadow.split("/")[0].removesuffix(".py")
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: Zhiyi's module")
    assert str(app / shadow) in last
    own = ROOT / name if shadow.endswith("__init__.py") else ROOT / shadow
    assert str(own) in last, last


@pytest.mark.parametrize("shadow", ["formats.py", "engines.py", "storage.py"])
def test_importing_processors_first_is_guarded_too(tmp_path: Path, shadow: str) -> None:
    # The README's embedding example imports processors before zhiyi_server.
    app = tmp_path / "app"
    app.mkdir()
    (app / shadow).write_text("X = 1\n")
    done = import_in_subprocess("from processors import default_registry", app, cwd=tmp_path)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: Zhiyi's module"), last
    assert str(app / shadow) in last


def test_an_app_module_imported_first_is_refused(tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "metrics.py").write_text("COUNT = 0\n")
    done = import_in_subprocess(
        # the app imported its own metrics, then left sys.path: found through sys.modules
        f"import sys, metrics; sys.path.remove({str(app)!r}); import zhiyi_server",
        app, cwd=tmp_path)
    assert done.returncode != 0
    assert f"'metrics' resolves to {app / 'metrics.py'}" in done.stderr


def test_a_shadowed_client_stops_the_cli_instead_of_dropping_its_commands(
    tmp_path: Path,
) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "client.py").write_text("")
    done = import_in_subprocess(
        "import sys, zhiyi_server; sys.argv = ['zhiyi', '--help']; zhiyi_server.main()",
        app, cwd=tmp_path)
    assert done.returncode != 0
    assert f"'client' resolves to {app / 'client.py'}" in done.stderr


def test_app_modules_with_other_names_import_fine(tmp_path: Path) -> None:
    app = tmp_path / "app"
    (app / "myapp").mkdir(parents=True)
    for name in ("myapp/__init__.py", "myapp/storage.py", "app_storage.py"):
        (app / name).write_text("")
    done = import_in_subprocess(
        "import myapp.storage, app_storage, zhiyi_server, client; print(zhiyi_server.__file__)",
        app, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(ROOT / "zhiyi_server.py")
