"""Zhiyi mounted in another aiohttp app under /zhiyi/ works unchanged."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web
from helpers import Gates, SSEReader, form, make_registry

from zhiyi_server import STORE, Config, create_app


async def test_mounted_as_subapp(aiohttp_client, tmp_path: Path) -> None:
    parent = web.Application()

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="the host app")

    parent.router.add_get("/", hello)
    zhiyi = create_app(Config(data_path=tmp_path / "data", worker_concurrency=1),
                       registry=make_registry(Gates()))
    parent.add_subapp("/zhiyi/", zhiyi)
    client = await aiohttp_client(parent)
    assert await (await client.get("/")).text() == "the host app"

    store = zhiyi[STORE]
    await store.add_user("alice", 10)
    headers = {"Authorization": f"Bearer {await store.issue_token('alice')}"}
    me = await (await client.get("/zhiyi/api/me", headers=headers)).json()
    assert me == {"success": True, "userId": "alice", "credits": 10}

    resp = await client.post("/zhiyi/api/tasks/create",
                             data=form(b"abc", task_type="steps", params={}), headers=headers)
    body = await resp.json()
    assert resp.status == 201, body
    assert body["sseUrl"] == f"/zhiyi/api/sse/tasks/{body['taskId']}"

    resp = await client.get(body["sseUrl"], headers=headers)
    messages = await SSEReader(resp).collect_until_final()
    final = messages[-1].payload
    assert final["status"] == "completed"
    assert final["resultUrl"] == f"/zhiyi/api/tasks/{body['taskId']}/result"
    result = await client.get(final["resultUrl"], headers=headers)
    assert await result.read() == b"ABC"
    task = (await (await client.get(f"/zhiyi/api/tasks/{body['taskId']}",
                                    headers=headers)).json())["task"]
    assert task["resultUrl"] == final["resultUrl"]

    resp = await client.get("/zhiyi/api/unknown")
    assert resp.status == 404 and (await resp.json())["code"] == "not_found"
    resp = await client.get("/zhiyi/")
    assert resp.status == 200 and "text/html" in resp.headers["Content-Type"]
    await asyncio.sleep(0)
