"""The SQLite store: users, tokens, credits, tasks and their durable event log.

One writer connection (WAL, ``BEGIN IMMEDIATE``, short transactions) and one
reader connection. Every state change is one transaction that also appends its
``task_events`` row; after the commit the event is handed to the listener (the
SSE hub), so what clients are pushed is always what the database holds.

The write functions and the store's methods are here; the writer thread that batches
them is group_writer.py, and the errors and row values both use are store_model.py
(re-exported here). This module knows nothing of HTTP or of processors.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiosqlite

import messages
from group_writer import GroupWriter, WriteOp, WriterThread, _Txn
from store_model import (
    ACTIVE_STATUSES,
    FINAL_STATUSES,
    AmbiguousTokenPrefix,
    Credential,
    Event,
    FilesExpired,
    HealthFigures,
    InsufficientCredits,
    InvalidTransition,
    LedgerEntry,
    NewTask,
    SQLiteTooOld,
    StorageQuotaExceeded,
    StoreError,
    StoreFull,
    StoreUnavailable,
    StreamStart,
    Task,
    TaskNotFound,
    TaskStatus,
    TokenInfo,
    TooManyActiveTasks,
    User,
    UserExists,
    UserNotFound,
    WriterStopped,
    _event_from_row,
    hash_token,
    isoformat,
    named_sqlite_error,
    parse_time,
    utcnow,
)
from translation_memory import Entry, Glossary, Scope

__all__ = [
    "SCHEMA_VERSION",
    "AmbiguousTokenPrefix",
    "Credential",
    "Event",
    "FilesExpired",
    "GroupWriter",
    "HealthFigures",
    "InsufficientCredits",
    "InvalidTransition",
    "LedgerEntry",
    "NewTask",
    "SQLiteTooOld",
    "StorageQuotaExceeded",
    "StoreError",
    "StoreFull",
    "StoreUnavailable",
    "StreamStart",
    "Task",
    "TaskNotFound",
    "TaskStatus",
    "TaskStore",
    "TokenInfo",
    "TooManyActiveTasks",
    "User",
    "UserExists",
    "UserNotFound",
    "WriterStopped",
    "WriterThread",
    "hash_token",
    "isoformat",
    "open_store",
    "parse_time",
    "utcnow",
]

logger = logging.getLogger(__name__)

SCHEMA_PATH_CANDIDATES = (
    Path(__file__).with_name("schema.sql"),
    Path(__file__).parent / "zhiyi_resources" / "schema.sql",
)

#: Steps that move an older database forward: version -> SQL run to reach it.
#: Version 1 is the first released schema; schema.sql always is the newest.
MIGRATIONS: dict[int, str] = {
    2: """
        ALTER TABLE api_tokens ADD COLUMN kind TEXT NOT NULL DEFAULT 'api';
        ALTER TABLE processing_tasks ADD COLUMN stage TEXT;
        ALTER TABLE processing_tasks ADD COLUMN eta_seconds REAL;
        ALTER TABLE processing_tasks ADD COLUMN checkpoint TEXT;
        ALTER TABLE processing_tasks ADD COLUMN external_deadline TEXT;
        ALTER TABLE processing_tasks ADD COLUMN files_expired INTEGER NOT NULL DEFAULT 0;
        CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    3: """
        CREATE TABLE IF NOT EXISTS translation_memory (
            user_id      TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            source_lang  TEXT NOT NULL,
            target_lang  TEXT NOT NULL,
            engine       TEXT NOT NULL,
            source_key   TEXT NOT NULL,
            source_text  TEXT NOT NULL,
            target_text  TEXT NOT NULL,
            created_at   TEXT NOT NULL,
            PRIMARY KEY (user_id, source_lang, target_lang, engine, source_key)
        );
    """,
    4: """
        CREATE TABLE IF NOT EXISTS glossaries (
            user_id      TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            name         TEXT NOT NULL,
            source_lang  TEXT NOT NULL,
            target_lang  TEXT NOT NULL,
            terms        TEXT NOT NULL,
            created_at   TEXT NOT NULL,
            PRIMARY KEY (user_id, name)
        );
    """,
    5: """
        ALTER TABLE users ADD COLUMN disabled_at TEXT;
        ALTER TABLE api_tokens ADD COLUMN token_prefix TEXT;
        ALTER TABLE api_tokens ADD COLUMN expires_at TEXT;
        ALTER TABLE api_tokens ADD COLUMN last_used_at TEXT;
        CREATE INDEX IF NOT EXISTS idx_tokens_user ON api_tokens (user_id);
        UPDATE api_tokens SET expires_at = strftime('%Y-%m-%dT%H:%M:%fZ', created_at, '+30 days')
            WHERE kind = 'session';
        ALTER TABLE processing_tasks ADD COLUMN result_size INTEGER NOT NULL DEFAULT 0;
    """,
    6: """
        ALTER TABLE users ADD COLUMN tasks_made INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE processing_tasks ADD COLUMN user_task_no INTEGER;
        UPDATE processing_tasks SET user_task_no = (
            SELECT COUNT(*) FROM processing_tasks AS earlier
            WHERE earlier.user_id = processing_tasks.user_id AND earlier.id <= processing_tasks.id);
        UPDATE users SET tasks_made = (
            SELECT COALESCE(MAX(user_task_no), 0) FROM processing_tasks WHERE user_id = users.id);
    """,
    7: """
        ALTER TABLE users ADD COLUMN is_admin INTEGER NOT NULL DEFAULT 0;
    """,
    8: """
        ALTER TABLE processing_tasks ADD COLUMN detected_lang TEXT;
    """,
    9: """
        ALTER TABLE users ADD COLUMN storage_bytes INTEGER NOT NULL DEFAULT 0;
        UPDATE users SET storage_bytes = (
            SELECT COALESCE(SUM(file_size + result_size), 0) FROM processing_tasks
            WHERE user_id = users.id AND files_expired = 0);
        CREATE INDEX IF NOT EXISTS idx_tasks_user_status ON processing_tasks (user_id, status);
    """,
}
SCHEMA_VERSION = max(MIGRATIONS)


def _user(row: Any) -> User:
    values = dict(row)
    values["is_admin"] = bool(values.get("is_admin"))
    return User(**values)


EventListener = Callable[[Event], None]
ChangeCallback = Callable[[], Awaitable[None]]
#: how often a store looks for commits of other processes (``PRAGMA data_version``)
WATCH_SECONDS = 0.05
CATCH_UP_PAGE = 1000


def default_result_url(task_id: int) -> str:
    return f"/api/tasks/{task_id}/result"


class _Poked(asyncio.DatagramProtocol):
    def __init__(self, poked: asyncio.Event) -> None:
        self.poked = poked

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.poked.set()


class WakePeers:
    """Loopback UDP pings between the processes of one host that share a database file.

    A watching store binds ``127.0.0.1:<any port>`` and lists the port in
    ``meta`` (key ``wake:<host>:<pid>:<nonce>``); after each of its commits a
    store pings the ports listed for its host, so the other processes look at
    once instead of at their next poll. Only a hint: a lost ping costs one
    watch period, and processes on other hosts rely on the poll.
    """

    def __init__(self) -> None:
        self.poked = asyncio.Event()
        self.key = f"wake:{HOST}:{os.getpid()}:{secrets.token_hex(4)}"
        self.ports: list[int] = []
        self._own_port: int | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._sender: socket.socket | None = None
        self._scheduled = False

    async def bind(self) -> int:
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: _Poked(self.poked), local_addr=("127.0.0.1", 0))
        self._own_port = self._transport.get_extra_info("sockname")[1]
        self._sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sender.setblocking(False)
        return self._own_port

    def set_peers(self, ports: Iterable[int]) -> None:
        self.ports = [p for p in ports if p != self._own_port]

    def ping_soon(self) -> None:
        """Ping every peer once, after whatever else this loop iteration commits."""
        if self.ports and self._sender is not None and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._ping)

    def _ping(self) -> None:
        self._scheduled = False
        for port in self.ports:
            try:
                assert self._sender is not None
                self._sender.sendto(b"!", ("127.0.0.1", port))
            except OSError:  # a peer gone meanwhile, or a full buffer: the poll covers it
                pass

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        if self._sender is not None:
            self._sender.close()


HOST = socket.gethostname()
#: how often a watching store re-reads which processes of its host to ping
PEER_REFRESH_SECONDS = 1.0
#: the shortest time between two looks at the database, however many pings arrive
MIN_LOOK_SECONDS = 0.002


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class TaskStore:
    """The whole database behind one object. Open with :meth:`open`."""

    def __init__(self, path: Path, *, clock: Callable[[], datetime] = utcnow,
                 watch_seconds: float = WATCH_SECONDS) -> None:
        self._path = path
        self._clock = clock
        self._listeners: list[EventListener] = []
        #: events are handed to listeners once each, in id order: this is the last one
        self._delivered_through = 0
        self._writer = GroupWriter(path, clock, self._own_commit, lambda: self._delivered_through,
                                   connect=_open_writer, last_event_id=_last_event_id)
        self._wake = WakePeers()
        self._watch_seconds = watch_seconds
        self._watcher: asyncio.Task[None] | None = None
        self._change_callbacks: list[ChangeCallback] = []
        self._reader: aiosqlite.Connection | None = None
        #: point reads on the loop's own thread (see :meth:`_fetch_point`), and that thread
        self._point_reader: sqlite3.Connection | None = None
        self._point_thread: int | None = None
        #: how completed events name their result's URL (set by the server to its route)
        self.result_url: Callable[[int], str] = default_result_url

    # ---------------------------------------------------------------- lifetime
    @classmethod
    async def open(cls, path: Path | str, *, clock: Callable[[], datetime] = utcnow,
                   watch_seconds: float = WATCH_SECONDS) -> TaskStore:
        """Open (creating or migrating) the database file at ``path``."""
        check_sqlite_version()
        path = Path(path)
        _make_private_file(path)
        store = cls(path, clock=clock, watch_seconds=watch_seconds)
        try:
            await store._writer.start()
            store._delivered_through = store._writer.start_event_id
            store._reader = await _connect_reader(path)
            store._point_reader = _connect_point_reader(path)
            store._point_thread = threading.get_ident()
        except BaseException:
            await store.close()
            raise
        return store

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
            self._watcher = None
            try:
                await self._write(lambda txn: txn.db.execute(
                    "DELETE FROM meta WHERE key = ?", (self._wake.key,)))
            except StoreError as e:
                logger.warning("could not unlist this process's wake-up port: %s", e)
        self._wake.close()
        if self._point_reader is not None:
            self._point_reader.close()
            self._point_reader = None
        if self._reader is not None:
            await self._reader.close()
        await self._writer.close()

    def add_listener(self, listener: EventListener) -> None:
        """Call ``listener(event)`` for every event committed from now on, in id order.

        Events written by other processes on the same file are included: the
        store then watches the file for their commits (see :meth:`_watch`).
        """
        self._listeners.append(listener)
        self._start_watching()

    def on_foreign_commit(self, callback: ChangeCallback) -> None:
        """Await ``callback()`` soon after another process commits to the database.

        Workers use it to see new tasks and cancels made through other processes.
        """
        self._change_callbacks.append(callback)
        self._start_watching()

    def remove_foreign_commit(self, callback: ChangeCallback) -> None:
        if callback in self._change_callbacks:
            self._change_callbacks.remove(callback)

    def _start_watching(self) -> None:
        if self._watcher is None and self._reader is not None:
            self._watcher = asyncio.get_running_loop().create_task(
                self._watch(), name="zhiyi-sqlite-watch")

    async def _watch(self) -> None:
        """Look for other processes' commits: ``PRAGMA data_version`` of the writer
        moves only when another connection commits. A look happens when a
        process of this host pings (see :class:`WakePeers`), and at the latest
        every ``watch_seconds``. Then the events they wrote are handed on and
        the change callbacks told."""
        loop = asyncio.get_running_loop()
        await self._register_wake_port()
        # No baseline: the first look always catches up, so a commit made between
        # open() and this line is not missed.
        version: int | None = None
        next_refresh = next_look = 0.0
        while True:
            try:
                if loop.time() >= next_refresh:
                    next_refresh = loop.time() + PEER_REFRESH_SECONDS
                    await self._refresh_wake_peers()
            except Exception:
                logger.exception("reading which processes to wake failed")
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a
                # cancellation that arrives as the ping does, and this loop would go on
                # after close() cancelled it (close would wait for ever).
                async with asyncio.timeout(max(0.0, min(next_look, next_refresh) - loop.time())):
                    await self._wake.poked.wait()
            except TimeoutError:
                if loop.time() < next_look:
                    continue  # only the peer list was due
            self._wake.poked.clear()
            next_look = loop.time() + self._watch_seconds
            try:
                current = await self._writer.data_version()
                if current != version:
                    version = current
                    await self._foreign_commit()
            except Exception:
                logger.exception("watching the database for other processes' commits failed")
            await asyncio.sleep(MIN_LOOK_SECONDS)

    async def _foreign_commit(self) -> None:
        # (Tokens need nothing here: they are read from the database on every request.)
        if self._listeners:
            await self.catch_up()
        for callback in list(self._change_callbacks):
            await callback()

    async def _register_wake_port(self) -> None:
        """List this process's ping port; unlist ports of this host's dead processes."""
        port = await self._wake.bind()

        def _op(txn: _Txn) -> None:
            for row in txn.db.execute("SELECT key FROM meta WHERE key LIKE ?",
                                      (f"wake:{HOST}:%",)).fetchall():
                pid = row["key"].split(":")[2]
                if pid.isdigit() and not _pid_alive(int(pid)):
                    txn.db.execute("DELETE FROM meta WHERE key = ?", (row["key"],))
            txn.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                           (self._wake.key, str(port)))
        await self._write(_op)

    async def _refresh_wake_peers(self) -> None:
        rows = await self._fetchall("SELECT value FROM meta WHERE key LIKE ?",
                                    (f"wake:{HOST}:%",))
        self._wake.set_peers(int(r["value"]) for r in rows)

    async def catch_up(self) -> None:
        """Hand listeners every committed event they have not had yet, in id order.

        One writer at a time means ids commit in order, so everything above
        the last delivered id that a read sees is a gap-free run.
        """
        while True:
            rows = await self._fetchall(
                "SELECT * FROM task_events WHERE id > ? ORDER BY id LIMIT ?",
                (self._delivered_through, CATCH_UP_PAGE))
            self._publish([_event_from_row(r) for r in rows])
            if len(rows) < CATCH_UP_PAGE:
                return

    def remove_listener(self, listener: EventListener) -> None:
        self._listeners.remove(listener)

    def now(self) -> datetime:
        return self._clock()

    async def _write(self, op: WriteOp) -> Any:
        """Run ``op`` in a write transaction; its events are published after COMMIT."""
        return await self._writer.run(op)

    def _own_commit(self, events: list[Event]) -> None:
        self._publish(events)
        self._wake.ping_soon()  # other processes of this host look now, not at their poll

    def _publish(self, events: list[Event]) -> None:
        for event in events:
            # Our own commits and the tailer can both bring an event: once each, in order.
            if event.id <= self._delivered_through:
                continue
            self._delivered_through = event.id
            for listener in self._listeners:
                try:
                    listener(event)
                except Exception:
                    logger.exception("event listener failed for event %s", event.id)

    async def _fetchall(self, sql: str, args: Iterable[Any] = ()) -> list[sqlite3.Row]:
        # One hop that runs the statement to its end: a cursor left open between
        # awaits would hold a read transaction, and other coroutines' reads on
        # this connection would then see that old snapshot.
        assert self._reader is not None
        try:
            return list(await self._reader.execute_fetchall(sql, tuple(args)))
        except sqlite3.OperationalError as e:
            raise named_sqlite_error(e) from e

    async def _fetchone(self, sql: str, args: Iterable[Any] = ()) -> sqlite3.Row | None:
        rows = await self._fetchall(sql, args)
        return rows[0] if rows else None

    async def _fetch_point(self, sql: str, args: Iterable[Any] = ()) -> sqlite3.Row | None:
        """The first row of :meth:`_fetch_keyed`."""
        rows = await self._fetch_keyed(sql, args)
        return rows[0] if rows else None

    async def _fetch_keyed(self, sql: str, args: Iterable[Any] = ()) -> list[sqlite3.Row]:
        """A read of a few rows by key (a token, a task), without a hop to the reader thread.

        Each hop costs a thread's and the loop's wake-up, more than such a read itself
        (tens of microseconds, pages in cache). A reader in WAL mode does not wait for the
        writer; its rare waits (recovery after a crash, a log being restarted) fail at once
        here (``busy_timeout`` 0), and the read then takes the reader thread like any other.
        Only for statements bounded by a key: anything that scans goes through
        :meth:`_fetchall`. Other stores (PostgreSQL) have no point reader.
        """
        db = self._point_reader
        if db is not None and threading.get_ident() == self._point_thread:
            try:
                return db.execute(sql, tuple(args)).fetchall()  # to the end: no open snapshot
            except sqlite3.OperationalError as e:
                logger.debug("a point read goes to the reader thread: %s", e)
        return await self._fetchall(sql, args)

    async def ping(self) -> None:
        await self._fetchone("SELECT 1")

    # ------------------------------------------------------------------ users
    async def add_user(self, user_id: str, credits: int = 0, *, admin: bool = False) -> User:
        """Create a user; the starting credits are a ``grant`` ledger entry."""
        def _op(txn: _Txn) -> Any:
            try:
                txn.db.execute(
                    "INSERT INTO users (id, credits, created_at, is_admin) VALUES (?, 0, ?, ?)",
                    (user_id, txn.now, int(admin)),
                )
            except sqlite3.IntegrityError as e:
                raise UserExists(user_id) from e
            if credits:
                _move_credits(txn, user_id, credits, "grant", None)

        await self._write(_op)
        user = await self.get_user(user_id)
        assert user is not None
        return user

    async def get_user(self, user_id: str) -> User | None:
        row = await self._fetchone("SELECT * FROM users WHERE id = ?", (user_id,))
        return _user(row) if row else None

    async def list_users(self) -> list[User]:
        return [_user(r) for r in await self._fetchall("SELECT * FROM users ORDER BY id")]

    async def set_user_admin(self, user_id: str, admin: bool) -> None:
        """Make the user an administrator, or not."""
        def _op(txn: _Txn) -> Any:
            changed = txn.db.execute("UPDATE users SET is_admin = ? WHERE id = ?",
                                     (int(admin), user_id)).rowcount
            if not changed:
                raise UserNotFound(user_id)

        await self._write(_op)

    async def user_usage(self) -> dict[str, tuple[int, int]]:
        """Per user: (tasks, credits spent net of refunds), for the admin page."""
        rows = await self._fetchall(
            "SELECT u.id, (SELECT COUNT(*) FROM processing_tasks t WHERE t.user_id = u.id),"
            " (SELECT COALESCE(-SUM(amount), 0) FROM credit_ledger l"
            "  WHERE l.user_id = u.id AND l.reason IN ('charge', 'refund'))"
            " FROM users u")
        return {r[0]: (int(r[1]), int(r[2])) for r in rows}

    async def grant_credits(self, user_id: str, amount: int) -> int:
        """Add (or with a negative amount take) credits; returns the new balance."""
        def _op(txn: _Txn) -> Any:
            if not _user_exists(txn.db, user_id):
                raise UserNotFound(user_id)
            balance = _move_credits(txn, user_id, amount, "grant", None)
            _append_event(
                txn, None, user_id, "notification",
                {"level": "info", "message": f"{amount:+d} credits", "credits": balance,
                 "code": "credits_granted", "params": {"amount": amount}},
            )
            return balance

        return await self._write(_op)

    async def set_user_disabled(self, user_id: str, disabled: bool) -> None:
        """Disable (no token of the user works) or enable again; tokens are kept."""
        def _op(txn: _Txn) -> Any:
            cursor = txn.db.execute(
                "UPDATE users SET disabled_at = ? WHERE id = ?",
                (txn.now if disabled else None, user_id),
            )
            if cursor.rowcount != 1:
                raise UserNotFound(user_id)
        await self._write(_op)

    async def issue_token(
        self, user_id: str, kind: str = "api", *, lifetime: timedelta | None = None,
        rotate: bool = False,
    ) -> str:
        """A new secret token for the user; only its hash and first characters are stored.

        ``lifetime`` makes it expire (sessions); ``rotate`` revokes every other
        token and session of the user in the same transaction.
        """
        token = ("zy_" if kind == "api" else "zs_") + secrets.token_urlsafe(32)

        def _op(txn: _Txn) -> Any:
            if not _user_exists(txn.db, user_id):
                raise UserNotFound(user_id)
            if rotate:
                txn.db.execute("DELETE FROM api_tokens WHERE user_id = ?", (user_id,))
            expires = (isoformat(parse_time(txn.now) + lifetime)
                       if lifetime is not None else None)
            txn.db.execute(
                """INSERT INTO api_tokens (token_hash, user_id, kind, created_at, token_prefix,
                   expires_at, last_used_at) VALUES (?,?,?,?,?,?,?)""",
                (hash_token(token), user_id, kind, txn.now, token[:TOKEN_PREFIX_LENGTH],
                 expires, txn.now if kind == "session" else None),
            )

        await self._write(_op)
        return token

    async def credential_for_token(self, token: str) -> Credential | None:
        """The token's credential if it is valid now: known, not expired, user not disabled.

        Read on every request, never cached, so a revocation by any process
        (or by ``zhiyi user revoke``) holds from its commit on.
        """
        row = await self._fetch_point(
            """SELECT t.user_id, t.token_hash, t.kind, t.expires_at, t.last_used_at
               FROM api_tokens t JOIN users u ON u.id = t.user_id
               WHERE t.token_hash = ? AND u.disabled_at IS NULL
               AND (t.expires_at IS NULL OR t.expires_at > ?)""",
            (hash_token(token), isoformat(self._clock())),
        )
        return Credential(**dict(row)) if row else None

    async def user_for_token(self, token: str) -> str | None:
        """The user of a valid token, or ``None``."""
        credential = await self.credential_for_token(token)
        return credential.user_id if credential else None

    async def valid_token_hashes(self, hashes: Iterable[str]) -> set[str]:
        """Which of these token hashes are still valid (open streams re-check theirs)."""
        wanted = list(dict.fromkeys(hashes))
        valid: set[str] = set()
        now = isoformat(self._clock())
        for start in range(0, len(wanted), 500):
            chunk = wanted[start:start + 500]
            rows = await self._fetchall(
                f"""SELECT t.token_hash FROM api_tokens t JOIN users u ON u.id = t.user_id
                    WHERE t.token_hash IN ({",".join("?" * len(chunk))})
                    AND u.disabled_at IS NULL AND (t.expires_at IS NULL OR t.expires_at > ?)""",
                (*chunk, now),
            )
            valid.update(r["token_hash"] for r in rows)
        return valid

    def queue_record_use(self, token_hash: str, session_lifetime: timedelta,
                         ) -> asyncio.Future[None]:
        """A token in use: remember when; a session now expires ``session_lifetime`` from now.

        Queued without waiting for the commit: bookkeeping must not hold up (or,
        with the database locked by another process, fail) the request that
        used the token. Callers write this at most about once an hour per token.
        """
        def _op(txn: _Txn) -> None:
            expires = isoformat(parse_time(txn.now) + session_lifetime)
            txn.db.execute(
                """UPDATE api_tokens SET last_used_at = ?,
                   expires_at = CASE WHEN kind = 'session' THEN ? ELSE expires_at END
                   WHERE token_hash = ?""",
                (txn.now, expires, token_hash),
            )
        return self._writer.submit(_op)

    async def revoke_token(self, token: str) -> str:
        """Revoke one token or session by its secret; returns its hash."""
        digest = hash_token(token)

        def _op(txn: _Txn) -> Any:
            txn.db.execute("DELETE FROM api_tokens WHERE token_hash = ?", (digest,))
        await self._write(_op)
        return digest

    async def revoke_tokens(self, user_id: str, prefix: str | None = None) -> int:
        """Revoke every token and session of the user, or the one starting with ``prefix``.

        Returns how many were revoked. A prefix that matches several tokens
        raises :class:`AmbiguousTokenPrefix` and revokes nothing.
        """
        def _op(txn: _Txn) -> Any:
            if not _user_exists(txn.db, user_id):
                raise UserNotFound(user_id)
            if prefix is None:
                return txn.db.execute(
                    "DELETE FROM api_tokens WHERE user_id = ?", (user_id,)).rowcount
            stored = prefix[:TOKEN_PREFIX_LENGTH]
            match = "user_id = ? AND substr(token_prefix, 1, ?) = ?"
            args = (user_id, len(stored), stored)
            matches = _scalar(txn.db, f"SELECT COUNT(*) FROM api_tokens WHERE {match}", args)
            if matches > 1:
                raise AmbiguousTokenPrefix(matches)
            return txn.db.execute(f"DELETE FROM api_tokens WHERE {match}", args).rowcount
        return await self._write(_op)

    async def list_tokens(self, user_id: str) -> list[TokenInfo]:
        """The user's tokens and sessions (expired sessions not yet forgotten included)."""
        if await self.get_user(user_id) is None:
            raise UserNotFound(user_id)
        rows = await self._fetchall(
            """SELECT token_prefix, kind, created_at, expires_at, last_used_at FROM api_tokens
               WHERE user_id = ? ORDER BY created_at, token_prefix""", (user_id,))
        return [TokenInfo(**dict(r)) for r in rows]

    async def delete_expired_sessions(self) -> int:
        """Forget sessions past their expiry (they no longer authenticate anyway)."""
        def _op(txn: _Txn) -> Any:
            return txn.db.execute(
                "DELETE FROM api_tokens WHERE expires_at IS NOT NULL AND expires_at <= ?",
                (txn.now,),
            ).rowcount
        return await self._write(_op)

    # ----------------------------------------------------------------- ledger
    async def get_ledger(
        self, user_id: str, *, limit: int = 50, cursor: int | None = None
    ) -> tuple[list[LedgerEntry], int | None]:
        """Newest first; ``cursor`` is the last id of the previous page."""
        rows = await self._fetchall(
            "SELECT * FROM credit_ledger WHERE user_id = ? AND id < ? ORDER BY id DESC LIMIT ?",
            (user_id, cursor if cursor is not None else 2**63 - 1, limit + 1),
        )
        entries = [LedgerEntry(**dict(r)) for r in rows[:limit]]
        return entries, (entries[-1].id if len(rows) > limit else None)

    async def balance_drift(self) -> dict[str, tuple[int, int]]:
        """Users whose balance differs from their ledger sum: ``{user: (balance, sum)}``."""
        rows = await self._fetchall(
            """SELECT u.id, u.credits, COALESCE(SUM(l.amount), 0) AS total
               FROM users u LEFT JOIN credit_ledger l ON l.user_id = u.id
               GROUP BY u.id HAVING u.credits != COALESCE(SUM(l.amount), 0)"""
        )
        return {r["id"]: (r["credits"], r["total"]) for r in rows}

    # ----------------------------------------------------- translation memory
    async def memory_summary(self, user_id: str,
                             scope: Scope | None = None) -> list[tuple[Scope, int]]:
        """How many segments the user's memory holds, per (source, target, engine).

        With ``scope``, that scope alone (a range of the primary key).
        """
        where, args = _memory_rows(user_id, scope)
        rows = await self._fetchall(
            f"""SELECT source_lang, target_lang, engine, COUNT(*) AS n FROM translation_memory
                WHERE {where} GROUP BY 1, 2, 3 ORDER BY 1, 2, 3""",
            args,
        )
        return [(Scope(r["source_lang"], r["target_lang"], r["engine"]), r["n"]) for r in rows]

    async def memory_holds(self, user_id: str, scope: Scope | None = None) -> bool:
        """Whether the user's memory holds any segment (of ``scope``).

        One row found by key, however large the memory: every translate create asks,
        where counting (``memory_summary``) grew with everything the user ever translated.
        """
        where, args = _memory_rows(user_id, scope)
        return await self._fetch_point(
            f"SELECT 1 FROM translation_memory WHERE {where} LIMIT 1", args) is not None

    async def memory_lookup(self, user_id: str, scope: Scope,
                            keys: Iterable[str]) -> dict[str, str]:
        """The remembered translations of those source keys: ``{key: translation}``."""
        found: dict[str, str] = {}
        unique = list(dict.fromkeys(keys))
        # A short document's few keys are a few primary-key probes: read on the loop's
        # thread, like a token; a long one's chunks of 500 go to the reader thread.
        fetch = self._fetch_keyed if len(unique) <= MEMORY_KEYS_READ_AT_ONCE else self._fetchall
        for start in range(0, len(unique), MEMORY_LOOKUP_CHUNK):
            chunk = unique[start:start + MEMORY_LOOKUP_CHUNK]
            rows = await fetch(
                f"""SELECT source_key, target_text FROM translation_memory
                    WHERE user_id = ? AND source_lang = ? AND target_lang = ? AND engine = ?
                    AND source_key IN ({", ".join("?" * len(chunk))})""",
                (user_id, scope.source, scope.target, scope.engine, *chunk),
            )
            found.update((r["source_key"], r["target_text"]) for r in rows)
        return found

    async def memory_remember(self, user_id: str, entries: Iterable[Entry]) -> int:
        """Remember (or update) translations; returns how many rows were written."""
        rows = [(user_id, e.source_lang, e.target_lang, e.engine, e.key, e.source, e.target)
                for e in entries]

        def _op(txn: _Txn) -> Any:
            txn.db.executemany(
                """INSERT INTO translation_memory (user_id, source_lang, target_lang, engine,
                   source_key, source_text, target_text, created_at)
                   VALUES (?,?,?,?,?,?,?, ?)
                   ON CONFLICT (user_id, source_lang, target_lang, engine, source_key)
                   DO UPDATE SET source_text = excluded.source_text,
                   target_text = excluded.target_text, created_at = excluded.created_at""",
                [(*row, txn.now) for row in rows],
            )
            return len(rows)
        return await self._write(_op) if rows else 0

    async def memory_entries(self, user_id: str, *, after: tuple[str, str, str, str] | None = None,
                             limit: int = 1000) -> list[tuple[tuple[str, str, str, str], Entry]]:
        """A page of the user's memory in key order: ``(key, entry)``; pass the last key on.

        Keyset paging over the primary key (plain SQL, no rowid: the PostgreSQL twin
        runs the same statement).
        """
        rows = await self._fetchall(
            """SELECT * FROM translation_memory WHERE user_id = ?
               AND (source_lang, target_lang, engine, source_key) > (?, ?, ?, ?)
               ORDER BY source_lang, target_lang, engine, source_key LIMIT ?""",
            (user_id, *(after or ("", "", "", "")), limit),
        )
        return [((r["source_lang"], r["target_lang"], r["engine"], r["source_key"]),
                 Entry(r["source_lang"], r["target_lang"], r["engine"], r["source_text"],
                       r["target_text"])) for r in rows]

    async def memory_clear(self, user_id: str, scope: Scope | None = None) -> int:
        """Forget the user's memory (or one scope of it); returns how many segments."""
        def _op(txn: _Txn) -> Any:
            sql, args = "DELETE FROM translation_memory WHERE user_id = ?", [user_id]
            if scope is not None:
                sql += " AND source_lang = ? AND target_lang = ? AND engine = ?"
                args += [scope.source, scope.target, scope.engine]
            return txn.db.execute(sql, args).rowcount
        return await self._write(_op)

    # -------------------------------------------------------------- glossaries
    async def glossary_put(self, user_id: str, glossary: Glossary) -> bool:
        """Store a glossary under its name (replacing one of that name); True if new."""
        def _op(txn: _Txn) -> Any:
            existed = _scalar(txn.db, "SELECT 1 FROM glossaries WHERE user_id = ? AND name = ?",
                              (user_id, glossary.name))
            txn.db.execute(
                """INSERT INTO glossaries (user_id, name, source_lang, target_lang, terms,
                   created_at) VALUES (?,?,?,?,?,?)
                   ON CONFLICT (user_id, name) DO UPDATE SET source_lang = excluded.source_lang,
                   target_lang = excluded.target_lang, terms = excluded.terms,
                   created_at = excluded.created_at""",
                (user_id, glossary.name, glossary.source_lang, glossary.target_lang,
                 json.dumps(glossary.terms, ensure_ascii=False), txn.now),
            )
            return not existed
        return await self._write(_op)

    async def glossaries(self, user_id: str, name: str | None = None) -> list[Glossary]:
        """The user's glossaries by name (or the one called ``name``)."""
        sql, args = "SELECT * FROM glossaries WHERE user_id = ?", [user_id]
        if name is not None:
            sql += " AND name = ?"
            args.append(name)
        rows = await self._fetchall(sql + " ORDER BY name", args)
        return [Glossary(r["name"], r["source_lang"], r["target_lang"],
                         [tuple(pair) for pair in json.loads(r["terms"])], r["created_at"])
                for r in rows]

    async def glossary_delete(self, user_id: str, name: str) -> bool:
        def _op(txn: _Txn) -> Any:
            return txn.db.execute("DELETE FROM glossaries WHERE user_id = ? AND name = ?",
                                  (user_id, name)).rowcount == 1
        return await self._write(_op)

    # ------------------------------------------------------------------ tasks
    async def create_processing_task(self, new: NewTask) -> tuple[Task, bool]:
        """Insert a pending task and charge its cost, in one transaction.

        Returns ``(task, created)``; with an ``idempotency_key`` already used
        by this user, the earlier task and ``False`` (nothing stored or charged).
        """
        if new.idempotency_key:
            earlier = await self.find_by_idempotency_key(new.user_id, new.idempotency_key)
            if earlier:
                return earlier, False
        try:
            return await self._insert_task(new), True
        except _IdempotentRace:
            earlier = await self.find_by_idempotency_key(new.user_id, new.idempotency_key or "")
            assert earlier is not None
            return earlier, False

    async def _insert_task(self, new: NewTask) -> Task:
        def _op(txn: _Txn) -> Any:
            # A counter on the user, not MAX()+1: numbers of deleted tasks are not reused.
            # The user's active tasks are counted by the same statement; a refusal below
            # comes after the update, which the failed write's rollback undoes.
            counted = txn.db.execute(
                """UPDATE users SET tasks_made = tasks_made + 1,
                   storage_bytes = storage_bytes + ? WHERE id = ?
                   RETURNING tasks_made, storage_bytes, (SELECT COUNT(*) FROM processing_tasks
                   WHERE user_id = ? AND status IN (?, ?))""",
                (new.file_size, new.user_id, new.user_id, *ACTIVE_STATUSES)).fetchone()
            if counted is None:
                raise UserNotFound(new.user_id)
            number, stored, active = counted
            if active >= new.max_active:
                raise TooManyActiveTasks(new.user_id)
            if new.max_storage and stored > new.max_storage:
                raise StorageQuotaExceeded(stored - new.file_size, new.file_size,
                                           new.max_storage)
            try:
                row = txn.db.execute(
                    """INSERT INTO processing_tasks (user_id, task_type, params, file_name,
                       file_size, file_path, credits_cost, credits_held, idempotency_key,
                       created_at, updated_at, status_message, user_task_no, detected_lang)
                       VALUES (?,?,?,?,?,?,?,?,?,?,?, 'waiting for a worker', ?, ?)
                       RETURNING *""",
                    (new.user_id, new.task_type, json.dumps(new.params), new.file_name,
                     new.file_size, new.file_path, new.credits_cost, new.credits_cost,
                     new.idempotency_key, txn.now, txn.now, number, new.detected_lang),
                ).fetchone()
            except sqlite3.IntegrityError as e:
                if new.idempotency_key and "idempotency_key" in str(e):
                    raise _IdempotentRace from e
                raise
            task = Task.from_row(row)
            _charge(txn, task, new.credits_cost)
            return self._status_event(txn, task)
        return await self._write(_op)

    async def find_by_idempotency_key(self, user_id: str, key: str) -> Task | None:
        row = await self._fetchone(
            "SELECT * FROM processing_tasks WHERE user_id = ? AND idempotency_key = ?",
            (user_id, key),
        )
        return Task.from_row(row) if row else None

    async def get_task_by_id(self, task_id: int, user_id: str | None = None) -> Task:
        """The task; scoped to ``user_id`` when given. Raises :class:`TaskNotFound`."""
        row = await self._fetchone("SELECT * FROM processing_tasks WHERE id = ?", (task_id,))
        if row is None or (user_id is not None and row["user_id"] != user_id):
            raise TaskNotFound(task_id)
        return Task.from_row(row)

    async def get_task_by_external_id(self, external_task_id: str) -> Task:
        row = await self._fetchone(
            "SELECT * FROM processing_tasks WHERE external_task_id = ?", (external_task_id,)
        )
        if row is None:
            raise TaskNotFound(external_task_id)
        return Task.from_row(row)

    async def get_user_tasks(
        self,
        user_id: str | None,
        *,
        status: TaskStatus | None = None,
        limit: int = 50,
        cursor: int | None = None,
    ) -> tuple[list[Task], int | None]:
        """Newest first; ``cursor`` is the last task id of the previous page.

        ``user_id`` None: every user's tasks (the admin API).
        """
        # CAST: PostgreSQL must know a parameter's type; SQLite does not mind.
        sql = ("SELECT * FROM processing_tasks"
               " WHERE (CAST(? AS TEXT) IS NULL OR user_id = ?) AND id < ?")
        args: list[Any] = [user_id, user_id, cursor if cursor is not None else 2**63 - 1]
        if status is not None:
            sql += " AND status = ?"
            args.append(status.value)
        rows = await self._fetchall(sql + " ORDER BY id DESC LIMIT ?", [*args, limit + 1])
        tasks = [Task.from_row(r) for r in rows[:limit]]
        return tasks, (tasks[-1].id if len(rows) > limit else None)

    async def storage_used(self, user_id: str) -> int:
        """Bytes of the user's kept files: originals and results not yet expired.

        Kept as a running total on the user (see ``_move_storage``): summing the user's
        tasks on every upload grew with their history (3 ms at 10,000 tasks).
        """
        row = await self._fetch_point("SELECT storage_bytes FROM users WHERE id = ?",
                                      (user_id,))
        return row[0] if row else 0

    async def storage_drift(self) -> dict[str, tuple[int, int]]:
        """Users whose running total differs from their tasks' files:
        ``{user: (total, sum)}``; empty when every change kept it (tests hold this)."""
        rows = await self._fetchall(
            """SELECT u.id, u.storage_bytes, COALESCE(SUM(t.file_size + t.result_size), 0)
               FROM users u LEFT JOIN processing_tasks t
               ON t.user_id = u.id AND t.files_expired = 0
               GROUP BY u.id, u.storage_bytes
               HAVING u.storage_bytes != COALESCE(SUM(t.file_size + t.result_size), 0)""")
        return {r[0]: (int(r[1]), int(r[2])) for r in rows}

    async def count_tasks(self) -> list[tuple[str, str, int]]:
        """``(task_type, status, count)`` for metrics."""
        rows = await self._fetchall(
            "SELECT task_type, status, COUNT(*) AS n FROM processing_tasks GROUP BY 1, 2"
        )
        return [(r["task_type"], r["status"], r["n"]) for r in rows]

    async def health_figures(self) -> HealthFigures:
        """What the alert rules watch, read from the database (so any process can export it)."""
        oldest = await self._fetchone(
            "SELECT MIN(COALESCE(run_after, created_at)) AS t FROM processing_tasks"
            " WHERE status = 'pending'")
        failed = await self._fetchall(
            "SELECT COALESCE(error_code, 'unknown') AS code, COUNT(*) AS n"
            " FROM processing_tasks WHERE status = 'failed' GROUP BY 1")
        waiting = 0.0
        if oldest is not None and oldest["t"] is not None:
            waiting = max(0.0, (self._clock() - parse_time(oldest["t"])).total_seconds())
        return HealthFigures(
            oldest_pending_seconds=waiting,
            failed_by_code={r["code"]: r["n"] for r in failed},
            drifting_users=len(await self.balance_drift()),
        )

    # --------------------------------------------------------- worker actions
    async def claim_next_task(self, owner: str, lease_seconds: float) -> Task | None:
        """Take the oldest runnable pending task: ``processing``, one more attempt, a lease."""
        def _op(txn: _Txn) -> Any:
            lease = isoformat(parse_time(txn.now) + timedelta(seconds=lease_seconds))
            row = txn.db.execute(
                f"""UPDATE processing_tasks SET status = 'processing', attempts = attempts + 1,
                   progress = 0, status_message = 'starting', stage = 'starting',
                   eta_seconds = NULL, run_after = NULL, lease_owner = ?, lease_until = ?,
                   started_at = COALESCE(started_at, ?), updated_at = ?
                   WHERE id = ({CLAIM_SQL}) RETURNING *""",
                (owner, lease, txn.now, txn.now, txn.now),
            ).fetchone()
            return None if row is None else self._status_event(txn, Task.from_row(row))
        return await self._write(_op)

    async def next_run_after(self) -> datetime | None:
        """When the earliest delayed pending task becomes runnable (for the worker's sleep)."""
        row = await self._fetchone(
            "SELECT MIN(run_after) AS t FROM processing_tasks WHERE status = 'pending'"
        )
        return parse_time(row["t"]) if row and row["t"] else None

    async def renew_lease(self, task_id: int, attempt: int, lease_seconds: float,
                          owner: str | None = None) -> bool:
        """Extend the running attempt's lease (only the holder's, when ``owner`` is given)."""
        def _op(txn: _Txn) -> Any:
            lease = isoformat(parse_time(txn.now) + timedelta(seconds=lease_seconds))
            cursor = txn.db.execute(
                """UPDATE processing_tasks SET lease_until = ?
                   WHERE id = ? AND attempts = ? AND status = 'processing'
                   AND (CAST(? AS TEXT) IS NULL OR lease_owner = ?)""",
                (lease, task_id, attempt, owner, owner),
            )
            return cursor.rowcount == 1
        return await self._write(_op)

    async def update_task_status(
        self,
        task_id: int,
        attempt: int,
        *,
        progress: int,
        message: str,
        stage: str | None = None,
        eta_seconds: float | None = None,
    ) -> bool:
        """Record progress of the running attempt; ``False`` if the task moved on."""
        return await asyncio.shield(self.queue_task_status(
            task_id, attempt, progress=progress, message=message, stage=stage,
            eta_seconds=eta_seconds))

    def queue_task_status(
        self,
        task_id: int,
        attempt: int,
        *,
        progress: int,
        message: str,
        stage: str | None = None,
        eta_seconds: float | None = None,
    ) -> asyncio.Future[bool]:
        """:meth:`update_task_status` without waiting for the commit.

        Writes commit in the order they were queued, so a processor may go on
        while its progress is being written; a later completion cannot overtake it.

        Progress never goes backwards within an attempt: a lower value keeps
        the higher one already stored.
        """
        progress = max(0, min(100, int(progress)))

        def _op(txn: _Txn) -> bool:
            # The hot path of every task: one statement returns what the event needs.
            row = txn.db.execute(
                """UPDATE processing_tasks SET progress = MAX(progress, ?), status_message = ?,
                   stage = COALESCE(?, stage), eta_seconds = ?, updated_at = ?
                   WHERE id = ? AND attempts = ? AND status = 'processing'
                   RETURNING user_id, progress, stage, attempts""",
                (progress, message, stage, eta_seconds, txn.now, task_id, attempt),
            ).fetchone()
            if row is None:
                return False
            _append_event(txn, task_id, row["user_id"], "status_update", _status_payload(
                task_id, TaskStatus.PROCESSING, row["progress"], message, row["stage"],
                eta_seconds, row["attempts"]))
            return True

        return self._writer.submit(_op)

    async def save_checkpoint(self, task_id: int, attempt: int, checkpoint: Any) -> bool:
        def _op(txn: _Txn) -> Any:
            cursor = txn.db.execute(
                """UPDATE processing_tasks SET checkpoint = ?
                   WHERE id = ? AND attempts = ? AND status = 'processing'""",
                (json.dumps(checkpoint), task_id, attempt),
            )
            return cursor.rowcount == 1
        return await self._write(_op)

    async def set_external(
        self, task_id: int, attempt: int, external_task_id: str, deadline: datetime
    ) -> Task | None:
        """The task now waits for an external service: no lease, a deadline instead."""
        def _op(txn: _Txn) -> Any:
            row = txn.db.execute(
                """UPDATE processing_tasks SET external_task_id = ?, external_deadline = ?,
                   lease_owner = NULL, lease_until = NULL, stage = 'waiting',
                   status_message = 'sent to the external service', updated_at = ?
                   WHERE id = ? AND attempts = ? AND status = 'processing' RETURNING *""",
                (external_task_id, isoformat(deadline), txn.now, task_id, attempt),
            ).fetchone()
            return None if row is None else self._status_event(txn, Task.from_row(row))
        return await self._write(_op)

    async def update_external_progress(
        self, task_id: int, progress: int, message: str
    ) -> Task | None:
        """A ``processing`` callback from the external service."""
        def _op(txn: _Txn) -> Any:
            row = txn.db.execute(
                """UPDATE processing_tasks SET progress = MAX(progress, ?), status_message = ?,
                   updated_at = ? WHERE id = ? AND status = 'processing' RETURNING *""",
                (max(0, min(100, int(progress))), message, txn.now, task_id),
            ).fetchone()
            return None if row is None else self._status_event(txn, Task.from_row(row))
        return await self._write(_op)

    async def complete_task(
        self, task_id: int, result_name: str, *, attempt: int | None = None,
        message: str = "completed",
        result_size: int = 0,
    ) -> Task | None:
        """Mark the task completed with its result; ``None`` if it was no longer running."""
        def _op(txn: _Txn) -> Any:
            row = txn.db.execute(
                f"""UPDATE processing_tasks SET status = 'completed', progress = 100,
                   status_message = ?, stage = 'done', eta_seconds = 0,
                   result_name = ?, result_size = ?, lease_owner = NULL, lease_until = NULL,
                   external_deadline = NULL, completed_at = ?, updated_at = ?
                   WHERE id = ? AND status = 'processing' {_attempt_clause(attempt)}
                   RETURNING *""",
                (message, result_name, result_size, txn.now, txn.now, task_id,
                 *_attempt_args(attempt)),
            ).fetchone()
            if row is None:
                return None
            _move_storage(txn, row["user_id"], result_size)
            return self._status_event(txn, Task.from_row(row))
        return await self._write(_op)

    async def fail_task(
        self,
        task_id: int,
        message: str,
        code: str = "processor_error",
        *,
        attempt: int | None = None,
    ) -> Task | None:
        """Fail a running (or pending) task and refund its credits exactly once."""
        def _op(txn: _Txn) -> Any:
            row = txn.db.execute(
                f"""UPDATE processing_tasks SET status = 'failed', error_message = ?,
                   error_code = ?, status_message = ?, eta_seconds = NULL, lease_owner = NULL,
                   lease_until = NULL, external_deadline = NULL, completed_at = ?, updated_at = ?
                   WHERE id = ? AND status IN ('pending', 'processing')
                   {_attempt_clause(attempt)} RETURNING *""",
                (message, code, message, txn.now, txn.now, task_id, *_attempt_args(attempt)),
            ).fetchone()
            if row is None:
                return None
            return self._status_event(txn, _refund(txn, Task.from_row(row)))
        return await self._write(_op)

    async def schedule_retry(
        self, task_id: int, attempt: int, delay_seconds: float, message: str
    ) -> Task | None:
        """After a transient error: back to ``pending`` until ``now + delay`` (no new charge)."""
        def _op(txn: _Txn) -> Any:
            run_after = isoformat(parse_time(txn.now) + timedelta(seconds=delay_seconds))
            row = txn.db.execute(
                """UPDATE processing_tasks SET status = 'pending', run_after = ?,
                   status_message = ?, stage = 'waiting', eta_seconds = NULL,
                   lease_owner = NULL, lease_until = NULL, updated_at = ?
                   WHERE id = ? AND attempts = ? AND status = 'processing' RETURNING *""",
                (run_after, message, txn.now, task_id, attempt),
            ).fetchone()
            return None if row is None else self._status_event(txn, Task.from_row(row))
        return await self._write(_op)

    async def requeue_orphans(
        self, max_attempts: int, *, dead_owners: Collection[str] = ()
    ) -> list[Task]:
        """Tasks left ``processing`` by a dead worker: re-queue, or fail once out of attempts.

        A task is an orphan when its lease ran out, or when its lease owner is
        in ``dead_owners`` (workers known to be gone, e.g. a dead process of
        this host). Never "every leased task": other processes on the same
        database hold live leases. Tasks waiting for an external service (no
        lease) keep waiting. Safe to run in many processes at once: the rows
        are chosen inside the write transaction, so each orphan moves once.
        """
        owners = sorted(set(dead_owners))

        def _op(txn: _Txn) -> Any:
            marks = ",".join("?" * len(owners))
            sql = f"""SELECT id, attempts FROM processing_tasks
                     WHERE status = 'processing' AND external_task_id IS NULL
                     AND (lease_until < ? OR lease_owner IN ({marks}))"""
            args: tuple[Any, ...] = (txn.now, *owners)
            rows = list((txn.db.execute(sql, args)).fetchall())
            changed = []
            for row in rows:
                if row["attempts"] >= max_attempts:
                    task = _refund(txn, Task.from_row(txn.db.execute(
                        """UPDATE processing_tasks SET status = 'failed',
                           error_code = 'interrupted', error_message = ?, status_message = ?,
                           lease_owner = NULL, lease_until = NULL, completed_at = ?, updated_at = ?
                           WHERE id = ? RETURNING *""",
                        (INTERRUPTED, INTERRUPTED, txn.now, txn.now, row["id"]),
                    ).fetchone()))
                else:
                    task = Task.from_row(txn.db.execute(
                        """UPDATE processing_tasks SET status = 'pending', run_after = NULL,
                           status_message = 'interrupted; waiting to resume', stage = 'waiting',
                           lease_owner = NULL, lease_until = NULL, updated_at = ? WHERE id = ?
                           RETURNING *""",
                        (txn.now, row["id"]),
                    ).fetchone())
                changed.append(self._status_event(txn, task))
            return changed
        return await self._write(_op)

    async def release_tasks(self, attempts: list[tuple[int, int]]) -> list[Task]:
        """Hand attempts a stopping process did not finish back to the queue.

        ``(task_id, attempt)`` pairs still ``processing`` in that attempt go back to
        ``pending`` with the attempt not counted (a graceful stop is not the task's fault)
        and their checkpoint kept, so the next process resumes them at once.
        """
        def _op(txn: _Txn) -> Any:
            released = []
            for task_id, attempt in attempts:
                row = txn.db.execute(
                    """UPDATE processing_tasks SET status = 'pending', run_after = NULL,
                       attempts = MAX(attempts - 1, 0), stage = 'waiting',
                       status_message = 'the server is restarting; waiting to resume',
                       lease_owner = NULL, lease_until = NULL, updated_at = ?
                       WHERE id = ? AND attempts = ? AND status = 'processing'
                       AND external_task_id IS NULL RETURNING *""",
                    (txn.now, task_id, attempt)).fetchone()
                if row is not None:
                    released.append(self._status_event(txn, Task.from_row(row)))
            return released
        return await self._write(_op)

    async def lease_owners(self) -> list[str]:
        """The workers holding leases now (recovery asks which of them are gone)."""
        rows = await self._fetchall(
            """SELECT DISTINCT lease_owner FROM processing_tasks
               WHERE status = 'processing' AND lease_owner IS NOT NULL""")
        return [r["lease_owner"] for r in rows]

    async def attempt_states(self, task_ids: Collection[int]) -> dict[int, tuple[str, int]]:
        """``{task id: (status, attempts)}`` of the given tasks; deleted ones are absent.

        The cheap check a worker makes to learn that another process cancelled
        or deleted a task it is running.
        """
        ids = list(task_ids)
        if not ids:
            return {}
        rows = await self._fetchall(
            f"SELECT id, status, attempts FROM processing_tasks WHERE id IN "
            f"({','.join('?' * len(ids))})", ids)
        return {r["id"]: (r["status"], r["attempts"]) for r in rows}

    async def has_runnable_task(self) -> bool:
        """Whether some pending task could be claimed now (a read, before a claim's write)."""
        row = await self._fetchone(
            """SELECT 1 AS x FROM processing_tasks WHERE status = 'pending'
               AND (run_after IS NULL OR run_after <= ?) LIMIT 1""",
            (isoformat(self._clock()),))
        return row is not None

    async def overdue_external_tasks(self) -> list[Task]:
        rows = await self._fetchall(
            """SELECT * FROM processing_tasks WHERE status = 'processing'
               AND external_deadline IS NOT NULL AND external_deadline < ?""",
            (isoformat(self._clock()),),
        )
        return [Task.from_row(r) for r in rows]

    # ----------------------------------------------------------- user actions
    async def cancel_task(self, task_id: int, user_id: str) -> Task:
        """``pending``/``processing`` → ``cancelled`` with a refund; else InvalidTransition."""
        def _op(txn: _Txn) -> Any:
            status = _owned_status(txn.db, task_id, user_id)
            if status.is_final:
                raise InvalidTransition(status, "cancel")
            return self._status_event(txn, _cancel(txn, task_id))
        return await self._write(_op)

    async def retry_task(self, task_id: int, user_id: str, *, max_active: int = 100) -> Task:
        """``failed``/``cancelled`` → ``pending``, charged again, attempts start over."""
        def _op(txn: _Txn) -> Any:
            status = _owned_status(txn.db, task_id, user_id)
            if status not in (TaskStatus.FAILED, TaskStatus.CANCELLED):
                raise InvalidTransition(status, "retry")
            _check_active_limit(txn.db, user_id, max_active)
            row = txn.db.execute(
                """UPDATE processing_tasks SET status = 'pending', progress = 0, attempts = 0,
                   status_message = 'waiting for a worker', stage = NULL, eta_seconds = NULL,
                   error_message = NULL, error_code = NULL, external_task_id = NULL,
                   external_deadline = NULL, run_after = NULL, completed_at = NULL,
                   result_name = NULL, result_size = 0, credits_held = credits_cost,
                   updated_at = ?
                   WHERE id = ? AND files_expired = 0 RETURNING *""",
                (txn.now, task_id),
            ).fetchone()
            if row is None:
                raise FilesExpired(status)
            task = Task.from_row(row)
            _charge(txn, task, task.credits_cost)
            return self._status_event(txn, task)
        return await self._write(_op)

    async def delete_task(self, task_id: int, user_id: str) -> Task:
        """Cancel (with refund) if active, then delete the row; returns the task as it was."""
        def _op(txn: _Txn) -> Any:
            status = _owned_status(txn.db, task_id, user_id)
            if not status.is_final:
                self._status_event(txn, _cancel(txn, task_id))
            row = txn.db.execute("DELETE FROM processing_tasks WHERE id = ? RETURNING *",
                                 (task_id,)).fetchone()
            task = Task.from_row(row)
            if not task.files_expired:
                _move_storage(txn, user_id, -(task.file_size + task.result_size))
            _append_event(txn, task_id, user_id, "task_deleted", {"taskId": task_id})
            return task
        return await self._write(_op)

    # ------------------------------------------------------------- retention
    async def tasks_to_expire(
        self, ended_before: datetime,
        statuses: Iterable[TaskStatus] = FINAL_STATUSES,
    ) -> list[Task]:
        """Ended tasks (of ``statuses``) whose files are kept and that ended before then."""
        wanted = sorted(s.value for s in statuses)
        rows = await self._fetchall(
            f"""SELECT * FROM processing_tasks
               WHERE status IN ({",".join("?" * len(wanted))})
               AND files_expired = 0 AND COALESCE(completed_at, updated_at) < ?""",
            (*wanted, isoformat(ended_before)),
        )
        return [Task.from_row(r) for r in rows]

    async def mark_files_expired(self, task_id: int) -> bool:
        """Record that the task's files go; ``False`` if it is no longer ended (retried).

        Called before the files are removed, so a retry either wins (and the
        files stay) or sees the task expired.
        """
        def _op(txn: _Txn) -> Any:
            expired = txn.db.execute(
                """UPDATE processing_tasks SET files_expired = 1, updated_at = ?
                   WHERE id = ? AND files_expired = 0
                   AND status IN ('completed', 'failed', 'cancelled')
                   RETURNING user_id, file_size + result_size""",
                (txn.now, task_id),
            ).fetchone()
            if expired is None:
                return False
            _move_storage(txn, expired[0], -expired[1])
            return True
        return await self._write(_op)

    async def prune_events(self, before: datetime) -> int:
        """Delete events older than ``before`` of tasks that have ended (or are gone).

        Remembers the highest pruned id, so a client resuming from before it
        is told to reset rather than silently missing events.
        """
        def _op(txn: _Txn) -> Any:
            stamp = isoformat(before)
            top = _scalar(
                txn.db,
                """SELECT MAX(id) FROM task_events e WHERE created_at < ? AND NOT EXISTS (
                       SELECT 1 FROM processing_tasks t WHERE t.id = e.task_id
                       AND t.status IN ('pending', 'processing'))""",
                (stamp,),
            )
            if top is None:
                return 0
            cursor = txn.db.execute(
                """DELETE FROM task_events WHERE id <= ? AND created_at < ? AND NOT EXISTS (
                       SELECT 1 FROM processing_tasks t WHERE t.id = task_events.task_id
                       AND t.status IN ('pending', 'processing'))""",
                (top, stamp),
            )
            txn.db.execute(
                """INSERT INTO meta (key, value) VALUES ('events_pruned_through', ?)
                   ON CONFLICT (key) DO UPDATE SET
                   value = MAX(CAST(meta.value AS INTEGER), CAST(excluded.value AS INTEGER))""",
                (str(top),),
            )
            return cursor.rowcount
        return await self._write(_op)

    async def data_folder_id(self) -> str:
        """A random id of this database, made once: the data folder holds a copy, so a
        worker on another host can tell it sees the server's files (see the CLI)."""
        def _op(txn: _Txn) -> Any:
            txn.db.execute("INSERT INTO meta (key, value) VALUES ('data_folder_id', ?) "
                           "ON CONFLICT (key) DO NOTHING", (secrets.token_hex(16),))
            return _scalar(txn.db, "SELECT value FROM meta WHERE key = 'data_folder_id'")
        return await self._write(_op)

    async def events_pruned_through(self) -> int:
        row = await self._fetchone("SELECT value FROM meta WHERE key = 'events_pruned_through'")
        return int(row["value"]) if row else 0

    # ----------------------------------------------------------------- events
    async def events_after(
        self,
        after_id: int,
        *,
        task_id: int | None = None,
        user_id: str | None = None,
        limit: int = 500,
    ) -> list[Event]:
        """Events with ``id > after_id`` of one task or one user, oldest first."""
        column, value = ("task_id", task_id) if task_id is not None else ("user_id", user_id)
        rows = await self._fetchall(
            f"SELECT * FROM task_events WHERE {column} = ? AND id > ? ORDER BY id LIMIT ?",
            (value, after_id, limit),
        )
        return [_event_from_row(r) for r in rows]

    async def stream_start(self, *, user_id: str, task_id: int | None = None) -> StreamStart:
        """The snapshot a stream of the user's events (or of one task of theirs) starts from.

        One statement, so the latest id and the state agree even while events
        commit; it also says how far events were pruned. With ``task_id``,
        raises :class:`TaskNotFound` unless the task exists and is the user's.
        """
        column, value = ("task_id", task_id) if task_id is not None else ("user_id", user_id)
        subject, args = ("processing_tasks WHERE id = ?", [task_id]) if task_id is not None \
            else ("users WHERE id = ?", [user_id])
        owner = "user_id" if task_id is not None else "id"
        row = await self._fetch_point(
            f"""SELECT {owner} AS owner,
                       (SELECT MAX(id) FROM task_events WHERE {column} = ?) AS latest,
                       (SELECT data FROM task_events WHERE {column} = ? AND type = 'status_update'
                        ORDER BY id DESC LIMIT 1) AS data,
                       (SELECT value FROM meta WHERE key = 'events_pruned_through') AS pruned
                FROM {subject}""",
            (value, value, *args),
        )
        if task_id is not None and (row is None or row["owner"] != user_id):
            raise TaskNotFound(task_id)
        if row is None:  # a user not in the table has no events either
            return StreamStart(0, None, await self.events_pruned_through())
        return StreamStart(row["latest"] or 0, json.loads(row["data"]) if row["data"] else None,
                           int(row["pruned"] or 0))

    async def latest_event_id(
        self, *, task_id: int | None = None, user_id: str | None = None
    ) -> int:
        column, value = ("task_id", task_id) if task_id is not None else ("user_id", user_id)
        row = await self._fetchone(
            f"SELECT MAX(id) AS m FROM task_events WHERE {column} = ?", (value,)
        )
        return row["m"] or 0 if row else 0

    def _status_event(self, txn: _Txn, task: Task) -> Task:
        """Append ``task`` (as the write left it: its statement's ``RETURNING *``, not
        read again) as a ``status_update`` event; return it."""
        _append_event(txn, task.id, task.user_id, "status_update", self.status_data(task))
        return task

    def status_data(self, task: Task) -> dict[str, Any]:
        """The ``data`` of a task's ``status_update`` (the seed's shape, plus extras)."""
        data = _status_payload(task.id, task.status, task.progress, task.status_message,
                               task.stage, task.eta_seconds, task.attempts)
        if task.status is TaskStatus.COMPLETED:
            data["resultUrl"] = self.result_url(task.id)
        if task.status is TaskStatus.FAILED:
            data["error"] = task.error_message
            data["errorCode"] = task.error_code
            data.update(messages.error_fields(task.error_message))
        if task.status.is_final:
            data["completedAt"] = task.completed_at
        return data


def _status_payload(task_id: int, status: TaskStatus, progress: int, message: str,
                    stage: str | None, eta_seconds: float | None,
                    attempts: int) -> dict[str, Any]:
    """The fields every ``status_update`` carries (one place for the shape)."""
    return {"taskId": task_id, "status": status.value, "progress": progress,
            "message": message, "stage": stage, "etaSeconds": eta_seconds,
            "attempts": attempts, "stageCode": stage, **messages.message_fields(message)}


#: keys per memory lookup statement (SQLite's default variable limit is far above)
MEMORY_LOOKUP_CHUNK = 500
#: up to this many keys, a memory lookup is a point read (see ``_fetch_keyed``)
MEMORY_KEYS_READ_AT_ONCE = 32
#: characters of a token kept in clear ("zy_" and 8 more): enough to name it, not to use it
TOKEN_PREFIX_LENGTH = 11
INTERRUPTED = "interrupted too many times (the server stopped while it ran)"


class _IdempotentRace(StoreError):
    """Two creates with one key raced; the caller looks the winner up."""


#: the claim's choice: the oldest runnable pending task (the PostgreSQL store adds
#: ``FOR UPDATE SKIP LOCKED`` to exactly this text)
CLAIM_SQL = """SELECT id FROM processing_tasks
               WHERE status = 'pending' AND (run_after IS NULL OR run_after <= ?)
               ORDER BY id LIMIT 1"""


def _attempt_clause(attempt: int | None) -> str:
    return "" if attempt is None else "AND attempts = ?"


def _attempt_args(attempt: int | None) -> tuple[int, ...]:
    return () if attempt is None else (attempt,)


PRAGMAS = (
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = NORMAL",
    "PRAGMA foreign_keys = ON",
    "PRAGMA busy_timeout = 5000",
)


async def open_store(path: Path | str, url: str | None = None, *,
                     clock: Callable[[], datetime] = utcnow) -> TaskStore:
    """The one place the backend is chosen: PostgreSQL when ``url`` is
    ``postgresql://...`` (its driver imported only then), else the SQLite file at ``path``.
    """
    if not url:
        return await TaskStore.open(path, clock=clock)
    scheme = url.split(":", 1)[0].lower()
    if scheme not in ("postgresql", "postgres"):
        raise StoreError(f"ZHIYI_DATABASE_URL must start with postgresql:// (got {scheme}://)")
    import zhiyi_modules

    zhiyi_modules.refuse_shadowed_modules("storage_pg")  # imported only here: checked here
    import storage_pg

    return await storage_pg.PgTaskStore.open_url(url, clock=clock)


def _connect_point_reader(path: Path) -> sqlite3.Connection:
    """The loop thread's read-only connection for point reads: it never waits for a lock."""
    db = sqlite3.connect(path, isolation_level=None)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA query_only = ON")
    db.execute("PRAGMA busy_timeout = 0")
    return db


async def _connect_reader(path: Path) -> aiosqlite.Connection:
    db = await aiosqlite.connect(path, isolation_level=None)
    db.row_factory = aiosqlite.Row
    for pragma in PRAGMAS:
        await db.execute(pragma)
    return db


MIN_SQLITE = (3, 35, 0)


def check_sqlite_version() -> None:
    """Raise :class:`SQLiteTooOld` unless this Python's SQLite has ``RETURNING``."""
    if sqlite3.sqlite_version_info < MIN_SQLITE:
        raise SQLiteTooOld(
            f"SQLite {sqlite3.sqlite_version} is too old: Zhiyi needs 3.35 or newer "
            "(for RETURNING). Use a Python built with a newer SQLite.")


def _open_writer(path: Path) -> sqlite3.Connection:
    """The writer connection, made in (and only used from) the writer thread."""
    # isolation_level=None: we issue BEGIN IMMEDIATE ourselves.
    db = sqlite3.connect(path, isolation_level=None)
    db.row_factory = sqlite3.Row
    for pragma in PRAGMAS:
        db.execute(pragma)
    try:
        _migrate(db)
    except BaseException:
        db.close()
        raise
    return db


def _last_event_id(db: sqlite3.Connection) -> int:
    """The highest event id ever given (AUTOINCREMENT's counter outlives pruned rows)."""
    top = _scalar(db, "SELECT seq FROM sqlite_sequence WHERE name = 'task_events'")
    return int(top or 0)


def _make_private_file(path: Path) -> None:
    """Create the database file (and its folder) readable by this user only.

    SQLite gives its ``-wal`` and ``-shm`` files the database file's mode, so
    they are private too. An existing file or folder keeps its mode.
    """
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass


def _schema_sql() -> str:
    for candidate in SCHEMA_PATH_CANDIDATES:
        if candidate.exists():
            return candidate.read_text(encoding="utf-8")
    raise FileNotFoundError("schema.sql is missing from the installation")


def _migrate(db: sqlite3.Connection) -> None:
    """Create a new database, or move an older one forward step by step, in one transaction."""
    version = _scalar(db, "PRAGMA user_version")
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"the database is version {version}, newer than this Zhiyi ({SCHEMA_VERSION}); "
            "upgrade Zhiyi"
        )
    if version == SCHEMA_VERSION:
        return
    has_tables = _scalar(db, "SELECT COUNT(*) FROM sqlite_master WHERE name = 'users'")
    db.execute("BEGIN IMMEDIATE")
    try:
        if not has_tables:
            statements = _split_sql(_schema_sql())
        else:
            statements = []
            for step in range(max(version, 1) + 1, SCHEMA_VERSION + 1):
                logger.info("migrating the database to version %d", step)
                statements += _split_sql(MIGRATIONS[step])
        for statement in statements:
            db.execute(statement)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _split_sql(script: str) -> list[str]:
    """Statements of a script, so they run inside our transaction (executescript commits)."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            if current.strip():
                statements.append(current.strip())
            current = ""
    return statements


def _scalar(db: sqlite3.Connection, sql: str, args: Iterable[Any] = ()) -> Any:
    row = db.execute(sql, tuple(args)).fetchone()
    return row[0] if row else None


def _user_exists(db: sqlite3.Connection, user_id: str) -> bool:
    return bool(_scalar(db, "SELECT 1 FROM users WHERE id = ?", (user_id,)))


def _check_active_limit(db: sqlite3.Connection, user_id: str, limit: int) -> None:
    active = _scalar(
        db, "SELECT COUNT(*) FROM processing_tasks WHERE user_id = ? AND status IN (?, ?)",
        (user_id, *ACTIVE_STATUSES),
    )
    if active >= limit:
        raise TooManyActiveTasks(user_id)


def _memory_rows(user_id: str, scope: Scope | None) -> tuple[str, list[str]]:
    """The WHERE clause (and its values) of a user's translation memory, or of one scope
    of it (a range of the primary key)."""
    if scope is None:
        return "user_id = ?", [user_id]
    return ("user_id = ? AND source_lang = ? AND target_lang = ? AND engine = ?",
            [user_id, scope.source, scope.target, scope.engine])


def _move_storage(txn: _Txn, user_id: str, delta: int) -> None:
    """Keep ``users.storage_bytes`` (the files a user's tasks keep) in the transaction that
    adds or removes them: the upload (at insert), a result (completion), a task's files
    expiring or the task deleted. A retry, which clears the result, moves nothing: only
    a completed task has one, and a completed task cannot be retried."""
    if delta:
        txn.db.execute("UPDATE users SET storage_bytes = storage_bytes + ? WHERE id = ?",
                       (delta, user_id))


def _owned_status(db: sqlite3.Connection, task_id: int, user_id: str) -> TaskStatus:
    row = (
        db.execute("SELECT user_id, status FROM processing_tasks WHERE id = ?", (task_id,))
    ).fetchone()
    if row is None or row["user_id"] != user_id:
        raise TaskNotFound(task_id)
    return TaskStatus(row["status"])


def _move_credits(
    txn: _Txn, user_id: str, amount: int, reason: str, task_id: int | None
) -> int:
    """Change a balance and write its ledger row; never below zero."""
    balance = _scalar(
        txn.db, "UPDATE users SET credits = credits + ? WHERE id = ? AND credits + ? >= 0"
        " RETURNING credits", (amount, user_id, amount))
    if balance is None:  # refused: read the balance only to say it
        current = _scalar(txn.db, "SELECT credits FROM users WHERE id = ?", (user_id,))
        raise InsufficientCredits(-amount, current or 0)
    txn.db.execute(
        """INSERT INTO credit_ledger (user_id, amount, reason, task_id, balance_after, created_at)
           VALUES (?,?,?,?,?,?)""",
        (user_id, amount, reason, task_id, balance, txn.now),
    )
    return balance


def _charge(txn: _Txn, task: Task, cost: int) -> None:
    if cost:
        balance = _move_credits(txn, task.user_id, -cost, "charge", task.id)
        _credits_notice(txn, task.user_id, balance, f"{cost} credits charged for task {task.id}",
                        "credits_charged", {"amount": cost, "taskId": task.id,
                                            "taskNo": task.user_task_no})


def _credits_notice(txn: _Txn, user_id: str, balance: int, message: str,
                    code: str, params: dict[str, Any]) -> None:
    """Tell the user's streams the new balance, so pages need not poll ``/api/me``;
    ``code`` and ``params`` say the message for a page in another language."""
    _append_event(txn, None, user_id, "notification",
                  {"level": "info", "message": message, "credits": balance,
                   "code": code, "params": params})


def _refund(txn: _Txn, task: Task) -> Task:
    """Give back what the task holds, once: ``credits_held`` drops to zero here.

    ``task`` is the row as this transaction's last write of it returned it; the
    task is returned as the refund leaves it.
    """
    held = task.credits_held
    if held <= 0:
        return task
    txn.db.execute("UPDATE processing_tasks SET credits_held = 0 WHERE id = ?", (task.id,))
    balance = _move_credits(txn, task.user_id, held, "refund", task.id)
    _credits_notice(txn, task.user_id, balance, f"{held} credits refunded for task {task.id}",
                    "credits_refunded", {"amount": held, "taskId": task.id,
                                         "taskNo": task.user_task_no})
    return replace(task, credits_held=0)


def _cancel(txn: _Txn, task_id: int) -> Task:
    """Cancel the task with its refund; returns it as left."""
    row = txn.db.execute(
        """UPDATE processing_tasks SET status = 'cancelled', status_message = 'cancelled',
           eta_seconds = NULL, lease_owner = NULL, lease_until = NULL,
           external_deadline = NULL, completed_at = ?, updated_at = ? WHERE id = ?
           RETURNING *""",
        (txn.now, txn.now, task_id),
    ).fetchone()
    return _refund(txn, Task.from_row(row))


def _append_event(
    txn: _Txn, task_id: int | None, user_id: str, type_: str, data: dict[str, Any]
) -> Event:
    raw = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    cursor = txn.db.execute(
        "INSERT INTO task_events (task_id, user_id, type, data, created_at) VALUES (?,?,?,?,?)",
        (task_id, user_id, type_, raw, txn.now),
    )
    assert cursor.lastrowid is not None
    event = Event(cursor.lastrowid, task_id, user_id, type_, data, raw)
    txn.events.append(event)
    return event
