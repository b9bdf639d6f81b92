"""The store on its own: migrations, credits that never drift, races, refunds once."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sqlite3
import threading
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from helpers import new_task

from storage import (
    SCHEMA_VERSION,
    Event,
    FilesExpired,
    InsufficientCredits,
    InvalidTransition,
    SQLiteTooOld,
    StorageQuotaExceeded,
    StreamStart,
    Task,
    TaskNotFound,
    TaskStatus,
    TaskStore,
    TooManyActiveTasks,
    UserExists,
    WriterStopped,
)
from translation_memory import Entry, Scope, memory_key

FIXTURES = Path(__file__).parent / "fixtures"


pytestmark = pytest.mark.both_stores


@pytest.fixture
async def store(open_test_store):
    return await open_test_store()


async def ledger_sum(store: TaskStore, user: str) -> int:
    entries, cursor = await store.get_ledger(user, limit=10_000)
    assert cursor is None
    return sum(e.amount for e in entries)


async def test_older_schema_migrates_without_losing_rows(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.executescript((FIXTURES / "schema_v1.sql").read_text())
        db.execute("INSERT INTO users VALUES ('alice', 4, '2025-01-01T00:00:00.000Z')")
        db.execute("INSERT INTO users VALUES ('bob', 0, '2025-01-01T00:00:00.000Z')")
        for user in ("alice", "bob", "alice"):
            db.execute("""INSERT INTO processing_tasks (user_id, task_type, status, file_name,
                          file_size, file_path, credits_cost, created_at, updated_at)
                          VALUES (?, 'translate', 'completed', 'a.txt', 3, 'x/x', 1,
                          '2025-01-01T00:00:00.000Z', '2025-01-01T00:00:00.000Z')""", (user,))
        db.execute("""INSERT INTO credit_ledger (user_id, amount, reason, balance_after,
                      created_at) VALUES ('alice', 4, 'grant', 4, '2025-01-01T00:00:00.000Z')""")
    store = await TaskStore.open(path)
    try:
        user = await store.get_user("alice")
        assert user is not None and user.credits == 4
        task = await store.get_task_by_id(1, "alice")
        assert task.status is TaskStatus.COMPLETED and task.stage is None
        assert task.checkpoint is None and task.files_expired is False
        # Version 6: each user's tasks numbered in order; the next one goes on from there.
        numbers = [(t.user_id, t.user_task_no) for t in
                   [await store.get_task_by_id(i) for i in (1, 2, 3)]]
        assert numbers == [("alice", 1), ("bob", 1), ("alice", 2)]
        # Version 9: the files each user's tasks keep, summed once at the migration.
        assert await store.storage_used("alice") == 6 and await store.storage_drift() == {}
        made, _ = await store.create_processing_task(new_task("alice", cost=0))
        assert made.user_task_no == 3
        assert task.detected_lang is None  # version 8: not known for tasks made before
        token = await store.issue_token("alice", kind="session")
        assert await store.user_for_token(token) == "alice"
        assert await store.events_pruned_through() == 0
        # Version 3: the translation memory, usable on the migrated file.
        remembered = Entry("en", "fr", "pseudo", "Hello  world.", "Bonjour le monde.")
        assert await store.memory_remember("alice", [remembered]) == 1
        scope = Scope("en", "fr", "pseudo")
        assert await store.memory_lookup("alice", scope, [memory_key("Hello world.")]) == {
            memory_key("Hello world."): "Bonjour le monde."}
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    # Opening again is a no-op.
    store = await TaskStore.open(path)
    await store.close()


async def test_newer_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(Exception, match="newer than this Zhiyi"):
        await TaskStore.open(path)


async def test_new_database_has_current_version(tmp_path: Path) -> None:
    store = await TaskStore.open(tmp_path / "new.db")
    await store.close()
    with sqlite3.connect(tmp_path / "new.db") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_user_exists_and_negative_grant(store: TaskStore) -> None:
    await store.add_user("alice", 3)
    with pytest.raises(UserExists):
        await store.add_user("alice")
    with pytest.raises(InsufficientCredits) as refused:
        await store.grant_credits("alice", -4)
    assert (refused.value.needed, refused.value.balance) == (4, 3)
    assert await store.grant_credits("alice", -3) == 0
    assert await ledger_sum(store, "alice") == 0


async def test_refund_happens_exactly_once(store: TaskStore) -> None:
    await store.add_user("alice", 5)
    task, _ = await store.create_processing_task(new_task("alice", cost=2))
    claimed = await store.claim_next_task("w", 60)
    assert claimed is not None and claimed.id == task.id
    assert await store.fail_task(task.id, "boom", attempt=claimed.attempts) is not None
    assert await store.fail_task(task.id, "boom again") is None
    with pytest.raises(InvalidTransition):
        await store.cancel_task(task.id, "alice")
    assert (await store.get_user("alice")).credits == 5
    entries, _ = await store.get_ledger("alice")
    assert [e.reason for e in entries] == ["refund", "charge", "grant"]


async def test_stale_attempt_cannot_complete(store: TaskStore) -> None:
    await store.add_user("alice", 5)
    task, _ = await store.create_processing_task(new_task("alice"))
    first = await store.claim_next_task("w", 60)
    await store.requeue_orphans(3, dead_owners=["w"])
    second = await store.claim_next_task("w", 60)
    assert second is not None and second.attempts == first.attempts + 1
    assert await store.complete_task(task.id, "r.txt", attempt=first.attempts) is None
    assert await store.complete_task(task.id, "r.txt", attempt=second.attempts) is not None


async def test_a_stale_or_ended_attempt_is_refused_by_every_guarded_write(
        store: TaskStore) -> None:
    """The writes that update the row and return it in one statement (``RETURNING``)
    still refuse an attempt that moved on: nothing changes and no event is written."""
    await store.add_user("alice", 5)
    task, _ = await store.create_processing_task(new_task("alice", cost=2))
    first = await store.claim_next_task("w", 60)
    await store.requeue_orphans(3, dead_owners=["w"])
    second = await store.claim_next_task("w", 60)
    assert first is not None and second is not None and second.id == task.id
    before = await everything(store, "alice")
    stale = first.attempts
    assert await store.complete_task(task.id, "r.txt", attempt=stale) is None
    assert await store.fail_task(task.id, "boom", attempt=stale) is None
    assert await store.schedule_retry(task.id, stale, 0, "again") is None
    assert await store.set_external(task.id, stale, "ext-1", store.now()) is None
    assert await store.release_tasks([(task.id, stale)]) == []
    assert not await store.update_task_status(task.id, stale, progress=50, message="late")
    assert await store.claim_next_task("w", 60) is None  # the one task is taken
    assert await everything(store, "alice") == before
    assert await store.complete_task(task.id, "r.txt", attempt=second.attempts) is not None
    ended = await everything(store, "alice")
    assert await store.fail_task(task.id, "late") is None
    assert await store.update_external_progress(task.id, 10, "late") is None
    assert await store.complete_task(task.id, "again.txt") is None
    assert await everything(store, "alice") == ended


async def test_each_state_change_returns_and_announces_the_row_as_stored(
        store: TaskStore) -> None:
    """A state change's task and its event come from its own statement (``RETURNING``),
    not from a second read: both must be what a fresh read finds, refunds included."""
    await store.add_user("alice", 10)
    seen: list[Event] = []
    store.add_listener(seen.append)

    async def as_stored(changed: object) -> None:
        assert isinstance(changed, Task)
        stored = await store.get_task_by_id(changed.id)
        assert changed == stored
        last = [e for e in seen if e.task_id == stored.id and e.type == "status_update"][-1]
        assert last.data == store.status_data(stored)

    async def claim() -> Task:
        claimed = await store.claim_next_task("w", 60)
        await as_stored(claimed)
        assert claimed is not None
        return claimed

    done, _ = await store.create_processing_task(new_task("alice", cost=2))
    await as_stored(done)
    attempt = (await claim()).attempts
    await as_stored(await store.set_external(done.id, attempt, "ext-1", store.now()))
    await as_stored(await store.update_external_progress(done.id, 40, "halfway"))
    await as_stored(await store.complete_task(done.id, "r.txt", attempt=attempt))

    failed, _ = await store.create_processing_task(new_task("alice", cost=2))
    attempt = (await claim()).attempts
    refunded = await store.fail_task(failed.id, "boom", attempt=attempt)
    await as_stored(refunded)
    assert refunded is not None and refunded.credits_held == 0

    again = await store.retry_task(failed.id, "alice")
    await as_stored(again)
    assert again.credits_held == 2
    attempt = (await claim()).attempts
    await as_stored(await store.schedule_retry(failed.id, attempt, 0, "once more"))
    await claim()
    (requeued,) = await store.requeue_orphans(3, dead_owners=["w"])
    await as_stored(requeued)
    assert requeued.status is TaskStatus.PENDING
    attempt = (await claim()).attempts
    (released,) = await store.release_tasks([(failed.id, attempt)])
    await as_stored(released)
    await claim()
    (out_of_attempts,) = await store.requeue_orphans(1, dead_owners=["w"])
    await as_stored(out_of_attempts)
    assert out_of_attempts.status is TaskStatus.FAILED and out_of_attempts.credits_held == 0

    cancelled, _ = await store.create_processing_task(new_task("alice", cost=2))
    await as_stored(await store.cancel_task(cancelled.id, "alice"))
    deleted, _ = await store.create_processing_task(new_task("alice", cost=2))
    gone = await store.delete_task(deleted.id, "alice")
    assert (gone.id, gone.status, gone.credits_held) == (deleted.id, TaskStatus.CANCELLED, 0)
    assert (await store.get_user("alice")).credits == 10 - 2  # only the completed task paid
    assert await store.balance_drift() == {}


async def test_a_refused_create_leaves_no_count_behind(store: TaskStore) -> None:
    """The create counts the user's tasks and kept bytes in the statement that moves the
    counters, and refuses after it: a refused create, alone or in a batch with others,
    takes no task number and keeps no bytes."""
    await store.add_user("alice", 10)

    def create(max_active: int = 100, max_storage: int = 0):
        return store.create_processing_task(replace(
            new_task("alice"), max_active=max_active, max_storage=max_storage))

    first, _ = await create()
    with pytest.raises(TooManyActiveTasks):
        await create(max_active=1)
    with pytest.raises(StorageQuotaExceeded):
        await create(max_storage=first.file_size + 1)
    # In one batch: the refused writes roll back alone.
    results = await asyncio.gather(create(max_active=1), create(), create(max_active=2),
                                   return_exceptions=True)
    assert isinstance(results[0], TooManyActiveTasks)
    assert isinstance(results[2], TooManyActiveTasks)
    assert not isinstance(results[1], BaseException)
    assert results[1][0].user_task_no == 2
    user = await store.get_user("alice")
    assert (user.storage_bytes, user.credits) == (2 * first.file_size, 8)
    assert await store.balance_drift() == {}


async def test_concurrent_charges_never_overdraw(store: TaskStore) -> None:
    await store.add_user("alice", 10)
    results = await asyncio.gather(
        *(store.create_processing_task(new_task("alice")) for _ in range(50)),
        return_exceptions=True)
    created = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, InsufficientCredits)]
    assert len(created) == 10 and len(refused) == 40
    assert (await store.get_user("alice")).credits == 0
    assert await ledger_sum(store, "alice") == 0


@pytest.mark.parametrize("seed", range(4))
async def test_credits_never_drift(store: TaskStore, seed: int) -> None:
    """Random sequences of create/cancel/fail/retry/grant/complete keep balance == ledger."""
    rng = random.Random(seed)
    users = ["ann", "ben", "cai"]
    for user in users:
        await store.add_user(user, rng.randint(0, 6))
    for _ in range(150):
        user = rng.choice(users)
        tasks, _ = await store.get_user_tasks(user, limit=100)
        op = rng.choice(["create", "create", "cancel", "fail", "retry", "grant", "complete",
                         "delete"])
        try:
            await apply_op(store, rng, op, user, tasks)
        except (InsufficientCredits, InvalidTransition, TaskNotFound):
            pass
        for name in users:
            balance = (await store.get_user(name)).credits
            assert balance >= 0
            assert balance == await ledger_sum(store, name), (op, name)
    assert await store.balance_drift() == {}


async def apply_op(store: TaskStore, rng: random.Random, op: str, user: str, tasks) -> None:
    target = rng.choice(tasks) if tasks else None
    if op == "create":
        key = rng.choice([None, None, "k1", "k2"])
        await store.create_processing_task(new_task(user, rng.randint(0, 3), key))
    elif op == "grant":
        await store.grant_credits(user, rng.randint(-3, 5))
    elif target is None:
        return
    elif op == "cancel":
        await store.cancel_task(target.id, user)
    elif op == "retry":
        await store.retry_task(target.id, user)
    elif op == "delete":
        await store.delete_task(target.id, user)
    elif op == "fail":
        await store.fail_task(target.id, "random failure")
    elif op == "complete":
        claimed = await store.claim_next_task("w", 60)
        if claimed is not None:
            await store.complete_task(claimed.id, "r.txt", attempt=claimed.attempts)


async def test_events_are_appended_in_the_same_transaction(store: TaskStore) -> None:
    seen = []
    store.add_listener(seen.append)
    await store.add_user("alice", 5)
    task, _ = await store.create_processing_task(new_task("alice"))
    await store.cancel_task(task.id, "alice")
    events = await store.events_after(0, task_id=task.id)
    assert [e.data["status"] for e in events] == ["pending", "cancelled"]
    assert [e.id for e in seen if e.task_id == task.id] == [e.id for e in events]
    assert events[-1].is_final


def add_refusing_trigger(path: Path, name: str, table: str, when: str) -> None:
    """Make the database itself refuse some writes, from outside the store."""
    with sqlite3.connect(path) as db:
        db.execute(f"""CREATE TRIGGER {name} BEFORE {table} WHEN {when}
                       BEGIN SELECT RAISE(ABORT, 'refused by the test'); END""")


async def everything(store: TaskStore, user: str) -> tuple[list, list, list, int]:
    """Every row a state change can touch: tasks, events, ledger, balance."""
    tasks = [(t.id, t.status, t.credits_held)
             for t in (await store.get_user_tasks(user, limit=100))[0]]
    events = [(e.id, e.type, e.data) for e in await store.events_after(0, user_id=user)]
    ledger = [(e.amount, e.reason, e.task_id) for e in (await store.get_ledger(user))[0]]
    return tasks, events, ledger, (await store.get_user(user)).credits


@pytest.mark.sqlite_only  # the refusal is an SQLite trigger made from outside the store
@pytest.mark.parametrize(("table", "when"), [
    # The event row cannot be written: the cancel, the refund and its ledger row go too.
    ("INSERT ON task_events", """NEW.task_id = 1 AND NEW.data LIKE '%"cancelled"%'"""),
    # The state change cannot be written: no event row is left behind (nor published).
    ("UPDATE OF status ON processing_tasks", "NEW.id = 1 AND NEW.status = 'cancelled'"),
])
async def test_state_change_and_its_event_commit_or_fail_together(
        tmp_path: Path, store: TaskStore, table: str, when: str) -> None:
    await store.add_user("alice", 5)
    first, _ = await store.create_processing_task(new_task("alice", cost=2))
    second, _ = await store.create_processing_task(new_task("alice", cost=2))
    assert first.id == 1
    before = await everything(store, "alice")
    seen = []
    store.add_listener(seen.append)
    add_refusing_trigger(tmp_path / "zhiyi.db", "refuse", table, when)
    # Both cancels go in one write batch: the refused one must fail alone and whole.
    refused, cancelled = await asyncio.gather(
        store.cancel_task(first.id, "alice"), store.cancel_task(second.id, "alice"),
        return_exceptions=True)
    assert isinstance(refused, sqlite3.IntegrityError)
    assert not isinstance(cancelled, BaseException) and cancelled.id == second.id
    tasks, events, ledger, credits = await everything(store, "alice")
    assert (first.id, TaskStatus.PENDING, 2) in tasks
    assert (second.id, TaskStatus.CANCELLED, 0) in tasks
    assert credits == before[3] + 2 == 1 + 2  # only the second task's refund
    assert ledger[1:] == before[2] and ledger[0] == (2, "refund", second.id)
    new_events = events[len(before[1]):]
    assert events[:len(before[1])] == before[1]
    assert [(t, d.get("taskId"), d.get("status")) for _, t, d in new_events] == [
        ("notification", None, None), ("status_update", second.id, "cancelled")]
    assert [e.id for e in seen] == [e[0] for e in new_events]


# ------------------------------------- ledger, event rows and replay bounds
async def test_ledger_pages_cover_every_entry_once(store: TaskStore) -> None:
    await store.add_user("alice", 1)
    for amount in range(2, 7):
        await store.grant_credits("alice", amount)
    every, cursor = await store.get_ledger("alice", limit=100)
    assert cursor is None and [e.amount for e in every] == [6, 5, 4, 3, 2, 1]  # newest first
    for limit, sizes in ((3, [3, 3]), (4, [4, 2]), (6, [6]), (1, [1] * 6)):
        pages, cursor = [], None
        while True:
            page, cursor = await store.get_ledger("alice", limit=limit, cursor=cursor)
            pages.append(page)
            if cursor is None:
                break
            assert cursor == page[-1].id
        assert [len(p) for p in pages] == sizes
        assert [e.id for p in pages for e in p] == [e.id for e in every]


@pytest.mark.sqlite_only  # changes the balance through the SQLite file
async def test_balance_drift_names_the_user_and_both_figures(
        tmp_path: Path, store: TaskStore) -> None:
    await store.add_user("alice", 5)
    await store.add_user("bob", 3)
    assert await store.balance_drift() == {}
    with sqlite3.connect(tmp_path / "zhiyi.db") as db:  # a balance changed behind the ledger
        db.execute("UPDATE users SET credits = 9 WHERE id = 'alice'")
    assert await store.balance_drift() == {"alice": (9, 5)}


async def test_retry_charges_again_and_only_from_failed_or_cancelled(store: TaskStore) -> None:
    await store.add_user("alice", 5)
    task, _ = await store.create_processing_task(new_task("alice", cost=2))
    with pytest.raises(InvalidTransition) as pending:
        await store.retry_task(task.id, "alice")
    assert (pending.value.status, pending.value.action) == ("pending", "retry")
    claimed = await store.claim_next_task("w", 60)
    await store.fail_task(task.id, "boom", attempt=claimed.attempts)
    assert (await store.get_user("alice")).credits == 5
    retried = await store.retry_task(task.id, "alice")
    assert retried.status is TaskStatus.PENDING and retried.attempts == 0
    assert retried.credits_held == 2 and (await store.get_user("alice")).credits == 3
    newest = (await store.get_ledger("alice", limit=1))[0][0]
    assert (newest.amount, newest.reason, newest.task_id, newest.balance_after) == (
        -2, "charge", task.id, 3)
    last = (await store.events_after(0, task_id=task.id))[-1]
    assert (last.type, last.data["status"]) == ("status_update", "pending")
    with pytest.raises(TaskNotFound):
        await store.retry_task(task.id, "bob")
    claimed = await store.claim_next_task("w", 60)
    await store.complete_task(task.id, "r.txt", attempt=claimed.attempts)
    with pytest.raises(InvalidTransition) as completed:
        await store.retry_task(task.id, "alice")
    assert (completed.value.status, completed.value.action) == ("completed", "retry")
    other, _ = await store.create_processing_task(new_task("alice", cost=1))
    await store.cancel_task(other.id, "alice")
    await store.mark_files_expired(other.id)
    with pytest.raises(FilesExpired) as expired:
        await store.retry_task(other.id, "alice")
    assert (expired.value.status, expired.value.action) == ("cancelled", "retry")
    third, _ = await store.create_processing_task(new_task("alice", cost=1))
    await store.cancel_task(third.id, "alice")
    await store.create_processing_task(new_task("alice", cost=0))  # one active task
    with pytest.raises(TooManyActiveTasks):
        await store.retry_task(third.id, "alice", max_active=1)
    assert (await store.retry_task(third.id, "alice", max_active=2)).status is TaskStatus.PENDING
    assert await store.balance_drift() == {}


async def test_refunds_say_how_much_and_a_free_task_moves_no_credits(store: TaskStore) -> None:
    await store.add_user("alice", 5)
    free, _ = await store.create_processing_task(new_task("alice", cost=0))
    await store.cancel_task(free.id, "alice")
    assert [e.reason for e in (await store.get_ledger("alice"))[0]] == ["grant"]
    assert not [e for e in await store.events_after(0, user_id="alice")
                if e.type == "notification"]
    paid, _ = await store.create_processing_task(new_task("alice", cost=2))
    await store.cancel_task(paid.id, "alice")
    notices = [e.data for e in await store.events_after(0, user_id="alice")
               if e.type == "notification"]
    assert notices == [
        {"level": "info", "message": f"2 credits charged for task {paid.id}", "credits": 3,
         "code": "credits_charged", "params": {"amount": 2, "taskId": paid.id, "taskNo": 2}},
        {"level": "info", "message": f"2 credits refunded for task {paid.id}", "credits": 5,
         "code": "credits_refunded", "params": {"amount": 2, "taskId": paid.id, "taskNo": 2}},
    ]


async def test_event_rows_keep_task_user_and_stored_text(store: TaskStore) -> None:
    await store.add_user("alice", 5)
    await store.add_user("bob", 5)
    task, _ = await store.create_processing_task(new_task("alice", cost=1))
    await store.cancel_task(task.id, "alice")
    await store.grant_credits("alice", 1)
    await store.grant_credits("bob", 1)
    events = await store.events_after(0, user_id="alice")
    assert [(e.type, e.task_id) for e in events] == [  # charge, created, refund, cancelled
        ("notification", None), ("status_update", task.id), ("notification", None),
        ("status_update", task.id), ("notification", None)]
    assert {e.user_id for e in events} == {"alice"}
    for e in events:
        assert e.raw == json.dumps(e.data, ensure_ascii=False, separators=(",", ":"))
    assert await store.latest_event_id(user_id="alice") == events[-1].id
    assert await store.latest_event_id(task_id=task.id) == events[3].id
    assert await store.latest_event_id(user_id="nobody") == 0
    assert await store.latest_event_id(task_id=task.id + 1) == 0
    deleted = await store.delete_task(task.id, "alice")
    assert deleted.id == task.id
    gone = (await store.events_after(events[-1].id, user_id="alice"))[-1]
    assert (gone.type, gone.task_id, gone.data, gone.is_final) == (
        "task_deleted", task.id, {"taskId": task.id}, True)


async def test_a_stream_starts_from_one_read_of_owner_snapshot_and_pruning(
        store: TaskStore) -> None:
    await store.add_user("alice", 5)
    await store.add_user("bob", 5)
    task, _ = await store.create_processing_task(new_task("alice", cost=1))
    await store.grant_credits("alice", 1)  # a notification: the user's newest event
    events = await store.events_after(0, user_id="alice")
    start = await store.stream_start(user_id="alice", task_id=task.id)
    assert start.latest == events[1].id == await store.latest_event_id(task_id=task.id)
    assert (start.state["taskId"], start.state["status"]) == (task.id, "pending")
    assert start.pruned_through == 0
    mine = await store.stream_start(user_id="alice")
    assert (mine.latest, mine.state) == (events[-1].id, start.state)
    assert await store.stream_start(user_id="bob") == StreamStart(0, None, 0)
    for user, task_id in (("bob", task.id), ("alice", task.id + 1)):
        with pytest.raises(TaskNotFound):
            await store.stream_start(user_id=user, task_id=task_id)
    await store.cancel_task(task.id, "alice")
    assert await store.prune_events(datetime(2099, 1, 1, tzinfo=UTC)) > 0  # all of them
    pruned = await store.stream_start(user_id="alice", task_id=task.id)
    assert (pruned.latest, pruned.state) == (0, None)
    assert pruned.pruned_through == await store.events_pruned_through() > 0


@pytest.mark.sqlite_only
async def test_point_reads_skip_the_reader_thread_and_fall_back_to_it(
        store: TaskStore, tmp_path: Path, monkeypatch) -> None:
    """A token check and a stream's start read on the loop's thread; when that connection
    cannot read (here: a file without the tables), the reader thread answers the same."""
    await store.add_user("alice", 5)
    token = await store.issue_token("alice")
    task, _ = await store.create_processing_task(new_task("alice"))
    threaded: list[str] = []
    read = store._fetchall

    async def counted(sql: str, args=()):
        threaded.append(sql)
        return await read(sql, args)

    monkeypatch.setattr(store, "_fetchall", counted)
    credential = await store.credential_for_token(token)
    start = await store.stream_start(user_id="alice", task_id=task.id)
    assert credential is not None and credential.user_id == "alice"
    assert start.state is not None and start.state["taskId"] == task.id
    assert threaded == []  # no hop
    assert await store.credential_for_token("not a token") is None

    empty = sqlite3.connect(tmp_path / "empty.db", isolation_level=None)
    monkeypatch.setattr(store, "_point_reader", empty)
    assert await store.credential_for_token(token) == credential
    assert await store.stream_start(user_id="alice", task_id=task.id) == start
    assert len(threaded) == 2  # both went to the reader thread
    empty.close()


async def test_listeners_get_each_event_once_in_id_order(store: TaskStore) -> None:
    """Own commits and the cross-process catch-up can bring the same events: once each."""
    seen: list[int] = []
    store.add_listener(lambda e: seen.append(e.id))
    failing = []

    def broken(event: Event) -> None:
        failing.append(event.id)
        raise RuntimeError("a listener's bug")

    store.add_listener(broken)
    events = [Event(i, None, "alice", "notification", {"n": i}) for i in range(1, 6)]
    store._publish(events[:3])  # a commit's events
    store._publish(events[1:])  # the catch-up read 2-5 meanwhile: 2 and 3 again
    store._publish(events[:1])  # late and old: nothing
    assert seen == [1, 2, 3, 4, 5]
    assert failing == seen  # one listener failing does not stop the others or the rest


async def test_pruning_nothing_says_so(store: TaskStore) -> None:
    await store.add_user("alice", 5)
    assert await store.prune_events(datetime(2000, 1, 1, tzinfo=UTC)) == 0
    assert await store.events_pruned_through() == 0


# ------------------------------------------------------- the writer's edges
async def test_cancelled_flusher_tells_callers_the_real_outcome(store: TaskStore) -> None:
    """A batch that commits while its flusher is cancelled: the caller hears 'committed'."""
    await store.add_user("alice", 0)
    in_thread, release = threading.Event(), threading.Event()

    def slow_grant(txn) -> int:
        in_thread.set()
        release.wait(10)
        txn.db.execute("UPDATE users SET credits = 7 WHERE id = 'alice'")
        return 7

    writer = store._writer
    caller = asyncio.ensure_future(writer.run(slow_grant))
    await asyncio.to_thread(in_thread.wait, 10)
    queued = writer.submit(lambda txn: txn.db.execute("UPDATE users SET credits = 9"))
    flusher = writer._flusher
    assert flusher is not None
    flusher.cancel()
    await asyncio.sleep(0)
    release.set()

    assert await caller == 7  # committed, and told so
    with pytest.raises(asyncio.CancelledError):
        await flusher  # the cancellation was not swallowed
    with pytest.raises(WriterStopped):
        await queued  # never ran, and says so
    user = await store.get_user("alice")
    assert user is not None and user.credits == 7


async def test_failed_write_in_a_batch_is_logged_and_fails_alone(
    store: TaskStore, caplog: pytest.LogCaptureFixture
) -> None:
    await store.add_user("alice", 1)

    def boom(txn) -> None:
        raise sqlite3.OperationalError("disk says no")

    caplog.set_level(logging.INFO, logger="group_writer")  # GroupWriter._run_batch logs
    good = asyncio.ensure_future(store.grant_credits("alice", 2))
    await asyncio.sleep(0)  # queue the grant first, then the failing write: one batch
    bad = store._writer.submit(boom)
    assert await good == 3
    with pytest.raises(sqlite3.OperationalError):
        await bad
    retries = [r for r in caplog.records if "one savepoint per write" in r.getMessage()]
    assert len(retries) == 1 and retries[0].levelno == logging.WARNING
    assert "disk says no" in retries[0].getMessage()


async def test_old_sqlite_is_refused_at_start(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 31, 1))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.31.1")
    with pytest.raises(SQLiteTooOld, match=r"SQLite 3\.31\.1 is too old.*3\.35"):
        await TaskStore.open(tmp_path / "zhiyi.db")
    assert not (tmp_path / "zhiyi.db").exists()


def test_old_sqlite_is_one_line_from_the_cli(tmp_path: Path, monkeypatch, capsys) -> None:
    import zhiyi_server

    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 31, 1))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.31.1")
    assert zhiyi_server.main(["user", "list", "--data", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("zhiyi: SQLite 3.31.1 is too old") and "\n" not in err


async def test_memory_pages_cover_every_entry_once(store: TaskStore) -> None:
    await store.add_user("alice")
    entries = [Entry("en", target, engine, f"Sentence {i}.", f"{target} {i}")
               for i in range(7) for target in ("de", "fr") for engine in ("pseudo",)]
    assert await store.memory_remember("alice", entries) == 14
    seen, after = [], None
    while page := await store.memory_entries("alice", after=after, limit=3):
        seen += [entry for _, entry in page]
        after = page[-1][0]
    assert sorted(seen, key=repr) == sorted(entries, key=repr)
    assert await store.memory_clear("alice", Scope("en", "de", "pseudo")) == 7
    assert [(s, n) for s, n in await store.memory_summary("alice")] == [
        (Scope("en", "fr", "pseudo"), 7)]


async def test_task_numbers_are_per_user_and_never_reused(store: TaskStore) -> None:
    """``user_task_no`` counts each user's tasks; a deleted task's number is not given
    again (the counter is on the user, not MAX()+1), and the global id is unchanged."""
    await store.add_user("alice", 10)
    await store.add_user("bob", 10)
    a1, _ = await store.create_processing_task(new_task("alice"))
    b1, _ = await store.create_processing_task(new_task("bob"))
    a2, _ = await store.create_processing_task(new_task("alice"))
    assert [(t.id, t.user_task_no) for t in (a1, b1, a2)] == [(a1.id, 1), (b1.id, 1), (a2.id, 2)]
    await store.cancel_task(a2.id, "alice")
    await store.delete_task(a2.id, "alice")
    a3, _ = await store.create_processing_task(new_task("alice"))
    assert a3.user_task_no == 3
    again, created = await store.create_processing_task(new_task("alice", key="k"))
    repeat, created_again = await store.create_processing_task(new_task("alice", key="k"))
    assert created and not created_again and repeat.user_task_no == again.user_task_no == 4
    assert (await store.get_user("alice")).tasks_made == 4


async def test_close_is_not_lost_to_a_wake_up_arriving_with_it(
        tmp_path: Path, database_url: str | None) -> None:
    """A commit's wake-up (SQLite: a peer's ping; PostgreSQL: a NOTIFY) set in the same
    moment as close() cancels the watcher: on Python 3.11, asyncio.wait_for returns the
    wake-up and drops the cancellation, and the watcher's loop then ran for ever."""
    from storage import open_store

    for _ in range(3):
        store = await open_store(tmp_path / "zhiyi.db", database_url)
        store.add_listener(lambda event: None)  # starts the watcher
        wake_up = getattr(store, "_notified", None) or store._wake.poked  # type: ignore[attr-defined]
        while not wake_up._waiters:  # the watcher waits for a wake-up (or its poll)
            await asyncio.sleep(0.01)
        wake_up.set()
        async with asyncio.timeout(30):  # a bound on a hang, not a measure of speed
            await store.close()


def test_the_writer_thread_answers_in_order_and_outlives_a_closed_loop() -> None:
    """WriterThread: results and errors come back to the loop in order; submit() serves
    run_in_executor; an answer for a loop that has gone is dropped, not raised in the
    thread, which goes on serving the next loop."""
    from storage import WriterThread

    lane = WriterThread("test-writer")
    gate = threading.Event()

    async def first() -> asyncio.Future[bool]:
        order: list[int] = []
        answers = await asyncio.gather(*(lane.run(lambda i=i: order.append(i) or i * i)
                                         for i in range(50)))
        assert answers == [i * i for i in range(50)] and order == list(range(50))
        with pytest.raises(ZeroDivisionError):
            await lane.run(lambda: 1 // 0)
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(lane, pow, 2, 10) == 1024
        return lane.run(gate.wait)  # still blocked when this loop closes

    async def second() -> str:
        return await lane.run(lambda: "still serving")

    try:
        late = asyncio.run(first())
        gate.set()  # the blocked call ends and answers a closed loop
        assert asyncio.run(second()) == "still serving"
        assert not late.done()
    finally:
        lane.shutdown()

    async def after_shutdown() -> None:
        with pytest.raises(WriterStopped):
            await lane.run(lambda: "never")  # fails at once, never hangs
        with pytest.raises(RuntimeError, match="after shutdown"):
            lane.submit(pow, 2, 2)
    asyncio.run(after_shutdown())
    lane.shutdown()  # twice: nothing more


def test_a_writer_thread_never_used_starts_no_thread() -> None:
    """A store's writer replaced before use (the PostgreSQL store's) leaves no thread."""
    from storage import WriterThread

    before = {t.name for t in threading.enumerate()}
    unused = WriterThread("test-unused-writer")
    assert "test-unused-writer" not in {t.name for t in threading.enumerate()} - before
    unused.shutdown()


async def test_a_closed_store_refuses_writes_and_closes_again(store: TaskStore) -> None:
    await store.add_user("alice", 1)
    await store.close()
    with pytest.raises(WriterStopped):
        await asyncio.wait_for(store.add_user("bob", 1), 30)  # bounds a hang, not a speed
    await asyncio.wait_for(store.close(), 30)
