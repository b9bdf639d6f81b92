"""The real Zhiyi server, or a worker process, with a CPU-bound ``bench`` task type.

Usage: ``python bench/cpu_launcher.py PORT DATA_DIR [worker]``; settings come
from the environment as for ``zhiyi serve``. The ``bench`` processor spends
``BENCH_BURN_MS`` (default 20) milliseconds of CPU in a thread (pure Python,
so it holds the GIL: one process gives it at most one core), reports 50 % and
writes a one-line result. With ``worker`` the process runs workers only, as
``zhiyi worker`` does, and prints READY once they run.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from processors import Registry, TaskContext, default_registry
from zhiyi_server import Config, create_app, create_worker_app, run_worker_app

BURN_SECONDS = float(os.environ.get("BENCH_BURN_MS", "20")) / 1000


def burn(seconds: float) -> int:
    """Spin on pure-Python arithmetic for ``seconds`` of this thread's CPU time."""
    end = time.thread_time() + seconds
    total = 0
    while time.thread_time() < end:
        for n in range(1000):
            total += n * n
    return total


def build_registry() -> Registry:
    registry = default_registry().copy()

    @registry.processor("bench", extensions=(".txt",), parses_document=False)
    async def bench(ctx: TaskContext) -> Path:
        await asyncio.to_thread(burn, BURN_SECONDS / 2)
        await ctx.progress(50, "half way", stage="burn")
        await asyncio.to_thread(burn, BURN_SECONDS / 2)
        out = ctx.result_path("bench.txt")
        out.write_text("done\n")
        return out

    return registry


def main() -> None:
    port, data_dir = int(sys.argv[1]), Path(sys.argv[2])
    config = Config.from_env(data_path=data_dir, port=port)
    if sys.argv[3:] == ["worker"]:
        app = create_worker_app(config, registry=build_registry())
        asyncio.run(run_worker_app(app, on_ready=lambda: print("READY", flush=True)))
        return
    web.run_app(create_app(config, registry=build_registry()), host="127.0.0.1", port=port,
                print=lambda _: print("READY", flush=True), access_log=None)


if __name__ == "__main__":
    main()
