"""Hostile requests: oversized and slow bodies, malformed headers and params, redirects.

Each answer is a 4xx envelope (never a 500), and nothing changes. Slow and
partial bodies go over raw sockets, since aiohttp's client always finishes
what it starts; the external service is a real loopback HTTP server.
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import MakeClient
from helpers import add_user, create, form, get_task, wait_status
from hypothesis import example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from external import sign
from processors import default_registry
from zhiyi_server import STORE, Config, create_app

SECRET = "s3cret"
MB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def signed(body: bytes, *, ts: int | None = None) -> dict[str, str]:
    stamp = int(time.time()) if ts is None else ts
    return {"Content-Type": "application/json", "X-Zhiyi-Timestamp": str(stamp),
            "X-Zhiyi-Signature": sign(SECRET, stamp, body)}


async def raw_request(client: TestClient, head: str, body: bytes = b"") -> bytes:
    """Send a request head (and maybe part of a body); the answer's head and body.

    The answer is read by its Content-Length: after refusing a body the server
    may linger a while reading it (a courtesy to the client), so EOF comes late.
    """
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        length = next(int(line.split(b":")[1]) for line in answer.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        return answer + await asyncio.wait_for(reader.readexactly(length), 30)
    finally:
        writer.close()


def status_and_json(answer: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)


@pytest.fixture
async def wclient(make_client) -> TestClient:
    """Webhooks enabled, no workers, a short body deadline and a 1 MB upload cap."""
    return await make_client(webhook_secret=SECRET, worker_concurrency=0,
                             body_timeout_seconds=0.5, max_upload_mb=1)


# --------------------------------------------------------------------- bodies
async def test_webhook_over_1mb_by_content_length_is_413_unread(wclient: TestClient) -> None:
    body = b"x" * (MB + 1)
    resp = await wclient.post("/api/tasks/webhook", data=io.BytesIO(body), headers=signed(body))
    assert resp.status == 413
    answer = await resp.json()
    assert answer["code"] == "too_large" and "1 MB" in answer["message"]


async def test_webhook_over_1mb_streamed_is_413(wclient: TestClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(40):
            yield b"x" * 64 * 1024

    resp = await wclient.post("/api/tasks/webhook", data=chunks(), headers=signed(b"x"))
    assert resp.status == 413 and (await resp.json())["code"] == "too_large"


async def test_webhook_headers_are_checked_before_the_body(wclient: TestClient) -> None:
    """A bad signature is refused at once: the announced body is never waited for."""
    answer = await raw_request(wclient, (
        "POST /api/tasks/webhook HTTP/1.1\nHost: x\nContent-Type: application/json\n"
        f"Content-Length: 500000\nX-Zhiyi-Timestamp: {int(time.time())}\n"
        "X-Zhiyi-Signature: sha256=nothex\nConnection: close\n"))
    status, body = status_and_json(answer)
    assert status == 401 and body["code"] == "bad_signature"
    answer = await raw_request(wclient, (
        "POST /api/tasks/webhook HTTP/1.1\nHost: x\nContent-Type: application/json\n"
        f"Content-Length: 500000\nX-Zhiyi-Timestamp: {int(time.time()) - 3600}\n"
        f"X-Zhiyi-Signature: sha256={'0' * 64}\nConnection: close\n"))
    status, body = status_and_json(answer)
    assert status == 401 and "300 seconds" in body["message"]


@pytest.mark.parametrize("route", ["webhook", "session", "memory"])
async def test_slow_small_body_is_408(wclient: TestClient, route: str) -> None:
    """Headers, then 10 of the announced 100 bytes, then nothing: 408 and the connection ends."""
    extra, path = {
        "webhook": (f"X-Zhiyi-Timestamp: {int(time.time())}\n"
                    f"X-Zhiyi-Signature: sha256={'0' * 64}\n", "/api/tasks/webhook"),
        "session": ("", "/api/session"),
        "memory": (f"Authorization: {(await add_user(wclient))['Authorization']}\n",
                   "/api/memory/import"),
    }[route]
    answer = await raw_request(wclient, (
        f"POST {path} HTTP/1.1\nHost: x\nContent-Type: application/json\n"
        f"Content-Length: 100\n{extra}"), b'{"token": ')
    status, body = status_and_json(answer)
    assert status == 408 and body["code"] == "request_timeout"


async def test_slow_upload_is_408_and_leaves_nothing(wclient: TestClient, config) -> None:
    auth = await add_user(wclient)
    boundary = "b" + uuid.uuid4().hex
    part = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"taskType\"\r\n\r\n"
            f"extract\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"a.txt\"\r\nContent-Type: text/plain\r\n\r\nsome text").encode()
    answer = await raw_request(wclient, (
        f"POST /api/tasks/create HTTP/1.1\nHost: x\nAuthorization: {auth['Authorization']}\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\nContent-Length: 100000\n"),
        part)
    status, body = status_and_json(answer)
    assert status == 408 and body["code"] == "request_timeout"
    tasks = await (await wclient.get("/api/tasks", headers=auth)).json()
    assert tasks["tasks"] == []
    assert not list((config.data_path / "alice").glob("*/original/*"))


async def test_trickled_upload_is_408(make_client) -> None:
    """Never pausing long, but far slower than the minimum average rate: 408."""
    client = await make_client(worker_concurrency=0, body_timeout_seconds=1.0)
    auth = await add_user(client)
    boundary = "b" + uuid.uuid4().hex
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"a.txt\"\r\n\r\n").encode()
    reader, writer = await asyncio.open_connection(client.host, client.port)
    answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    try:
        writer.write((
            f"POST /api/tasks/create HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: {auth['Authorization']}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: 100000\r\n\r\n").encode() + head)
        answer = asyncio.ensure_future(reader.readuntil(b"\r\n\r\n"))
        for _ in range(400):  # 64 bytes every 50 ms: ~1.3 KB/s, never 1 s of silence
            if answer.done():
                break
            writer.write(b"t" * 64)
            await writer.drain()
            await asyncio.sleep(0.05)
        assert answer.done(), "the server kept reading a 1.3 KB/s trickle for 20 s"
        status_line = answer.result().split(b"\r\n")[0]
    finally:
        answer.cancel()
        writer.close()
    assert status_line == b"HTTP/1.1 408 Request Timeout"


async def test_session_body_over_4kb_is_413(wclient: TestClient) -> None:
    resp = await wclient.post("/api/session", json={"token": "x" * 5000})
    assert resp.status == 413 and (await resp.json())["code"] == "too_large"


async def test_session_takes_json_only(wclient: TestClient) -> None:
    headers = await add_user(wclient)
    token = headers["Authorization"].split()[1]
    for content_type in ("text/plain", "application/x-www-form-urlencoded"):
        resp = await wclient.post("/api/session", data=json.dumps({"token": token}),
                                  headers={"Content-Type": content_type})
        assert resp.status == 415, content_type
        assert (await resp.json())["code"] == "unsupported_media_type"
        assert "Set-Cookie" not in resp.headers


def multipart(boundary: str, *parts: tuple[str, str | None, bytes]) -> bytes:
    out = b""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (
            f'; filename="{filename}"' if filename else "")
        out += (f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n").encode()
        out += content + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


async def test_chunked_multipart_has_a_total_cap(wclient: TestClient) -> None:
    """Parts the server ignores still count: a small file plus 2 MB of junk is 413."""
    auth = await add_user(wclient)
    boundary = "b" + uuid.uuid4().hex
    body = multipart(boundary, ("taskType", None, b"extract"),
                     ("junk", None, b"j" * (2 * MB)), ("file", "a.txt", b"Hello there."))

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 64 * 1024):
            yield body[i:i + 64 * 1024]

    resp = await wclient.post("/api/tasks/create", data=chunks(), headers={
        **auth, "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert resp.status == 413 and (await resp.json())["code"] == "file_too_large"
    tasks = await (await wclient.get("/api/tasks", headers=auth)).json()
    assert tasks["tasks"] == []


# ------------------------------------------------------------ no 500s, ever
@pytest.mark.parametrize("signature", ["sha256=ü" + "0" * 63, "sha256=" + "０" * 64, "☃"])
async def test_non_ascii_signature_is_401(wclient: TestClient, signature: str) -> None:
    body = b'{"externalTaskId": "x", "status": "completed"}'
    head = (f"POST /api/tasks/webhook HTTP/1.1\nHost: x\nContent-Type: application/json\n"
            f"Content-Length: {len(body)}\nX-Zhiyi-Timestamp: {int(time.time())}\n"
            f"X-Zhiyi-Signature: {signature}\nConnection: close\n")
    answer = await raw_request(wclient, head, body)
    status, answer_body = status_and_json(answer)
    assert status == 401 and answer_body["code"] == "bad_signature"


async def test_non_ascii_timestamp_digits_are_401(wclient: TestClient) -> None:
    body = b'{"externalTaskId": "x", "status": "completed"}'
    arabic = "".join(chr(0x660 + int(d)) for d in str(int(time.time())))
    head = (f"POST /api/tasks/webhook HTTP/1.1\nHost: x\nContent-Type: application/json\n"
            f"Content-Length: {len(body)}\nX-Zhiyi-Timestamp: {arabic}\n"
            f"X-Zhiyi-Signature: {sign(SECRET, arabic, body)}\nConnection: close\n")
    answer = await raw_request(wclient, head, body)
    status, answer_body = status_and_json(answer)
    assert status == 401 and answer_body["code"] == "bad_signature"


@pytest.mark.parametrize(("params", "word"), [
    ('{"targetLang": "zh", "engine": "pseudo", "x": ' + "[" * 30_000 + "]" * 30_000 + "}",
     "nested"),
    ('{"targetLang": {"deep": {"er": 1}}, "engine": "pseudo"}', "'targetLang'"),
    ('{"targetLang": "zh", "engine": "pseudo", "colour": "red"}', "'colour'"),
])
async def test_bad_params_are_400_naming_the_problem(wclient: TestClient, params: str,
                                                     word: str) -> None:
    auth = await add_user(wclient)
    resp = await wclient.post("/api/tasks/create", data=form(params=params), headers=auth)
    body = await resp.json()
    assert resp.status == 400 and body["code"] == "bad_params", body
    assert word in body["message"]
    assert (await (await wclient.get("/api/tasks", headers=auth)).json())["tasks"] == []


async def test_deeply_nested_session_body_is_400(wclient: TestClient) -> None:
    resp = await wclient.post("/api/session", data="[" * 2000 + "]" * 2000,
                              headers={"Content-Type": "application/json"})
    assert resp.status == 400 and (await resp.json())["code"] == "bad_request"


# ------------------------------------------------------------ outbound fetch
class Service:
    """The external service on loopback: accepts jobs, serves and redirects results."""

    def __init__(self, elsewhere: str) -> None:
        self.elsewhere = elsewhere
        self.jobs: list[str] = []
        self.app = web.Application()
        self.app.router.add_post("/jobs", self.accept)
        self.app.router.add_get("/results/moved", self.moved)

    async def accept(self, request: web.Request) -> web.Response:
        await request.post()
        self.jobs.append(f"ext-{len(self.jobs) + 1}")
        return web.json_response({"externalTaskId": self.jobs[-1]}, status=202)

    async def moved(self, request: web.Request) -> web.Response:
        raise web.HTTPFound(self.elsewhere)


async def test_redirecting_result_url_is_refused(aiohttp_client, aiohttp_server,
                                                 tmp_path: Path) -> None:
    """The service's own URL answers 302 to another origin: nothing is fetched from there."""
    stolen: list[str] = []

    async def other(request: web.Request) -> web.Response:
        stolen.append(request.path)
        return web.Response(text="content from another origin")

    other_app = web.Application()
    other_app.router.add_get("/loot", other)
    other_server = await aiohttp_server(other_app)
    service = Service(str(other_server.make_url("/loot")))
    service_server = await aiohttp_server(service.app)
    registry = default_registry().copy()
    registry.external("remote", extensions=(".txt",), description="done elsewhere")
    port = free_port()
    config = Config(data_path=tmp_path / "data", webhook_secret=SECRET, worker_concurrency=1,
                    external_service_url=str(service_server.make_url("/jobs")),
                    public_url=f"http://127.0.0.1:{port}", reconcile_seconds=3600,
                    retry_base_seconds=0.01)
    client = await aiohttp_client(TestServer(create_app(config, registry=registry), port=port))
    auth = await add_user(client, credits=10)
    task_id = (await create(client, auth, task_type="remote", params={}))["taskId"]
    for _ in range(1000):
        if (await get_task(client, auth, task_id))["externalTaskId"]:
            break
        await asyncio.sleep(0.01)
    report = json.dumps({"externalTaskId": "ext-1", "status": "completed",
                         "resultUrl": str(service_server.make_url("/results/moved"))}).encode()
    resp = await client.post("/api/tasks/webhook", data=report, headers=signed(report))
    assert resp.status == 200
    task = await wait_status(client, auth, task_id, "failed")
    assert task["errorCode"] == "external_error" and "redirect" in task["errorMessage"]
    assert stolen == []
    me = await (await client.get("/api/me", headers=auth)).json()
    assert me["credits"] == 10  # refunded
    assert await client.app[STORE].latest_event_id(task_id=task_id) > 0


_DISPOSITION_CHARS = 'aZ09 ;="\\/*\'%é\t.-_'


@hypothesis_settings(max_examples=500, deadline=None)
@example('form-data; name="/file"; filename="//etc/passwd"')
@example('form-data; name="a\\"b"')
@example('form-data; name="file"; name="params"')
@example('form-data; name="file"; k="1"; \u212a="2"')  # the Kelvin sign lower-cases to "k"
@example('form-data; name="file"; \u017f="1"')  # long s: "S" to an IGNORECASE [A-Za-z]
@example('form-data;\xa0name="file"')
@given(st.one_of(
    st.text(alphabet=_DISPOSITION_CHARS, max_size=40),
    st.lists(st.tuples(st.sampled_from(["; ", ";", " ; ", ";\t"]),
                       st.sampled_from(["name", "filename", "NAME", "filename*", "name*0", "x",
                                        "\u212a", "k", "\u017f"]),
                       st.sampled_from(["=", " = ", "="]),
                       st.one_of(st.text(alphabet=_DISPOSITION_CHARS, max_size=12),
                                 st.text(alphabet="aZ0 /é.-_\t%*'", max_size=12)),
                       st.booleans()),
             max_size=4).map(lambda params: "form-data" + "".join(
                 f'{sep}{key}{eq}"{value}"' if quoted else f"{sep}{key}{eq}{value}"
                 for sep, key, eq, value, quoted in params)),
    st.lists(st.tuples(st.sampled_from(["name", "filename"]),
                       st.text(alphabet="aZ0 /é.-_\t%*'", max_size=12)),
             max_size=3).map(lambda params: "form-data" + "".join(
                 f'; {key}="{value}"' for key, value in params))))
def test_content_disposition_read_as_aiohttp_reads_it(header: str) -> None:
    """The fast path for simple multipart headers gives what aiohttp's parser gives."""
    import warnings

    from zhiyi_server import _AIOHTTP_DISPOSITION, _fast_content_disposition, disposition_params

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert disposition_params(header) == _AIOHTTP_DISPOSITION(header)[1]
        assert _fast_content_disposition(header) == _AIOHTTP_DISPOSITION(header)


@pytest.mark.parametrize("header", [
    'form-data; name="file"; filename="doc.txt"', 'form-data; name="taskType"',
    'FORM-DATA;name="params"', 'form-data; name="file"; filename="/etc/passwd"'])
def test_content_disposition_fast_path_is_taken(header: str) -> None:
    from zhiyi_server import _SIMPLE_DISPOSITION, disposition_params

    assert _SIMPLE_DISPOSITION.fullmatch(header)
    assert disposition_params(header)["name"] in ("file", "taskType", "params")


async def test_an_upload_never_waits_for_aiohttps_slow_header_parser(
        app_client: MakeClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """aiohttp's multipart reader parses each part's Content-Disposition again; with the
    server's app made, it reads the simple ones through the fast path."""
    import aiohttp.multipart

    import zhiyi_server

    slow = []
    original = zhiyi_server._AIOHTTP_DISPOSITION
    monkeypatch.setattr(zhiyi_server, "_AIOHTTP_DISPOSITION",
                        lambda header: slow.append(header) or original(header))
    client = await app_client()
    assert aiohttp.multipart.parse_content_disposition is zhiyi_server._fast_content_disposition
    headers = await add_user(client)
    resp = await client.post("/api/tasks/create", headers=headers,
                             data=form(b"Hello there.", task_type="analyze"))
    assert resp.status == 201, await resp.text()
    assert slow == []
