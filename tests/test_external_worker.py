"""The example external worker (examples/external_worker.py), end to end.

The worker runs as a real aiohttp server; a small fake of Zhiyi's webhook
endpoint receives its callbacks and checks each signature the way Zhiyi must
(HMAC-SHA256 of "<timestamp>.<raw body>", compare_digest, a 300 s window).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import importlib
import json
import re
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

# examples/ is not a package; the worker's own processes find it the same way.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
external_worker = importlib.import_module("external_worker")

SECRET = "s3cret"
WINDOW_SECONDS = 300
DOCUMENT = (
    "Hello {name}, you have %d new messages from %(sender)s.\n"
    "Open https://example.com/inbox?page=2 or press <b>Reply</b>.\n"
    "\n"
    "{{count}} items are waiting & the rest is %s.\n"
    "\n"
    "1\n"
    "00:00:01,000 --> 00:00:04,000\n"
    "Goodbye\n"
)
PLACEHOLDERS = [
    "{name}",
    "%d",
    "%(sender)s",
    "https://example.com/inbox?page=2",
    "<b>",
    "</b>",
    "{{count}}",
    "%s",
    "00:00:01,000 --> 00:00:04,000",
]


def _signature_ok(headers: Any, body: bytes, secret: str = SECRET) -> bool:
    """Zhiyi's side of the check, written independently of the worker's sign()."""
    try:
        timestamp = int(headers["X-Zhiyi-Timestamp"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - timestamp) > WINDOW_SECONDS:
        return False
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    given = headers.get("X-Zhiyi-Signature", "")
    return hmac.compare_digest(given, "sha256=" + expected.hexdigest())


@dataclass
class Receiver:
    """A stand-in for Zhiyi's POST /api/tasks/webhook that records deliveries."""

    #: Answer ``fail_status`` to this many (correctly signed) deliveries first.
    fail_first: int = 0
    fail_status: int = 500
    url: str = ""
    attempts: int = 0
    rejected: int = 0
    deliveries: list[dict[str, Any]] = field(default_factory=list)
    delivered: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        body = await request.read()
        if not _signature_ok(request.headers, body):
            self.rejected += 1
            return web.json_response({"success": False}, status=401)
        if self.attempts <= self.fail_first:
            return web.json_response({"success": False}, status=self.fail_status)
        payload = json.loads(body)
        self.deliveries.append(payload)
        self.delivered.set()
        if payload["status"] in ("completed", "failed"):
            self.finished.set()
        return web.json_response({"success": True})

    async def final(self) -> dict[str, Any]:
        await asyncio.wait_for(self.finished.wait(), timeout=30)
        return self.deliveries[-1]

    def progress_updates(self) -> list[dict[str, Any]]:
        return [d for d in self.deliveries if d["status"] == "processing"]


StartReceiver = Callable[..., Awaitable[Receiver]]
StartWorker = Callable[..., Awaitable[TestClient]]


@pytest.fixture
def start_receiver(aiohttp_server: Any) -> StartReceiver:
    async def start(fail_first: int = 0, fail_status: int = 500) -> Receiver:
        receiver = Receiver(fail_first=fail_first, fail_status=fail_status)
        app = web.Application()
        app.router.add_post("/api/tasks/webhook", receiver.handle)
        server: TestServer = await aiohttp_server(app)
        receiver.url = str(server.make_url("/api/tasks/webhook"))
        return receiver

    return start


@pytest.fixture
def start_worker(aiohttp_client: Any) -> StartWorker:
    async def start(secret: str = SECRET, **options: Any) -> TestClient:
        options = {"delay": 0.01, "retry_delay": 0.01, "workers": 1, **options}
        return await aiohttp_client(external_worker.create_app(secret, **options))

    return start


def _form(
    callback_url: str | None,
    *,
    data: bytes = DOCUMENT.encode(),
    file_name: str = "notes.txt",
    params: str | None = '{"targetLang": "zh", "sourceLang": "en"}',
    omit: str = "",
) -> aiohttp.FormData:
    # Multipart even without a file, as Zhiyi always sends it.
    form = aiohttp.FormData(default_to_multipart=True)
    if omit != "file":
        form.add_field("file", data, filename=file_name, content_type="text/plain")
    if omit != "taskType":
        form.add_field("taskType", "translate")
    if params is not None and omit != "params":
        form.add_field("params", params)
    if callback_url is not None and omit != "callbackUrl":
        form.add_field("callbackUrl", callback_url)
    return form


async def _submit(client: TestClient, receiver: Receiver, path: str = "/jobs", **kw: Any) -> str:
    response = await client.post(path, data=_form(receiver.url, **kw))
    assert response.status == 202, await response.text()
    body = await response.json()
    assert re.fullmatch(r"[0-9a-f-]{36}", body["externalTaskId"])
    return str(body["externalTaskId"])


# --------------------------------------------------------------------------
# The protocol
# --------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/jobs", "/"])
async def test_job_reports_signed_progress_then_serves_result(
    start_worker: StartWorker, start_receiver: StartReceiver, path: str
) -> None:
    receiver = await start_receiver()
    client = await start_worker()

    job_id = await _submit(client, receiver, path, file_name="报告 1.txt")
    final = await receiver.final()

    assert receiver.rejected == 0
    assert {d["externalTaskId"] for d in receiver.deliveries} == {job_id}
    updates = receiver.progress_updates()
    progress = [u["progress"] for u in updates]
    assert progress == sorted(progress) and progress[0] == 0 and progress[-1] < 100
    assert [u["message"] for u in updates] == [f"paragraph {i} of 3" for i in range(4)]

    assert final["status"] == "completed" and final["progress"] == 100
    assert "resultText" not in final
    result_url = URL(final["resultUrl"])
    assert result_url.origin() == client.make_url("/").origin()
    assert result_url.path == f"/results/{job_id}"

    async with client.session.get(result_url) as response:
        assert response.status == 200
        assert response.charset == "utf-8"
        disposition = response.headers["Content-Disposition"]
        assert f"filename*=UTF-8''{quote('报告 1.txt', safe='')}" in disposition
        text = (await response.read()).decode("utf-8")
    _assert_pseudo_translated(text)


async def test_inline_mode_sends_result_text(
    start_worker: StartWorker, start_receiver: StartReceiver
) -> None:
    receiver = await start_receiver()
    client = await start_worker(inline=True)

    await _submit(client, receiver)
    final = await receiver.final()

    assert receiver.rejected == 0
    assert final["status"] == "completed" and "resultUrl" not in final
    _assert_pseudo_translated(final["resultText"])


async def test_public_url_is_the_base_of_result_url(
    start_worker: StartWorker, start_receiver: StartReceiver
) -> None:
    receiver = await start_receiver()
    client = await start_worker(public_url="https://gpu.example.org/worker/")

    job_id = await _submit(client, receiver)
    final = await receiver.final()

    assert final["resultUrl"] == f"https://gpu.example.org/worker/results/{job_id}"


async def test_gb18030_input_gives_utf8_result(
    start_worker: StartWorker, start_receiver: StartReceiver
) -> None:
    receiver = await start_receiver()
    client = await start_worker(inline=True)

    await _submit(client, receiver, data="你好 {name}，世界".encode("gb18030"))
    final = await receiver.final()

    assert final["status"] == "completed"
    assert "你好 {name}，世界" in final["resultText"]


async def test_binary_file_fails_the_job(
    start_worker: StartWorker, start_receiver: StartReceiver
) -> None:
    receiver = await start_receiver()
    client = await start_worker()

    await _submit(client, receiver, data=b"PK\x03\x04\x00\x00binary", file_name="a.docx")
    final = await receiver.final()

    assert final["status"] == "failed"
    assert "binary" in final["message"]
    assert receiver.rejected == 0


@pytest.mark.parametrize("omit", ["file", "taskType", "callbackUrl"])
async def test_missing_field_is_400(
    start_worker: StartWorker, start_receiver: StartReceiver, omit: str
) -> None:
    receiver = await start_receiver()
    client = await start_worker()

    response = await client.post("/jobs", data=_form(receiver.url, omit=omit))

    assert response.status == 400
    body = await response.json()
    assert body["code"] == "missing_field" and omit in body["message"]
    assert not client.app[external_worker.WORKER].tasks  # no job was started


@pytest.mark.parametrize(
    ("params", "callback", "code"),
    [
        ("{not json", None, "bad_params"),
        ('["a", "list"]', None, "bad_params"),
        (None, "ftp://example.com/hook", "bad_callback_url"),
        (None, "/api/tasks/webhook", "bad_callback_url"),
    ],
)
async def test_bad_fields_are_400(
    start_worker: StartWorker, params: str | None, callback: str | None, code: str
) -> None:
    client = await start_worker()

    form = _form(callback or "http://127.0.0.1:9/api/tasks/webhook", params=params)
    response = await client.post("/jobs", data=form)

    assert response.status == 400
    body = await response.json()
    assert body["success"] is False and body["code"] == code and body["message"]


async def test_not_multipart_is_400(start_worker: StartWorker) -> None:
    client = await start_worker()

    response = await client.post("/jobs", json={"taskType": "translate"})

    assert response.status == 400


async def test_unknown_result_is_404(start_worker: StartWorker) -> None:
    client = await start_worker()

    response = await client.get("/results/nope")

    assert response.status == 404


# --------------------------------------------------------------------------
# Webhook delivery
# --------------------------------------------------------------------------


# 404: the first webhook can arrive before Zhiyi has stored our externalTaskId.
@pytest.mark.parametrize("fail_status", [500, 503, 404])
async def test_delivery_is_retried_after_server_errors(
    start_worker: StartWorker, start_receiver: StartReceiver, fail_status: int
) -> None:
    receiver = await start_receiver(fail_first=2, fail_status=fail_status)
    client = await start_worker()

    await _submit(client, receiver)
    final = await receiver.final()

    assert final["status"] == "completed"
    # The first webhook (progress 0) was refused twice, then delivered.
    assert receiver.deliveries[0]["progress"] == 0
    assert receiver.attempts == len(receiver.deliveries) + 2
    assert receiver.rejected == 0


async def test_refused_signature_is_not_retried(
    start_worker: StartWorker, start_receiver: StartReceiver
) -> None:
    receiver = await start_receiver()
    client = await start_worker(secret="not-the-shared-secret")
    worker = client.app[external_worker.WORKER]

    await _submit(client, receiver)
    await asyncio.wait_for(asyncio.gather(*worker.tasks), timeout=30)

    # One "paragraph i of 3" update per paragraph, one for 0, one final; each once.
    assert receiver.attempts == receiver.rejected == 5
    assert receiver.deliveries == []


async def test_unreachable_callback_gives_up_and_ends_the_job(
    start_worker: StartWorker, unused_tcp_port: int
) -> None:
    client = await start_worker()
    worker = client.app[external_worker.WORKER]
    form = _form(f"http://127.0.0.1:{unused_tcp_port}/api/tasks/webhook")

    response = await client.post("/jobs", data=form)
    assert response.status == 202
    results = await asyncio.wait_for(
        asyncio.gather(*worker.tasks, return_exceptions=True), timeout=30
    )

    assert results == [None]


def test_sign_matches_an_independent_hmac() -> None:
    body = b'{"externalTaskId": "x", "status": "completed"}'
    expected = hmac.new(b"k", b"1700000000." + body, hashlib.sha256).hexdigest()

    assert external_worker.sign("k", 1700000000, body) == f"sha256={expected}"


# --------------------------------------------------------------------------
# Lifecycle
# --------------------------------------------------------------------------


async def test_shutdown_cancels_running_jobs(
    start_worker: StartWorker, start_receiver: StartReceiver
) -> None:
    receiver = await start_receiver()
    client = await start_worker(delay=60)
    worker = client.app[external_worker.WORKER]

    await _submit(client, receiver)
    await asyncio.wait_for(receiver.delivered.wait(), timeout=30)
    tasks = set(worker.tasks)
    assert tasks

    await asyncio.wait_for(client.close(), timeout=10)

    # Cancelled, not swallowed into a "failed" webhook or a normal return.
    assert all(task.cancelled() for task in tasks)
    assert [d["status"] for d in receiver.deliveries] == ["processing"]


def test_create_app_refuses_an_empty_secret() -> None:
    with pytest.raises(ValueError, match="secret"):
        external_worker.create_app("")


# --------------------------------------------------------------------------
# Pseudo translation
# --------------------------------------------------------------------------


def _assert_pseudo_translated(text: str) -> None:
    for token in PLACEHOLDERS:
        assert token in text, token
    assert "Ĥéļļö" in text and "Hello" not in text
    assert "Ĝööðƀýé" in text
    assert "\n1\n" in text  # an SRT cue number has no letters: left alone
    assert text.count("\n\n") == DOCUMENT.count("\n\n")


def test_pseudo_translate_expands_about_thirty_percent() -> None:
    line = "The quick brown fox jumps over the lazy dog and keeps on running far away"

    out = external_worker.pseudo_translate(line)

    assert out.startswith("[") and out.endswith("]")
    assert 1.25 <= len(out) / len(line) <= 1.45


def test_pseudo_translate_keeps_markup_outside_brackets() -> None:
    out = external_worker.pseudo_translate("## Title\n- item `x`\n&amp; {{y}}\r\n")

    # A line of placeholders only has nothing to translate: it stays verbatim.
    assert out == "## [Ţîţļé ··]\n- [îţéɱ `x` ··]\n&amp; {{y}}\r\n"


def test_paragraph_split_round_trips() -> None:
    paragraphs, breaks = external_worker.split_paragraphs(DOCUMENT)

    assert len(paragraphs) == 3
    assert external_worker.join_paragraphs(paragraphs, breaks) == DOCUMENT
