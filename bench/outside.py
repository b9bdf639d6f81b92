"""The outside driver's pipeline (issue 13, "Figures"), rebuilt so anyone can rerun it.

Usage: ``.venv/bin/python bench/outside.py [--m 1000] [--c 50] [--rounds 3]``
(``--profile zhiyi-w0`` records that server with py-spy in round 1; with ``--gil``
only the thread holding the GIL is sampled: Python's CPU, not its waits).

- Load: ``m`` tasks, ``c`` in flight; each task is a real ``translate``
  (params ``{"targetLang": "fr", "engine": "pseudo"}``) of a 2 KB ``.txt`` created over HTTP
  (multipart), then its SSE stream read to the final event. Completion time:
  from the create request to the final event. Then ``--alone`` tasks one at a
  time for the p50 with 1 in flight.
- Pinning: every server-side process (HTTP server, worker processes, the
  reference's Redis) runs under ``taskset -c 0``; this driver pins itself to
  CPU 1 (one process, one event loop).
- Servers, each restarted fresh per run and measured in rotating order
  within a round (A B C, B C A, C A B), so drifting load hits each alike:
  ``zhiyi-w0``: ``zhiyi serve --workers 0`` (workers in the HTTP process);
  ``zhiyi-default``: ``zhiyi serve`` with its default worker processes (one
  per core the server may use: under ``taskset -c 0`` that is none, workers in the
  HTTP process, since ee950a5; it was 2 worker processes on core 0 before);
  ``saq``: bench/ref_pubsub.py (aiohttp front + SAQ worker + its own
  ``redis-server --save '' --appendonly no``);
  ``zhiyi-pg`` (not in the default ``--servers``): ``zhiyi serve --workers 0`` on
  the PostgreSQL store, a database of its own made on ``--pg``'s server for the
  run and dropped after it. PostgreSQL's processes are the shared server's, not
  ours to pin: they run on either core, and the CPU of the run's backends (the
  postmaster's children serving the run's database) is counted apart, not in
  ``server-side CPU``; the server's WAL writer and checkpointer are not counted.
- Between servers the driver calls ``sync`` (the last run's files flushed to disk), so no
  server starts while the previous one's writeback is still going.
- Figures are ratios to ``saq`` of the same round; ranges over the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import psycopg
import redis
from common import (
    PYTHON,
    REPO,
    RESULTS,
    ServerProcess,
    add_zhiyi_user,
    free_port,
    machine,
    percentile,
    print_table,
    remove_tree,
    scratch_dir,
    write_results,
)
from loadgen import _follow

logger = logging.getLogger(__name__)

SERVER_CPU, DRIVER_CPU = "0", 1
KINDS = ("zhiyi-w0", "zhiyi-default", "saq", "zhiyi-pg")
DEFAULT_SERVERS = ("zhiyi-w0", "zhiyi-default", "saq")
PG_SERVER = "postgresql://postgres@127.0.0.1:5432/test"
ZHIYI = str(Path(PYTHON).parent / "zhiyi")
SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank. "
#: 2 KB of plain text in 32 lines (segments), as an ordinary short document
PARAMS = json.dumps({"targetLang": "fr", "engine": "pseudo"})
DOCUMENT = ("\n".join(SENTENCE.strip() for _ in range(32)) + "\n").encode()[:2048]


@dataclass
class Deployment:
    kind: str
    processes: list[ServerProcess]
    base: str
    headers: dict[str, str]
    work: Path
    redis_proc: subprocess.Popen[bytes] | None = None
    #: (admin URL, database name) of a PostgreSQL database made for this run
    pg: tuple[str, str] | None = None

    def pids(self) -> list[int]:
        """Every server-side PID now (worker processes and parse children included)."""
        roots = [p.pid for p in self.processes]
        if self.redis_proc is not None:
            roots.append(self.redis_proc.pid)
        pids = []
        for pid in roots:
            try:
                proc = psutil.Process(pid)
                pids += [pid, *(c.pid for c in proc.children(recursive=True))]
            except psutil.NoSuchProcess:
                continue
        return pids

    def pg_backends(self) -> list[int]:
        """PIDs of the PostgreSQL backends serving this run's database (children of the
        postmaster; the query's own backend left out)."""
        if self.pg is None:
            return []
        admin, name = self.pg
        with psycopg.connect(admin, autocommit=True) as conn:
            rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s "
                                "AND pid <> pg_backend_pid()", (name,)).fetchall()
        return [pid for (pid,) in rows]

    def stop(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()
        if self.redis_proc is not None:
            self.redis_proc.terminate()
            self.redis_proc.wait(10)
        if self.pg is not None:
            drop_database(*self.pg)


def create_database(admin: str) -> tuple[str, str]:
    """A fresh database on the PostgreSQL server of ``admin``: (its URL, its name)."""
    name = f"zhiyi_outside_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0 ENCODING \'UTF8\'')
    return f"{admin.rsplit('/', 1)[0]}/{name}", name


def drop_database(admin: str, name: str) -> None:
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def start_redis(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A private redis-server on core 0 without persistence (the shared one is not pinned)."""
    port = free_port()
    proc = subprocess.Popen(
        ["taskset", "-c", SERVER_CPU, "redis-server", "--port", str(port), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "no", "--dir", str(work)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            return proc, f"redis://127.0.0.1:{port}"
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.terminate()
    raise RuntimeError("redis-server did not start")


def deploy(kind: str, opts: argparse.Namespace) -> Deployment:
    work = scratch_dir(f"outside-{kind}")
    port = free_port()
    pin = ["taskset", "-c", SERVER_CPU]
    if kind.startswith("zhiyi"):
        data = work / "data"
        env = {"ZHIYI_LOG_LEVEL": "WARNING", "MAX_ACTIVE_TASKS_PER_USER": "100000",
               "SSE_MAX_PER_USER": "100000"}
        pg = None
        if kind == "zhiyi-pg":
            url, name = create_database(opts.pg)
            pg = (opts.pg, name)
            env["ZHIYI_DATABASE_URL"] = url
        try:
            token = add_zhiyi_user(data, "bench", 10**9, env)
            argv = [*pin, ZHIYI, "serve", "--data", str(data), "--host", "127.0.0.1",
                    "--port", str(port)]
            if kind in ("zhiyi-w0", "zhiyi-pg"):
                argv += ["--workers", "0"]
            server = ServerProcess(kind, argv, env, work / "server.log",
                                   ready_prefix="Zhiyi is running").start(timeout=90)
        except BaseException:
            if pg is not None:
                drop_database(*pg)
            raise
        return Deployment(kind, [server], f"http://127.0.0.1:{port}",
                          {"Authorization": f"Bearer {token}"}, work, pg=pg)
    redis_proc, url = start_redis(work)
    env = {"BENCH_QUEUE": f"outside-{uuid.uuid4().hex[:8]}", "REDIS_URL": url,
           "WORKER_CONCURRENCY": str(opts.saq_concurrency)}
    script = str(REPO / "bench" / "ref_pubsub.py")
    worker = ServerProcess("saq-worker", [*pin, PYTHON, script, "worker"], env,
                           work / "worker.log").start()
    web = ServerProcess("saq-web", [*pin, PYTHON, script, "web", str(port), str(work / "data")],
                        env, work / "server.log").start()
    return Deployment(kind, [web, worker], f"http://127.0.0.1:{port}", {}, work, redis_proc)


# ------------------------------------------------------------------ driver
async def one_task(session: aiohttp.ClientSession, base: str,
                   headers: dict[str, str]) -> tuple[float, str]:
    """(completion ms, final status) of one translate task followed on its stream."""
    start = time.perf_counter()
    form = aiohttp.FormData()
    form.add_field("taskType", "translate")
    form.add_field("params", PARAMS)
    form.add_field("file", DOCUMENT, filename="doc.txt", content_type="text/plain")
    async with session.post(base + "/api/tasks/create", data=form, headers=headers) as resp:
        created = await resp.json()
        if resp.status != 201:
            return 0.0, f"create {resp.status} {str(created)[:160]}"
    async with session.get(base + created["sseUrl"], headers=headers) as resp:
        if resp.status != 200:
            return 0.0, f"stream {resp.status}"
        _, status = await _follow(resp.content)
    return (time.perf_counter() - start) * 1e3, status


async def drive(base: str, headers: dict[str, str], m: int, c: int) -> tuple[float, list[float]]:
    """(tasks/s, sorted completion ms) of ``m`` tasks by ``c`` loops; raises on any failure."""
    remaining = iter(range(m))
    results: list[tuple[float, str]] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=120)) as session:
        async def loop() -> None:
            for _ in remaining:
                results.append(await one_task(session, base, headers))

        start = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(c)))
        elapsed = time.perf_counter() - start
    bad = [s for _, s in results if s != "completed"]
    if bad:
        raise RuntimeError(f"{len(bad)} of {m} tasks failed, e.g. {bad[:3]}")
    return m / elapsed, sorted(ms for ms, _ in results)


def role(proc: psutil.Process) -> str:
    """Which part of the server side a process is: sandbox (parse forkserver), worker, server."""
    cmdline = " ".join(proc.cmdline())
    if "forkserver" in cmdline:
        return "sandbox"
    return "worker" if " worker" in cmdline else "server"


def cpu_seconds(pids: list[int]) -> dict[int, tuple[str, float]]:
    """Per PID: (role, CPU seconds of it and of its reaped children: the parse children)."""
    out = {}
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            t = proc.cpu_times()
            out[pid] = (role(proc), t.user + t.system + t.children_user + t.children_system)
        except psutil.NoSuchProcess:
            continue
    return out


def backend_cpu(pids: list[int]) -> dict[int, float]:
    """CPU seconds of each PostgreSQL backend (the shared server's processes: read only)."""
    out = {}
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            out[pid] = t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return out


def measure(dep: Deployment, opts: argparse.Namespace, profile: bool) -> dict[str, float]:
    before = cpu_seconds(dep.pids())
    pg_before = backend_cpu(dep.pg_backends())
    spy = start_profiler(dep, opts.gil) if profile else None
    rate, times = asyncio.run(drive(dep.base, dep.headers, opts.m, opts.c))
    if spy is not None:
        spy.send_signal(2)
        spy.wait(60)
    after = cpu_seconds(dep.pids())
    # A backend that came and went during the run is missed (the pool keeps its own).
    pg_after = backend_cpu(dep.pg_backends())
    pg_cpu = sum(s - pg_before.get(pid, 0.0) for pid, s in pg_after.items())
    by_role: dict[str, float] = defaultdict(float)
    for pid, (name, seconds) in after.items():
        by_role[name] += seconds - before.get(pid, (name, 0.0))[1]
    cpu = sum(by_role.values())
    _, alone = asyncio.run(drive(dep.base, dep.headers, opts.alone, 1))
    return {"tasks_per_s": rate, "p50_ms": percentile(times, 50),
            "p99_ms": percentile(times, 99), "alone_p50_ms": percentile(alone, 50),
            "cpu_ms_per_task": cpu / opts.m * 1e3,
            "sandbox_ms_per_task": by_role["sandbox"] / opts.m * 1e3,
            "worker_procs_ms_per_task": by_role["worker"] / opts.m * 1e3,
            "pg_backends_ms_per_task": pg_cpu / opts.m * 1e3}


def start_profiler(dep: Deployment, gil: bool) -> subprocess.Popen[bytes]:
    """py-spy (raw collapsed stacks, every server process) in bench/results/.

    Without ``gil``, a thread waiting for the GIL (after a query or a system call that
    let it go) counts as busy at the line it waits on; with it, only the GIL's holder
    is sampled, which is closer to where the CPU goes.
    """
    out = RESULTS / f"profile-outside-{dep.kind}.txt"
    return subprocess.Popen(
        [str(Path(PYTHON).parent / "py-spy"), "record", "--format", "raw", "--subprocesses",
         *(["--gil"] if gil else []),
         "-r", "250", "-o", str(out), "-p", str(dep.processes[0].pid)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# ---------------------------------------------------------------- reporting
FIGURES = ("tasks_per_s", "p50_ms", "p99_ms", "alone_p50_ms", "cpu_ms_per_task")


def report(rounds: list[dict[str, dict[str, float]]], opts: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for i, figures in enumerate(rounds, 1):
        for kind in opts.servers:
            rows.append([i, kind, *(figures[kind][f] for f in FIGURES),
                         figures[kind]["sandbox_ms_per_task"],
                         figures[kind]["worker_procs_ms_per_task"],
                         figures[kind]["pg_backends_ms_per_task"]
                         if kind == "zhiyi-pg" else "-"])
    print_table(f"Outside driver's pipeline: {opts.m} translate/pseudo tasks of 2 KB, "
                f"{opts.c} in flight; server side on CPU 0, driver on CPU 1",
                ["round", "server", "tasks/s", "p50 ms", "p99 ms", "p50 alone ms",
                 "server-side CPU ms/task", "of which sandbox", "of which worker procs",
                 "PostgreSQL backends ms/task (apart, unpinned)"], rows)
    ratios: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for figures in rounds:
        for kind in opts.servers:
            if kind != "saq" and "saq" in figures:
                for f in FIGURES:
                    ratios[kind][f].append(figures[kind][f] / figures["saq"][f])
    print_table("Ratios to SAQ in the same round: min-max (median)",
                ["server", *FIGURES],
                [[kind, *(f"{min(v):.2f}-{max(v):.2f} ({percentile(sorted(v), 50):.2f})"
                          for v in (ratios[kind][f] for f in FIGURES))] for kind in ratios])
    on_pg: dict[str, list[float]] = defaultdict(list)
    for figures in rounds:
        if "zhiyi-pg" in figures and "zhiyi-w0" in figures:
            for f in FIGURES:
                on_pg[f].append(figures["zhiyi-pg"][f] / figures["zhiyi-w0"][f])
    if on_pg:
        print_table("zhiyi-pg / zhiyi-w0 (PostgreSQL / SQLite) in the same round: min-max",
                    list(FIGURES), [[f"{min(v):.2f}-{max(v):.2f}" for v in on_pg.values()]])
    return {"rounds": rounds, "ratios": {k: dict(v) for k, v in ratios.items()},
            "pg_over_sqlite": dict(on_pg)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=1000, help="tasks per measurement")
    parser.add_argument("--c", type=int, default=50, help="tasks in flight")
    parser.add_argument("--alone", type=int, default=100, help="tasks one at a time (p50)")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--servers", nargs="+", choices=KINDS, default=list(DEFAULT_SERVERS))
    parser.add_argument("--pg", default=PG_SERVER,
                        help="PostgreSQL server for zhiyi-pg (a database is made per run there)")
    parser.add_argument("--saq-concurrency", type=int, default=10,
                        help="SAQ Worker concurrency (Zhiyi keeps its default, 4 per process)")
    parser.add_argument("--profile", choices=KINDS, default=None)
    parser.add_argument("--gil", action="store_true",
                        help="with --profile: sample only the thread holding the GIL")
    opts = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.sched_setaffinity(0, {DRIVER_CPU})
    rounds = []
    for r in range(opts.rounds):
        order = opts.servers[r % len(opts.servers):] + opts.servers[:r % len(opts.servers)]
        figures = {}
        for kind in order:
            dep = deploy(kind, opts)
            try:
                asyncio.run(drive(dep.base, dep.headers, opts.warmup, min(opts.c, opts.warmup)))
                logger.info("round %d: %s", r + 1, kind)
                figures[kind] = measure(dep, opts, profile=opts.profile == kind and r == 0)
            finally:
                dep.stop()
                remove_tree(dep.work)
                # The next server starts on a disk whose writeback is done: a Zhiyi run
                # leaves ~1,000 task folders of dirty pages, and their flush would land on
                # whoever runs next (SAQ writes nothing, so it would not pay its share).
                os.sync()
        rounds.append(figures)
    data = report(rounds, opts)
    data |= {"machine": machine(), "options": vars(opts), "load_average": os.getloadavg()}
    print(f"\nwritten to {write_results('outside', data)}")
    print(json.dumps({"load_average": os.getloadavg()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
