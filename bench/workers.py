"""Tasks/s of a CPU-bound processor with workers in the server, and in 1 or 2 worker processes.

Each task is the real pipeline: create (multipart upload), then its SSE stream
read to the final event; the ``bench`` processor of ``cpu_launcher.py`` spends
about 20 ms of CPU per task. One HTTP process serves every mode; the modes
differ only in where the workers run:

- ``in-process``: the HTTP process runs the workers (``--workers 0``);
- ``1 process`` / ``2 processes``: the HTTP process runs none, ``zhiyi worker``
  processes do (``--workers 1`` / ``--workers 2``).

The figure that matters is the ratio of 2 processes to 1, measured in the same
run. Usage: ``.venv/bin/python bench/workers.py [--m 400] [--c 16] [--rounds 2]``.

It also prints the CPU per task of each role (the HTTP process, the worker
processes, and this driver, which shares the machine's cores), and the ceiling
those figures put on the ratio: with ``w`` ms of CPU per task in a worker process
and ``o`` ms everywhere else (HTTP process and driver), one worker process runs
at most ``1000 / w`` tasks/s and two share the cores with everything else, at
most ``cores * 1000 / (w + o)`` tasks/s: the ratio is at most
``cores * w / (w + o)`` however well the workers scale.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path

from common import (
    BENCH_DIR,
    PYTHON,
    CpuMeter,
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
from loadgen import run_tasks

LAUNCHER = str(BENCH_DIR / "cpu_launcher.py")
MODES = {"in-process": 0, "1 process": 1, "2 processes": 2}


def start_mode(processes: int, data: Path, concurrency: int) -> list[ServerProcess]:
    port = free_port()
    common_env = {"ZHIYI_LOG_LEVEL": "WARNING", "MAX_ACTIVE_TASKS_PER_USER": "100000",
                  "SSE_MAX_PER_USER": "100000", "RECONCILE_SECONDS": "3600"}
    http_env = {**common_env, "WORKER_CONCURRENCY": "0" if processes else str(concurrency)}
    started = [ServerProcess("http", [PYTHON, LAUNCHER, str(port), str(data)], http_env,
                             data / "http.log").start()]
    for n in range(processes):
        started.append(ServerProcess(
            f"worker{n}", [PYTHON, LAUNCHER, str(port), str(data), "worker"],
            {**common_env, "WORKER_CONCURRENCY": str(concurrency)},
            data / f"worker{n}.log").start())
    started[0].port = port  # type: ignore[attr-defined]
    return started


def measure(processes: int, opts: argparse.Namespace) -> tuple[float, float, dict[str, float]]:
    """(tasks/s with ``c`` in flight, p50 completion in ms with one in flight, CPU ms per
    task by role during the ``c`` in flight)."""
    data = scratch_dir(f"workers{processes}")
    try:
        token = add_zhiyi_user(data, "bench", 10 * (opts.m + opts.warmup))
        servers = start_mode(processes, data, opts.concurrency)
        try:
            base = f"http://127.0.0.1:{servers[0].port}"  # type: ignore[attr-defined]
            headers = {"Authorization": f"Bearer {token}"}
            asyncio.run(run_tasks(base, headers, opts.warmup, opts.c))
            http, workers = CpuMeter([servers[0].pid]), CpuMeter([s.pid for s in servers[1:]])
            http.mark()
            workers.mark()
            driver = time.process_time()
            start = time.monotonic()
            results = asyncio.run(run_tasks(base, headers, opts.m, opts.c))
            elapsed = time.monotonic() - start
            cpu = {"http": http.elapsed(), "workers": workers.elapsed(),
                   "driver": time.process_time() - driver}
            alone = asyncio.run(run_tasks(base, headers, opts.latency_m, 1))
        finally:
            for server in reversed(servers):
                server.stop()
        bad = [r.status for r in results + alone if r.status != "completed"]
        if bad:
            raise RuntimeError(f"{len(bad)} tasks did not complete: {bad[:3]}")
        latencies = sorted((r.end_ns - r.start_ns) / 1e6 for r in alone)
        per_task = {role: seconds / opts.m * 1e3 for role, seconds in cpu.items()}
        return opts.m / elapsed, percentile(latencies, 50), per_task
    finally:
        remove_tree(data)


def print_cpu(cpus: dict[str, list[dict[str, float]]]) -> None:
    """CPU per task by role (medians over the rounds), and the ceiling on the ratio."""
    median = {mode: {role: statistics.median(c[role] for c in rounds) for role in rounds[0]}
              for mode, rounds in cpus.items()}
    rows = [[mode, f"{m['http']:.1f}", f"{m['workers']:.1f}", f"{m['driver']:.1f}"]
            for mode, m in median.items()]
    print_table("CPU ms per task by role (medians over the rounds)",
                ["workers", "HTTP process", "worker processes", "driver"], rows)
    two = median["2 processes"]
    worker, other = two["workers"], two["http"] + two["driver"]
    cores = len(os.sched_getaffinity(0))
    ceiling = min(2.0, cores * worker / (worker + other))
    print(f"ceiling of 2 processes vs 1 on {cores} cores with these figures: "
          f"{cores} x {worker:.1f} / ({worker:.1f} + {other:.1f}) = {ceiling:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=400, help="tasks per measurement")
    parser.add_argument("--c", type=int, default=16, help="tasks in flight")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--latency-m", type=int, default=40,
                        help="tasks run one at a time for the p50 completion time")
    parser.add_argument("--rounds", type=int, default=2, help="measurements of each mode")
    parser.add_argument("--concurrency", type=int, default=4, help="WORKER_CONCURRENCY")
    opts = parser.parse_args()
    figures: dict[str, list[float]] = {mode: [] for mode in MODES}
    p50s: dict[str, list[float]] = {mode: [] for mode in MODES}
    cpus: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    for _ in range(opts.rounds):  # interleaved, so drifting load hits every mode alike
        for mode, processes in MODES.items():
            rate, p50, cpu = measure(processes, opts)
            figures[mode].append(rate)
            p50s[mode].append(p50)
            cpus[mode].append(cpu)
    best = {mode: max(values) for mode, values in figures.items()}
    p50 = {mode: min(values) for mode, values in p50s.items()}
    rows = [[mode, " / ".join(f"{v:.1f}" for v in figures[mode]), f"{best[mode]:.1f}",
             f"{best[mode] / best['1 process']:.2f}",
             " / ".join(f"{v:.1f}" for v in p50s[mode]), f"{p50[mode] / p50['in-process']:.2f}"]
            for mode in MODES]
    print_table(f"CPU-bound tasks (~20 ms CPU each), M={opts.m}, C={opts.c}, "
                f"cores={os.cpu_count()}, load average {os.getloadavg()[0]:.1f}",
                ["workers", "tasks/s per round", "best", "vs 1 process",
                 "p50 ms alone per round", "p50 vs in-process"], rows)
    print_cpu(cpus)
    write_results("workers", {"machine": machine(), "m": opts.m, "c": opts.c,
                              "figures": figures, "best": best, "p50_ms": p50s,
                              "cpu_ms_per_task": cpus})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
