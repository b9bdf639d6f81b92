"""Runs the real server (or a worker process) in a subprocess with extra test task types.

Usage: python tests/serve_for_tests.py PORT DATA_DIR [worker]. ``count`` is a
slow checkpointing processor: it logs every step it executes to
``DATA_DIR/steps.log`` so a test can tell a resumed task from a restarted one,
and logs ``<id> cancelled`` when its attempt is stopped. ``quick`` is a short
task with a few progress steps, for load. With ``worker`` the process runs
workers only (``zhiyi worker`` with these task types) and prints READY once
they run.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

from aiohttp import web

from processors import TaskContext, default_registry
from zhiyi_server import Config, create_app, create_worker_app, run_worker_app

STEPS = 40


def build_registry(data_dir: Path):
    registry = default_registry().copy()

    @registry.processor("count", extensions=(".txt",), parses_document=False)
    async def count(ctx: TaskContext) -> Path:
        start = (ctx.checkpoint or {}).get("next", 0)
        log = data_dir / "steps.log"
        try:
            for step in range(start, STEPS):
                await asyncio.sleep(0.05)
                with log.open("a") as f:
                    f.write(f"{ctx.task_id} {step}\n")
                await ctx.save_checkpoint({"next": step + 1})
                await ctx.progress(100 * (step + 1) / STEPS, f"step {step + 1} of {STEPS}")
        except asyncio.CancelledError:
            with log.open("a") as f:
                f.write(f"{ctx.task_id} cancelled\n")
            raise
        out = ctx.result_path("count.txt")
        out.write_text(f"counted to {STEPS}\n")
        return out

    @registry.processor("quick", extensions=(".txt",), parses_document=False)
    async def quick(ctx: TaskContext) -> Path:
        for step in range(1, 6):
            await asyncio.sleep(0.02)
            await ctx.progress(20 * step, f"step {step}", stage=f"s{step}")
        out = ctx.result_path("quick.txt")
        out.write_text("done\n")
        return out

    return registry


def main() -> None:
    logging.basicConfig(level=os.environ.get("ZHIYI_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    port, data_dir = int(sys.argv[1]), Path(sys.argv[2])
    config = Config.from_env(data_path=data_dir, port=port)
    if sys.argv[3:] == ["worker"]:
        app = create_worker_app(config, registry=build_registry(data_dir))
        asyncio.run(run_worker_app(app, on_ready=lambda: print("READY", flush=True)))
        return
    app = create_app(config, registry=build_registry(data_dir))
    web.run_app(app, host="127.0.0.1", port=port, print=lambda _: print("READY", flush=True),
                access_log=None)


if __name__ == "__main__":
    main()
