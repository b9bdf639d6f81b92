"""Shared pieces of the benchmarks: server processes, CPU/RSS sampling, tables, results.

Every server under test runs in its own process, started here and stopped by
its PID; the load generator runs in separate client processes (loadgen.py).
CPU is measured with psutil as ``user + system`` seconds of exactly those
processes, so a figure never includes the orchestrator itself.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

__all__ = [
    "BENCH_DIR",
    "PYTHON",
    "REPO",
    "RESULTS",
    "CpuMeter",
    "ServerProcess",
    "add_zhiyi_user",
    "free_port",
    "machine",
    "percentile",
    "print_table",
    "ratio",
    "redis_pid",
    "remove_tree",
    "rss",
    "scratch_dir",
    "write_results",
]

logger = logging.getLogger(__name__)

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
PYTHON = sys.executable
RESULTS = BENCH_DIR / "results"


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scratch_dir(tag: str) -> Path:
    """A fresh directory under bench/results/tmp (git-ignored, on the same disk as the repo)."""
    base = RESULTS / "tmp"
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{tag}-", dir=base))


def add_zhiyi_user(data_dir: Path, name: str, credits: int,
                   env: dict[str, str] | None = None) -> str:
    """``zhiyi user add NAME --credits N --data DIR``; the token is the last stdout line.

    ``env`` adds to the environment (``ZHIYI_DATABASE_URL`` for a PostgreSQL store).
    """
    out = subprocess.run(
        [PYTHON, "-m", "zhiyi_server", "user", "add", name, "--credits", str(credits),
         "--data", str(data_dir)],
        cwd=REPO, check=True, capture_output=True, text=True,
        env={**os.environ, "ZHIYI_LOG_LEVEL": "WARNING", **(env or {})},
    )
    return out.stdout.strip().splitlines()[-1]


@dataclass
class ServerProcess:
    """One server under test: a subprocess that prints ``READY`` once it listens."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    proc: subprocess.Popen[str] | None = None
    #: the stdout line (its start) that says the server listens
    ready_prefix: str = "READY"

    def start(self, timeout: float = 30.0) -> ServerProcess:
        log = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            self.argv, cwd=REPO, env={**os.environ, **self.env}, text=True,
            stdout=subprocess.PIPE, stderr=log, start_new_session=True,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            if line.strip().startswith(self.ready_prefix):
                return self
        self.stop()
        raise RuntimeError(f"{self.name} did not start; see {self.log_path}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, grace: float = 10.0) -> None:
        """SIGINT (graceful shutdown), then SIGKILL, of this PID only."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def redis_pid(port: int = 6379) -> int | None:
    """The PID of the redis-server on ``port`` (read-only: only its CPU is sampled)."""
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            if proc.info["name"] == "redis-server" and any(
                    f":{port}" in part or part == str(port) for part in proc.info["cmdline"] or ()):
                return proc.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


class CpuMeter:
    """CPU seconds (user + system) of a set of PIDs between two marks, also per thread.

    ``main_elapsed`` is the part spent by each process's main thread (the
    event loop); the rest is other threads (SQLite connections, executors).
    """

    def __init__(self, pids: Iterable[int]) -> None:
        self.procs = [psutil.Process(pid) for pid in pids]
        self.start: list[float] = []
        self.start_main: list[float] = []

    @staticmethod
    def _seconds(proc: psutil.Process) -> float:
        times = proc.cpu_times()
        return float(times.user + times.system)

    @staticmethod
    def _main_seconds(proc: psutil.Process) -> float:
        for thread in proc.threads():
            if thread.id == proc.pid:
                return float(thread.user_time + thread.system_time)
        return 0.0

    def mark(self) -> None:
        self.start = [self._seconds(p) for p in self.procs]
        self.start_main = [self._main_seconds(p) for p in self.procs]

    def elapsed(self) -> float:
        return sum(self._seconds(p) - s for p, s in zip(self.procs, self.start, strict=True))

    def main_elapsed(self) -> float:
        return sum(self._main_seconds(p) - s
                   for p, s in zip(self.procs, self.start_main, strict=True))


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (NaN when empty)."""
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return float(sorted_values[rank])


def ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference in (None, 0) or value != value or reference != reference:
        return None
    return value / reference  # type: ignore[operator]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}"
    return str(value)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain-text table on stdout."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))


def write_results(section: str, data: dict[str, Any]) -> Path:
    """Merge ``data`` under ``section`` into bench/results/latest.json."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "latest.json"
    try:
        current = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        current = {}
    current[section] = data
    path.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
    return path


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


SERVER_FILES = ("zhiyi_server.py", "zhiyi_config.py", "request_guards.py", "storage.py",
                "store_model.py", "group_writer.py", "sse.py", "worker.py", "processors.py",
                "schema.sql")


def machine() -> dict[str, Any]:
    """What the figures were measured on, and which code: HEAD and server files edited since."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout

    return {
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "python": sys.version.split()[0],
        "platform": sys.platform,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_head": git("rev-parse", "HEAD").strip(),
        "server_files_modified": git("status", "--porcelain", "--", *SERVER_FILES).splitlines(),
    }
