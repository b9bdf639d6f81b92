"""The load generator: client processes driven over a pipe by fanout.py and tasks.py.

Fan-out clients hold many SSE connections each on raw ``asyncio.Protocol``
objects (no HTTP client library: a connection costs a socket, a small object
and a regex scan per read). A read is scanned for the publish stamps
``@ts=<monotonic ns>@``; the latency of each event is the receipt time of the
read minus its stamp. Chunked transfer framing needs no parsing: a stamp is
self-delimiting and never spans two chunks (one server write is one chunk).

Task clients run ``c`` loops with aiohttp: create a task (multipart), open its
SSE stream, read until the final ``status_update``, and record the time from
the create request to that event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from array import array
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import aiohttp
from pacing import STAMP_RE

__all__ = ["fanout_client", "tasks_client"]

logger = logging.getLogger(__name__)

FINAL = frozenset({b"completed", b"failed", b"cancelled"})
#: longer than any stamp ``@ts=<20 digits>@``
STAMP_MAX = 32


# ------------------------------------------------------------------ fan-out
@dataclass
class FanoutStats:
    """What one client process saw since the last reset."""

    latencies: array[int] = field(default_factory=lambda: array("q"))
    received: int = 0
    lost: int = 0
    first_ns: int = 0
    last_ns: int = 0

    def summary(self) -> dict[str, int]:
        return {"received": self.received, "lost": self.lost, "first_ns": self.first_ns,
                "last_ns": self.last_ns}


class SSEProtocol(asyncio.Protocol):
    """One subscriber connection: sends the GET, checks the status, counts stamped events."""

    def __init__(self, request: bytes, stats: FanoutStats, ready: asyncio.Future[None]) -> None:
        self.request = request
        self.stats = stats
        self.ready = ready
        self.head = b""
        self.tail = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if not self.ready.done():
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            status_line = self.head.split(b"\r\n", 1)[0]
            if b" 200 " not in status_line:
                self.ready.set_exception(ConnectionError(status_line.decode(errors="replace")))
                return
            self.ready.set_result(None)
            data, self.head = self.head[end + 4:], b""
        self._body(data)

    def _body(self, data: bytes) -> None:
        buf = self.tail + data if self.tail else data
        now = time.monotonic_ns()
        stats = self.stats
        n = done = 0
        for match in STAMP_RE.finditer(buf):
            stats.latencies.append(now - int(match.group(1)))
            n += 1
            done = match.end()
        # Stamps are self-delimiting; keep only what may hold the start of a cut one.
        self.tail = buf[max(done, len(buf) - STAMP_MAX):]
        if n:
            stats.received += n
            stats.last_ns = now
            if not stats.first_ns:
                stats.first_ns = now

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("closed before the response"))
        elif self.transport is not None:
            self.stats.lost += 1
        self.transport = None


class FanoutClient:
    def __init__(self) -> None:
        self.stats = FanoutStats()
        self.protocols: list[SSEProtocol] = []

    async def connect(self, host: str, port: int, path: str, headers: dict[str, str],
                      count: int, parallel: int) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Accept: text/event-stream",
                 *(f"{k}: {v}" for k, v in headers.items())]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode()
        gate = asyncio.Semaphore(parallel)

        async def one() -> None:
            async with gate:
                ready: asyncio.Future[None] = loop.create_future()
                _, proto = await loop.create_connection(
                    lambda: SSEProtocol(request, self.stats, ready), host, port)
                self.protocols.append(proto)
                await asyncio.wait_for(ready, 60)

        results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
        errors = [repr(r) for r in results if isinstance(r, BaseException)]
        return {"connected": count - len(errors), "errors": errors[:5]}

    def disconnect(self) -> None:
        for proto in self.protocols:
            if proto.transport is not None:
                transport, proto.transport = proto.transport, None
                transport.abort()
        self.protocols.clear()

    def reset(self) -> None:
        self.stats = FanoutStats(lost=self.stats.lost)
        for proto in self.protocols:
            proto.stats = self.stats


async def _serve_fanout(conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    client = FanoutClient()
    while True:
        command, arg = await loop.run_in_executor(None, conn.recv)
        reply: Any = True
        if command == "connect":
            reply = await client.connect(**arg)
        elif command == "reset":
            client.reset()
        elif command == "stats":
            reply = client.stats.summary()
        elif command == "collect":
            reply = (client.stats.summary(), client.stats.latencies.tobytes())
        elif command == "disconnect":
            client.disconnect()
            await asyncio.sleep(0.1)
        elif command == "exit":
            client.disconnect()
            conn.send(True)
            return
        conn.send(reply)


def fanout_client(conn: Connection) -> None:
    """Process entry point: serve commands from the orchestrator until ``exit``."""
    asyncio.run(_serve_fanout(conn))


# -------------------------------------------------------------------- tasks
@dataclass
class TaskResult:
    start_ns: int
    end_ns: int
    events: int
    status: str


async def _follow(content: aiohttp.StreamReader) -> tuple[int, str]:
    """Read an SSE body until a final status; (events with data, final status)."""
    raw, buf, events = b"", b"", 0
    async for chunk in content.iter_any():
        raw += chunk
        if raw.endswith(b"\r"):
            continue
        # aiohttp-sse separates lines with CRLF, the others with LF.
        buf, raw = buf + raw.replace(b"\r\n", b"\n"), b""
        while (end := buf.find(b"\n\n")) >= 0:
            block, buf = buf[:end], buf[end + 2:]
            for line in block.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                events += 1
                status = json.loads(line[5:]).get("data", {}).get("status", "")
                if status.encode() in FINAL:
                    return events, status
    return events, "stream ended"


async def _one_task(session: aiohttp.ClientSession, base: str, headers: dict[str, str],
                    body: bytes) -> TaskResult:
    start = time.monotonic_ns()
    form = aiohttp.FormData()
    form.add_field("taskType", "bench")
    form.add_field("file", body, filename="doc.txt", content_type="text/plain")
    async with session.post(base + "/api/tasks/create", data=form, headers=headers) as resp:
        created = await resp.json()
        if resp.status not in (200, 201):
            return TaskResult(start, time.monotonic_ns(), 0, f"create {resp.status}")
    async with session.get(base + created["sseUrl"], headers=headers) as resp:
        if resp.status != 200:
            detail = (await resp.text())[:200]
            return TaskResult(start, time.monotonic_ns(), 0,
                              f"stream {resp.status} task {created.get('taskId')}: {detail}")
        events, status = await _follow(resp.content)
    return TaskResult(start, time.monotonic_ns(), events, status)


async def run_tasks(base: str, headers: dict[str, str], m: int, c: int) -> list[TaskResult]:
    """``m`` tasks by ``c`` concurrent loops; every result, errors included."""
    body = b"Benchmark document.\n" * 20
    results: list[TaskResult] = []
    remaining = iter(range(m))
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=timeout) as session:

        async def loop() -> None:
            for _ in remaining:
                try:
                    results.append(await _one_task(session, base, headers, body))
                except (aiohttp.ClientError, TimeoutError) as e:
                    now = time.monotonic_ns()
                    results.append(TaskResult(now, now, 0, f"error {e!r}"))

        await asyncio.gather(*(loop() for _ in range(c)))
    return results


async def _serve_tasks(conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    while True:
        command, arg = await loop.run_in_executor(None, conn.recv)
        if command == "exit":
            conn.send(True)
            return
        results = await run_tasks(**arg)
        conn.send([(r.start_ns, r.end_ns, r.events, r.status) for r in results])


def tasks_client(conn: Connection) -> None:
    """Process entry point: run task batches on command until ``exit``."""
    asyncio.run(_serve_tasks(conn))
