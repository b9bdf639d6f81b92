"""Zhiyi's configuration: every setting, declared once, and the typed keys of an app's state.

:class:`Config` is a frozen dataclass parsed once (``Config.from_env()``) and passed to
``zhiyi_server.create_app``. Each setting is declared on its field (:func:`setting`);
``from_env``, ``zhiyi serve``'s flags and ``--help`` and the README's table (``zhiyi config
--readme README.md``, held against README.md by tests/test_config.py) read it there.

The app keys (``CONFIG``, ``STORE``, ...) are here too: they are what aiohttp calls the
application's config, the typed state ``zhiyi_server`` sets and the handlers and request
guards read, so they live below both. ``zhiyi_server`` re-exports every public name here
(``from zhiyi_server import Config, STORE`` works as before). Named ``zhiyi_config``, not
``config``: an embedding app's own ``config.py`` is common, and Zhiyi's modules share the
top-level namespace with the app's (README, "Module names").
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

import engines
from external import ExternalService
from metrics import Metrics
from processors import Registry
from sandbox import DocumentSandbox, ParseLimits
from sse import SSEHub
from storage import TaskStore
from worker import WorkerPool, WorkerSettings

__all__ = [
    "CONFIG",
    "EXTERNAL",
    "HTTP",
    "HUB",
    "METRICS",
    "POOL",
    "REGISTRY",
    "SANDBOX",
    "STORE",
    "Config",
    "ConfigError",
    "Setting",
    "parse_setting",
    "setting",
    "setting_kind",
    "settings_table",
    "shown_default",
    "usable_cores",
]

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


@dataclass(frozen=True)
class Setting:
    """One row of the configuration table: how a :class:`Config` field is set and documented.

    Each setting is declared once, on its ``Config`` field (:func:`setting`); ``from_env``,
    ``zhiyi serve``'s flags and ``--help``, and the README's table (``zhiyi config
    --markdown``, held against README.md by a test) all read it from there.
    """

    env: str
    help: str
    #: smallest accepted value (numbers only)
    minimum: float | None = None
    #: the ``zhiyi serve`` flag, if the setting has one
    flag: str | None = None
    #: the default as the docs show it, when the field's own default is computed or None
    shown_default: str | None = None


def setting(env: str, default: Any, help: str, *, minimum: float | None = None,
            flag: str | None = None, shown_default: str | None = None) -> Any:
    """A ``Config`` field set by the environment variable ``env`` (and maybe a flag)."""
    row = Setting(env=env, help=help, minimum=minimum, flag=flag, shown_default=shown_default)
    return dataclasses.field(default=default, metadata={"setting": row})


def setting_kind(field: dataclasses.Field[Any]) -> str:
    """``int``, ``float``, ``str`` or ``Path``: the field's type without ``| None``."""
    return str(field.type).removesuffix(" | None")


def parse_setting(field: dataclasses.Field[Any], raw: str, name: str) -> Any:
    """``raw`` as the field's type within its bounds; errors name ``name`` (a variable or flag)."""
    row: Setting = field.metadata["setting"]
    kind = setting_kind(field)
    if kind == "Path":
        return Path(raw)
    if kind == "str":
        return raw
    parse: type[int] | type[float] = int if kind == "int" else float
    try:
        value = parse(raw)
    except ValueError as e:
        raise ConfigError(f"{name} must be {'a whole number' if kind == 'int' else 'a number'}"
                          f", not {raw!r}") from e
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, not {raw!r}")
    minimum = 0 if row.minimum is None else row.minimum
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, not {value}")
    return value


def settings_table() -> list[dataclasses.Field[Any]]:
    """The fields of :class:`Config` that are settings, in declaration order."""
    return [f for f in dataclasses.fields(Config) if "setting" in f.metadata]


def shown_default(field: dataclasses.Field[Any]) -> str:
    """The default as ``--help`` and the README show it (``—``: unset)."""
    row: Setting = field.metadata["setting"]
    if row.shown_default is not None:
        return row.shown_default
    if field.default is None:
        return "—"
    if isinstance(field.default, float) and field.default.is_integer():
        return str(int(field.default))
    return str(field.default)


def usable_cores() -> int:
    """The number of cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Config:
    """Every setting, parsed once (``from_env``) and passed to :func:`create_app`.

    A field made with :func:`setting` is one row of the configuration table; the other
    fields are for embedding and tests only.
    """

    # setting() returns a dataclasses.field (ruff cannot tell)
    data_path: Path = setting(  # noqa: RUF009
        "DATA_STORAGE_PATH", Path("./data"), "documents, results, and the database",
        flag="--data", shown_default="./data")
    db_path: Path | None = setting(  # noqa: RUF009
        "ZHIYI_DB", None, "the SQLite file", shown_default="`$DATA_STORAGE_PATH/zhiyi.db`")
    database_url: str | None = setting(
        "ZHIYI_DATABASE_URL", None, "a `postgresql://` URL: the PostgreSQL store instead of "
        "SQLite (files stay in DATA_STORAGE_PATH)", shown_default="none (SQLite)")
    host: str = setting("ZHIYI_HOST", "127.0.0.1", "where `zhiyi serve` listens",
                        flag="--host")
    port: int = setting("ZHIYI_PORT", 8080, "the port `zhiyi serve` listens on", minimum=0,
                        flag="--port")
    public_url: str | None = setting(
        "PUBLIC_URL", None, "this server's address as external services see it (webhook URL)",
        shown_default="`http://HOST:PORT`")
    worker_concurrency: int = setting(
        "WORKER_CONCURRENCY", 4, "tasks processed at once in this process (0: none)")
    #: ``zhiyi serve`` starts this many ``zhiyi worker`` processes (0: workers in-process;
    #: None: one per core this process may use, and 0 with only one)
    worker_processes: int | None = setting(
        "ZHIYI_WORKERS", None, "`zhiyi worker` processes `zhiyi serve` starts "
        "(0: workers in the HTTP process)", flag="--workers",
        shown_default="cores it may use (0 with one core)")
    max_attempts: int = setting(
        "MAX_ATTEMPTS", 3, "attempts of a task that fails with a transient error", minimum=1)
    retry_base_seconds: float = setting(
        "RETRY_BASE_SECONDS", 2.0, "delay before the first automatic retry, doubling after")
    task_timeout_seconds: float = setting(
        "TASK_TIMEOUT_SECONDS", 3600.0,
        "one attempt longer than this fails with `errorCode` `timeout`")
    max_upload_mb: int = setting(
        "MAX_UPLOAD_MB", 50, "upload size cap, enforced while streaming", minimum=1)
    #: a request body must arrive within this (uploads: no pause longer than this)
    body_timeout_seconds: float = setting(
        "BODY_TIMEOUT_SECONDS", 30.0, "a request body must arrive within this (an upload: no "
        "pause this long); 408 past it")
    max_active_tasks_per_user: int = setting(
        "MAX_ACTIVE_TASKS_PER_USER", 100, "pending + processing tasks per user (429 past it)",
        minimum=1)
    parse_workers: int = setting(
        "PARSE_WORKERS", 4, "documents read at once (parser processes; the pool size)",
        minimum=1)
    max_parses_per_user: int = setting(
        "MAX_PARSES_PER_USER", 2, "of those, at most this many for one user; the user's other "
        "documents wait their turn", minimum=1)
    parse_memory_mb: int = setting(
        "PARSE_MEMORY_MB", 512, "memory one document's parser may allocate (`RLIMIT_AS` over "
        "its ~45 MB start)", minimum=16)
    parse_cpu_seconds: int = setting(
        "PARSE_CPU_SECONDS", 60, "CPU time of one parse (`RLIMIT_CPU`)", minimum=1)
    parse_wall_seconds: float = setting(
        "PARSE_WALL_SECONDS", 120.0, "elapsed time of one parse (the server kills it)")
    max_zip_members: int = setting(
        "MAX_ZIP_MEMBERS", 10_000, "parts of a `.docx` (any zip format), checked on its "
        "directory before inflating", minimum=1)
    max_zip_uncompressed_mb: int = setting(
        "MAX_ZIP_UNCOMPRESSED_MB", 512, "declared total size of a zip format's parts",
        minimum=1)
    max_zip_ratio: int = setting(
        "MAX_ZIP_RATIO", 200, "compression ratio of a zip part over 1 MB", minimum=1)
    max_pdf_pages: int = setting("MAX_PDF_PAGES", 2_000, "pages of a PDF", minimum=1)
    retention_days: float = setting(
        "RETENTION_DAYS", 30.0, "files of ended tasks are deleted after this (result answers "
        "410)")
    reconcile_seconds: float = setting(
        "RECONCILE_SECONDS", 30.0, "period of the reconciler (leases, deadlines, ledger "
        "check, retention)")
    starter_credits: int = setting(
        "STARTER_CREDITS", 1000, "credits of the `local` user made by `zhiyi serve`")
    sse_heartbeat_seconds: float = setting(
        "SSE_HEARTBEAT_SECONDS", 15.0, "`: ping` comment period")
    sse_max_per_user: int = setting(
        "SSE_MAX_PER_USER", 32, "open streams per user (429 past it)", minimum=1)
    sse_max_total: int = setting(
        "SSE_MAX_TOTAL", 10_000, "open streams in all (503 past it)", minimum=1)
    sse_buffer_events: int = setting(
        "SSE_BUFFER_EVENTS", 256, "how far a stream may fall behind (events while it replays; "
        "1 KiB each, at least 64 KiB unsent, once live) before it is dropped and resumes from "
        "the database", minimum=1)
    webhook_secret: str | None = setting(
        "WEBHOOK_SECRET", None, "HMAC secret of the webhook; without it every webhook is "
        "refused")
    external_service_url: str | None = setting(
        "EXTERNAL_SERVICE_URL", None, "where the `external` engine submits documents")
    external_timeout_seconds: float = setting(
        "EXTERNAL_TIMEOUT_SECONDS", 3600.0, "no callback by then → failed, "
        "`external_timeout`, refunded")
    libretranslate_url: str | None = setting(
        "LIBRETRANSLATE_URL", None, "the `libretranslate` engine's server")
    libretranslate_api_key: str | None = setting(
        "LIBRETRANSLATE_API_KEY", None, "its API key, if it asks for one")
    openai_base_url: str | None = setting(
        "OPENAI_BASE_URL", None, "the `openai` engine: any OpenAI-compatible API (llama.cpp's "
        "server, ollama, vLLM, ...); the base ends in `/v1`")
    openai_api_key: str | None = setting(
        "OPENAI_API_KEY", None, "its API key (a local server may need none)")
    openai_model: str = setting("OPENAI_MODEL", "gpt-4o-mini", "the model it is asked for")
    disk_low_mb: int = setting(
        "DISK_LOW_MB", 1024, "below this much free space on the data folder's disk, a warning "
        "in the log (checked every `RECONCILE_SECONDS` and at each scrape)")
    deepl_api_key: str | None = setting("DEEPL_API_KEY", None, "the `deepl` engine")
    deepl_api_url: str | None = setting(
        "DEEPL_API_URL", None, "defaults to `https://api-free.deepl.com` for free keys (ending "
        "`:fx`), else `https://api.deepl.com`", shown_default="by the key")
    engine_concurrency: int = setting(
        "ENGINE_CONCURRENCY", 4, "batches one translate task keeps in flight to its engine",
        minimum=1)
    engine_max_inflight: int = setting(
        "ENGINE_MAX_INFLIGHT", 16, "requests in flight to one engine across all tasks of the "
        "process; shrinks on 429 and grows back (AIMD)", minimum=1)
    shutdown_grace_seconds: float = setting(
        "SHUTDOWN_GRACE_SECONDS", 20.0, "on SIGTERM/Ctrl-C, running attempts get this long to "
        "finish; the rest go back to the queue (not failed, the attempt not counted) and the "
        "next start resumes them from their checkpoint")
    session_days: float = setting(
        "SESSION_DAYS", 30.0, "a browser session expires this long after its last use (use "
        "slides it, at most one write an hour)", minimum=0.01)
    max_storage_mb_per_user: int = setting(
        "MAX_STORAGE_MB_PER_USER", 1024, "a user's kept files (uploads and results not yet "
        "deleted); an upload past it is `507 insufficient_storage` (0: no quota)")
    failed_retention_hours: float = setting(
        "FAILED_RETENTION_HOURS", 24.0, "uploads of failed and cancelled tasks are deleted "
        "after this (a retry before works; after, 409 `expired`)")
    log_level: str = setting("ZHIYI_LOG_LEVEL", "INFO", "logging level (DEBUG, INFO, WARNING)")
    # Not settings: for embedding and tests.
    sse_retry_ms: int = 3000
    lease_seconds: float = 60.0
    #: run the workers in this process (an embedding app may run them elsewhere)
    run_workers: bool = True

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> Config:
        """Read the environment; ``overrides`` (command-line flags) win.

        An unset or empty variable keeps the field's default.
        """
        e = dict(os.environ if env is None else env)
        values: dict[str, Any] = {}
        for field in settings_table():
            raw = e.get(field.metadata["setting"].env)
            if raw not in (None, ""):
                values[field.name] = parse_setting(field, raw, field.metadata["setting"].env)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def worker_process_count(self) -> int:
        """How many worker processes ``zhiyi serve`` starts.

        The default is one per core this process may run on (its CPU affinity, which
        ``taskset`` and container CPU sets narrow; not the machine's count). With one
        core it is 0: a worker process would only take turns with the HTTP process on
        that core, and each task would pay for crossing processes.
        """
        if self.worker_processes is not None:
            return self.worker_processes
        cores = usable_cores()
        return cores if cores > 1 else 0

    @property
    def database(self) -> Path:
        return self.db_path or self.data_path / "zhiyi.db"

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * 1024 * 1024

    @property
    def max_storage_bytes(self) -> int:
        """The per-user quota in bytes; 0 means none."""
        return self.max_storage_mb_per_user * 1024 * 1024

    @property
    def session_lifetime(self) -> timedelta:
        return timedelta(days=self.session_days)

    def engine_settings(self) -> engines.EngineSettings:
        return engines.EngineSettings(
            libretranslate_url=self.libretranslate_url,
            libretranslate_api_key=self.libretranslate_api_key,
            openai_base_url=self.openai_base_url,
            openai_api_key=self.openai_api_key,
            openai_model=self.openai_model,
            max_inflight=self.engine_max_inflight,
            deepl_api_key=self.deepl_api_key,
            deepl_api_url=self.deepl_api_url,
        )

    def parse_limits(self) -> ParseLimits:
        return ParseLimits(
            memory_mb=self.parse_memory_mb, cpu_seconds=self.parse_cpu_seconds,
            wall_seconds=self.parse_wall_seconds, max_zip_members=self.max_zip_members,
            max_zip_uncompressed_mb=self.max_zip_uncompressed_mb,
            max_zip_ratio=self.max_zip_ratio, max_pdf_pages=self.max_pdf_pages,
        )

    def worker_settings(self) -> WorkerSettings:
        return WorkerSettings(
            concurrency=self.worker_concurrency,
            task_timeout=self.task_timeout_seconds,
            max_attempts=self.max_attempts,
            retry_base_seconds=self.retry_base_seconds,
            lease_seconds=self.lease_seconds,
            reconcile_seconds=self.reconcile_seconds,
            retention_days=self.retention_days,
            failed_retention_hours=self.failed_retention_hours,
            external_timeout_seconds=self.external_timeout_seconds,
            engine_concurrency=self.engine_concurrency,
        )


# ------------------------------------------------------------------ app state
CONFIG = web.AppKey("zhiyi.config", Config)
REGISTRY = web.AppKey("zhiyi.registry", Registry)
STORE = web.AppKey("zhiyi.store", TaskStore)
HUB = web.AppKey("zhiyi.hub", SSEHub)
POOL = web.AppKey("zhiyi.pool", WorkerPool)
METRICS = web.AppKey("zhiyi.metrics", Metrics)
HTTP = web.AppKey("zhiyi.http", aiohttp.ClientSession)
EXTERNAL = web.AppKey("zhiyi.external", ExternalService)
SANDBOX = web.AppKey("zhiyi.sandbox", DocumentSandbox)
