"""Tokens and sessions: revoke, rotate, disable, expiry, sliding, and the streams they end.

Revocations come from a second process where the issue says "every process":
the real ``zhiyi`` command (or a plain sqlite3 connection) changes the database
file under a running app, which must notice on the next request, and on open
streams within a heartbeat.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient
from conftest import MakeClient
from fake_clock import FakeClock
from helpers import SSEReader, add_user, create

from storage import AmbiguousTokenPrefix, TaskStore, hash_token
from zhiyi_server import STORE, Config

ZHIYI = [sys.executable, "-m", "zhiyi_server"]
#: a cookie-authenticated write from the page itself (see the CSRF rules)
SAME_ORIGIN = {"Sec-Fetch-Site": "same-origin"}


async def zhiyi(*args: str, data: Path) -> tuple[int, str, str]:
    """The real ``zhiyi`` command, in another process, without blocking the test's loop."""
    proc = await asyncio.create_subprocess_exec(
        *ZHIYI, *args, "--data", str(data), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=os.environ.copy())
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def writes_settled(client: TestClient) -> None:
    """Wait until writes queued so far committed (a token's use is recorded unawaited).

    Writes commit in queue order, so a harmless write queued now commits after them.
    """
    await client.app[STORE].set_user_disabled("alice", False)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def status_of(client: TestClient, headers: dict[str, str] | None = None) -> int:
    resp = await client.get("/api/me", headers=headers or {})
    await resp.read()
    return resp.status


async def open_stream(client: TestClient, headers: dict[str, str] | None = None) -> SSEReader:
    resp = await client.get("/api/sse/notifications", headers=headers or {})
    assert resp.status == 200, await resp.text()
    reader = SSEReader(resp)
    return reader


async def login(client: TestClient, token: str) -> str:
    """``POST /api/session``; returns the session token the cookie holds."""
    resp = await client.post("/api/session", json={"token": token}, headers=SAME_ORIGIN)
    assert resp.status == 200
    return resp.cookies["zhiyi_session"].value


# ------------------------------------------------------------------ revocation
async def test_token_deleted_by_another_process_fails_on_the_next_request(
        app_client: MakeClient, config: Config) -> None:
    client = await app_client()
    headers = await add_user(client)
    assert await status_of(client, headers) == 200
    with sqlite3.connect(config.data_path / "zhiyi.db") as db:
        db.execute("DELETE FROM api_tokens")
    assert await status_of(client, headers) == 401


async def test_cli_revoke_is_seen_by_the_next_request_and_by_an_open_stream(
        app_client: MakeClient, config: Config) -> None:
    client = await app_client(sse_heartbeat_seconds=0.05)
    headers = await add_user(client)
    other = bearer(await client.app[STORE].issue_token("alice"))
    stream = await open_stream(client, headers)  # no task yet: no snapshot
    kept = await open_stream(client, other)

    code, out, err = await zhiyi("user", "revoke", "alice", "--token",
                                 headers["Authorization"][7:20], data=config.data_path)
    assert code == 0, err
    assert "revoked 1 token" in out

    assert await status_of(client, headers) == 401
    assert await stream.next(timeout=30) is None  # the stream ended
    # The other token, and its stream, still work: an event still reaches it.
    assert await status_of(client, other) == 200
    await client.app[STORE].grant_credits("alice", 5)
    message = await kept.next(timeout=30)
    assert message is not None and message.payload["credits"] == 105


async def test_cli_revoke_all_and_its_errors(app_client: MakeClient, config: Config) -> None:
    client = await app_client()
    headers = await add_user(client)
    session = await login(client, headers["Authorization"][7:])
    data = config.data_path
    assert (await zhiyi("user", "revoke", "nobody", data=data))[0] == 1
    code, _, err = await zhiyi("user", "revoke", "alice", "--token", "zy_", data=data)
    assert code == 1 and "at least 6 characters" in err
    code, _, err = await zhiyi("user", "revoke", "alice", "--token", "zy_nothing", data=data)
    assert code == 1 and "no token of alice starts with 'zy_nothing'" in err
    assert await status_of(client, headers) == 200
    await writes_settled(client)
    # The listing shows first characters, never a whole secret; a use is recorded.
    code, out, err = await zhiyi("user", "tokens", "alice", data=data)
    assert code == 0, err
    header, *rows = [line.split("\t") for line in out.strip().splitlines()]
    assert header == ["prefix", "kind", "created", "last used", "expires"]
    assert sorted((r[0], r[1]) for r in rows) == sorted(
        [(headers["Authorization"][7:18], "api"), (session[:11], "session")])
    api_row = next(r for r in rows if r[1] == "api")
    assert api_row[3] == "2026-01-01T00:00:00.000Z" and api_row[4] == "never"
    assert (await zhiyi("user", "tokens", "nobody", data=data))[0] == 1
    code, out, err = await zhiyi("user", "revoke", "alice", data=data)
    assert code == 0, err
    assert out.strip() == "revoked 2 token(s) and session(s) of alice"
    assert await status_of(client, headers) == 401
    assert await status_of(client, {"Cookie": f"zhiyi_session={session}"}) == 401


async def test_ambiguous_prefix_revokes_nothing(tmp_path: Path) -> None:
    store = await TaskStore.open(tmp_path / "zhiyi.db")
    try:
        await store.add_user("alice")
        tokens = [await store.issue_token("alice") for _ in range(2)]
        with pytest.raises(AmbiguousTokenPrefix) as refused:
            await store.revoke_tokens("alice", "zy_")
        assert refused.value.matches == 2
        assert [await store.user_for_token(t) for t in tokens] == ["alice", "alice"]
        assert await store.revoke_tokens("alice", tokens[0][:11]) == 1
        assert [await store.user_for_token(t) for t in tokens] == [None, "alice"]
    finally:
        await store.close()


async def test_rotate_issues_a_new_token_and_revokes_the_others(
        app_client: MakeClient, config: Config) -> None:
    client = await app_client(sse_heartbeat_seconds=0.05)
    headers = await add_user(client)
    session = await login(client, headers["Authorization"][7:])
    stream = await open_stream(client, headers)
    code, out, err = await zhiyi("user", "token", "alice", "--rotate", data=config.data_path)
    assert code == 0, err
    new = out.strip().splitlines()[-1]
    assert new.startswith("zy_") and new != headers["Authorization"][7:]
    assert await status_of(client, bearer(new)) == 200
    assert await status_of(client, headers) == 401
    assert await status_of(client, {"Cookie": f"zhiyi_session={session}"}) == 401
    while await stream.next(timeout=30) is not None:  # snapshot, then the end
        pass


async def test_disable_and_enable(app_client: MakeClient, config: Config) -> None:
    client = await app_client(sse_heartbeat_seconds=0.05)
    headers = await add_user(client)
    session = await login(client, headers["Authorization"][7:])
    client.session.cookie_jar.clear()
    stream = await open_stream(client, {"Cookie": f"zhiyi_session={session}"})
    code, out, err = await zhiyi("user", "disable", "alice", data=config.data_path)
    assert code == 0, err
    assert "disabled alice" in out
    assert await status_of(client, headers) == 401
    assert await status_of(client, {"Cookie": f"zhiyi_session={session}"}) == 401
    resp = await client.post("/api/session", json={"token": headers["Authorization"][7:]})
    assert resp.status == 401
    while await stream.next(timeout=30) is not None:
        pass
    code, out, _ = await zhiyi("user", "list", data=config.data_path)
    assert out.split() == ["alice", "100", "disabled"]
    assert (await zhiyi("user", "enable", "alice", data=config.data_path))[0] == 0
    assert await status_of(client, headers) == 200
    assert await status_of(client, {"Cookie": f"zhiyi_session={session}"}) == 200
    assert (await zhiyi("user", "disable", "nobody", data=config.data_path))[0] == 1


async def test_user_commands_need_an_existing_database(tmp_path: Path) -> None:
    data = tmp_path / "nothing-here"
    for args in (("list",), ("token", "alice"), ("credit", "alice", "5"),
                 ("revoke", "alice"), ("disable", "alice"), ("enable", "alice")):
        code, _, err = await zhiyi("user", *args, data=data)
        assert code == 1, args
        assert str(data) in err and "no Zhiyi database" in err
    assert not data.exists()


@pytest.mark.both_stores
async def test_admin_revoke_ends_the_users_streams_at_once(app_client: MakeClient) -> None:
    # No heartbeat (so no periodic re-check) within the test: the streams must end at once.
    client = await app_client(sse_heartbeat_seconds=3600)
    headers = await add_user(client)
    store = client.app[STORE]
    await store.add_user("root", 0, admin=True)
    admin = bearer(await store.issue_token("root"))
    stream = await open_stream(client, headers)
    admins_stream = await open_stream(client, admin)
    resp = await client.post("/api/admin/users/alice/revoke", headers=admin)
    assert resp.status == 200 and (await resp.json())["revoked"] == 1
    assert await stream.next(timeout=30) is None
    assert await status_of(client, headers) == 401
    await store.grant_credits("root", 3)  # the admin's own stream goes on
    message = await admins_stream.next(timeout=30)
    assert message is not None and message.payload["credits"] == 3


# -------------------------------------------------------------------- sessions
@pytest.mark.both_stores
async def test_logout_ends_the_streams_of_that_session_only(app_client: MakeClient) -> None:
    # No heartbeat (so no periodic re-check) within the test: the streams must end at once.
    client = await app_client(sse_heartbeat_seconds=3600)
    headers = await add_user(client)
    await login(client, headers["Authorization"][7:])
    by_cookie = await open_stream(client)
    by_token = await open_stream(client, headers)
    resp = await client.delete("/api/session", headers=SAME_ORIGIN)
    assert resp.status == 200
    assert await by_cookie.next(timeout=30) is None
    assert await status_of(client) == 401
    # The bearer stream goes on: a new task's events reach it.
    created = await create(client, headers)
    message = await by_token.next(timeout=30)
    while message is not None and message.payload.get("taskId") != created["taskId"]:
        message = await by_token.next(timeout=30)
    assert message is not None


@pytest.mark.both_stores
async def test_session_expires_after_session_days(app_client: MakeClient,
                                                  clock: FakeClock) -> None:
    client = await app_client(session_days=2)
    headers = await add_user(client)
    resp = await client.post("/api/session", json={"token": headers["Authorization"][7:]},
                             headers=SAME_ORIGIN)
    assert resp.cookies["zhiyi_session"]["max-age"] == str(2 * 24 * 3600)
    session = {"Cookie": f"zhiyi_session={resp.cookies['zhiyi_session'].value}"}
    client.session.cookie_jar.clear()
    clock.advance(days=2)
    assert await status_of(client, session) == 401
    clock.advance(days=-2, seconds=-1)  # a second before, it was still valid
    assert await status_of(client, session) == 200
    # API tokens do not expire.
    assert await status_of(client, headers) == 200


async def test_session_slides_on_use_with_bounded_writes(
        app_client: MakeClient, clock: FakeClock, config: Config) -> None:
    client = await app_client(session_days=2)
    headers = await add_user(client)
    token = await login(client, headers["Authorization"][7:])
    client.session.cookie_jar.clear()
    session = {"Cookie": f"zhiyi_session={token}"}

    def expiry() -> str:
        with sqlite3.connect(config.data_path / "zhiyi.db") as db:
            return db.execute("SELECT expires_at FROM api_tokens WHERE token_hash = ?",
                              (hash_token(token),)).fetchone()[0]

    clock.advance(days=1, hours=12)
    resp = await client.get("/api/me", headers=session)
    assert resp.status == 200
    await writes_settled(client)
    # Slid: the cookie is set again to live as long as the session.
    assert resp.cookies["zhiyi_session"].value == token
    assert resp.cookies["zhiyi_session"]["max-age"] == str(2 * 24 * 3600)
    slid = expiry()
    assert slid == "2026-01-04T12:00:00.000Z"  # two days from this use
    # Used again within the hour: no write, no new cookie.
    clock.advance(minutes=30)
    resp = await client.get("/api/me", headers=session)
    assert resp.status == 200 and "zhiyi_session" not in resp.cookies
    await writes_settled(client)
    assert expiry() == slid
    # Without the slide it would have expired at 2026-01-03T00:00.
    clock.advance(days=1)
    assert await status_of(client, session) == 200
    clock.advance(days=2, seconds=1)
    assert await status_of(client, session) == 401


@pytest.mark.both_stores
async def test_a_session_open_on_a_stream_slides_too(app_client: MakeClient,
                                                     clock: FakeClock) -> None:
    client = await app_client(session_days=2)
    headers = await add_user(client)
    token = await login(client, headers["Authorization"][7:])
    client.session.cookie_jar.clear()
    clock.advance(days=1)
    resp = await client.get("/api/sse/notifications",
                            headers={"Cookie": f"zhiyi_session={token}"})
    assert resp.status == 200
    assert resp.cookies["zhiyi_session"].value == token
    resp.close()


# ------------------------------------------------------------------- the store
async def test_lookup_racing_a_revocation_does_not_bring_the_token_back(tmp_path: Path) -> None:
    store = await TaskStore.open(tmp_path / "zhiyi.db")
    try:
        await store.add_user("alice")
        for _ in range(20):
            token = await store.issue_token("alice", kind="session")
            lookup = asyncio.create_task(store.user_for_token(token))
            await asyncio.sleep(0)  # the lookup's read is in flight
            await store.revoke_token(token)
            await lookup
            assert await store.user_for_token(token) is None
    finally:
        await store.close()


async def test_v2_sessions_get_an_expiry_when_migrated(tmp_path: Path) -> None:
    from storage import MIGRATIONS, SCHEMA_VERSION

    path = tmp_path / "v2.db"
    fixtures = Path(__file__).parent / "fixtures"
    with sqlite3.connect(path) as db:
        db.executescript((fixtures / "schema_v1.sql").read_text())
        db.executescript(MIGRATIONS[2])
        db.execute("PRAGMA user_version = 2")
        db.execute("INSERT INTO users VALUES ('alice', 0, '2026-01-01T00:00:00.000Z')")
        db.executemany("INSERT INTO api_tokens VALUES (?, 'alice', '2026-01-01T00:00:00.000Z', ?)",
                       [(hash_token("zs_old"), "session"), (hash_token("zy_old"), "api")])
    clock = FakeClock()
    store = await TaskStore.open(path, clock=clock)
    try:
        clock.advance(days=29)
        assert await store.user_for_token("zs_old") == "alice"
        clock.advance(days=1)
        assert await store.user_for_token("zs_old") is None
        assert await store.user_for_token("zy_old") == "alice"
        assert await store.revoke_tokens("alice") == 2
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
