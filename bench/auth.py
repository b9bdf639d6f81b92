"""What reading the token on every request costs, against the old in-process token cache.

Tokens used to be remembered in a dict after their first lookup; a revocation by
another process then went unseen until restart, so the cache was dropped
(issue 10). This measures authenticated ``GET /api/me`` requests through the
real app on loopback, both ways in the same run, alternating rounds:

- ``db``: the shipped store (one primary-key SELECT joined with ``users``
  per request, on the reader connection);
- ``cached``: the same store with ``credential_for_token`` answered from a dict
  after the first lookup (what the old cache did).

Each request also reads the user for ``/api/me`` (one more SELECT), as a real
handler does. Prints requests/s and process CPU per request for both, and the
ratios db/cached. Run: ``.venv/bin/python bench/auth.py [--requests 3000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from storage import Credential, TaskStore
from zhiyi_server import STORE, Config, create_app


def remember_tokens(store: TaskStore) -> None:
    """The old behaviour: a token seen valid is answered from memory from then on."""
    lookup = store.credential_for_token
    known: dict[str, Credential] = {}

    async def cached(token: str) -> Credential | None:
        if (hit := known.get(token)) is not None:
            return hit
        credential = await lookup(token)
        if credential is not None:
            known[token] = credential
        return credential

    store.credential_for_token = cached  # type: ignore[method-assign]


async def one_round(cached: bool, requests: int, concurrency: int) -> tuple[float, float]:
    """(requests per second, CPU milliseconds per request) of one round."""
    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(Config(data_path=Path(tmp), worker_concurrency=0))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            store = app[STORE]
            await store.add_user("alice", 0)
            token = await store.issue_token("alice")
            if cached:
                remember_tokens(store)
            headers = {"Authorization": f"Bearer {token}"}
            url = f"http://127.0.0.1:{port}/api/me"
            async with aiohttp.ClientSession() as session:
                async def worker(count: int) -> None:
                    for _ in range(count):
                        async with session.get(url, headers=headers) as resp:
                            assert resp.status == 200
                            await resp.read()

                await worker(50)  # warm up
                wall, cpu = time.perf_counter(), time.process_time()
                await asyncio.gather(*(worker(requests // concurrency)
                                       for _ in range(concurrency)))
                done = requests // concurrency * concurrency
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        finally:
            await runner.cleanup()
    return done / wall, cpu * 1000 / done


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    results: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for _ in range(args.rounds):
        for cached in (False, True):  # alternate, so drift in machine load hits both
            results[cached].append(await one_round(cached, args.requests, args.concurrency))
    print(f"{'variant':8} {'req/s (median)':>15} {'CPU ms/req (median)':>20}")
    medians = {}
    for cached, rows in results.items():
        rps = statistics.median(r for r, _ in rows)
        cpu = statistics.median(c for _, c in rows)
        medians[cached] = (rps, cpu)
        print(f"{'cached' if cached else 'db':8} {rps:15.0f} {cpu:20.3f}")
    (db_rps, db_cpu), (cache_rps, cache_cpu) = medians[False], medians[True]
    print(f"ratios db/cached: throughput {db_rps / cache_rps:.2f}, "
          f"CPU per request {db_cpu / cache_cpu:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
