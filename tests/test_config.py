"""The configuration table: one declaration per setting, read by ``Config.from_env``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from zhiyi_server import Config, ConfigError, settings_table

#: Every setting's variable and default as they were before the table: a rename or a
#: changed default breaks deployments, so it must be a deliberate edit here too.
DEFAULTS = {
    "DATA_STORAGE_PATH": Path("./data"), "ZHIYI_DB": None, "ZHIYI_DATABASE_URL": None,
    "ZHIYI_HOST": "127.0.0.1",
    "ZHIYI_PORT": 8080, "PUBLIC_URL": None, "WORKER_CONCURRENCY": 4, "ZHIYI_WORKERS": None,
    "MAX_ATTEMPTS": 3, "RETRY_BASE_SECONDS": 2.0, "TASK_TIMEOUT_SECONDS": 3600.0,
    "MAX_UPLOAD_MB": 50, "BODY_TIMEOUT_SECONDS": 30.0, "MAX_ACTIVE_TASKS_PER_USER": 100,
    "PARSE_WORKERS": 4, "MAX_PARSES_PER_USER": 2, "PARSE_MEMORY_MB": 512,
    "PARSE_CPU_SECONDS": 60, "PARSE_WALL_SECONDS": 120.0, "MAX_ZIP_MEMBERS": 10_000,
    "MAX_ZIP_UNCOMPRESSED_MB": 512, "MAX_ZIP_RATIO": 200, "MAX_PDF_PAGES": 2_000,
    "RETENTION_DAYS": 30.0, "RECONCILE_SECONDS": 30.0, "STARTER_CREDITS": 1000,
    "SSE_HEARTBEAT_SECONDS": 15.0, "SSE_MAX_PER_USER": 32, "SSE_MAX_TOTAL": 10_000,
    "SSE_BUFFER_EVENTS": 256, "WEBHOOK_SECRET": None, "EXTERNAL_SERVICE_URL": None,
    "EXTERNAL_TIMEOUT_SECONDS": 3600.0, "LIBRETRANSLATE_URL": None,
    "LIBRETRANSLATE_API_KEY": None, "OPENAI_BASE_URL": None, "OPENAI_API_KEY": None,
    "OPENAI_MODEL": "gpt-4o-mini", "DISK_LOW_MB": 1024, "DEEPL_API_KEY": None,
    "DEEPL_API_URL": None, "ENGINE_CONCURRENCY": 4, "ENGINE_MAX_INFLIGHT": 16,
    "SHUTDOWN_GRACE_SECONDS": 20.0, "SESSION_DAYS": 30.0, "MAX_STORAGE_MB_PER_USER": 1024,
    "FAILED_RETENTION_HOURS": 24.0, "ZHIYI_LOG_LEVEL": "INFO",
}


def by_env() -> dict[str, dataclasses.Field]:
    return {f.metadata["setting"].env: f for f in settings_table()}


def test_every_setting_keeps_its_variable_and_default() -> None:
    fields = by_env()
    assert set(fields) == set(DEFAULTS)
    config = Config.from_env({})
    for env, default in DEFAULTS.items():
        assert getattr(config, fields[env].name) == default, env
    assert Config() == config  # Config(...) and from_env agree on every default


def test_every_variable_is_read_into_its_field() -> None:
    samples = {"int": "70", "float": "7.5", "str": "x", "Path": "/srv/zhiyi"}
    expected = {"int": 70, "float": 7.5, "str": "x", "Path": Path("/srv/zhiyi")}
    for env, field in by_env().items():
        kind = str(field.type).removesuffix(" | None")
        config = Config.from_env({env: samples[kind]})
        assert getattr(config, field.name) == expected[kind], env


def test_empty_variables_keep_the_default_and_overrides_win() -> None:
    config = Config.from_env({"ZHIYI_PORT": "", "ZHIYI_WORKERS": ""}, port=9000,
                             worker_concurrency=None)
    assert (config.port, config.worker_processes, config.worker_concurrency) == (9000, None, 4)
    assert Config(data_path=Path("d"), worker_concurrency=0).worker_concurrency == 0


@pytest.mark.parametrize(("env", "raw", "message"), [
    ("ZHIYI_PORT", "eighty", "ZHIYI_PORT must be a whole number, not 'eighty'"),
    ("MAX_UPLOAD_MB", "0", "MAX_UPLOAD_MB must be at least 1, not 0"),
    ("RETENTION_DAYS", "-1", "RETENTION_DAYS must be at least 0, not -1.0"),
    ("SESSION_DAYS", "0", "SESSION_DAYS must be at least 0.01, not 0.0"),
    ("TASK_TIMEOUT_SECONDS", "inf", "TASK_TIMEOUT_SECONDS must be a finite number, not 'inf'"),
    ("PARSE_MEMORY_MB", "8", "PARSE_MEMORY_MB must be at least 16, not 8"),
])
def test_errors_name_the_variable(env: str, raw: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_env({env: raw})
    assert str(caught.value) == message


# ------------------------------------------------------------ the docs and --help
ROOT = Path(__file__).resolve().parent.parent


def test_readme_settings_table_is_the_generated_one() -> None:
    import cli

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    _, start, rest = readme.partition(cli.README_TABLE_START)
    table, end, _ = rest.partition(cli.README_TABLE_END)
    assert start and end, "README.md lost its settings table markers"
    assert table.strip() == cli.settings_markdown().strip(), (
        "README.md's settings table differs from Config's: run "
        "`zhiyi config --readme README.md`")


def test_the_table_names_every_setting_once_with_its_default() -> None:
    import cli

    rows = cli.settings_markdown().splitlines()[2:]
    assert [r.split(" | ")[0].strip("| `") for r in rows] == list(DEFAULTS)
    port = next(r for r in rows if r.startswith("| `ZHIYI_PORT`"))
    assert "`--port`" in port and "`8080`" in port and "whole number ≥ 0" in port


def test_readme_regeneration_replaces_only_the_table(tmp_path: Path) -> None:
    import cli

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{cli.README_TABLE_START}\n| stale |\n{cli.README_TABLE_END}\nend\n")
    assert cli.main(["config", "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "| stale |" not in text and text.startswith("intro\n") and text.endswith("end\n")
    assert cli.settings_markdown() in text
    readme.write_text("no markers\n")
    assert cli.main(["config", "--readme", str(readme)]) == 1
    assert readme.read_text() == "no markers\n"


def test_serve_help_shows_every_setting_and_its_flags(
        capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import cli

    monkeypatch.setenv("COLUMNS", "200")  # argparse wraps help to the terminal's width
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    shown = capsys.readouterr().out
    for env in by_env():
        assert f"  {env} = " in shown, env
    assert "--port PORT" in shown and "(ZHIYI_PORT; default 8080)" in shown
    assert "--workers WORKERS" in shown


def test_a_bad_flag_value_names_the_flag(capsys: pytest.CaptureFixture) -> None:
    import cli

    with pytest.raises(SystemExit) as done:
        cli.main(["serve", "--port", "-1"])
    assert done.value.code == 2
    assert "--port must be at least 0, not -1" in capsys.readouterr().err


def test_config_shows_the_values_in_use_without_secrets(
        capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import cli

    monkeypatch.setenv("DEEPL_API_KEY", "sekrit:fx")
    monkeypatch.setenv("ZHIYI_PORT", "9123")
    assert cli.main(["config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "ZHIYI_PORT=9123" in lines and "DEEPL_API_KEY=(set)" in lines
    assert "WEBHOOK_SECRET=" in lines  # unset: empty
    assert not any("sekrit" in line for line in lines)


@pytest.mark.parametrize(("cpus", "expected"), [("0", "0"), ("0,1", "2")])
def test_default_worker_processes_follow_the_cores_the_server_may_use(
        cpus: str, expected: str) -> None:
    """One per core the process may run on (taskset narrows it); none with one core."""
    import os
    import shutil
    import subprocess
    import sys

    if len(os.sched_getaffinity(0)) < 2 and cpus != "0":
        pytest.skip("this machine lets the tests use one core only")
    assert shutil.which("taskset"), "taskset (util-linux) is part of every Debian install"
    done = subprocess.run(
        ["taskset", "-c", cpus, sys.executable, "-c",
         "from zhiyi_server import Config; print(Config().worker_process_count)"],
        capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == expected
    assert Config(worker_processes=3).worker_process_count == 3  # an explicit count wins
