"""Soak: steady tasks and many open streams with reconnects, sampled over a long run.

Usage: ``python bench/soak.py [--minutes 30] [--streams 1000] [--rate 5]`` (needs the
``bench`` extra: psutil, matplotlib). Not part of the suite: it runs as long as asked.

What it does, against the real server (``bench/zhiyi_launcher.py``, WAL SQLite in a scratch
folder, ``WORKER_CONCURRENCY=4``):

- ``--rate`` real ``translate`` tasks a second (the ``pseudo`` engine, a 2 KB ``.txt``), each
  followed on its own task stream to its final event, spread over ``--users`` users;
- ``--streams`` notification streams spread over the same users, each closing and reopening
  with ``Last-Event-ID`` every ``--reconnect`` seconds on average (at random moments); every
  stream checks it never sees an event id twice or out of order;
- every ``--interval`` seconds: the server's RSS and open file descriptors, task completion
  latency (create sent to final event read; p50/p99 of the tasks that ended in the window) and
  event lag (a notification's arrival minus the first arrival of the same event on any
  stream, p50/p99), streams open, reconnects, ordering errors.

It writes ``bench/results/soak-<time>.csv`` and ``.png`` (the four series over time) and
prints a summary: growth of RSS and descriptors from the first to the last third of the run
(a leak shows as growth beyond noise), the latency and lag percentiles, and the error counts.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    PYTHON,
    RESULTS,
    ServerProcess,
    add_zhiyi_user,
    free_port,
    percentile,
    remove_tree,
    scratch_dir,
)

FINAL = {"completed", "failed", "cancelled"}
DOCUMENT = ("A steady paragraph of a soak test, translated again and again.\n\n" * 32)[:2048]


@dataclass
class Window:
    """What happened since the last sample."""

    latencies: list[float] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)
    reconnects: int = 0
    order_errors: int = 0
    task_errors: int = 0


@dataclass
class Soak:
    base: str
    tokens: list[str]
    window: Window = field(default_factory=Window)
    first_seen: dict[str, float] = field(default_factory=dict)
    open_streams: int = 0
    stopping: bool = False

    def auth(self, i: int) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[i % len(self.tokens)]}"}

    def arrived(self, event_id: str) -> None:
        now = time.monotonic()
        first = self.first_seen.setdefault(event_id, now)
        if first != now:
            self.window.lags.append(now - first)


async def _events(resp: aiohttp.ClientResponse) -> Any:
    """(id, data) of each SSE message, parsed line by line."""
    event_id, data = None, []
    async for raw in resp.content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if data:
                yield event_id, json.loads("\n".join(data))
            event_id, data = None, []
        elif line.startswith("id:"):
            event_id = line[3:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


async def one_task(soak: Soak, session: aiohttp.ClientSession, i: int) -> None:
    start = time.monotonic()
    form = aiohttp.FormData()
    form.add_field("taskType", "translate")
    form.add_field("params", json.dumps({"targetLang": "zh", "engine": "pseudo"}))
    form.add_field("file", DOCUMENT.encode(), filename="soak.txt", content_type="text/plain")
    try:
        async with session.post(soak.base + "/api/tasks/create", data=form,
                                headers=soak.auth(i)) as resp:
            created = await resp.json()
            if resp.status != 201:
                soak.window.task_errors += 1
                return
        async with session.get(soak.base + created["sseUrl"], headers=soak.auth(i)) as resp:
            async for event_id, message in _events(resp):
                if event_id:
                    soak.arrived(event_id)
                if message.get("data", {}).get("status") in FINAL:
                    soak.window.latencies.append(time.monotonic() - start)
                    return
    except (aiohttp.ClientError, TimeoutError):
        soak.window.task_errors += 1


async def producer(soak: Soak, session: aiohttp.ClientSession, rate: float) -> None:
    running: set[asyncio.Task[None]] = set()
    i = 0
    while not soak.stopping:
        task = asyncio.create_task(one_task(soak, session, i))
        running.add(task)
        task.add_done_callback(running.discard)
        i += 1
        await asyncio.sleep(random.expovariate(rate))
    await asyncio.gather(*running, return_exceptions=True)


async def follower(soak: Soak, session: aiohttp.ClientSession, i: int, reconnect: float) -> None:
    last_id: str | None = None
    while not soak.stopping:
        headers = soak.auth(i) | ({"Last-Event-ID": last_id} if last_id else {})
        until = time.monotonic() + random.expovariate(1 / reconnect)
        try:
            async with session.get(soak.base + "/api/sse/notifications",
                                   headers=headers) as resp:
                soak.open_streams += 1
                try:
                    async with asyncio.timeout_at(asyncio.get_running_loop().time()
                                                  + (until - time.monotonic())):
                        async for event_id, _ in _events(resp):
                            if event_id is None:
                                continue
                            if last_id is not None and int(event_id) <= int(last_id):
                                soak.window.order_errors += 1
                            last_id = event_id
                            soak.arrived(event_id)
                except TimeoutError:
                    pass
                finally:
                    soak.open_streams -= 1
        except aiohttp.ClientError:
            await asyncio.sleep(1)
        soak.window.reconnects += 1


def sample(soak: Soak, proc: psutil.Process, t0: float) -> dict[str, float]:
    w, soak.window = soak.window, Window()
    lat, lag = sorted(w.latencies), sorted(w.lags)
    return {
        "t": round(time.monotonic() - t0, 1),
        "rss_mb": proc.memory_info().rss / 1e6,
        "fds": proc.num_fds(),
        "streams": soak.open_streams,
        "tasks": len(lat),
        "latency_p50_ms": percentile(lat, 50) * 1000,
        "latency_p99_ms": percentile(lat, 99) * 1000,
        "lag_p50_ms": percentile(lag, 50) * 1000,
        "lag_p99_ms": percentile(lag, 99) * 1000,
        "reconnects": w.reconnects,
        "order_errors": w.order_errors,
        "task_errors": w.task_errors,
    }


async def drive(args: argparse.Namespace, base: str, tokens: list[str],
                proc: psutil.Process) -> list[dict[str, float]]:
    soak = Soak(base, tokens)
    samples: list[dict[str, float]] = []
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        workers = [asyncio.create_task(follower(soak, session, i, args.reconnect))
                   for i in range(args.streams)]
        workers.append(asyncio.create_task(producer(soak, session, args.rate)))
        t0 = end = time.monotonic()
        end = t0 + args.minutes * 60
        while time.monotonic() < end:
            await asyncio.sleep(args.interval)
            samples.append(sample(soak, proc, t0))
            print(json.dumps(samples[-1]), flush=True)
        soak.stopping = True
        for task in workers[:-1]:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return samples


def growth(samples: list[dict[str, float]], key: str) -> float:
    """Mean of the last third over the mean of the first third (1.0: flat)."""
    third = max(len(samples) // 3, 1)
    first = sum(s[key] for s in samples[:third]) / third
    last = sum(s[key] for s in samples[-third:]) / third
    return last / first if first else float("nan")


def plot(samples: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] / 60 for s in samples]
    fig, axes = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    series = [("rss_mb", "server RSS (MB)"), ("fds", "open descriptors"),
              (("latency_p50_ms", "latency_p99_ms"), "task latency p50/p99 (ms)"),
              (("lag_p50_ms", "lag_p99_ms"), "event lag p50/p99 (ms)")]
    for ax, (keys, label) in zip(axes, series, strict=True):
        for key in (keys,) if isinstance(keys, str) else keys:
            ax.plot(t, [s[key] for s in samples], label=key)
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("minutes")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--rate", type=float, default=5, help="tasks started per second")
    parser.add_argument("--reconnect", type=float, default=60,
                        help="mean seconds a stream stays open before it reconnects")
    parser.add_argument("--interval", type=float, default=10)
    args = parser.parse_args(argv)

    work = scratch_dir("soak")
    port = free_port()
    tokens = [add_zhiyi_user(work, f"soak{i}", 10**9) for i in range(args.users)]
    per_user = args.streams // args.users + 50
    server = ServerProcess("zhiyi", [PYTHON, "bench/zhiyi_launcher.py", str(port), str(work)],
                           env={"WORKER_CONCURRENCY": "4", "SSE_MAX_PER_USER": str(per_user),
                                "ZHIYI_LOG_LEVEL": "WARNING"},
                           log_path=work / "server.log").start()
    try:
        samples = asyncio.run(drive(args, f"http://127.0.0.1:{port}", tokens,
                                    psutil.Process(server.pid)))
    finally:
        server.stop()
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / time.strftime("soak-%Y%m%d-%H%M%S")
    with stem.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(samples[0]))
        writer.writeheader()
        writer.writerows(samples)
    plot(samples, stem.with_suffix(".png"))
    done = [s for s in samples if s["tasks"]]
    print(f"\n{len(samples)} samples over {args.minutes:g} min; {args.streams} streams, "
          f"{args.rate:g} tasks/s; {sum(s['tasks'] for s in samples):.0f} tasks ended")
    print(f"RSS growth (last third / first third): {growth(samples, 'rss_mb'):.3f}; "
          f"descriptors: {growth(samples, 'fds'):.3f}")
    print(f"latency p99 median over samples: "
          f"{sorted(s['latency_p99_ms'] for s in done)[len(done) // 2]:.0f} ms; "
          f"lag p99 median: {sorted(s['lag_p99_ms'] for s in done)[len(done) // 2]:.0f} ms")
    print(f"reconnects {sum(s['reconnects'] for s in samples):.0f}, ordering errors "
          f"{sum(s['order_errors'] for s in samples):.0f}, task errors "
          f"{sum(s['task_errors'] for s in samples):.0f}")
    print(f"series: {stem}.csv, plot: {stem}.png")
    remove_tree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
