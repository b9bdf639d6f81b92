"""Bytes and folders on disk per task, after N translations of a 2 KB ``.txt``.

Usage: ``python bench/disk_per_task.py [--tasks 2000] [--concurrency 20]``.

Runs the real server (``bench/zhiyi_launcher.py``, SQLite in a scratch folder), sends
``--tasks`` real ``translate`` tasks (``pseudo`` engine, a distinct 2 KB document each, so
the translation memory saves nothing) and follows each to its end, then walks the data
folder. Prints, per task: bytes on disk of documents and their folders (allocated blocks,
as ``du`` counts),
folders, files, database bytes (file + WAL), and the input size for reference; and the
largest number of entries in any one folder (what sharding bounds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PYTHON, ServerProcess, add_zhiyi_user, free_port, remove_tree, scratch_dir

FINAL = ("completed", "failed", "cancelled")


def document(n: int) -> bytes:
    line = f"Document {n}: a paragraph that is translated once and kept on disk.\n\n"
    return (line * (2048 // len(line) + 1)).encode()[:2048]


async def one(session: aiohttp.ClientSession, base: str, n: int) -> str:
    form = aiohttp.FormData()
    form.add_field("taskType", "translate")
    form.add_field("params", json.dumps({"targetLang": "zh", "engine": "pseudo"}))
    form.add_field("file", document(n), filename=f"doc{n}.txt", content_type="text/plain")
    async with session.post(base + "/api/tasks/create", data=form) as resp:
        created = await resp.json()
        if resp.status != 201:
            return f"create {resp.status}"
    async with session.get(base + created["sseUrl"]) as resp:
        async for raw in resp.content:
            if raw.startswith(b"data:"):
                status = json.loads(raw[5:])["data"].get("status")
                if status in FINAL:
                    return str(status)
    return "stream ended"


async def drive(base: str, token: str, tasks: int, concurrency: int) -> dict[str, int]:
    outcomes: dict[str, int] = {}
    numbers = iter(range(tasks))
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(headers=headers) as session:

        async def loop() -> None:
            for n in numbers:
                outcome = await one(session, base, n)
                outcomes[outcome] = outcomes.get(outcome, 0) + 1

        await asyncio.gather(*(loop() for _ in range(concurrency)))
    return outcomes


def walk(data: Path) -> dict[str, int]:
    folders = files = blocks = widest = 0
    for root, dirs, names in os.walk(data):
        folders += len(dirs)
        widest = max(widest, len(dirs) + len(names))
        blocks += sum((Path(root) / d).stat().st_blocks * 512 for d in dirs)
        for name in names:
            path = Path(root) / name
            if name.startswith("zhiyi.db"):
                continue
            files += 1
            blocks += path.stat().st_blocks * 512
    database = sum(p.stat().st_size for p in data.glob("zhiyi.db*"))
    return {"folders": folders, "files": files, "document_bytes": blocks,
            "database_bytes": database, "widest_folder": widest}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=20)
    args = parser.parse_args(argv)
    work = scratch_dir("disk")
    port = free_port()
    token = add_zhiyi_user(work, "disk", 10**9)
    server = ServerProcess("zhiyi", [PYTHON, "bench/zhiyi_launcher.py", str(port), str(work)],
                           env={"WORKER_CONCURRENCY": "4", "ZHIYI_LOG_LEVEL": "WARNING",
                                "MAX_ACTIVE_TASKS_PER_USER": "1000",
                                "MAX_PARSES_PER_USER": "100"},
                           log_path=work.parent / f"{work.name}.log").start()
    try:
        outcomes = asyncio.run(drive(f"http://127.0.0.1:{port}", token, args.tasks,
                                     args.concurrency))
    finally:
        server.stop()
    figures = walk(work)
    n = args.tasks
    print(f"{n} translations of a 2,048-byte .txt: {outcomes}")
    print(f"per task: {figures['document_bytes'] / n:,.0f} bytes on disk (files and folders) "
          f"(input 2,048), {figures['folders'] / n:.2f} folders, {figures['files'] / n:.2f} "
          f"files, {figures['database_bytes'] / n:,.0f} database bytes")
    print(f"widest folder: {figures['widest_folder']} entries")
    remove_tree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
