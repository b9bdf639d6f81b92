"""Test helpers: users, uploads, polling, and SSE reading with the client's parser."""

from __future__ import annotations

import asyncio
import io
import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient

from client import SSEMessage as WireMessage
from client import SSEParser
from zhiyi_server import STORE


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
