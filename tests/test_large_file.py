"""A 20 MB text file translates with bounded server memory and steady progress."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest
from helpers import ServerProcess, SSEReader, free_port, make_user, peak_rss_mb

SIZE = 20 * 1024 * 1024


def write_big_text(path: Path) -> None:
    paragraph = "The quick brown fox jumps over the lazy dog near {place} at %s o'clock. " * 4
    with path.open("w", encoding="utf-8") as f:
        written = 0
        while written < SIZE:
            f.write(paragraph + "\n\n")
            written += len(paragraph) + 2


@pytest.mark.slow
async def test_twenty_megabytes_bounded_memory_steady_progress(tmp_path: Path) -> None:
    source = tmp_path / "big.txt"
    write_big_text(source)
    proc = ServerProcess(free_port(), tmp_path / "data", env={"WORKER_CONCURRENCY": "1"})
    proc.data.mkdir(parents=True)
    token = await make_user(proc.data, 1_000_000)
    try:
        await asyncio.to_thread(proc.start)
        assert proc.proc is not None
        baseline = peak_rss_mb(proc.proc.pid)
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"},
                                         timeout=aiohttp.ClientTimeout(total=600)) as s:
            form = aiohttp.FormData()
            form.add_field("taskType", "translate")
            form.add_field("params", json.dumps({"targetLang": "zh", "engine": "pseudo"}))
            with source.open("rb") as f:
                form.add_field("file", f, filename="big.txt")
                async with s.post(f"{proc.url}/api/tasks/create", data=form) as resp:
                    assert resp.status == 201, await resp.text()
                    created = await resp.json()
            async with s.get(f"{proc.url}{created['sseUrl']}",
                             headers={"Last-Event-ID": "0"}) as stream:
                messages = await SSEReader(stream).collect_until_final(timeout=300)
            assert messages[-1].payload["status"] == "completed"
            async with s.get(f"{proc.url}{messages[-1].payload['resultUrl']}") as resp:
                size = 0
                async for chunk in resp.content.iter_chunked(1 << 20):
                    size += len(chunk)
            growth = peak_rss_mb(proc.proc.pid) - baseline
    finally:
        await asyncio.to_thread(proc.stop)
    assert size > SIZE  # pseudo-localisation expands the text
    # The document is streamed: the server never holds it in memory even once whole.
    print(f"peak server memory grew by {growth:.0f} MB for a 20 MB document")
    assert growth < SIZE / (1024 * 1024), f"peak memory grew by {growth:.0f} MB"
    # Progress, as behaviour rather than speed: how many writes a run gets depends on how
    # long it takes (at most one per whole percent and progress interval; the exact rule
    # is tested with a fake clock in test_processing.py), so only what holds at any
    # speed is asserted here.
    ids = [int(m.id) for m in messages]
    assert ids == sorted(set(ids))
    progress = [m.payload["progress"] for m in messages
                if m.payload["status"] == "processing" and m.payload["stage"] == "translating"]
    assert progress == sorted(set(progress))  # one write per whole percent, never back
    assert progress[0] == 0 and progress[-1] <= 98  # the last percent is for writing
