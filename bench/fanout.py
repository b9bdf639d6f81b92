"""Fan-out benchmark: N idle subscribers of one user's notification stream, one publisher.

Usage: ``.venv/bin/python bench/fanout.py --n 1000 5000`` (``--quick`` for a short
run, ``--repeat 3`` for medians over three rounds in rotated order).

For each N and each server (Zhiyi through the real store and SSE hub, then
reference (b) plain StreamResponse and (a) aiohttp-sse), in a fresh server
process:

1. memory: RSS of the server before and after N streams connect and sit idle;
   ``(after - before) / N`` is the memory per idle connection;
2. steady phase: the server publishes ``rate`` events/s for ``--seconds`` (rate
   defaults to 10,000 deliveries/s over N: 10/s at N=1,000, 2/s at N=5,000);
   every event carries its publish time; figures: delivered events/s, p50/p99
   latency from publish to receipt, server CPU per delivered event, load
   generator CPU per event; for Zhiyi also the time from publish to the
   commit's hand-over to the SSE hub (the durable part of the latency);
3. burst phase: ``--burst`` events as fast as the publisher goes; delivered
   events/s from the first publish to the last receipt, and CPU per event.

Zhiyi's events are committed to ``task_events`` before they are pushed; the
count in the database is checked after the run (``durable`` column).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import sqlite3
import statistics
import subprocess
import sys
import time
import urllib.request
from array import array
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from common import (
    PYTHON,
    RESULTS,
    CpuMeter,
    ServerProcess,
    add_zhiyi_user,
    free_port,
    machine,
    percentile,
    print_table,
    ratio,
    remove_tree,
    rss,
    scratch_dir,
    write_results,
)
from loadgen import fanout_client

logger = logging.getLogger(__name__)

SERVERS = ("zhiyi", "plain", "aiohttp-sse")
LABELS = {"zhiyi": "zhiyi", "plain": "(b) plain", "aiohttp-sse": "(a) aiohttp-sse"}
USER = "bench"
WARMUP_EVENTS = 3


@dataclass
class Run:
    """Figures of one server at one N."""

    server: str
    n: int
    connected: int
    rate: float
    mem_per_conn_kib: float
    delivered: int
    expected: int
    delivered_per_s: float
    p50_ms: float
    p99_ms: float
    server_us_per_event: float
    client_us_per_event: float
    burst_delivered_per_s: float
    burst_server_us_per_event: float
    lost: int
    durable_events: int | None = None
    published_events: int | None = None
    #: Zhiyi: from the stamp to the commit returning (the durable part of the latency)
    commit_p50_ms: float | None = None
    commit_p99_ms: float | None = None


class Clients:
    """The client processes of the load generator."""

    def __init__(self, count: int) -> None:
        ctx = mp.get_context("spawn")
        self.pipes: list[Connection] = []
        self.procs = []
        for _ in range(count):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=fanout_client, args=(child,), daemon=True)
            proc.start()
            self.pipes.append(parent)
            self.procs.append(proc)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def all(self, command: str, args: list[Any] | None = None) -> list[Any]:
        for i, pipe in enumerate(self.pipes):
            pipe.send((command, args[i] if args else None))
        return [pipe.recv() for pipe in self.pipes]

    def one(self, index: int, command: str, arg: Any = None) -> Any:
        self.pipes[index].send((command, arg))
        return self.pipes[index].recv()

    def close(self) -> None:
        self.all("exit")
        for proc in self.procs:
            proc.join(5)


def start_server(kind: str, n: int, work: Path, heartbeat: float) -> tuple[ServerProcess, str]:
    port = free_port()
    env = {"SSE_HEARTBEAT_SECONDS": str(heartbeat), "PYTHONUNBUFFERED": "1"}
    if kind == "zhiyi":
        token = add_zhiyi_user(work / "data", USER, 1000)
        env |= {"SSE_MAX_PER_USER": str(n + 64), "SSE_MAX_TOTAL": str(n + 64),
                "ZHIYI_LOG_LEVEL": "WARNING"}
        argv = [PYTHON, "bench/zhiyi_launcher.py", str(port), str(work / "data")]
    else:
        token = "unused"
        argv = [PYTHON, "bench/ref_sse.py", kind, str(port), str(work / "data")]
    server = ServerProcess(kind, argv, env, log_path=work / "server.log").start()
    server.env["PORT"] = str(port)
    return server, token


def publish(port: int, rate: float, count: int, timeout: float) -> dict[str, Any]:
    body = json.dumps({"user": USER, "rate": rate, "count": count}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/bench/publish", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return dict(json.load(resp))


def wait_delivered(clients: Clients, expected: int, timeout: float) -> list[dict[str, int]]:
    deadline = time.monotonic() + timeout
    while True:
        stats = clients.all("stats")
        if sum(s["received"] for s in stats) >= expected or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


def split(n: int, parts: int) -> list[int]:
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


@dataclass
class Phase:
    delivered: int
    first_ns: int
    last_ns: int
    lost: int
    server_cpu: float
    client_cpu: float
    latencies: list[int]


def run_phase(server: ServerProcess, clients: Clients, n: int, rate: float, count: int,
              ) -> tuple[Phase, dict[str, Any]]:
    port = int(server.env["PORT"])
    clients.all("reset")
    server_cpu, client_cpu = CpuMeter([server.pid]), CpuMeter(clients.pids)
    server_cpu.mark()
    client_cpu.mark()
    started = time.monotonic_ns()
    answer = publish(port, rate, count, timeout=count / max(rate, 1) + 120)
    wait_delivered(clients, n * count, timeout=30)
    cpu_s, cpu_c = server_cpu.elapsed(), client_cpu.elapsed()
    collected = clients.all("collect")
    latencies: list[int] = []
    for _, raw in collected:
        values = array("q")
        values.frombytes(raw)
        latencies.extend(values)
    stats = [s for s, _ in collected]
    phase = Phase(
        delivered=sum(s["received"] for s in stats),
        first_ns=started,
        last_ns=max((s["last_ns"] for s in stats), default=started),
        lost=sum(s["lost"] for s in stats),
        server_cpu=cpu_s, client_cpu=cpu_c, latencies=sorted(latencies),
    )
    return phase, answer


def connect(clients: Clients, server: ServerProcess, token: str, n: int) -> int:
    port = int(server.env["PORT"])
    args = [{"host": "127.0.0.1", "port": port, "path": "/api/sse/notifications",
             "headers": {"Authorization": f"Bearer {token}"}, "count": share,
             "parallel": 32} for share in split(n, len(clients.pipes))]
    replies = clients.all("connect", args)
    for reply in replies:
        if reply["errors"]:
            logger.warning("connect errors: %s", reply["errors"])
    return sum(r["connected"] for r in replies)


def measure(kind: str, n: int, clients: Clients, opts: argparse.Namespace) -> Run:
    work = scratch_dir(f"fanout-{kind}-{n}")
    server, token = start_server(kind, n, work, opts.heartbeat)
    published = 0
    try:
        # Warm-up on one connection, so the baseline RSS includes what the first stream loads.
        clients.one(0, "connect", {"host": "127.0.0.1", "port": int(server.env["PORT"]),
                                   "path": "/api/sse/notifications",
                                   "headers": {"Authorization": f"Bearer {token}"},
                                   "count": 1, "parallel": 1})
        published += publish(int(server.env["PORT"]), 0, WARMUP_EVENTS, 30)["published"]
        wait_delivered(clients, WARMUP_EVENTS, 10)
        clients.all("disconnect")
        time.sleep(0.5)
        before = rss(server.pid)
        connected = connect(clients, server, token, n)
        time.sleep(opts.settle)
        after = rss(server.pid)
        rate = opts.rate or max(1.0, opts.deliveries / n)
        count = max(1, round(rate * opts.seconds))
        profiler = start_profiler(server, f"fanout-{kind}-{n}", opts.seconds) \
            if opts.profile else None
        steady, answer = run_phase(server, clients, n, rate, count)
        if profiler is not None:
            profiler.wait(60)
        published += answer["published"]
        burst, burst_answer = run_phase(server, clients, n, 0, opts.burst)
        published += burst_answer["published"]
        clients.all("disconnect")
    finally:
        server.stop()
    run = summarize(kind, n, connected, rate, count, (after - before) / max(connected, 1),
                    steady, burst)
    if kind == "zhiyi":
        run.durable_events = count_notifications(work / "data" / "zhiyi.db")
        run.published_events = published
        run.commit_p50_ms = answer.get("commit_p50_ms")
        run.commit_p99_ms = answer.get("commit_p99_ms")
    remove_tree(work)
    return run


def summarize(kind: str, n: int, connected: int, rate: float, count: int, mem: float,
              steady: Phase, burst: Phase) -> Run:
    steady_seconds = max(1e-9, (steady.last_ns - steady.first_ns) / 1e9)
    burst_seconds = max(1e-9, (burst.last_ns - burst.first_ns) / 1e9)
    return Run(
        server=kind, n=n, connected=connected, rate=rate, mem_per_conn_kib=mem / 1024,
        delivered=steady.delivered, expected=connected * count,
        delivered_per_s=steady.delivered / steady_seconds,
        p50_ms=percentile(steady.latencies, 50) / 1e6,
        p99_ms=percentile(steady.latencies, 99) / 1e6,
        server_us_per_event=steady.server_cpu / max(steady.delivered, 1) * 1e6,
        client_us_per_event=steady.client_cpu / max(steady.delivered, 1) * 1e6,
        burst_delivered_per_s=burst.delivered / burst_seconds,
        burst_server_us_per_event=burst.server_cpu / max(burst.delivered, 1) * 1e6,
        lost=burst.lost,  # cumulative since connect
    )


def start_profiler(server: ServerProcess, tag: str, seconds: float) -> subprocess.Popen[bytes]:
    """py-spy on the server during the steady phase; collapsed stacks in bench/results/."""
    out = RESULTS / f"profile-{tag}.txt"
    return subprocess.Popen(
        [str(Path(PYTHON).parent / "py-spy"), "record", "--format", "raw",
         "-r", "200", "-d", str(int(seconds)), "-o", str(out), "-p", str(server.pid)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def count_notifications(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute(
            "SELECT COUNT(*) FROM task_events WHERE type = 'notification'").fetchone()[0])


# -------------------------------------------------------------- reporting
FIGURES = (
    ("mem_per_conn_kib", "KiB/conn", "lower"),
    ("server_us_per_event", "CPU µs/event", "lower"),
    ("p50_ms", "p50 ms", "lower"),
    ("p99_ms", "p99 ms", "lower"),
    ("delivered_per_s", "delivered/s", "higher"),
    ("burst_delivered_per_s", "burst/s", "higher"),
    ("burst_server_us_per_event", "burst µs/event", "lower"),
)
#: (figure, reference, bound, N or None for every N): the issue's targets
TARGETS = (
    ("server_us_per_event", "plain", 1.25, None),
    ("mem_per_conn_kib", "plain", 1.2, None),
    ("p50_ms", "plain", 1.25, 1000),
    ("p99_ms", "plain", 1.25, 1000),
)


def median_runs(repeats: list[list[Run]]) -> list[Run]:
    """One Run per (server, N): the median of every figure over the repeats."""
    groups: dict[tuple[str, int], list[Run]] = {}
    for runs in repeats:
        for run in runs:
            groups.setdefault((run.server, run.n), []).append(run)
    out = []
    for group in groups.values():
        merged = asdict(group[0])
        for name, value in merged.items():
            values = [getattr(r, name) for r in group]
            if isinstance(value, float) and all(isinstance(v, float) for v in values):
                merged[name] = statistics.median(values)
        out.append(Run(**merged))
    return out


def report(repeats: list[list[Run]]) -> dict[str, Any]:
    runs = median_runs(repeats)
    print_table(
        f"Fan-out: one user's notification stream, N idle subscribers "
        f"(median of {len(repeats)} repeat(s))",
        ["server", "N", "conn", "ev/s pub", "KiB/conn", "delivered/s", "p50 ms", "p99 ms",
         "srv µs/ev", "gen µs/ev", "burst/s", "burst µs/ev", "lost", "durable", "commit p50/p99"],
        [[LABELS[r.server], r.n, r.connected, r.rate, r.mem_per_conn_kib, r.delivered_per_s,
          r.p50_ms, r.p99_ms, r.server_us_per_event, r.client_us_per_event,
          r.burst_delivered_per_s, r.burst_server_us_per_event, r.lost,
          f"{r.durable_events}/{r.published_events}" if r.durable_events is not None else "-",
          f"{r.commit_p50_ms:.2f}/{r.commit_p99_ms:.2f} ms" if r.commit_p50_ms is not None
          else "-"]
         for r in runs])
    ratios = median_ratios([ratio_rows(runs) for runs in repeats])
    print_table("Ratios zhiyi / reference, each measured within one repeat, median over repeats "
                "(lower is better except the /s columns)",
                ["N", "reference", *(label for _, label, _ in FIGURES)],
                [[row["n"], LABELS[row["reference"]], *(row[f] for f, _, _ in FIGURES)]
                 for row in ratios])
    targets = check_targets(ratios)
    print("\nTargets (issue):")
    for t in targets:
        verdict = {True: "MET", False: "NOT MET", None: "n/a"}[t["met"]]
        spread = f" (repeats: {', '.join(_fmt(v) for v in t['per_repeat'])})" \
            if len(t["per_repeat"]) > 1 else ""
        print(f"  {t['figure']} at N={t['n']}: zhiyi/{t['reference']} = "
              f"{_fmt(t['ratio'])}{spread}, bound {t['bound']} -> {verdict}")
    return {"runs": [asdict(r) for r in runs], "ratios": ratios, "targets": targets,
            "repeats": [[asdict(r) for r in runs] for runs in repeats]}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def ratio_rows(runs: list[Run]) -> list[dict[str, Any]]:
    rows = []
    by_key = {(r.server, r.n): r for r in runs}
    for n in sorted({r.n for r in runs}):
        zhiyi = by_key.get(("zhiyi", n))
        for ref in ("plain", "aiohttp-sse"):
            other = by_key.get((ref, n))
            if zhiyi is None or other is None:
                continue
            row: dict[str, Any] = {"n": n, "reference": ref}
            for figure, _, _ in FIGURES:
                row[figure] = ratio(getattr(zhiyi, figure), getattr(other, figure))
            rows.append(row)
    return rows


def median_ratios(per_repeat: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Median of each ratio over the repeats; the per-repeat values kept under ``per_repeat``."""
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for rows in per_repeat:
        for row in rows:
            groups.setdefault((row["n"], row["reference"]), []).append(row)
    out = []
    for (n, ref), rows in sorted(groups.items()):
        merged: dict[str, Any] = {"n": n, "reference": ref, "per_repeat": {}}
        for figure, _, _ in FIGURES:
            values = [r[figure] for r in rows if r[figure] is not None]
            merged[figure] = statistics.median(values) if values else None
            merged["per_repeat"][figure] = values
        out.append(merged)
    return out


def check_targets(ratios: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_key = {(r["n"], r["reference"]): r for r in ratios}
    out = []
    for figure, ref, bound, only_n in TARGETS:
        for n in sorted({r["n"] for r in ratios}):
            if only_n is not None and n != only_n:
                continue
            row = by_key.get((n, ref))
            value = row[figure] if row else None
            out.append({"figure": figure, "n": n, "reference": ref, "bound": bound,
                        "ratio": value, "per_repeat": row["per_repeat"][figure] if row else [],
                        "met": None if value is None else value <= bound})
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    parser.add_argument("--clients", type=int, default=2, help="load generator processes")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="events/s in the steady phase (default: --deliveries / N)")
    parser.add_argument("--deliveries", type=float, default=10_000,
                        help="deliveries/s the default rate aims at")
    parser.add_argument("--seconds", type=float, default=10.0, help="steady phase length")
    parser.add_argument("--burst", type=int, default=50, help="events in the burst phase")
    parser.add_argument("--settle", type=float, default=2.0,
                        help="seconds idle before the RSS sample")
    parser.add_argument("--heartbeat", type=float, default=15.0,
                        help="SSE heartbeat of every server")
    parser.add_argument("--repeat", type=int, default=1,
                        help="repeat everything, servers in rotated order; medians reported")
    parser.add_argument("--profile", action="store_true",
                        help="record the server with py-spy during the steady phase")
    parser.add_argument("--quick", action="store_true", help="short run: 5 s, burst of 20")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.seconds, opts.burst, opts.settle = 5.0, 20, 1.0
    return opts


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    opts = parse_args(argv)
    clients = Clients(opts.clients)
    repeats: list[list[Run]] = []
    try:
        for r in range(opts.repeat):
            order = opts.servers[r % len(opts.servers):] + opts.servers[:r % len(opts.servers)]
            runs = []
            for n in opts.n:
                for kind in order:
                    logger.info("fan-out: repeat %d/%d, %s, N=%d", r + 1, opts.repeat, kind, n)
                    runs.append(measure(kind, n, clients, opts))
            repeats.append(runs)
    finally:
        clients.close()
    data = report(repeats)
    data |= {"machine": machine(), "options": vars(opts)}
    path = write_results("fanout", data)
    print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
