"""What only the PostgreSQL store has: event ids that commit in id order across
connections (out-of-order commits on purpose), the URL's password kept out of errors,
a lost connection made again, and the SQL dialect it speaks."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import psycopg
import pytest
from helpers import eventually, new_task

import storage_pg
from storage import TaskStore, _append_event, _Txn, isoformat, utcnow


@pytest.fixture
def store_kind() -> str:
    """Every test here is about PostgreSQL (conftest's fixtures make its database)."""
    return "postgres"


def append(db, user: str, note: str) -> int:
    """One event appended by ``db``'s open transaction; its id."""
    return _append_event(_Txn(db, isoformat(utcnow())), None, user, "note", {"n": note}).id


async def test_without_the_write_lock_a_later_id_can_commit_first(
        database_url: str, open_test_store) -> None:
    """The hazard the lock exists for, made on purpose: two transactions, the later id
    commits first, and a reader then sees 11 without 10."""
    store: TaskStore = await open_test_store()
    await store.add_user("alice")
    first, second = storage_pg.connect(database_url), storage_pg.connect(database_url)
    try:
        first.raw.execute("BEGIN")
        early = append(first, "alice", "early")
        second.raw.execute("BEGIN")
        late = append(second, "alice", "late")
        second.raw.execute("COMMIT")
        assert late > early
        seen = [e.id for e in await store.events_after(0, user_id="alice")]
        assert late in seen and early not in seen
        first.raw.execute("COMMIT")
    finally:
        first.raw.close()
        second.raw.close()


async def test_out_of_order_commit_cannot_hide_an_earlier_event(
        database_url: str, open_test_store) -> None:
    """The store's transactions: the second cannot take an id until the first commits,
    so a reader (an SSE replay, a tailing process) that saw the later id saw the earlier."""
    store: TaskStore = await open_test_store()
    await store.add_user("alice")
    delivered: list[int] = []
    store.add_listener(lambda event: delivered.append(event.id))
    first, second = storage_pg.connect(database_url), storage_pg.connect(database_url)
    later: list[int] = []

    def second_transaction() -> None:
        storage_pg.begin_write(second)  # waits for the first's COMMIT
        later.append(append(second, "alice", "late"))
        second.raw.execute("COMMIT")

    try:
        storage_pg.begin_write(first)
        early = append(first, "alice", "early")
        racer = threading.Thread(target=second_transaction)
        racer.start()
        racer.join(0.5)
        # The second transaction is still waiting: it has no id and nothing committed.
        assert racer.is_alive() and later == []
        assert await store.events_after(0, user_id="alice") == []
        first.raw.execute("COMMIT")
        racer.join(30)
        assert not racer.is_alive()
    finally:
        first.raw.close()
        second.raw.close()
    assert later[0] > early
    assert [e.id for e in await store.events_after(0, user_id="alice")] == [early, later[0]]
    await store.catch_up()  # what the LISTEN wake-up does in another process
    assert delivered == [early, later[0]]


async def test_event_ids_given_by_two_writers_follow_the_sequence(
        database_url: str, open_test_store) -> None:
    """The writer gives event ids itself (it holds the lock) and moves the sequence on
    with its COMMIT: two stores writing in turn never give an id twice, and a plain
    INSERT afterwards (nextval) takes the next id."""
    a: TaskStore = await open_test_store()
    b: TaskStore = await open_test_store()
    await a.add_user("alice", 0)
    await b.add_user("bob", 0)
    for n in range(1, 6):
        await asyncio.gather(a.grant_credits("alice", n), b.grant_credits("bob", n))
    ids = [e.id for e in await a.events_after(0, user_id="alice")] + \
        [e.id for e in await a.events_after(0, user_id="bob")]
    assert len(ids) == len(set(ids)) == 10
    plain = storage_pg.connect(database_url)
    try:
        plain.raw.execute("BEGIN")
        later = append(plain, "alice", "plain")
        plain.raw.execute("COMMIT")
    finally:
        plain.raw.close()
    assert later > max(ids)
    await a.grant_credits("alice", 1)  # and the writer goes on above it
    assert (await a.events_after(later, user_id="alice"))[0].id > later


async def test_a_queued_statement_that_fails_fails_only_its_own_write(
        open_test_store) -> None:
    """Events are sent without waiting for their answer; one that fails (here a NOT NULL)
    is found with the batch's COMMIT, and the batch runs again with a savepoint per
    write, so only its own write fails."""
    store: TaskStore = await open_test_store()
    await store.add_user("alice", 0)

    def note(user: str | None):
        return lambda txn: _append_event(txn, None, user, "note", {"n": 1}).id  # type: ignore

    # Queued in one loop iteration: one batch, one transaction.
    futures = [store._writer.submit(note(u)) for u in ("alice", None, "alice")]
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert isinstance(results[1], sqlite3.IntegrityError)
    assert [e.id for e in await store.events_after(0, user_id="alice")][-2:] == \
        [results[0], results[2]]
    # Alone in its transaction, the same failure rolls it back and the writer goes on.
    with pytest.raises(sqlite3.IntegrityError):
        await store._writer.run(note(None))
    assert await store.grant_credits("alice", 1) == 1


async def test_a_claim_skips_a_task_another_connection_has_locked(open_test_store) -> None:
    """The claim chooses its row and takes it in one UPDATE; the choice still skips a
    row locked elsewhere (``FOR UPDATE SKIP LOCKED``) rather than waiting for it."""
    store = await open_test_store()
    await store.add_user("alice", 5)
    first, _ = await store.create_processing_task(new_task("alice"))
    second, _ = await store.create_processing_task(new_task("alice"))
    async with await psycopg.AsyncConnection.connect(store._url) as other:
        await other.execute("SELECT id FROM processing_tasks WHERE id = %s FOR UPDATE",
                            (first.id,))
        # Skipping, the claim ends while the lock is held; waiting for it, it would wait
        # as long as the lock is held: 30 s bounds that hang, it measures no speed.
        claimed = await asyncio.wait_for(store.claim_next_task("w", 60), 30)
        await other.rollback()
    assert claimed is not None and claimed.id == second.id


async def test_a_completion_is_two_round_trips_and_a_refunding_failure_three(
        open_test_store, monkeypatch) -> None:
    """What no write reads back goes with the next statement that is answered: the kept
    bytes a result adds and a refunded hold are counters, sent with what follows."""
    store: TaskStore = await open_test_store()
    await store.add_user("alice", 5)
    tasks = [(await store.create_processing_task(new_task("alice", cost=2)))[0]
             for _ in range(2)]
    claimed = [await store.claim_next_task("w", 60) for _ in tasks]
    sent: list[str] = []
    execute = psycopg.Cursor.execute

    def counted(self, query, *args, **kwargs):  # the writer's (reads are async cursors)
        sent.append(str(query))
        return execute(self, query, *args, **kwargs)

    monkeypatch.setattr(psycopg.Cursor, "execute", counted)
    done = await store.complete_task(tasks[0].id, "r.txt", attempt=claimed[0].attempts,
                                     result_size=10)
    assert done is not None and len(sent) == 2
    sent.clear()
    failed = await store.fail_task(tasks[1].id, "boom", attempt=claimed[1].attempts)
    assert failed is not None and failed.credits_held == 0 and len(sent) == 3
    monkeypatch.undo()
    assert (await store.get_user("alice")).credits == 3
    assert (await store.get_user("alice")).storage_bytes == 2 * 3 + 10
    assert await store.balance_drift() == {}


async def test_the_writer_prepares_a_statement_once_and_executes_it_after(
        open_test_store) -> None:
    """A write's statements go as EXECUTEs of statements the writer PREPAREd on its
    connection the first time: PostgreSQL parses and plans the progress update once
    for the six sent here."""
    store: TaskStore = await open_test_store()
    await store.add_user("alice", 1)
    await store.create_processing_task(new_task("alice"))
    claimed = await store.claim_next_task("w", 60)
    assert claimed is not None
    for progress in range(6):
        assert await store.update_task_status(claimed.id, claimed.attempts,
                                              progress=progress, message="working")

    def prepared(txn: _Txn) -> list[tuple[str, int]]:
        return [(r[0], r[1]) for r in txn.db.execute(
            "SELECT statement, generic_plans + custom_plans FROM pg_prepared_statements"
            " WHERE from_sql").fetchall()]

    runs = [n for statement, n in await store._writer.run(prepared)
            if "SET progress = GREATEST(progress, $1)" in statement]
    assert runs == [6]


async def test_the_writer_keeps_at_most_max_prepared_statements(open_test_store,
                                                                monkeypatch) -> None:
    """Texts made with lists of any length could prepare without end: past the cap a
    statement goes with its values inlined, as before."""
    monkeypatch.setattr(storage_pg, "MAX_PREPARED", 3)
    store: TaskStore = await open_test_store()
    await store.add_user("alice", 5)
    task, _ = await store.create_processing_task(new_task("alice", cost=2))
    await store.cancel_task(task.id, "alice")
    assert (await store.get_user("alice")).credits == 5
    count = await store._writer.run(lambda txn: txn.db.execute(
        "SELECT count(*) FROM pg_prepared_statements WHERE from_sql").fetchone()[0])
    assert count == 3


async def test_a_failed_message_leaves_the_writer_knowing_what_is_prepared(
        open_test_store) -> None:
    """A message runs its statements in order up to the first that fails: a PREPARE
    before it stands, one after it never ran; a write that fails before its message
    goes sends none. The writes after neither EXECUTE a statement that was never
    prepared nor PREPARE one twice."""
    store: TaskStore = await open_test_store()
    await store.add_user("alice", 0)

    def never_sent(txn: _Txn) -> None:
        _append_event(txn, None, "alice", "note", {"n": 0})  # queued with its PREPARE
        raise RuntimeError("the write gives up before anything is sent")

    with pytest.raises(RuntimeError):
        await store._writer.run(never_sent)

    def add_one(value: int):
        return lambda txn: txn.db.execute("SELECT ? + 1 AS n", (value,)).fetchone()[0]

    def fails(txn: _Txn) -> int:
        # The store's first event sent: its PREPARE goes, then its EXECUTE fails (NOT NULL);
        # the statement after, with its PREPARE, is in the same message and never runs.
        _append_event(txn, None, None, "note", {"n": 1})  # type: ignore[arg-type]
        return add_one(1)(txn)

    with pytest.raises(sqlite3.IntegrityError):
        await store._writer.run(fails)
    assert await store._writer.run(add_one(2)) == 3  # prepared now, not before
    assert await store.grant_credits("alice", 1) == 1  # its event's statement: prepared before


async def test_a_notification_wakes_another_process_store(open_test_store) -> None:
    """Two stores (two processes' worth): the one that did not write hears of it."""
    writer: TaskStore = await open_test_store()
    reader: TaskStore = await open_test_store()
    got = []
    reader.add_listener(got.append)
    await writer.add_user("alice", 3)
    task, _ = await writer.create_processing_task(new_task("alice", cost=1))
    await eventually(lambda: any(e.task_id == task.id for e in got),
                     "the other store hears of the new task")
    assert [e.id for e in got] == sorted(e.id for e in got)


async def test_only_another_stores_commits_make_a_store_look(database_url: str) -> None:
    """Every commit with events notifies, and PostgreSQL tells the sender's own listener
    too: a store drops its own notifications (it handed those events on as it committed)
    and looks only for another store's. The poll is an hour here, so only a
    notification can make it look."""
    one, other = [await storage_pg.PgTaskStore.open_url(database_url, watch_seconds=3600)
                  for _ in range(2)]
    try:
        looks: list[int] = []

        async def looked() -> None:
            looks.append(1)

        one.on_foreign_commit(looked)
        await eventually(lambda: looks, "the first look, as it starts to listen")
        looks.clear()
        await one.add_user("alice", 0)
        for _ in range(5):
            await one.grant_credits("alice", 1)
        await other.grant_credits("alice", 1)  # heard after the five, in commit order
        await eventually(lambda: looks, "a look for the other store's commit")
        assert len(looks) == 1
    finally:
        await one.close()
        await other.close()


async def test_a_dropped_connection_is_made_again(database_url: str, open_test_store) -> None:
    """Every connection of the store killed by the server: writes, reads and the
    listening connection come back, and no write is refused for it."""
    store: TaskStore = await open_test_store()
    other: TaskStore = await open_test_store()
    heard: list[int] = []
    store.add_listener(lambda event: heard.append(event.id))
    await store.add_user("alice", 1)
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE datname = current_database() AND pid <> pg_backend_pid()")
    await store.grant_credits("alice", 1)  # its connection died idle: a new one runs it
    assert (await store.get_user("alice")).credits == 2
    assert await store.balance_drift() == {}
    # Another process's event still reaches this store's listener (LISTEN made again,
    # or the poll): the connection it listened on was killed too.
    before = len(heard)
    await other.create_processing_task(new_task("alice", cost=1))
    await eventually(lambda: len(heard) > before, "the listener hears the other store again")


async def test_reads_on_pooled_connections_the_server_dropped_are_answered(
        database_url: str, open_test_store) -> None:
    """The pool does not test a connection before lending it (a round trip per read):
    a read that meets a dead one tests the idle ones and reads once more."""
    store: TaskStore = await open_test_store()
    await store.add_user("alice", 1)
    # Several readers at once, so that the pool holds several connections.
    await asyncio.gather(*(store.get_user("alice") for _ in range(8)))
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE datname = current_database() AND pid <> pg_backend_pid()")
    users = await asyncio.gather(*(store.get_user("alice") for _ in range(8)))
    assert [u.credits if u else None for u in users] == [1] * 8


def test_backup_of_a_postgresql_store_points_to_pg_dump(tmp_path: Path,
                                                        database_url: str) -> None:
    env = {**os.environ, "ZHIYI_DATABASE_URL": database_url}
    done = subprocess.run(
        [sys.executable, "-m", "zhiyi_server", "backup", str(tmp_path / "copy"),
         "--data", str(tmp_path / "data")], env=env, capture_output=True, text=True,
        timeout=60)
    assert done.returncode == 1
    assert "pg_dump" in done.stderr and "--files-only" in done.stderr
    assert not (tmp_path / "copy").exists()


def test_unreachable_database_is_one_line_without_the_password(tmp_path: Path) -> None:
    env = {**os.environ, "ZHIYI_DATABASE_URL": "postgresql://bob:s3cret@127.0.0.1:1/x"}
    done = subprocess.run(
        [sys.executable, "-m", "zhiyi_server", "serve", "--data", str(tmp_path), "--port", "0"],
        env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "postgresql://bob:***@127.0.0.1:1/x" in lines[0] and "s3cret" not in done.stderr


@pytest.mark.parametrize(("sqlite", "postgres"), [
    ("SELECT MAX(a, ?) FROM t", "SELECT GREATEST(a, %s) FROM t"),
    ("SELECT MAX(id) FROM t", "SELECT MAX(id) FROM t"),
    ("UPDATE t SET n = MAX(MIN(a, 1), 0)", "UPDATE t SET n = GREATEST(LEAST(a, 1), 0)"),
    ("SELECT 1 WHERE x IN ()", "SELECT 1 WHERE x IN (SELECT NULL WHERE FALSE)"),
    ("SELECT '%' || ?", "SELECT '%%' || %s"),
])
def test_dialect(sqlite: str, postgres: str) -> None:
    assert storage_pg.pg_sql(sqlite) == postgres


class CuttableProxy:
    """A TCP relay on loopback to the PostgreSQL server that a test can cut, as a network
    or a PostgreSQL failure would (the shared server itself must keep running)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def cut(self) -> None:
        """Refuse new connections and drop the open ones."""
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.transport.abort()
        await self.server.wait_closed()


async def test_postgresql_lost_mid_run_answers_503_store_unavailable(
        database_url: str, aiohttp_client, config) -> None:
    from urllib.parse import urlsplit

    from helpers import add_user

    from zhiyi_server import create_app

    parts = urlsplit(database_url)
    proxy = CuttableProxy(parts.port or 5432)
    port = await proxy.start()
    via_proxy = database_url.replace(f":{parts.port}/", f":{port}/")
    settings = {**config.__dict__, "database_url": via_proxy, "worker_concurrency": 0}
    client = await aiohttp_client(create_app(type(config)(**settings)))
    headers = await add_user(client, "alice", 10)
    assert (await client.get("/api/me", headers=headers)).status == 200
    await proxy.cut()
    for path in ("/api/me", "/api/tasks"):
        resp = await client.get(path, headers=headers)
        assert resp.status == 503, (path, await resp.text())
        body = await resp.json()
        assert body["code"] == "store_unavailable" and body["success"] is False


def test_every_schema_step_after_the_baseline_has_a_postgresql_step() -> None:
    """A new storage.MIGRATIONS step needs its PostgreSQL twin, or older PostgreSQL
    databases could not move forward."""
    from storage import SCHEMA_VERSION

    assert SCHEMA_VERSION >= storage_pg.PG_BASELINE
    assert set(range(storage_pg.PG_BASELINE + 1, SCHEMA_VERSION + 1)) <= set(
        storage_pg.PG_MIGRATIONS)


async def test_a_newer_postgresql_database_is_refused(database_url: str,
                                                      open_test_store) -> None:
    from storage import SCHEMA_VERSION, StoreError

    store = await open_test_store()
    await store.close()
    with psycopg.connect(database_url, autocommit=True) as db:
        db.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreError, match="newer than this Zhiyi"):
        await open_test_store()


async def test_a_version_8_postgresql_database_moves_forward(database_url: str,
                                                             open_test_store) -> None:
    """PG_MIGRATIONS[9]: each user's kept files summed into the running total."""
    store = await open_test_store()
    await store.add_user("alice", 10)
    for _ in range(2):
        await store.create_processing_task(new_task("alice"))
    await store.close()
    with psycopg.connect(database_url, autocommit=True) as db:  # as version 8 left it
        db.execute("ALTER TABLE users DROP COLUMN storage_bytes")
        db.execute("DROP INDEX idx_tasks_user_status")
        db.execute("UPDATE schema_version SET version = 8")
    store = await open_test_store()
    assert await store.storage_used("alice") == 2 * new_task("alice").file_size
    assert await store.storage_drift() == {}


async def test_a_killed_listening_connection_listens_again(database_url: str) -> None:
    """The poll is an hour here: after the server kills every connection, only LISTEN
    made again on a new connection can tell this store of another store's commit."""
    one, other = [await storage_pg.PgTaskStore.open_url(database_url, watch_seconds=3600)
                  for _ in range(2)]
    try:
        heard: list[int] = []
        one.add_listener(lambda event: heard.append(event.id))
        await other.add_user("alice", 5)
        await other.create_processing_task(new_task("alice", cost=1))
        await eventually(lambda: heard, "the first event, heard before the kill")
        with psycopg.connect(database_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        before = len(heard)
        await other.create_processing_task(new_task("alice", cost=1))
        await eventually(lambda: len(heard) > before,
                         "the listener, connected again, hears the other store")
    finally:
        await one.close()
        await other.close()
