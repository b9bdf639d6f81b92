"""Graceful stop: running attempts get SHUTDOWN_GRACE_SECONDS, the rest go back to the queue,
streams are told when to reconnect, and the next start resumes what was handed back."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import aiohttp
from helpers import add_user, create, eventually, wait_status

from processors import Registry, TaskContext, default_registry
from zhiyi_server import CONFIG, HUB

STEPS = 40


def stepping_registry(steps_run: list[tuple[int, int]], step_seconds: float) -> Registry:
    """``count``: checkpoints after every step and records each step it runs."""
    registry = default_registry().copy()

    @registry.processor("count", extensions=(".txt",), parses_document=False)
    async def count(ctx: TaskContext) -> Path:
        start = (ctx.checkpoint or {}).get("next", 0)
        for step in range(start, STEPS):
            await asyncio.sleep(step_seconds)
            steps_run.append((ctx.task_id, step))
            await ctx.save_checkpoint({"next": step + 1})
            await ctx.progress(100 * (step + 1) / STEPS, f"step {step + 1} of {STEPS}")
        out = ctx.result_path("count.txt")
        await asyncio.to_thread(out.write_text, "done\n")
        return out

    return registry


def row(database: Path, task_id: int) -> sqlite3.Row:
    with sqlite3.connect(database) as db:
        db.row_factory = sqlite3.Row
        return db.execute("SELECT * FROM processing_tasks WHERE id = ?", (task_id,)).fetchone()


async def test_an_attempt_past_the_grace_goes_back_to_the_queue_and_resumes(make_client) -> None:
    steps: list[tuple[int, int]] = []
    registry = stepping_registry(steps, step_seconds=0.05)
    first = await make_client(registry=registry, shutdown_grace_seconds=0)
    auth = await add_user(first, "alice", credits=10)
    task_id = (await create(first, auth, task_type="count", params={}))["taskId"]
    await eventually(lambda: len(steps) >= 5, "a few steps run")
    database = first.app[CONFIG].database
    await first.close()  # the same cleanup as SIGTERM under web.run_app

    stopped = row(database, task_id)
    assert stopped["status"] == "pending"
    assert stopped["attempts"] == 0, "a graceful stop does not use up an attempt"
    assert stopped["lease_owner"] is None
    done_before = len(steps)
    assert stopped["checkpoint"] is not None

    second = await make_client(registry=registry)
    task = await wait_status(second, auth, task_id, "completed")
    assert task["attempts"] == 1
    resumed = [step for _, step in steps[done_before:]]
    assert resumed[0] >= 5 and resumed == list(range(resumed[0], STEPS)), \
        "the resumed attempt starts at its checkpoint and runs each later step once"
    ledger = await (await second.get("/api/me/ledger", headers=auth)).json()
    assert [e["reason"] for e in ledger["entries"]].count("charge") == 1


async def test_an_attempt_that_ends_within_the_grace_completes(make_client) -> None:
    steps: list[tuple[int, int]] = []
    registry = stepping_registry(steps, step_seconds=0.005)
    client = await make_client(registry=registry, shutdown_grace_seconds=60)
    auth = await add_user(client, "bob", credits=10)
    task_id = (await create(client, auth, task_type="count", params={}))["taskId"]
    await eventually(lambda: len(steps) >= 1, "the attempt started")
    database = client.app[CONFIG].database
    await client.close()
    assert row(database, task_id)["status"] == "completed"
    assert len(steps) == STEPS


async def test_streams_are_told_when_to_reconnect_and_closed(make_client) -> None:
    client = await make_client(worker_concurrency=0, sse_retry_ms=4321)
    auth = await add_user(client, "carol", credits=10)
    await create(client, auth)
    async with aiohttp.ClientSession() as session:
        resp = await session.get(client.make_url("/api/sse/notifications"), headers=auth)
        assert resp.status == 200
        first = await resp.content.readuntil(b"\n\n")
        assert first == b"retry: 4321\n\n"
        snapshot = await resp.content.readuntil(b"\n\n")
        assert b"status_update" in snapshot
        # Once live (replay done), the hub writes to the socket itself, the retry: included.
        # A stream still replaying when the server stops ends with the retry: it began with.
        hub = client.app[HUB]
        await eventually(lambda: any(s.transport is not None for s in hub.subscribers()),
                         "the stream is live")
        hub_live = asyncio.create_task(client.server.close())
        rest = await asyncio.wait_for(resp.content.read(), 30)
        await hub_live
    assert rest.endswith(b"retry: 4321\n\n"), rest
    await client.close()
