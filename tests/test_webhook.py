"""The external service path: submission, the signed webhook, deadlines, restarts."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from helpers import SSEReader, add_user, create, free_port, get_task, wait_status

from external import sign
from processors import default_registry
from zhiyi_server import CONFIG, POOL, STORE, Config, create_app

sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))
import external_worker

SECRET = "s3cret"


class FakeService:
    """A loopback external service that records jobs; the test plays its callbacks."""

    def __init__(self) -> None:
        self.jobs: list[dict[str, Any]] = []
        self.fail_first = 0
        self.big_result = b""
        self.app = web.Application()
        self.app.router.add_post("/jobs", self.accept)
        self.app.router.add_get("/results/{name}", self.result)
        self.job_arrived = asyncio.Event()

    async def accept(self, request: web.Request) -> web.Response:
        if self.fail_first > 0:
            self.fail_first -= 1
            return web.Response(status=503)
        form = await request.post()
        job = {"externalTaskId": f"ext-{len(self.jobs) + 1}",
               "callbackUrl": form["callbackUrl"], "taskType": form["taskType"],
               "params": json.loads(form["params"]), "file": form["file"].file.read()}
        self.jobs.append(job)
        self.job_arrived.set()
        return web.json_response({"externalTaskId": job["externalTaskId"]}, status=202)

    async def result(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["name"] == "big":
            return web.Response(body=self.big_result)
        return web.Response(text="translated by the service")


def registry_with_external():
    registry = default_registry().copy()
    registry.external("remote", extensions=(".txt",), description="done elsewhere")
    return registry


@pytest.fixture
async def service(aiohttp_server) -> tuple[FakeService, TestServer]:
    fake = FakeService()
    return fake, await aiohttp_server(fake.app)


@pytest.fixture
async def zclient(aiohttp_client, tmp_path, service) -> TestClient:
    _, server = service
    port = free_port()
    config = Config(data_path=tmp_path / "data", webhook_secret=SECRET, worker_concurrency=2,
                    external_service_url=str(server.make_url("/jobs")),
                    public_url=f"http://127.0.0.1:{port}", retry_base_seconds=0.01,
                    reconcile_seconds=3600, max_upload_mb=1)
    app = create_app(config, registry=registry_with_external())
    return await aiohttp_client(TestServer(app, port=port))


async def deliver(client: TestClient, report: dict[str, Any], *, secret: str = SECRET,
                  timestamp: int | None = None, headers: dict[str, str] | None = None):
    body = json.dumps(report).encode()
    ts = int(time.time()) if timestamp is None else timestamp
    sent = {"Content-Type": "application/json", "X-Zhiyi-Timestamp": str(ts),
            "X-Zhiyi-Signature": sign(secret, ts, body)}
    return await client.post("/api/tasks/webhook", data=body,
                             headers=sent if headers is None else headers)


async def start_external(client: TestClient, service: FakeService, credits: int = 10):
    headers = await add_user(client, credits=credits)
    task_id = (await create(client, headers, task_type="remote", params={"x": "1"}))["taskId"]
    for _ in range(500):
        task = await get_task(client, headers, task_id)
        if task["externalTaskId"]:
            return headers, task_id, service.jobs[-1]
        await asyncio.sleep(0.01)
    raise AssertionError("the task never reached the external service")


async def state(client: TestClient, headers, task_id: int) -> tuple[dict, int, int]:
    task = await get_task(client, headers, task_id)
    me = await (await client.get("/api/me", headers=headers)).json()
    events = await client.app[STORE].latest_event_id(task_id=task_id)
    return task, me["credits"], events


async def test_external_flow_progress_and_completion(zclient, service) -> None:
    fake, _ = service
    headers, task_id, job = await start_external(zclient, fake)
    assert job["callbackUrl"] == f"{zclient.make_url('/api/tasks/webhook')}"
    assert job["taskType"] == "remote" and job["file"]
    task = await get_task(zclient, headers, task_id)
    assert task["taskStatus"] == "processing" and task["externalTaskId"] == "ext-1"
    stream = await zclient.get(f"/api/sse/tasks/{task_id}", headers=headers)
    reader = SSEReader(stream)
    await reader.next()
    resp = await deliver(zclient, {"externalTaskId": "ext-1", "status": "processing",
                                   "progress": 40, "message": "halfway"})
    assert resp.status == 200
    update = await reader.next()
    assert (update.payload["progress"], update.payload["message"]) == (40, "halfway")
    resp = await deliver(zclient, {"externalTaskId": "ext-1", "status": "completed",
                                   "progress": 100, "resultText": "完成 done"})
    assert resp.status == 200 and (await resp.json())["task"]["taskStatus"] == "completed"
    final = await reader.next()
    assert final.payload["status"] == "completed" and final.payload["resultUrl"]
    assert await reader.next() is None  # the task stream ends after the final event
    result = await zclient.get(final.payload["resultUrl"], headers=headers)
    assert (await result.read()).decode() == "完成 done"


async def test_with_the_example_worker(aiohttp_client, aiohttp_server, tmp_path) -> None:
    worker_app = external_worker.create_app(SECRET, delay=0.01)
    worker = await aiohttp_server(worker_app)
    port = free_port()
    config = Config(data_path=tmp_path / "data", webhook_secret=SECRET,
                    external_service_url=str(worker.make_url("/jobs")),
                    public_url=f"http://127.0.0.1:{port}", reconcile_seconds=3600)
    client = await aiohttp_client(TestServer(create_app(config), port=port))
    headers = await add_user(client, credits=10)
    text = "Hello {name}.\n\nSecond %s paragraph.\n\nThird.\n"
    task_id = (await create(client, headers, task_type="translate", content=text,
                            params={"targetLang": "fr", "engine": "external"}))["taskId"]
    stream = await client.get(f"/api/sse/tasks/{task_id}", headers={**headers,
                                                                     "Last-Event-ID": "0"})
    messages = await SSEReader(stream).collect_until_final()
    statuses = [m.payload["status"] for m in messages]
    assert statuses[0] == "pending" and statuses[-1] == "completed"
    progress = [m.payload["progress"] for m in messages if m.payload["status"] == "processing"]
    assert progress == sorted(progress) and max(progress) > 0
    result = await client.get(messages[-1].payload["resultUrl"], headers=headers)
    translated = (await result.read()).decode()
    assert "{name}" in translated and "%s" in translated and translated != text


@pytest.mark.parametrize("case", ["bad_signature", "missing_headers", "stale", "future",
                                  "wrong_secret"])
async def test_bad_signatures_are_401_and_change_nothing(zclient, service, case) -> None:
    fake, _ = service
    headers, task_id, _ = await start_external(zclient, fake)
    before = await state(zclient, headers, task_id)
    report = {"externalTaskId": "ext-1", "status": "completed", "resultText": "x"}
    if case == "bad_signature":
        resp = await deliver(zclient, report, headers={
            "X-Zhiyi-Timestamp": str(int(time.time())), "X-Zhiyi-Signature": "sha256=00"})
    elif case == "missing_headers":
        resp = await deliver(zclient, report, headers={})
    elif case == "stale":
        resp = await deliver(zclient, report, timestamp=int(time.time()) - 301)
    elif case == "future":
        resp = await deliver(zclient, report, timestamp=int(time.time()) + 301)
    else:
        resp = await deliver(zclient, report, secret="not-the-secret")
    assert resp.status == 401
    body = await resp.json()
    assert body["code"] == "bad_signature" and body["message"]
    assert await state(zclient, headers, task_id) == before


async def test_unknown_id_404_and_malformed_400(zclient, service) -> None:
    fake, _ = service
    headers, task_id, _ = await start_external(zclient, fake)
    before = await state(zclient, headers, task_id)
    resp = await deliver(zclient, {"externalTaskId": "nope", "status": "completed"})
    assert resp.status == 404
    ts = int(time.time())
    for body in (b"{not json", b"[]", json.dumps({"externalTaskId": "ext-1",
                                                  "status": "weird"}).encode(),
                 b'{"externalTaskId": "ext-1", "status": "processing", "progress": NaN}',
                 b'{"externalTaskId": "ext-1", "status": "processing", "progress": 1e999}',
                 b'{"externalTaskId": 7, "status": "processing"}'):
        resp = await zclient.post("/api/tasks/webhook", data=body, headers={
            "X-Zhiyi-Timestamp": str(ts), "X-Zhiyi-Signature": sign(SECRET, ts, body)})
        assert resp.status == 400, body
    assert await state(zclient, headers, task_id) == before


async def test_duplicates_and_late_deliveries_change_nothing(zclient, service) -> None:
    fake, _ = service
    headers, task_id, _ = await start_external(zclient, fake, credits=10)
    done = {"externalTaskId": "ext-1", "status": "completed", "resultText": "first"}
    assert (await deliver(zclient, done)).status == 200
    after = await state(zclient, headers, task_id)
    for report in (done, {**done, "resultText": "second"},
                   {"externalTaskId": "ext-1", "status": "failed", "message": "late"},
                   {"externalTaskId": "ext-1", "status": "processing", "progress": 10}):
        resp = await deliver(zclient, report)
        assert resp.status == 200
    assert await state(zclient, headers, task_id) == after
    result = await zclient.get(f"/api/tasks/{task_id}/result", headers=headers)
    assert await result.text() == "first"


async def test_failed_refunds_once(zclient, service) -> None:
    fake, _ = service
    headers, task_id, _ = await start_external(zclient, fake, credits=10)
    fail = {"externalTaskId": "ext-1", "status": "failed", "message": "GPU on fire"}
    for _ in range(3):
        assert (await deliver(zclient, fail)).status == 200
    task, credits, _ = await state(zclient, headers, task_id)
    assert task["taskStatus"] == "failed" and task["errorCode"] == "external_error"
    assert task["errorMessage"] == "GPU on fire" and credits == 10
    ledger = await (await zclient.get("/api/me/ledger", headers=headers)).json()
    assert [e["reason"] for e in ledger["entries"]].count("refund") == 1


async def test_cancelled_task_ignores_callbacks(zclient, service) -> None:
    fake, _ = service
    headers, task_id, _ = await start_external(zclient, fake, credits=10)
    await zclient.post(f"/api/tasks/{task_id}/cancel", headers=headers)
    before = await state(zclient, headers, task_id)
    resp = await deliver(zclient, {"externalTaskId": "ext-1", "status": "completed",
                                   "resultText": "too late"})
    assert resp.status == 200
    assert await state(zclient, headers, task_id) == before


@pytest.mark.parametrize("where", ["other_origin", "too_big"])
async def test_bad_result_url_fails_cleanly(zclient, service, where) -> None:
    fake, server = service
    fake.big_result = b"x" * (2 * 1024 * 1024)  # over the 1 MB cap
    headers, task_id, _ = await start_external(zclient, fake, credits=10)
    url = ("http://198.51.100.7/evil.txt" if where == "other_origin"
           else str(server.make_url("/results/big")))
    resp = await deliver(zclient, {"externalTaskId": "ext-1", "status": "completed",
                                   "resultUrl": url})
    assert resp.status == 200
    body = await resp.json()
    assert body["success"] is True
    task, credits, _ = await state(zclient, headers, task_id)
    assert task["taskStatus"] == "failed" and task["errorCode"] == "external_error"
    assert ("origin" in task["errorMessage"]) if where == "other_origin" else (
        "cap" in task["errorMessage"])
    assert credits == 10
    assert not list(zclient.app[CONFIG].data_path.rglob("result/*"))


async def test_result_url_from_the_service_is_downloaded(zclient, service) -> None:
    fake, server = service
    headers, task_id, _ = await start_external(zclient, fake)
    resp = await deliver(zclient, {"externalTaskId": "ext-1", "status": "completed",
                                   "resultUrl": str(server.make_url("/results/ok"))})
    assert resp.status == 200
    result = await zclient.get(f"/api/tasks/{task_id}/result", headers=headers)
    assert await result.text() == "translated by the service"


async def test_submission_errors_retry_then_succeed(zclient, service) -> None:
    fake, _ = service
    fake.fail_first = 2
    headers, task_id, _ = await start_external(zclient, fake)
    assert (await get_task(zclient, headers, task_id))["externalTaskId"] == "ext-1"


async def test_no_secret_refuses_every_webhook(make_client) -> None:
    client = await make_client(worker_concurrency=0)
    resp = await deliver(client, {"externalTaskId": "x", "status": "completed"})
    assert resp.status == 401
    body = await resp.json()
    assert body["code"] == "webhook_disabled" and "WEBHOOK_SECRET" in body["message"]


async def test_deadline_and_restart(aiohttp_client, tmp_path, service) -> None:
    """The deadline is in the database: a restart keeps waiting, or fails when it passed."""
    fake, server = service
    port = free_port()
    base = Config(data_path=tmp_path / "data", webhook_secret=SECRET,
                  external_service_url=str(server.make_url("/jobs")),
                  public_url=f"http://127.0.0.1:{port}", reconcile_seconds=3600)
    client = await aiohttp_client(TestServer(create_app(base,
                                                        registry=registry_with_external())))
    headers, first, _ = await start_external(client, fake, credits=10)
    second = (await create(client, headers, task_type="remote", params={}))["taskId"]
    await wait_external(client, headers, second)
    await client.close()

    # Restart: both still wait; a callback completes the first.
    client = await aiohttp_client(TestServer(create_app(base,
                                                        registry=registry_with_external())))
    assert (await get_task(client, headers, first))["taskStatus"] == "processing"
    assert (await deliver(client, {"externalTaskId": "ext-1", "status": "completed",
                                   "resultText": "after restart"})).status == 200
    assert (await get_task(client, headers, first))["taskStatus"] == "completed"
    await client.close()

    # Restart with a deadline that has passed while the server was down.
    client = await aiohttp_client(TestServer(create_app(base,
                                                        registry=registry_with_external())))
    with sqlite3.connect(base.database) as db:  # as if the deadline passed while down
        db.execute("UPDATE processing_tasks SET external_deadline = "
                   "'2000-01-01T00:00:00.000Z' WHERE id = ?", (second,))
    await client.app[POOL].recover()
    task = await wait_status(client, headers, second, "failed")
    assert task["errorCode"] == "external_timeout"
    me = await (await client.get("/api/me", headers=headers)).json()
    assert me["credits"] == 10 - 1  # the completed one stays charged, the failed one refunded


async def wait_external(client, headers, task_id: int) -> None:
    for _ in range(500):
        if (await get_task(client, headers, task_id))["externalTaskId"]:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("not submitted")
