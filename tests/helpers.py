"""Shared test helpers: users, uploads, polling, SSE reading with the client's parser,
controllable test processors, and real servers in subprocesses (test modules import
from here, never from each other)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import docx
from aiohttp.test_utils import TestClient
from page_helpers import free_port as free_port  # the one free_port, re-exported

from client import SSEMessage as WireMessage
from client import SSEParser
from processors import PermanentError, Registry, TaskContext, TransientError, default_registry
from storage import NewTask, open_store
from zhiyi_server import STORE


def new_task(user: str, cost: int = 1, key: str | None = None) -> NewTask:
    """A small translate task of ``user`` for the store on its own."""
    return NewTask(user_id=user, task_type="translate", params={"targetLang": "zh"},
                   file_name="a.txt", file_size=3, file_path=f"{user}/x", credits_cost=cost,
                   idempotency_key=key)


async def add_user(client: TestClient, name: str = "alice", credits: int = 100) -> dict[str, str]:
    """Create a user in the app's store; returns the Authorization header for it."""
    store = client.app[STORE]
    await store.add_user(name, credits)
    return {"Authorization": f"Bearer {await store.issue_token(name)}"}


def form(
    content: bytes | str = b"Hello world.\n\nSecond paragraph.\n",
    *,
    name: str = "doc.txt",
    task_type: str = "translate",
    params: dict[str, Any] | str | None = None,
) -> aiohttp.FormData:
    data = aiohttp.FormData()
    data.add_field("taskType", task_type)
    if params is None and task_type == "translate":
        params = {"targetLang": "zh", "engine": "pseudo"}
    if params is not None:
        data.add_field("params", params if isinstance(params, str) else json.dumps(params))
    raw = content.encode() if isinstance(content, str) else content
    data.add_field("file", io.BytesIO(raw), filename=name,
                   content_type="application/octet-stream")
    return data


async def create(client: TestClient, headers: dict[str, str], **kwargs: Any) -> dict[str, Any]:
    """Create a task and assert 201; returns the JSON body."""
    extra = kwargs.pop("extra_headers", {})
    resp = await client.post("/api/tasks/create", data=form(**kwargs), headers={**headers, **extra})
    body = await resp.json()
    assert resp.status == 201, body
    return body


async def get_task(client: TestClient, headers: dict[str, str], task_id: int) -> dict[str, Any]:
    resp = await client.get(f"/api/tasks/{task_id}", headers=headers)
    assert resp.status == 200
    return (await resp.json())["task"]


async def wait_status(
    client: TestClient, headers: dict[str, str], task_id: int, *statuses: str,
    timeout: float = 30,
) -> dict[str, Any]:
    """Poll until the task is in one of ``statuses``."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        task = await get_task(client, headers, task_id)
        if task["taskStatus"] in statuses:
            return task
        if loop.time() > end:
            raise AssertionError(f"task {task_id} stuck in {task['taskStatus']}: {task}")
        await asyncio.sleep(0.02)


@dataclass
class SSEMessage:
    """One dispatched message of a Zhiyi stream, its data parsed as JSON."""

    id: str | None
    data: dict[str, Any]

    @classmethod
    def from_wire(cls, message: WireMessage) -> SSEMessage:
        return cls(message.id, json.loads(message.data))

    @property
    def type(self) -> str:
        return self.data["type"]

    @property
    def payload(self) -> dict[str, Any]:
        return self.data["data"]


def parse_sse(body: bytes) -> list[SSEMessage]:
    """Every message of a whole ``text/event-stream`` body, parsed by ``client.SSEParser``."""
    parser = SSEParser()
    return [SSEMessage.from_wire(m) for m in [*parser.feed(body), *parser.end()]]


class SSEReader:
    """Reads a streaming response with the one parser the client uses (``client.SSEParser``)."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.parser = SSEParser()
        self._ready: deque[SSEMessage] = deque()

    @property
    def retry(self) -> int | None:
        """The last ``retry:`` the server sent, in milliseconds."""
        return self.parser.retry_ms

    async def next(self, timeout: float = 10) -> SSEMessage | None:
        """The next dispatched message, or None at the end of the stream."""
        return await asyncio.wait_for(self._next(), timeout)

    async def _next(self) -> SSEMessage | None:
        while not self._ready:
            chunk = await self.response.content.readany()
            wire = self.parser.feed(chunk) if chunk else self.parser.end()
            self._ready.extend(map(SSEMessage.from_wire, wire))
            if not chunk:
                break
        return self._ready.popleft() if self._ready else None

    async def collect_until_final(self, timeout: float = 30) -> list[SSEMessage]:
        """Messages until the stream ends (task streams end after the final event)."""
        messages = []
        while (message := await self.next(timeout)) is not None:
            messages.append(message)
        return messages


def write_pdf(path: Path, lines: list[str]) -> Path:
    """A minimal one-page PDF with Helvetica text, written by hand with a correct xref."""

    def escape(text: str) -> str:
        return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")

    operators = ["BT", "/F1 12 Tf", "16 TL", "72 720 Td"]
    operators += [f"({escape(line)}) Tj T*" for line in lines] + ["ET"]
    stream = "\n".join(operators).encode("latin-1")
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792]"
        b" /Resources << /Font << /F1 4 0 R >> >> /Contents 5 0 R >>",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream),
    ]
    data = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(data))
        data += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(data)
    data += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    data += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    data += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    path.write_bytes(bytes(data))
    return path


async def eventually(check: Callable[[], object], what: str, timeout: float = 10) -> None:
    """Poll ``check`` on the loop until it is truthy; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not check():
        if loop.time() > end:
            raise AssertionError(f"after {timeout} s, still not: {what}")
        await asyncio.sleep(0.01)


# ------------------------------------------------------------ test processors
class Gates:
    """Lets a test hold a processor at a step and release it."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.calls = 0
        self.fail_times = 0


def make_registry(gates: Gates) -> Registry:
    registry = default_registry().copy()

    @registry.processor("steps", extensions=(".txt",), parses_document=False)
    async def steps(ctx: TaskContext) -> Path:
        """Ten progress steps, then copies the input."""
        for i in range(1, 11):
            await ctx.progress(i * 10 - 5, f"step {i} of 10", stage="working")
            await asyncio.sleep(0.01)
        out = ctx.result_path("out.txt")
        out.write_bytes(ctx.input_path.read_bytes().upper())
        return out

    @registry.processor("gate", extensions=(".txt",), parses_document=False)
    async def gate(ctx: TaskContext) -> Path:
        await ctx.progress(30, "waiting at the gate", stage="gate")
        (ctx.result_path("partial.txt")).write_text("partial")
        gates.started.set()
        try:
            await gates.release.wait()
        except asyncio.CancelledError:
            gates.cancelled.set()
            raise
        await ctx.progress(60, "past the gate")
        out = ctx.result_path("gate.txt")
        out.write_text("done")
        return out

    @registry.processor("flaky", extensions=(".txt",), parses_document=False)
    async def flaky(ctx: TaskContext) -> Path:
        gates.calls += 1
        if gates.calls <= gates.fail_times:
            raise TransientError(f"flaky failure {gates.calls}")
        out = ctx.result_path("ok.txt")
        out.write_text(f"ok after {gates.calls}")
        return out

    @registry.processor("broken", extensions=(".txt",), parses_document=False)
    async def broken(ctx: TaskContext) -> Path:
        raise PermanentError("this document cannot be processed", "bad_document")

    @registry.processor("buggy", extensions=(".txt",), parses_document=False)
    async def buggy(ctx: TaskContext) -> Path:
        return {}["missing"]

    @registry.processor("hang", extensions=(".txt",), parses_document=False)
    async def hang(ctx: TaskContext) -> Path:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    @registry.processor("chatty", extensions=(".txt",), parses_document=False)
    async def chatty(ctx: TaskContext) -> Path:
        for i in range(100_000):
            await ctx.progress(i / 1000, f"report {i}")
        out = ctx.result_path("chatty.txt")
        out.write_text("done")
        return out

    return registry


# ------------------------------------------------- real servers in subprocesses
HERE = Path(__file__).parent


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


def peak_rss_mb(pid: int) -> float:
    """The process's high-water resident memory (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


async def make_user(data: Path, credits: int, database_url: str | None = None) -> str:
    store = await open_store(data / "zhiyi.db", database_url)
    try:
        await store.add_user("alice", credits)
        return await store.issue_token("alice")
    finally:
        await store.close()


class StreamWatcher:
    """Follows one task's stream, moving to another HTTP process when its own dies."""

    def __init__(self, session: aiohttp.ClientSession, task_id: int | None,
                 urls: list[str]) -> None:
        self.session = session
        self.task_id = task_id
        self.urls = urls
        self.ids: list[int] = []
        self.first_id: int | None = None
        self.reconnects = 0
        self.final: dict[str, Any] | None = None
        #: a notification stream is done once it has this event id
        self.until_id: int | None = None
        self.more = asyncio.Event()
        if task_id is None:  # the user's stream, from its very first event: no snapshot
            self.first_id = 0

    @property
    def path(self) -> str:
        return f"/api/sse/tasks/{self.task_id}" if self.task_id else "/api/sse/notifications"

    @property
    def done(self) -> bool:
        if self.task_id is not None:
            return self.final is not None
        return self.until_id is not None and bool(self.ids) and self.ids[-1] >= self.until_id

    async def run(self) -> None:
        while not self.done:
            if self.session.closed:  # the test is over (it failed): stop, do not spin
                return
            url = self.urls[0]
            headers = {"Last-Event-ID": str(self.ids[-1] if self.ids else self.first_id)} \
                if self.first_id is not None else {}
            try:
                async with self.session.get(f"{url}{self.path}", headers=headers) as resp:
                    if resp.status == 204:
                        raise AssertionError(f"task {self.task_id}: 204 before its final event")
                    assert resp.status == 200, await resp.text()
                    await self._read(resp)
            # A killed server: refused, reset, or (aiohttp) "Connection closed." mid-read.
            except (aiohttp.ClientError, ConnectionError, RuntimeError):
                pass
            if not self.done:
                self.reconnects += 1
                await asyncio.sleep(0.1)

    async def _read(self, resp: aiohttp.ClientResponse) -> None:
        reader = SSEReader(resp)
        while not self.done:
            try:
                message = await reader.next(timeout=1)
            except TimeoutError:  # nothing new: is it done (until_id set meanwhile)?
                continue
            if message is None:
                return
            self._take(message)

    def _take(self, message: SSEMessage) -> None:
        assert message.id is not None
        event_id = int(message.id)
        if self.first_id is None:  # the snapshot: events after it follow
            self.first_id = event_id
        else:
            self.ids.append(event_id)
        if self.task_id is not None and message.payload.get("status") in (
                "completed", "failed", "cancelled"):
            self.final = message.payload


def small_docx() -> bytes:
    """A real .docx: a heading, a bold run, a table and a header, as python-docx writes it."""
    document = docx.Document()
    document.add_heading("Quarterly report", level=1)
    paragraph = document.add_paragraph("Revenue grew by ")
    paragraph.add_run("{percent}").bold = True
    paragraph.add_run(" this quarter.")
    table = document.add_table(rows=2, cols=2)
    for i, cell in enumerate(c for row in table.rows for c in row.cells):
        cell.text = f"cell {i}"
    document.sections[0].header.paragraphs[0].text = "Confidential"
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


async def poll_until_ended(session: aiohttp.ClientSession, url: str,
                           task_id: int) -> dict[str, Any]:
    """The task (over HTTP, from a server subprocess) once it is no longer pending or
    processing; callers bound the wait with their own timeout."""
    while True:
        async with session.get(f"{url}/api/tasks/{task_id}") as resp:
            task = (await resp.json())["task"]
        if task["taskStatus"] not in ("pending", "processing"):
            return task
        await asyncio.sleep(0.1)
