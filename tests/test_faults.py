"""Faults from outside the server: a database another process holds locked, a full disk.

Each refusal is a clear answer (503 with Retry-After, 507) that changes nothing, and the
server serves again once the fault is gone.
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import add_user, create, form, wait_status

from zhiyi_server import CONFIG, STORE


def user_files(data: Path, user: str) -> list[Path]:
    folder = data / user
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


async def test_a_database_locked_by_another_process_is_503_with_retry_after(
        make_client, tmp_path: Path) -> None:
    client = await make_client(worker_concurrency=0)
    auth = await add_user(client, "alice", credits=10)
    config = client.app[CONFIG]
    other = sqlite3.connect(config.database, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process's long write transaction
    try:
        refused = await client.post("/api/tasks/create", data=form(), headers=auth)
        body = await refused.json()
        assert refused.status == 503, body
        assert body["code"] == "store_unavailable"
        assert "Send the request again" in body["message"]
        assert refused.headers["Retry-After"] == "2"
        # Readers are not blocked by a writer (WAL): the list still answers.
        listed = await client.get("/api/tasks", headers=auth)
        assert listed.status == 200
        assert (await listed.json())["tasks"] == []
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert user_files(config.data_path, "alice") == []
    me = await (await client.get("/api/me", headers=auth)).json()
    assert me["credits"] == 10
    created = await create(client, auth)  # the same request, once the lock is gone
    assert created["task"]["creditsCost"] == 1


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (the tests run as root, as CI does)."""
    path.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                              str(path)], capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); "
                    "the disk-full tests need root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path) -> Path:
    """Write until not one more byte fits; the file to delete to free the disk again."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as f:
        for size in (65536, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * size)
    return filler


async def test_an_upload_that_does_not_fit_is_507_and_leaves_nothing(
        make_client, tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", "1m") as disk:
        client = await make_client(worker_concurrency=0, data_path=disk,
                                   db_path=tmp_path / "zhiyi.db")
        auth = await add_user(client, "alice", credits=10_000)
        big = "A paragraph of text that fills the disk.\n\n" * 60_000  # ~2.5 MB
        refused = await client.post("/api/tasks/create", data=form(big), headers=auth)
        body = await refused.json()
        assert refused.status == 507, body
        assert body["code"] == "insufficient_storage"
        assert "disk is full" in body["message"]
        assert user_files(disk, "alice") == []
        assert (await (await client.get("/api/tasks", headers=auth)).json())["tasks"] == []
        assert (await (await client.get("/api/me", headers=auth)).json())["credits"] == 10_000
        # Space is there again for a small one: serving goes on.
        await create(client, auth)
        await client.close()


async def test_a_result_that_cannot_be_written_fails_with_a_refund_then_retries(
        make_client, tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", "2m") as disk:
        settings = dict(data_path=disk, db_path=tmp_path / "zhiyi.db")
        idle = await make_client(worker_concurrency=0, **settings)
        auth = await add_user(idle, "alice", credits=10)
        task_id = (await create(idle, auth))["taskId"]
        await idle.close()
        filler = fill(disk)

        working = await make_client(worker_concurrency=1, **settings)
        failed = await wait_status(working, auth, task_id, "failed")
        assert failed["errorCode"] == "insufficient_storage"
        assert "disk is full" in failed["errorMessage"]
        assert (await (await working.get("/api/me", headers=auth)).json())["credits"] == 10

        filler.unlink()
        retried = await working.post(f"/api/tasks/{task_id}/retry", headers=auth)
        assert retried.status == 200, await retried.json()
        done = await wait_status(working, auth, task_id, "completed")
        assert done["resultUrl"]
        store = working.app[STORE]
        assert await store.balance_drift() == {}
        await working.close()
        shutil.rmtree(disk / "alice", ignore_errors=True)


async def test_a_full_database_disk_is_507_not_500(make_client, tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", "2m") as disk:
        client = await make_client(worker_concurrency=0, data_path=tmp_path / "data",
                                   db_path=disk / "zhiyi.db")
        auth = await add_user(client, "alice", credits=10)
        filler = fill(disk)
        # Each create appends rows; the first that needs a new page finds no room.
        statuses = set()
        for _ in range(200):
            resp = await client.post("/api/tasks/create", data=form(), headers=auth)
            statuses.add(resp.status)
            if resp.status != 201:
                body = await resp.json()
                assert (resp.status, body["code"]) == (507, "insufficient_storage"), body
                break
        assert 507 in statuses
        filler.unlink()
        await create(client, auth)
        assert await client.app[STORE].balance_drift() == {}
        await client.close()
