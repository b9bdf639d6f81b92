"""The stream routes on the wire: HEAD, HTTP/1.0, and compression, over raw sockets.

The hub writes live events straight to a stream's socket, so what the
prepared response promised (chunks or not, keep-alive or not) must be what
those writes do; aiohttp's client hides framing, hence raw sockets here.
"""

from __future__ import annotations

import asyncio

import pytest
from aiohttp.test_utils import TestClient
from helpers import add_user, create

from sse import EventStreamResponse
from zhiyi_server import STORE


async def raw_exchange(client: TestClient, request: bytes) -> tuple[asyncio.StreamReader,
                                                                  asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(request)
    await writer.drain()
    return reader, writer


async def read_head(reader: asyncio.StreamReader) -> tuple[str, dict[str, str]]:
    """Status line and headers (lower-cased names) of one response."""
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status, *lines = raw.decode("latin-1").split("\r\n")[:-2]
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


def request(method: str, path: str, auth: dict[str, str], version: str = "1.1",
            extra: str = "") -> bytes:
    return (f"{method} {path} HTTP/{version}\r\nHost: 127.0.0.1\r\n"
            f"Authorization: {auth['Authorization']}\r\n{extra}\r\n").encode()


@pytest.mark.parametrize("route", ["notifications", "task"])
async def test_head_on_a_stream_route_is_headers_only(idle_client: TestClient,
                                                      route: str) -> None:
    """HEAD gets the stream's headers and no body: the next pipelined request is answered."""
    auth = await add_user(idle_client)
    task_id = (await create(idle_client, auth))["taskId"]
    path = "/api/sse/notifications" if route == "notifications" else f"/api/sse/tasks/{task_id}"
    reader, writer = await raw_exchange(
        idle_client,
        request("HEAD", path, auth)
        + b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    try:
        status, headers = await read_head(reader)
        assert status == "HTTP/1.1 200 OK"
        assert headers["content-type"] == "text/event-stream"
        assert "transfer-encoding" not in headers
        # An event published now must not reach this connection as stray chunk framing.
        await idle_client.app[STORE].grant_credits("alice", 1)
        rest = await asyncio.wait_for(reader.read(), 10)
        assert rest.startswith(b"HTTP/1.1 200 OK\r\n"), rest[:200]
        assert rest.endswith(b'{"success": true, "status": "ok"}')
    finally:
        writer.close()


async def test_http10_stream_is_unchunked_and_closes(idle_client: TestClient) -> None:
    """An HTTP/1.0 client gets raw events, no keep-alive claim, and EOF at the end."""
    auth = await add_user(idle_client)
    task_id = (await create(idle_client, auth))["taskId"]
    reader, writer = await raw_exchange(
        idle_client, request("GET", f"/api/sse/tasks/{task_id}", auth, version="1.0",
                             extra="Connection: keep-alive\r\n"))
    try:
        status, headers = await read_head(reader)
        assert status.startswith("HTTP/1.0 200")
        assert headers["content-type"] == "text/event-stream"
        assert "transfer-encoding" not in headers
        assert headers.get("connection", "close").lower() != "keep-alive"
        first = await asyncio.wait_for(reader.readuntil(b"\n\n"), 10)
        assert first.startswith(b"retry: ")
        snapshot = await asyncio.wait_for(reader.readuntil(b"\n\n"), 10)
        assert snapshot.startswith(b"id: ") and b'"status":"pending"' in snapshot
        # The cancel is written by the hub straight to the socket: unframed, then EOF.
        resp = await idle_client.post(f"/api/tasks/{task_id}/cancel", headers=auth)
        assert resp.status == 200
        rest = await asyncio.wait_for(reader.read(), 10)
        assert rest.startswith(b"id: ") and rest.endswith(b"\n\n"), rest[:200]
        assert b'"status":"cancelled"' in rest
        assert b"\r\n" not in rest  # no chunk-size lines
    finally:
        writer.close()


async def test_http11_live_events_are_chunk_framed(idle_client: TestClient) -> None:
    """On HTTP/1.1 the hub's direct writes are chunks, as the response's header says."""
    auth = await add_user(idle_client)
    task_id = (await create(idle_client, auth))["taskId"]
    reader, writer = await raw_exchange(
        idle_client, request("GET", f"/api/sse/tasks/{task_id}", auth))
    try:
        _, headers = await read_head(reader)
        assert headers["transfer-encoding"] == "chunked"
        resp = await idle_client.post(f"/api/tasks/{task_id}/cancel", headers=auth)
        assert resp.status == 200
        body = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 10)
        chunks, rest = [], body
        while rest:  # every byte belongs to a well-formed chunk
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            chunks.append(rest[:size])
            assert rest[size:size + 2] == b"\r\n"
            rest = rest[size + 2:]
        text = b"".join(chunks)
        assert text.startswith(b"retry: ") and b'"status":"cancelled"' in text
    finally:
        writer.close()


def test_event_stream_response_refuses_compression() -> None:
    response = EventStreamResponse()
    response.enable_compression()
    assert response.compression is False
