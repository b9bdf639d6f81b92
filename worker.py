"""The task runner: workers that claim tasks from the database and run their processors.

The ``processing_tasks`` table is the queue: workers claim the oldest runnable
``pending`` row, so a task created while every worker was busy, or while the
server was down, runs later. Each attempt holds a lease the pool renews; at
start, tasks left ``processing`` by a dead process are re-queued (or failed
and refunded once out of attempts), and a periodic reconciler repairs what a
crash elsewhere left behind, enforces external deadlines and retention.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import engines
import translation_memory as memory
from processors import (
    AwaitExternal,
    ExternalSubmitter,
    PermanentError,
    Registry,
    TaskContext,
    TransientError,
)
from sandbox import DocumentSandbox
from storage import StoreUnavailable, Task, TaskStatus, TaskStore

__all__ = ["ProgressReporter", "StoreMemory", "WorkerPool", "WorkerSettings", "is_disk_full",
           "make_private_dirs", "owner_is_gone", "task_dirs", "task_folder"]

logger = logging.getLogger(__name__)

HOST = socket.gethostname()
#: the longest a worker waits before claiming again while the database is unavailable
MAX_BACKOFF_SECONDS = 30.0
#: lease owners of the pools running in this process. Process-wide on purpose: it
#: describes the process (which of its own past pools are gone), not one app.
_LIVE_OWNERS: set[str] = set()


def owner_is_gone(owner: str) -> bool:
    """Whether a lease owner (``host:pid:nonce``) is known to be dead.

    Only provable on this host: its process no longer exists, or it is this
    process and that pool has stopped. Owners on other hosts are never
    presumed dead; their leases simply expire.
    """
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != HOST or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return owner not in _LIVE_OWNERS
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


@dataclass(frozen=True)
class WorkerSettings:
    concurrency: int = 2
    task_timeout: float = 3600.0
    max_attempts: int = 3
    retry_base_seconds: float = 2.0
    lease_seconds: float = 60.0
    reconcile_seconds: float = 30.0
    poll_seconds: float = 1.0
    retention_days: float = 30.0
    #: uploads of failed and cancelled tasks are kept this long (for a retry)
    failed_retention_hours: float = 24.0
    external_timeout_seconds: float = 3600.0
    #: minimum time between two progress writes of one task (the final state is always written)
    progress_interval: float = 0.25
    #: batches one translate attempt keeps in flight (ENGINE_CONCURRENCY)
    engine_concurrency: int = 4


def is_disk_full(error: BaseException) -> bool:
    """A write failed because the disk (or the user's disk quota) is full."""
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def task_folder(user_id: str, key: str) -> str:
    """A new task's folder under ``DATA_STORAGE_PATH``: ``<user>/<2 hex>/<32 hex>``.

    The two-character shard keeps a busy user's folder at ≤ 256 entries instead of one per
    task (tens of thousands after a year). Older tasks keep the path their row names.
    """
    return f"{user_id}/{key[:2]}/{key}"


def task_dirs(data_path: Path, task: Task) -> tuple[Path, Path, Path, Path]:
    """(task dir, original dir, result dir, work dir) of a task under ``DATA_STORAGE_PATH``."""
    base = data_path / task.file_path
    return base, base / "original", base / "result", base / "work"


class ProgressReporter:
    """Coalesces a processor's progress calls into a bounded number of writes.

    A write happens when the stage changes, or when the whole percent rose
    and ``interval`` has passed since the last write; so a processor reporting
    100,000 times writes at most ~100 rows plus one per stage. Progress never
    goes backwards within an attempt; the last report is flushed at the end.
    """

    def __init__(self, store: TaskStore, task: Task, interval: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.task = task
        self.interval = interval
        #: seconds, monotonic; a test passes a fake one to drive the interval
        self.clock = clock
        self.started = clock()
        self.written_percent = -1
        self.written_at = 0.0
        self.percent = 0.0
        self.message = ""
        self.stage: str | None = None
        self.dirty = False

    async def report(self, percent: float, message: str, stage: str | None) -> None:
        self.percent = max(self.percent, min(100.0, float(percent)))
        self.message = message
        stage_changed = stage is not None and stage != self.stage
        if stage is not None:
            self.stage = stage
        self.dirty = True
        now = self.clock()
        if stage_changed or (
            int(self.percent) > self.written_percent and now - self.written_at >= self.interval
        ):
            await self.flush()

    async def flush(self) -> None:
        if not self.dirty:
            return
        self.dirty = False
        self.written_percent = int(self.percent)
        self.written_at = self.clock()
        # Not awaited: the writer commits in queue order, so the processor goes on
        # and its completion, queued later, still lands after this update.
        written = self.store.queue_task_status(
            self.task.id, self.task.attempts, progress=int(self.percent),
            message=self.message, stage=self.stage, eta_seconds=self._eta(),
        )
        written.add_done_callback(_log_write_error)

    def _eta(self) -> float | None:
        elapsed = self.clock() - self.started
        if self.percent <= 0 or elapsed < 0.5:
            return None
        return round(elapsed * (100 - self.percent) / self.percent, 1)


class StoreMemory:
    """One user's translation memory in the store, as a processor sees it."""

    def __init__(self, store: TaskStore, user_id: str) -> None:
        self.store = store
        self.user_id = user_id

    async def lookup(self, scope: memory.Scope, keys: Sequence[str]) -> dict[str, str]:
        return await self.store.memory_lookup(self.user_id, scope, keys)

    async def remember(self, entries: Sequence[memory.Entry]) -> None:
        await self.store.memory_remember(self.user_id, entries)

    async def glossary(self, name: str) -> memory.Glossary | None:
        found = await self.store.glossaries(self.user_id, name)
        return found[0] if found else None


def _log_write_error(future: asyncio.Future[bool]) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.error("a progress write failed: %s", future.exception())


class WorkerPool:
    """``concurrency`` workers, a lease keeper and a reconciler, owned by one app."""

    def __init__(
        self,
        store: TaskStore,
        registry: Registry,
        settings: WorkerSettings,
        data_path: Path,
        *,
        engine_factory: Callable[[str], engines.Engine],
        submit_external: ExternalSubmitter | None = None,
        observe: Callable[[str, Task, float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sandbox: DocumentSandbox | None = None,
    ) -> None:
        self.store = store
        self.registry = registry
        self.settings = settings
        self.data_path = data_path
        self.engine_factory = engine_factory
        self.submit_external = submit_external
        self._observe = observe or (lambda outcome, task, seconds: None)
        #: where documents are parsed; a pool without one given makes and owns its own
        self._own_sandbox = sandbox is None
        self.sandbox = sandbox or DocumentSandbox()
        #: the progress reporters' clock (a test replaces it to drive the write interval)
        self.clock = clock
        #: unique per pool and process: leases are renewed and recovered by owner
        self.owner = f"{HOST}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        #: idle workers, each waiting on its own future: a new task wakes one, not all
        self._idle: deque[asyncio.Future[None]] = deque()
        self._missed_wake = False
        self._running: dict[int, tuple[Task, asyncio.Task[Any]]] = {}
        #: running tasks whose attempt another worker now owns: stop without cleaning up
        self._lost: set[int] = set()
        self._loops: list[asyncio.Task[None]] = []
        #: stopping: workers finish their task and claim no other
        self._draining = False

    # -------------------------------------------------------------- lifetime
    async def start(self) -> None:
        """Recover what a dead process left, then start the loops."""
        _LIVE_OWNERS.add(self.owner)
        await self.recover()
        if self._own_sandbox:
            await self.sandbox.start()
        self.store.on_foreign_commit(self._foreign_commit)
        for n in range(self.settings.concurrency):
            self._loops.append(asyncio.create_task(self._worker(), name=f"zhiyi-worker-{n}"))
        self._loops.append(asyncio.create_task(self._keep_leases(), name="zhiyi-leases"))
        self._loops.append(asyncio.create_task(self._reconcile_loop(), name="zhiyi-reconcile"))

    async def stop(self, grace: float = 0.0) -> None:
        """Stop taking work; give running attempts ``grace`` seconds to finish.

        Attempts still running then are cancelled and handed back to the queue
        (``pending``, the attempt not counted, the checkpoint kept), so the next start
        resumes them instead of waiting for their leases to run out.
        """
        self._draining = True
        for waiter in self._idle:  # idle workers leave instead of claiming again
            if not waiter.done():
                waiter.set_result(None)
        workers = [loop for loop in self._loops if loop.get_name().startswith("zhiyi-worker")]
        if workers and grace > 0:
            await asyncio.wait(workers, timeout=grace)
        unfinished = [(task.id, task.attempts) for task, _ in self._running.values()]
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops.clear()
        if self._own_sandbox:
            await self.sandbox.close()
        self.store.remove_foreign_commit(self._foreign_commit)
        _LIVE_OWNERS.discard(self.owner)
        if unfinished:
            released = await self.store.release_tasks(unfinished)
            logger.info("stopping: %d running task(s) handed back to the queue: %s",
                        len(released), ", ".join(str(t.id) for t in released))

    def wake(self) -> None:
        """A task became runnable (created or retried): wake one idle worker."""
        while self._idle:
            waiter = self._idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        # No worker is idle right now; the next one about to sleep looks again.
        self._missed_wake = True

    @property
    def running_count(self) -> int:
        return len(self._running)

    def cancel_running(self, task_id: int) -> bool:
        """Stop the processor of a task the database already says is cancelled."""
        entry = self._running.get(task_id)
        if entry is None:
            return False
        entry[1].cancel()
        return True

    async def recover(self) -> None:
        """At start: re-queue tasks whose lease expired or whose owner is a dead process.

        Other processes may share the database, so a leased task is an orphan
        only when its lease ran out or its owner is provably gone.
        """
        changed = await self._requeue_orphans()
        for task in changed:
            logger.warning("task %s of user %s was interrupted: now %s",
                           task.id, task.user_id, task.status)
        await self.fail_overdue_external()

    async def _requeue_orphans(self) -> list[Task]:
        dead = [owner for owner in await self.store.lease_owners() if owner_is_gone(owner)]
        return await self.store.requeue_orphans(self.settings.max_attempts, dead_owners=dead)

    async def _foreign_commit(self) -> None:
        """Another process committed: stop attempts it cancelled, look for new work."""
        if self._running:
            await self.stop_cancelled_elsewhere()
        if self._idle and await self.store.has_runnable_task():
            self.wake()

    async def stop_cancelled_elsewhere(self) -> None:
        """Stop running attempts whose task was cancelled, deleted or taken over elsewhere."""
        asked = dict(self._running)
        states = await self.store.attempt_states(list(asked))
        for task_id, (task, job) in asked.items():
            # An attempt that ended meanwhile (or was followed by a newer one of the
            # same task here) is no longer the one the read was about.
            if self._running.get(task_id, (None, None))[1] is not job:
                continue
            state = states.get(task_id)
            if state is None or state[0] == "cancelled":
                logger.info("task %s was cancelled or deleted elsewhere: stopping it", task_id)
                job.cancel()
            elif state[1] != task.attempts or state[0] == "pending":
                logger.warning("task %s: this attempt lost its lease; stopping it", task_id)
                self._lost.add(task_id)
                job.cancel()

    # ----------------------------------------------------------------- loops
    async def _worker(self) -> None:
        failures = 0
        while not self._draining:
            try:
                task = await self.store.claim_next_task(self.owner, self.settings.lease_seconds)
            except StoreUnavailable as e:
                # The database is locked or unreachable for now: wait longer each time, go on.
                failures += 1
                delay = min(MAX_BACKOFF_SECONDS, self.settings.poll_seconds * 2 ** failures)
                logger.warning("cannot claim tasks (%s); trying again in %g s", e, delay)
                await asyncio.sleep(delay)
                continue
            failures = 0
            if task is None:
                await self._sleep_until_work()
                continue
            await self._run(task)

    async def _sleep_until_work(self) -> None:
        if self._draining:
            return
        timeout = self.settings.poll_seconds
        next_run = await self.store.next_run_after()
        if next_run is not None:
            timeout = min(timeout, max(0.0, (next_run - self.store.now()).total_seconds()))
        if self._missed_wake:
            self._missed_wake = False
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._idle.append(waiter)
        try:
            # Not wait_for: on Python 3.11 it swallows a cancellation (the pool stopping)
            # that arrives as a wake-up does, and the worker would claim another task.
            async with asyncio.timeout(timeout):
                await waiter
        except TimeoutError:
            pass

    async def _keep_leases(self) -> None:
        while True:
            await asyncio.sleep(self.settings.lease_seconds / 3)
            for task, _job in list(self._running.values()):
                try:
                    await self.store.renew_lease(task.id, task.attempts,
                                                 self.settings.lease_seconds, self.owner)
                except StoreUnavailable as e:
                    logger.warning("cannot renew the lease of task %s now: %s", task.id, e)

    async def _reconcile_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reconcile_seconds)
            try:
                await self.reconcile()
            except Exception:
                logger.exception("reconciliation failed; trying again next round")

    async def reconcile(self) -> None:
        """Repair state: expired leases, overdue external tasks, ledger drift, retention."""
        requeued = await self._requeue_orphans()
        for task in requeued:
            logger.warning("task %s lost its lease: now %s", task.id, task.status)
        for _ in requeued:
            self.wake()
        await self.fail_overdue_external()
        for user, (balance, total) in (await self.store.balance_drift()).items():
            logger.error("CREDIT DRIFT: user %s has balance %d but ledger sum %d",
                         user, balance, total)
        for user, (kept, total) in (await self.store.storage_drift()).items():
            logger.error("STORAGE DRIFT: user %s has a kept total of %d bytes but their "
                         "tasks' files sum to %d (the quota counts the total)",
                         user, kept, total)
        await self.apply_retention()

    async def fail_overdue_external(self) -> None:
        for task in await self.store.overdue_external_tasks():
            logger.warning("task %s: no callback from the external service in time", task.id)
            await self.store.fail_task(
                task.id, "The external service did not report back in time.", "external_timeout")

    async def apply_retention(self) -> None:
        """Remove the files of ended tasks past their retention, and expired sessions.

        Failed and cancelled tasks (refunded, so nothing pays for their disk)
        keep their upload ``failed_retention_hours`` for a retry; completed
        ones ``retention_days``. The database says "expired" first, so a retry
        racing this either wins (the files stay) or is refused.
        """
        now = self.store.now()
        cutoff = now - timedelta(days=self.settings.retention_days)
        failed_cutoff = now - timedelta(hours=self.settings.failed_retention_hours)
        expiring = [
            *await self.store.tasks_to_expire(cutoff),
            *await self.store.tasks_to_expire(
                failed_cutoff, statuses=(TaskStatus.FAILED, TaskStatus.CANCELLED)),
        ]
        removed: set[int] = set()
        for task in expiring:
            if task.id in removed or not await self.store.mark_files_expired(task.id):
                continue
            removed.add(task.id)
            base = task_dirs(self.data_path, task)[0]
            await asyncio.to_thread(shutil.rmtree, base, True)
            logger.info("task %s (%s): files removed after the retention period",
                        task.id, task.status)
        await self.store.prune_events(cutoff)
        await self.store.delete_expired_sessions()

    # ------------------------------------------------------------ one attempt
    async def _run(self, task: Task) -> None:
        job = asyncio.create_task(self._attempt(task), name=f"zhiyi-task-{task.id}")
        self._running[task.id] = (task, job)
        try:
            await job
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                # The pool is stopping: leave the task for recovery.
                job.cancel()
                raise
            if task.id in self._lost:  # the files now belong to the newer attempt
                return
            logger.info("task %s of user %s cancelled while processing", task.id, task.user_id)
            await asyncio.to_thread(_remove_partial_files, self.data_path, task)
            self._observe("cancelled", task, 0.0)
        finally:
            self._running.pop(task.id, None)
            self._lost.discard(task.id)

    async def _attempt(self, task: Task) -> None:
        task_type = self.registry.get(task.task_type)
        started = time.monotonic()
        reporter = ProgressReporter(self.store, task, self.settings.progress_interval,
                                    self.clock)
        logger.info("task %s of user %s: attempt %d of %s", task.id, task.user_id,
                    task.attempts, task.task_type)
        try:
            if task_type is None:
                raise PermanentError(f"No processor for task type {task.task_type!r}.")
            ctx = self._context(task, reporter)
            await asyncio.to_thread(_make_dirs, ctx.result_dir, ctx.work_dir)
            if task_type.external or task_type.processor is None:
                outcome: Path | AwaitExternal = await ctx.submit_external()
            else:
                outcome = await asyncio.wait_for(
                    task_type.processor(ctx), self.settings.task_timeout)
            await reporter.flush()
            await self._finish(task, outcome, ctx.summary)
            self._observe("completed", task, time.monotonic() - started)
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            await self._fail(task, f"Processing took longer than {self.settings.task_timeout:g} s.",
                             "timeout")
        except TransientError as e:
            await self._transient(task, str(e))
        except PermanentError as e:
            await self._fail(task, str(e), e.code)
        except Exception as e:
            if is_disk_full(e):
                logger.error("task %s: the data folder's disk is full: %s", task.id, e)
                await self._fail(task, "The server's disk is full, so the result could not be "
                                 "written. Retry the task once space has been freed.",
                                 "insufficient_storage")
                return
            # The one catch-all: a processor's bug fails its task, never the worker.
            logger.exception("task %s of user %s: processor error", task.id, task.user_id)
            await self._fail(task, f"Processing failed: {e}", "processor_error")

    def _context(self, task: Task, reporter: ProgressReporter) -> TaskContext:
        _, original, result, work = task_dirs(self.data_path, task)

        async def save_checkpoint(data: Any) -> None:
            await self.store.save_checkpoint(task.id, task.attempts, data)

        return TaskContext(
            task_id=task.id, user_id=task.user_id, task_type=task.task_type,
            params=task.params, input_path=original / task.file_name, file_name=task.file_name,
            result_dir=result, work_dir=work, checkpoint=task.checkpoint, attempt=task.attempts,
            _progress=reporter.report, _save_checkpoint=save_checkpoint,
            _engine=self._engine, _submit_external=self.submit_external,
            engine_concurrency=self.settings.engine_concurrency,
            memory=StoreMemory(self.store, task.user_id),
            _sandbox=self.sandbox,
        )

    def _engine(self, name: str) -> engines.Engine:
        try:
            return self.engine_factory(name)
        except (engines.UnknownEngine, engines.EngineError) as e:
            raise PermanentError(str(e), "engine_unavailable") from e

    async def _finish(self, task: Task, outcome: Path | AwaitExternal,
                      summary: str | None = None) -> None:
        if isinstance(outcome, AwaitExternal):
            deadline = self.store.now() + timedelta(seconds=self.settings.external_timeout_seconds)
            await self.store.set_external(task.id, task.attempts, outcome.external_task_id,
                                          deadline)
            return
        result_dir = task_dirs(self.data_path, task)[2]
        if not _is_inside(outcome, result_dir):
            raise PermanentError("The processor wrote its result outside the result folder.")
        size = (await asyncio.to_thread(outcome.stat)).st_size
        done = await self.store.complete_task(task.id, outcome.name, attempt=task.attempts,
                                              message=summary or "completed", result_size=size)
        if done is None:
            logger.info("task %s finished but was no longer running; result dropped", task.id)
            return
        # A completed task keeps its original and its result; its work files (the segment
        # journal) served only this run. A retry after a failure still finds them.
        await asyncio.to_thread(shutil.rmtree, task_dirs(self.data_path, task)[3], True)

    async def _fail(self, task: Task, message: str, code: str) -> None:
        # The work journal stays: a manual retry resumes without paying twice.
        await asyncio.to_thread(_remove_partial_files, self.data_path, task, keep_work=True)
        await self.store.fail_task(task.id, message, code, attempt=task.attempts)
        self._observe("failed", task, 0.0)

    async def _transient(self, task: Task, message: str) -> None:
        if task.attempts >= self.settings.max_attempts:
            await self._fail(task, f"Gave up after {task.attempts} attempts: {message}",
                             "processor_error")
            return
        delay = self.settings.retry_base_seconds * 2 ** (task.attempts - 1)
        logger.warning("task %s attempt %d failed (%s); retrying in %g s",
                       task.id, task.attempts, message, delay)
        await self.store.schedule_retry(
            task.id, task.attempts, delay, f"{message}; retrying in {delay:g} s")
        self._observe("retried", task, 0.0)


def _is_inside(path: Path, folder: Path) -> bool:
    """``path`` is directly in ``folder`` (results are single files, never in a subfolder).

    A pure path comparison: resolve() would touch the file system on the loop.
    """
    return os.path.normpath(path.parent) == os.path.normpath(folder)


def _make_dirs(*dirs: Path) -> None:
    for folder in dirs:
        make_private_dirs(folder)


def make_private_dirs(folder: Path) -> None:
    """``mkdir -p`` where every folder made is 0700 (``mkdir(parents=True)`` would not)."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir(mode=0o700, exist_ok=True)


def _remove_partial_files(data_path: Path, task: Task, keep_work: bool = False) -> None:
    """Remove a stopped attempt's output (the original stays for a retry)."""
    _, _, result, work = task_dirs(data_path, task)
    shutil.rmtree(result, ignore_errors=True)
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
