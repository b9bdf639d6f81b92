"""Backup and restore of a Zhiyi data folder: the SQLite database and the documents.

``backup`` runs while the server runs and writes: the database is copied with SQLite's
online backup API (one step, under one read transaction, so the copy is the database as it
was at one commit), then the documents of every task in that copy are copied. The two stay
consistent because files are written before the rows that name them commit: every task in
the copy already had its original (and, if completed, its result) on disk. A task whose
folder is gone by the time it is copied was deleted or expired after the snapshot; an ended
one is marked ``files_expired`` in the copy (its result answers 410), an unfinished one is
left as it is and fails with a refund when the restored server finds its document missing.

``restore`` puts a backup into a data folder that has no database yet and clears the
leases of tasks that were processing, so the restored server resumes them at once.

PostgreSQL deployments back the database up with ``pg_dump`` and use ``--files-only`` here
for the documents. Nothing here knows of HTTP or of the event loop: the CLI calls it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

__all__ = ["MANIFEST", "BackupError", "BackupReport", "RestoreReport", "backup", "restore"]

logger = logging.getLogger(__name__)

MANIFEST = "zhiyi-backup.json"
DATABASE = "zhiyi.db"
FILES = "files"
# Beside the database in the data folder; never copied as documents.
_DATABASE_SUFFIXES = ("", "-wal", "-shm", "-journal")
_ENDED = ("completed", "failed", "cancelled")
# A lease long past: the restored server's recovery takes these tasks at once.
_EXPIRED_LEASE = "1970-01-01T00:00:00.000Z"


class BackupError(Exception):
    """A backup or restore that cannot be done; the message says what to do instead."""


@dataclass
class BackupReport:
    """What a backup holds; also written to the backup as ``zhiyi-backup.json``."""

    created_at: str
    schema_version: int
    tasks: int
    task_folders: int
    bytes: int
    #: tasks whose folder vanished between the database snapshot and the copy
    missing: list[int] = field(default_factory=list)
    files_only: bool = False


@dataclass
class RestoreReport:
    """What a restore put back."""

    tasks: int
    task_folders: int
    requeued: int


def backup(data_path: Path, database: Path | None, dest: Path) -> BackupReport:
    """Copy the database (unless ``database`` is None: files only) and documents to ``dest``."""
    _prepare_destination(dest)
    if database is not None:
        if not database.exists():
            raise BackupError(f"there is no database at {database}; is --data right?")
        snapshot = dest / DATABASE
        _copy_database(database, snapshot)
        rows = _task_folders(snapshot)
    else:
        snapshot = None
        rows = [(p.relative_to(data_path).as_posix(), "unknown")
                for p in _folders_on_disk(data_path)]
    copied, size, missing = _copy_task_folders(data_path, dest / FILES, rows)
    if snapshot is not None and missing:
        _mark_missing(snapshot, missing)
    _copy_loose_files(data_path, dest, database)
    report = BackupReport(
        created_at=datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        schema_version=_schema_version(snapshot) if snapshot else 0,
        tasks=len(rows), task_folders=copied, bytes=size,
        missing=_missing_ids(snapshot, missing) if snapshot else [],
        files_only=snapshot is None)
    (dest / MANIFEST).write_text(json.dumps(asdict(report), indent=2) + "\n")
    logger.info("backup in %s: %d tasks, %d folders, %d bytes", dest, report.tasks,
                report.task_folders, report.bytes)
    return report


def restore(src: Path, data_path: Path, database: Path) -> RestoreReport:
    """Put the backup in ``src`` into ``data_path``; refuses to overwrite a database."""
    manifest = src / MANIFEST
    if not manifest.is_file():
        raise BackupError(f"{src} is not a Zhiyi backup (it has no {MANIFEST})")
    info = json.loads(manifest.read_text())
    if info.get("files_only"):
        raise BackupError(f"{src} holds documents only (a PostgreSQL deployment's backup): "
                          "restore the database with pg_restore, then copy "
                          f"{src / FILES} into the data folder")
    if database.exists():
        raise BackupError(f"{database} already exists: restore into a new data folder "
                          "(--data DIR), or move that database away first")
    data_path.mkdir(parents=True, exist_ok=True, mode=0o700)
    database.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _copy_database(src / DATABASE, database)
    folders = 0
    files = src / FILES
    if files.is_dir():
        for user_dir in files.iterdir():
            shutil.copytree(user_dir, data_path / user_dir.name, dirs_exist_ok=True)
        folders = len(_folders_on_disk(files))
    for loose in src.iterdir():
        if loose.is_file() and loose.name not in (MANIFEST, DATABASE):
            shutil.copy2(loose, data_path / loose.name)
    requeued = _expire_leases(database)
    tasks = len(_task_folders(database))
    logger.info("restored %s into %s: %d tasks, %d resumed", src, data_path, tasks, requeued)
    return RestoreReport(tasks=tasks, task_folders=folders, requeued=requeued)


# ------------------------------------------------------------------- pieces
def _prepare_destination(dest: Path) -> None:
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BackupError(f"{dest} exists and is not an empty folder: give a new folder")
    dest.mkdir(parents=True, exist_ok=True, mode=0o700)


def _copy_database(source: Path, target: Path) -> None:
    """SQLite's online backup: one consistent snapshot, writers of ``source`` not blocked."""
    src = sqlite3.connect(source, timeout=30)
    try:
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)  # pages=-1: the whole file in one step, under one read transaction
            # The copy is one self-contained file, not a WAL database waiting for its log.
            dst.execute("PRAGMA journal_mode=DELETE")
            check = dst.execute("PRAGMA integrity_check").fetchone()[0]
        finally:
            dst.close()
    finally:
        src.close()
    if check != "ok":
        target.unlink(missing_ok=True)
        raise BackupError(f"the copy of {source} failed SQLite's integrity check: {check}")
    os.chmod(target, 0o600)


def _task_folders(database: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(database) as db:
        return [(row[0], row[1]) for row in db.execute(
            "SELECT file_path, status FROM processing_tasks WHERE files_expired = 0")]


def _folders_on_disk(data_path: Path) -> list[Path]:
    """Task folders (those holding an ``original`` folder), for a files-only backup (no
    database to list them): ``<user>/<task>`` and the sharded ``<user>/<xx>/<task>``."""
    return sorted(original.parent for original in data_path.glob("*/**/original")
                  if original.is_dir())


def _copy_task_folders(data_path: Path, files: Path, rows: list[tuple[str, str]],
                       ) -> tuple[int, int, list[str]]:
    copied, size, missing = 0, 0, []
    for rel, _status in rows:
        source = data_path / rel
        try:
            shutil.copytree(source, files / rel, dirs_exist_ok=True)
        except FileNotFoundError:
            missing.append(rel)  # removed after the snapshot: deleted, expired or cleaned up
            continue
        except shutil.Error as e:
            # Files removed while their folder was being copied (a task's work files).
            logger.info("backup: %s changed while copied: %s", rel, e)
        copied += 1
        size += sum(p.stat().st_size for p in (files / rel).rglob("*") if p.is_file())
    return copied, size, missing


def _mark_missing(database: Path, missing: list[str]) -> None:
    """Record in the copy that these ended tasks' files are gone, and take their bytes
    off their users' kept total (``users.storage_bytes``, schema version 9 on) in the
    same transaction, as retention does."""
    with sqlite3.connect(database) as db:
        counts_bytes = db.execute("PRAGMA user_version").fetchone()[0] >= 9
        for rel in missing:
            gone = db.execute(
                f"UPDATE processing_tasks SET files_expired = 1 WHERE file_path = ?"
                f" AND status IN {_ENDED} AND files_expired = 0"
                f" RETURNING user_id, file_size + result_size", (rel,)).fetchall()
            if counts_bytes:
                db.executemany("UPDATE users SET storage_bytes = storage_bytes - ? WHERE id = ?",
                               [(size, user) for user, size in gone])


def _missing_ids(database: Path, missing: list[str]) -> list[int]:
    with sqlite3.connect(database) as db:
        return sorted(row[0] for rel in missing for row in db.execute(
            "SELECT id FROM processing_tasks WHERE file_path = ?", (rel,)))


def _copy_loose_files(data_path: Path, dest: Path, database: Path | None) -> None:
    """Files directly in the data folder (the local user's token), not the database."""
    skip = {database.name + s for s in _DATABASE_SUFFIXES} if database else set()
    for item in data_path.iterdir():
        if item.is_file() and item.name not in skip:
            shutil.copy2(item, dest / item.name)


def _schema_version(database: Path) -> int:
    with sqlite3.connect(database) as db:
        return int(db.execute("PRAGMA user_version").fetchone()[0])


def _expire_leases(database: Path) -> int:
    with sqlite3.connect(database) as db:
        return db.execute("UPDATE processing_tasks SET lease_until = ?"
                          " WHERE status = 'processing'", (_EXPIRED_LEASE,)).rowcount
