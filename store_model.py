"""The store's vocabulary: its named errors, the values it hands out, and the time helpers.

What both the store (storage.py, storage_pg.py) and its writer (the write batches) speak:
the errors a state change may raise (``StoreError`` and its subclasses), the rows as frozen
dataclasses (``Task``, ``Event``, ``User`` ...), ``TaskStatus``, the ISO time format the
database keeps, and the token hash. It holds no connection and runs no statement, so any
layer may import it. storage.py re-exports its public names, and callers import them from
``storage`` as before; the module exists so that the writer (group_writer.py) can use them
without importing the store.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "ACTIVE_STATUSES",
    "FINAL_STATUSES",
    "TASK_FIELDS",
    "AmbiguousTokenPrefix",
    "Credential",
    "Event",
    "FilesExpired",
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
    "TokenInfo",
    "TooManyActiveTasks",
    "User",
    "UserExists",
    "UserNotFound",
    "WriterStopped",
    "hash_token",
    "isoformat",
    "named_sqlite_error",
    "parse_time",
    "utcnow",
]

logger = logging.getLogger(__name__)


class TaskStatus(enum.StrEnum):
    """Where a task is in its life."""

    #: waiting for a worker (new, retried, or re-queued after a crash)
    PENDING = "pending"
    #: a worker (or an external service) is working on it
    PROCESSING = "processing"
    #: done; the result can be downloaded
    COMPLETED = "completed"
    #: ended in an error; credits refunded
    FAILED = "failed"
    #: cancelled by its user; credits refunded
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED})
ACTIVE_STATUSES = (TaskStatus.PENDING, TaskStatus.PROCESSING)


class StoreError(Exception):
    """Base of the store's named errors."""


class TaskNotFound(StoreError):
    """No such task, or it belongs to another user."""


class UserNotFound(StoreError):
    """No such user."""


class UserExists(StoreError):
    """A user of that name already exists."""


class InsufficientCredits(StoreError):
    """The balance does not cover the cost."""

    def __init__(self, needed: int, balance: int) -> None:
        super().__init__(f"needs {needed} credits, balance is {balance}")
        self.needed = needed
        self.balance = balance


class TooManyActiveTasks(StoreError):
    """The user already has the maximum of pending and processing tasks."""


class WriterStopped(StoreError):
    """The writer was stopped (shutdown) before a queued write ran; nothing changed."""


class StoreUnavailable(StoreError):
    """The database stayed locked past the busy timeout (another process holds a write
    transaction); nothing was changed, and the same request can be sent again."""


class StoreFull(StoreError):
    """The disk holding the database is full; nothing was changed."""


def named_sqlite_error(e: Exception) -> Exception:
    """SQLite's "locked" and "full" as the store's named errors; anything else as it is."""
    if isinstance(e, sqlite3.OperationalError):
        text = str(e).lower()
        if "locked" in text or "busy" in text:
            return StoreUnavailable(f"the database is locked by another process ({e})")
        if "full" in text:
            return StoreFull(f"the disk holding the database is full ({e})")
    return e


class SQLiteTooOld(StoreError):
    """The SQLite library is older than the store needs (``RETURNING``: 3.35)."""
class StorageQuotaExceeded(StoreError):
    """The user's kept files plus this upload would pass their storage quota."""

    def __init__(self, used: int, needed: int, limit: int) -> None:
        super().__init__(f"{used} bytes used, {needed} more needed, quota {limit}")
        self.used = used
        self.needed = needed
        self.limit = limit




class AmbiguousTokenPrefix(StoreError):
    """A token prefix names more than one of the user's tokens."""

    def __init__(self, matches: int) -> None:
        super().__init__(f"the prefix matches {matches} tokens")
        self.matches = matches


class InvalidTransition(StoreError):
    """The task's status does not allow this action."""

    def __init__(self, status: str, action: str) -> None:
        super().__init__(f"cannot {action} a task that is {status}")
        self.status = status
        self.action = action


class FilesExpired(InvalidTransition):
    """The task's files were deleted after their retention period; it cannot run again."""

    def __init__(self, status: str) -> None:
        super().__init__(status, "retry")
        self.args = (f"cannot retry a {status} task: its files expired",)


def utcnow() -> datetime:
    return datetime.now(UTC)


def isoformat(moment: datetime) -> str:
    """ISO 8601 UTC with milliseconds and a Z, so strings sort as times do."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class User:
    id: str
    credits: int
    created_at: str
    disabled_at: str | None = None
    #: tasks this user ever created (the next task's ``user_task_no`` is one more)
    tasks_made: int = 0
    #: may use the admin API and page (``zhiyi user add NAME --admin``)
    is_admin: bool = False
    #: bytes of the files this user's tasks keep (what the storage quota counts)
    storage_bytes: int = 0


@dataclass(frozen=True, slots=True)
class Credential:
    """A valid token or session, as found by :meth:`TaskStore.credential_for_token`."""

    user_id: str
    token_hash: str
    kind: str
    expires_at: str | None
    last_used_at: str | None


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """What may be shown of a token or session: never the secret, only its first characters."""

    token_prefix: str | None
    kind: str
    created_at: str
    expires_at: str | None
    last_used_at: str | None


@dataclass(frozen=True, slots=True)
class Task:
    """One ``processing_tasks`` row."""

    id: int
    user_id: str
    task_type: str
    status: TaskStatus
    progress: int
    status_message: str
    stage: str | None
    eta_seconds: float | None
    params: dict[str, Any]
    file_name: str
    file_size: int
    file_path: str
    result_name: str | None
    credits_cost: int
    credits_held: int
    attempts: int
    external_task_id: str | None
    external_deadline: str | None
    error_message: str | None
    error_code: str | None
    idempotency_key: str | None
    checkpoint: Any
    run_after: str | None
    lease_owner: str | None
    lease_until: str | None
    files_expired: bool
    created_at: str
    updated_at: str
    started_at: str | None
    completed_at: str | None
    result_size: int = 0
    #: the task's number among its user's tasks, for people (the id stays the API's)
    user_task_no: int | None = None
    #: the document's language as detected when the task was created (None: not read)
    detected_lang: str | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Task:
        values = dict(row)
        values["status"] = TaskStatus(values["status"])
        values["params"] = json.loads(values["params"])
        values["checkpoint"] = json.loads(values["checkpoint"]) if values["checkpoint"] else None
        values["files_expired"] = bool(values["files_expired"])
        return cls(**{name: values[name] for name in TASK_FIELDS})


TASK_FIELDS = tuple(Task.__dataclass_fields__)


@dataclass(frozen=True, slots=True)
class Event:
    """One ``task_events`` row: what the SSE streams carry."""

    id: int
    task_id: int | None
    user_id: str
    type: str
    data: dict[str, Any]
    #: ``data`` as compact JSON, as stored: the SSE layer frames it without encoding again
    raw: str = ""

    @property
    def is_final(self) -> bool:
        status = self.data.get("status")
        return self.type == "task_deleted" or status in FINAL_STATUSES


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    id: int
    user_id: str
    amount: int
    reason: str
    task_id: int | None
    balance_after: int
    created_at: str


@dataclass(frozen=True, slots=True)
class StreamStart:
    """Where an event stream starts, read in one statement (see :meth:`TaskStore.stream_start`)."""

    #: the newest event id of the task (or user); 0 when there is none
    latest: int
    #: the data of its newest ``status_update``, or None (none, or pruned)
    state: dict[str, Any] | None
    #: events up to this id may have been pruned (``Last-Event-ID`` below it: a reset)
    pruned_through: int


@dataclass(frozen=True, slots=True)
class NewTask:
    """What the create endpoint hands the store."""

    user_id: str
    task_type: str
    params: dict[str, Any]
    file_name: str
    file_size: int
    file_path: str
    credits_cost: int
    idempotency_key: str | None = None
    max_active: int = 100
    #: bytes of kept files the user may have, this upload included (0: no quota)
    max_storage: int = 0
    #: the document's language as detected at create (shown with ``sourceLang: auto``)
    detected_lang: str | None = None


@dataclass(frozen=True)
class HealthFigures:
    """Store-wide figures for monitoring (see ``TaskStore.health_figures``)."""

    oldest_pending_seconds: float  #: how long the oldest runnable pending task has waited
    failed_by_code: dict[str, int]  #: failed tasks by ``error_code``
    drifting_users: int  #: users whose balance differs from their ledger sum


def _event_from_row(row: sqlite3.Row) -> Event:
    return Event(row["id"], row["task_id"], row["user_id"], row["type"],
                 json.loads(row["data"]), row["data"])
