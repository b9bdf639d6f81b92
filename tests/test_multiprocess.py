"""Several processes on one database: HTTP processes, worker processes, kill -9.

Real processes on 127.0.0.1 (``serve_for_tests.py``), real SSE parsing. The
HTTP processes run no workers; the worker processes serve no HTTP.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import ServerProcess, SSEReader, StreamWatcher, free_port, make_user, new_task

from processors import Registry, TaskContext, default_registry
from storage import Event, NewTask, TaskStatus, TaskStore, open_store
from worker import HOST, WorkerPool, WorkerSettings

# both_stores: the cluster tests (those taking ``cluster``) run on SQLite and on PostgreSQL.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300), pytest.mark.both_stores]

HTTP_ENV = {"WORKER_CONCURRENCY": "0", "MAX_ACTIVE_TASKS_PER_USER": "1000",
            "SSE_MAX_PER_USER": "1000"}
WORKER_ENV = {"WORKER_CONCURRENCY": "4", "RECONCILE_SECONDS": "0.5"}


async def test_events_of_other_processes_reach_listeners_once_in_id_order(
        tmp_path: Path) -> None:
    """Store A's listener gets B's events too: before A's own next event (read in A's
    write transaction), or from the tailer; never twice, never out of order."""
    path = tmp_path / "zhiyi.db"
    a = await TaskStore.open(path, watch_seconds=3600)  # the tailer never runs by itself
    b = await TaskStore.open(path)
    seen: list[Event] = []
    a.add_listener(seen.append)
    try:
        await b.add_user("bob", 5)
        await a.add_user("alice", 5)
        await b.grant_credits("bob", 1)    # B's events, unseen by A so far
        await b.grant_credits("bob", 2)
        await a.grant_credits("alice", 1)  # A's own write brings B's first
        assert [e.user_id for e in seen] == ["bob", "bob", "alice"]
        await b.grant_credits("bob", 3)
        await a.catch_up()                 # the tailer's step
        await a.catch_up()                 # nothing new: nothing again
        await a.grant_credits("alice", 2)
        everything = await a.events_after(0, user_id="bob") + \
            await a.events_after(0, user_id="alice")
    finally:
        await a.close()
        await b.close()
    assert [e.id for e in seen] == sorted(e.id for e in everything)
    assert [e.user_id for e in seen] == ["bob", "bob", "alice", "bob", "alice"]


async def test_a_commit_pings_the_other_processes_of_the_host(tmp_path: Path) -> None:
    """A's own poll is an hour: only B's loopback ping can make A look."""
    path = tmp_path / "zhiyi.db"
    a = await TaskStore.open(path, watch_seconds=3600)
    b = await TaskStore.open(path)
    seen: list[Event] = []
    a.add_listener(seen.append)
    b.add_listener(lambda event: None)  # B watches too, so it knows whom to ping
    try:
        await b.add_user("bob", 0)
        for _ in range(500):  # B re-reads the list of ports every second
            if b._wake.ports:
                break
            await asyncio.sleep(0.01)
        await b.grant_credits("bob", 1)
        for _ in range(500):
            if seen:
                break
            await asyncio.sleep(0.01)
        assert [e.id for e in seen] == [e.id for e in await b.events_after(0, user_id="bob")]
    finally:
        await a.close()
        await b.close()


async def test_a_token_revoked_by_another_process_stops_working(tmp_path: Path) -> None:
    path = tmp_path / "zhiyi.db"
    a = await TaskStore.open(path, watch_seconds=0.01)
    b = await TaskStore.open(path)
    a.add_listener(lambda event: None)  # an HTTP process: its store watches the file
    try:
        await b.add_user("alice", 0)
        token = await b.issue_token("alice")
        assert await a.user_for_token(token) == "alice"  # now remembered by A
        await b.revoke_token(token)
        for _ in range(500):
            if await a.user_for_token(token) is None:
                break
            await asyncio.sleep(0.01)
        assert await a.user_for_token(token) is None
    finally:
        await a.close()
        await b.close()


def _pool(store: TaskStore, tmp_path: Path) -> WorkerPool:
    return WorkerPool(store, default_registry(), WorkerSettings(concurrency=0),
                      tmp_path / "data", engine_factory=lambda name: None)  # type: ignore


async def _claimed_by(store: TaskStore, owner: str, lease_seconds: float) -> int:
    await store.create_processing_task(new_task("alice"))
    task = await store.claim_next_task(owner, lease_seconds)
    assert task is not None
    return task.id


async def test_recovery_takes_only_expired_or_provably_dead_leases(tmp_path: Path) -> None:
    store = await TaskStore.open(tmp_path / "zhiyi.db")
    try:
        await store.add_user("alice", 10)
        elsewhere = await _claimed_by(store, "other-host:1:abc", 60)
        alive_here = await _claimed_by(store, f"{HOST}:1:abc", 60)  # pid 1 always runs
        dead_here = await _claimed_by(store, f"{HOST}:{2**22 + 7}:abc", 60)  # no such pid
        expired = await _claimed_by(store, "other-host:1:abc", -1)
        await _pool(store, tmp_path).recover()
        states = {i: (await store.get_task_by_id(i)).status
                  for i in (elsewhere, alive_here, dead_here, expired)}
    finally:
        await store.close()
    assert states == {elsewhere: TaskStatus.PROCESSING, alive_here: TaskStatus.PROCESSING,
                      dead_here: TaskStatus.PENDING, expired: TaskStatus.PENDING}


class Cluster:
    """HTTP and worker processes on one data folder; stopped at the end by their PIDs."""

    def __init__(self, data: Path, database_url: str | None) -> None:
        self.data = data
        self.database_url = database_url
        self.store_env = {"ZHIYI_DATABASE_URL": database_url} if database_url else {}
        self.processes: list[ServerProcess] = []

    def http(self) -> ServerProcess:
        return self._start(ServerProcess(free_port(), self.data,
                                         env={**HTTP_ENV, **self.store_env}))

    def worker(self) -> ServerProcess:
        return self._start(ServerProcess(free_port(), self.data,
                                         env={**WORKER_ENV, **self.store_env},
                                         args=("worker",)))

    async def open_store(self) -> TaskStore:
        return await open_store(self.data / "zhiyi.db", self.database_url)

    async def make_user(self, credits: int) -> str:
        return await make_user(self.data, credits, self.database_url)

    def _start(self, proc: ServerProcess) -> ServerProcess:
        self.processes.append(proc)
        proc.start()
        return proc

    def stop(self) -> None:
        for proc in self.processes:
            proc.stop()


@pytest.fixture
def cluster(tmp_path: Path, database_url: str | None) -> Iterator[Cluster]:
    data = tmp_path / "data"
    data.mkdir()
    group = Cluster(data, database_url)
    yield group
    group.stop()


async def create_task(session: aiohttp.ClientSession, url: str, task_type: str) -> int:
    form = aiohttp.FormData()
    form.add_field("taskType", task_type)
    form.add_field("file", b"x", filename="n.txt")
    async with session.post(f"{url}/api/tasks/create", data=form) as resp:
        assert resp.status == 201, await resp.text()
        return (await resp.json())["taskId"]


async def get_json(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def wait_for(predicate: Any, what: str, attempts: int = 600) -> None:
    """Poll a condition (bounded by a count, not by the machine's speed)."""
    for _ in range(attempts):
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


def steps_log(data: Path) -> list[str]:
    path = data / "steps.log"
    return path.read_text().splitlines() if path.exists() else []


async def test_cancel_or_delete_through_an_http_process_stops_the_task_in_a_worker_process(
        cluster: Cluster) -> None:
    token = await cluster.make_user(10)
    http = cluster.http()
    cluster.worker()
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        task_id = await create_task(session, http.url, "count")
        await wait_for(lambda: _logged(cluster.data, f"{task_id} 2"), "the worker ran steps")
        async with session.post(f"{http.url}/api/tasks/{task_id}/cancel") as resp:
            assert resp.status == 200
            assert (await resp.json())["task"]["taskStatus"] == "cancelled"
        await wait_for(lambda: _logged(cluster.data, f"{task_id} cancelled"),
                       "the worker process stopped the attempt")
        # A delete through the HTTP process stops a running attempt the same way.
        deleted = await create_task(session, http.url, "count")
        await wait_for(lambda: _logged(cluster.data, f"{deleted} 2"), "the worker ran steps")
        async with session.delete(f"{http.url}/api/tasks/{deleted}") as resp:
            assert resp.status == 200
        await wait_for(lambda: _logged(cluster.data, f"{deleted} cancelled"),
                       "the worker process stopped the deleted task")
        me = await get_json(session, f"{http.url}/api/me")
    assert me["credits"] == 10  # each charged, then refunded once
    lines = steps_log(cluster.data)
    for stopped in (task_id, deleted):  # no step ran after the stop
        assert not [line for line in lines[lines.index(f"{stopped} cancelled"):]
                    if line.startswith(f"{stopped} ") and not line.endswith("cancelled")]


async def _logged(data: Path, line: str) -> bool:
    return line in steps_log(data)


async def _last_user_event(cluster: Cluster) -> int:
    store = await cluster.open_store()
    try:
        return await store.latest_event_id(user_id="alice")
    finally:
        await store.close()


async def _holds_a_lease(store: TaskStore, process: ServerProcess) -> bool:
    """Whether ``process`` (a worker) holds a task now (lease owners are host:pid:nonce)."""
    assert process.proc is not None
    return any(owner.split(":")[1] == str(process.proc.pid)
               for owner in await store.lease_owners())


async def test_two_http_and_two_worker_processes_with_kill_9(cluster: Cluster) -> None:
    """Every stream sees every event of its task once, in order, across a kill -9 of one
    HTTP process and one worker process; no task is lost and each is charged once."""
    tasks = 240
    token = await cluster.make_user(1000)
    http_a, http_b = cluster.http(), cluster.http()
    worker_a, _ = cluster.worker(), cluster.worker()
    headers = {"Authorization": f"Bearer {token}"}
    connector = aiohttp.TCPConnector(limit=0)
    probe = await cluster.open_store()  # to see which worker holds a task
    try:
        async with aiohttp.ClientSession(headers=headers, connector=connector) as session:
            watchers: list[StreamWatcher] = []
            runs: list[asyncio.Task[None]] = []
            # The user's notification stream on each HTTP process, from before the first task.
            users = [StreamWatcher(session, None, [http_a.url, http_b.url]),
                     StreamWatcher(session, None, [http_b.url])]
            user_runs = [asyncio.create_task(w.run()) for w in users]
            a_alive = worker_a_alive = True
            for n in range(tasks):
                # Tasks are created and followed on A and B in turn; once A is killed, its
                # clients move to B and new tasks go to B.
                first = http_a if n % 2 == 0 and a_alive else http_b
                urls = [first.url, http_b.url] if first is http_a else [http_b.url]
                task_id = await create_task(session, first.url, "quick")
                watcher = StreamWatcher(session, task_id, urls)
                watchers.append(watcher)
                runs.append(asyncio.create_task(watcher.run()))
                # Killed from a third of the way on, once it holds a task (else nothing of its
                # would need resuming: quick tasks are often all done between two creates).
                if n >= tasks // 3 and worker_a_alive and await _holds_a_lease(probe, worker_a):
                    worker_a.kill()
                    worker_a_alive = False
                if n == tasks // 2:
                    http_a.kill()
                    a_alive = False
                    for w in (*watchers, *users):
                        w.urls = [http_b.url]
            for w in watchers:
                w.urls = [http_b.url]
            await asyncio.wait_for(asyncio.gather(*runs), 240)
            for w in users:
                w.urls = [http_b.url]
                w.until_id = await _last_user_event(cluster)
            await asyncio.wait_for(asyncio.gather(*user_runs), 240)
            ledger = await get_json(session, f"{http_b.url}/api/me/ledger?limit=100")
            entries = ledger["entries"]
            while ledger["nextCursor"] is not None:
                ledger = await get_json(
                    session, f"{http_b.url}/api/me/ledger?limit=100&cursor={ledger['nextCursor']}")
                entries += ledger["entries"]
            me = await get_json(session, f"{http_b.url}/api/me")
    finally:
        await probe.close()
    assert not worker_a_alive
    store = await cluster.open_store()
    try:
        for w in watchers:
            assert w.final is not None and w.final["status"] == "completed", w.final
            assert w.first_id is not None
            events = await store.events_after(w.first_id, task_id=w.task_id)
            assert w.ids == [e.id for e in events], (w.task_id, w.ids, events)
        everything = [e.id for e in await store.events_after(0, user_id="alice", limit=10**6)]
        for w in users:
            assert w.ids == everything
        interrupted = [w.task_id for w in watchers if "interrupted" in str(
            await store.events_after(0, task_id=w.task_id))]
    finally:
        await store.close()
    assert any(w.reconnects for w in watchers)  # some clients did move to B
    assert users[0].reconnects  # so did the notification stream of A
    assert interrupted  # the killed worker had tasks in flight; they were resumed
    charges = Counter(e["taskId"] for e in entries if e["reason"] == "charge")
    assert charges == {w.task_id: 1 for w in watchers}
    assert not [e for e in entries if e["reason"] == "refund"]
    assert me["credits"] == sum(e["amount"] for e in entries) == 1000 - tasks


def test_serve_with_worker_processes_completes_tasks_and_stops_them(tmp_path: Path) -> None:
    """``zhiyi serve --workers 2``: the HTTP process runs no workers, its children do,
    and they end with it."""
    data = tmp_path / "data"
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "zhiyi_server", "serve", "--port", str(port), "--data", str(data),
         "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    children: list[int] = []
    drain: threading.Thread | None = None
    try:
        assert proc.stdout is not None and proc.stderr is not None
        token = proc.stdout.readline().split("token=", 1)[1].strip()
        for line in proc.stderr:
            if "started 2 worker processes:" in line:
                children = [int(pid) for pid in line.rsplit(":", 1)[1].split(",")]
                break
        drain = threading.Thread(target=proc.stderr.read, daemon=True)
        drain.start()  # the rest of its log, or a chatty server blocks on a full pipe
        status = asyncio.run(_translate_once(f"http://127.0.0.1:{port}", token))
        assert status == "completed"
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(60)
        if drain is not None:
            drain.join(10)  # the pipe ends with the process
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    assert proc.returncode == 0
    assert len(children) == 2
    for pid in children:  # reaped by the server: no such process any more
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def _translate_once(url: str, token: str) -> str:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        form = aiohttp.FormData()
        form.add_field("taskType", "translate")
        form.add_field("params", '{"targetLang": "zh", "engine": "pseudo"}')
        form.add_field("file", b"Hello world.", filename="a.txt")
        async with session.post(f"{url}/api/tasks/create", data=form) as resp:
            assert resp.status == 201, await resp.text()
            task_id = (await resp.json())["taskId"]
        async with session.get(f"{url}/api/sse/tasks/{task_id}") as resp:
            messages = await SSEReader(resp).collect_until_final(timeout=60)
        return messages[-1].payload["status"]


def test_a_worker_that_cannot_see_the_servers_files_refuses_to_start(tmp_path: Path) -> None:
    """Another host's worker with the database but not the shared data folder."""
    served, elsewhere = tmp_path / "served", tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "ZHIYI_DB": str(served / "zhiyi.db")}
    made = subprocess.run([sys.executable, "-m", "zhiyi_server", "user", "add", "bob",
                           "--data", str(served)], env=env, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    (served / ".zhiyi-data-id").write_text("written by the server\n")
    for folder, word in ((elsewhere, "missing"), (served, "different")):
        result = subprocess.run(
            [sys.executable, "-m", "zhiyi_server", "worker", "--data", str(folder)],
            env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 1
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith(f"zhiyi: {folder} is not the data folder of this database")
        assert word in last


async def test_workers_back_off_while_another_process_locks_the_database(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A claim that finds the file locked past the busy timeout is a StoreUnavailable:
    the worker waits and claims again instead of dying."""
    path = tmp_path / "zhiyi.db"
    store = await TaskStore.open(path)
    pool = WorkerPool(store, _quick_registry(), WorkerSettings(concurrency=1, poll_seconds=0.1),
                      tmp_path / "data", engine_factory=lambda name: None)  # type: ignore
    locker = sqlite3.connect(path, isolation_level=None)
    try:
        await store.add_user("alice", 5)
        await pool.start()
        locker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        for _ in range(600):
            if "cannot claim tasks" in caplog.text:
                break
            await asyncio.sleep(0.05)
        locker.execute("COMMIT")
        task, _ = await store.create_processing_task(NewTask(
            user_id="alice", task_type="quick", params={}, file_name="a.txt", file_size=1,
            file_path="alice/x", credits_cost=1))
        pool.wake()
        for _ in range(600):
            if (await store.get_task_by_id(task.id)).status is TaskStatus.COMPLETED:
                break
            await asyncio.sleep(0.05)
        assert (await store.get_task_by_id(task.id)).status is TaskStatus.COMPLETED
        assert "cannot claim tasks" in caplog.text
    finally:
        locker.close()
        await pool.stop()
        await store.close()


def _quick_registry() -> Registry:
    registry = default_registry().copy()

    @registry.processor("quick", extensions=(".txt",), parses_document=False)
    async def quick(ctx: TaskContext) -> Path:
        out = ctx.result_path("quick.txt")
        await asyncio.to_thread(out.write_text, "done\n")
        return out

    return registry
