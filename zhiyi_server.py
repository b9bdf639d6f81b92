"""Zhiyi's server: the app factory, routes, handlers and the CLI.

``create_app(Config.from_env())`` returns an aiohttp application that runs on
its own (``zhiyi serve``) or mounted in another app with ``add_subapp``. The
factory only wires; the database, the worker pool, the SSE hub and the HTTP
client session start and stop in ``cleanup_ctx``. The settings (``Config``) and
the app keys are in zhiyi_config.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import unicodedata
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import aiofiles
import aiohttp
import aiohttp.multipart
from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.multipart import content_disposition_filename

import zhiyi_modules

zhiyi_modules.refuse_shadowed_modules()  # before the sibling imports below, which it checks

import engines
import formats
import messages
from external import (
    ExternalService,
    ResultFetchError,
    SignatureError,
    check_signature_headers,
    verify_signature,
)
from metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from metrics import DiskSpace, Metrics, disk_space
from processors import (
    Quote,
    Registry,
    TaskType,
    default_registry,
    glossary_problem,
    memory_scope,
    remembered,
    segment_keys,
    translate_cost,
)
from request_guards import (
    MIN_UPLOAD_BYTES_PER_SECOND,
    MULTIPART_SLACK_BYTES,
    RESULT_CSP,
    SAFE_METHODS,
    SECURITY_HEADERS,
    SESSION_COOKIE,
    SESSION_MAX_BYTES,
    SLID_SESSION,
    WEBHOOK_MAX_BYTES,
    ApiError,
    add_security_headers,
    cross_site,
    current_credential,
    current_user,
    is_top_level_navigation,
    metered_body,
    read_body,
    refresh_session_cookie,
    require_same_origin,
    same_origin,
    set_session_cookie,
)
from sandbox import (
    DocumentRefused,
    DocumentSandbox,
    ParseAbandoned,
    ParsedDocument,
)
from sse import (
    REPLAY_PAGE,
    SSEHub,
    StreamLimitReached,
    StreamPlan,
    encode_event,
    stream_events,
)
from storage import (
    Credential,
    FilesExpired,
    InsufficientCredits,
    InvalidTransition,
    NewTask,
    StorageQuotaExceeded,
    StoreError,
    StoreFull,
    StoreUnavailable,
    StreamStart,
    Task,
    TaskNotFound,
    TaskStatus,
    TaskStore,
    TooManyActiveTasks,
    UserExists,
    UserNotFound,
    open_store,
    utcnow,
)
from translation_memory import (
    BadGlossary,
    BadTmx,
    Entry,
    Glossary,
    Scope,
    from_tmx,
    parse_glossary,
    to_tmx,
)
from worker import (
    WorkerPool,
    is_disk_full,
    make_private_dirs,
    task_dirs,
    task_folder,
)
from zhiyi_config import (
    CONFIG,
    EXTERNAL,
    HTTP,
    HUB,
    METRICS,
    POOL,
    REGISTRY,
    SANDBOX,
    STORE,
    Config,
    ConfigError,
    Setting,
    parse_setting,
    setting,
    setting_kind,
    settings_table,
    shown_default,
    usable_cores,
)

# With the names it re-exports from zhiyi_config and request_guards and does not use itself
# (cli.py, tests and embedding apps import them from here, as before the split).
__all__ = [
    "CONFIG",
    "HUB",
    "MIN_UPLOAD_BYTES_PER_SECOND",
    "POOL",
    "SAFE_METHODS",
    "SECURITY_HEADERS",
    "SLID_SESSION",
    "STORE",
    "Config",
    "ConfigError",
    "Setting",
    "create_app",
    "create_worker_app",
    "main",
    "parse_setting",
    "run_worker_app",
    "setting",
    "setting_kind",
    "settings_table",
    "shown_default",
    "usable_cores",
]

logger = logging.getLogger(__name__)

RESOURCE_DIRS = (Path(__file__).parent, Path(__file__).parent / "zhiyi_resources")
LOCAL_USER = "local"
LOCAL_TOKEN_FILE = ".local-token"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


def resource(name: str) -> Path:
    """A file shipped with Zhiyi (schema, page, OpenAPI), in a checkout or installed."""
    for base in RESOURCE_DIRS:
        if (base / name).exists():
            return base / name
    raise FileNotFoundError(name)


# --------------------------------------------------------------------- errors
#: how long a client should wait before sending again a request the locked database refused
STORE_RETRY_AFTER_SECONDS = 2

CODE_BY_STATUS = {
    400: "bad_request", 401: "unauthenticated", 404: "not_found",
    405: "method_not_allowed", 413: "file_too_large", 415: "unsupported_media_type",
    429: "too_many_requests", 500: "internal_error", 503: "unavailable",
}


def json_error(status: int, code: str, message: str, *,
               headers: dict[str, str] | None = None, **extra: Any) -> web.Response:
    return web.json_response(
        {"success": False, "code": code, "message": message, **extra}, status=status,
        headers=headers)


def api_error_from_store(e: StoreError) -> ApiError:
    """The one place where the store's named errors become HTTP answers."""
    if isinstance(e, TaskNotFound):
        return ApiError(404, "task_not_found",
                        "Task does not exist or you have no permission to access it.")
    if isinstance(e, InsufficientCredits):
        return ApiError(402, "insufficient_credits",
                        f"This needs {e.needed} credits but your balance is {e.balance}.",
                        needed=e.needed, balance=e.balance)
    if isinstance(e, TooManyActiveTasks):
        return ApiError(429, "too_many_active_tasks",
                        "You have too many pending or processing tasks; wait for some to end.")
    if isinstance(e, StorageQuotaExceeded):
        return _quota_error(e.used, e.limit)
    if isinstance(e, FilesExpired):
        return ApiError(409, "expired",
                        f"This task is {e.status} and its uploaded file was deleted after the "
                        "retention period; upload the document again to run it.",
                        taskStatus=str(e.status))
    if isinstance(e, InvalidTransition):
        return ApiError(409, "invalid_state", f"Cannot {e.action} a task that is {e.status}.",
                        taskStatus=str(e.status))
    if isinstance(e, StoreUnavailable):
        return ApiError(503, "store_unavailable",
                        "The database is busy with another process's work; nothing was changed. "
                        "Send the request again in a few seconds.",
                        headers={"Retry-After": str(STORE_RETRY_AFTER_SECONDS)})
    if isinstance(e, StoreFull):
        return _disk_full()
    return ApiError(500, "internal_error", "The database refused the operation.")


def _disk_full() -> ApiError:
    return ApiError(507, "insufficient_storage",
                    "The server's disk is full, so nothing was stored. Try again later; the "
                    "administrator needs to free space on the data folder's disk.")


def _quota_error(used: int, limit: int) -> ApiError:
    mb = 1024 * 1024
    free = max(0, limit - used)
    return ApiError(507, "insufficient_storage",
                    f"This upload does not fit in your storage quota: your kept files use "
                    f"{used / mb:.1f} MB of {limit / mb:g} MB and {free / mb:.1f} MB is free. "
                    "Delete some tasks to make room.")


def api_error_from_parse(e: DocumentRefused | ParseAbandoned) -> ApiError:
    """The one place where the document sandbox's named errors become HTTP answers."""
    if isinstance(e, DocumentRefused):
        return ApiError(422, "bad_document", str(e))
    # Nobody reads this answer: the client is gone.
    return ApiError(400, "bad_request", "The client went away before its document was read.")


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error is a JSON envelope with ``code``, including aiohttp's own 404/405."""
    try:
        return await handler(request)
    except ApiError as e:
        response = json_error(e.status, e.code, e.message, headers=e.headers, **e.extra)
        if e.status in (408, 413):
            response.force_close()  # the rest of the body is not worth reading
        return response
    except StoreError as e:
        err = api_error_from_store(e)
        return json_error(err.status, err.code, err.message, headers=err.headers, **err.extra)
    except (DocumentRefused, ParseAbandoned) as e:
        err = api_error_from_parse(e)
        return json_error(err.status, err.code, err.message, headers=err.headers, **err.extra)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        message = {404: f"No such endpoint: {request.method} {request.path}",
                   405: f"{request.method} is not allowed on {request.path}."}.get(
                       e.status, e.reason)
        answer = json_error(e.status, CODE_BY_STATUS.get(e.status, "http_error"), message)
        # The exception's own headers stay (a 405 must say `Allow`, RFC 9110 15.5.6).
        answer.headers.extend((k, v) for k, v in e.headers.items()
                              if k not in (hdrs.CONTENT_TYPE, hdrs.CONTENT_LENGTH))
        return answer
    except Exception:
        logger.exception("unhandled error in %s %s", request.method, request.path)
        return json_error(500, "internal_error",
                          "Something went wrong on the server; the error was logged.")


# ----------------------------------------------------------------------- auth
async def create_session(request: web.Request) -> web.Response:
    """``POST /api/session {"token"}``: exchange an API token for a session cookie."""
    if same_origin(request) is False:
        raise cross_site()
    body = await _json_body(request, SESSION_MAX_BYTES)
    token = body.get("token")
    store = request.config_dict[STORE]
    user = await store.user_for_token(token) if isinstance(token, str) and token else None
    if user is None:
        raise ApiError(401, "unauthenticated", "That token is not valid.")
    response = web.json_response({"success": True, "userId": user})
    await set_session_cookie(request, response, user)
    return response


async def delete_session(request: web.Request) -> web.Response:
    """``DELETE /api/session``: revoke the session and end the streams opened with it."""
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        require_same_origin(request)
        revoked = await request.config_dict[STORE].revoke_token(token)
        request.config_dict[HUB].close_credentials({revoked})
    response = web.json_response({"success": True})
    response.del_cookie(SESSION_COOKIE, path="/")
    return response


# ---------------------------------------------------------------------- pages
async def index(request: web.Request) -> web.StreamResponse:
    """The page; ``/?token=...`` logs in (as Jupyter does) and redirects to a clean URL."""
    token = request.query.get("token")
    if token is not None:
        if not is_top_level_navigation(request):
            raise ApiError(403, "cross_site", "Log in with ?token= only by opening the link "
                           "in the browser; it is refused from images, scripts and frames.")
        user = await request.config_dict[STORE].user_for_token(token)
        target = request.rel_url.with_query(None)
        if user is None:
            raise web.HTTPFound(str(target.with_fragment("login-failed")))
        response = web.HTTPFound(str(target))
        await set_session_cookie(request, response, user)
        raise response
    return web.FileResponse(resource("static") / "index.html",
                            headers={"Cache-Control": "no-cache"})


async def admin_page(request: web.Request) -> web.StreamResponse:
    """The administrators' page (its script asks the admin API, which checks the role)."""
    return web.FileResponse(resource("static") / "admin.html",
                            headers={"Cache-Control": "no-cache"})


async def healthz(request: web.Request) -> web.Response:
    try:
        await request.config_dict[STORE].ping()
    except Exception as e:
        logger.error("health check: database unavailable: %s", e)
        return json_error(503, "unavailable", "The database is not answering.")
    return web.json_response({"success": True, "status": "ok"})


async def metrics_endpoint(request: web.Request) -> web.Response:
    m = request.config_dict[METRICS]
    store, config = request.config_dict[STORE], request.config_dict[CONFIG]
    m.set_task_counts(await store.count_tasks())
    m.set_health(await store.health_figures())
    m.set_disk(await _check_disk(config))
    m.sse_connections.set(request.config_dict[HUB].connection_count)
    pool = request.config_dict.get(POOL)
    m.running.set(pool.running_count if pool else 0)
    return web.Response(body=m.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})


async def _check_disk(config: Config) -> DiskSpace:
    """Free space of the data folder's file system; a warning in the log while it is low."""
    space = await asyncio.to_thread(disk_space, config.data_path)
    if space.is_low(config.disk_low_mb * 1024 * 1024):
        logger.warning("low disk space: %d MB free on the file system of %s (DISK_LOW_MB=%d)",
                       space.free // (1024 * 1024), config.data_path, config.disk_low_mb)
    return space


async def _disk_watch_ctx(app: web.Application) -> AsyncIterator[None]:
    """Warns in the log before the data folder's disk fills, between scrapes too."""
    config, metrics_ = app[CONFIG], app[METRICS]

    async def watch() -> None:
        while True:
            try:
                metrics_.set_disk(await _check_disk(config))
            except OSError as e:
                logger.error("cannot read the free space of %s: %s", config.data_path, e)
            await asyncio.sleep(config.reconcile_seconds)

    watcher = asyncio.create_task(watch(), name="zhiyi-disk-watch")
    yield
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher


async def openapi(request: web.Request) -> web.FileResponse:
    return web.FileResponse(resource("openapi.yaml"),
                            headers={"Content-Type": "application/yaml; charset=utf-8"})


# ---------------------------------------------------------------------- users
async def me(request: web.Request) -> web.Response:
    user_id = await current_user(request)
    user = await request.config_dict[STORE].get_user(user_id)
    assert user is not None
    return web.json_response({"success": True, "userId": user.id, "credits": user.credits})


async def ledger(request: web.Request) -> web.Response:
    user_id = await current_user(request)
    limit, cursor = _paging(request)
    entries, next_cursor = await request.config_dict[STORE].get_ledger(
        user_id, limit=limit, cursor=cursor)
    return web.json_response({
        "success": True, "nextCursor": next_cursor,
        "entries": [{"id": e.id, "amount": e.amount, "reason": e.reason, "taskId": e.task_id,
                     "balanceAfter": e.balance_after, "createdAt": e.created_at}
                    for e in entries],
    })


MAX_SQLITE_INT = 2**63 - 1


def _sqlite_int(text: str) -> int:
    """An integer SQLite can hold; ValueError otherwise (a huge id is as unknown as any)."""
    value = int(text)
    if not -MAX_SQLITE_INT <= value <= MAX_SQLITE_INT:
        raise ValueError(f"{text} is out of range")
    return value


_DIGITS = re.compile(r"[0-9]+")


def _whole_number(text: str) -> int:
    """ASCII digits only: ``int()`` would also take signs, spaces, ``_`` and other scripts'
    digits, which openapi.yaml's integers do not allow."""
    if not _DIGITS.fullmatch(text):
        raise ValueError(f"{text!r} is not a whole number")
    return int(text)


def _paging(request: web.Request) -> tuple[int, int | None]:
    try:
        limit = _whole_number(request.query.get("limit", "50"))
    except ValueError:
        limit = 0
    if limit < 1:
        raise ApiError(400, "bad_request", "limit must be a whole number of at least 1.")
    raw_cursor = request.query.get("cursor")
    if raw_cursor is None:
        return min(limit, 100), None
    try:
        cursor = _whole_number(raw_cursor)
    except ValueError:
        cursor = 0
    if not 1 <= cursor <= MAX_SQLITE_INT:
        raise ApiError(400, "bad_request", "cursor must be a value from nextCursor.")
    return min(limit, 100), cursor


# ---------------------------------------------------------- translation memory
TMX_CONTENT_TYPE = "application/x-tmx+xml"
MEMORY_EXPORT_PAGE = 5000


def _memory_scope_query(request: web.Request) -> Scope | None:
    """``?sourceLang=&targetLang=&engine=``: all three, or none (the whole memory)."""
    parts = [request.query.get(name, "").strip() for name in ("sourceLang", "targetLang",
                                                                "engine")]
    if not any(parts):
        return None
    if not all(parts):
        raise ApiError(400, "bad_request",
                       "Give sourceLang, targetLang and engine together, or none of them.")
    return Scope(parts[0].lower(), parts[1].lower(), parts[2])


async def memory_summary(request: web.Request) -> web.Response:
    """``GET /api/memory``: how many segments the user's memory holds, per pair and engine."""
    user_id = await current_user(request)
    summary = await request.config_dict[STORE].memory_summary(user_id)
    return web.json_response({
        "success": True, "segments": sum(n for _, n in summary),
        "scopes": [{"sourceLang": scope.source, "targetLang": scope.target,
                    "engine": scope.engine, "segments": n} for scope, n in summary],
    })


async def memory_clear(request: web.Request) -> web.Response:
    """``DELETE /api/memory``: forget the memory, or one pair and engine of it."""
    user_id = await current_user(request)
    deleted = await request.config_dict[STORE].memory_clear(
        user_id, _memory_scope_query(request))
    return web.json_response({"success": True, "deleted": deleted})


async def memory_export(request: web.Request) -> web.Response:
    """``GET /api/memory/export.tmx``: the whole memory as TMX 1.4."""
    user_id = await current_user(request)
    store = request.config_dict[STORE]
    entries: list[Entry] = []
    after = None
    while page := await store.memory_entries(user_id, after=after, limit=MEMORY_EXPORT_PAGE):
        entries.extend(entry for _, entry in page)
        after = page[-1][0]
    body = await asyncio.to_thread(to_tmx, entries)
    return web.Response(body=body, headers={
        "Content-Type": f"{TMX_CONTENT_TYPE}; charset=utf-8",
        "Content-Disposition": content_disposition("memory.tmx")})


async def memory_import(request: web.Request) -> web.Response:
    """``POST /api/memory/import[?engine=NAME]``: add a TMX document's units to the memory."""
    user_id = await current_user(request)
    config = request.config_dict[CONFIG]
    body = await read_body(request, config.max_upload_bytes, too_large=_too_large(config))
    if not body:
        raise ApiError(400, "bad_request", "Send a TMX document as the request body.")
    engine = request.query.get("engine", "").strip() or None
    if engine is not None and engine not in (*engines.ENGINE_NAMES,):
        raise ApiError(400, "unknown_engine", f"Unknown engine {engine!r}; the engines are "
                       f"{', '.join(engines.ENGINE_NAMES)}.")
    try:
        entries = await asyncio.to_thread(lambda: list(from_tmx(body, engine)))
    except BadTmx as e:
        raise ApiError(422, "bad_tmx", str(e)) from e
    imported = await request.config_dict[STORE].memory_remember(user_id, entries)
    return web.json_response({"success": True, "imported": imported})


# ---------------------------------------------------------------- glossaries
GLOSSARY_NAME = re.compile(r"[\w.@ -]{1,64}")


def glossary_json(glossary: Glossary, *, with_terms: bool = False) -> dict[str, Any]:
    data: dict[str, Any] = {"name": glossary.name, "sourceLang": glossary.source_lang,
                            "targetLang": glossary.target_lang, "terms": len(glossary.terms),
                            "createdAt": glossary.created_at}
    if with_terms:
        data["entries"] = [{"source": a, "target": b} for a, b in glossary.terms]
    return data


async def list_glossaries(request: web.Request) -> web.Response:
    """``GET /api/glossaries``: the user's glossaries (without their terms)."""
    user_id = await current_user(request)
    found = await request.config_dict[STORE].glossaries(user_id)
    return web.json_response({"success": True, "glossaries": [glossary_json(g) for g in found]})


async def get_glossary(request: web.Request) -> web.Response:
    user_id = await current_user(request)
    name = request.match_info["name"]
    found = await request.config_dict[STORE].glossaries(user_id, name)
    if not found:
        raise ApiError(404, "glossary_not_found", f"You have no glossary called {name!r}.")
    return web.json_response({"success": True,
                              "glossary": glossary_json(found[0], with_terms=True)})


async def delete_glossary(request: web.Request) -> web.Response:
    user_id = await current_user(request)
    name = request.match_info["name"]
    if not await request.config_dict[STORE].glossary_delete(user_id, name):
        raise ApiError(404, "glossary_not_found", f"You have no glossary called {name!r}.")
    return web.json_response({"success": True})


async def upload_glossary(request: web.Request) -> web.Response:
    """``POST /api/glossaries``: multipart ``name``, ``sourceLang``, ``targetLang``, ``file``.

    A glossary of the same name is replaced (200); a new one answers 201.
    """
    user_id = await current_user(request)
    fields, file_name, data = await _read_glossary_form(request)
    name = fields.get("name", "").strip()
    source, target = (fields.get(k, "").strip().lower() for k in ("sourceLang", "targetLang"))
    if not GLOSSARY_NAME.fullmatch(name):
        raise ApiError(400, "bad_request", "name must be 1-64 letters, digits, spaces, "
                       "'_', '.', '@' or '-'.")
    if not source or not target or source == "auto":
        raise ApiError(400, "bad_request", "Give sourceLang and targetLang (language codes, "
                       "e.g. en and de).")
    if data is None:
        raise ApiError(400, "missing_file", "Attach the glossary as the multipart field "
                       "'file' (.csv or .tbx).")
    try:
        terms = await asyncio.to_thread(parse_glossary, data, file_name, source, target)
    except BadGlossary as e:
        raise ApiError(422, "bad_glossary", str(e)) from e
    glossary = Glossary(name, source, target, terms)
    created = await request.config_dict[STORE].glossary_put(user_id, glossary)
    stored = (await request.config_dict[STORE].glossaries(user_id, name))[0]
    return web.json_response({"success": True, "glossary": glossary_json(stored)},
                             status=201 if created else 200)


async def _read_glossary_form(request: web.Request) -> tuple[dict[str, str], str, bytes | None]:
    if not request.headers.get("Content-Type", "").lower().startswith("multipart/"):
        raise ApiError(400, "bad_request", "Send multipart/form-data with the fields name, "
                       "sourceLang, targetLang and file.")
    config = request.config_dict[CONFIG]
    fields: dict[str, str] = {}
    file_name, data = "", None
    async with metered_body(request, config.max_upload_bytes + MAX_FIELD_BYTES) as progress:
        try:
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                progress()
                if not isinstance(part, aiohttp.BodyPartReader):
                    continue
                if part.name == "file":
                    file_name = clean_file_name(part.filename)
                    content = bytearray()
                    while chunk := await part.read_chunk(64 * 1024):
                        progress()
                        content += chunk
                    data = bytes(content)
                elif part.name in ("name", "sourceLang", "targetLang"):
                    fields[part.name] = await _read_field(part, part.name, progress)
                else:
                    while await part.read_chunk(64 * 1024):  # skipped, but counted
                        progress()
        except (ValueError, AssertionError, aiohttp.ClientPayloadError,
                HttpProcessingError) as e:
            reason = getattr(e, "message", None) or str(e)
            raise ApiError(400, "bad_request",
                           f"The multipart body is malformed: {reason}") from e
    return fields, file_name, data


# ---------------------------------------------------------------- task types
def engine_statuses(config: Config) -> list[dict[str, Any]]:
    statuses = [dataclasses.asdict(s) for s in engines.engine_statuses(config.engine_settings())]
    external_ok = bool(config.external_service_url and config.webhook_secret)
    statuses.append({
        "name": "external", "available": external_ok,
        "reason": None if external_ok else
        "Set EXTERNAL_SERVICE_URL and WEBHOOK_SECRET to use an external service.",
    })
    return statuses


#: what a translator sees instead of how to enable an engine (that is for administrators)
NOT_SET_UP = "This engine is not set up on this server; its administrator can enable it."


async def engine_details(request: web.Request) -> list[dict[str, Any]]:
    """Each engine's status for this request: the languages it translates into (``null``:
    any), whether it is the test engine (fake text), and how to enable it only for an
    administrator or a request from this machine; everyone else reads ``NOT_SET_UP``."""
    config = request.config_dict[CONFIG]
    local = await _may_read_hints(request)
    statuses = engine_statuses(config)
    settings = config.engine_settings()
    languages = await asyncio.gather(*(
        engines.supported_languages(s["name"], settings, request.config_dict[HTTP])
        if s["available"] else _nothing() for s in statuses))
    for status, langs in zip(statuses, languages, strict=True):
        status["languages"] = langs
        status["test"] = status["name"] == "pseudo"
        if not status["available"] and not local:
            status["reason"] = NOT_SET_UP
    return statuses


async def _nothing() -> None:
    return None


async def _may_read_hints(request: web.Request) -> bool:
    """An administrator, or a request from the server's own machine (who runs it)."""
    if _is_loopback(request):
        return True
    try:
        user_id = await current_user(request)
    except ApiError:
        return False
    user = await request.config_dict[STORE].get_user(user_id)
    return bool(user and user.is_admin)


def _is_loopback(request: web.Request) -> bool:
    """The request came from this machine (the peer's address, not a forwarded header)."""
    try:
        return ipaddress.ip_address(request.remote or "").is_loopback
    except ValueError:
        return False


def task_type_json(task_type: TaskType, config: Config,
                   details: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "taskType": task_type.name,
        "description": task_type.description,
        "params": {name: spec.as_json() for name, spec in task_type.params.items()},
        "extensions": list(task_type.extensions),
        "cost": task_type.cost_description,
    }
    if task_type.results:
        data["results"] = dict(task_type.results)
    if "engine" in task_type.params and task_type.cost is translate_cost:
        # analyze takes an engine to quote, too
        data["engines"] = details if details is not None else engine_statuses(config)
        if details is not None:
            data["defaultEngine"] = engines.default_engine(
                e["name"] for e in details if e["available"])
    return data


async def task_types(request: web.Request) -> web.Response:
    config = request.config_dict[CONFIG]
    details = await engine_details(request)
    return web.json_response({
        "success": True,
        "taskTypes": [task_type_json(t, config, details) for t in request.config_dict[REGISTRY]],
        # what a page checks before it uploads, and how many tries a task gets
        "maxUploadMb": config.max_upload_mb, "maxAttempts": config.max_attempts,
    })


# ---------------------------------------------------------------------- tasks
def task_json(request: web.Request, task: Task) -> dict[str, Any]:
    """The contract's Task object."""
    completed = task.status is TaskStatus.COMPLETED
    return {
        "taskId": task.id, "userId": task.user_id, "taskType": task.task_type,
        "taskStatus": task.status.value, "progressPercent": task.progress,
        "statusMessage": task.status_message, "stage": task.stage,
        "etaSeconds": task.eta_seconds, "params": task.params, "fileName": task.file_name,
        "fileSize": task.file_size, "creditsCost": task.credits_cost, "attempts": task.attempts,
        "externalTaskId": task.external_task_id, "errorMessage": task.error_message,
        "errorCode": task.error_code,
        "resultUrl": _url(request, "task_result", taskId=str(task.id)) if completed else None,
        "resultName": task.result_name if completed else None,
        "expired": task.files_expired,
        "createdAt": task.created_at, "updatedAt": task.updated_at,
        "completedAt": task.completed_at,
        "userTaskNo": task.user_task_no, "detectedLang": task.detected_lang,
        "stageCode": task.stage, **messages.message_fields(task.status_message),
        **messages.error_fields(task.error_message),
    }


def _url(request: web.Request, name: str, **parts: str) -> str:
    return str(request.app.router[name].url_for(**parts))


def _task_id(request: web.Request) -> int:
    try:
        return _sqlite_int(request.match_info["taskId"])
    except ValueError as e:
        raise ApiError(404, "task_not_found",
                       "Task does not exist or you have no permission to access it.") from e


async def list_tasks(request: web.Request) -> web.Response:
    user_id = await current_user(request)
    limit, cursor = _paging(request)
    status = _status_filter(request)
    tasks, next_cursor = await request.config_dict[STORE].get_user_tasks(
        user_id, status=status, limit=limit, cursor=cursor)
    return web.json_response({"success": True, "tasks": [task_json(request, t) for t in tasks],
                              "nextCursor": next_cursor})


def _status_filter(request: web.Request) -> TaskStatus | None:
    if "status" not in request.query:  # present but empty is not a status either
        return None
    try:
        return TaskStatus(request.query["status"])
    except ValueError as e:
        raise ApiError(400, "bad_request", "status must be one of "
                       + ", ".join(s.value for s in TaskStatus) + ".") from e


async def get_task(request: web.Request) -> web.Response:
    user_id = await current_user(request)
    task = await request.config_dict[STORE].get_task_by_id(_task_id(request), user_id)
    return web.json_response({"success": True, "task": task_json(request, task)})


async def cancel_task(request: web.Request) -> web.Response:
    user_id = await current_user(request)
    task = await request.config_dict[STORE].cancel_task(_task_id(request), user_id)
    _stop_processor(request, task.id)
    return web.json_response({"success": True, "task": task_json(request, task)})


async def retry_task(request: web.Request) -> web.Response:
    user_id = await current_user(request)
    task = await request.config_dict[STORE].retry_task(
        _task_id(request), user_id,
        max_active=request.config_dict[CONFIG].max_active_tasks_per_user)
    _wake_workers(request)
    return web.json_response({"success": True, "task": task_json(request, task)})


async def delete_task(request: web.Request) -> web.Response:
    user_id = await current_user(request)
    task = await request.config_dict[STORE].delete_task(_task_id(request), user_id)
    _stop_processor(request, task.id)
    base = task_dirs(request.config_dict[CONFIG].data_path, task)[0]
    await asyncio.to_thread(shutil.rmtree, base, True)
    return web.json_response({"success": True, "taskId": task.id})


async def task_result(request: web.Request) -> web.StreamResponse:
    user_id = await current_user(request)
    task = await request.config_dict[STORE].get_task_by_id(_task_id(request), user_id)
    if task.status is not TaskStatus.COMPLETED:
        raise ApiError(409, "not_completed",
                       f"The task is {task.status.value}; its result exists once it is completed.")
    path = task_dirs(request.config_dict[CONFIG].data_path, task)[2] / (task.result_name or "")
    if task.files_expired or not path.is_file():
        raise ApiError(410, "expired", "This result was deleted after the retention period.")
    return web.FileResponse(path, headers={
        "Content-Disposition": content_disposition(task.result_name or "result"),
        "Content-Type": _content_type(path.name),
        "Content-Security-Policy": RESULT_CSP,
    })


def content_disposition(name: str) -> str:
    """RFC 6266 with an ASCII fallback and the UTF-8 name in ``filename*``."""
    fallback = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    fallback = re.sub(r'[^A-Za-z0-9._ -]', "_", fallback).strip()
    if not fallback.split(".")[0].strip("_ "):  # nothing left of the stem (e.g. 报告.txt)
        fallback = "result" + fallback[fallback.find("."):] if "." in fallback else "result"
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


CONTENT_TYPES = {
    ".txt": "text/plain; charset=utf-8", ".md": "text/markdown; charset=utf-8",
    ".srt": "application/x-subrip; charset=utf-8", ".html": "text/html; charset=utf-8",
    ".htm": "text/html; charset=utf-8", ".json": "application/json; charset=utf-8",
    ".docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    ".odt": "application/vnd.oasis.opendocument.text",
    ".pptx": "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    ".xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    ".xlf": "application/xliff+xml", ".xliff": "application/xliff+xml",
    ".po": "text/x-gettext-translation; charset=utf-8",
}


def _content_type(name: str) -> str:
    return CONTENT_TYPES.get(Path(name).suffix.lower(), "application/octet-stream")


def _stop_processor(request: web.Request, task_id: int) -> None:
    """The database already says cancelled: stop the coroutine if it runs here."""
    pool = request.config_dict.get(POOL)
    if pool is not None:
        pool.cancel_running(task_id)


def _wake_workers(request: web.Request) -> None:
    pool = request.config_dict.get(POOL)
    if pool is not None:
        pool.wake()


# -------------------------------------------------------------------- create
def clean_file_name(raw: str | None) -> str:
    """Last path component, no control characters or separators; empty → ``upload``.

    Percent-escapes are decoded first: aiohttp's client (and some others) send
    non-ASCII names as ``%E6%8A%A5...``.
    """
    name = re.split(r"[/\\]", unquote(raw or ""))[-1]
    name = "".join(c for c in name if unicodedata.category(c)[0] != "C" and c not in ':*?"<>|')
    name = name.strip().strip(".") if name.strip() in {".", ".."} else name.strip()
    if len(name.encode()) > 200:
        stem, suffix = Path(name).stem, Path(name).suffix[:20]
        name = stem.encode()[: 200 - len(suffix.encode())].decode(errors="ignore") + suffix
    return name or "upload"


@dataclass
class Upload:
    """What the multipart body of a create request carried."""

    task_type: str | None = None
    params_text: str | None = None
    file_name: str | None = None
    file_path: Path | None = None
    file_size: int = 0
    #: where pricing keeps its parse of the document for the task's attempts
    work_dir: Path | None = None


MAX_FIELD_BYTES = 64 * 1024


async def create_task(request: web.Request) -> web.Response:
    """``POST /api/tasks/create``: stream the file to disk, price it, charge and queue."""
    user_id = await current_user(request)
    store = request.config_dict[STORE]
    config = request.config_dict[CONFIG]
    key = request.headers.get("Idempotency-Key") or None
    if key and len(key) > 200:
        raise ApiError(400, "bad_request", "Idempotency-Key must be at most 200 characters.")
    if key and (earlier := await store.find_by_idempotency_key(user_id, key)):
        return _created(request, earlier, status=200)
    room = await _storage_room(store, user_id, request.content_length, config)
    task_dir_rel = task_folder(user_id, uuid.uuid4().hex)
    task_dir = config.data_path / task_dir_rel
    try:
        upload = await _receive_upload(request, task_dir / "original", config, room,
                                       work_dir=task_dir / "work")
        task_type, params = _validate_upload(request, upload)
        quote, cost = await _price(request, user_id, task_type, params, upload)
        task, created = await store.create_processing_task(NewTask(
            user_id=user_id, task_type=task_type.name, params=params,
            file_name=upload.file_name or "upload", file_size=upload.file_size,
            file_path=task_dir_rel, credits_cost=cost, idempotency_key=key,
            max_active=config.max_active_tasks_per_user, max_storage=config.max_storage_bytes,
            detected_lang=quote.stats.language if quote.stats else None,
        ))
    except BaseException:
        await asyncio.to_thread(shutil.rmtree, task_dir, True)
        raise
    if not created:
        await asyncio.to_thread(shutil.rmtree, task_dir, True)
        return _created(request, task, status=200)
    logger.info("task %s of user %s created: %s, %d credits", task.id, user_id,
                task.task_type, cost)
    _wake_workers(request)
    return _created(request, task, status=201, quote=quote_json(quote, cost))


def _created(request: web.Request, task: Task, status: int,
             quote: dict[str, Any] | None = None) -> web.Response:
    body = {"success": True, "taskId": task.id, "task": task_json(request, task),
            "sseUrl": _url(request, "sse_task", taskId=str(task.id))}
    if quote is not None:
        body["quote"] = quote
    return web.json_response(body, status=status)


async def quote_task(request: web.Request) -> web.Response:
    """``POST /api/tasks/quote``: what creating this task would charge; nothing is kept."""
    user_id = await current_user(request)
    config = request.config_dict[CONFIG]
    scratch = config.data_path / user_id / f"quote-{uuid.uuid4().hex}"
    try:
        # Nothing is kept, so the storage quota does not apply (only the upload cap).
        upload = await _receive_upload(request, scratch, config, StorageRoom(0, 0))
        task_type, params = _validate_upload(request, upload)
        # A quote charges nothing: no balance is needed to ask for one.
        quote, cost = await _price(request, user_id, task_type, params, upload,
                                   check_balance=False)
    finally:
        await asyncio.to_thread(shutil.rmtree, scratch, True)
    return web.json_response({"success": True, "quote": quote_json(quote, cost)})


def quote_json(quote: Quote, cost: int) -> dict[str, Any]:
    """The quote as the create and quote answers carry it."""
    stats = quote.stats
    return {"credits": cost,
            "segments": stats.segments if stats else None,
            "characters": stats.characters if stats else None,
            "fromMemory": quote.remembered_segments,
            "charactersFromMemory": quote.remembered_characters,
            "language": stats.language if stats else None}


def _too_large(config: Config) -> ApiError:
    return ApiError(413, "file_too_large",
                    f"The file is larger than the {config.max_upload_mb} MB limit.")


@dataclass(frozen=True)
class StorageRoom:
    """How many bytes of the user's storage quota an upload may still take."""

    used: int
    limit: int

    @property
    def free(self) -> int:
        return self.limit - self.used if self.limit else 2**63

    def refuse(self) -> ApiError:
        return _quota_error(self.used, self.limit)


#: a file that is not kept (a quote's) is bounded by the upload cap only
NO_QUOTA = StorageRoom(0, 0)


async def _storage_room(store: TaskStore, user_id: str, declared: int | None,
                        config: Config) -> StorageRoom:
    """The quota left before reading the body; refused at once when it cannot fit.

    Checked again while the file streams and, exactly, in the create transaction.
    """
    if not config.max_storage_bytes:
        return NO_QUOTA
    room = StorageRoom(await store.storage_used(user_id), config.max_storage_bytes)
    if room.free <= 0 or (declared or 0) > room.free + MAX_FIELD_BYTES:
        raise room.refuse()
    return room


async def _receive_upload(request: web.Request, original_dir: Path, config: Config,
                          room: StorageRoom | None = None, *,
                          work_dir: Path | None = None) -> Upload:
    """The multipart body, under the upload cap (plus slack) and the body deadline.

    ``work_dir`` (made with ``original_dir``) receives the parse made for pricing;
    without it, the parse goes beside the file.
    """
    async with metered_body(request, config.max_upload_bytes + MULTIPART_SLACK_BYTES,
                            rolling=True, too_large=_too_large(config)) as progress:
        return await _read_upload(request, original_dir, config, progress,
                                  room or NO_QUOTA, Upload(work_dir=work_dir or original_dir))


async def _read_upload(request: web.Request, original_dir: Path, config: Config,
                       progress: Callable[[], None], room: StorageRoom, upload: Upload) -> Upload:
    # The raw header: aiohttp's parsed content_type costs ~0.5 ms per upload
    # (every multipart boundary is new, so its cache never hits).
    if not request.headers.get("Content-Type", "").lower().startswith("multipart/"):
        raise ApiError(400, "bad_request",
                       "Send multipart/form-data with the fields file, taskType and params.")
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            progress()
            if not isinstance(part, aiohttp.BodyPartReader):
                continue
            # Parsed once here: aiohttp re-parses the header on every .name/.filename.
            disposition = disposition_params(part.headers.get(hdrs.CONTENT_DISPOSITION))
            name = content_disposition_filename(disposition, "name")
            if name == "file":
                filename = content_disposition_filename(disposition, "filename")
                await _save_file(part, filename, upload, original_dir, config, progress, room)
            elif name == "taskType":
                upload.task_type = (await _read_field(part, name, progress)).strip()
            elif name == "params":
                upload.params_text = await _read_field(part, name, progress)
            else:
                while await part.read_chunk(64 * 1024):  # skipped, but counted
                    progress()
    except (ValueError, AssertionError, aiohttp.ClientPayloadError,
            HttpProcessingError) as e:
        reason = getattr(e, "message", None) or str(e)
        raise ApiError(400, "bad_request", f"The multipart body is malformed: {reason}") from e
    return upload


# What browsers, curl and aiohttp send: form-data; name="..."; filename="..."
_SIMPLE_DISPOSITION = re.compile(r'form-data((?:\s*;\s*[A-Za-z]+="[^"\\;]*")*)\s*',
                                 re.IGNORECASE | re.ASCII)  # ASCII: no Kelvin sign as a "K"
_SIMPLE_PARAM = re.compile(r'\s*;\s*([A-Za-z]+)="([^"\\;]*)"')


def disposition_params(header: str | None) -> dict[str, str]:
    """The parameters of a part's Content-Disposition, as aiohttp's parser gives them.

    The common simple form is read with one regular expression; anything else
    (escapes, RFC 5987 ``filename*``, continuations, a repeated or odd parameter)
    goes to aiohttp's parser, which re-escapes a 128-character set on every call
    (~250 µs) and was ~4 % of the server's CPU per task. The results are the same
    (a property test holds them to aiohttp's), down to the leading ``/`` it strips.
    """
    simple = _simple_disposition(header)
    return simple if simple is not None else _AIOHTTP_DISPOSITION(header)[1]


def _simple_disposition(header: str | None) -> dict[str, str] | None:
    """The parameters of a simple ``form-data; name="..."`` header; None for any other."""
    if header and (simple := _SIMPLE_DISPOSITION.fullmatch(header)):
        params: dict[str, str] = {}
        for key, value in _SIMPLE_PARAM.findall(simple.group(1)):
            key = key.lower()
            if key in params:
                return None  # aiohttp refuses the whole header: let it say so
            params[key] = value.lstrip("/")
        return params
    return None


_AIOHTTP_DISPOSITION = aiohttp.multipart.parse_content_disposition


def _fast_content_disposition(header: str | None) -> tuple[str | None, dict[str, str]]:
    simple = _simple_disposition(header)
    return ("form-data", simple) if simple is not None else _AIOHTTP_DISPOSITION(header)


def use_fast_content_disposition() -> None:
    """Give aiohttp's multipart reader the fast path for its own header reads.

    ``MultipartReader.next()`` parses every form-data part's Content-Disposition
    again (looking for a ``_charset_`` field; it clears the "first part" marker
    before checking it), with the slow parser above: three parts of an upload cost
    ~0.8 ms of a small task's ~10. The module's function is swapped for one that
    answers the same (the property test holds the pair to aiohttp's own) and falls
    back to it for anything but the simple form. Process-wide, once; an embedding
    app's own multipart reads get the same answers, sooner.
    """
    aiohttp.multipart.parse_content_disposition = _fast_content_disposition  # type: ignore[assignment]


async def _read_field(part: aiohttp.BodyPartReader, name: str,
                      progress: Callable[[], None]) -> str:
    """A small text field, read no further than its cap."""
    data = bytearray()
    while chunk := await part.read_chunk(16 * 1024):
        progress()
        data += chunk
        if len(data) > MAX_FIELD_BYTES:
            raise ApiError(413, "too_large", f"The field {name} is longer than 64 KB.",
                           limit=MAX_FIELD_BYTES)
    return bytes(data).decode("utf-8", errors="replace")


#: a file up to this size is written in one thread hop (its folders, open, write, close)
#: once its last byte arrived, rather than streamed with a hop per step: most documents
#: are small, and each hop costs a thread's and the event loop's wake-ups
WRITE_AT_ONCE_BYTES = 256 * 1024
UPLOAD_CHUNK_BYTES = 256 * 1024


async def _save_file(part: aiohttp.BodyPartReader, filename: str | None, upload: Upload,
                     original_dir: Path, config: Config, progress: Callable[[], None],
                     room: StorageRoom) -> None:
    """Stream one file part to disk (0600), enforcing the size cap and quota as bytes arrive."""
    if upload.file_path is not None:
        raise ApiError(400, "bad_request", "Send exactly one file per task.")
    upload.file_name = clean_file_name(filename)
    upload.file_path = path = original_dir / upload.file_name
    head = bytearray()
    try:
        while chunk := await part.read_chunk(UPLOAD_CHUNK_BYTES):
            _count_upload(upload, len(chunk), config, room, progress)
            head += chunk
            if len(head) > WRITE_AT_ONCE_BYTES:
                await asyncio.to_thread(_make_upload_dirs, original_dir, upload.work_dir)
                await _stream_rest(part, path, bytes(head), upload, config, room, progress)
                return
        await asyncio.to_thread(_write_small_upload, path, bytes(head), upload.work_dir)
    except OSError as e:
        if is_disk_full(e):
            logger.error("upload refused: the data folder's disk is full (%s)", e)
            raise _disk_full() from e
        raise


def _count_upload(upload: Upload, size: int, config: Config, room: StorageRoom,
                  progress: Callable[[], None]) -> None:
    progress()
    upload.file_size += size
    if upload.file_size > config.max_upload_bytes:
        raise _too_large(config)
    if upload.file_size > room.free:
        raise room.refuse()


async def _stream_rest(part: aiohttp.BodyPartReader, path: Path, head: bytes, upload: Upload,
                       config: Config, room: StorageRoom, progress: Callable[[], None]) -> None:
    """A large file: what arrived so far, then each chunk as it arrives."""
    async with aiofiles.open(path, "wb", opener=_private_opener) as f:
        await f.write(head)
        while chunk := await part.read_chunk(UPLOAD_CHUNK_BYTES):
            _count_upload(upload, len(chunk), config, room, progress)
            await f.write(chunk)


def _write_small_upload(path: Path, data: bytes, work_dir: Path | None) -> None:
    _make_upload_dirs(path.parent, work_dir)
    with open(path, "wb", opener=_private_opener) as f:
        f.write(data)


def _make_upload_dirs(original_dir: Path, work_dir: Path | None) -> None:
    make_private_dirs(original_dir)
    if work_dir is not None:
        make_private_dirs(work_dir)


def _private_opener(path: str, flags: int) -> int:
    """Files the server writes are readable by its own user only."""
    return os.open(path, flags, 0o600)


def _validate_upload(request: web.Request, upload: Upload) -> tuple[TaskType, dict[str, Any]]:
    registry = request.config_dict[REGISTRY]
    names = ", ".join(t.name for t in registry)
    if not upload.task_type:
        raise ApiError(400, "bad_request", f"taskType is required: one of {names}.")
    task_type = registry.get(upload.task_type)
    if task_type is None:
        raise ApiError(400, "unknown_task_type",
                       f"Unknown taskType {upload.task_type!r}: use one of {names}.")
    if upload.file_path is None:
        raise ApiError(400, "missing_file", "Attach the document as the multipart field 'file'.")
    if upload.file_size == 0:
        raise ApiError(422, "bad_document", "The file is empty.")
    suffix = Path(upload.file_name or "").suffix.lower()
    if suffix not in task_type.extensions:
        raise ApiError(415, "unsupported_file_type",
                       f"{task_type.name} does not accept {suffix or 'files without an extension'}"
                       f"; it accepts {' '.join(task_type.extensions)}.")
    params = _parse_params(upload.params_text)
    _check_params(task_type, params, request.config_dict[CONFIG])
    return task_type, params


def _parse_params(text: str | None) -> dict[str, Any]:
    if text is None or not text.strip():
        return {}
    try:
        params = json.loads(text)
    except json.JSONDecodeError as e:
        raise ApiError(400, "bad_params", f"params is not valid JSON: {e.msg}.") from e
    except RecursionError as e:
        raise ApiError(400, "bad_params", "params is nested too deeply; send a flat "
                       "JSON object of names and values.") from e
    if not isinstance(params, dict):
        raise ApiError(400, "bad_params", "params must be a JSON object.")
    for name, value in params.items():
        if isinstance(value, dict | list):
            raise ApiError(400, "bad_params", f"The parameter {name!r} must be a string, "
                           "number or boolean, not a nested object or list.")
    return params


def _check_params(task_type: TaskType, params: dict[str, Any], config: Config) -> None:
    # Types that declare their params take no others; an external type without
    # declarations passes its (flat, 64 KB) params on to the service as they are.
    unknown = sorted(set(params) - set(task_type.params)) if task_type.params else []
    if unknown:
        raise ApiError(400, "bad_params", f"Unknown parameter {unknown[0]!r} for "
                       f"{task_type.name}; it takes {', '.join(task_type.params)}.")
    for name, spec in task_type.params.items():
        value = params.get(name)
        if value is None or value == "":
            if spec.required:
                raise ApiError(400, "bad_params", f"The parameter {name} is required "
                               f"for {task_type.name}: {spec.description}.")
            if spec.default is not None:
                params[name] = spec.default
        elif not isinstance(value, str):
            raise ApiError(400, "bad_params", f"The parameter {name} must be a string.")
        elif spec.choices and name != "engine" and value not in spec.choices:
            raise ApiError(400, "bad_params", f"The parameter {name} must be one of "
                           f"{', '.join(spec.choices)}.")
    if "engine" in task_type.params:
        _check_engine(params.get("engine"), config)


def _check_engine(engine: Any, config: Config) -> None:
    """400 ``unknown_engine`` unless ``engine`` can be used here. Every create asks: the
    one engine's check comes first, the whole list only to name the choices (and for
    ``external``, which is this server's, not an engine of engines.py)."""
    if isinstance(engine, str) and engines.is_available(engine, config.engine_settings()):
        return
    available = [s["name"] for s in engine_statuses(config) if s["available"]]
    if engine not in available:
        raise ApiError(400, "unknown_engine",
                       f"The engine {engine!r} is not available; "
                       f"available engines: {', '.join(available)}.", available=available)


NO_TEXT = formats.DocumentStats(characters=0, words=0, segments=0, language="unknown")


async def _price(request: web.Request, user_id: str, task_type: TaskType,
                 params: dict[str, Any], upload: Upload, *, check_balance: bool = True,
                 ) -> tuple[Quote, int]:
    """Read the document (its cost depends on it) in the sandbox; a bad one is refused.

    Before anything is read, the balance is checked against the least the task
    could cost, so a user who cannot pay is refused without the server reading
    the file; the exact charge is checked again when the task is created. A
    translation does not charge the segments the user's memory holds.
    """
    assert upload.file_path is not None
    if not task_type.parses_document:
        quote = Quote(upload.file_size, None)
        return quote, task_type.cost(quote, params)
    remembers: bool | None = None
    if check_balance:
        least, remembers = await _least_cost(request, user_id, task_type, params,
                                             upload.file_size)
        await _check_balance_floor(request, user_id, least)
    assert upload.work_dir is not None
    # One parse per task: what it spools is kept for the attempt (and the memory lookup).
    document = await _parse_upload(request, user_id, upload.file_path, upload.work_dir)
    quote = Quote(upload.file_size, document.stats)
    if task_type.cost is translate_cost:
        quote = await _with_memory(request, user_id, params, document, quote, remembers)
    return quote, task_type.cost(quote, params)


async def _parse_upload(request: web.Request, user_id: str, path: Path,
                        work_dir: Path) -> ParsedDocument:
    """Parse the document once for the task: its statistics price it, its spooled segments
    feed the memory lookup now, and the parse is kept in ``work_dir`` for the attempt
    (which then reads the file only to write the result)."""
    try:
        return await request.config_dict[SANDBOX].open(
            path, user=user_id, work_dir=work_dir, keep=True,
            still_wanted=lambda: _client_connected(request))
    except OSError as e:
        if is_disk_full(e):
            raise _disk_full() from e
        raise


async def _least_cost(request: web.Request, user_id: str, task_type: TaskType,
                      params: dict[str, Any], file_size: int) -> tuple[int, bool | None]:
    """What the task costs at the least, whatever the document holds; and whether the
    user's memory holds anything, if that was read for it (the quote needs it next)."""
    least = task_type.cost(Quote(file_size, NO_TEXT), params)
    remembers = None
    if least and task_type.cost is translate_cost and params.get("memory") != "ignore":
        remembers = await request.config_dict[STORE].memory_holds(user_id)
        if remembers:
            least = 0  # every segment may be remembered, and then it costs nothing
    return least, remembers


async def _with_memory(request: web.Request, user_id: str, params: dict[str, Any],
                       document: ParsedDocument, quote: Quote, remembers: bool | None = None,
                       ) -> Quote:
    """The quote with the segments found in the user's translation memory (``remembers``:
    whether it holds anything at all, when that is known)."""
    assert quote.stats is not None
    store = request.config_dict[STORE]
    glossary = await _glossary_of(request, user_id, params, quote.stats.language)
    scope = memory_scope(params, quote.stats.language, glossary)
    if scope is None or params.get("memory") == "ignore":
        return quote
    if remembers is False or not await store.memory_holds(user_id, scope):
        return quote  # nothing remembered for this pair: no segment to hash and look up
    keys = await asyncio.to_thread(segment_keys, document)
    found = await store.memory_lookup(user_id, scope, [key for key, _ in keys])
    hits, characters = remembered(keys, found)
    return dataclasses.replace(quote, remembered_segments=hits, remembered_characters=characters)


async def _glossary_of(request: web.Request, user_id: str, params: dict[str, Any],
                       language: str) -> Glossary | None:
    """The glossary ``params`` names, checked against the pair; 400 when it cannot serve."""
    name = params.get("glossary")
    if not name:
        return None
    found = await request.config_dict[STORE].glossaries(user_id, name)
    glossary = found[0] if found else None
    source = params.get("sourceLang") or "auto"
    problem = glossary_problem(glossary, name, language if source == "auto" else source,
                               str(params.get("targetLang") or ""))
    if problem:
        raise ApiError(400, "unknown_glossary", problem)
    return glossary


async def _check_balance_floor(request: web.Request, user_id: str, floor: int) -> None:
    if floor <= 0:
        return  # a balance is never below 0 (schema.sql: CHECK (credits >= 0))
    user = await request.config_dict[STORE].get_user(user_id)
    balance = user.credits if user is not None else 0
    if balance < floor:
        raise ApiError(402, "insufficient_credits",
                       f"This needs at least {floor} credits but your balance is {balance}.",
                       needed=floor, balance=balance)


def _client_connected(request: web.Request) -> bool:
    transport = request.transport
    return transport is not None and not transport.is_closing()


async def _json_body(request: web.Request, limit: int) -> dict[str, Any]:
    """A JSON object body sent as ``application/json`` (forms cannot send that cross-site)."""
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type",
                       "Send the body as JSON with 'Content-Type: application/json'.")
    raw = await read_body(request, limit)
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ApiError(400, "bad_request", "The body must be a JSON object.") from e
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "The body must be a JSON object.")
    return body


# ------------------------------------------------------------------------ SSE
def _last_event_id(request: web.Request) -> int | None:
    # The header wins, but both are checked: a malformed one is refused, never ignored.
    # An empty header is no id (as EventSource means it).
    header = request.headers.get("Last-Event-ID") or None
    query = request.query.get("lastEventId")
    from_query = _event_id(query) if query is not None else None
    return _event_id(header) if header is not None else from_query


def _event_id(text: str) -> int:
    try:
        # An id past every id has nothing after it; SQLite cannot hold more than its max.
        return min(_whole_number(text), MAX_SQLITE_INT)
    except ValueError as e:
        raise ApiError(400, "bad_request", "Last-Event-ID must be an event id.") from e


def _subscribe(request: web.Request, credential: Credential, task_id: int | None) -> Any:
    hub = request.config_dict[HUB]
    if hub.closing:
        raise ApiError(503, "unavailable", "The server is shutting down; reconnect shortly.")
    try:
        # The stream remembers its credential: revoking it ends the stream.
        return hub.subscribe(credential.user_id, task_id, credential=credential.token_hash)
    except StreamLimitReached as e:
        if e.scope == "per_user":
            raise ApiError(429, "too_many_streams",
                           f"You already have {e.limit} open streams; close some tabs.") from e
        raise ApiError(503, "too_many_streams",
                       "The server has too many open streams; try again shortly.") from e


async def sse_task(request: web.Request) -> web.StreamResponse:
    """``GET /api/sse/tasks/{taskId}``: the state of one task, then its events live."""
    credential = await current_credential(request)
    user_id = credential.user_id
    store = request.config_dict[STORE]
    task_id = _task_id(request)
    last_id = _last_event_id(request)
    sub = _subscribe(request, credential, task_id)
    try:
        # Read after subscribing: whatever commits from now on is also in the buffer.
        # The same statement checks the task is the user's (404 otherwise).
        start = await store.stream_start(user_id=user_id, task_id=task_id)
        state = start.state
        if state is None:  # history pruned: the task ended long ago and no longer changes
            state = store.status_data(await store.get_task_by_id(task_id, user_id))
        final = state["status"] in FINAL_STATUS_VALUES
        if last_id is not None and final and last_id >= start.latest:
            return web.Response(status=204)  # tells EventSource to stop reconnecting

        async def replay(after: int) -> list[Any]:
            return await store.events_after(after, task_id=task_id, limit=REPLAY_PAGE)

        preamble, after = _preamble(last_id, start, state)
        plan = StreamPlan(preamble, after, replay, ends_on_final=True,
                          already_final=bool(preamble) and final,
                          replay_first=last_id is not None)
        return await _serve(request, sub, plan)
    finally:
        request.config_dict[HUB].unsubscribe(sub)


async def sse_notifications(request: web.Request) -> web.StreamResponse:
    """``GET /api/sse/notifications``: every event of the user's tasks, and notices."""
    credential = await current_credential(request)
    user_id = credential.user_id
    store = request.config_dict[STORE]
    last_id = _last_event_id(request)
    sub = _subscribe(request, credential, None)
    try:
        start = await store.stream_start(user_id=user_id)
        state = start.state
        if state is None:  # history pruned: the newest task ended long ago
            recent, _ = await store.get_user_tasks(user_id, limit=1)
            state = store.status_data(recent[0]) if recent else None

        async def replay(after: int) -> list[Any]:
            return await store.events_after(after, user_id=user_id, limit=REPLAY_PAGE)

        preamble, after = _preamble(last_id, start, state)
        return await _serve(request, sub, StreamPlan(preamble, after, replay,
                                                     ends_on_final=False,
                                                     replay_first=last_id is not None))
    finally:
        request.config_dict[HUB].unsubscribe(sub)


FINAL_STATUS_VALUES = frozenset(s.value for s in TaskStatus if s.is_final)


def _preamble(last_id: int | None, start: StreamStart,
              state: dict[str, Any] | None) -> tuple[list[bytes], int]:
    """The snapshot (no Last-Event-ID) or a reset (history pruned), and where replay starts.

    ``start.latest`` and ``state`` come from one statement, so the snapshot's id and
    its content agree and the live events after it are exactly those > latest.
    """
    latest = start.latest
    if last_id is None:
        return ([encode_event(latest, "status_update", state)] if state else []), latest
    if last_id < start.pruned_through:
        return ([encode_event(latest, "reset", state)] if state else []), latest
    return [], last_id


async def _serve(request: web.Request, sub: Any, plan: StreamPlan) -> web.StreamResponse:
    config = request.config_dict[CONFIG]
    return await stream_events(request, sub, plan, retry_ms=config.sse_retry_ms)


# ---------------------------------------------------------------------- admin
#: user names: what ``zhiyi user add`` and ``POST /api/admin/users`` accept
USER_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
ADMIN_BODY_MAX_BYTES = 4096


async def current_admin(request: web.Request) -> str:
    """The user, if an administrator; else 403 ``not_admin``."""
    user_id = await current_user(request)
    user = await request.config_dict[STORE].get_user(user_id)
    if user is None or not user.is_admin:
        raise ApiError(403, "not_admin", "Only the server's administrators may do this; one "
                       "can make you one with `zhiyi user admin NAME` on the server.")
    return user_id


def _admin_target(request: web.Request) -> str:
    name = request.match_info["userId"]
    if not USER_NAME.fullmatch(name):
        raise ApiError(404, "user_not_found", f"There is no user named {name!r}.")
    return name


async def admin_users(request: web.Request) -> web.Response:
    """``GET /api/admin/users``: every user with balance and usage."""
    await current_admin(request)
    store = request.config_dict[STORE]
    usage = await store.user_usage()
    return web.json_response({"success": True, "users": [
        {"userId": u.id, "credits": u.credits, "isAdmin": u.is_admin,
         "disabled": u.disabled_at is not None, "createdAt": u.created_at,
         "tasks": usage.get(u.id, (0, 0))[0], "creditsSpent": usage.get(u.id, (0, 0))[1]}
        for u in await store.list_users()]})


async def admin_create_user(request: web.Request) -> web.Response:
    """``POST /api/admin/users {userId, credits, admin}``: the token and login link, once."""
    await current_admin(request)  # a cookie's change must be same-origin: checked there
    body = await _json_body(request, ADMIN_BODY_MAX_BYTES)
    name, credits, admin = body.get("userId"), body.get("credits", 0), body.get("admin", False)
    if not isinstance(name, str) or not USER_NAME.fullmatch(name):
        raise ApiError(400, "bad_request", "userId must be 1-64 letters, digits, '_', '.', "
                       "'@' or '-'.")
    if type(credits) is not int or not 0 <= credits <= 2**53 or type(admin) is not bool:
        raise ApiError(400, "bad_request",
                       "credits must be a whole number of at least 0; admin true or false.")
    store = request.config_dict[STORE]
    try:
        user = await store.add_user(name, credits, admin=admin)
    except UserExists as e:
        raise ApiError(409, "user_exists", f"There is already a user named {name!r}.") from e
    token = await store.issue_token(name)
    base = request.config_dict[CONFIG].public_url or str(request.url.origin())
    login = f"{base.rstrip('/')}{_url(request, 'index')}?token={token}"
    return web.json_response({"success": True, "userId": user.id, "credits": user.credits,
                              "isAdmin": user.is_admin, "token": token, "loginUrl": login},
                             status=201)


async def admin_grant(request: web.Request) -> web.Response:
    """``POST /api/admin/users/{userId}/credits {amount}``: grant (or take) credits."""
    await current_admin(request)  # a cookie's change must be same-origin: checked there
    name = _admin_target(request)
    amount = (await _json_body(request, ADMIN_BODY_MAX_BYTES)).get("amount")
    if type(amount) is not int or amount == 0 or abs(amount) > 2**53:
        raise ApiError(400, "bad_request", "amount must be a whole number other than 0.")
    try:
        balance = await request.config_dict[STORE].grant_credits(name, amount)
    except UserNotFound as e:
        raise ApiError(404, "user_not_found", f"There is no user named {name!r}.") from e
    except InsufficientCredits as e:
        raise ApiError(409, "insufficient_credits", f"{name} has only {e.balance} credits.",
                       balance=e.balance) from e
    return web.json_response({"success": True, "userId": name, "credits": balance})


async def admin_revoke(request: web.Request) -> web.Response:
    """``POST /api/admin/users/{userId}/revoke``: every token and session of the user."""
    await current_admin(request)  # a cookie's change must be same-origin: checked there
    name = _admin_target(request)
    try:
        count = await request.config_dict[STORE].revoke_tokens(name)
    except UserNotFound as e:
        raise ApiError(404, "user_not_found", f"There is no user named {name!r}.") from e
    # This process's streams of the user end now; other processes' at their next heartbeat.
    request.config_dict[HUB].close_user(name)
    return web.json_response({"success": True, "userId": name, "revoked": count})


async def admin_tasks(request: web.Request) -> web.Response:
    """``GET /api/admin/tasks``: every user's tasks, newest first, paged like /api/tasks."""
    await current_admin(request)
    limit, cursor = _paging(request)
    status = _status_filter(request)
    tasks, next_cursor = await request.config_dict[STORE].get_user_tasks(
        None, status=status, limit=min(limit, 100), cursor=cursor)
    return web.json_response({"success": True, "tasks": [task_json(request, t) for t in tasks],
                              "nextCursor": next_cursor})


async def admin_engines(request: web.Request) -> web.Response:
    """``GET /api/admin/engines``: each engine, whether it can be used, and why not."""
    await current_admin(request)
    return web.json_response({"success": True,
                              "engines": engine_statuses(request.config_dict[CONFIG])})


# -------------------------------------------------------------------- webhook
async def webhook(request: web.Request) -> web.Response:
    """``POST /api/tasks/webhook``: a signed status report from the external service."""
    config = request.config_dict[CONFIG]
    metrics_ = request.config_dict[METRICS]
    if not config.webhook_secret:
        logger.error("webhook refused: WEBHOOK_SECRET is not set on this server")
        metrics_.webhooks.labels("refused").inc()
        # 401: without a secret no signature can be verified, so none is accepted.
        raise ApiError(401, "webhook_disabled",
                       "Webhooks are disabled: this server has no WEBHOOK_SECRET configured.")
    timestamp = request.headers.get("X-Zhiyi-Timestamp")
    signature = request.headers.get("X-Zhiyi-Signature")
    try:
        check_signature_headers(timestamp, signature)  # before reading any of the body
        body = await read_body(request, WEBHOOK_MAX_BYTES)
        verify_signature(config.webhook_secret, timestamp, signature, body)
    except SignatureError as e:
        metrics_.webhooks.labels("bad_signature").inc()
        raise ApiError(401, "bad_signature", f"Webhook refused: {e}.") from e
    report = _parse_report(body)
    store = request.config_dict[STORE]
    try:
        task = await store.get_task_by_external_id(report["externalTaskId"])
    except TaskNotFound as e:
        raise ApiError(404, "task_not_found",
                       "No task has that externalTaskId.") from e
    task = await _apply_report(request, task, report)
    metrics_.webhooks.labels("accepted").inc()
    return web.json_response({"success": True, "task": task_json(request, task)})


def _parse_report(body: bytes) -> dict[str, Any]:
    try:
        report = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ApiError(400, "bad_request", "The webhook body is not valid JSON.") from e
    if not isinstance(report, dict) or not isinstance(report.get("externalTaskId"), str):
        raise ApiError(400, "bad_request", "The webhook body needs a string externalTaskId.")
    if report.get("status") not in ("processing", "completed", "failed"):
        raise ApiError(400, "bad_request",
                       "status must be one of processing, completed, failed.")
    progress = report.get("progress", 0)
    if (not isinstance(progress, int | float) or isinstance(progress, bool)
            or not math.isfinite(progress)):
        raise ApiError(400, "bad_request", "progress must be a number from 0 to 100.")
    return report


async def _apply_report(request: web.Request, task: Task, report: dict[str, Any]) -> Task:
    """completeExternalTask: a final task ignores late and repeated deliveries."""
    store = request.config_dict[STORE]
    if task.status is not TaskStatus.PROCESSING:
        return task
    status = report["status"]
    message = str(report.get("message") or "")
    if status == "processing":
        updated = await store.update_external_progress(
            task.id, int(report.get("progress", 0)), message or "processing externally")
    elif status == "failed":
        updated = await store.fail_task(
            task.id, message or "The external service reported a failure.", "external_error")
    else:
        updated = await _complete_external(request, task, report)
    return updated or await store.get_task_by_id(task.id)


async def _complete_external(request: web.Request, task: Task,
                             report: dict[str, Any]) -> Task | None:
    """downloadResult + saveResultFile, then completeTask; a bad result fails and refunds."""
    store = request.config_dict[STORE]
    config = request.config_dict[CONFIG]
    result_dir = task_dirs(config.data_path, task)[2]
    out = result_dir / _external_result_name(task)
    try:
        if isinstance(report.get("resultText"), str):
            await _save_text(out, report["resultText"], config)
        elif isinstance(report.get("resultUrl"), str) and EXTERNAL in request.config_dict:
            await request.config_dict[EXTERNAL].fetch_result(report["resultUrl"], out)
        else:
            raise ResultFetchError("The completed report carried neither resultText "
                                   "nor a resultUrl.")
    except ResultFetchError as e:
        logger.warning("task %s: external result refused: %s", task.id, e)
        return await store.fail_task(task.id, str(e), "external_error")
    size = (await asyncio.to_thread(out.stat)).st_size
    done = await store.complete_task(task.id, out.name, result_size=size)
    if done is None:
        await asyncio.to_thread(shutil.rmtree, result_dir, True)
    return done


def _external_result_name(task: Task) -> str:
    name = task.file_name
    if Path(name).suffix.lower() in {".pdf", ".docx"}:
        return Path(name).stem + ".txt"
    return name


async def _save_text(out: Path, text: str, config: Config) -> None:
    data = text.encode("utf-8")
    if len(data) > config.max_upload_bytes:
        raise ResultFetchError("The result is larger than the size cap; it was not kept.")
    await asyncio.to_thread(make_private_dirs, out.parent)
    async with aiofiles.open(out, "wb", opener=_private_opener) as f:
        await f.write(data)


# ------------------------------------------------------------------ lifetime
def _store_ctx(config: Config, clock: Callable[[], datetime] = utcnow,
               ) -> Callable[[web.Application], AsyncIterator[None]]:
    async def store_ctx(app: web.Application) -> AsyncIterator[None]:
        if config.database_url:  # (SQLite makes the folder with its file)
            await asyncio.to_thread(make_private_dirs, config.data_path)
        store = await open_store(config.database, config.database_url, clock=clock)
        store.result_url = lambda task_id: str(
            app.router["task_result"].url_for(taskId=str(task_id)))
        app[STORE] = store
        yield
        await store.close()

    return store_ctx


async def _hub_ctx(app: web.Application) -> AsyncIterator[None]:
    config, metrics_ = app[CONFIG], app[METRICS]

    def count_published(delivered: int) -> None:
        metrics_.events_published.inc()
        metrics_.events_delivered.inc(delivered)

    hub = SSEHub(
        max_per_user=config.sse_max_per_user, max_total=config.sse_max_total,
        buffer_size=config.sse_buffer_events,
        on_publish=count_published, on_drop=metrics_.slow_clients_dropped.inc,
    )
    app[HUB] = hub
    app[STORE].add_listener(hub.publish)
    # Each heartbeat also re-checks the streams' credentials: a token revoked by
    # another process (or `zhiyi user revoke`) ends its streams within one period.
    heartbeat = asyncio.create_task(
        hub.heartbeat(config.sse_heartbeat_seconds, app[STORE].valid_token_hashes),
        name="zhiyi-sse-heartbeat")
    yield
    heartbeat.cancel()
    await asyncio.gather(heartbeat, return_exceptions=True)
    hub.close_all()
    app[STORE].remove_listener(hub.publish)


async def _http_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    session = aiohttp.ClientSession()
    app[HTTP] = session
    if config.external_service_url:
        public = (config.public_url or f"http://{config.host}:{config.port}").rstrip("/")
        callback = public + str(app.router["webhook"].url_for())
        app[EXTERNAL] = ExternalService(
            session, config.external_service_url, callback,
            max_result_bytes=config.max_upload_bytes,
            retry_base_seconds=min(1.0, config.retry_base_seconds),
        )
    yield
    await session.close()


async def _sandbox_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    metrics_ = app[METRICS]
    sandbox = DocumentSandbox(
        config.parse_limits(), workers=config.parse_workers,
        per_user=config.max_parses_per_user,
        observe=lambda outcome: metrics_.parses.labels(outcome).inc())
    metrics_.parses_running.set_function(lambda: sandbox.in_flight)
    metrics_.parses_waiting.set_function(lambda: sandbox.waiting)
    app[SANDBOX] = sandbox
    await sandbox.start()
    yield
    await sandbox.close()


async def _pool_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    if not config.run_workers:
        yield
        return
    metrics_ = app[METRICS]
    engine_settings = config.engine_settings()
    session = app[HTTP]
    # Per process, not per task: ten tasks share one engine's in-flight limit.
    limits = engines.EngineLimits(config.engine_max_inflight)

    def engine_factory(name: str) -> engines.Engine:
        return engines.make_engine(name, engine_settings, session, limits)

    def observe(outcome: str, task: Task, seconds: float) -> None:
        metrics_.attempts.labels(task.task_type, outcome).inc()
        if outcome == "completed":
            metrics_.processing_seconds.labels(task.task_type).observe(seconds)

    pool = WorkerPool(app[STORE], app[REGISTRY], config.worker_settings(), config.data_path,
                      engine_factory=engine_factory, submit_external=app.get(EXTERNAL),
                      observe=observe, sandbox=app[SANDBOX])
    app[POOL] = pool
    await pool.start()
    yield
    await pool.stop(grace=config.shutdown_grace_seconds)


async def _close_streams(app: web.Application) -> None:
    # Streams are ended at shutdown, before aiohttp waits for handlers to finish.
    if HUB in app:
        app[HUB].close_all(retry_ms=app[CONFIG].sse_retry_ms)


def create_app(config: Config | None = None, *, registry: Registry | None = None,
               clock: Callable[[], datetime] = utcnow) -> web.Application:
    """The Zhiyi application; no I/O happens until it starts.

    ``clock`` is the store's idea of now (tests drive session expiry and retention with it).
    """
    config = config or Config.from_env()
    use_fast_content_disposition()
    app = web.Application(middlewares=[error_middleware],
                          client_max_size=config.max_upload_bytes + MAX_FIELD_BYTES)
    app[CONFIG] = config
    app[REGISTRY] = registry or default_registry()
    app[METRICS] = Metrics()
    app.cleanup_ctx.extend([_store_ctx(config, clock), _hub_ctx, _http_ctx, _sandbox_ctx,
                            _pool_ctx, _disk_watch_ctx])
    app.on_shutdown.append(_close_streams)
    app.on_response_prepare.append(add_security_headers)
    app.on_response_prepare.append(refresh_session_cookie)
    _add_routes(app)
    return app


def create_worker_app(config: Config | None = None, *, registry: Registry | None = None,
                      ) -> web.Application:
    """Workers only (``zhiyi worker``): the store, the HTTP client and the pool.

    The routes are added but never served: completed events and webhook
    callbacks name their URLs through the router, exactly as the server does.
    """
    config = dataclasses.replace(config or Config.from_env(), run_workers=True)
    app = web.Application()
    app[CONFIG] = config
    app[REGISTRY] = registry or default_registry()
    app[METRICS] = Metrics()
    app.cleanup_ctx.extend([_store_ctx(config), _http_ctx, _sandbox_ctx, _pool_ctx])
    _add_routes(app)
    return app


async def run_worker_app(app: web.Application, *, parent_pid: int | None = None,
                         on_ready: Callable[[], None] | None = None) -> None:
    """Run a worker app until SIGTERM/SIGINT (or until ``parent_pid`` is gone)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    logger.info("worker process %d running", os.getpid())
    if on_ready is not None:
        on_ready()
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), PARENT_CHECK_SECONDS)
            except TimeoutError:
                if parent_pid is not None and os.getppid() != parent_pid:
                    logger.warning("the server process %d is gone; stopping", parent_pid)
                    return
    finally:
        await runner.cleanup()


PARENT_CHECK_SECONDS = 1.0


def _worker_processes_ctx(count: int, config: Config,
                          ) -> Callable[[web.Application], AsyncIterator[None]]:
    """``zhiyi serve --workers N``: N ``zhiyi worker`` processes live and die with the server."""

    async def worker_processes_ctx(app: web.Application) -> AsyncIterator[None]:
        command = [sys.executable, "-m", "zhiyi_server", "worker", "--data",
                   str(config.data_path), "--parent-pid", str(os.getpid())]
        env = {**os.environ, "DATA_STORAGE_PATH": str(config.data_path)}
        if config.db_path is not None:
            env["ZHIYI_DB"] = str(config.db_path)
        if config.database_url:
            env["ZHIYI_DATABASE_URL"] = config.database_url
        children = [await asyncio.create_subprocess_exec(
            *command, env=env, stdout=asyncio.subprocess.PIPE) for _ in range(count)]
        logger.info("started %d worker processes: %s", count,
                    ", ".join(str(c.pid) for c in children))
        # The server announces itself only once its workers can take tasks.
        drains = [await _ready(child) for child in children]
        yield
        for drain in drains:
            drain.cancel()
        await asyncio.gather(*drains, return_exceptions=True)
        # A worker gets its own grace for running attempts, and a margin to hand the rest back.
        timeout = config.shutdown_grace_seconds + CHILD_STOP_MARGIN_SECONDS
        await asyncio.gather(*(_stop_child(child, timeout) for child in children))

    return worker_processes_ctx


async def _ready(child: asyncio.subprocess.Process) -> asyncio.Task[bytes]:
    """Wait for a worker's READY line; then keep reading its stdout (to nothing), so a
    processor that prints can never block on a full pipe."""
    assert child.stdout is not None
    try:
        line = await asyncio.wait_for(child.stdout.readline(), WORKER_START_SECONDS)
    except TimeoutError:
        line = b""
    if line.strip() != b"READY":
        raise CliError(f"worker process {child.pid} did not start; see its log above")
    return asyncio.create_task(child.stdout.read(), name=f"zhiyi-worker-{child.pid}-stdout")


WORKER_START_SECONDS = 120.0


async def _stop_child(child: asyncio.subprocess.Process, timeout: float) -> None:
    """SIGTERM a worker (it hands unfinished tasks back to the queue), SIGKILL if it lags."""
    if child.returncode is None:
        child.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(child.wait(), timeout)
    except TimeoutError:
        logger.warning("worker process %d did not stop; killing it", child.pid)
        child.kill()
        await child.wait()


CHILD_STOP_MARGIN_SECONDS = 10.0
#: The fixed names under ``/api/tasks/`` are not task ids, so a 405 there lists only their
#: own methods in ``Allow`` (and ``GET /api/tasks/create`` is a 405, not a missing task).
FIXED_TASK_PATHS = ("create", "quote", "webhook")
TASK_PATH = "/api/tasks/{taskId:(?!(?:" + "|".join(FIXED_TASK_PATHS) + ")$)[^/]+}"


def _add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/", index, name="index")
    r.add_static("/static/", resource("static"), name="static")
    r.add_get("/healthz", healthz)
    r.add_get("/metrics", metrics_endpoint)
    r.add_get("/api/openapi.yaml", openapi)
    r.add_post("/api/session", create_session)
    r.add_delete("/api/session", delete_session)
    r.add_get("/api/me", me)
    r.add_get("/api/me/ledger", ledger)
    r.add_get("/api/task-types", task_types)
    r.add_post("/api/tasks/create", create_task)
    r.add_post("/api/tasks/quote", quote_task)
    r.add_get("/api/memory", memory_summary)
    r.add_delete("/api/memory", memory_clear)
    r.add_get("/api/memory/export.tmx", memory_export)
    r.add_post("/api/memory/import", memory_import)
    r.add_get("/api/glossaries", list_glossaries)
    r.add_post("/api/glossaries", upload_glossary)
    r.add_get("/api/glossaries/{name}", get_glossary)
    r.add_delete("/api/glossaries/{name}", delete_glossary)
    r.add_post("/api/tasks/webhook", webhook, name="webhook")
    r.add_get("/api/tasks", list_tasks)
    r.add_get(TASK_PATH, get_task)
    r.add_delete(TASK_PATH, delete_task)
    r.add_post("/api/tasks/{taskId}/cancel", cancel_task)
    r.add_post("/api/tasks/{taskId}/retry", retry_task)
    r.add_get("/api/tasks/{taskId}/result", task_result, name="task_result")
    r.add_get("/api/sse/tasks/{taskId}", sse_task, name="sse_task")
    r.add_get("/api/sse/notifications", sse_notifications, name="sse_notifications")
    r.add_get("/admin", admin_page, name="admin_page")
    r.add_get("/api/admin/users", admin_users)
    r.add_post("/api/admin/users", admin_create_user)
    r.add_post("/api/admin/users/{userId}/credits", admin_grant)
    r.add_post("/api/admin/users/{userId}/revoke", admin_revoke)
    r.add_get("/api/admin/tasks", admin_tasks)
    r.add_get("/api/admin/engines", admin_engines)


# ------------------------------------------------------------------------ CLI
class CliError(Exception):
    """A failure the ``zhiyi`` command (cli.py) reports as one line on stderr, exit status 1."""


def main(argv: list[str] | None = None) -> int:
    """The ``zhiyi`` command, which lives in cli.py (``python -m zhiyi_server`` runs it)."""
    zhiyi_modules.refuse_shadowed_modules("cli")  # a generic name: make sure it is ours
    import cli  # cli imports this module: imported here, when the command runs

    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
