"""Round trips to PostgreSQL per task of the issue-13 pipeline, counted rather than timed.

Usage: ``.venv/bin/python bench/pg_round_trips.py [--n 50]
[--pg postgresql://postgres@127.0.0.1:5432/test]``

The real app (``create_app``, the PostgreSQL store, in-process workers) on a loopback
port, over a database this run makes on ``--pg``'s server and drops; ``n`` tasks one
at a time, each the outside driver's (bench/per_task.py's ``counted_run``). After a
warm-up of 5 tasks it counts, per task, the statements psycopg sent: each
``execute`` is one message and one wait for its answer, i.e. one round trip, by the
writer thread (write transactions, however many statements a message carries) and
by the readers (the pool's connections); and the write transactions. On a shared
machine the time of a round trip drifts with the load; their number does not.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import json
import secrets
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import psycopg

BENCH_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH_DIR.parent), str(BENCH_DIR)]

from per_task import counted_run  # noqa: E402

import storage  # noqa: E402
from zhiyi_server import Config  # noqa: E402

COUNTS: collections.Counter[str] = collections.Counter()


def count_round_trips() -> None:
    """Wrap psycopg's ``execute`` (this process only): by the writer thread, or a read."""
    sync_execute = psycopg.Cursor.execute
    async_execute = psycopg.AsyncCursor.execute

    @functools.wraps(sync_execute)
    def execute(self: Any, *args: Any, **kwargs: Any) -> Any:
        if threading.current_thread().name.startswith("zhiyi-sqlite-writer"):
            COUNTS["writer round trips"] += 1
        return sync_execute(self, *args, **kwargs)

    @functools.wraps(async_execute)
    async def aexecute(self: Any, *args: Any, **kwargs: Any) -> Any:
        COUNTS["read round trips"] += 1
        return await async_execute(self, *args, **kwargs)

    psycopg.Cursor.execute = execute  # type: ignore[method-assign]
    psycopg.AsyncCursor.execute = aexecute  # type: ignore[method-assign]
    run_batch = storage.GroupWriter._run_batch

    @functools.wraps(run_batch)
    def counted_batch(self: Any, *args: Any, **kwargs: Any) -> Any:
        COUNTS["write transactions"] += 1
        return run_batch(self, *args, **kwargs)

    storage.GroupWriter._run_batch = counted_batch  # type: ignore[method-assign]


async def run(n: int, url: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        await counted_run(Config(data_path=Path(tmp) / "data", database_url=url,
                                 log_level="WARNING"), n, count_round_trips)
    per_task = {name: count / n for name, count in sorted(COUNTS.items())}
    per_task["round trips"] = per_task.get("writer round trips", 0) + per_task.get(
        "read round trips", 0)
    return per_task


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50, help="tasks counted")
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test")
    opts = parser.parse_args()
    name = f"zhiyi_round_trips_{secrets.token_hex(3)}"
    with psycopg.connect(opts.pg, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        per_task = asyncio.run(run(opts.n, f"{opts.pg.rsplit('/', 1)[0]}/{name}"))
    finally:
        with psycopg.connect(opts.pg, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    width = max(map(len, per_task))
    for key, value in per_task.items():
        print(f"{key:<{width}}  {value:6.2f}")
    print(json.dumps(per_task))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
