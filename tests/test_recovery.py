"""kill -9 of a real server process mid-task, then a restart on the same data."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from helpers import ServerProcess, free_port, make_user


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(free_port(), tmp_path / "data")
    yield proc
    proc.stop()


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


@pytest.mark.slow
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
