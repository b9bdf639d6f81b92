"""Where the time of one task goes, with one task in flight (issue 13's "p50, 1 in flight").

Starts the real ``zhiyi serve --workers 0`` (pinned to CPU 0 like bench/outside.py,
this driver on CPU 1), then runs ``--n`` tasks of the outside driver's kind (a
``translate`` with the ``pseudo`` engine of a 2 KB ``.txt``) one after another. For
each task it records, from the moment the create request is sent: the create
response, the stream's response headers, and the arrival of every event (its
status, stage and progress). It prints the median time of each step and the gap
since the step before, so a wait (a poll, a batching delay, a wake-up) shows as a
large gap with little work around it.

    .venv/bin/python bench/timeline.py [--n 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from collections import defaultdict

import aiohttp
from common import ServerProcess, add_zhiyi_user, free_port, remove_tree, scratch_dir
from outside import DOCUMENT, PARAMS, SERVER_CPU, ZHIYI

FINAL = {"completed", "failed", "cancelled"}


async def one_task(session: aiohttp.ClientSession, base: str) -> list[tuple[str, float]]:
    """(step name, ms since the create request was sent) for each step of one task."""
    start = time.perf_counter()

    def now() -> float:
        return (time.perf_counter() - start) * 1000

    form = aiohttp.FormData()
    form.add_field("taskType", "translate")
    form.add_field("params", PARAMS)
    form.add_field("file", DOCUMENT, filename="doc.txt", content_type="text/plain")
    async with session.post(base + "/api/tasks/create", data=form) as resp:
        created = await resp.json()
    steps = [("create answered", now())]
    async with session.get(base + created["sseUrl"]) as resp:
        steps.append(("stream headers", now()))
        buffer = b""
        async for chunk in resp.content.iter_any():
            buffer += chunk
            while (end := buffer.find(b"\n\n")) >= 0:
                block, buffer = buffer[:end], buffer[end + 2:]
                for line in block.split(b"\n"):
                    if line.startswith(b"data:"):
                        data = json.loads(line[5:]).get("data", {})
                        name = (f"event {data.get('status')}/{data.get('stage') or '-'}"
                                f" {data.get('progress')}")
                        steps.append((name, now()))
                        if data.get("status") in FINAL:
                            return steps
    return steps


async def drive(base: str, token: str, n: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = defaultdict(list)
    order: list[str] = []
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        for _ in range(10):  # warm-up: parsers, caches, first connections
            await one_task(session, base)
        for _ in range(n):
            for name, ms in await one_task(session, base):
                if name not in times:
                    order.append(name)
                times[name].append(ms)
    return {name: times[name] for name in order}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=60, help="tasks measured (after 10 to warm up)")
    parser.add_argument("--workers", default="0", help="zhiyi serve --workers (default 0)")
    opts = parser.parse_args()
    os.sched_setaffinity(0, {1})
    work = scratch_dir("timeline")
    data, port = work / "data", free_port()
    env = {"ZHIYI_LOG_LEVEL": "WARNING"}
    token = add_zhiyi_user(data, "bench", 10**9, env)
    server = ServerProcess("zhiyi", ["taskset", "-c", SERVER_CPU, ZHIYI, "serve", "--data",
                                     str(data), "--host", "127.0.0.1", "--port", str(port),
                                     "--workers", opts.workers],
                           env, work / "server.log", ready_prefix="Zhiyi is running")
    server.start(timeout=90)
    try:
        times = asyncio.run(drive(f"http://127.0.0.1:{port}", token, opts.n))
    finally:
        server.stop()
        remove_tree(work)
    print(f"One task at a time, {opts.n} tasks: median ms since the create request was sent")
    previous = 0.0
    for name, values in times.items():
        median = statistics.median(values)
        seen = f"{len(values)}/{opts.n}" if len(values) != opts.n else ""
        print(f"  {name:<40} {median:8.2f}   +{median - previous:7.2f}  {seen}")
        previous = median


if __name__ == "__main__":
    main()
