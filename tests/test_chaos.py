"""Chaos under load: SIGKILL of the HTTP process and of the worker process, several times.

A steady load of tasks of every type (a slow engine and a slow processor keep some mid-flight)
with a hundred clients following their tasks' streams with ``Last-Event-ID``; the HTTP process
and the worker process are each killed with SIGKILL at moments drawn from a seeded generator,
then restarted on the same address and data. Afterwards, from the database and the API:
every task ended exactly once (completed, or failed and refunded), each was charged once,
the balance equals the ledger, and every client saw each event of its task after its first
message, in order, once, ending with the final one.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import ServerProcess, StreamWatcher, free_port, make_user
from page_helpers import FakeEngine, slow_document

from storage import TaskStore

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

#: figures of the last run, for RELIABILITY.md (test-results/ is not committed)
RESULTS = Path(__file__).resolve().parent.parent / "test-results"
TASKS = 240
FOLLOWERS = 100  # clients following a stream at once
KILLS = 3  # of each process
SEED = 20261201
#: task type and params, in turn; translate goes through the slow fake engine
KINDS: list[tuple[str, dict[str, Any]]] = [
    ("translate", {"targetLang": "zh", "engine": "openai"}),
    ("quick", {}),
    ("analyze", {}),
    ("count", {}),
    ("extract", {}),
    ("translate", {"targetLang": "fr", "engine": "pseudo"}),
]


@pytest.fixture
def engine() -> Iterator[FakeEngine]:
    fake = FakeEngine(delay=0.2).start()
    yield fake
    fake.stop()


class Processes:
    """One HTTP process (no workers) and one worker process on one data folder."""

    def __init__(self, data: Path, env: dict[str, str]) -> None:
        common = {"RECONCILE_SECONDS": "0.5", "MAX_ACTIVE_TASKS_PER_USER": "1000",
                  "MAX_PARSES_PER_USER": "8",
                  "SSE_MAX_PER_USER": "1000", "MAX_ATTEMPTS": "10", **env}
        self.http = ServerProcess(free_port(), data, env={**common, "WORKER_CONCURRENCY": "0"})
        self.worker = ServerProcess(free_port(), data, env={**common, "WORKER_CONCURRENCY": "4"},
                                    args=("worker",))

    def start(self) -> None:
        self.http.start()
        self.worker.start()

    def stop(self) -> None:
        self.http.stop()
        self.worker.stop()


async def create(session: aiohttp.ClientSession, url: str, n: int, doc: bytes) -> int:
    """Create task ``n``; a create refused by a dead server is sent again with the same key."""
    task_type, params = KINDS[n % len(KINDS)]
    key = uuid.uuid4().hex
    while True:
        form = aiohttp.FormData()
        form.add_field("taskType", task_type)
        form.add_field("params", json.dumps(params))
        form.add_field("file", doc, filename=f"doc{n}.txt")
        try:
            async with session.post(f"{url}/api/tasks/create", data=form,
                                    headers={"Idempotency-Key": key}) as resp:
                if resp.status in (200, 201):
                    return int((await resp.json())["taskId"])
                # 429 (parses in flight) and 5xx say "send it again"; anything else is a bug.
                assert resp.status == 429 or resp.status >= 500, await resp.text()
        except (aiohttp.ClientError, ConnectionError):
            pass
        await asyncio.sleep(0.1)


async def chaos(processes: Processes, rng: random.Random, done: asyncio.Event) -> int:
    """Kill the worker and the HTTP process in turn at random moments; restart each."""
    kills = 0
    for n in range(2 * KILLS):
        await asyncio.sleep(rng.uniform(0.5, 2.5))
        if done.is_set():
            break
        victim = processes.worker if n % 2 == 0 else processes.http
        victim.kill()
        kills += 1
        await asyncio.sleep(rng.uniform(0.0, 0.5))
        await asyncio.to_thread(victim.start)
    return kills


async def test_sigkill_under_load_loses_nothing_and_charges_once(
        tmp_path: Path, engine: FakeEngine) -> None:
    data = tmp_path / "data"
    data.mkdir()
    token = await make_user(data, 100_000)
    processes = Processes(data, engine.server_env())
    processes.start()
    doc = slow_document(tmp_path / "doc.txt", 12).read_bytes()
    rng = random.Random(SEED)
    url = processes.http.url
    try:
        connector = aiohttp.TCPConnector(limit=0)
        headers = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession(headers=headers, connector=connector) as session:
            done = asyncio.Event()
            killer = asyncio.create_task(chaos(processes, rng, done))
            slots = asyncio.Semaphore(FOLLOWERS)
            watchers: list[StreamWatcher] = []

            async def submit_and_follow(n: int) -> None:
                async with slots:
                    watcher = StreamWatcher(session, await create(session, url, n, doc), [url])
                    watchers.append(watcher)
                    await watcher.run()

            load = [asyncio.create_task(submit_and_follow(n)) for n in range(TASKS)]
            try:
                await asyncio.wait_for(asyncio.gather(*load), 400)
            finally:
                done.set()
                for task in load:  # on a failure, nothing keeps running after the test
                    task.cancel()
                await asyncio.gather(*load, return_exceptions=True)
            kills = await killer
            me = await _get(session, f"{url}/api/me")
            entries = await _ledger(session, url)
    finally:
        processes.stop()

    assert kills >= 4, "the load should outlast several kills"
    assert len(watchers) == TASKS
    assert any(w.reconnects for w in watchers), "some streams should have been cut"
    store = await TaskStore.open(data / "zhiyi.db")
    try:
        for w in watchers:
            assert w.final is not None and w.final["status"] in ("completed", "failed"), w.final
            assert w.first_id is not None
            events = await store.events_after(w.first_id, task_id=w.task_id)
            assert w.ids == [e.id for e in events], (w.task_id, w.ids, [e.id for e in events])
            # The last message seen is the final one (the snapshot, for a task already over).
            assert not events or events[-1].is_final
        tasks = [await store.get_task_by_id(w.task_id) for w in watchers]
    finally:
        await store.close()
    statuses = {t.id: t.status.value for t in tasks}
    # A translation whose every segment is in the translation memory costs 0: no charge row.
    paid = {t.id for t in tasks if t.credits_cost > 0}
    assert len(paid) >= TASKS // 2
    charges = Counter(e["taskId"] for e in entries if e["reason"] == "charge")
    refunds = Counter(e["taskId"] for e in entries if e["reason"] == "refund")
    assert charges == {task_id: 1 for task_id in paid}
    assert refunds == {task_id: 1 for task_id in paid if statuses[task_id] == "failed"}
    assert me["credits"] == sum(e["amount"] for e in entries)
    assert Counter(statuses.values())["completed"] >= TASKS * 0.9
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "chaos.json").write_text(json.dumps({
        "tasks": TASKS, "followers": FOLLOWERS, "sigkills": kills,
        "reconnects": sum(w.reconnects for w in watchers),
        "events_checked": sum(len(w.ids) for w in watchers),
        "completed": Counter(statuses.values())["completed"],
        "failed_and_refunded": Counter(statuses.values())["failed"],
        "charged_twice": 0, "events_lost": 0, "events_duplicated": 0}, indent=2) + "\n")


async def _get(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def _ledger(session: aiohttp.ClientSession, url: str) -> list[dict[str, Any]]:
    page = await _get(session, f"{url}/api/me/ledger?limit=100")
    entries = page["entries"]
    while page["nextCursor"] is not None:
        page = await _get(session, f"{url}/api/me/ledger?limit=100&cursor={page['nextCursor']}")
        entries += page["entries"]
    return entries
