"""What one task of the issue-13 pipeline costs the server, counted rather than timed.

Usage: ``.venv/bin/python bench/per_task.py [--n 50]``

The real app (``create_app``, SQLite, in-process workers) on a loopback port; ``n``
tasks one at a time, each the outside driver's (bench/outside.py): a ``translate``
with the ``pseudo`` engine of its 2 KB ``.txt``, created by multipart upload, its
SSE stream read to the final event. After a warm-up of 5 tasks, it counts per task:
database reads (statements through the reader thread), point reads (on the loop's
thread when it can; those that cannot are also counted as reads), write operations and write
transactions (COMMITs of the group writer), hops to a thread pool
(``run_in_executor``, which ``asyncio.to_thread`` and aiofiles use), wake-ups of
the event loop from other threads (``call_soon_threadsafe``: the reader's answers,
executors' results) and reads in the sandbox. These do not drift with the
machine's load, so a change that removes one shows here exactly; CPU belongs to
outside.py.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

BENCH_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH_DIR.parent), str(BENCH_DIR)]

from outside import one_task  # noqa: E402

import sandbox  # noqa: E402
import storage  # noqa: E402
from zhiyi_server import STORE, Config, create_app  # noqa: E402

COUNTS: collections.Counter[str] = collections.Counter()


def _counted(name: str, original: Any) -> Any:
    if asyncio.iscoroutinefunction(original):
        @functools.wraps(original)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            COUNTS[name] += 1
            return await original(*args, **kwargs)
    else:
        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            COUNTS[name] += 1
            return original(*args, **kwargs)
    return wrapper


def count_calls() -> None:
    """Wrap the entry points counted (this process only)."""
    storage.TaskStore._fetchall = _counted("reads", storage.TaskStore._fetchall)
    # on the loop's thread (no hop) if it can: _fetch_keyed since it came, _fetch_point before
    for point in ("_fetch_keyed", "_fetch_point"):
        if hasattr(storage.TaskStore, point):
            setattr(storage.TaskStore, point,
                    _counted("point reads", getattr(storage.TaskStore, point)))
            break
    storage.TaskStore._write = _counted("write ops", storage.TaskStore._write)
    storage.GroupWriter._run_batch = _counted("write transactions",
                                              storage.GroupWriter._run_batch)
    if hasattr(storage.TaskStore, "queue_task_status"):  # progress, queued, not awaited
        storage.TaskStore.queue_task_status = _counted(
            "write ops", storage.TaskStore.queue_task_status)
    sandbox.DocumentSandbox._run = _counted("sandbox reads", sandbox.DocumentSandbox._run)
    loop_class = type(asyncio.get_running_loop())
    loop_class.run_in_executor = _counted("thread hops", loop_class.run_in_executor)
    if hasattr(storage, "WriterThread"):  # the writer's hops, without run_in_executor since
        storage.WriterThread.run = _counted("thread hops", storage.WriterThread.run)
    loop_class.call_soon_threadsafe = _counted("loop wake-ups from threads",
                                               loop_class.call_soon_threadsafe)


async def counted_run(config: Config, n: int,
                      start_counting: Callable[[], None]) -> None:
    """The real app on a loopback port; 5 tasks to warm up, then ``start_counting()``
    and ``n`` tasks one at a time (each the outside driver's, which must complete)."""
    app = create_app(config)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    base = f"http://127.0.0.1:{port}"
    store = app[STORE]
    await store.add_user("bench", 10**9)
    headers = {"Authorization": f"Bearer {await store.issue_token('bench')}"}
    try:
        async with aiohttp.ClientSession() as session:
            for n_tasks, then in ((5, start_counting), (n, None)):
                for _ in range(n_tasks):
                    _, status = await one_task(session, base, headers)
                    assert status == "completed", status
                await asyncio.sleep(0.2)  # the last task's trailing writes
                if then is not None:
                    then()
    finally:
        await runner.cleanup()


async def run(n: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        await counted_run(Config(data_path=Path(tmp) / "data", log_level="WARNING"), n,
                          count_calls)
    return {name: count / n for name, count in sorted(COUNTS.items())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50, help="tasks counted")
    opts = parser.parse_args()
    per_task = asyncio.run(run(opts.n))
    width = max(map(len, per_task))
    for name, value in per_task.items():
        print(f"{name:<{width}}  {value:6.2f}")
    print(json.dumps(per_task))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
