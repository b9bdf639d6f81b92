"""Reference (c) of the task benchmark: an SAQ + Redis pipeline with the same work shape.

Usage: ``python bench/ref_saq.py web PORT DATA_DIR`` and
``python bench/ref_saq.py worker DATA_DIR`` (two processes, as SAQ is deployed).
``BENCH_QUEUE`` names the queue (one per run), ``REDIS_URL`` the server.

- web: ``POST /api/tasks/create`` reads the multipart upload to disk and
  enqueues job ``bench_job``; ``GET /api/sse/tasks/{key}`` subscribes to the
  job's updates, sends the job's state, then one event per update until the
  job is final. Updates come from SAQ's own pub/sub multiplexer (one PSUBSCRIBE
  per process); each notification carries only a status, so the stream reads
  the job (``queue.job``) to send its progress, as SAQ's ``Job.refresh`` does.
  The multiplexer is used directly (``queue._pubsub``) so the stream subscribes
  before it reads the state: no update can fall between the two.
- worker: ``saq.Worker`` running ``bench_job``: 10 ``job.update(progress=...)``
  calls ``BENCH_STEP_SECONDS`` apart, then a result file; SAQ marks it complete.
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
from pacing import STEPS
from saq import Job, Status, Worker
from saq.queue.redis import RedisQueue

logger = logging.getLogger(__name__)

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
QUEUE_NAME = os.environ.get("BENCH_QUEUE", "zhiyi-bench")
STEP_SECONDS = float(os.environ.get("BENCH_STEP_SECONDS", "0.001"))
WORKERS = int(os.environ.get("WORKER_CONCURRENCY", "4"))
SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "Connection": "keep-alive",
    "X-Accel-Buffering": "no",
}
STATUS = {
    Status.NEW: "pending", Status.QUEUED: "pending",
    Status.ACTIVE: "processing", Status.ABORTING: "processing", Status.ABORTED: "cancelled",
    Status.FAILED: "failed", Status.COMPLETE: "completed",
}
FINAL = frozenset({"completed", "failed", "cancelled"})

QUEUE = web.AppKey("bench.saq_queue", RedisQueue)
DATA = web.AppKey("bench.data", Path)


def job_data(job: Job) -> dict[str, Any]:
    data: dict[str, Any] = {
        "taskId": job.key, "status": STATUS[job.status], "progress": round(job.progress * 100),
        "message": job.meta.get("message", ""), "stage": job.meta.get("stage"),
    }
    if data["status"] == "completed":
        data["resultUrl"] = f"/api/tasks/{job.key}/result"
    return data


def frame(job: Job) -> bytes:
    body = json.dumps({"type": "status_update", "data": job_data(job)}, ensure_ascii=False,
                      separators=(",", ":"))
    return f"id: {job.touched}\ndata: {body}\n\n".encode()


# ------------------------------------------------------------------- web
async def queue_ctx(app: web.Application) -> AsyncIterator[None]:
    queue = RedisQueue.from_url(REDIS_URL, name=QUEUE_NAME)
    await queue.connect()
    # Keep one subscription for the life of the app: the multiplexer drops its
    # PSUBSCRIBE when the last stream leaves, and updates meanwhile would be lost.
    keeper = await queue._pubsub.subscribe("bench-keepalive")
    for _ in range(100):
        if queue._pubsub.pubsub.subscribed:
            break
        await asyncio.sleep(0.05)
    app[QUEUE] = queue
    yield
    await queue._pubsub.unsubscribe(keeper)
    await queue.disconnect()


async def create_task(request: web.Request) -> web.Response:
    task_dir = request.app[DATA] / uuid.uuid4().hex
    path, task_type = task_dir / "original" / "doc.txt", None
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, aiohttp.BodyPartReader):
            continue
        if part.name == "file":
            path.parent.mkdir(parents=True)
            path.write_bytes(await part.read())
        elif part.name == "taskType":
            task_type = (await part.text()).strip()
        else:
            await part.release()
    if task_type != "bench":
        raise web.HTTPBadRequest(text="taskType must be bench")
    job = await request.app[QUEUE].enqueue("bench_job", path=str(path), timeout=60, ttl=600)
    assert job is not None
    return web.json_response({"success": True, "taskId": job.key, "task": job_data(job),
                              "sseUrl": f"/api/sse/tasks/{job.key}"}, status=201)


async def task_stream(request: web.Request) -> web.StreamResponse:
    queue, key = request.app[QUEUE], request.match_info["taskId"]
    updates = await queue._pubsub.subscribe(queue.job_id(key))
    try:
        job = await queue.job(key)
        if job is None:
            raise web.HTTPNotFound()
        resp = web.StreamResponse(headers=SSE_HEADERS)
        await resp.prepare(request)
        await resp.write(b"retry: 3000\n\n" + frame(job))
        while STATUS[job.status] not in FINAL:
            await updates.get()
            job = await queue.job(key)
            assert job is not None
            await resp.write(frame(job))
        return resp
    finally:
        await queue._pubsub.unsubscribe(updates)


def web_main(port: int, data_dir: Path) -> None:
    app = web.Application()
    app[DATA] = data_dir
    app.cleanup_ctx.append(queue_ctx)
    app.router.add_post("/api/tasks/create", create_task)
    app.router.add_get("/api/sse/tasks/{taskId}", task_stream)
    web.run_app(app, host="127.0.0.1", port=port, backlog=1024, access_log=None,
                shutdown_timeout=2, print=lambda _: print("READY", flush=True))


# ---------------------------------------------------------------- worker
async def bench_job(ctx: dict[str, Any], *, path: str) -> str:
    job: Job = ctx["job"]
    for step in range(1, STEPS + 1):
        await asyncio.sleep(STEP_SECONDS)
        await job.update(progress=step / STEPS,
                         meta={"message": f"step {step} of {STEPS}", "stage": f"step-{step}"})
    result = Path(path).parent.parent / "result"
    result.mkdir(exist_ok=True)
    (result / "bench.txt").write_text("done\n")
    return str(result / "bench.txt")


async def worker_main() -> None:
    queue = RedisQueue.from_url(REDIS_URL, name=QUEUE_NAME)
    await queue.connect()
    worker = Worker(queue, functions=[("bench_job", bench_job)], concurrency=WORKERS)
    print("READY", flush=True)
    try:
        await worker.start()  # returns on SIGINT/SIGTERM (SAQ's own handlers)
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
