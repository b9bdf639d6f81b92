"""The outside driver's reference (issue 13): aiohttp front + SAQ worker + Redis, pub/sub streams.

Usage: ``python bench/ref_pubsub.py web PORT DATA_DIR`` and
``python bench/ref_pubsub.py worker`` (two processes, as SAQ is deployed).
``BENCH_QUEUE`` names the queue (one per run), ``REDIS_URL`` the Redis server
(bench/outside.py starts its own, without persistence, pinned with the rest).

Exactly what it does per task:

- web, ``POST /api/tasks/create``: reads the multipart upload (any fields; the
  file is written to disk, as Zhiyi keeps it) and enqueues SAQ job
  ``pubsub_job`` (SAQ's own Redis writes: the job hash and the queue lists).
- worker, ``pubsub_job``: 10 steps, each ONE pipelined round trip of ``SET``
  (the task's current state, JSON) + ``PUBLISH`` (the same JSON on the task's
  channel); the 10th step carries ``completed``. No sleep, no translation,
  nothing durable (Redis runs with ``--save '' --appendonly no``). SAQ then
  marks the job complete (more SAQ writes, nobody waits on them).
- web, ``GET /api/sse/tasks/{key}``: registers a local queue with the
  process's single ``PSUBSCRIBE`` (a multiplexer, one reader task), then reads
  the state key once (so nothing falls between subscribing and the state),
  then writes every published payload as one SSE frame, as received (no
  re-read, no re-encoding), until ``completed``.

Compared with Zhiyi there is no authentication, no credit charge, no database
row, no document parse and no translation: it is the floor of a Redis-backed
pipeline, not the same work.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from redis import asyncio as aioredis
from saq import Worker
from saq.queue.redis import RedisQueue

logger = logging.getLogger(__name__)

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
QUEUE_NAME = os.environ.get("BENCH_QUEUE", "zhiyi-bench-pubsub")
WORKERS = int(os.environ.get("WORKER_CONCURRENCY", "10"))
STEPS = 10
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
               "Connection": "keep-alive", "X-Accel-Buffering": "no"}

QUEUE = web.AppKey("bench.queue", RedisQueue)
MUX = web.AppKey("bench.mux", "Multiplexer")
DATA = web.AppKey("bench.data", Path)


def state_key(task: str) -> str:
    return f"bench13:{QUEUE_NAME}:state:{task}"


def channel(task: str) -> str:
    return f"bench13:{QUEUE_NAME}:events:{task}"


class Multiplexer:
    """One PSUBSCRIBE per process; each message goes to the queue of its task's stream."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.pubsub = redis.pubsub()
        self.streams: dict[str, asyncio.Queue[bytes]] = {}
        self.reader: asyncio.Task[None] | None = None
        self.prefix = channel("").encode()

    async def start(self) -> None:
        await self.pubsub.psubscribe(channel("*"))
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.pubsub.listen():
            if message["type"] != "pmessage":
                continue
            queue = self.streams.get(message["channel"][len(self.prefix):].decode())
            if queue is not None:
                queue.put_nowait(message["data"])

    async def stop(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        await self.pubsub.aclose()


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    queue = RedisQueue.from_url(REDIS_URL, name=QUEUE_NAME)
    await queue.connect()
    mux = Multiplexer(queue.redis)
    await mux.start()
    app[QUEUE], app[MUX] = queue, mux
    yield
    await mux.stop()
    await queue.disconnect()


async def create_task(request: web.Request) -> web.Response:
    task_dir = request.app[DATA] / uuid.uuid4().hex
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if isinstance(part, aiohttp.BodyPartReader) and part.name == "file":
            path = task_dir / "original" / (part.filename or "doc.txt")
            path.parent.mkdir(parents=True)
            path.write_bytes(await part.read())
        elif isinstance(part, aiohttp.BodyPartReader):
            await part.read()
    job = await request.app[QUEUE].enqueue("pubsub_job", timeout=60, ttl=600)
    assert job is not None
    return web.json_response({"success": True, "taskId": job.key,
                              "task": {"taskId": job.key, "status": "pending"},
                              "sseUrl": f"/api/sse/tasks/{job.key}"}, status=201)


async def task_stream(request: web.Request) -> web.StreamResponse:
    app, key = request.app, request.match_info["taskId"]
    updates: asyncio.Queue[bytes] = asyncio.Queue()
    app[MUX].streams[key] = updates
    try:
        state = await app[QUEUE].redis.get(state_key(key))
        resp = web.StreamResponse(headers=SSE_HEADERS)
        await resp.prepare(request)
        seen = 0
        payload = state or json.dumps({"type": "status_update", "seq": 0, "data": {
            "taskId": key, "status": "pending", "progress": 0}}).encode()
        while True:
            seq = json.loads(payload)["seq"]
            if seq >= seen:  # the state read may repeat a message already queued
                seen = seq + 1
                await resp.write(b"data: " + payload + b"\n\n")
                if b'"completed"' in payload:
                    return resp
            payload = await updates.get()
    finally:
        app[MUX].streams.pop(key, None)


def web_main(port: int, data_dir: Path) -> None:
    app = web.Application()
    app[DATA] = data_dir
    app.cleanup_ctx.append(redis_ctx)
    app.router.add_post("/api/tasks/create", create_task)
    app.router.add_get("/api/sse/tasks/{taskId}", task_stream)
    web.run_app(app, host="127.0.0.1", port=port, backlog=1024, access_log=None,
                shutdown_timeout=2, print=lambda _: print("READY", flush=True))


async def pubsub_job(ctx: dict[str, Any]) -> None:
    """10 pipelined SET + PUBLISH round trips; the last one says ``completed``."""
    key = ctx["job"].key
    redis: aioredis.Redis = ctx["job"].queue.redis
    for step in range(1, STEPS + 1):
        status = "completed" if step == STEPS else "processing"
        payload = json.dumps({"type": "status_update", "seq": step, "data": {
            "taskId": key, "status": status, "progress": step * 100 // STEPS,
            "message": f"step {step} of {STEPS}"}}, separators=(",", ":"))
        async with redis.pipeline(transaction=False) as pipe:
            pipe.set(state_key(key), payload, ex=600)
            pipe.publish(channel(key), payload)
            await pipe.execute()


async def worker_main() -> None:
    queue = RedisQueue.from_url(REDIS_URL, name=QUEUE_NAME)
    await queue.connect()
    worker = Worker(queue, functions=[("pubsub_job", pubsub_job)], concurrency=WORKERS)
    print("READY", flush=True)
    try:
        await worker.start()
    finally:
        await queue.disconnect()


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    role = sys.argv[1]
    if role == "web":
        port, data_dir = int(sys.argv[2]), Path(sys.argv[3])
        data_dir.mkdir(parents=True, exist_ok=True)
        web_main(port, data_dir)
    elif role == "worker":
        asyncio.run(worker_main())
    else:
        raise SystemExit("role must be web or worker")


if __name__ == "__main__":
    main()
