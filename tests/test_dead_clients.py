"""A thousand streams, a tenth of which never read: the dead ones are dropped, the readers
get every event in order, and the server's memory stays bounded.

A real server process on 127.0.0.1 with 1,000 notification streams: 900 of alice's read
(aiohttp), 100 of bob's are raw sockets with a tiny receive buffer that never read. Events
are written by another process's store (this test's) on the same database, as a worker
process would; the server tails them and pushes them to every stream. Bob's events are
large (8 KB of progress message each), so the dead streams back up past the kernel's
buffers; alice's readers meanwhile get every one of theirs.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
from pathlib import Path

import aiohttp
import pytest
from helpers import ServerProcess, free_port, make_user, new_task

from storage import TaskStore

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

READERS = 900
DEAD = 100
EVENTS = 600  # small ones, for the readers
BIG_EVENTS = 600  # of 8 KB, for the dead: 4.8 MB each, past the kernel's 4 MB send buffer
#: figures of the last run, for RELIABILITY.md (test-results/ is not committed)
RESULTS = Path(__file__).resolve().parent.parent / "test-results"
#: the server may grow by at most this while holding 1,000 streams and the dead ones' backlog
RSS_BOUND_MB = 200


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]


def dead_client(port: int, token: str) -> socket.socket:
    """Opens a stream and never reads it; a tiny receive buffer backs the server up soon."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET /api/sse/notifications HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                 f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n".encode())
    return sock


async def metric(session: aiohttp.ClientSession, url: str, name: str) -> float:
    async with session.get(f"{url}/metrics") as resp:
        text = await resp.text()
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    assert match, name
    return float(match.group(1))


async def test_dead_streams_are_dropped_and_readers_get_everything(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    token = await make_user(data, 0)
    bob = await _bob_with_a_task(data)
    server = ServerProcess(free_port(), data, env={
        "WORKER_CONCURRENCY": "0", "SSE_MAX_PER_USER": "2000", "SSE_HEARTBEAT_SECONDS": "3600",
        # A stream 16 events (64 KiB unsent) behind is too slow: the dead ones back up soon.
        "SSE_BUFFER_EVENTS": "16"})
    server.start()
    dead: list[socket.socket] = []
    try:
        headers = {"Authorization": f"Bearer {token}"}
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=None)
        async with aiohttp.ClientSession(headers=headers, connector=connector,
                                         timeout=timeout) as session:
            streams = [await session.get(f"{server.url}/api/sse/notifications")
                       for _ in range(READERS)]
            assert {s.status for s in streams} == {200}
            dead = [dead_client(server.port, bob) for _ in range(DEAD)]
            await _until(lambda: metric(session, server.url, "zhiyi_sse_connections"),
                         READERS + DEAD)
            before = rss_mb(server.proc.pid)  # type: ignore[union-attr]

            store = await TaskStore.open(data / "zhiyi.db")
            try:
                task = await store.claim_next_task("test", 600)
                assert task is not None
                padding = "x" * 8000
                for start in range(0, EVENTS, 100):  # a hundred writes per transaction batch
                    await asyncio.gather(*(store.grant_credits("alice", 1)
                                           for _ in range(start, start + 100)))
                    for i in range(start * BIG_EVENTS // EVENTS, (start + 100) * BIG_EVENTS
                                   // EVENTS):
                        written = store.queue_task_status(task.id, task.attempts,
                                                          progress=0, message=f"{i} {padding}")
                    await written
                last_id = await store.latest_event_id(user_id="alice")
            finally:
                await store.close()

            received = await asyncio.gather(*(_read_until(s, last_id) for s in streams))
            peak = rss_mb(server.proc.pid)  # type: ignore[union-attr]
            dropped = await metric(session, server.url, "zhiyi_sse_slow_clients_dropped_total")
            open_now = await metric(session, server.url, "zhiyi_sse_connections")
            for stream in streams:
                stream.close()
    finally:
        for sock in dead:
            sock.close()
        server.stop()

    for ids in received:
        assert len(ids) == EVENTS and ids == sorted(set(ids)), "every event once, in order"
    assert dropped == DEAD, "every dead stream, and only those, was dropped"
    assert open_now == READERS
    assert peak - before < RSS_BOUND_MB, (before, peak)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dead_clients.json").write_text(json.dumps({
        "streams": READERS + DEAD, "dead": DEAD, "dropped": dropped,
        "events_per_reader": EVENTS, "events_lost": 0,
        "server_rss_mb_before": round(before, 1), "server_rss_mb_peak": round(peak, 1)},
        indent=2) + "\n")


async def _read_until(response: aiohttp.ClientResponse, last_id: int) -> list[int]:
    """The event ids of a stream up to ``last_id``, scanned from the raw bytes (a full SSE
    parse of 900 x 1,500 messages would make the test slow, not stricter: the framing is
    tested elsewhere)."""
    ids: list[int] = []
    carry = b""
    async for chunk in response.content.iter_any():
        lines = (carry + chunk).split(b"\n")
        carry = lines.pop()
        ids += [int(line[4:]) for line in lines if line.startswith(b"id: ")]
        if ids and ids[-1] >= last_id:
            return ids
    raise AssertionError("a reader's stream ended early")


async def _bob_with_a_task(data: Path) -> str:
    store = await TaskStore.open(data / "zhiyi.db")
    try:
        await store.add_user("bob", 10)
        await store.create_processing_task(new_task("bob"))
        return await store.issue_token("bob")
    finally:
        await store.close()


async def _until(value, expected: float, attempts: int = 600) -> None:
    """Poll (a bounded number of times, not a time limit) until ``value()`` is ``expected``."""
    for _ in range(attempts):
        if await value() == expected:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never reached {expected}")
