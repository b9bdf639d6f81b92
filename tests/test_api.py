"""The HTTP contract of the foundation: every endpoint's success path and errors."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from fakes import FakeLibreTranslate
from helpers import add_user, create, form

import engines
from zhiyi_server import (
    CONFIG,
    NOT_SET_UP,
    STORE,
    WRITE_AT_ONCE_BYTES,
    Config,
    clean_file_name,
    content_disposition,
    create_app,
)

pytestmark = pytest.mark.both_stores  # once on SQLite, once on PostgreSQL


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.suffix not in {".db", ".db-wal",
                                                                          ".db-shm"}
            and "zhiyi.db" not in p.name]


async def balance(client: TestClient, headers: dict[str, str]) -> int:
    return (await (await client.get("/api/me", headers=headers)).json())["credits"]


async def test_me_and_unauthenticated(idle_client: TestClient) -> None:
    headers = await add_user(idle_client, "alice", 7)
    resp = await idle_client.get("/api/me", headers=headers)
    assert resp.status == 200
    assert await resp.json() == {"success": True, "userId": "alice", "credits": 7}
    for path in ("/api/me", "/api/tasks", "/api/me/ledger", "/api/tasks/1"):
        resp = await idle_client.get(path)
        body = await resp.json()
        assert resp.status == 401
        assert body["code"] == "unauthenticated" and body["success"] is False
        assert body["message"]
    resp = await idle_client.get("/api/me", headers={"Authorization": "Bearer nope"})
    assert resp.status == 401


async def test_create_get_list_pending(idle_client: TestClient) -> None:
    headers = await add_user(idle_client)
    body = await create(idle_client, headers, content="Hello.\n\nWorld.\n", name="a.txt")
    task = body["task"]
    assert body["success"] is True
    assert body["taskId"] == task["taskId"]
    assert body["sseUrl"] == f"/api/sse/tasks/{task['taskId']}"
    assert task["taskStatus"] == "pending" and task["progressPercent"] == 0
    assert task["fileName"] == "a.txt" and task["fileSize"] == 15
    assert task["creditsCost"] == 1 and task["userId"] == "alice"
    assert task["params"] == {"targetLang": "zh", "engine": "pseudo", "sourceLang": "auto"}
    for field in ("externalTaskId", "errorMessage", "resultUrl", "completedAt", "stage",
                  "etaSeconds", "errorCode", "createdAt", "updatedAt", "attempts"):
        assert field in task
    assert task["createdAt"].endswith("Z")
    resp = await idle_client.get(f"/api/tasks/{task['taskId']}", headers=headers)
    assert (await resp.json())["task"]["taskId"] == task["taskId"]
    resp = await idle_client.get("/api/tasks", headers=headers)
    listing = await resp.json()
    assert [t["taskId"] for t in listing["tasks"]] == [task["taskId"]]
    assert listing["nextCursor"] is None
    assert await balance(idle_client, headers) == 99


async def test_list_pagination_and_filters(idle_client: TestClient) -> None:
    headers = await add_user(idle_client)
    ids = [(await create(idle_client, headers))["taskId"] for _ in range(5)]
    resp = await idle_client.get("/api/tasks?limit=2", headers=headers)
    page = await resp.json()
    assert [t["taskId"] for t in page["tasks"]] == ids[::-1][:2]
    seen = [t["taskId"] for t in page["tasks"]]
    while page["nextCursor"] is not None:
        page = await (await idle_client.get(
            f"/api/tasks?limit=2&cursor={page['nextCursor']}", headers=headers)).json()
        seen += [t["taskId"] for t in page["tasks"]]
    assert seen == ids[::-1]
    await idle_client.post(f"/api/tasks/{ids[0]}/cancel", headers=headers)
    page = await (await idle_client.get("/api/tasks?status=cancelled", headers=headers)).json()
    assert [t["taskId"] for t in page["tasks"]] == [ids[0]]
    for bad in ("limit=0", "limit=x", "status=bogus", "cursor=abc", f"cursor={10**30}"):
        resp = await idle_client.get(f"/api/tasks?{bad}", headers=headers)
        assert resp.status == 400, bad
        assert (await resp.json())["code"] == "bad_request"
    page = await (await idle_client.get("/api/tasks?limit=1000", headers=headers)).json()
    assert len(page["tasks"]) == 5


async def test_other_users_task_is_404(idle_client: TestClient) -> None:
    alice = await add_user(idle_client, "alice")
    bob = await add_user(idle_client, "bob")
    task_id = (await create(idle_client, alice))["taskId"]
    for method, path in (("GET", f"/api/tasks/{task_id}"), ("DELETE", f"/api/tasks/{task_id}"),
                         ("POST", f"/api/tasks/{task_id}/cancel"),
                         ("POST", f"/api/tasks/{task_id}/retry"),
                         ("GET", f"/api/tasks/{task_id}/result"),
                         ("GET", f"/api/sse/tasks/{task_id}"),
                         ("GET", "/api/tasks/999999"), ("GET", "/api/tasks/notanumber"),
                         ("GET", f"/api/tasks/{10**30}"), ("GET", f"/api/sse/tasks/{10**30}")):
        resp = await idle_client.request(method, path, headers=bob)
        assert resp.status == 404, (method, path)
        assert (await resp.json())["code"] == "task_not_found"
    assert (await (await idle_client.get(f"/api/tasks/{task_id}", headers=alice)).json())[
        "task"]["taskStatus"] == "pending"


async def assert_nothing_changed(client: TestClient, headers: dict[str, str], credits: int,
                                 data_path: Path) -> None:
    assert await balance(client, headers) == credits
    tasks = (await (await client.get("/api/tasks", headers=headers)).json())["tasks"]
    assert tasks == []
    assert files_under(data_path) == []
    entries = (await (await client.get("/api/me/ledger", headers=headers)).json())["entries"]
    assert [e["reason"] for e in entries] == ["grant"]


@pytest.mark.parametrize(("kwargs", "status", "code"), [
    ({"task_type": "nonsense"}, 400, "unknown_task_type"),
    ({"params": "{not json"}, 400, "bad_params"),
    ({"params": "[1, 2]"}, 400, "bad_params"),
    ({"params": "{" + " " * 70_000 + "}"}, 413, "too_large"),
    ({"params": {"engine": "pseudo"}}, 400, "bad_params"),
    ({"params": {"targetLang": "zh", "engine": "warp-drive"}}, 400, "unknown_engine"),
    ({"params": {"targetLang": "zh", "engine": "openai"}}, 400, "unknown_engine"),
    ({"name": "virus.exe"}, 415, "unsupported_file_type"),
    ({"name": "noext"}, 415, "unsupported_file_type"),
    ({"content": b""}, 422, "bad_document"),
    ({"content": b"PK\x03\x04 not really", "name": "x.docx"}, 422, "bad_document"),
    ({"content": b"%PDF-1.4 garbage", "name": "x.pdf"}, 422, "bad_document"),
])
async def test_create_errors_leave_nothing(idle_client: TestClient, config, kwargs, status,
                                           code) -> None:
    headers = await add_user(idle_client, credits=10)
    resp = await idle_client.post("/api/tasks/create", data=form(**kwargs), headers=headers)
    body = await resp.json()
    assert resp.status == status, body
    assert body["code"] == code and body["success"] is False and body["message"]
    await assert_nothing_changed(idle_client, headers, 10, config.data_path)


async def test_create_not_multipart_and_missing_file(idle_client: TestClient, config) -> None:
    headers = await add_user(idle_client, credits=10)
    broken = (b'--zz\r\nContent-Disposition: form-data; name="i\x12"\r\n\r\nx\r\n--zz--\r\n')
    resp = await idle_client.post("/api/tasks/create", data=broken, headers={
        **headers, "Content-Type": "multipart/form-data; boundary=zz"})
    assert resp.status == 400 and (await resp.json())["code"] == "bad_request"
    resp = await idle_client.post("/api/tasks/create", json={"taskType": "analyze"},
                                  headers=headers)
    assert resp.status == 400
    data = aiohttp.FormData(default_to_multipart=True)
    data.add_field("taskType", "analyze")
    resp = await idle_client.post("/api/tasks/create", data=data, headers=headers)
    assert resp.status == 400 and (await resp.json())["code"] == "missing_file"
    await assert_nothing_changed(idle_client, headers, 10, config.data_path)


async def test_insufficient_credits_402(idle_client: TestClient, config) -> None:
    headers = await add_user(idle_client, credits=0)
    resp = await idle_client.post("/api/tasks/create", data=form(), headers=headers)
    body = await resp.json()
    assert resp.status == 402 and body["code"] == "insufficient_credits"
    assert "balance is 0" in body["message"]
    assert await balance(idle_client, headers) == 0
    assert files_under(config.data_path) == []


async def test_too_large_413_streaming(make_client, config) -> None:
    client = await make_client(worker_concurrency=0, max_upload_mb=1)
    headers = await add_user(client, credits=10)
    big = b"word " * (300 * 1024)  # 1.5 MB

    async def chunks():
        # A streamed body has no Content-Length: the cap must hold while reading.
        boundary = b"XyZ"
        yield (b"--XyZ\r\nContent-Disposition: form-data; name=\"taskType\"\r\n\r\n"
               b"analyze\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"; "
               b"filename=\"big.txt\"\r\n\r\n")
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]
        yield b"\r\n--" + boundary + b"--\r\n"

    resp = await client.post("/api/tasks/create", data=chunks(), headers={
        **headers, "Content-Type": "multipart/form-data; boundary=XyZ"})
    body = await resp.json()
    assert resp.status == 413 and body["code"] == "file_too_large"
    await assert_nothing_changed(client, headers, 10, config.data_path)
    resp = await client.post("/api/tasks/create", data=form(big, task_type="analyze"),
                             headers=headers)
    assert resp.status == 413
    await assert_nothing_changed(client, headers, 10, config.data_path)


async def test_too_many_active_tasks_429(make_client, config) -> None:
    client = await make_client(worker_concurrency=0, max_active_tasks_per_user=2)
    headers = await add_user(client, credits=10)
    await create(client, headers)
    await create(client, headers)
    resp = await client.post("/api/tasks/create", data=form(), headers=headers)
    assert resp.status == 429 and (await resp.json())["code"] == "too_many_active_tasks"
    assert await balance(client, headers) == 8
    tasks = (await (await client.get("/api/tasks", headers=headers)).json())["tasks"]
    await client.post(f"/api/tasks/{tasks[0]['taskId']}/cancel", headers=headers)
    await create(client, headers)
    resp = await client.post(f"/api/tasks/{tasks[0]['taskId']}/retry", headers=headers)
    assert resp.status == 429 and (await resp.json())["code"] == "too_many_active_tasks"
    assert await balance(client, headers) == 8


async def test_idempotency_key(idle_client: TestClient) -> None:
    alice = await add_user(idle_client, "alice", 10)
    bob = await add_user(idle_client, "bob", 10)
    first = await create(idle_client, alice, extra_headers={"Idempotency-Key": "k1"})
    resp = await idle_client.post("/api/tasks/create", data=form(),
                                  headers={**alice, "Idempotency-Key": "k1"})
    assert resp.status == 200
    assert (await resp.json())["taskId"] == first["taskId"]
    assert await balance(idle_client, alice) == 9
    other = await create(idle_client, bob, extra_headers={"Idempotency-Key": "k1"})
    assert other["taskId"] != first["taskId"]
    tasks = (await (await idle_client.get("/api/tasks", headers=alice)).json())["tasks"]
    assert len(tasks) == 1


async def test_cancel_retry_delete_and_ledger(idle_client: TestClient, config) -> None:
    headers = await add_user(idle_client, credits=5)
    task_id = (await create(idle_client, headers))["taskId"]
    resp = await idle_client.post(f"/api/tasks/{task_id}/cancel", headers=headers)
    assert resp.status == 200
    assert (await resp.json())["task"]["taskStatus"] == "cancelled"
    assert await balance(idle_client, headers) == 5
    resp = await idle_client.post(f"/api/tasks/{task_id}/cancel", headers=headers)
    assert resp.status == 409 and (await resp.json())["code"] == "invalid_state"
    resp = await idle_client.post(f"/api/tasks/{task_id}/retry", headers=headers)
    assert resp.status == 200
    assert (await resp.json())["task"]["taskStatus"] == "pending"
    assert await balance(idle_client, headers) == 4
    resp = await idle_client.post(f"/api/tasks/{task_id}/retry", headers=headers)
    assert resp.status == 409
    resp = await idle_client.get(f"/api/tasks/{task_id}/result", headers=headers)
    assert resp.status == 409 and (await resp.json())["code"] == "not_completed"
    resp = await idle_client.delete(f"/api/tasks/{task_id}", headers=headers)
    assert resp.status == 200
    assert await balance(idle_client, headers) == 5
    assert files_under(config.data_path) == []
    resp = await idle_client.get(f"/api/tasks/{task_id}", headers=headers)
    assert resp.status == 404
    ledger = await (await idle_client.get("/api/me/ledger", headers=headers)).json()
    reasons = [(e["reason"], e["amount"]) for e in ledger["entries"]]
    assert reasons == [("refund", 1), ("charge", -1), ("refund", 1), ("charge", -1),
                       ("grant", 5)]
    assert ledger["entries"][0]["balanceAfter"] == 5
    assert ledger["entries"][0]["taskId"] == task_id


async def test_retry_402_when_broke(idle_client: TestClient) -> None:
    headers = await add_user(idle_client, credits=1)
    task_id = (await create(idle_client, headers))["taskId"]
    await idle_client.post(f"/api/tasks/{task_id}/cancel", headers=headers)
    await idle_client.app[STORE].grant_credits("alice", -1)
    resp = await idle_client.post(f"/api/tasks/{task_id}/retry", headers=headers)
    assert resp.status == 402 and (await resp.json())["code"] == "insufficient_credits"
    task = (await (await idle_client.get(f"/api/tasks/{task_id}", headers=headers)).json())
    assert task["task"]["taskStatus"] == "cancelled"


async def test_task_types(idle_client: TestClient) -> None:
    headers = await add_user(idle_client)
    body = await (await idle_client.get("/api/task-types", headers=headers)).json()
    types = {t["taskType"]: t for t in body["taskTypes"]}
    assert {"translate", "analyze", "extract"} <= set(types)
    translate = types["translate"]
    assert translate["params"]["targetLang"]["required"] is True
    assert ".docx" in translate["extensions"] and translate["cost"]
    engines = {e["name"]: e for e in translate["engines"]}
    assert engines["pseudo"]["available"] is True
    assert engines["openai"]["available"] is False and engines["openai"]["reason"]
    assert engines["external"]["available"] is False
    assert "engines" not in types["analyze"]
    # Every accepted extension says what it becomes.
    for task_type in ("translate", "extract", "analyze"):
        assert set(types[task_type]["results"]) == set(types[task_type]["extensions"])
    assert {".pptx", ".xlsx", ".xlf", ".xliff", ".po"} <= set(translate["extensions"])
    assert translate["results"][".pdf"] == ".docx"
    assert translate["results"][".xlsx"] == ".xlsx"
    assert types["extract"]["results"][".docx"] == ".txt"


async def test_healthz_metrics_openapi_and_envelopes(idle_client: TestClient) -> None:
    resp = await idle_client.get("/healthz")
    assert resp.status == 200 and (await resp.json())["success"] is True
    resp = await idle_client.get("/metrics")
    assert resp.status == 200
    assert "zhiyi_sse_connections" in await resp.text()
    resp = await idle_client.get("/api/openapi.yaml")
    assert resp.status == 200 and "openapi:" in await resp.text()
    resp = await idle_client.get("/api/does-not-exist")
    assert resp.status == 404 and (await resp.json())["code"] == "not_found"
    resp = await idle_client.put("/api/me")
    assert resp.status == 405 and (await resp.json())["code"] == "method_not_allowed"
    resp = await idle_client.get("/nothing-here")
    assert resp.status == 404 and (await resp.json())["success"] is False


async def test_session_cookie_login_and_logout(idle_client: TestClient) -> None:
    headers = await add_user(idle_client)
    token = headers["Authorization"].split()[1]
    resp = await idle_client.post("/api/session", json={"token": "wrong"})
    assert resp.status == 401
    resp = await idle_client.post("/api/session", json={"token": token})
    assert resp.status == 200
    cookie = resp.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert (await idle_client.get("/api/me")).status == 200
    same_origin = {"Origin": str(idle_client.make_url("/")).rstrip("/")}
    assert (await idle_client.delete("/api/session", headers=same_origin)).status == 200
    idle_client.session.cookie_jar.clear()
    assert (await idle_client.get("/api/me")).status == 401
    navigation = {"Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}
    resp = await idle_client.get(f"/?token={token}", allow_redirects=False, headers=navigation)
    assert resp.status == 302 and resp.headers["Location"] == "/"
    assert "HttpOnly" in resp.headers["Set-Cookie"]
    assert (await idle_client.get("/api/me")).status == 200
    idle_client.session.cookie_jar.clear()
    resp = await idle_client.get("/?token=bad", allow_redirects=False, headers=navigation)
    assert resp.status == 302 and "login-failed" in resp.headers["Location"]
    resp = await idle_client.get("/")
    assert resp.status == 200 and "text/html" in resp.headers["Content-Type"]


def test_clean_file_name() -> None:
    assert clean_file_name("../../etc/passwd") == "passwd"
    assert clean_file_name("C:\\Users\\x\\report.docx") == "report.docx"
    assert clean_file_name("a\x00b\nc.txt") == "abc.txt"
    assert clean_file_name("..") == "upload"
    assert clean_file_name("") == "upload"
    assert clean_file_name(None) == "upload"
    assert clean_file_name("报告.txt") == "报告.txt"


def test_content_disposition_utf8() -> None:
    header = content_disposition("报告 final.txt")
    assert header.startswith('attachment; filename="')
    assert "filename*=UTF-8''%E6%8A%A5%E5%91%8A%20final.txt" in header


async def test_uploaded_name_is_cleaned_and_path_is_server_made(idle_client, config) -> None:
    headers = await add_user(idle_client)
    body = await create(idle_client, headers, name="../../escape.txt")
    assert body["task"]["fileName"] == "escape.txt"
    stored = files_under(config.data_path)
    # Beside the upload, in the same task folder, the parse made for pricing (kept for the
    # attempt): its segments and statistics.
    uploaded = [p for p in stored if p.parent.name != "work"]
    assert len(uploaded) == 1
    assert uploaded[0].parent.name == "original"
    assert uploaded[0].is_relative_to(config.data_path / "alice")
    assert sorted(p.name for p in stored if p.parent.name == "work") == [
        "escape.txt.parsed.json", "escape.txt.segments.jsonl", "escape.txt.tokens.json"]
    assert {p.parent.parent for p in stored} == {uploaded[0].parent.parent}
    json.dumps(body)


@pytest.mark.parametrize("size", [1, WRITE_AT_ONCE_BYTES, WRITE_AT_ONCE_BYTES + 1,
                                  3 * WRITE_AT_ONCE_BYTES + 7])
async def test_an_upload_is_stored_byte_for_byte_and_private(idle_client, config,
                                                             size: int) -> None:
    """Written at once when small, streamed past ``WRITE_AT_ONCE_BYTES``: the same bytes."""
    headers = await add_user(idle_client, credits=10_000)
    content = "".join(f"line {i}\n" for i in range(size))[:size]
    await create(idle_client, headers, content=content)
    [stored] = [p for p in files_under(config.data_path) if p.parent.name == "original"]
    assert stored.read_text() == content
    assert stored.stat().st_mode & 0o777 == 0o600


# ------------------------------------------------ what a page learns about engines
async def test_task_types_say_languages_default_and_test_engine(make_client,
                                                                aiohttp_server) -> None:
    """LibreTranslate's own /languages; the best configured engine is the default; pseudo
    is marked as the test engine; a request from this machine reads how to enable one."""
    fake = FakeLibreTranslate()
    server = await aiohttp_server(fake.app)
    client = await make_client(libretranslate_url=fake.url(server))
    headers = await add_user(client)
    body = await (await client.get("/api/task-types", headers=headers)).json()
    translate = next(t for t in body["taskTypes"] if t["taskType"] == "translate")
    found = {e["name"]: e for e in translate["engines"]}
    assert translate["defaultEngine"] == "libretranslate"
    assert translate["params"]["engine"]["default"] == "pseudo"  # the API's default stays
    assert found["libretranslate"]["languages"] == ["de", "en", "fr", "zh"]
    assert found["pseudo"] == {**found["pseudo"], "test": True, "languages": None}
    assert not any(e["test"] for name, e in found.items() if name != "pseudo")
    assert "OPENAI" in found["openai"]["reason"]  # loopback: the administrator's hint
    assert body["maxUploadMb"] > 0 and body["maxAttempts"] >= 1


async def test_without_a_real_engine_pseudo_is_the_default(idle_client) -> None:
    headers = await add_user(idle_client)
    body = await (await idle_client.get("/api/task-types", headers=headers)).json()
    translate = next(t for t in body["taskTypes"] if t["taskType"] == "translate")
    assert translate["defaultEngine"] == "pseudo"


def test_best_engine_first() -> None:
    assert engines.default_engine(["pseudo", "openai", "libretranslate"]) == "openai"
    assert engines.default_engine(["pseudo", "deepl", "openai"]) == "deepl"
    assert engines.default_engine(["pseudo"]) == "pseudo"
    assert engines.default_engine([]) == "pseudo"


async def test_hints_only_for_administrators(make_client, aiohttp_client) -> None:
    """A translator on another machine reads a plain sentence, not how to enable an
    engine; an administrator (or anyone on the server's own machine) reads how."""
    address = _own_address()
    if address is None:
        pytest.skip("this machine has no address but loopback")
    client = await make_client()
    app = create_app(Config(**{**client.app[CONFIG].__dict__}))
    remote = await aiohttp_client(app, server_kwargs={"host": "0.0.0.0"})
    headers = await add_user(remote)
    url = f"http://{address}:{remote.server.port}/api/task-types"
    async with remote.session.get(url, headers=headers) as reply:
        body = await reply.json()
    translate = next(t for t in body["taskTypes"] if t["taskType"] == "translate")
    found = {e["name"]: e for e in translate["engines"]}
    assert found["openai"]["available"] is False
    assert found["openai"]["reason"] == NOT_SET_UP
    assert found["pseudo"]["reason"] is None
    await remote.app[STORE].add_user("root", 0, admin=True)
    admin = {"Authorization": f"Bearer {await remote.app[STORE].issue_token('root')}"}
    async with remote.session.get(url, headers=admin) as reply:
        body = await reply.json()
    translate = next(t for t in body["taskTypes"] if t["taskType"] == "translate")
    found = {e["name"]: e for e in translate["engines"]}
    assert "OPENAI" in found["openai"]["reason"]


def _own_address() -> str | None:
    """This machine's address on its default route (no packet is sent), if not loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


async def test_detected_language_is_kept_with_the_task(idle_client: TestClient) -> None:
    """With ``sourceLang: auto`` a person sees which language was found (and the quote)."""
    headers = await add_user(idle_client)
    text = ("The committee met on Tuesday to discuss the budget for next year. "
            "Everyone agreed that the library needs new windows before the winter.\n") * 3
    body = await create(idle_client, headers, content=text,
                        params={"targetLang": "fr", "engine": "pseudo"})
    assert body["task"]["detectedLang"] == "en" and body["quote"]["language"] == "en"
    got = await (await idle_client.get(f"/api/tasks/{body['taskId']}", headers=headers)).json()
    assert got["task"]["detectedLang"] == "en"
