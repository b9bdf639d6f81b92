"""Runs the real Zhiyi server (``create_app``) for the benchmarks, as tests/serve_for_tests.py does.

Usage: ``python bench/zhiyi_launcher.py PORT DATA_DIR``; settings come from the
environment exactly as for ``zhiyi serve`` (SSE_MAX_PER_USER, WORKER_CONCURRENCY...).

Bench-only additions, none of them in the server modules:

- task type ``bench``: 10 progress steps (``BENCH_STEP_SECONDS`` apart, default
  1 ms), then a one-line result file. Each step names its own stage, which
  makes the worker write (and push) every step instead of coalescing them, so
  the work shape is the same as the references'; ``BENCH_COALESCE=1`` keeps one
  stage and lets Zhiyi's ProgressReporter coalesce, as a real processor would.
- ``POST /bench/publish {"user", "rate", "count"}``: publishes ``count``
  notification events at ``rate``/s through the store's own write path
  (``BEGIN IMMEDIATE``, INSERT into ``task_events``, COMMIT, then the SSE hub),
  so every event is durable before it is pushed. The message carries the
  publish time; the handler answers when the last event is committed, with
  the p50/p99 time from the stamp to the commit's hand-over to the hub.
- ``BENCH_SWITCH_INTERVAL=<seconds>``: ``sys.setswitchinterval`` (a diagnostic:
  how much of a write's round trip is the writer thread waiting for the GIL).
- ``BENCH_PROGRESS_NOWAIT=1`` (a what-if, never on for the ``zhiyi`` rows): the
  worker's ProgressReporter queues each progress write and goes on without
  waiting for its COMMIT (writes stay in order; the one at 100 % is awaited,
  so it commits before the completion). Measures what the 10 awaited round
  trips per task cost in throughput.
- ``BENCH_COUNT_DB=1``: counts the store's reader queries (``_fetchone``,
  ``_fetchall``), write operations (``_write``) and COMMITs (group-writer
  batches); ``GET /bench/stats`` answers the counters. One Python call per
  database call: negligible next to the thread hop each costs.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pacing import STEPS, paced, stamp

import storage
from processors import Registry, TaskContext, default_registry
from zhiyi_server import STORE, Config, create_app

logger = logging.getLogger(__name__)

STEP_SECONDS = float(os.environ.get("BENCH_STEP_SECONDS", "0.001"))
COALESCE = os.environ.get("BENCH_COALESCE") == "1"
COUNT_DB = os.environ.get("BENCH_COUNT_DB") == "1"
DB_CALLS: Counter[str] = Counter()


def _counted_async(name: str, original: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    @functools.wraps(original)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        DB_CALLS[name] += 1
        return await original(*args, **kwargs)

    return wrapper


def _counted_batches(original: Callable[..., list[Any]]) -> Callable[..., list[Any]]:
    @functools.wraps(original)
    def wrapper(self: Any, ops: list[Any]) -> list[Any]:
        DB_CALLS["commits"] += 1  # one transaction per batch (writer thread; GIL-atomic)
        return original(self, ops)

    return wrapper


def count_db_calls() -> None:
    """Wrap the store's database entry points with counters (this process only)."""
    for name in ("_fetchone", "_fetchall", "_write"):
        setattr(storage.TaskStore, name, _counted_async(name, getattr(storage.TaskStore, name)))
    writer = getattr(storage, "GroupWriter", None)
    if writer is not None:
        writer._run_batch = _counted_batches(writer._run_batch)


PENDING_WRITES: set[asyncio.Future[Any]] = set()


def progress_nowait() -> None:
    """What-if: progress writes queued, not awaited, by the processor (this process only)."""
    import worker

    original = worker.ProgressReporter.flush

    async def flush(self: worker.ProgressReporter) -> None:
        if self.percent >= 100:
            await original(self)
            return
        job = asyncio.ensure_future(original(self))
        PENDING_WRITES.add(job)
        job.add_done_callback(PENDING_WRITES.discard)

    worker.ProgressReporter.flush = flush  # type: ignore[method-assign]


async def stats(request: web.Request) -> web.Response:
    return web.json_response(dict(DB_CALLS))


def build_registry() -> Registry:
    """The built-in task types plus ``bench``."""
    registry = default_registry().copy()

    @registry.processor("bench", extensions=(".txt",), parses_document=False,
                        description="Benchmark work shape: 10 progress steps")
    async def bench(ctx: TaskContext) -> Path:
        for step in range(1, STEPS + 1):
            await asyncio.sleep(STEP_SECONDS)
            stage = "working" if COALESCE else f"step-{step}"
            await ctx.progress(100 * step / STEPS, f"step {step} of {STEPS}", stage=stage)
        out = ctx.result_path("bench.txt")
        out.write_text("done\n")
        return out

    return registry


#: storage.py's write path: ``_write(op)`` with a synchronous op (group commit), or the
#: older ``async with _write() as txn`` with an async ``_append_event``.
WRITE_TAKES_OP = "op" in inspect.signature(storage.TaskStore._write).parameters


async def publish_notice(store: storage.TaskStore, user_id: str, message: str) -> None:
    """One durable notification, through the same write path as ``grant_credits``."""
    data = {"level": "info", "message": message}
    if WRITE_TAKES_OP:
        await store._write(
            lambda txn: storage._append_event(txn, None, user_id, "notification", data))
        return
    async with store._write() as txn:  # type: ignore[call-arg]
        await storage._append_event(txn, None, user_id, "notification", data)


COMMITS = web.AppKey("bench.commit_ns", list)


async def commit_probe(app: web.Application) -> AsyncIterator[None]:
    """A store listener after the hub's: stamp -> committed and offered to every stream.

    Listeners run right after COMMIT, before any stream runs, so this is the
    durable part of the publish-to-receipt latency, without the fan-out.
    """
    store, commits = app[STORE], app[COMMITS]

    def listener(event: storage.Event) -> None:
        message = event.data.get("message", "") if event.type == "notification" else ""
        if "@ts=" in message:
            commits.append(time.monotonic_ns() - int(message.rsplit("@ts=", 1)[1].rstrip("@")))

    store.add_listener(listener)
    yield
    store.remove_listener(listener)


def _ms(sorted_ns: list[int], q: float) -> float | None:
    return sorted_ns[min(len(sorted_ns) - 1, int(len(sorted_ns) * q))] / 1e6 if sorted_ns \
        else None


async def publish(request: web.Request) -> web.Response:
    body = await request.json()
    store, commits = request.config_dict[STORE], request.config_dict[COMMITS]
    commits.clear()
    started = time.monotonic()
    count = 0
    async for seq in paced(int(body["count"]), float(body["rate"])):
        await publish_notice(store, str(body["user"]), stamp(seq))
        count += 1
    done = sorted(commits)
    return web.json_response({"published": count, "seconds": time.monotonic() - started,
                              "commit_p50_ms": _ms(done, 0.5), "commit_p99_ms": _ms(done, 0.99)})


def main() -> None:
    logging.basicConfig(level=os.environ.get("ZHIYI_LOG_LEVEL", "WARNING"))
    port, data_dir = int(sys.argv[1]), Path(sys.argv[2])
    if COUNT_DB:
        count_db_calls()
    if os.environ.get("BENCH_PROGRESS_NOWAIT") == "1":
        progress_nowait()
    if os.environ.get("BENCH_SWITCH_INTERVAL"):
        sys.setswitchinterval(float(os.environ["BENCH_SWITCH_INTERVAL"]))
    config = Config.from_env(data_path=data_dir, port=port)
    app = create_app(config, registry=build_registry())
    app[COMMITS] = []
    app.cleanup_ctx.append(commit_probe)  # after the store's and the hub's contexts
    app.router.add_post("/bench/publish", publish)
    app.router.add_get("/bench/stats", stats)
    web.run_app(app, host="127.0.0.1", port=port, backlog=1024, access_log=None,
                shutdown_timeout=2, print=lambda _: print("READY", flush=True))


if __name__ == "__main__":
    main()
