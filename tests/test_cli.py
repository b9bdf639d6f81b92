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
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"zhiyi: cannot listen on 127.0.0.1:{port}")
