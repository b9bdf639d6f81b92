"""The PostgreSQL store: storage.py's TaskStore over psycopg 3, for several hosts.

Imported only when ``ZHIYI_DATABASE_URL`` names a ``postgresql://`` database
(see :func:`storage.open_store`). The write operations are storage.py's own
small synchronous functions of a transaction, run unchanged: :class:`PgConnection`
gives them the ``execute`` they expect (``?`` placeholders, ``lastrowid``, rows
by name or position) and translates the few SQLite-only words. So there is one
definition of every state change and of the ledger invariant, whichever database
holds it.

How the two stores differ:

* Write transactions take one transaction-level advisory lock first
  (``pg_advisory_xact_lock``), so event ids are allocated and committed in
  order across every process: a reader that sees event 11 already sees 10.
  It is SQLite's one-writer rule, kept on purpose; the GroupWriter's batching
  (many writes under one COMMIT) is what keeps it cheap.
* Every statement is a round trip to the server, so the writer sends what it
  need not wait for with the next one, in one message: BEGIN and the lock
  travel with the transaction's first statement, and the rows nobody reads
  back in the same write (events, ledger entries) with whatever comes next
  (the COMMIT at the latest). An event's id is given by the writer itself,
  which may, because it holds the lock: it reads the id sequence when it
  takes the lock and moves the sequence on with the COMMIT.
* Claims read with ``FOR UPDATE SKIP LOCKED``.
* A commit that appended events sends ``NOTIFY zhiyi_events``; every process
  LISTENs and looks at once, with a periodic poll as the safety net and a
  fresh listening connection after a lost one.
* Reads go through a psycopg async connection pool.

This module knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import psycopg.errors
from psycopg.types.numeric import NumericLoader
from psycopg_pool import AsyncConnectionPool, PoolTimeout

import storage
from group_writer import GroupWriter, WriteOp, _Done, _Failed, _RetryIsolated, _Txn
from storage import (
    SCHEMA_VERSION,
    Event,
    StoreError,
    StoreUnavailable,
    TaskStore,
    isoformat,
    utcnow,
)

__all__ = ["PG_MIGRATIONS", "PgConnection", "PgTaskStore", "begin_write", "connect",
           "hide_password", "pg_sql"]

logger = logging.getLogger(__name__)

#: the channel a commit with events notifies on
CHANNEL = "zhiyi_events"
#: the advisory lock every write transaction holds until it commits (any fixed number)
WRITE_LOCK_KEY = 0x7A68_6979  # "zhiy"
#: how often a process looks for other processes' commits when no notification came
POLL_SECONDS = 1.0
#: read connections per process, and how long a read waits for one before it answers
#: StoreUnavailable (503) — reads take milliseconds, so a wait this long means the
#: database is gone, and the client is told so rather than left hanging
READ_POOL_SIZE = 16
READ_WAIT_SECONDS = 5.0
#: how long a lost listening connection waits before it connects again
RECONNECT_SECONDS = 0.5
#: statements the writer keeps prepared on its connection, at most
MAX_PREPARED = 256

#: the first schema version a PostgreSQL database was made at (schema.sql as it was then)
PG_BASELINE = 8
#: Steps that move an older PostgreSQL database forward: version -> SQL, one for every
#: version of storage.MIGRATIONS above PG_BASELINE (tests/test_storage_pg.py holds this).
#: A step SQLite's SQL says in PostgreSQL's too is that step in PostgreSQL's types
#: (``in_postgres_types``); one that needs other SQL is written out here.
PG_MIGRATIONS: dict[int, str] = {}

VERSION_TABLE = "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"


def hide_password(url: str) -> str:
    """``url`` with its password replaced by ``***``, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


# ------------------------------------------------------------------ dialect
def _scalar_min_max(sql: str) -> str:
    """SQLite's two-argument ``MAX(a, b)``/``MIN(a, b)`` as ``GREATEST``/``LEAST``
    (the one-argument aggregates stay)."""
    out, i = [], 0
    pattern = re.compile(r"\b(MAX|MIN)\(", re.IGNORECASE)
    while (match := pattern.search(sql, i)) is not None:
        depth, j, comma = 1, match.end(), False
        while depth and j < len(sql):
            depth += {"(": 1, ")": -1}.get(sql[j], 0)
            comma = comma or (sql[j] == "," and depth == 1)
            j += 1
        word = match.group(1).upper()
        name = ("GREATEST" if word == "MAX" else "LEAST") if comma else match.group(1)
        out.append(sql[i:match.start()] + name + "(")
        i = match.end()
    return "".join(out) + sql[i:]


@lru_cache(maxsize=1024)
def pg_sql(sql: str) -> str:
    """storage.py's SQL in PostgreSQL's dialect (the statements it uses, not SQLite at large)."""
    text = sql.replace("%", "%%").replace("?", "%s")
    text = _scalar_min_max(text)
    # An empty list is SQLite-only; an empty subquery means the same (IN: false, NOT IN: true).
    text = re.sub(r"\bIN \(\s*\)", "IN (SELECT NULL WHERE FALSE)", text)
    if re.search(r"INSERT OR REPLACE INTO meta", text):
        text = text.replace("INSERT OR REPLACE INTO", "INSERT INTO")
        text += " ON CONFLICT (key) DO UPDATE SET value = excluded.value"
    if "INSERT OR IGNORE INTO" in text:
        text = text.replace("INSERT OR IGNORE INTO", "INSERT INTO") + " ON CONFLICT DO NOTHING"
    # The claim: a task another process is claiming is skipped, not waited for.
    if _CLAIM in text:
        text = text.replace(_CLAIM, _CLAIM + " FOR UPDATE SKIP LOCKED")
    return text


#: storage.CLAIM_SQL as pg_sql gives it (before the claim's own rule)
_CLAIM = storage.CLAIM_SQL.replace("?", "%s")


#: tables whose INSERT hands back ``lastrowid``
_ID_TABLES = re.compile(r"^\s*INSERT INTO (processing_tasks|task_events|credit_ledger)\b",
                        re.IGNORECASE)
#: An event: in a write transaction its id is given by the writer, so nothing is waited for.
_EVENT_INSERT = re.compile(r"^\s*INSERT INTO task_events \(([^)]*)\) VALUES \(",
                           re.IGNORECASE)
#: A ledger entry: storage.py never reads it back in the write that makes it.
_LEDGER_INSERT = re.compile(r"^\s*INSERT INTO credit_ledger\b", re.IGNORECASE)
#: Counter updates whose row count no write function reads and that no constraint refuses:
#: a user's kept bytes (storage._move_storage), a refunded task's hold (storage._refund).
_QUIET_UPDATES = frozenset({
    "UPDATE users SET storage_bytes = storage_bytes + %s WHERE id = %s",
    "UPDATE processing_tasks SET credits_held = 0 WHERE id = %s",
})


@dataclass(frozen=True)
class _Plan:
    """How :class:`PgConnection` runs one of storage.py's statements."""

    #: the statement in PostgreSQL's dialect (``RETURNING id`` added when ``wants_id``)
    text: str
    wants_id: bool
    #: In a write transaction, the form sent without waiting for its answer (None: wait).
    #: Only statements whose rows no write function reads back and that fail only on a
    #: bug (no constraint a caller catches): their errors arrive with a later answer.
    deferred: str | None = None
    #: ``deferred`` takes the event id (given by the writer) as its first argument
    takes_id: bool = False


@lru_cache(maxsize=1024)
def _plan(sql: str) -> _Plan:
    text = pg_sql(sql)
    if text in _QUIET_UPDATES:
        return _Plan(text, False, text)
    if "RETURNING" in text.upper() or not _ID_TABLES.match(text):
        return _Plan(text, False)
    if (match := _EVENT_INSERT.match(text)) is not None:
        columns, rest = match.group(1), text[match.end():]
        return _Plan(text + " RETURNING id", True,
                     f"INSERT INTO task_events (id, {columns}) VALUES (%s, {rest}", True)
    if _LEDGER_INSERT.match(text):
        return _Plan(text + " RETURNING id", True, text)
    return _Plan(text + " RETURNING id", True)


@lru_cache(maxsize=1024)
def _prepared_form(text: str) -> tuple[str, str, str]:
    """``text`` (``%s`` placeholders) as a named prepared statement: its name, its
    ``PREPARE`` and its ``EXECUTE`` (with ``%s`` for the values)."""
    count = 0

    def number(match: re.Match[str]) -> str:
        nonlocal count
        if match.group() == "%%":
            return "%"
        count += 1
        return f"${count}"

    body = re.sub(r"%%|%s", number, text)
    name = "zhiyi_" + hashlib.blake2s(text.encode(), digest_size=8).hexdigest()
    return name, f"PREPARE {name} AS {body}", f"EXECUTE {name}({', '.join(['%s'] * count)})"


def schema_ddl() -> list[str]:
    """schema.sql in PostgreSQL's types: one schema definition for both stores.

    Ids become identity columns (never reused, like AUTOINCREMENT); integers
    64-bit; times stay ISO-8601 text, compared byte-wise (``COLLATE "C"``) as
    SQLite compares them.
    """
    text = in_postgres_types(storage._schema_sql())
    return [s.strip() for s in text.split(";") if s.strip()]


def in_postgres_types(sql: str) -> str:
    """SQLite DDL in PostgreSQL's types (see :func:`schema_ddl`), comments dropped."""
    text = re.sub(r"--[^\n]*", "", sql)
    text = text.replace("INTEGER PRIMARY KEY AUTOINCREMENT",
                        "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY")
    text = re.sub(r"\bINTEGER\b", "BIGINT", text)
    text = re.sub(r"\bREAL\b", "DOUBLE PRECISION", text)
    return re.sub(r"\b(\w+_at|run_after|lease_until|external_deadline)(\s+)TEXT\b",
                  r'\1\2TEXT COLLATE "C"', text)


# Version 9 (the kept-bytes total and the active-task index) reads the same in both.
PG_MIGRATIONS[9] = in_postgres_types(storage.MIGRATIONS[9])


# ------------------------------------------------------------ the adapter
class Row(tuple):
    """A result row read by column name or position, like ``sqlite3.Row``."""

    _names: dict[str, int]

    def __new__(cls, names: dict[str, int], values: Sequence[Any]) -> Row:
        row = super().__new__(cls, values)
        row._names = names
        return row

    def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
        if isinstance(key, str):
            return tuple.__getitem__(self, self._names[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._names)


def _row_factory(cursor: Any) -> Callable[[Sequence[Any]], Row]:
    names = {c.name: i for i, c in enumerate(cursor.description or ())}
    return lambda values: Row(names, values)


class _WholeNumbers(NumericLoader):
    """``SUM`` of integers is ``numeric`` in PostgreSQL: hand back an int, as SQLite does."""

    def load(self, data: Any) -> Any:
        value = super().load(data)
        return int(value) if value == value.to_integral_value() else float(value)


def _configure(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> None:
    conn.adapters.register_loader("numeric", _WholeNumbers)


class PgCursor:
    """What storage.py's write functions use of a ``sqlite3.Cursor``."""

    def __init__(self, rows: list[Row], rowcount: int, lastrowid: int | None) -> None:
        self._rows = rows
        self.rowcount = rowcount
        self.lastrowid = lastrowid

    def fetchone(self) -> Row | None:
        return self._rows.pop(0) if self._rows else None

    def fetchall(self) -> list[Row]:
        rows, self._rows = self._rows, []
        return rows

    def __iter__(self) -> Iterator[Row]:
        return iter(self.fetchall())


class PgConnection:
    """A psycopg connection that speaks like the ``sqlite3.Connection`` storage.py writes to.

    Constraint violations come out as ``sqlite3.IntegrityError`` because that
    is what the write functions catch to name their refusals.

    In a write transaction (:meth:`begin`) the statements whose answer is not
    needed at once (BEGIN and the lock, ``_Plan.deferred``, the COMMIT's
    companions) wait in a queue, as text with their values inlined, and go in
    one message with the next statement whose answer is needed: one round trip
    for the lot (PostgreSQL's simple query protocol runs them in order and stops
    at the first error, which is then raised). A statement with values goes as
    the ``EXECUTE`` of a statement this connection PREPAREd the first time it
    was sent (the PREPARE in the same message), so PostgreSQL parses and plans
    it once per connection, not once per message.
    """

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.raw = conn
        #: inlines values into statement text (the connection's own quoting rules)
        self._literal = psycopg.ClientCursor(conn)
        #: statements waiting for the next send, and whether to keep their first row;
        #: None outside a write transaction
        self._queue: list[tuple[str, bool]] | None = None
        self._sequence_row: Any = None
        self._next_event_id: int | None = None
        self._last_event_id: int | None = None
        #: whether this transaction's COMMIT was sent (if lost after, its outcome is unknown)
        self.committing = False
        #: statements PREPAREd on this connection (by name), those whose PREPARE is in the
        #: message being made, and whether a failed message leaves that unknown
        self._prepared: set[str] = set()
        self._preparing: list[str] = []
        self._prepared_unknown = False

    def execute(self, sql: str, args: Iterable[Any] = ()) -> PgCursor:
        plan = _plan(sql)
        try:
            if self._queue is None:
                return _answer(self.raw.execute(plan.text, tuple(args)), plan.wants_id)
            return self._in_write(plan, tuple(args))
        except psycopg.errors.IntegrityError as e:
            raise sqlite3.IntegrityError(str(e)) from e

    def _in_write(self, plan: _Plan, args: tuple[Any, ...]) -> PgCursor:
        if plan.deferred is not None:
            if plan.takes_id:
                event_id = self._take_event_id()
                self._enqueue(plan.deferred, (event_id, *args))
                return PgCursor([], 1, event_id)
            self._enqueue(plan.deferred, args)
            return PgCursor([], 1, None)
        cursor = self._send(self._inline(plan.text, args))
        assert cursor is not None
        return _answer(cursor, plan.wants_id)

    def _enqueue(self, text: str, args: tuple[Any, ...] | None = None, *,
                 keep: bool = False) -> None:
        """Queue ``text`` (with ``args`` inlined; None: ``text`` is already final SQL)."""
        assert self._queue is not None
        self._queue.append((text if args is None else self._inline(text, args), keep))

    def _inline(self, text: str, args: tuple[Any, ...]) -> str:
        """``text`` with ``args`` for a message of several statements: the EXECUTE of a
        statement PREPAREd on this connection (its PREPARE queued first, the first time),
        so PostgreSQL parses and plans it once, not once per message."""
        if not args:
            return self._literal.mogrify(text, args)
        name, prepare, execute = _prepared_form(text)
        if name not in self._prepared:
            if len(self._prepared) >= MAX_PREPARED:  # (texts made with lists of any length)
                return self._literal.mogrify(text, args)
            assert self._queue is not None
            self._queue.append((prepare, False))
            self._prepared.add(name)
            self._preparing.append(name)
        return self._literal.mogrify(execute, args)

    def _send(self, last: str | None = None) -> psycopg.Cursor[Any] | None:
        """Send the queue (and ``last``) as one message; the cursor is left on the answer
        to ``last``. The first statement that fails raises, and nothing after it runs."""
        assert self._queue is not None
        queued, self._queue = self._queue, []
        texts = [text for text, _ in queued] + ([last] if last is not None else [])
        if not texts:
            return None
        preparing, self._preparing = self._preparing, []
        try:
            cursor = self.raw.execute("; ".join(texts))
        except BaseException:
            # A PREPARE before the statement that failed stands (PREPARE is not undone by
            # a ROLLBACK), one after it never ran: ask PostgreSQL before the next write.
            self._prepared_unknown = self._prepared_unknown or bool(preparing)
            raise
        for _, keep in queued:
            if keep:
                self._sequence_row = cursor.fetchone()
            cursor.nextset()
        return cursor

    def executemany(self, sql: str, seq: Iterable[Iterable[Any]]) -> PgCursor:
        if self._queue:
            self.sync()
        try:
            with self.raw.cursor() as cursor:
                cursor.executemany(pg_sql(sql), [tuple(a) for a in seq])
                return PgCursor([], cursor.rowcount, None)
        except psycopg.errors.IntegrityError as e:
            raise sqlite3.IntegrityError(str(e)) from e

    @property
    def in_transaction(self) -> bool:
        return self.raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE

    # ------------------------------------------------- the writer's transactions
    def begin(self, sequence: str) -> None:
        """Open a write transaction: BEGIN, the write lock and the read of ``sequence``
        (task_events' ids) are queued, to go with its first statement whose answer is
        needed. End it with :meth:`commit` or :meth:`abort`."""
        self.committing = False
        self._next_event_id = self._last_event_id = self._sequence_row = None
        self._know_prepared()
        self._queue = []
        self._enqueue("BEGIN")
        self._enqueue(f"SELECT pg_advisory_xact_lock({WRITE_LOCK_KEY})")
        # After the lock: no other writer takes an id until this one commits.
        self._enqueue(f"SELECT last_value, is_called FROM {sequence}", keep=True)

    def sync(self) -> None:
        """Send what is queued and wait for the answer; the first error is raised."""
        try:
            self._send()
        except psycopg.errors.IntegrityError as e:
            raise sqlite3.IntegrityError(str(e)) from e

    def settle(self) -> None:
        """:meth:`sync` with a statement's error dropped (the caller is already failing)."""
        try:
            self.sync()
        except (psycopg.Error, sqlite3.Error):
            if self.raw.closed:
                raise

    def _take_event_id(self) -> int:
        """The next event id: the sequence as read with the lock, then one more each time."""
        if self._next_event_id is None:
            if self._sequence_row is None:
                self.sync()  # (only when a transaction's first statement is an event)
            last, called = self._sequence_row
            self._next_event_id = last + 1 if called else last
        event_id = self._last_event_id = self._next_event_id
        self._next_event_id += 1
        return event_id

    def commit(self, sequence: str, *, notify: bool) -> None:
        """Send what is queued, move the id sequence past the ids given, ``NOTIFY`` if
        asked, and COMMIT: one round trip; returns once PostgreSQL committed."""
        if self._last_event_id is not None:
            # Not transactional, like nextval(): if the COMMIT then fails, ids are skipped.
            self._enqueue(f"SELECT setval('{sequence}', %s)", (self._last_event_id,))
        if notify:
            self._enqueue(f"SELECT pg_notify('{CHANNEL}', '')")
        self._enqueue("COMMIT")
        self.committing = True
        try:
            self.sync()
        finally:
            self._queue = None

    def roll_back_to(self, savepoint: str) -> None:
        """Undo one write of the batch."""
        self.settle()
        self.execute(f"ROLLBACK TO {savepoint}")
        self.execute(f"RELEASE {savepoint}")
        self._know_prepared()

    def _know_prepared(self) -> None:
        """After a message with a PREPARE failed, ask which statements are prepared."""
        if self._prepared_unknown:
            self._prepared = {r[0] for r in self.raw.execute(
                "SELECT name FROM pg_prepared_statements")}
            self._prepared_unknown = False

    def abort(self) -> None:
        """Roll the transaction back, dropping what is queued; quiet on a lost connection
        (the server rolls back a transaction whose connection is gone)."""
        self._queue = None
        self._prepared.difference_update(self._preparing)  # queued, never sent
        self._preparing = []
        try:
            if not self.raw.closed and self.in_transaction:
                self.raw.execute("ROLLBACK")
        except psycopg.Error as e:
            if not self.raw.closed:
                logger.warning("rolling back a PostgreSQL write transaction failed: %s", e)


def _answer(cursor: psycopg.Cursor[Any], wants_id: bool) -> PgCursor:
    """A statement's answer in storage.py's terms."""
    rows = cursor.fetchall() if cursor.description is not None else []
    if wants_id:
        return PgCursor([], cursor.rowcount, rows[0][0] if rows else None)
    return PgCursor(rows, cursor.rowcount, None)


def connect(url: str) -> PgConnection:
    """A synchronous connection in storage.py's terms (autocommit: BEGIN is explicit)."""
    # prepare_threshold=None: the writer prepares its statements itself (PgConnection._inline);
    # psycopg's own would have it send DEALLOCATE ALL after any ROLLBACK, theirs and ours.
    conn = psycopg.connect(url, autocommit=True, row_factory=_row_factory, connect_timeout=5,
                           prepare_threshold=None)
    _configure(conn)
    return PgConnection(conn)


def _lost(e: BaseException) -> bool:
    """Whether ``e`` means the server is gone or refusing (not a bad statement)."""
    return isinstance(e, psycopg.OperationalError | psycopg.errors.AdminShutdown)


def _unavailable(url: str, e: BaseException) -> StoreUnavailable:
    reason = " ".join(str(e).split())  # one line: psycopg's messages have several
    return StoreUnavailable(f"PostgreSQL at {hide_password(url)} is not answering ({reason})")


def begin_write(db: PgConnection) -> None:
    """Open a write transaction: BEGIN, then the write lock, held until COMMIT or ROLLBACK.

    The lock is what makes event ids commit in id order: an id is taken only by
    the one transaction holding it, and the next holder's ids are larger.
    """
    db.raw.execute(f"BEGIN; SELECT pg_advisory_xact_lock({WRITE_LOCK_KEY})")  # one round trip


# ---------------------------------------------------------------- migrate
def _migrate(db: PgConnection) -> int:
    """Create the tables, or move an older PostgreSQL database forward; return the last
    event id. One transaction under the write lock, so processes starting together agree."""
    db.execute("BEGIN")
    try:
        db.raw.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK_KEY,))
        db.raw.execute(VERSION_TABLE)
        row = db.raw.execute("SELECT MAX(version) FROM schema_version").fetchone()
        version = row[0] if row and row[0] is not None else 0
        if version > SCHEMA_VERSION:
            raise StoreError(f"the database is version {version}, newer than this Zhiyi "
                             f"({SCHEMA_VERSION}); upgrade Zhiyi")
        if version == 0:
            for statement in schema_ddl():
                db.raw.execute(statement)
        else:
            missing = [v for v in range(version + 1, SCHEMA_VERSION + 1) if v not in PG_MIGRATIONS]
            if missing:
                raise StoreError(f"the PostgreSQL database is version {version} and this Zhiyi "
                                 f"has no PostgreSQL step to version {missing[0]}")
            for step in range(version + 1, SCHEMA_VERSION + 1):
                logger.info("migrating the PostgreSQL database to version %d", step)
                db.raw.execute(PG_MIGRATIONS[step])
        if version != SCHEMA_VERSION:
            db.raw.execute("DELETE FROM schema_version")
            db.raw.execute("INSERT INTO schema_version (version) VALUES (%s)", (SCHEMA_VERSION,))
        last = db.raw.execute("SELECT COALESCE(MAX(id), 0) FROM task_events").fetchone()
        db.raw.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.raw.execute("ROLLBACK")
        raise
    return int(last[0]) if last else 0


# ------------------------------------------------------------------ writer
class PgWriter(GroupWriter):
    """group_writer.GroupWriter over one psycopg connection: batches under one COMMIT,
    the write lock first, ``NOTIFY`` when events were appended."""

    def __init__(self, url: str, clock: Callable[[], datetime],
                 on_commit: Callable[[list[Event]], None],
                 delivered_through: Callable[[], int]) -> None:
        super().__init__(Path(), clock, on_commit, delivered_through)
        self._url = url
        self._pg: PgConnection | None = None
        self.backend_pid = 0
        #: task_events' id sequence (the writer gives event ids itself, under the lock)
        self._sequence = ""

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._seen_event_id = await loop.run_in_executor(self._executor, self._open)

    def _open(self) -> int:
        self._pg = connect(self._url)
        self.backend_pid = self._pg.raw.info.backend_pid
        last = _migrate(self._pg)
        row = self._pg.raw.execute("SELECT pg_get_serial_sequence('task_events', 'id')").fetchone()
        assert row is not None and row[0]
        self._sequence = row[0]
        return last

    async def data_version(self) -> int:  # pragma: no cover - LISTEN replaces it
        raise NotImplementedError("the PostgreSQL store is woken by NOTIFY")

    async def close(self) -> None:
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        if self._pg is not None:  # (a second close has nothing left to do)
            pg, self._pg = self._pg, None
            await asyncio.get_running_loop().run_in_executor(self._executor, pg.raw.close)
        self._executor.shutdown(wait=True)

    def _connection(self) -> PgConnection:
        """The writer's connection, made again if the last one was lost."""
        if self._pg is None or self._pg.raw.closed:
            self._pg = connect(self._url)
            self.backend_pid = self._pg.raw.info.backend_pid
        return self._pg

    def _transaction(self, ops: list[WriteOp], *, isolate: bool) -> list[_Done | _Failed]:
        """The batch in one transaction; once more on a new connection if the connection
        was found lost before the COMMIT was sent (then nothing of it was committed)."""
        for attempt in (1, 2):
            try:
                return self._locked_transaction(ops, isolate=isolate)
            except Exception as e:
                if not _lost(e):
                    raise
                gone = self._pg is None or self._pg.raw.closed
                committing = self._pg is not None and self._pg.committing
                if self._pg is not None and not self._pg.raw.closed:
                    self._pg.raw.close()
                if committing or not gone or attempt == 2:
                    raise _unavailable(self._url, e) from e
                # Lost while idle (a restart, a proxy's timeout), found by the batch's
                # first answer: the server rolled back what was sent.
                logger.warning("the PostgreSQL write connection was lost (%s); connecting "
                               "again", " ".join(str(e).split()))
        raise AssertionError("unreachable")

    def _locked_transaction(self, ops: list[WriteOp], *,
                            isolate: bool) -> list[_Done | _Failed]:
        db = self._connection()
        now = isoformat(self._clock())
        outcomes: list[_Done | _Failed] = []
        db.begin(self._sequence)
        try:
            if len(ops) == 1:
                # Alone in its transaction: a failure rolls the transaction back, so the
                # savepoint (two more round trips) is not needed.
                txn = _Txn(db, now)  # type: ignore[arg-type]
                try:
                    outcomes.append(_Done(ops[0](txn), txn.events))
                except Exception as e:
                    if _lost(e):
                        raise
                    db.abort()
                    return [_Failed(e)]
            else:
                for op in ops:
                    outcomes.append(_run_queued_op(db, op, now, isolate))
            earlier, seen = self._events_before(db, outcomes)  # type: ignore[arg-type]
            events = any(isinstance(o, _Done) and o.events for o in outcomes)
            try:
                db.commit(self._sequence, notify=events)
            except Exception as e:
                if len(ops) > 1 and not isolate and not _lost(e):
                    # A queued statement of one of the writes failed (its error came with
                    # the COMMIT's answer): find which, with a savepoint per write.
                    raise _RetryIsolated from e
                raise
        except BaseException:
            db.abort()
            raise
        self._seen_event_id = seen
        if earlier:
            first = next(o for o in outcomes if isinstance(o, _Done))
            first.events[:0] = earlier
        return outcomes


def _run_queued_op(db: PgConnection, op: WriteOp, now: str, isolate: bool) -> _Done | _Failed:
    """group_writer._run_op with queued statements: a write with a savepoint sends what it
    queued before its RELEASE, so their errors are its own."""
    txn = _Txn(db, now)  # type: ignore[arg-type]
    if not isolate:
        try:
            return _Done(op(txn), txn.events)
        except Exception as e:
            if _lost(e):
                raise
            raise _RetryIsolated from e
    db.execute("SAVEPOINT op")
    try:
        result = op(txn)
        db.sync()
    except Exception as e:
        if _lost(e):
            raise
        db.roll_back_to("op")
        return _Failed(e)
    db.execute("RELEASE op")
    return _Done(result, txn.events)


# ------------------------------------------------------------------- store
class PgTaskStore(TaskStore):
    """storage.TaskStore on PostgreSQL. Open with :meth:`open_url`."""

    def __init__(self, url: str, *, clock: Callable[[], datetime] = utcnow,
                 watch_seconds: float = POLL_SECONDS) -> None:
        super().__init__(Path(), clock=clock, watch_seconds=watch_seconds)
        self._url = url
        self._writer = PgWriter(url, clock, self._own_commit, lambda: self._delivered_through)
        self._pool: AsyncConnectionPool | None = None
        self._notified = asyncio.Event()

    @classmethod
    async def open_url(cls, url: str, *, clock: Callable[[], datetime] = utcnow,
                       watch_seconds: float = POLL_SECONDS) -> PgTaskStore:
        """Connect to (creating or migrating) the database at ``url``.

        Raises StoreUnavailable naming the URL (password hidden) when it does not answer.
        """
        store = cls(url, clock=clock, watch_seconds=max(watch_seconds, POLL_SECONDS))
        try:
            try:
                await store._writer.start()
            except psycopg.OperationalError as e:
                raise _unavailable(url, e) from e
            store._delivered_through = store._writer.start_event_id
            store._pool = AsyncConnectionPool(
                url, min_size=1, max_size=READ_POOL_SIZE, open=False,
                configure=_configure_async, timeout=READ_WAIT_SECONDS,
                kwargs={"autocommit": True, "row_factory": _row_factory,
                        "connect_timeout": 5})
            await store._pool.open(wait=True, timeout=10)
        except BaseException:
            await store.close()
            raise
        return store

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
            self._watcher = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        await self._writer.close()

    def _own_commit(self, events: list[Event]) -> None:
        self._publish(events)  # other processes hear the NOTIFY sent with the commit

    async def _fetchall(self, sql: str, args: Iterable[Any] = ()) -> list[Any]:
        if self._pool is None:
            raise StoreUnavailable("the PostgreSQL store is closed")
        text, values = pg_sql(sql), tuple(args)
        try:
            try:
                return await self._read(text, values)
            except psycopg.OperationalError:
                # A pooled connection found dead (a restart, a proxy's timeout): the pool
                # drops it. The pool does not test each connection it lends (a round trip
                # per read), so test the idle ones now and read once more.
                await self._pool.check()
                return await self._read(text, values)
        except (psycopg.OperationalError, PoolTimeout) as e:
            raise _unavailable(self._url, e) from e

    async def _read(self, text: str, values: tuple[Any, ...]) -> list[Any]:
        assert self._pool is not None
        async with self._pool.connection() as conn:
            cursor = await conn.execute(text, values)
            return await cursor.fetchall() if cursor.description is not None else []

    # ---------------------------------------------------------- other processes
    def _start_watching(self) -> None:
        if self._watcher is None and self._pool is not None:
            self._watcher = asyncio.get_running_loop().create_task(
                self._watch(), name="zhiyi-pg-listen")

    async def _watch(self) -> None:
        """LISTEN for other processes' commits; look at each notification and at least
        every ``watch_seconds``; connect again after a lost connection."""
        poller = asyncio.get_running_loop().create_task(self._poll(), name="zhiyi-pg-poll")
        try:
            while True:
                try:
                    await self._listen()
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    logger.warning("the PostgreSQL listening connection was lost (%s); "
                                   "connecting again", e)
                    self._notified.set()  # look now: a notification may have been missed
                await asyncio.sleep(RECONNECT_SECONDS)
        finally:
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)

    async def _listen(self) -> None:
        conn = await psycopg.AsyncConnection.connect(self._url, autocommit=True,
                                                     connect_timeout=5)
        async with conn:
            await conn.execute(f"LISTEN {CHANNEL}")
            self._notified.set()  # the first look catches up on what came before LISTEN
            await self._hear(conn.pgconn)

    async def _hear(self, pgconn: psycopg.pq.abc.PGconn) -> None:
        """Read notifications as they come, until the connection is lost (raised).

        Most of them are this store's own commits (every commit with events notifies,
        and PostgreSQL tells its sender's listener too), to be dropped: a reader kept
        on the socket drains them in one plain call per wake-up, where psycopg's
        ``notifies()`` makes a future and registers the socket again for each one.
        """
        loop = asyncio.get_running_loop()
        lost: asyncio.Future[None] = loop.create_future()
        writer: PgWriter = self._writer  # type: ignore[assignment]

        def readable() -> None:
            try:
                pgconn.consume_input()
            except psycopg.Error as e:
                loop.remove_reader(fd)
                if not lost.done():
                    lost.set_exception(e)
                return
            foreign = False
            while (notify := pgconn.notifies()) is not None:
                foreign = foreign or notify.be_pid != writer.backend_pid
            if foreign:
                self._notified.set()

        fd = pgconn.socket
        loop.add_reader(fd, readable)
        readable()  # what libpq read with the LISTEN's answer would not wake the reader
        try:
            await lost
        finally:
            loop.remove_reader(fd)

    async def _poll(self) -> None:
        last_seen: int | None = None
        while True:
            try:
                # Not wait_for: on Python 3.11 it swallows a cancellation that arrives
                # as a notification does, and this loop would outlive close().
                async with asyncio.timeout(self._watch_seconds):
                    await self._notified.wait()
                woken = True
            except TimeoutError:
                woken = False
            self._notified.clear()
            try:
                if not woken:  # the safety net: did anything commit unheard?
                    top = await self._fetchone("SELECT COALESCE(MAX(id), 0) AS m FROM task_events")
                    current = top["m"] if top else 0
                    if current == last_seen or current <= self._delivered_through:
                        last_seen = current
                        continue
                    last_seen = current
                await self._foreign_commit()
            except Exception:
                logger.exception("looking for other processes' commits failed")


async def _configure_async(conn: psycopg.AsyncConnection[Any]) -> None:
    _configure(conn)


async def open_pg(url: str, *, clock: Callable[[], datetime] = utcnow) -> PgTaskStore:
    """The store behind ``url`` (``postgresql://...``)."""
    return await PgTaskStore.open_url(url, clock=clock)
