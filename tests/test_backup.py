"""``zhiyi backup`` / ``zhiyi restore``: taken while the server works, restored into a new folder.

The restored server must serve every result the backup holds, its balances must equal their
ledgers, and the tasks that were unfinished must finish there.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import add_user, create, wait_status

import backup
from processors import Registry, TaskContext, default_registry
from zhiyi_server import CONFIG, STORE

STEPS = 30


def counting_registry() -> Registry:
    """Adds ``count``: a slow, checkpointing processor, so some tasks are mid-flight."""
    registry = default_registry().copy()

    @registry.processor("count", extensions=(".txt",), parses_document=False)
    async def count(ctx: TaskContext) -> Path:
        start = (ctx.checkpoint or {}).get("next", 0)
        for step in range(start, STEPS):
            await asyncio.sleep(0.02)
            await ctx.save_checkpoint({"next": step + 1})
            await ctx.progress(100 * (step + 1) / STEPS, f"step {step + 1} of {STEPS}")
        out = ctx.result_path("count.txt")
        await asyncio.to_thread(out.write_text, f"counted to {STEPS}\n")
        return out

    return registry


def ledger_drift(database: Path) -> list[tuple[str, int, int]]:
    with sqlite3.connect(database) as db:
        return db.execute(
            """SELECT u.id, u.credits, COALESCE(SUM(l.amount), 0) AS total
               FROM users u LEFT JOIN credit_ledger l ON l.user_id = u.id
               GROUP BY u.id HAVING u.credits != total""").fetchall()


def statuses(database: Path) -> dict[int, str]:
    with sqlite3.connect(database) as db:
        return dict(db.execute("SELECT id, status FROM processing_tasks"))


@pytest.mark.slow
async def test_backup_under_load_restores_results_ledgers_and_unfinished_work(
        make_client, tmp_path: Path) -> None:
    registry = counting_registry()
    live = await make_client(registry=registry, worker_concurrency=3)
    auth = await add_user(live, "alice", credits=500)
    ids: list[int] = []

    async def load(n: int) -> None:
        for i in range(n):
            kind = "count" if i % 3 else "translate"
            params = None if kind == "translate" else {}
            body = await create(live, auth, task_type=kind, params=params,
                                content=f"Paragraph {i}.\n\nAnother one.\n")
            ids.append(body["taskId"])
            await asyncio.sleep(0.01)

    await load(12)
    await wait_status(live, auth, ids[0], "completed")
    dest = tmp_path / "backup"
    # The backup runs in a thread while tasks are still created and processed on the loop.
    config = live.app[CONFIG]
    report, _ = await asyncio.gather(
        asyncio.to_thread(backup.backup, config.data_path, config.database, dest), load(12))

    snapshot = statuses(dest / "zhiyi.db")
    assert report.tasks == len(snapshot) >= 12
    assert "completed" in snapshot.values()
    unfinished = {i for i, s in snapshot.items() if s in ("pending", "processing")}
    assert unfinished, "the backup should catch some tasks mid-flight"
    assert ledger_drift(dest / "zhiyi.db") == []
    assert (dest / backup.MANIFEST).is_file()

    restored_data = tmp_path / "restored"
    backup.restore(dest, restored_data, restored_data / "zhiyi.db")
    with pytest.raises(backup.BackupError, match="already exists"):
        backup.restore(dest, restored_data, restored_data / "zhiyi.db")

    restored = await make_client(registry=registry, worker_concurrency=3,
                                 data_path=restored_data)
    token_auth = {"Authorization": auth["Authorization"]}
    for task_id, status in snapshot.items():
        if status == "completed":
            resp = await restored.get(f"/api/tasks/{task_id}/result", headers=token_auth)
            assert resp.status == 200, task_id
            assert await resp.read()
    for task_id in unfinished:
        task = await wait_status(restored, token_auth, task_id, "completed", "failed", timeout=60)
        assert task["taskStatus"] == "completed", task
    assert ledger_drift(restored_data / "zhiyi.db") == []
    # Each task was charged exactly once, in the restored ledger too.
    with sqlite3.connect(restored_data / "zhiyi.db") as db:
        charges = db.execute("SELECT task_id, COUNT(*) FROM credit_ledger WHERE reason='charge'"
                             " GROUP BY task_id HAVING COUNT(*) > 1").fetchall()
    assert charges == []
    await live.close()


async def test_a_result_gone_before_its_copy_answers_410_after_restore(
        make_client, tmp_path: Path) -> None:
    live = await make_client()
    auth = await add_user(live, "bob", credits=50)
    kept, gone = (await create(live, auth))["taskId"], (await create(live, auth))["taskId"]
    for task_id in (kept, gone):
        await wait_status(live, auth, task_id, "completed")
    config = live.app[CONFIG]
    store = live.app[STORE]
    gone_task = await store.get_task_by_id(gone)
    # As if retention removed it between the database snapshot and the copy of its folder.
    shutil.rmtree(config.data_path / gone_task.file_path)
    report = backup.backup(config.data_path, config.database, tmp_path / "b")
    assert report.missing == [gone]
    restored_data = tmp_path / "restored"
    backup.restore(tmp_path / "b", restored_data, restored_data / "zhiyi.db")
    restored = await make_client(data_path=restored_data)
    assert (await restored.get(f"/api/tasks/{kept}/result", headers=auth)).status == 200
    expired = await restored.get(f"/api/tasks/{gone}/result", headers=auth)
    assert expired.status == 410
    assert (await expired.json())["code"] == "expired"
    # The gone task's bytes left the user's kept total with its files.
    assert await restored.app[STORE].storage_drift() == {}
    kept_task = await restored.app[STORE].get_task_by_id(kept)
    assert (await restored.app[STORE].storage_used("bob")
            == kept_task.file_size + kept_task.result_size)


def zhiyi(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "zhiyi_server", *args], capture_output=True,
                          text=True, timeout=60, env=os.environ.copy())


@pytest.mark.slow
def test_cli_backup_and_restore_say_what_to_do(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert zhiyi("user", "add", "carol", "--credits", "5", "--data", str(data)).returncode == 0
    done = zhiyi("backup", str(tmp_path / "b"), "--data", str(data))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("backed up 0 tasks")
    again = zhiyi("backup", str(tmp_path / "b"), "--data", str(data))
    assert again.returncode == 1
    assert "is not an empty folder: give a new folder" in again.stderr
    over = zhiyi("restore", str(tmp_path / "b"), "--data", str(data))
    assert over.returncode == 1 and "already exists: restore into a new data folder" in over.stderr
    fresh = tmp_path / "fresh"
    back = zhiyi("restore", str(tmp_path / "b"), "--data", str(fresh))
    assert back.returncode == 0, back.stderr
    assert zhiyi("user", "list", "--data", str(fresh)).stdout.split() == ["carol", "5"]
    assert (fresh / "zhiyi.db").stat().st_mode & 0o777 == 0o600
    not_backup = zhiyi("restore", str(data), "--data", str(tmp_path / "x"))
    assert not_backup.returncode == 1 and "is not a Zhiyi backup" in not_backup.stderr
