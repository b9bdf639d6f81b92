"""Workers, processors and SSE streams, with controllable test processors."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from helpers import (
    Gates,
    SSEMessage,
    SSEReader,
    add_user,
    create,
    eventually,
    get_task,
    make_registry,
    parse_sse,
    wait_status,
)

from processors import Registry, TaskContext, default_registry
from sse import SSEHub, StreamPlan, encode_event, stream_events
from storage import Event, TaskStatus
from zhiyi_server import CONFIG, HUB, POOL, STORE

pytestmark = pytest.mark.both_stores  # once on SQLite, once on PostgreSQL


@pytest.fixture
def gates() -> Gates:
    return Gates()


@pytest.fixture
async def tclient(make_client, gates: Gates) -> TestClient:
    return await make_client(registry=make_registry(gates), task_timeout_seconds=1.0)


def sse_url(task_id: int) -> str:
    return f"/api/sse/tasks/{task_id}"


async def test_seed_front_end_logic_follows_a_task(tclient: TestClient) -> None:
    """The seed's useTaskStatus: open the SSE URL, parse JSON, act on status_update."""
    headers = await add_user(tclient)
    created = await create(tclient, headers, task_type="steps", params={}, content="abc")
    resp = await tclient.get(created["sseUrl"], headers=headers)
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    assert resp.headers["Cache-Control"] == "no-cache"
    assert resp.headers["X-Accel-Buffering"] == "no"
    reader = SSEReader(resp)
    state = {}
    seen_statuses = []
    for message in await reader.collect_until_final():
        assert message.id is not None and message.id.isdigit()
        if message.type == "status_update":
            state = message.payload
            if not seen_statuses or seen_statuses[-1] != state["status"]:
                seen_statuses.append(state["status"])
    assert reader.retry == 3000
    assert seen_statuses[-1] == "completed"
    assert set(seen_statuses) <= {"pending", "processing", "completed"}
    assert "processing" in seen_statuses
    assert state["progress"] == 100
    result = await tclient.get(state["resultUrl"], headers=headers)
    assert result.status == 200 and await result.read() == b"ABC"


async def test_first_message_is_snapshot_with_latest_event_id(tclient, gates) -> None:
    headers = await add_user(tclient)
    task_id = (await create(tclient, headers, task_type="gate", params={}))["taskId"]
    await gates.started.wait()
    store = tclient.app[STORE]
    async with asyncio.timeout(10):  # progress writes are queued: wait for its commit
        while not [e for e in await store.events_after(0, task_id=task_id)
                   if e.data.get("progress") == 30]:
            await asyncio.sleep(0.01)
    latest = await store.latest_event_id(task_id=task_id)
    resp = await tclient.get(sse_url(task_id), headers=headers)
    reader = SSEReader(resp)
    first = await reader.next()
    assert first.id == str(latest)
    assert first.type == "status_update"
    assert first.payload["status"] == "processing" and first.payload["progress"] == 30
    assert first.payload["taskId"] == task_id
    gates.release.set()
    rest = await reader.collect_until_final()
    assert rest[-1].payload["status"] == "completed"
    assert all(int(m.id) > latest for m in rest)


async def test_a_new_stream_reads_its_start_once_and_misses_nothing(tclient, gates,
                                                                   monkeypatch) -> None:
    """Without Last-Event-ID a task's stream reads the database once for its start (the
    snapshot, its owner and the pruning mark in one statement) and no replay: what commits
    after that read reaches it live, once, in order."""
    headers = await add_user(tclient)
    task_id = (await create(tclient, headers, task_type="gate", params={}))["taskId"]
    await gates.started.wait()
    store = tclient.app[STORE]
    statements: list[str] = []
    for reader in ("_fetchall", "_fetch_point"):  # the reader thread's, the loop's own
        read = getattr(store, reader)

        async def counted(sql: str, args=(), read=read):
            statements.append(sql)
            return await read(sql, args)

        monkeypatch.setattr(store, reader, counted)
    resp = await tclient.get(sse_url(task_id), headers=headers)
    reader = SSEReader(resp)
    first = await reader.next()
    assert first.payload["status"] == "processing"
    about_tasks = [sql for sql in statements
                   if "task_events" in sql or "processing_tasks" in sql or "meta" in sql]
    assert len(set(about_tasks)) == 1, about_tasks  # (a point read may fall back: twice)
    gates.release.set()
    rest = await reader.collect_until_final()
    ids = [int(first.id), *(int(m.id) for m in rest)]
    assert ids == sorted(set(ids))
    assert rest[-1].payload["status"] == "completed"
    committed = [e.id for e in await store.events_after(ids[0], task_id=task_id)]
    assert committed == ids[1:]  # every later event, none twice


async def test_exact_bytes_of_an_event() -> None:
    assert encode_event(7, "status_update", {"taskId": 1, "status": "pending"}) == (
        b'id: 7\ndata: {"type":"status_update","data":{"taskId":1,"status":"pending"}}\n\n')
    # Text goes out as UTF-8, not \u escapes; stored text is framed as is.
    assert encode_event(8, "notification", {"message": "已完成"}) == (
        'id: 8\ndata: {"type":"notification","data":{"message":"已完成"}}\n\n'.encode())
    assert encode_event(9, "notification", {"ignored": True}, raw='{"n":1}') == (
        b'id: 9\ndata: {"type":"notification","data":{"n":1}}\n\n')


async def test_reconnect_with_last_event_id_gets_every_later_event_once(tclient, gates) -> None:
    headers = await add_user(tclient)
    task_id = (await create(tclient, headers, task_type="gate", params={}))["taskId"]
    resp = await tclient.get(sse_url(task_id), headers=headers)
    reader = SSEReader(resp)
    first = await reader.next()
    resp.close()  # the client drops mid-task
    await gates.started.wait()
    gates.release.set()
    await wait_status(tclient, headers, task_id, "completed")
    # Reconnect from the first id: replay everything after it, then the stream ends.
    resp = await tclient.get(sse_url(task_id), headers={**headers,
                                                        "Last-Event-ID": first.id})
    replayed = await SSEReader(resp).collect_until_final()
    store_events = await tclient.app[STORE].events_after(int(first.id), task_id=task_id)
    assert [m.id for m in replayed] == [str(e.id) for e in store_events]
    assert len({m.id for m in replayed}) == len(replayed)
    assert replayed[-1].payload["status"] == "completed"
    # The query-string form works too, and a reconnect after the final event is 204.
    resp = await tclient.get(f"{sse_url(task_id)}?lastEventId={replayed[-1].id}",
                             headers=headers)
    assert resp.status == 204


async def test_live_and_replay_hand_over_without_gap(tclient, gates) -> None:
    headers = await add_user(tclient)
    task_id = (await create(tclient, headers, task_type="steps", params={}))["taskId"]
    resp = await tclient.get(sse_url(task_id), headers={**headers, "Last-Event-ID": "0"})
    messages = await SSEReader(resp).collect_until_final()
    events = await tclient.app[STORE].events_after(0, task_id=task_id)
    assert [int(m.id) for m in messages] == [e.id for e in events]
    progress = [m.payload["progress"] for m in messages if m.payload["status"] == "processing"]
    assert progress == sorted(progress)


async def test_notifications_stream_carries_all_tasks(tclient, gates) -> None:
    headers = await add_user(tclient)
    resp = await tclient.get("/api/sse/notifications", headers={**headers,
                                                                "Last-Event-ID": "0"})
    reader = SSEReader(resp)
    ids = [(await create(tclient, headers, task_type="steps", params={}))["taskId"]
           for _ in range(3)]
    done: set[int] = set()
    while done != set(ids):
        message = await reader.next()
        if message.type == "status_update" and message.payload["status"] == "completed":
            done.add(message.payload["taskId"])
    await tclient.app[STORE].grant_credits("alice", 5)
    while not ((message := await reader.next()).type == "notification"
               and message.payload["message"] == "+5 credits"):
        pass
    assert message.payload["credits"] == 100 - 3 + 5
    resp.close()


async def test_cancel_mid_processing_refunds_and_stops(tclient, gates, config) -> None:
    headers = await add_user(tclient, credits=10)
    task_id = (await create(tclient, headers, task_type="gate", params={}))["taskId"]
    await gates.started.wait()
    resp = await tclient.post(f"/api/tasks/{task_id}/cancel", headers=headers)
    assert resp.status == 200
    assert (await resp.json())["task"]["taskStatus"] == "cancelled"
    await asyncio.wait_for(gates.cancelled.wait(), 5)
    me = await (await tclient.get("/api/me", headers=headers)).json()
    assert me["credits"] == 10
    task = await get_task(tclient, headers, task_id)
    assert task["taskStatus"] == "cancelled" and task["errorCode"] is None
    pool = tclient.app[POOL]
    for _ in range(100):
        if pool.running_count == 0:
            break
        await asyncio.sleep(0.02)
    assert pool.running_count == 0
    assert not any(config.data_path.rglob("partial.txt"))


async def test_delete_running_task_cancels_it(tclient, gates) -> None:
    headers = await add_user(tclient, credits=10)
    task_id = (await create(tclient, headers, task_type="gate", params={}))["taskId"]
    await gates.started.wait()
    resp = await tclient.delete(f"/api/tasks/{task_id}", headers=headers)
    assert resp.status == 200
    await asyncio.wait_for(gates.cancelled.wait(), 5)
    assert (await (await tclient.get("/api/me", headers=headers)).json())["credits"] == 10


async def test_transient_errors_retry_with_growing_delays(tclient, gates) -> None:
    gates.fail_times = 2
    headers = await add_user(tclient)
    task_id = (await create(tclient, headers, task_type="flaky", params={}))["taskId"]
    task = await wait_status(tclient, headers, task_id, "completed", "failed")
    assert task["taskStatus"] == "completed" and task["attempts"] == 3
    events = await tclient.app[STORE].events_after(0, task_id=task_id)
    retries = [e.data["message"] for e in events if e.data["status"] == "pending"
               and "retrying" in e.data["message"]]
    assert retries == ["flaky failure 1; retrying in 0.05 s",
                       "flaky failure 2; retrying in 0.1 s"]


async def test_transient_errors_exhaust_attempts_and_refund(tclient, gates) -> None:
    gates.fail_times = 99
    headers = await add_user(tclient, credits=3)
    task_id = (await create(tclient, headers, task_type="flaky", params={}))["taskId"]
    task = await wait_status(tclient, headers, task_id, "failed")
    assert task["attempts"] == 3 and "Gave up after 3 attempts" in task["errorMessage"]
    assert (await (await tclient.get("/api/me", headers=headers)).json())["credits"] == 3


@pytest.mark.parametrize(("task_type", "code"), [
    ("broken", "bad_document"), ("buggy", "processor_error"), ("hang", "timeout")])
async def test_failures_are_told_apart_and_refunded(tclient, task_type, code) -> None:
    headers = await add_user(tclient, credits=3)
    task_id = (await create(tclient, headers, task_type=task_type, params={}))["taskId"]
    resp = await tclient.get(sse_url(task_id), headers=headers)
    messages = await SSEReader(resp).collect_until_final()
    final = messages[-1].payload
    assert final["status"] == "failed" and final["errorCode"] == code
    assert final["error"]
    task = await get_task(tclient, headers, task_id)
    assert task["errorCode"] == code and task["attempts"] == 1
    assert (await (await tclient.get("/api/me", headers=headers)).json())["credits"] == 3


async def test_progress_writes_are_coalesced(tclient) -> None:
    headers = await add_user(tclient)
    task_id = (await create(tclient, headers, task_type="chatty", params={}))["taskId"]
    await wait_status(tclient, headers, task_id, "completed")
    events = await tclient.app[STORE].events_after(0, task_id=task_id)
    assert len(events) <= 110
    progress = [e.data["progress"] for e in events if e.data["status"] == "processing"]
    assert progress == sorted(progress)
    assert events[-1].data["progress"] == 100


class FakeClock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class SlowEngine:
    """A translation engine on which each batch takes ``seconds`` of fake time."""

    name = "pseudo"
    paid = False

    def __init__(self, clock: FakeClock, seconds: float) -> None:
        self.clock = clock
        self.seconds = seconds
        self.batches: list[int] = []
        #: when set, each batch after the first waits for one token (lockstep with a test)
        self.go: asyncio.Queue[None] | None = None

    async def translate(self, texts, source: str, target: str) -> list[str]:
        if self.go is not None and self.batches:
            await self.go.get()
        self.clock.now += self.seconds
        self.batches.append(len(texts))
        return [text.upper() for text in texts]


async def slow_translation_client(make_client, seconds: float) -> tuple[TestClient, SlowEngine]:
    # One batch at a time: the fake clock then moves as a sequence of batches would.
    client = await make_client(engine_concurrency=1)
    clock = FakeClock()
    engine = SlowEngine(clock, seconds)
    pool = client.app[POOL]
    pool.clock = clock
    pool.engine_factory = lambda name: engine
    return client, engine


#: 200 one-line paragraphs: 8 batches of 25 segments, 12.5 percent each
TWO_HUNDRED_SEGMENTS = "".join(f"Segment number {i}.\n\n" for i in range(200))


@pytest.mark.parametrize(("seconds_per_batch", "expected"), [
    # Every batch is past the 0.25 s interval: one write per batch; 100 % shows as 98
    # (the last percent is left for writing the document).
    (1.0, [0, 12, 25, 37, 50, 62, 75, 87, 98]),
    # 0.1 s per batch: written after batches 3 and 6 (0.3 s since the last write each);
    # batches 7 and 8 are 0.1 and 0.2 s after, so the next write is the writing stage.
    (0.1, [0, 37, 75]),
    # No time passes: only the stage change writes.
    (0.0, [0]),
])
async def test_progress_count_follows_the_coalescing_rule(
        make_client, seconds_per_batch: float, expected: list[int]) -> None:
    client, engine = await slow_translation_client(make_client, seconds_per_batch)
    headers = await add_user(client)
    task_id = (await create(client, headers, content=TWO_HUNDRED_SEGMENTS))["taskId"]
    resp = await client.get(sse_url(task_id), headers={**headers, "Last-Event-ID": "0"})
    messages = await SSEReader(resp).collect_until_final()
    assert engine.batches == [25] * 8
    stages = [(m.payload["stage"], m.payload["progress"]) for m in messages
              if m.payload["status"] == "processing"]
    # No "parsing": the attempt uses the parse made at create (see test_sandbox.py).
    assert stages == [("starting", 0)] + [("translating", p) for p in expected] + [
        ("writing", 99)]
    assert messages[-1].payload["status"] == "completed"
    assert messages[-1].payload["progress"] == 100


async def test_progress_arrives_live_before_completion(make_client) -> None:
    """Each batch waits until the test has read the previous batch's progress live."""
    client, engine = await slow_translation_client(make_client, 1.0)
    engine.go = asyncio.Queue()
    headers = await add_user(client)
    task_id = (await create(client, headers, content=TWO_HUNDRED_SEGMENTS))["taskId"]
    reader = SSEReader(await client.get(sse_url(task_id), headers=headers))
    seen: list[int] = []
    while (message := await reader.next()) is not None:
        payload = message.payload
        if payload["status"] == "processing" and payload["stage"] == "translating":
            seen.append(payload["progress"])
            if payload["progress"] > 0:  # the engine is now held before its next batch
                assert len(engine.batches) == len(seen) - 1
                engine.go.put_nowait(None)
    assert seen == [0, 12, 25, 37, 50, 62, 75, 87, 98]
    assert payload["status"] == "completed"


class StuckReader:
    """A notifications stream on a raw socket that is never read, with small kernel buffers.

    Its receive buffer and the server side's send buffer are a few KiB (the send
    buffer would otherwise grow to megabytes), so what the server writes backs up
    in the server's own transport after a few KiB.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    async def open(cls, client: TestClient, authorization: str) -> StuckReader:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, (client.host, client.port))
        await loop.sock_sendall(sock, (
            f"GET /api/sse/notifications HTTP/1.1\r\nHost: {client.host}\r\n"
            f"Authorization: {authorization}\r\n\r\n").encode())
        return cls(sock)

    def shrink_server_send_buffer(self, hub: SSEHub) -> None:
        """Set the server side of this connection to a small, fixed send buffer."""
        me = self.sock.getsockname()
        (sub,) = [s for s in hub.subscribers()
                  if s.transport is not None and s.transport.get_extra_info("peername") == me]
        sub.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

    async def read_to_end(self) -> list[SSEMessage]:
        """Everything the server sent, up to the end of the chunked body."""
        loop = asyncio.get_running_loop()
        raw = b""
        while not raw.endswith(b"\r\n0\r\n\r\n"):
            data = await asyncio.wait_for(loop.sock_recv(self.sock, 1 << 16), 10)
            if not data:
                break
            raw += data
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding: chunked" in head
        return parse_sse(dechunk(body))

    def close(self) -> None:
        self.sock.close()


def dechunk(body: bytes) -> bytes:
    out, rest = bytearray(), body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out += rest[:size]
        assert rest[size:size + 2] == b"\r\n"
        rest = rest[size + 2:]
    return bytes(out)


async def test_a_reader_whose_socket_backs_up_is_dropped_and_the_others_get_all(
        idle_client: TestClient) -> None:
    headers = await add_user(idle_client)
    store, hub = idle_client.app[STORE], idle_client.app[HUB]
    await create(idle_client, headers)
    task = await store.claim_next_task("test", 60)
    assert task is not None
    stuck = await StuckReader.open(idle_client, headers["Authorization"])
    try:
        live = SSEReader(await idle_client.get("/api/sse/notifications", headers=headers))
        await eventually(lambda: sum(s.transport is not None for s in hub.subscribers()) == 2,
                         "both streams live")
        stuck.shrink_server_send_buffer(hub)
        # 200 events of 8 KB: 1.6 MB, far past the 64 KiB bound plus the kernel's few KiB.
        count, padding = 200, "x" * 8000
        for i in range(count):
            written = store.queue_task_status(task.id, task.attempts, progress=i // 2,
                                              message=f"{i} {padding}")
        assert await written
        # The live reader gets every event, in order, while the stuck one has read nothing:
        # publishing never waited for it.
        got = []
        while len(got) < count:
            message = await live.next()
            if message.type == "status_update" and message.payload["message"].endswith(padding):
                got.append(message)
        assert [int(m.payload["message"].split()[0]) for m in got] == list(range(count))
        ids = [int(m.id) for m in got]
        assert ids == sorted(ids)
        # The stuck one was dropped (counted once) and no longer takes events ...
        await eventually(lambda: hub.connection_count == 1, "the stuck stream ended")
        metrics = await (await idle_client.get("/metrics")).text()
        assert "zhiyi_sse_slow_clients_dropped_total 1.0" in metrics
        # ... and its stream ended early with a gap-free prefix, from which it can resume.
        received = [int(m.id) for m in await stuck.read_to_end()
                    if m.type == "status_update" and m.payload["message"].endswith(padding)]
        assert 0 < len(received) < count and received == ids[:len(received)]
        resumed = SSEReader(await idle_client.get("/api/sse/notifications", headers={
            **headers, "Last-Event-ID": str(received[-1])}))
        rest = [int((await resumed.next()).id) for _ in range(count - len(received))]
        assert rest == ids[len(received):]
        resumed.response.close()
        live.response.close()
    finally:
        stuck.close()


def test_hub_drops_a_subscriber_that_falls_behind() -> None:
    from storage import Event

    drops: list[int] = []
    delivered: list[int] = []
    hub = SSEHub(buffer_size=8, on_drop=lambda: drops.append(1), on_publish=delivered.append)
    slow = hub.subscribe("alice")
    fast = hub.subscribe("alice")
    for i in range(1, 21):
        hub.publish(Event(i, None, "alice", "notification", {"n": i}))
        while fast.buffer:  # the fast reader keeps up
            fast.buffer.popleft()
    assert slow.overflowed and not fast.overflowed
    assert drops == [1]  # counted once, not once per later event
    assert delivered == [2] * 8 + [1] * 12  # the 9th does not fit: from there, one copy
    hub.unsubscribe(slow)
    hub.unsubscribe(fast)
    assert hub.connection_count == 0


async def test_stream_limits(make_client) -> None:
    client = await make_client(sse_max_per_user=2, sse_max_total=3, worker_concurrency=0)
    alice = await add_user(client, "alice")
    bob = await add_user(client, "bob")
    carol = await add_user(client, "carol")
    streams = [await client.get("/api/sse/notifications", headers=alice) for _ in range(2)]
    resp = await client.get("/api/sse/notifications", headers=alice)
    assert resp.status == 429 and (await resp.json())["code"] == "too_many_streams"
    streams.append(await client.get("/api/sse/notifications", headers=bob))
    resp = await client.get("/api/sse/notifications", headers=carol)
    assert resp.status == 503
    for s in streams:
        s.close()
    for _ in range(100):
        if client.app[HUB].connection_count == 0:
            break
        await asyncio.sleep(0.02)
    assert client.app[HUB].connection_count == 0


async def test_heartbeat_comment(make_client) -> None:
    client = await make_client(sse_heartbeat_seconds=0.05, worker_concurrency=0)
    headers = await add_user(client)
    resp = await client.get("/api/sse/notifications", headers=headers)
    lines = []
    while (line := await asyncio.wait_for(resp.content.readline(), 10)) != b": ping\n":
        lines.append(line)
    assert lines == [b"retry: 3000\n", b"\n"]  # no user task yet: no snapshot, then pings
    assert await resp.content.readline() == b"\n"
    resp.close()


async def test_many_tasks_many_subscribers(make_client, gates) -> None:
    client = await make_client(registry=make_registry(gates), worker_concurrency=8,
                               sse_max_per_user=200)
    headers = await add_user(client, credits=1000)
    ids = [(await create(client, headers, task_type="steps", params={}))["taskId"]
           for _ in range(100)]

    async def follow(task_id: int) -> list[int]:
        resp = await client.get(sse_url(task_id), headers={**headers, "Last-Event-ID": "0"})
        messages = await SSEReader(resp).collect_until_final(timeout=60)
        assert messages[-1].payload["status"] == "completed"
        return [m.payload["progress"] for m in messages
                if m.payload["status"] == "processing"]

    for progress in await asyncio.gather(*(follow(i) for i in ids)):
        assert progress == sorted(progress)


async def test_processor_cancellation_propagates(tclient, gates) -> None:
    """CancelledError is never swallowed by the runner: stopping the pool stops the job."""
    headers = await add_user(tclient)
    task_id = (await create(tclient, headers, task_type="gate", params={}))["taskId"]
    await gates.started.wait()
    pool = tclient.app[POOL]
    await pool.stop()
    assert gates.cancelled.is_set()
    task = await tclient.app[STORE].get_task_by_id(task_id)
    # Handed back to the queue for the next start, the attempt not counted.
    assert (task.status, task.attempts) == (TaskStatus.PENDING, 0)


async def test_retention_expires_files_and_old_history_resets(make_client, gates) -> None:
    client = await make_client(registry=make_registry(gates), retention_days=0)
    headers = await add_user(client)
    task_id = (await create(client, headers, task_type="steps", params={}))["taskId"]
    await wait_status(client, headers, task_id, "completed")
    first_event = (await client.app[STORE].events_after(0, task_id=task_id))[0].id
    await client.app[POOL].reconcile()
    resp = await client.get(f"/api/tasks/{task_id}/result", headers=headers)
    assert resp.status == 410 and (await resp.json())["code"] == "expired"
    task = await get_task(client, headers, task_id)
    assert task["taskStatus"] == "completed" and task["expired"] is True
    # A replay from before the kept history starts with a reset carrying the state.
    resp = await client.get("/api/sse/notifications",
                            headers={**headers, "Last-Event-ID": str(first_event)})
    first = await SSEReader(resp).next()
    assert first.type == "reset"
    assert first.payload["taskId"] == task_id and first.payload["status"] == "completed"
    resp.close()
    resp = await client.post(f"/api/tasks/{task_id}/retry", headers=headers)
    assert resp.status == 409


async def test_shutdown_ends_streams_and_hands_tasks_back(make_client, gates) -> None:
    client = await make_client(registry=make_registry(gates))
    headers = await add_user(client)
    task_id = (await create(client, headers, task_type="gate", params={}))["taskId"]
    await gates.started.wait()
    stream = await client.get("/api/sse/notifications", headers=headers)
    reader = SSEReader(stream)
    await reader.next()
    store = client.app[STORE]
    await client.app.shutdown()
    while await reader.next() is not None:  # events already queued, then the end
        pass
    await client.app[POOL].stop()
    assert gates.cancelled.is_set()
    assert (await store.get_task_by_id(task_id)).status is TaskStatus.PENDING


async def test_metrics_after_work(tclient) -> None:
    headers = await add_user(tclient)
    task_id = (await create(tclient, headers, task_type="steps", params={}))["taskId"]
    await wait_status(tclient, headers, task_id, "completed")
    # The runner counts the attempt just after the completion commits: a reader can see
    # the task completed a moment before the counter moves.
    attempts = 'zhiyi_task_attempts_total{outcome="completed",task_type="steps"} 1.0'
    async with asyncio.timeout(10):
        while attempts not in (text := await (await tclient.get("/metrics")).text()):
            await asyncio.sleep(0.01)
    assert 'zhiyi_tasks{status="completed",task_type="steps"} 1.0' in text
    assert "zhiyi_processing_seconds_bucket" in text
    assert "zhiyi_sse_events_published_total" in text


def test_registry_refuses_duplicates_and_plain_functions() -> None:
    registry = Registry()

    @registry.processor("once", extensions=(".txt",))
    async def once(ctx: TaskContext) -> Path:
        raise AssertionError("never run")

    with pytest.raises(ValueError, match="already registered"):
        registry.processor("once", extensions=(".txt",))(once)
    with pytest.raises(TypeError, match="async function"):
        registry.processor("sync", extensions=(".txt",))(lambda ctx: ctx)  # type: ignore[arg-type]
    assert "once" in registry and "sync" not in registry
    assert "translate" in default_registry() and "once" not in default_registry()


class RecordingTransport:
    """Stands in for a socket whose peer stopped reading: everything stays buffered."""

    def __init__(self, closing: bool = False) -> None:
        self.written = bytearray()
        self.closing = closing

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return len(self.written)


def test_live_streams_get_chunks_written_directly_until_they_back_up() -> None:
    from storage import Event

    drops: list[int] = []
    delivered: list[int] = []
    hub = SSEHub(buffer_size=8, on_drop=lambda: drops.append(1), on_publish=delivered.append)
    sub = hub.subscribe("alice")
    transport = RecordingTransport()
    sub.go_live(transport, chunked=True, last_id=0, ends_on_final=False)  # type: ignore[arg-type]
    hub.publish(Event(1, None, "alice", "notification", {"n": 1}))
    message = encode_event(1, "notification", {"n": 1})
    assert bytes(transport.written) == b"%x\r\n" % len(message) + message + b"\r\n"
    big = {"text": "x" * 4000}
    for i in range(2, 40):
        hub.publish(Event(i, None, "alice", "notification", big))
    assert sub.overflowed and drops == [1]  # past 64 KiB unsent: dropped, counted once
    size = len(transport.written)
    hub.publish(Event(41, None, "alice", "notification", big))
    assert len(transport.written) == size  # nothing more is written to a dropped stream
    # Every write that went out counts as delivered, the one that overflowed included.
    sent = delivered.index(0)
    assert sent > 2 and delivered == [1] * sent + [0] * (len(delivered) - sent)
    assert size == sum(len(b"%x\r\n\r\n" % len(m)) + len(m) for m in [message] + [
        encode_event(i, "notification", big) for i in range(2, sent + 1)])


def test_streams_whose_client_left_take_nothing_and_end() -> None:
    from storage import Event

    delivered: list[int] = []
    hub = SSEHub(buffer_size=8, on_publish=delivered.append)
    gone, pinged, closed = (hub.subscribe("alice") for _ in range(3))
    for sub in (gone, pinged):
        sub.go_live(RecordingTransport(closing=True), chunked=True,  # type: ignore[arg-type]
                    last_id=0, ends_on_final=False)
    closed.close()
    pinged.ping()  # the heartbeat finds the client gone
    assert pinged.closed and pinged.wakeup.is_set()
    hub.publish(Event(1, None, "alice", "notification", {"n": 1}))
    assert delivered == [0]  # neither the gone, the pinged nor the closed one took it
    assert gone.closed and gone.wakeup.is_set() and not closed.buffer


def test_closing_a_live_stream_tells_it_when_to_come_back() -> None:
    hub = SSEHub()
    live, waiting = hub.subscribe("alice"), hub.subscribe("alice")
    transport = RecordingTransport()
    live.go_live(transport, chunked=True, last_id=0, ends_on_final=False)  # type: ignore[arg-type]
    live.close(retry_ms=2500)
    waiting.close(retry_ms=2500)  # still replaying: its handler ends it, nothing written here
    live.close(retry_ms=2500)  # already closed: nothing more
    assert bytes(transport.written) == b"d\r\nretry: 2500\n\n\r\n"
    assert live.closed and waiting.closed and not waiting.buffer
    plain = hub.subscribe("alice")
    quiet = RecordingTransport()
    plain.go_live(quiet, chunked=True, last_id=0, ends_on_final=False)  # type: ignore[arg-type]
    plain.close()
    assert plain.closed and quiet.written == b""


def status_event(event_id: int, status: str = "processing") -> Event:
    data = {"taskId": 7, "status": status, "progress": event_id}
    return Event(event_id, 7, "alice", "status_update", data,
                 json.dumps(data, separators=(",", ":")))


@pytest.mark.parametrize(("ends_on_final", "expected"), [
    (True, [1, 2, 3, 4, 5, 6, 7, 8]),  # a task stream ends with its final event
    (False, [1, 2, 3, 4, 5, 6, 7, 8, 9]),  # a notifications stream goes on
])
async def test_events_published_during_the_replay_are_sent_once_in_order(
        aiohttp_client, ends_on_final: bool, expected: list[int]) -> None:
    """Events committed while the replay is read reach the stream once, after it, in order."""
    hub = SSEHub()
    stored = [status_event(i) for i in range(1, 6)]
    meanwhile = [stored[3], stored[4], status_event(6), status_event(7),
                 status_event(8, "completed"), status_event(9)]

    async def replay(after: int) -> list[Event]:
        if after == 0:  # while the one page is read, 4 and 5 (in it) and 6-9 commit
            for event in meanwhile:
                hub.publish(event)
        return [e for e in stored if e.id > after]

    async def handler(request: web.Request) -> web.StreamResponse:
        sub = hub.subscribe("alice", 7)
        try:
            return await stream_events(request, sub, StreamPlan([], 0, replay, ends_on_final))
        finally:
            hub.unsubscribe(sub)

    app = web.Application()
    app.router.add_get("/stream", handler)
    client = await aiohttp_client(app)
    reader = SSEReader(await client.get("/stream"))
    got = [await reader.next(timeout=5) for _ in expected]
    assert [int(m.id) for m in got] == expected
    assert [(m.type, m.payload["progress"]) for m in got] == [
        ("status_update", i) for i in expected]
    if ends_on_final:
        assert await reader.next(timeout=5) is None
    else:
        hub.publish(status_event(10))  # live from here on
        assert int((await reader.next(timeout=5)).id) == 10
        reader.response.close()


async def test_replay_spans_several_pages_without_gaps(idle_client) -> None:
    headers = await add_user(idle_client, credits=0)
    store = idle_client.app[STORE]
    await asyncio.gather(*(store.grant_credits("alice", 1) for _ in range(1200)))
    expected = [e.id for e in await store.events_after(0, user_id="alice", limit=10_000)]
    assert len(expected) == 1200
    resp = await idle_client.get("/api/sse/notifications",
                                 headers={**headers, "Last-Event-ID": "0"})
    reader = SSEReader(resp)
    got = [int((await reader.next()).id) for _ in range(1200)]
    assert got == expected
    resp.close()


async def test_a_completed_task_keeps_one_sharded_folder_without_work_files(
        client: TestClient) -> None:
    headers = await add_user(client)
    task_id = (await create(client, headers))["taskId"]
    await wait_status(client, headers, task_id, "completed")
    task = await client.app[STORE].get_task_by_id(task_id)
    user, shard, key = task.file_path.split("/")
    assert (user, shard) == ("alice", key[:2]) and len(key) == 32
    base = client.app[CONFIG].data_path / task.file_path
    # The worker removes the work folder right after the completion commits (which
    # wait_status may see first).
    await eventually(lambda: not (base / "work").exists(), "the work folder removed")
    assert sorted(p.name for p in base.iterdir()) == ["original", "result"]
