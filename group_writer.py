"""The store's single writer: write transactions in one thread, several under one COMMIT.

A write is a small synchronous function of a :class:`_Txn` (its connection, the time of
its transaction, the events it appended). :class:`GroupWriter` queues writes from the
event loop and runs all those queued while a batch runs as the next batch, in one
transaction on one connection in one thread (:class:`WriterThread`); a caller resumes
only after its batch committed, and the batch's events go to ``on_commit`` first.

The SQLite store (storage.py) hands it the functions that open its connection
(``connect``, which also migrates the file) and read the last event id, so this module
imports nothing of the store; the PostgreSQL store (storage_pg.py) subclasses it with a
connection of its own. Both share the batching, the retry with a savepoint per write,
and the hand-on of other processes' events before the batch's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from concurrent.futures import Future as ThreadFuture
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from store_model import (
    Event,
    StoreError,
    WriterStopped,
    _event_from_row,
    isoformat,
    named_sqlite_error,
)

__all__ = ["GroupWriter", "WriteOp", "WriterThread"]

T = TypeVar("T")

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Txn:
    """A write transaction in progress: its connection and the events it appended."""

    db: sqlite3.Connection
    now: str
    events: list[Event] = field(default_factory=list)


WriteOp = Callable[[_Txn], Any]


class GroupWriter:
    """Runs write transactions in one thread, several under one COMMIT.

    Each write is a small synchronous function of a :class:`_Txn`. Writes
    queued while a batch runs go into the next batch: one thread hop and one
    COMMIT for the lot, each write inside its own SAVEPOINT so one failing
    write rolls back alone. aiosqlite runs one statement per hop and has no
    public way to run a function on its thread, so the writer is a plain
    sqlite3 connection on a thread of its own (:class:`WriterThread`, aiosqlite's
    model); reads stay on aiosqlite. A caller resumes only after its batch committed.
    """

    MAX_BATCH = 256

    def __init__(self, path: Path, clock: Callable[[], datetime],
                 on_commit: Callable[[list[Event]], None],
                 delivered_through: Callable[[], int] = lambda: 0, *,
                 connect: Callable[[Path], sqlite3.Connection] | None = None,
                 last_event_id: Callable[[sqlite3.Connection], int] | None = None) -> None:
        self._path = path
        self._connect = connect
        self._last_event_id = last_event_id
        self._clock = clock
        self._on_commit = on_commit
        self._delivered_through = delivered_through
        self._executor = WriterThread("zhiyi-sqlite-writer")
        self._db: sqlite3.Connection | None = None
        self._queue: list[tuple[WriteOp, asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None
        #: the highest event id this writer handed on (its own, or another process's before it)
        self._seen_event_id = 0

    async def start(self) -> None:
        """Open the connection (``connect``, in the writer thread) and read the last event id."""
        if self._connect is None or self._last_event_id is None:
            raise TypeError("GroupWriter.start needs connect= and last_event_id= "
                            "(or a subclass that opens its own connection)")
        self._db = await self._executor.run(self._connect, self._path)
        self._seen_event_id = await self._executor.run(self._last_event_id, self._db)

    @property
    def start_event_id(self) -> int:
        """The last event id committed when the writer opened (streams start after it)."""
        return self._seen_event_id

    async def data_version(self) -> int:
        """``PRAGMA data_version`` of the writer: it changes when another process commits."""
        assert self._db is not None
        return await self._executor.run(_data_version, self._db)

    async def close(self) -> None:
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        if self._db is not None:
            db, self._db = self._db, None
            await self._executor.run(db.close)
        self._executor.shutdown(wait=True)

    def submit(self, op: WriteOp) -> asyncio.Future[Any]:
        """Queue a write; the future resolves after its batch committed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((op, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush(), name="zhiyi-sqlite-flush")
        return future

    async def run(self, op: WriteOp) -> Any:
        # Shielded: once queued, a write commits even if its caller is cancelled.
        return await asyncio.shield(self.submit(op))

    async def _flush(self) -> None:
        while self._queue:
            batch = self._queue[: self.MAX_BATCH]
            del self._queue[: self.MAX_BATCH]
            running = self._executor.run(self._run_batch, [op for op, _ in batch])
            try:
                await asyncio.shield(running)
            except asyncio.CancelledError:
                # The thread goes on and may commit: its callers hear what really
                # happened, the writes not started hear that they never ran, and the
                # cancellation goes on up.
                await _settled(running)
                self._settle(batch, _outcomes(running, len(batch)))
                self._abandon_queue()
                raise
            except Exception:
                pass  # the executor itself failed: _outcomes fails each write with it
            self._settle(batch, _outcomes(running, len(batch)))

    def _settle(self, batch: list[tuple[WriteOp, asyncio.Future[Any]]],
                outcomes: list[_Done | _Failed]) -> None:
        """Publish the batch's events, then resolve each caller's future."""
        events = [e for o in outcomes if isinstance(o, _Done) for e in o.events]
        if events:
            self._on_commit(events)
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if future.done():
                continue
            if isinstance(outcome, _Failed):
                future.set_exception(outcome.error)
            else:
                future.set_result(outcome.result)

    def _abandon_queue(self) -> None:
        queued, self._queue = self._queue, []
        for _, future in queued:
            if not future.done():
                future.set_exception(WriterStopped("the database writer stopped before "
                                                   "this write ran; nothing was changed"))

    def _run_batch(self, ops: list[WriteOp]) -> list[_Done | _Failed]:
        """In the writer thread: all the writes in one transaction.

        Optimistic first: no savepoints. If a write raises, the transaction is
        rolled back and the batch runs again with a savepoint per write, so
        the failing one rolls back alone (writes are pure functions of the
        database and their arguments, so running one twice is safe).

        The events other processes committed just before this batch's own go
        first, so listeners get every event in id order (see
        :meth:`_events_before`).
        """
        try:
            return self._transaction(ops, isolate=len(ops) == 1)
        except _RetryIsolated as e:
            cause = e.__cause__
            # A refusal (StoreError) is an expected answer; anything else is worth a look.
            level = logging.INFO if isinstance(cause, StoreError) else logging.WARNING
            logger.log(level, "a write failed in a batch of %d (%s: %s); running the batch "
                       "again with one savepoint per write", len(ops),
                       type(cause).__name__, cause)
            return self._transaction(ops, isolate=True)
        except Exception as e:
            named = named_sqlite_error(e)
            if named is e:
                logger.exception("a write batch failed to commit")
            else:
                logger.warning("a write batch of %d was not committed: %s", len(ops), named)
            return [_Failed(named)] * len(ops)

    def _transaction(self, ops: list[WriteOp], *, isolate: bool) -> list[_Done | _Failed]:
        db = self._db
        assert db is not None
        now = isoformat(self._clock())
        outcomes: list[_Done | _Failed] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            for op in ops:
                outcomes.append(_run_op(db, op, now, isolate))
            earlier, seen = self._events_before(db, outcomes)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self._seen_event_id = seen
        if earlier:  # published before this batch's own events
            first = next(o for o in outcomes if isinstance(o, _Done))
            first.events[:0] = earlier
        return outcomes

    def _events_before(self, db: sqlite3.Connection,
                       outcomes: list[_Done | _Failed]) -> tuple[list[Event], int]:
        """Events committed by other processes between our last event and this batch's first.

        This transaction holds the write lock, so every id below its own is
        committed: reading them here lets this batch's events be handed on
        right after them, in id order, without waiting for the tailer. In a
        single process the range is empty and nothing is read. Returns them
        and the new highest id seen.
        """
        own = [e.id for o in outcomes if isinstance(o, _Done) for e in o.events]
        if not own:
            return [], self._seen_event_id
        after = max(self._seen_event_id, self._delivered_through())
        first, last = min(own), max(own)
        if first <= after + 1:
            return [], last
        rows = db.execute("SELECT * FROM task_events WHERE id > ? AND id < ? ORDER BY id",
                          (after, first)).fetchall()
        return [_event_from_row(r) for r in rows], last


class _RetryIsolated(Exception):
    """A write failed in an optimistic batch: run the batch again with savepoints."""


def _run_op(db: sqlite3.Connection, op: WriteOp, now: str, isolate: bool) -> _Done | _Failed:
    txn = _Txn(db, now)
    if not isolate:
        try:
            return _Done(op(txn), txn.events)
        except Exception as e:
            raise _RetryIsolated from e
    db.execute("SAVEPOINT op")
    try:
        result = op(txn)
    except Exception as e:
        db.execute("ROLLBACK TO op")
        db.execute("RELEASE op")
        return _Failed(e)
    db.execute("RELEASE op")
    return _Done(result, txn.events)


class WriterThread(Executor):
    """One thread that runs functions for the event loop, one at a time, in order.

    ``run(fn, *args)`` is the writer's hop: a queue put, and one
    ``call_soon_threadsafe`` back with the answer. ``loop.run_in_executor`` on a
    one-thread pool does the same through a concurrent future chained to the
    loop's (a lock and callbacks each way): about 60 µs of CPU a hop against 30
    here, and every write batch takes one. It stays an ``Executor`` (``submit``)
    for the rare calls made through ``run_in_executor`` (opening, closing).
    """

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        # A daemon, as the pool's threads are joined at exit only to finish their work:
        # the store's close() stops it; a process that dies mid-batch is a crash SQLite
        # recovers from (the transaction was never committed). Started by the first
        # call, as the pool's was: a writer made and replaced unused costs no thread.
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._stopped = False

    def run(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """``fn(*args)`` in the thread; the loop's future of its result (or error)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        if self._stopped:
            future.set_exception(WriterStopped("the database writer is closed"))
            return future

        def call() -> None:
            try:
                result = fn(*args)
            except BaseException as e:  # handed to the caller, whatever it is
                _answer(loop, future, None, e)
            else:
                _answer(loop, future, result, None)
        self._put(call)
        return future

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> ThreadFuture[T]:
        if self._stopped:
            raise RuntimeError("cannot schedule new futures after shutdown")
        done: ThreadFuture[T] = ThreadFuture()

        def call() -> None:
            if done.set_running_or_notify_cancel():
                try:
                    done.set_result(fn(*args, **kwargs))
                except BaseException as e:
                    done.set_exception(e)
        self._put(call)
        return done

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop after the calls queued so far; later calls fail at once (never hang)."""
        if self._stopped:
            return
        self._stopped = True
        if not self._thread.is_alive():
            return  # never started: nothing queued
        self._calls.put(None)
        if wait and self._thread is not threading.current_thread():
            self._thread.join()

    def _put(self, call: Callable[[], None]) -> None:
        if not self._thread.is_alive():
            self._thread.start()
        self._calls.put(call)

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            call()


def _answer(loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], result: Any,
            error: BaseException | None) -> None:
    """From the thread: resolve ``future`` on its loop (unless the loop is gone)."""
    with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting
        loop.call_soon_threadsafe(_resolve, future, result, error)


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


async def _settled(running: asyncio.Future[Any]) -> None:
    """Wait for ``running`` to end even if cancelled again meanwhile."""
    while not running.done():
        try:
            await asyncio.shield(running)
        except asyncio.CancelledError:
            continue
        except Exception:
            return


def _outcomes(running: asyncio.Future[Any], size: int) -> list[_Done | _Failed]:
    """The batch's outcomes, or the executor's own failure for each of its writes."""
    if running.cancelled():
        return [_Failed(WriterStopped("the write batch was abandoned"))] * size
    error = running.exception()
    if error is not None:
        return [_Failed(error)] * size
    return running.result()


@dataclass(slots=True)
class _Done:
    result: Any
    events: list[Event]


@dataclass(slots=True)
class _Failed:
    error: BaseException


def _data_version(db: sqlite3.Connection) -> int:
    """``PRAGMA data_version``: SQLite moves it when another connection commits."""
    return db.execute("PRAGMA data_version").fetchone()[0]
