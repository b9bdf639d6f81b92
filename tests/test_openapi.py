"""openapi.yaml is a valid OpenAPI 3.1 document that matches the app, both ways.

- the document validates (``openapi_spec_validator``);
- every route the app registers is in ``paths`` with its method, and every
  path and method of ``paths`` is a route of the app;
- ``/api/openapi.yaml`` serves this very file;
- real answers of the real app (status codes, JSON bodies, SSE messages) are
  what the document says, checked with JSON Schema against its schemas.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestClient
from openapi_schema_validator import OAS31Validator
from openapi_schema_validator import validate as validate_instance
from openapi_spec_validator import validate as validate_spec
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

import zhiyi_server

SPEC_PATH = Path(__file__).resolve().parent.parent / "openapi.yaml"
DOC_URI = "urn:zhiyi:openapi.yaml"
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
#: routes that are not API operations: the static files, and a catch-all for unknown /api/
#: paths should one be registered again (it answers 404 JSON)
UNDOCUMENTED = {"/api/{tail}"}
STATIC_PREFIX = "/static"


# -------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8"))


def _pointer(*parts: str) -> str:
    """A JSON pointer fragment (``#/a/b``) with ``~`` and ``/`` escaped."""
    return "#/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def _lookup(spec: dict[str, Any], fragment: str) -> Any:
    node: Any = spec
    for part in fragment.removeprefix("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def check_schema(spec: dict[str, Any], instance: Any, fragment: str) -> None:
    """Validate ``instance`` against the schema at ``fragment``, ``$ref``s resolved in the doc."""
    registry = Registry().with_resource(
        DOC_URI, Resource.from_contents(spec, default_specification=DRAFT202012)
    )
    validate_instance(instance, {"$ref": DOC_URI + fragment}, cls=OAS31Validator, registry=registry)


def documented_response(
    spec: dict[str, Any], path: str, method: str, status: int
) -> tuple[str, dict[str, Any]]:
    """The response object of an operation for ``status`` (and its pointer); fails if absent."""
    responses = spec["paths"][path][method]["responses"]
    assert str(status) in responses, (
        f"{method.upper()} {path} answered {status}, which openapi.yaml does not document "
        f"(it has {sorted(responses)})"
    )
    fragment = _pointer("paths", path, method, "responses", str(status))
    response = responses[str(status)]
    if "$ref" in response:
        fragment = response["$ref"]
        response = _lookup(spec, fragment)
    return fragment, response


async def check_response(
    spec: dict[str, Any],
    resp: aiohttp.ClientResponse,
    path: str,
    method: str,
    status: int | None = None,
) -> Any:
    """Assert the answer is documented and its JSON body matches the documented schema."""
    if status is not None:
        assert resp.status == status, await resp.text()
    fragment, response = documented_response(spec, path, method, resp.status)
    content = response.get("content")
    if not content:
        assert await resp.read() == b"", f"{method.upper()} {path} {resp.status} has a body"
        return None
    assert resp.content_type in content, (
        f"{method.upper()} {path} {resp.status} answered {resp.content_type}, "
        f"documented: {sorted(content)}"
    )
    if resp.content_type != "application/json":
        return None  # a file or a stream: the caller reads it
    body = await resp.json()
    check_schema(spec, body, fragment + "/" + _pointer("content", "application/json", "schema")[2:])
    if resp.status >= 400:
        check_schema(spec, body, "#/components/schemas/Error")
    return body


def app_operations(app: Any) -> set[tuple[str, str]]:
    """``(path template, method)`` of every route, minus HEAD, static files and the catch-all."""
    ops = set()
    for route in app.router.routes():
        canonical, method = route.resource.canonical, route.method
        if method == "HEAD":
            continue
        if canonical == STATIC_PREFIX or canonical.startswith(STATIC_PREFIX + "/"):
            continue
        if canonical in UNDOCUMENTED and method == "*":
            continue
        ops.add((canonical, method.lower()))
    return ops


def doc_operations(spec: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (path, method)
        for path, item in spec["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }


def is_protected(spec: dict[str, Any], path: str, method: str) -> bool:
    security = spec["paths"][path][method].get("security", spec.get("security", []))
    return bool(security)


def sign(secret: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    mac = hmac.new(secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return {
        "X-Zhiyi-Timestamp": stamp,
        "X-Zhiyi-Signature": f"sha256={mac}",
        "Content-Type": "application/json",
    }


def upload(
    content: bytes = b"Hello world.\n\nA second paragraph.\n",
    *,
    name: str = "hello.txt",
    task_type: str = "analyze",
    params: str | None = None,
) -> aiohttp.FormData:
    data = aiohttp.FormData()
    data.add_field("taskType", task_type)
    if params is not None:
        data.add_field("params", params)
    data.add_field("file", content, filename=name, content_type="text/plain")
    return data


async def read_sse(
    resp: aiohttp.ClientResponse,
    *,
    count: int | None = None,
    until_type: str | None = None,
    timeout: float = 15,
) -> tuple[list[str], list[dict[str, str]]]:
    """Parse an SSE body: (the ``retry:`` values, the messages as field dicts).

    Reads until the stream ends, until ``count`` messages have arrived, or until
    a message whose JSON ``type`` is ``until_type``.
    """
    retries: list[str] = []
    messages: list[dict[str, str]] = []
    current: dict[str, str] = {}
    async with asyncio.timeout(timeout):
        async for raw in resp.content:
            line = raw.decode("utf-8").rstrip("\r\n")
            if not line:
                if "data" in current:
                    messages.append(current)
                    if count is not None and len(messages) >= count:
                        break
                    if until_type and json.loads(current["data"]).get("type") == until_type:
                        break
                current = {}
                continue
            if line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "retry":
                retries.append(value)
            else:
                assert field not in current, f"repeated field {field!r} in one message"
                current[field] = value
    return retries, messages


def check_sse_messages(spec: dict[str, Any], messages: list[dict[str, str]]) -> list[Any]:
    """Every message has an integer ``id:``, one ``data:`` line of JSON, no ``event:``."""
    payloads = []
    ids = []
    for message in messages:
        assert set(message) == {"id", "data"}, message
        ids.append(int(message["id"]))
        payload = json.loads(message["data"])
        check_schema(spec, payload, "#/components/schemas/SseMessage")
        payloads.append(payload)
    assert ids == sorted(ids), ids
    return payloads


async def make_app_client(aiohttp_client: Any, tmp_path: Path, **settings: Any) -> TestClient:
    config = zhiyi_server.Config(data_path=tmp_path, **settings)
    return await aiohttp_client(zhiyi_server.create_app(config))


async def add_user(client: TestClient, name: str, credits: int) -> dict[str, str]:
    store = client.app[zhiyi_server.STORE]
    await store.add_user(name, credits)
    return {"Authorization": f"Bearer {await store.issue_token(name)}"}


# ---------------------------------------------------------------- the document
def test_document_is_valid_openapi_31(spec: dict[str, Any]) -> None:
    assert spec["openapi"].startswith("3.1.")
    validate_spec(spec)


def test_document_declares_the_contract_pieces(spec: dict[str, Any]) -> None:
    schemes = spec["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {**schemes["bearerAuth"], "type": "http", "scheme": "bearer"}
    assert (schemes["sessionCookie"]["in"], schemes["sessionCookie"]["name"]) == (
        "cookie",
        zhiyi_server.SESSION_COOKIE,
    )
    schemas = spec["components"]["schemas"]
    for name in ("Task", "Error", "LedgerEntry", "TaskType", "EngineStatus", "StatusUpdateEvent"):
        assert name in schemas, name
    assert schemas["TaskStatus"]["enum"] == [s.value for s in zhiyi_server.TaskStatus]
    # every path parameter is declared, and taskId is an integer
    for path, item in spec["paths"].items():
        for method in set(item) & HTTP_METHODS:
            params = [
                _lookup(spec, p["$ref"]) if "$ref" in p else p
                for p in [*item.get("parameters", []), *item[method].get("parameters", [])]
            ]
            in_path = {p["name"]: p for p in params if p["in"] == "path"}
            names = {seg[1:-1] for seg in path.split("/") if seg.startswith("{")}
            assert set(in_path) == names, (path, method)
            if "taskId" in in_path:
                assert in_path["taskId"]["schema"]["type"] == "integer"


def test_every_app_route_is_documented_and_every_documented_route_exists(
    spec: dict[str, Any],
    tmp_path: Path,
) -> None:
    app = zhiyi_server.create_app(zhiyi_server.Config(data_path=tmp_path))
    in_app = app_operations(app)
    in_doc = doc_operations(spec)
    assert not in_app - in_doc, f"routes missing from openapi.yaml: {sorted(in_app - in_doc)}"
    assert not in_doc - in_app, f"openapi.yaml paths the app lacks: {sorted(in_doc - in_app)}"


async def test_served_document_is_this_file(
    spec: dict[str, Any],
    aiohttp_client: Any,
    tmp_path: Path,
) -> None:
    client = await make_app_client(aiohttp_client, tmp_path, worker_concurrency=0)
    resp = await client.get("/api/openapi.yaml")
    assert resp.status == 200
    assert resp.content_type == "application/yaml"
    text = await resp.text()
    assert text == SPEC_PATH.read_text(encoding="utf-8")
    assert yaml.safe_load(text) == spec


async def test_every_operation_answers_as_documented_without_credentials(
    spec: dict[str, Any],
    aiohttp_client: Any,
    tmp_path: Path,
) -> None:
    """Protected operations answer 401 ``unauthenticated``; public ones a documented status."""
    client = await make_app_client(aiohttp_client, tmp_path, worker_concurrency=0)
    for path, method in sorted(doc_operations(spec)):
        url = re.sub(r"\{[^}]+\}", "1", path)  # every path parameter
        resp = await client.request(method.upper(), url, allow_redirects=False)
        if is_protected(spec, path, method):
            body = await check_response(spec, resp, path, method, 401)
            assert body["code"] == "unauthenticated", (path, method, body)
        else:
            await check_response(spec, resp, path, method)
            assert resp.status < 500, (path, method, resp.status)


# ------------------------------------------------------- answers vs. schemas
async def test_answers_without_a_document_match_the_schemas(
    spec: dict[str, Any],
    aiohttp_client: Any,
    tmp_path: Path,
) -> None:
    """Everything that does not need a task, and the refusals before a document is read."""
    client = await make_app_client(aiohttp_client, tmp_path, worker_concurrency=0)
    alice = await add_user(client, "alice", 10)
    create = "/api/tasks/create"

    await check_response(spec, await client.get("/healthz"), "/healthz", "get", 200)
    await check_response(spec, await client.get("/metrics"), "/metrics", "get", 200)
    body = await check_response(
        spec, await client.get("/api/me", headers=alice), "/api/me", "get", 200
    )
    assert body == {"success": True, "userId": "alice", "credits": 10}

    body = await check_response(
        spec, await client.get("/api/task-types"), "/api/task-types", "get", 200
    )
    by_name = {t["taskType"]: t for t in body["taskTypes"]}
    assert {"translate", "analyze", "extract"} <= set(by_name)
    for task_type in body["taskTypes"]:
        check_schema(spec, task_type, "#/components/schemas/TaskType")
    for engine in by_name["translate"]["engines"]:
        check_schema(spec, engine, "#/components/schemas/EngineStatus")

    body = await check_response(
        spec, await client.get("/api/me/ledger", headers=alice), "/api/me/ledger", "get", 200
    )
    assert [e["reason"] for e in body["entries"]] == ["grant"]
    for entry in body["entries"]:
        check_schema(spec, entry, "#/components/schemas/LedgerEntry")

    body = await check_response(
        spec, await client.get("/api/tasks", headers=alice), "/api/tasks", "get", 200
    )
    assert body == {"success": True, "tasks": [], "nextCursor": None}
    for query in ("limit=0", "limit=x", "cursor=x", "status=done"):
        resp = await client.get(f"/api/tasks?{query}", headers=alice)
        await check_response(spec, resp, "/api/tasks", "get", 400)
    resp = await client.get("/api/me/ledger?limit=0", headers=alice)
    await check_response(spec, resp, "/api/me/ledger", "get", 400)

    for task_id in ("99999", "abc"):
        resp = await client.get(f"/api/tasks/{task_id}", headers=alice)
        body = await check_response(spec, resp, "/api/tasks/{taskId}", "get", 404)
        assert body["code"] == "task_not_found"
    resp = await client.get("/api/sse/tasks/99999", headers=alice)
    await check_response(spec, resp, "/api/sse/tasks/{taskId}", "get", 404)
    resp = await client.get("/api/sse/notifications", headers={**alice, "Last-Event-ID": "x"})
    await check_response(spec, resp, "/api/sse/notifications", "get", 400)

    refusals: list[tuple[aiohttp.FormData, int, str]] = [
        (upload(task_type="nope"), 400, "unknown_task_type"),
        (upload(params="{not json"), 400, "bad_params"),
        (upload(task_type="translate", params='{"engine": "pseudo"}'), 400, "bad_params"),
        (
            upload(task_type="translate", params='{"targetLang": "zh", "engine": "nope"}'),
            400,
            "unknown_engine",
        ),
        (upload(name="tool.exe"), 415, "unsupported_file_type"),
        (upload(b""), 422, "bad_document"),
    ]
    missing_file = aiohttp.FormData(default_to_multipart=True)
    missing_file.add_field("taskType", "analyze")
    refusals.append((missing_file, 400, "missing_file"))
    for data, status, code in refusals:
        resp = await client.post(create, data=data, headers=alice)
        body = await check_response(spec, resp, create, "post", status)
        assert body["code"] == code, body
    resp = await client.post(create, json={"taskType": "analyze"}, headers=alice)
    assert (await check_response(spec, resp, create, "post", 400))["code"] == "bad_request"

    # unknown paths and methods answer the Error envelope too
    for method, url, status, code in [
        ("GET", "/api/nope", 404, "not_found"),
        ("GET", "/nope", 404, "not_found"),
        ("PUT", "/api/tasks", 405, "method_not_allowed"),
        ("POST", "/healthz", 405, "method_not_allowed"),
    ]:
        resp = await client.request(method, url, headers=alice)
        assert resp.status == status, (method, url, resp.status)
        body = await resp.json()
        check_schema(spec, body, "#/components/schemas/Error")
        assert body["code"] == code, body

    # the session: a cookie for a token, and logout
    resp = await client.post("/api/session", json={"token": "zy_wrong"})
    await check_response(spec, resp, "/api/session", "post", 401)
    token = alice["Authorization"].removeprefix("Bearer ")
    resp = await client.post("/api/session", json={"token": token})
    assert (await check_response(spec, resp, "/api/session", "post", 200))["userId"] == "alice"
    assert zhiyi_server.SESSION_COOKIE in resp.cookies
    resp = await client.get("/api/me")  # the cookie alone authenticates
    await check_response(spec, resp, "/api/me", "get", 200)
    same_origin = {"Origin": str(client.make_url("/")).rstrip("/")}
    resp = await client.delete("/api/session", headers=same_origin)
    await check_response(spec, resp, "/api/session", "delete", 200)
    resp = await client.get("/api/me")
    await check_response(spec, resp, "/api/me", "get", 401)
    navigation = {"Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}
    resp = await client.get(f"/?token={token}", allow_redirects=False, headers=navigation)
    await check_response(spec, resp, "/", "get", 302)
    assert resp.headers["Location"] == "/" and zhiyi_server.SESSION_COOKIE in resp.cookies
    resp = await client.get("/?token=zy_wrong", allow_redirects=False, headers=navigation)
    await check_response(spec, resp, "/", "get", 302)
    assert resp.headers["Location"] == "/#login-failed"


async def test_webhook_answers_match_the_schemas(
    spec: dict[str, Any],
    aiohttp_client: Any,
    tmp_path: Path,
) -> None:
    client = await make_app_client(
        aiohttp_client, tmp_path, worker_concurrency=0, webhook_secret="s3cret"
    )
    path = "/api/tasks/webhook"
    body = json.dumps(
        {"externalTaskId": "ext-1", "status": "completed", "resultText": "done"}
    ).encode()
    resp = await client.post(path, data=body, headers=sign("s3cret", body))
    assert (await check_response(spec, resp, path, "post", 404))["code"] == "task_not_found"
    resp = await client.post(path, data=body, headers=sign("wrong", body))
    assert (await check_response(spec, resp, path, "post", 401))["code"] == "bad_signature"
    stale = sign("s3cret", body, int(time.time()) - 301)
    await check_response(spec, await client.post(path, data=body, headers=stale), path, "post", 401)
    bad = b'{"externalTaskId": "ext-1", "status": "done"}'
    await check_response(
        spec, await client.post(path, data=bad, headers=sign("s3cret", bad)), path, "post", 400
    )


async def test_task_lifecycle_answers_match_the_schemas(
    spec: dict[str, Any],
    aiohttp_client: Any,
    tmp_path: Path,
) -> None:
    """Create, repeat, read, stream, cancel, retry, ledger, delete: every answer as documented."""
    client = await make_app_client(aiohttp_client, tmp_path, worker_concurrency=0)
    alice = await add_user(client, "alice", 10)
    create = "/api/tasks/create"

    resp = await client.post(create, data=upload(), headers={**alice, "Idempotency-Key": "k-1"})
    created = await check_response(spec, resp, create, "post", 201)
    task = created["task"]
    check_schema(spec, task, "#/components/schemas/Task")
    task_id = created["taskId"]
    assert task["taskId"] == task_id and task["taskStatus"] == "pending"
    assert task["fileName"] == "hello.txt" and task["taskType"] == "analyze"
    assert created["sseUrl"] == f"/api/sse/tasks/{task_id}"

    resp = await client.post(create, data=upload(), headers={**alice, "Idempotency-Key": "k-1"})
    repeat = await check_response(spec, resp, create, "post", 200)
    assert repeat["taskId"] == task_id

    one = f"/api/tasks/{task_id}"
    body = await check_response(
        spec, await client.get(one, headers=alice), "/api/tasks/{taskId}", "get", 200
    )
    check_schema(spec, body["task"], "#/components/schemas/Task")
    body = await check_response(
        spec, await client.get("/api/tasks", headers=alice), "/api/tasks", "get", 200
    )
    assert [t["taskId"] for t in body["tasks"]] == [task_id]
    resp = await client.get(f"{one}/result", headers=alice)
    body = await check_response(spec, resp, "/api/tasks/{taskId}/result", "get", 409)
    assert body["code"] == "not_completed"

    # the live stream of a pending task: retry line, then the snapshot as a status_update
    sse = f"/api/sse/tasks/{task_id}"
    resp = await client.get(sse, headers=alice)
    await check_response(spec, resp, "/api/sse/tasks/{taskId}", "get", 200)
    assert resp.headers["Cache-Control"] == "no-cache"
    assert resp.headers["X-Accel-Buffering"] == "no"
    retries, messages = await read_sse(resp, count=1)
    resp.close()
    assert retries and retries[0].isdigit()
    [snapshot] = check_sse_messages(spec, messages)
    check_schema(spec, snapshot, "#/components/schemas/StatusUpdateEvent")
    assert snapshot["data"]["taskId"] == task_id and snapshot["data"]["status"] == "pending"
    snapshot_id = int(messages[0]["id"])

    resp = await client.get("/api/sse/notifications", headers=alice)
    await check_response(spec, resp, "/api/sse/notifications", "get", 200)
    _, messages = await read_sse(resp, count=1)
    resp.close()
    check_sse_messages(spec, messages)

    # cancel: final; the replayed stream now ends; a caught-up reconnect is 204
    cancel = "/api/tasks/{taskId}/cancel"
    body = await check_response(
        spec, await client.post(f"{one}/cancel", headers=alice), cancel, "post", 200
    )
    assert body["task"]["taskStatus"] == "cancelled"

    resp = await client.get(sse, headers={**alice, "Last-Event-ID": str(snapshot_id)})
    await check_response(spec, resp, "/api/sse/tasks/{taskId}", "get", 200)
    _, messages = await read_sse(resp)
    replayed = check_sse_messages(spec, messages)
    assert replayed[-1]["data"]["status"] == "cancelled"
    last_id = messages[-1]["id"]
    resp = await client.get(f"{sse}?lastEventId={last_id}", headers=alice)
    await check_response(spec, resp, "/api/sse/tasks/{taskId}", "get", 204)

    # retry charges again; the ledger shows grant, charge, refund, charge
    retry = "/api/tasks/{taskId}/retry"
    body = await check_response(
        spec, await client.post(f"{one}/retry", headers=alice), retry, "post", 200
    )
    assert body["task"]["taskStatus"] == "pending"
    body = await check_response(
        spec, await client.get("/api/me/ledger", headers=alice), "/api/me/ledger", "get", 200
    )
    assert [e["reason"] for e in body["entries"]] == ["charge", "refund", "charge", "grant"]
    for entry in body["entries"]:
        check_schema(spec, entry, "#/components/schemas/LedgerEntry")

    # 402: a user without credits
    bob = await add_user(client, "bob", 0)
    resp = await client.post(create, data=upload(), headers=bob)
    body = await check_response(spec, resp, create, "post", 402)
    assert body["code"] == "insufficient_credits"

    # delete: the record goes, the task stream says task_deleted
    resp = await client.delete(one, headers=alice)
    body = await check_response(spec, resp, "/api/tasks/{taskId}", "delete", 200)
    assert body == {"success": True, "taskId": task_id}
    await check_response(
        spec, await client.get(one, headers=alice), "/api/tasks/{taskId}", "get", 404
    )
    resp = await client.get(
        "/api/sse/notifications", headers={**alice, "Last-Event-ID": str(snapshot_id)}
    )
    _, messages = await read_sse(resp, until_type="task_deleted")
    resp.close()
    types = [m["type"] for m in check_sse_messages(spec, messages)]
    assert types[-1] == "task_deleted", types


async def test_completed_task_matches_the_schemas(
    spec: dict[str, Any],
    aiohttp_client: Any,
    tmp_path: Path,
) -> None:
    """With workers: the stream to the end, the completed Task, the result file."""
    client = await make_app_client(aiohttp_client, tmp_path, retry_base_seconds=0.05)
    alice = await add_user(client, "alice", 10)
    resp = await client.post("/api/tasks/create", data=upload(), headers=alice)
    created = await check_response(spec, resp, "/api/tasks/create", "post", 201)
    task_id = created["taskId"]

    resp = await client.get(created["sseUrl"], headers=alice)
    await check_response(spec, resp, "/api/sse/tasks/{taskId}", "get", 200)
    _, messages = await read_sse(resp, timeout=60)
    events = check_sse_messages(spec, messages)
    final = events[-1]["data"]
    assert final["status"] == "completed", final
    assert final["resultUrl"] == f"/api/tasks/{task_id}/result"

    resp = await client.get(f"/api/tasks/{task_id}", headers=alice)
    task = (await check_response(spec, resp, "/api/tasks/{taskId}", "get", 200))["task"]
    check_schema(spec, task, "#/components/schemas/Task")
    assert task["taskStatus"] == "completed" and task["progressPercent"] == 100
    assert task["resultUrl"] == final["resultUrl"] and task["completedAt"]

    resp = await client.get(task["resultUrl"], headers=alice)
    report = await check_response(spec, resp, "/api/tasks/{taskId}/result", "get", 200)
    assert resp.headers["Content-Disposition"].startswith("attachment; ")
    assert report["quote"]["analyze"] == task["creditsCost"]


async def test_invalid_state_answers_409(
    spec: dict[str, Any],
    aiohttp_client: Any,
    tmp_path: Path,
) -> None:
    """Cancel or retry in the wrong state: 409 ``invalid_state`` with the ``taskStatus``."""
    client = await make_app_client(aiohttp_client, tmp_path, worker_concurrency=0)
    alice = await add_user(client, "alice", 10)
    resp = await client.post("/api/tasks/create", data=upload(), headers=alice)
    task_id = (await check_response(spec, resp, "/api/tasks/create", "post", 201))["taskId"]
    retry = "/api/tasks/{taskId}/retry"
    resp = await client.post(f"/api/tasks/{task_id}/retry", headers=alice)  # pending
    body = await check_response(spec, resp, retry, "post", 409)
    assert (body["code"], body["taskStatus"]) == ("invalid_state", "pending")
    cancel = "/api/tasks/{taskId}/cancel"
    for expected in (200, 409):
        resp = await client.post(f"/api/tasks/{task_id}/cancel", headers=alice)
        body = await check_response(spec, resp, cancel, "post", expected)
    assert (body["code"], body["taskStatus"]) == ("invalid_state", "cancelled")


# ------------------------------------------- what the document allows, exactly
def test_the_create_form_names_the_shipped_task_types_and_engines(spec: dict[str, Any]) -> None:
    from processors import ANALYZE_PARAMS, TRANSLATE_PARAMS, default_registry

    schemas = spec["components"]["schemas"]
    types = schemas["CreateTaskForm"]["properties"]["taskType"]["enum"]
    assert sorted(types) == sorted(t.name for t in default_registry())
    # '' and null mean the default
    for name, declared in TRANSLATE_PARAMS.items():
        spec_param = schemas["TranslateParams"]["properties"][name]
        if name == "engine":
            spec_param = schemas["EngineName"]
        if declared.choices:
            assert set(spec_param["enum"]) == {*declared.choices, "", None}, name
    assert set(schemas["TranslateParams"]["properties"]) == set(TRANSLATE_PARAMS)
    assert set(schemas["AnalyzeParams"]["properties"]) == set(ANALYZE_PARAMS)


async def test_query_values_outside_the_document_are_refused(
    spec: dict[str, Any], aiohttp_client: Any, tmp_path: Path
) -> None:
    client = await make_app_client(aiohttp_client, tmp_path, worker_concurrency=0)
    alice = await add_user(client, "alice", 10)
    for query in ("status=", "cursor=", "cursor=0", "cursor=-1", "cursor=+1", "cursor=%201",
                  f"cursor={2**63}", "limit=", "limit=%D9%A3", "limit=1_0"):
        resp = await client.get(f"/api/tasks?{query}", headers=alice)
        body = await check_response(spec, resp, "/api/tasks", "get", 400)
        assert body["code"] == "bad_request", query
    resp = await client.get(f"/api/tasks?cursor={2**63 - 1}&limit=100000", headers=alice)
    await check_response(spec, resp, "/api/tasks", "get", 200)

    stream = "/api/sse/notifications"
    for bad in ({"Last-Event-ID": "-1"}, {"Last-Event-ID": "1.0"}, {"Last-Event-ID": "+1"}):
        resp = await client.get(stream, headers={**alice, **bad})
        await check_response(spec, resp, stream, "get", 400)
    for query in ("lastEventId=", "lastEventId=-1"):
        for header in ({}, {"Last-Event-ID": "1"}):  # the header wins, the query is checked
            resp = await client.get(f"{stream}?{query}", headers={**alice, **header})
            await check_response(spec, resp, stream, "get", 400)
    # an empty header is no id; an id past every event (even past SQLite's) replays nothing
    for headers, query in (({"Last-Event-ID": ""}, ""), ({}, f"?lastEventId={10**30}")):
        async with client.get(stream + query, headers={**alice, **headers}) as resp:
            await check_response(spec, resp, stream, "get", 200)


async def test_405_keeps_allow_listing_only_the_paths_own_methods(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    client = await make_app_client(aiohttp_client, tmp_path, worker_concurrency=0)
    alice = await add_user(client, "alice", 10)
    for method, url, allowed in [
        ("OPTIONS", "/api/tasks/create", {"POST"}),
        ("GET", "/api/tasks/create", {"POST"}),  # not a task called "create"
        ("TRACE", "/api/tasks/webhook", {"POST"}),
        ("POST", "/api/tasks/7", {"GET", "HEAD", "DELETE"}),
        ("PUT", "/healthz", {"GET", "HEAD"}),
    ]:
        resp = await client.request(method, url, headers=alice)
        assert resp.status == 405, (method, url)
        assert set(resp.headers["Allow"].split(",")) == allowed, (method, url)
        assert (await resp.json())["code"] == "method_not_allowed"
