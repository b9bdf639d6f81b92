"""Disk: the per-user storage quota, failed uploads removed after a grace, private file modes."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient
from conftest import MakeClient
from fake_clock import FakeClock
from helpers import add_user, create, form, wait_status
from test_openapi import check_response
from test_openapi import spec as spec  # the fixture
from test_recovery import free_port

from zhiyi_server import POOL, STORE, Config

KB = 1024
ZHIYI = [sys.executable, "-m", "zhiyi_server"]


def text_of(size: int) -> bytes:
    line = b"A sentence to analyze, with some words in it.\n"
    return (line * (size // len(line) + 1))[:size]


async def upload(client: TestClient, headers: dict[str, str], size: int,
                 spec: dict | None = None) -> tuple[int, dict]:
    resp = await client.post("/api/tasks/create", headers=headers,
                             data=form(text_of(size), task_type="analyze"))
    if spec is not None:  # the answer is as openapi.yaml documents it
        return resp.status, await check_response(spec, resp, "/api/tasks/create", "post")
    return resp.status, await resp.json()


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------------- quota
@pytest.mark.both_stores
async def test_an_upload_past_the_quota_is_refused_and_changes_nothing(
        app_client: MakeClient, config: Config, spec: dict) -> None:
    client = await app_client(max_storage_mb_per_user=1)
    headers = await add_user(client)
    status, first = await upload(client, headers, 600 * KB)
    assert status == 201, first
    status, refused = await upload(client, headers, 600 * KB, spec)
    assert status == 507
    assert refused["code"] == "insufficient_storage"
    assert "storage quota" in refused["message"] and "0.4 MB is free" in refused["message"]
    # Nothing of the refused upload stays: no task, no charge, no file.
    tasks = (await (await client.get("/api/tasks", headers=headers)).json())["tasks"]
    assert [t["taskId"] for t in tasks] == [first["taskId"]]
    assert (await (await client.get("/api/me", headers=headers)).json())["credits"] == 99
    # (the first task's folder also holds its parse, kept for its attempt, in work/)
    assert [p.parent.name for p in files_under(config.data_path / "alice")
            if p.parent.name != "work"] == ["original"]
    # A small file still fits; deleting a task makes room again.
    assert (await upload(client, headers, 100 * KB))[0] == 201
    resp = await client.delete(f"/api/tasks/{first['taskId']}", headers=headers)
    assert resp.status == 200
    assert (await upload(client, headers, 600 * KB))[0] == 201
    # Another user has a quota of their own.
    bob = await add_user(client, "bob")
    assert (await upload(client, bob, 600 * KB))[0] == 201


@pytest.mark.both_stores
async def test_concurrent_uploads_cannot_pass_the_quota_together(
        app_client: MakeClient) -> None:
    client = await app_client(max_storage_mb_per_user=1)
    headers = await add_user(client)
    results = await asyncio.gather(*(upload(client, headers, 400 * KB) for _ in range(4)))
    statuses = sorted(status for status, _ in results)
    assert statuses == [201, 201, 507, 507]
    assert await client.app[STORE].storage_used("alice") == 800 * KB


@pytest.mark.both_stores
async def test_results_count_toward_the_quota(app_client: MakeClient) -> None:
    client = await app_client(worker_concurrency=1)
    headers = await add_user(client)
    created = await create(client, headers)
    await wait_status(client, headers, created["taskId"], "completed")
    resp = await client.get(f"/api/tasks/{created['taskId']}/result", headers=headers)
    result = await resp.read()
    task = created["task"]
    used = await client.app[STORE].storage_used("alice")
    assert used == task["fileSize"] + len(result)


@pytest.mark.both_stores
async def test_the_running_total_follows_every_change_of_a_users_files(
        app_client: MakeClient, clock: FakeClock) -> None:
    """Upload, result, retry, expiry and delete each move ``storage_used`` in their own
    transaction; at every step it equals the sum over the user's tasks."""
    client = await app_client(failed_retention_hours=1)
    store, pool = client.app[STORE], client.app[POOL]
    headers = await add_user(client)
    ids = [(await upload(client, headers, size))[1]["taskId"] for size in (1000, 2000, 3000)]
    done, failed, pending = ids
    assert await store.storage_used("alice") == 6000 and await store.storage_drift() == {}

    claimed = await store.claim_next_task("test", 60)
    assert claimed is not None and claimed.id == done
    await store.complete_task(done, "out.txt", attempt=claimed.attempts, result_size=500)
    claimed = await store.claim_next_task("test", 60)
    assert claimed is not None and claimed.id == failed
    await store.fail_task(failed, "the engine broke", attempt=claimed.attempts)
    assert await store.storage_used("alice") == 6500 and await store.storage_drift() == {}

    resp = await client.post(f"/api/tasks/{failed}/retry", headers=headers)
    assert resp.status == 200
    resp = await client.post(f"/api/tasks/{failed}/cancel", headers=headers)
    assert resp.status == 200
    clock.advance(hours=2)
    await pool.apply_retention()  # the cancelled upload goes
    assert await store.storage_used("alice") == 4500 and await store.storage_drift() == {}

    for task_id in (pending, done, failed):  # active, completed, already expired
        assert (await client.delete(f"/api/tasks/{task_id}", headers=headers)).status == 200
        assert await store.storage_drift() == {}
    assert await store.storage_used("alice") == 0


async def test_a_quota_of_zero_means_none(app_client: MakeClient) -> None:
    client = await app_client(max_storage_mb_per_user=0, max_upload_mb=2)
    headers = await add_user(client)
    for _ in range(3):
        assert (await upload(client, headers, 1200 * KB))[0] == 201


# ------------------------------------------------------------------ retention
@pytest.mark.both_stores
async def test_failed_and_cancelled_uploads_go_after_the_grace(
        app_client: MakeClient, clock: FakeClock, config: Config, spec: dict) -> None:
    client = await app_client(failed_retention_hours=24)
    store, pool = client.app[STORE], client.app[POOL]
    headers = await add_user(client)
    ids = [(await create(client, headers))["taskId"] for _ in range(3)]
    completed, failed, cancelled = ids
    claimed = await store.claim_next_task("test", 60)
    assert claimed is not None and claimed.id == completed
    await store.complete_task(completed, "doc.zh.txt", attempt=claimed.attempts)
    claimed = await store.claim_next_task("test", 60)
    assert claimed is not None and claimed.id == failed
    await store.fail_task(failed, "the engine broke", attempt=claimed.attempts)
    resp = await client.post(f"/api/tasks/{cancelled}/cancel", headers=headers)
    assert resp.status == 200
    folder = {i: config.data_path / (await store.get_task_by_id(i)).file_path for i in ids}

    # Within the grace: nothing goes, and a retry works.
    clock.advance(hours=23)
    await pool.apply_retention()
    assert all(folder[i].is_dir() for i in ids)
    resp = await client.post(f"/api/tasks/{cancelled}/retry", headers=headers)
    assert resp.status == 200
    resp = await client.post(f"/api/tasks/{cancelled}/cancel", headers=headers)
    assert resp.status == 200

    # Past it: the failed upload goes, the one cancelled again an hour ago stays.
    clock.advance(hours=2)
    await pool.apply_retention()
    assert not folder[failed].exists()
    assert folder[cancelled].is_dir() and folder[completed].is_dir()
    task = (await (await client.get(f"/api/tasks/{failed}", headers=headers)).json())["task"]
    assert task["expired"] is True and task["taskStatus"] == "failed"
    credits = (await (await client.get("/api/me", headers=headers)).json())["credits"]
    resp = await client.post(f"/api/tasks/{failed}/retry", headers=headers)
    body = await check_response(spec, resp, "/api/tasks/{taskId}/retry", "post", 409)
    assert body["code"] == "expired"
    assert body["taskStatus"] == "failed" and "upload the document again" in body["message"]
    assert (await (await client.get("/api/me", headers=headers)).json())["credits"] == credits

    clock.advance(hours=24)
    await pool.apply_retention()
    assert not folder[cancelled].exists() and folder[completed].is_dir()
    assert await store.storage_used("alice") == (await store.get_task_by_id(completed)).file_size


# ---------------------------------------------------------------- file modes
def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_an_embedded_app_keeps_its_files_private(
        app_client: MakeClient, config: Config) -> None:
    client = await app_client(worker_concurrency=1)
    headers = await add_user(client)
    created = await create(client, headers)
    await wait_status(client, headers, created["taskId"], "completed")
    data = config.data_path
    assert mode(data) == 0o700
    for name in ("zhiyi.db", "zhiyi.db-wal", "zhiyi.db-shm"):
        assert mode(data / name) == 0o600, name
    task_dir = data / (await client.app[STORE].get_task_by_id(created["taskId"])).file_path
    for folder in (data / "alice", task_dir, task_dir / "original", task_dir / "result"):
        assert mode(folder) == 0o700, folder
    (original,) = (task_dir / "original").iterdir()
    assert mode(original) == 0o600


@pytest.mark.timeout(180)
def test_zhiyi_serve_makes_every_file_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    port = free_port()
    env = {**os.environ, "RECONCILE_SECONDS": "3600"}
    proc = subprocess.Popen([*ZHIYI, "serve", "--port", str(port), "--data", str(data)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        token = proc.stdout.readline().split("token=", 1)[1].strip()
        base = f"http://127.0.0.1:{port}"
        body, content_type = encode_form(b"Hello world.\n")
        request = urllib.request.Request(
            f"{base}/api/tasks/create", data=body, method="POST",
            headers={"Authorization": f"Bearer {token}", "Content-Type": content_type})
        with urllib.request.urlopen(request, timeout=30) as resp:
            task_id = json.load(resp)["taskId"]
        poll_until_completed(base, token, task_id)
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    paths = [data, *data.rglob("*")]
    assert any(p.parent.name == "result" for p in paths)
    loose = {str(p): oct(mode(p)) for p in paths
             if mode(p) != (0o700 if p.is_dir() else 0o600)}
    assert loose == {}


def encode_form(content: bytes) -> tuple[bytes, str]:
    boundary = "zhiyitestboundary"
    params = json.dumps({"targetLang": "zh", "engine": "pseudo"})
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="taskType"\r\n\r\n'
        "translate\r\n".encode(),
        f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\n\r\n'
        f"{params}\r\n".encode(),
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.txt"\r\n'
        "Content-Type: text/plain\r\n\r\n".encode() + content + b"\r\n",
        f"--{boundary}--\r\n".encode(),
    ]
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def poll_until_completed(base: str, token: str, task_id: int) -> None:
    request = urllib.request.Request(f"{base}/api/tasks/{task_id}",
                                     headers={"Authorization": f"Bearer {token}"})
    for _ in range(600):
        with urllib.request.urlopen(request, timeout=30) as resp:
            status = json.load(resp)["task"]["taskStatus"]
        if status == "completed":
            return
        assert status in ("pending", "processing"), status
        subprocess.run(["sleep", "0.1"], check=True)
    raise AssertionError(f"task {task_id} did not complete")


def test_user_add_makes_a_private_data_folder(tmp_path: Path) -> None:
    data = tmp_path / "new" / "data"
    done = subprocess.run([*ZHIYI, "user", "add", "alice", "--data", str(data)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert mode(data) == 0o700 and mode(data / "zhiyi.db") == 0o600


async def test_a_drifted_kept_total_is_named_by_the_reconciler(
        app_client: MakeClient, caplog: pytest.LogCaptureFixture) -> None:
    client = await app_client()
    store = client.app[STORE]
    headers = await add_user(client)
    assert (await upload(client, headers, 1000))[0] == 201
    await store._write(lambda txn: txn.db.execute(
        "UPDATE users SET storage_bytes = 1 WHERE id = 'alice'"))  # as a bug would leave it
    assert await store.storage_drift() == {"alice": (1, 1000)}
    with caplog.at_level("ERROR", logger="worker"):
        await client.app[POOL].reconcile()
    assert "STORAGE DRIFT: user alice has a kept total of 1 bytes" in caplog.text
