"""Costs of single operations on Zhiyi's task path, to read the task benchmark's CPU per task.

Usage: ``.venv/bin/python bench/micro.py``.

CPU is ``time.process_time()`` (every thread of this process: the aiosqlite
reader thread and the store's writer thread included), wall is elapsed time.
Store operations run on the real ``TaskStore`` over a file in bench/results/tmp,
one at a time and then 50 at once (as 50 in-flight tasks do). Header parsing
is aiohttp's own, as the create handler reaches it.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiohttp.helpers import parse_content_type
from aiohttp.multipart import parse_content_disposition
from common import remove_tree, scratch_dir, write_results

from storage import NewTask, TaskStore

N = 2000
CONCURRENCY = 50


async def timed(n: int, concurrency: int, op: Callable[[int], Awaitable[Any]]) -> dict[str, float]:
    """µs of CPU and wall per call of ``op(i)`` for i in range(n), ``concurrency`` at a time."""
    counter = iter(range(n))

    async def loop() -> None:
        for i in counter:
            await op(i)

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return {"cpu_us": (time.process_time() - cpu) / n * 1e6,
            "wall_us": (time.perf_counter() - wall) / n * 1e6}


async def store_costs() -> dict[str, dict[str, float]]:
    work = scratch_dir("micro")
    store = await TaskStore.open(work / "micro.db")
    try:
        await store.add_user("micro", 10 * N)
        tasks = []
        for i in range(CONCURRENCY):
            task, _ = await store.create_processing_task(NewTask(
                user_id="micro", task_type="bench", params={}, file_name="doc.txt", file_size=1,
                file_path=f"micro/{i}", credits_cost=1, max_active=10 * N))
            tasks.append(task)
        claimed = [await store.claim_next_task("micro", 60) for _ in tasks]
        ids = [t.id for t in claimed if t is not None]

        async def read(i: int) -> Any:
            return await store.get_task_by_id(ids[i % len(ids)])

        async def write(i: int) -> Any:
            task_id = ids[i % len(ids)]
            return await store.update_task_status(task_id, 1, progress=i % 100,
                                                  message=f"step {i}", stage=f"s{i % 10}")

        out = {}
        for name, op in (("read: get_task_by_id", read),
                         ("write: update_task_status", write)):
            for c in (1, CONCURRENCY):
                out[f"{name}, {c} at once"] = await timed(N, c, op)
        return out
    finally:
        await store.close()
        remove_tree(work)


def parse_costs() -> dict[str, dict[str, float]]:
    def per_call(fn: Callable[[str], Any], values: list[str]) -> dict[str, float]:
        cpu = time.process_time()
        for value in values:
            fn(value)
        return {"cpu_us": (time.process_time() - cpu) / len(values) * 1e6}

    boundaries = [f"multipart/form-data; boundary={i:032x}" for i in range(N)]
    disposition = ['form-data; name="file"; filename="doc.txt"'] * N
    return {
        "request.content_type, a new multipart boundary (every upload)":
            per_call(parse_content_type.__wrapped__, boundaries),
        "BodyPartReader.name / .filename (Content-Disposition, each access)":
            per_call(parse_content_disposition, disposition),
        "json.dumps of a status_update": per_call(
            lambda _: json.dumps({"type": "status_update", "data": {
                "taskId": 1, "status": "processing", "progress": 40, "message": "step 4 of 10",
                "stage": "step-4", "etaSeconds": None, "attempts": 1}}), disposition),
    }


def main() -> int:
    costs = asyncio.run(store_costs())
    costs |= parse_costs()
    width = max(len(k) for k in costs)
    print(f"{'operation':<{width}}  {'CPU µs':>9}  {'wall µs':>9}")
    for name, figures in costs.items():
        wall = f"{figures['wall_us']:9.1f}" if "wall_us" in figures else f"{'-':>9}"
        print(f"{name:<{width}}  {figures['cpu_us']:9.1f}  {wall}")
    print(f"\nwritten to {write_results('micro', costs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
