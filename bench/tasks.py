"""Task pipeline benchmark: M tasks created over HTTP at concurrency C, each followed to the end.

Usage: ``.venv/bin/python bench/tasks.py --m 2000 --c 50`` (``--quick`` for a short run).

Work shape, the same for every server: create over HTTP (multipart upload
saved to disk), the task's SSE stream opened right after, 10 progress updates
(``--step-ms`` apart) each pushed over SSE, then the completion pushed over SSE.
Servers: Zhiyi (real app, durable SQLite, its worker pool; bench/zhiyi_launcher.py),
references (b) plain StreamResponse and (a) aiohttp-sse with in-memory state
(bench/ref_sse.py), and (c) SAQ + Redis with a separate worker process
(bench/ref_saq.py). Figures: tasks/s end to end, p50/p99 time from the create
request to the completion event, events received per task, server CPU per
task (every server process; Redis's CPU shown apart), load generator CPU.

The machine is shared and its load drifts, so every server is deployed at
once and M is run in ``--rounds`` rounds in which the servers take turns
(A B C D, B C D A, ...); each server's figures sum its own rounds, and CPU is
metered around each round only.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import signal
import sqlite3
import statistics
import subprocess
import sys
import urllib.request
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import redis
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
    redis_pid,
    remove_tree,
    scratch_dir,
    write_results,
)
from loadgen import tasks_client

logger = logging.getLogger(__name__)

SERVERS = ("zhiyi", "plain", "aiohttp-sse", "saq")
EXTRA = ("zhiyi-coalesced", "zhiyi-nowait")
LABELS = {"zhiyi": "zhiyi", "zhiyi-coalesced": "zhiyi (coalesced)",
          "zhiyi-nowait": "zhiyi what-if: progress not awaited", "plain": "(b) plain",
          "aiohttp-sse": "(a) aiohttp-sse", "saq": "(c) saq+redis"}
REDIS_URL = "redis://127.0.0.1:6379"
USER = "bench"


@dataclass
class Run:
    """Figures of one server."""

    server: str
    m: int
    c: int
    workers: int
    ok: int
    errors: int
    tasks_per_s: float
    p50_ms: float
    p99_ms: float
    events_per_task: float
    server_ms_per_task: float
    server_loop_ms_per_task: float
    redis_ms_per_task: float | None
    client_ms_per_task: float
    failures: dict[str, int] = field(default_factory=dict)
    durable_events: int | None = None
    #: Zhiyi per completed task: reader queries, write operations, COMMITs
    db_per_task: dict[str, float] = field(default_factory=dict)
    #: Zhiyi, from its database: waiting for a worker and processing, p50/p99 ms
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class Deployment:
    """The processes of one server under test and how to reach it."""

    name: str
    processes: list[ServerProcess]
    base: str
    headers: dict[str, str]
    work: Path
    queue: str | None = None

    def stop(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()


class Clients:
    def __init__(self, count: int) -> None:
        ctx = mp.get_context("spawn")
        self.pipes: list[Connection] = []
        self.procs = []
        for _ in range(count):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=tasks_client, args=(child,), daemon=True)
            proc.start()
            self.pipes.append(parent)
            self.procs.append(proc)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def run(self, base: str, headers: dict[str, str], m: int, c: int) -> list[tuple[Any, ...]]:
        parts = len(self.pipes)
        for i, pipe in enumerate(self.pipes):
            pipe.send(("run", {"base": base, "headers": headers,
                               "m": m // parts + (i < m % parts),
                               "c": max(1, c // parts + (i < c % parts))}))
        return [r for pipe in self.pipes for r in pipe.recv()]

    def close(self) -> None:
        for pipe in self.pipes:
            pipe.send(("exit", None))
            pipe.recv()
        for proc in self.procs:
            proc.join(5)


def deploy(kind: str, opts: argparse.Namespace) -> Deployment:
    work = scratch_dir(f"tasks-{kind}")
    port = free_port()
    env = {"WORKER_CONCURRENCY": str(opts.workers), "BENCH_STEP_SECONDS": str(opts.step_ms / 1000),
           "PYTHONUNBUFFERED": "1"}
    log = work / "server.log"
    if kind.startswith("zhiyi"):
        token = add_zhiyi_user(work / "data", USER, opts.m * 2 + 1000)
        env |= {"MAX_ACTIVE_TASKS_PER_USER": str(opts.c * 2 + 10),
                "SSE_MAX_PER_USER": str(opts.c * 2 + 10), "ZHIYI_LOG_LEVEL": "WARNING",
                "BENCH_COALESCE": "1" if kind == "zhiyi-coalesced" else "0",
                "BENCH_PROGRESS_NOWAIT": "1" if kind == "zhiyi-nowait" else "0",
                "BENCH_COUNT_DB": "1", **dict(kv.split("=", 1) for kv in opts.zhiyi_env)}
        server = ServerProcess(kind, [PYTHON, "bench/zhiyi_launcher.py", str(port),
                                      str(work / "data")], env, log).start()
        return Deployment(kind, [server], f"http://127.0.0.1:{port}",
                          {"Authorization": f"Bearer {token}"}, work)
    if kind in ("plain", "aiohttp-sse"):
        server = ServerProcess(kind, [PYTHON, "bench/ref_sse.py", kind, str(port),
                                      str(work / "data")], env, log).start()
        return Deployment(kind, [server], f"http://127.0.0.1:{port}", {}, work)
    queue = f"zhiyi-bench-{uuid.uuid4().hex[:8]}"
    env |= {"BENCH_QUEUE": queue, "REDIS_URL": REDIS_URL}
    worker = ServerProcess("saq-worker", [PYTHON, "bench/ref_saq.py", "worker",
                                          str(work / "data")], env, work / "worker.log").start()
    web = ServerProcess("saq-web", [PYTHON, "bench/ref_saq.py", "web", str(port),
                                    str(work / "data")], env, log).start()
    return Deployment(kind, [worker, web], f"http://127.0.0.1:{port}", {}, work, queue)


def clean_redis(queue: str) -> None:
    """Delete this run's SAQ keys (and only those) from the shared Redis."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        for pattern in (f"saq:{queue}:*", f"saq:job:{queue}:*"):
            keys = list(client.scan_iter(match=pattern, count=1000))
            for i in range(0, len(keys), 500):
                client.delete(*keys[i:i + 500])
    finally:
        client.close()


def count_task_events(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM task_events WHERE task_id IS NOT NULL")
                   .fetchone()[0])


def task_timings(db: Path) -> dict[str, float]:
    """From Zhiyi's own timestamps: p50/p99 of waiting for a worker and of processing (ms)."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            """SELECT (julianday(started_at) - julianday(created_at)) * 86400000,
                      (julianday(completed_at) - julianday(started_at)) * 86400000
               FROM processing_tasks WHERE status = 'completed'""").fetchall()
    waits = sorted(r[0] for r in rows)
    work = sorted(r[1] for r in rows)
    return {"queue_wait_p50_ms": percentile(waits, 50), "queue_wait_p99_ms": percentile(waits, 99),
            "processing_p50_ms": percentile(work, 50), "processing_p99_ms": percentile(work, 99)}


@dataclass
class Tally:
    """One server's results and CPU, summed over its rounds."""

    results: list[tuple[Any, ...]] = field(default_factory=list)
    span_s: float = 0.0
    server_cpu: float = 0.0
    server_main_cpu: float = 0.0
    client_cpu: float = 0.0
    redis_cpu: float | None = None
    db_calls: Counter[str] = field(default_factory=Counter)


def run_round(deployment: Deployment, clients: Clients, m: int, c: int, tally: Tally,
              profile: bool) -> None:
    """``m`` tasks on one deployment; CPU metered around exactly this round."""
    server_cpu = CpuMeter([p.pid for p in deployment.processes])
    client_cpu = CpuMeter(clients.pids)
    rpid = redis_pid() if deployment.queue else None
    redis_cpu = CpuMeter([rpid]) if rpid else None
    for meter in (server_cpu, client_cpu, redis_cpu):
        if meter:
            meter.mark()
    profiler = start_profiler(deployment) if profile else None
    before = db_stats(deployment)
    results = clients.run(deployment.base, deployment.headers, m, c)
    tally.db_calls.update(db_stats(deployment) - before)
    tally.server_cpu += server_cpu.elapsed()
    tally.server_main_cpu += server_cpu.main_elapsed()
    tally.client_cpu += client_cpu.elapsed()
    if redis_cpu:
        tally.redis_cpu = (tally.redis_cpu or 0.0) + redis_cpu.elapsed()
    if profiler is not None:
        profiler.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        profiler.wait(30)
    tally.results.extend(results)
    if results:
        tally.span_s += (max(r[1] for r in results) - min(r[0] for r in results)) / 1e9


def measure_all(kinds: list[str], clients: Clients, opts: argparse.Namespace) -> list[Run]:
    """Every server up at once; M tasks each, in rounds that take turns (A B C, B C A, ...)."""
    deployments: dict[str, Deployment] = {}
    tallies = {kind: Tally() for kind in kinds}
    try:
        for kind in kinds:
            deployments[kind] = deployment = deploy(kind, opts)
            clients.run(deployment.base, deployment.headers, opts.warmup,
                        min(opts.c, opts.warmup))
        shares = [opts.m // opts.rounds + (i < opts.m % opts.rounds)
                  for i in range(opts.rounds)]
        for r, share in enumerate(shares):
            order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]
            for kind in order:
                logger.info("tasks: round %d/%d, %s, %d tasks", r + 1, opts.rounds, kind, share)
                run_round(deployments[kind], clients, share, opts.c, tallies[kind],
                          profile=opts.profile == kind and r == 0)
    finally:
        for deployment in deployments.values():
            deployment.stop()
    runs = []
    for kind in kinds:
        deployment = deployments[kind]
        run = summarize(kind, opts, tallies[kind])
        if kind.startswith("zhiyi"):
            run.durable_events = count_task_events(deployment.work / "data" / "zhiyi.db")
            run.timings = task_timings(deployment.work / "data" / "zhiyi.db")
        if deployment.queue:
            clean_redis(deployment.queue)
        remove_tree(deployment.work)
        runs.append(run)
    return runs


def db_stats(deployment: Deployment) -> Counter[str]:
    """Zhiyi's database call counters (bench/zhiyi_launcher.py, BENCH_COUNT_DB=1)."""
    if not deployment.name.startswith("zhiyi"):
        return Counter()
    with urllib.request.urlopen(deployment.base + "/bench/stats", timeout=10) as resp:
        return Counter(json.load(resp))


def start_profiler(deployment: Deployment) -> subprocess.Popen[bytes]:
    """py-spy on the (web) server process; collapsed stacks in bench/results/."""
    out = RESULTS / f"profile-tasks-{deployment.name}.txt"
    return subprocess.Popen(
        [str(Path(PYTHON).parent / "py-spy"), "record", "--format", "raw",
         "-r", "200", "-o", str(out), "-p", str(deployment.processes[-1].pid)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _kind_of_failure(status: str) -> str:
    """``stream 404 task 17: {...}`` and ``stream 404 task 18: {...}`` are one kind."""
    head, _, detail = status.partition(" task ")
    return head + (" " + detail.partition(": ")[2][:120] if detail else "")


def summarize(kind: str, opts: argparse.Namespace, tally: Tally) -> Run:
    results = tally.results
    ok = [r for r in results if r[3] == "completed"]
    durations = sorted((end - start) / 1e6 for start, end, _, _ in ok)
    failures = Counter(_kind_of_failure(r[3]) for r in results if r[3] != "completed")
    for failure, count in failures.most_common():
        logger.warning("%s: %d tasks ended with %s", kind, count, failure)
    done = max(len(ok), 1)
    return Run(
        server=kind, m=opts.m, c=opts.c, workers=opts.workers, ok=len(ok),
        errors=len(results) - len(ok),
        tasks_per_s=len(ok) / tally.span_s if tally.span_s else 0.0,
        p50_ms=percentile(durations, 50), p99_ms=percentile(durations, 99),
        events_per_task=statistics.fmean(r[2] for r in ok) if ok else 0.0,
        server_ms_per_task=tally.server_cpu / done * 1e3,
        server_loop_ms_per_task=tally.server_main_cpu / done * 1e3,
        redis_ms_per_task=None if tally.redis_cpu is None else tally.redis_cpu / done * 1e3,
        client_ms_per_task=tally.client_cpu / done * 1e3,
        failures=dict(failures),
        db_per_task={k: v / done for k, v in sorted(tally.db_calls.items())},
    )


# -------------------------------------------------------------- reporting
FIGURES = (
    ("tasks_per_s", "tasks/s", "higher"),
    ("p50_ms", "p50 ms", "lower"),
    ("p99_ms", "p99 ms", "lower"),
    ("server_ms_per_task", "srv CPU ms/task", "lower"),
)


def report(runs: list[Run]) -> dict[str, Any]:
    print_table(
        f"Tasks: M={runs[0].m} created over HTTP at C={runs[0].c}, each followed on its stream",
        ["server", "ok", "err", "tasks/s", "p50 ms", "p99 ms", "events/task", "srv CPU ms/task",
         "of which loop", "redis ms/task", "gen CPU ms/task", "durable events"],
        [[LABELS[r.server], r.ok, r.errors, r.tasks_per_s, r.p50_ms, r.p99_ms, r.events_per_task,
          r.server_ms_per_task, r.server_loop_ms_per_task, r.redis_ms_per_task,
          r.client_ms_per_task, r.durable_events] for r in runs])
    for r in runs:
        if r.db_per_task:
            calls = ", ".join(f"{k} {v:.1f}" for k, v in r.db_per_task.items())
            print(f"  {LABELS[r.server]}: database calls per task: {calls}")
        if r.timings:
            t = r.timings
            print(f"  {LABELS[r.server]}: waiting for a worker p50/p99 "
                  f"{t['queue_wait_p50_ms']:.0f}/{t['queue_wait_p99_ms']:.0f} ms, processing "
                  f"p50/p99 {t['processing_p50_ms']:.0f}/{t['processing_p99_ms']:.0f} ms "
                  f"(worker concurrency {r.workers})")
    ratios = ratio_rows(runs)
    print_table("Ratios, zhiyi / reference, same run",
                ["reference", *(label for _, label, _ in FIGURES)],
                [[LABELS[row["reference"]], *(row[f] for f, _, _ in FIGURES)] for row in ratios])
    targets = check_targets(runs)
    print("\nTargets (issue):")
    for t in targets:
        verdict = {True: "MET", False: "NOT MET", None: "n/a"}[t["met"]]
        value = "-" if t["ratio"] is None else f"{t['ratio']:.2f}"
        print(f"  {t['figure']}: zhiyi/saq = {value} ({t['rule']}) -> {verdict}")
    return {"runs": [asdict(r) for r in runs], "ratios": ratios, "targets": targets}


def ratio_rows(runs: list[Run]) -> list[dict[str, Any]]:
    by_name = {r.server: r for r in runs}
    zhiyi = by_name.get("zhiyi")
    rows = []
    for ref in ("saq", "plain", "aiohttp-sse"):
        other = by_name.get(ref)
        if zhiyi is None or other is None:
            continue
        rows.append({"reference": ref, **{f: ratio(getattr(zhiyi, f), getattr(other, f))
                                          for f, _, _ in FIGURES}})
    return rows


def check_targets(runs: list[Run]) -> list[dict[str, Any]]:
    by_name = {r.server: r for r in runs}
    zhiyi, saq = by_name.get("zhiyi"), by_name.get("saq")
    speed = ratio(zhiyi.tasks_per_s, saq.tasks_per_s) if zhiyi and saq else None
    tail = ratio(zhiyi.p99_ms, saq.p99_ms) if zhiyi and saq else None
    return [
        {"figure": "tasks_per_s", "rule": ">= 2.0", "ratio": speed,
         "met": None if speed is None else speed >= 2.0},
        {"figure": "p99_ms", "rule": "<= 1.0", "ratio": tail,
         "met": None if tail is None else tail <= 1.0},
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=2000, help="tasks per server")
    parser.add_argument("--c", type=int, default=50, help="concurrent create-and-follow loops")
    parser.add_argument("--servers", nargs="+", choices=(*SERVERS, *EXTRA),
                        default=list(SERVERS))
    parser.add_argument("--workers", type=int, default=10,
                        help="worker concurrency of every server (Zhiyi WORKER_CONCURRENCY, "
                             "SAQ Worker concurrency, the references' worker loops)")
    parser.add_argument("--step-ms", type=float, default=1.0, help="sleep before each step")
    parser.add_argument("--clients", type=int, default=2, help="load generator processes")
    parser.add_argument("--warmup", type=int, default=50, help="tasks before measuring")
    parser.add_argument("--rounds", type=int, default=4,
                        help="M is split into rounds; servers take turns each round")
    parser.add_argument("--profile", choices=(*SERVERS, *EXTRA), default=None,
                        help="record this server (its web process) with py-spy in round 1")
    parser.add_argument("--zhiyi-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for the Zhiyi server (repeatable)")
    parser.add_argument("--quick", action="store_true", help="short run: M=300")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.m, opts.warmup = min(opts.m, 300), 20
    return opts


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    opts = parse_args(argv)
    clients = Clients(opts.clients)
    try:
        runs = measure_all(list(opts.servers), clients, opts)
    finally:
        clients.close()
    data = report(runs)
    data |= {"machine": machine(), "options": vars(opts)}
    print(f"\nwritten to {write_results('tasks', data)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
