"""kill -9 of a real server process mid-task, then a restart on the same data."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from storage import TaskStore

HERE = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A real Zhiyi server in a subprocess, ended only by its own PID."""

    def __init__(self, port: int, data: Path, env: dict[str, str] | None = None,
                 args: tuple[str, ...] = ()) -> None:
        self.port = port
        self.data = data
        self.args = args
        self.env = {**os.environ, "WORKER_CONCURRENCY": "4", "RECONCILE_SECONDS": "3600",
                    "PYTHONPATH": f"{HERE.parent}{os.pathsep}{HERE}", **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self.log: list[str] = []
        self._drainer: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "serve_for_tests.py"), str(self.port), str(self.data),
             *self.args],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if "READY" in line:
                # Keep reading its log, or a chatty server would block on a full pipe.
                self._drainer = threading.Thread(target=self._drain, args=(self.proc.stdout,),
                                                 daemon=True)
                self._drainer.start()
                return
        raise AssertionError("the server did not start")

    def _drain(self, stream: Any) -> None:
        for line in stream:
            self.log.append(line)

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self._reap()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
        if self.proc:
            self._reap()

    def _reap(self) -> None:
        assert self.proc is not None
        self.proc.wait(10)
        if self._drainer is not None:
            self._drainer.join(10)  # the pipe ends when the process is gone
            self._drainer = None
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(free_port(), tmp_path / "data")
    yield proc
    proc.stop()


async def make_user(data: Path, credits: int) -> str:
    store = await TaskStore.open(data / "zhiyi.db")
    try:
        await store.add_user("alice", credits)
        return await store.issue_token("alice")
    finally:
        await store.close()


async def create_count_task(session: aiohttp.ClientSession, url: str) -> int:
    form = aiohttp.FormData()
    form.add_field("taskType", "count")
    form.add_field("file", b"x", filename="n.txt")
    async with session.post(f"{url}/api/tasks/create", data=form) as resp:
        assert resp.status == 201, await resp.text()
        return (await resp.json())["taskId"]


async def task_of(session: aiohttp.ClientSession, url: str, task_id: int) -> dict:
    async with session.get(f"{url}/api/tasks/{task_id}") as resp:
        return (await resp.json())["task"]


async def test_kill_9_mid_task_then_restart(server: ServerProcess) -> None:
    server.data.mkdir(parents=True)
    token = await make_user(server.data, 50)
    server.start()
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        ids = [await create_count_task(session, server.url) for _ in range(6)]
        # Wait until the first tasks are well under way, then kill -9.
        while (await task_of(session, server.url, ids[0]))["progressPercent"] < 30:
            await asyncio.sleep(0.05)
        server.kill()
        steps_before = (server.data / "steps.log").read_text().splitlines()
        server.start()
        for task_id in ids:
            while (task := await task_of(session, server.url, task_id))["taskStatus"] in (
                    "pending", "processing"):
                await asyncio.sleep(0.1)
            assert task["taskStatus"] == "completed", task
            async with session.get(f"{server.url}{task['resultUrl']}") as resp:
                assert await resp.text() == "counted to 40\n"
        async with session.get(f"{server.url}/api/me") as resp:
            credits = (await resp.json())["credits"]
        async with session.get(f"{server.url}/api/me/ledger?limit=100") as resp:
            entries = (await resp.json())["entries"]
    # Each task charged once, never refunded; balance equals the ledger sum.
    charges = Counter(e["taskId"] for e in entries if e["reason"] == "charge")
    assert charges == dict.fromkeys(ids, 1)
    assert not [e for e in entries if e["reason"] == "refund"]
    assert credits == sum(e["amount"] for e in entries) == 50 - len(ids)
    # The interrupted tasks resumed from their checkpoint: no step ran twice,
    # except at most the one in flight when the process died.
    steps = Counter(tuple(line.split()) for line in
                    (server.data / "steps.log").read_text().splitlines())
    assert all(n <= 2 for n in steps.values())
    repeated = [step for step, n in steps.items() if n == 2]
    assert len(repeated) <= 4  # at most one in-flight step per worker
    assert len(steps) == 40 * len(ids)
    interrupted = {line.split()[0] for line in steps_before}
    assert str(ids[0]) in interrupted
