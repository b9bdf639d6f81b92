"""The store's task path on PostgreSQL against SQLite, in the same run.

Usage: ``.venv/bin/python bench/stores.py [--n 1000] [--c 50] [--repeat 3]
[--pg postgresql://postgres@127.0.0.1:5432/test]``.

Each task goes the whole way through the real store — create (charge), claim, three
progress updates, complete — ``--c`` tasks at a time, as that many in-flight tasks do;
every step is one durable transaction with its event. SQLite is a file in
bench/results/tmp; PostgreSQL a database this run makes on the given server and drops.
Prints tasks/s of each and the ratio PostgreSQL / SQLite (median of the repeats, the
two stores taken in turn so load from other people's runs falls on both).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg
from common import remove_tree, scratch_dir, write_results

from storage import NewTask, TaskStore, open_store


async def lifecycle(store: TaskStore, n: int, concurrency: int) -> float:
    """Tasks per second through create, claim, 3 progress updates and complete."""
    await store.add_user("bench", 10 * n)
    numbers = iter(range(n))

    async def run() -> None:
        for i in numbers:
            await store.create_processing_task(NewTask(
                user_id="bench", task_type="translate", params={}, file_name="a.txt",
                file_size=2048, file_path=f"bench/{i}", credits_cost=1, max_active=10 * n))
            task = await store.claim_next_task("bench-worker", 60)
            assert task is not None
            for progress in (25, 50, 75):
                await store.update_task_status(task.id, task.attempts, progress=progress,
                                               message="working")
            await store.complete_task(task.id, "a.txt", attempt=task.attempts)

    started = time.perf_counter()
    await asyncio.gather(*(run() for _ in range(concurrency)))
    return n / (time.perf_counter() - started)


async def one(kind: str, server: str, n: int, concurrency: int) -> float:
    folder = scratch_dir("stores")
    name = f"zhiyi_bench_{secrets.token_hex(3)}"
    url = None
    if kind == "postgres":
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        url = f"{server.rsplit('/', 1)[0]}/{name}"
    store = await open_store(folder / "zhiyi.db", url)
    try:
        return await lifecycle(store, n, concurrency)
    finally:
        await store.close()
        remove_tree(folder)
        if url:
            with psycopg.connect(server, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--c", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    rates: dict[str, list[float]] = {"sqlite": [], "postgres": []}
    for _ in range(args.repeat):
        for kind in rates:
            rates[kind].append(await one(kind, args.pg, args.n, args.c))
    sqlite, postgres = (statistics.median(rates[k]) for k in ("sqlite", "postgres"))
    runs = "; ".join(f"{k} " + " ".join(f"{r:.0f}" for r in v) for k, v in rates.items())
    print(f"tasks/s  sqlite {sqlite:.0f}  postgres {postgres:.0f}  (runs: {runs})")
    print(f"ratio postgres/sqlite: {postgres / sqlite:.2f}")
    write_results("stores", {"n": args.n, "c": args.c, "sqlite_tasks_per_s": sqlite,
                             "postgres_tasks_per_s": postgres, "ratio": postgres / sqlite})


if __name__ == "__main__":
    asyncio.run(main())
