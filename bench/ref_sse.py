"""Reference servers for the benchmarks, on the same URLs as Zhiyi.

Usage: ``python bench/ref_sse.py {plain,aiohttp-sse} PORT DATA_DIR``.

- ``aiohttp-sse`` (reference a): the minimal aiohttp-sse broadcast, as in
  aiohttp-sse's ``examples/chat.py``: one ``asyncio.Queue`` per stream,
  ``EventSourceResponse.send`` frames each event for each subscriber, and
  aiohttp-sse's own ping task per connection.
- ``plain`` (reference b): a ``web.StreamResponse`` per stream; each event is
  encoded to bytes once and the same bytes are queued to every subscriber; a
  stream writes whatever its queue holds in one write; one heartbeat task for
  the whole server. This is about as little as aiohttp lets a server do.

Both keep everything in memory: nothing is durable, there is no auth, no
replay and no limit other than a bounded queue per stream (full: the event is
dropped for that stream). Task endpoints mirror Zhiyi's work shape: create
over HTTP (multipart, the file saved to disk), W in-process workers that
report 10 progress steps ``BENCH_STEP_SECONDS`` apart and write a result file,
every change pushed to the task's streams; a stream sends the task's state
first and ends after its final event.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp_sse import sse_response
from pacing import STEPS, paced, stamp

logger = logging.getLogger(__name__)

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "Connection": "keep-alive",
    "X-Accel-Buffering": "no",
}
PING = b": ping\n\n"
FINAL = frozenset({"completed", "failed", "cancelled"})
BUFFER = 256
HEARTBEAT = float(os.environ.get("SSE_HEARTBEAT_SECONDS", "15"))
STEP_SECONDS = float(os.environ.get("BENCH_STEP_SECONDS", "0.001"))
WORKERS = int(os.environ.get("WORKER_CONCURRENCY", "4"))


def encode(event_id: int, type_: str, data: dict[str, Any]) -> tuple[str, str]:
    """``(id, JSON)`` of one event, in Zhiyi's message shape."""
    body = json.dumps({"type": type_, "data": data}, ensure_ascii=False, separators=(",", ":"))
    return str(event_id), body


def frame(event_id: str, body: str) -> bytes:
    return f"id: {event_id}\ndata: {body}\n\n".encode()


# ------------------------------------------------------------------ state
Item = tuple[Any, bool]  # (bytes for plain, (id, json) for aiohttp-sse), final


@dataclass
class Task:
    id: int
    status: str = "pending"
    progress: int = 0
    message: str = "waiting for a worker"
    stage: str | None = None
    last_event: int = 0
    subscribers: set[asyncio.Queue[Item]] = field(default_factory=set)

    def data(self) -> dict[str, Any]:
        data: dict[str, Any] = {"taskId": self.id, "status": self.status,
                                "progress": self.progress, "message": self.message,
                                "stage": self.stage}
        if self.status == "completed":
            data["resultUrl"] = f"/api/tasks/{self.id}/result"
        return data


class Board:
    """The notification subscribers, the tasks and the event counter of one server."""

    def __init__(self, kind: str, data_dir: Path) -> None:
        self.kind = kind
        self.data_dir = data_dir
        self.events = itertools.count(1)
        self.task_ids = itertools.count(1)
        self.notification_subs: set[asyncio.Queue[Item]] = set()
        self.tasks: dict[int, Task] = {}
        self.work: asyncio.Queue[int] = asyncio.Queue()
        self.dropped = 0

    def item(self, event_id: int, type_: str, data: dict[str, Any]) -> Any:
        """Encoded once: bytes for ``plain``; ``(id, JSON)`` that aiohttp-sse frames per stream."""
        pair = encode(event_id, type_, data)
        return frame(*pair) if self.kind == "plain" else pair

    def offer(self, subs: set[asyncio.Queue[Item]], item: Any, final: bool) -> None:
        for queue in subs:
            try:
                queue.put_nowait((item, final))
            except asyncio.QueueFull:
                self.dropped += 1

    def notify(self, message: str) -> None:
        event_id = next(self.events)
        item = self.item(event_id, "notification", {"level": "info", "message": message})
        self.offer(self.notification_subs, item, False)

    def change(self, task: Task, **changes: Any) -> None:
        for name, value in changes.items():
            setattr(task, name, value)
        task.last_event = next(self.events)
        item = self.item(task.last_event, "status_update", task.data())
        self.offer(task.subscribers, item, task.status in FINAL)


BOARD = web.AppKey("bench.board", Board)


# ------------------------------------------------------------- streams
async def write_plain(resp: web.StreamResponse, queue: asyncio.Queue[Item],
                      ends_on_final: bool) -> None:
    while True:
        item, final = await queue.get()
        chunks = [item]
        while not final and not queue.empty():
            item, final = queue.get_nowait()
            chunks.append(item)
        await resp.write(b"".join(chunks))
        if final and ends_on_final:
            return


async def notifications_plain(request: web.Request) -> web.StreamResponse:
    board = request.app[BOARD]
    resp = web.StreamResponse(headers=SSE_HEADERS)
    await resp.prepare(request)
    queue: asyncio.Queue[Item] = asyncio.Queue(BUFFER)
    board.notification_subs.add(queue)
    try:
        await resp.write(b"retry: 3000\n\n")
        await write_plain(resp, queue, ends_on_final=False)
    except ConnectionResetError:
        pass
    finally:
        board.notification_subs.discard(queue)
    return resp


async def notifications_sse(request: web.Request) -> web.StreamResponse:
    board = request.app[BOARD]
    async with sse_response(request, ping_interval=HEARTBEAT) as resp:
        queue: asyncio.Queue[Item] = asyncio.Queue(BUFFER)
        board.notification_subs.add(queue)
        try:
            while resp.is_connected():
                (event_id, body), _ = await queue.get()
                await resp.send(body, id=event_id)
        except ConnectionResetError:
            pass
        finally:
            board.notification_subs.discard(queue)
    return resp


def _task(request: web.Request) -> Task:
    try:
        return request.app[BOARD].tasks[int(request.match_info["taskId"])]
    except (KeyError, ValueError) as e:
        raise web.HTTPNotFound() from e


async def task_stream_plain(request: web.Request) -> web.StreamResponse:
    task = _task(request)
    resp = web.StreamResponse(headers=SSE_HEADERS)
    await resp.prepare(request)
    queue: asyncio.Queue[Item] = asyncio.Queue(BUFFER)
    task.subscribers.add(queue)
    try:
        snapshot = frame(*encode(task.last_event, "status_update", task.data()))
        await resp.write(b"retry: 3000\n\n" + snapshot)
        if task.status not in FINAL:
            await write_plain(resp, queue, ends_on_final=True)
    except ConnectionResetError:
        pass
    finally:
        task.subscribers.discard(queue)
    return resp


async def task_stream_sse(request: web.Request) -> web.StreamResponse:
    task = _task(request)
    async with sse_response(request, ping_interval=HEARTBEAT) as resp:
        queue: asyncio.Queue[Item] = asyncio.Queue(BUFFER)
        task.subscribers.add(queue)
        try:
            event_id, body = encode(task.last_event, "status_update", task.data())
            await resp.send(body, id=event_id, retry=3000)
            final = task.status in FINAL
            while not final and resp.is_connected():
                (event_id, body), final = await queue.get()
                await resp.send(body, id=event_id)
        except ConnectionResetError:
            pass
        finally:
            task.subscribers.discard(queue)
    return resp


# ---------------------------------------------------------------- tasks
async def create_task(request: web.Request) -> web.Response:
    board = request.app[BOARD]
    task_dir = board.data_dir / uuid.uuid4().hex
    task_type = None
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, aiohttp.BodyPartReader):
            continue
        if part.name == "file":
            (task_dir / "original").mkdir(parents=True)
            (task_dir / "original" / "doc.txt").write_bytes(await part.read())
        elif part.name == "taskType":
            task_type = (await part.text()).strip()
        else:
            await part.release()
    if task_type != "bench":
        raise web.HTTPBadRequest(text="taskType must be bench")
    task = Task(next(board.task_ids))
    board.tasks[task.id] = task
    board.change(task)
    board.work.put_nowait(task.id)
    return web.json_response({"success": True, "taskId": task.id, "task": task.data(),
                              "sseUrl": f"/api/sse/tasks/{task.id}"}, status=201)


async def run_task(board: Board, task: Task) -> None:
    board.change(task, status="processing", message="starting", stage="starting")
    for step in range(1, STEPS + 1):
        await asyncio.sleep(STEP_SECONDS)
        board.change(task, progress=100 * step // STEPS, message=f"step {step} of {STEPS}",
                     stage=f"step-{step}")
    result = board.data_dir / "results"
    result.mkdir(exist_ok=True)
    (result / f"{task.id}.txt").write_text("done\n")
    board.change(task, status="completed", progress=100, message="completed", stage="done")


async def worker(board: Board) -> None:
    while True:
        task_id = await board.work.get()
        await run_task(board, board.tasks[task_id])


# -------------------------------------------------------------- publish
async def publish(request: web.Request) -> web.Response:
    body = await request.json()
    board = request.app[BOARD]
    started = time.monotonic()
    count = 0
    async for seq in paced(int(body["count"]), float(body["rate"])):
        board.notify(stamp(seq))
        count += 1
    return web.json_response({"published": count, "seconds": time.monotonic() - started,
                              "dropped": board.dropped})


async def heartbeat(board: Board) -> None:
    """Plain reference: one task pings every stream (aiohttp-sse pings per connection)."""
    while True:
        await asyncio.sleep(HEARTBEAT)
        board.offer(board.notification_subs, PING, False)


def board_ctx(kind: str, data_dir: Path) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        board = Board(kind, data_dir)
        app[BOARD] = board
        loops = [asyncio.create_task(worker(board)) for _ in range(WORKERS)]
        if kind == "plain":
            loops.append(asyncio.create_task(heartbeat(board)))
        yield
        for loop in loops:
            loop.cancel()
        await asyncio.gather(*loops, return_exceptions=True)

    return ctx


def create_app(kind: str, data_dir: Path) -> web.Application:
    app = web.Application()
    app.cleanup_ctx.append(board_ctx(kind, data_dir))
    plain = kind == "plain"
    app.router.add_get("/api/sse/notifications", notifications_plain if plain else
                       notifications_sse)
    app.router.add_get("/api/sse/tasks/{taskId}", task_stream_plain if plain else
                       task_stream_sse)
    app.router.add_post("/api/tasks/create", create_task)
    app.router.add_post("/bench/publish", publish)
    return app


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    kind, port, data_dir = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    if kind not in ("plain", "aiohttp-sse"):
        raise SystemExit("kind must be plain or aiohttp-sse")
    data_dir.mkdir(parents=True, exist_ok=True)
    web.run_app(create_app(kind, data_dir), host="127.0.0.1", port=port, backlog=1024,
                access_log=None, shutdown_timeout=2,
                print=lambda _: print("READY", flush=True))


if __name__ == "__main__":
    main()
