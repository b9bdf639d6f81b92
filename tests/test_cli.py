"""The ``zhiyi`` command: user management and ``serve``'s first start, as a person runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from helpers import free_port

ZHIYI = [sys.executable, "-m", "zhiyi_server"]


def zhiyi(*args: str, data: Path | None = None, env: dict[str, str] | None = None,
          ) -> subprocess.CompletedProcess[str]:
    extra = ["--data", str(data)] if data is not None else []
    return subprocess.run([*ZHIYI, *args, *extra], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_user_commands(tmp_path: Path) -> None:
    data = tmp_path / "data"
    added = zhiyi("user", "add", "alice", "--credits", "25", data=data)
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip().splitlines()[-1]
    assert token.startswith("zy_") and " " not in token
    again = zhiyi("user", "add", "alice", data=data)
    assert again.returncode == 1
    assert again.stderr.strip() == "zhiyi: user 'alice' already exists"
    second = zhiyi("user", "token", "alice", data=data).stdout.strip().splitlines()[-1]
    assert second.startswith("zy_") and second != token
    assert zhiyi("user", "token", "nobody", data=data).returncode == 1
    assert zhiyi("user", "credit", "alice", "-5", data=data).stdout.strip() == "alice: 20 credits"
    broke = zhiyi("user", "credit", "alice", "-500", data=data)
    assert broke.returncode == 1 and "only 20 credits" in broke.stderr
    assert zhiyi("user", "list", data=data).stdout.split() == ["alice", "20"]
    assert zhiyi("user", "add", "bad name!", data=data).returncode == 1
    assert zhiyi("user", "frobnicate", data=data).returncode == 2
    # DATA_STORAGE_PATH works like --data.
    listed = zhiyi("user", "list", env={"DATA_STORAGE_PATH": str(data)})
    assert listed.stdout.split() == ["alice", "20"]
    bad_env = zhiyi("user", "list", env={"ZHIYI_PORT": "eighty"})
    assert bad_env.returncode == 1 and "ZHIYI_PORT" in bad_env.stderr


@pytest.mark.slow
def test_serve_first_start_prints_a_login_url(tmp_path: Path) -> None:
    data = tmp_path / "data"
    port = free_port()
    proc = subprocess.Popen([*ZHIYI, "serve", "--port", str(port), "--data", str(data)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/?token=zy_" in line
        url = line.split("Open ", 1)[1].strip()
        token = url.split("token=", 1)[1]
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/me",
                                         headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert json.load(resp) == {"success": True, "userId": "local", "credits": 1000}
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.communicate(timeout=20)
    assert proc.returncode == 0
    # A second start reuses the same login URL and does not add users.
    assert zhiyi("user", "list", data=data).stdout.split() == ["local", "1000"]


def test_serve_on_a_taken_port_is_one_clear_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = zhiyi("serve", "--port", str(port), data=tmp_path / "data")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"zhiyi: cannot listen on 127.0.0.1:{port}")
    assert f"choose another port with --port {port + 1}" in last  # the next step
    assert "Traceback" not in result.stderr


def zhiyi_in(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``zhiyi`` run from ``folder`` with no data folder in the environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATA_STORAGE_PATH", "ZHIYI_DB")}
    return subprocess.run([*ZHIYI, *args], capture_output=True, text=True, timeout=60,
                          env=env, cwd=folder)


@pytest.mark.slow
def test_server_side_commands_refuse_a_folder_without_a_database(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    worker = zhiyi_in(elsewhere, "worker")
    assert worker.returncode == 1
    assert worker.stderr.startswith(f"zhiyi: no data folder {elsewhere / 'data'} here")
    assert "--data" in worker.stderr and "zhiyi serve" in worker.stderr
    for args in (("user", "add", "alice"), ("user", "list"), ("backup", str(tmp_path / "b")),
                 ("worker", "--data", ".")):
        done = zhiyi_in(elsewhere, *args)
        assert done.returncode == 1, args
        where = elsewhere if args[0] == "worker" else elsewhere / "data"
        assert done.stderr.startswith(f"zhiyi: no Zhiyi database in {where}"), args
        assert "--data" in done.stderr and "zhiyi serve" in done.stderr  # the next steps
        assert done.stdout == ""
    assert list(elsewhere.iterdir()) == []  # nothing created, no token printed
    # Named on purpose, `user add` may start a database before the first `zhiyi serve`.
    named = zhiyi_in(elsewhere, "user", "add", "alice", "--data", str(tmp_path / "new"))
    assert named.returncode == 0
    assert named.stdout.splitlines()[0] == "created user alice with 0 credits; API token:"
    assert f"made a new database in {tmp_path / 'new'}" in named.stderr
    assert "give some with `zhiyi user credit alice N`" in named.stderr
    # Now there is one: the other commands use it.
    listed = zhiyi_in(elsewhere, "user", "list", "--data", str(tmp_path / "new"))
    assert listed.stdout.split() == ["alice", "0"]


@pytest.mark.slow
def test_a_bad_data_folder_is_one_line_naming_it(tmp_path: Path) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    for args in (("serve",), ("user", "list"), ("user", "add", "bob"), ("restore", "x")):
        done = zhiyi_in(tmp_path, *args, "--data", str(a_file))
        assert done.returncode == 1, args
        assert done.stderr == (f"zhiyi: {a_file} is a file, not a folder; give the data folder "
                               "(where `zhiyi serve` keeps zhiyi.db) with --data or "
                               "DATA_STORAGE_PATH\n"), args
    # A folder that cannot be made (under a file): one line naming it, no traceback.
    done = zhiyi_in(tmp_path, "serve", "--port", "0", "--data", str(a_file / "data"))
    assert done.returncode == 1
    assert done.stderr.startswith("zhiyi: cannot use the data folder: ")
    assert str(a_file) in done.stderr and "--data" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) == 1
