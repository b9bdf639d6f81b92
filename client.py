"""Zhiyi's Python client: the HTTP contract from Python (the `zhiyi` client commands use it).

The client speaks the HTTP contract only (it imports nothing of the server)::

    async with ZhiyiClient("http://127.0.0.1:8080", token) as client:
        task = await client.create_task("report.docx", "translate", {"targetLang": "zh"})
        async for event in client.follow(task["taskId"]):
            print(event.type, event.data)
        await client.download_result(task["taskId"], Path("."))

:meth:`ZhiyiClient.follow` survives dropped connections and server restarts:
it reconnects with ``Last-Event-ID`` and the server replays what was missed.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import logging
import os
import re
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import aiohttp

__all__ = [
    "DEFAULT_SERVER",
    "FINAL_STATUSES",
    "SSEEvent",
    "SSEMessage",
    "SSEParser",
    "Settings",
    "ZhiyiClient",
    "ZhiyiError",
    "config_path",
    "resolve_settings",
]

logger = logging.getLogger(__name__)

DEFAULT_SERVER = "http://127.0.0.1:8080"
FINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
CHUNK_BYTES = 64 * 1024


class ZhiyiError(Exception):
    """An error answer (``status``, ``code``, ``message``), or ``status`` 0 when unreachable."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message


class _Retryable(Exception):
    """A stream answer worth reconnecting after (429, 5xx, a dropped connection)."""


# ------------------------------------------------------------------------ SSE
@dataclass(frozen=True)
class SSEMessage:
    """One dispatched Server-Sent Events message, before its data is interpreted."""

    id: str | None
    event: str
    data: str


@dataclass
class SSEParser:
    """An incremental ``text/event-stream`` parser, as the HTML standard specifies.

    Feed it bytes as they arrive; it returns the messages completed so far. Lines
    end with CRLF, LF or CR; ``:`` starts a comment; a blank line dispatches;
    ``id`` persists across messages; ``retry`` sets :attr:`retry_ms`.
    """

    last_event_id: str = ""
    retry_ms: int | None = None
    _pending: str = ""
    _data: list[str] = field(default_factory=list)
    _event: str = ""
    _started: bool = False
    _decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))

    def feed(self, chunk: bytes) -> list[SSEMessage]:
        """Parse ``chunk``; returns the messages it completed."""
        text = self._pending + self._decoder.decode(chunk)
        if not self._started and text:
            self._started = True
            text = text.removeprefix("\ufeff")
        # A CR at the end may be the first half of a CRLF: decide with the next chunk.
        held = "\r" if text.endswith("\r") else ""
        lines = re.split(r"\r\n|\r|\n", text[: len(text) - len(held)])
        self._pending = lines.pop() + held
        return [m for m in map(self._line, lines) if m is not None]

    def end(self) -> list[SSEMessage]:
        """The stream ended: a line ended by a held CR still counts; a partial message does not."""
        if self._pending.endswith("\r"):
            return self.feed(b"\n")
        return []

    def _line(self, line: str) -> SSEMessage | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self.last_event_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry_ms = int(value)
        return None

    def _dispatch(self) -> SSEMessage | None:
        data, event = self._data, self._event
        self._data, self._event = [], ""
        if not data:
            return None
        return SSEMessage(self.last_event_id or None, event or "message", "\n".join(data))


@dataclass(frozen=True)
class SSEEvent:
    """A Zhiyi event: the stream's ``id`` and the JSON ``{"type", "data"}`` it carried."""

    id: str | None
    type: str
    data: dict[str, Any]

    @classmethod
    def from_message(cls, message: SSEMessage) -> SSEEvent:
        try:
            payload = json.loads(message.data)
        except json.JSONDecodeError:
            return cls(message.id, message.event, {"text": message.data})
        if isinstance(payload, dict) and isinstance(payload.get("type"), str):
            data = payload.get("data")
            return cls(message.id, payload["type"], data if isinstance(data, dict) else {})
        return cls(message.id, message.event, {"value": payload})

    @property
    def is_final(self) -> bool:
        """The task ended (or is gone): nothing more will come for it."""
        if self.type == "task_deleted":
            return True
        return self.type in ("status_update", "reset") and self.data.get("status") in FINAL_STATUSES


def status_data(task: dict[str, Any]) -> dict[str, Any]:
    """A Task object in the shape of a ``status_update`` event's data."""
    data: dict[str, Any] = {
        "taskId": task.get("taskId"), "status": task.get("taskStatus"),
        "progress": task.get("progressPercent", 0), "message": task.get("statusMessage") or "",
        "stage": task.get("stage"), "etaSeconds": task.get("etaSeconds"),
    }
    if task.get("resultUrl"):
        data["resultUrl"] = task["resultUrl"]
    if task.get("taskStatus") == "failed":
        data["error"] = task.get("errorMessage")
        data["errorCode"] = task.get("errorCode")
    return data


# --------------------------------------------------------------------- client
def _disposition_name(header: str | None) -> str | None:
    """The file name of a Content-Disposition header, preferring RFC 5987 ``filename*``."""
    if not header:
        return None
    star = re.search(r"filename\*\s*=\s*([^']*)'[^']*'([^;]+)", header, re.IGNORECASE)
    if star:
        charset = star.group(1).strip() or "utf-8"
        try:
            return unquote(star.group(2).strip().strip('"'), encoding=charset, errors="strict")
        except (LookupError, UnicodeDecodeError):
            pass
    plain = re.search(r'filename\s*=\s*"((?:[^"\\]|\\.)*)"|filename\s*=\s*([^;]+)', header,
                      re.IGNORECASE)
    if plain:
        return (plain.group(1) or plain.group(2) or "").replace('\\"', '"').strip()
    return None


def _safe_name(name: str | None, fallback: str) -> str:
    """A name from the server, made safe to create in a local directory."""
    name = re.split(r"[/\\]", name or "")[-1]
    name = "".join(c for c in name if c.isprintable() and c not in '<>:"|?*').strip()
    return fallback if name in ("", ".", "..") else name


def _unused(path: Path) -> Path:
    """``path``, or ``stem (n).ext`` with the first ``n`` not taken."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem} ({n}){path.suffix}")
    return candidate


class ZhiyiClient:
    """An async client of one Zhiyi server; use as ``async with ZhiyiClient(url, token)``."""

    def __init__(self, server: str, token: str | None, *, read_timeout: float = 60.0,
                 max_backoff: float = 10.0, stall_seconds: float = 60.0) -> None:
        # A trailing slash makes every API path relative to a prefix, e.g. https://host/zhiyi/.
        self.server = server.rstrip("/") + "/"
        self.token = token
        self.read_timeout = read_timeout
        self.max_backoff = max_backoff
        self.stall_seconds = stall_seconds
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ZhiyiClient:
        headers = {"Accept": "application/json", "User-Agent": "zhiyi-client"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        self._session = aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(
            total=None, sock_connect=10, sock_read=self.read_timeout))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use ZhiyiClient as 'async with ZhiyiClient(...) as client'")
        return self._session

    def url(self, path: str) -> str:
        """The absolute URL of an API path such as ``api/tasks``."""
        return self.server + path.lstrip("/")

    # ------------------------------------------------------------- requests
    async def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            async with self.session.request(method, self.url(path), **kwargs) as response:
                if response.status >= 400:
                    raise await _error_from(response)
                try:
                    body = await response.json(content_type=None)
                except (json.JSONDecodeError, aiohttp.ContentTypeError) as e:
                    raise ZhiyiError(response.status, "bad_response",
                                     f"{self.server} did not answer with JSON") from e
        except aiohttp.ClientError as e:
            raise _unreachable(self.server, e) from e
        except TimeoutError as e:
            raise ZhiyiError(0, "timeout", f"{self.server} did not answer in time") from e
        return body if isinstance(body, dict) else {}

    async def me(self) -> dict[str, Any]:
        """``{userId, credits}`` of the token's user."""
        return await self._request("GET", "api/me")

    async def task_types(self) -> list[dict[str, Any]]:
        """The task types: params, extensions, cost rule, engines."""
        return (await self._request("GET", "api/task-types"))["taskTypes"]

    async def create_task(self, path: str | Path, task_type: str, params: dict[str, Any],
                          idempotency_key: str | None = None) -> dict[str, Any]:
        """Upload ``path`` as a new task; returns the Task object (its ``creditsCost`` set).

        With ``idempotency_key``, a repeat (say after a lost answer) returns the
        task the first call made, and nothing is charged twice.
        """
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        body = await self._upload("api/tasks/create", path, task_type, params, headers)
        return body["task"]

    async def quote(self, path: str | Path, task_type: str,
                    params: dict[str, Any]) -> dict[str, Any]:
        """What creating this task would charge (``credits``, ``fromMemory``...); nothing kept."""
        return (await self._upload("api/tasks/quote", path, task_type, params, {}))["quote"]

    async def _upload(self, api_path: str, path: str | Path, task_type: str,
                      params: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
        path = Path(path)
        # aiohttp reads file payloads in an executor, so the upload does not block the loop.
        file = await asyncio.to_thread(path.open, "rb")
        try:
            form = aiohttp.FormData()
            form.add_field("taskType", task_type)
            form.add_field("params", json.dumps(params, ensure_ascii=False))
            form.add_field("file", file, filename=path.name,
                           content_type="application/octet-stream")
            return await self._request("POST", api_path, data=form, headers=headers)
        finally:
            file.close()

    async def get_task(self, task_id: int) -> dict[str, Any]:
        """One Task object."""
        return (await self._request("GET", f"api/tasks/{int(task_id)}"))["task"]

    async def list_tasks(self, status: str | None = None, limit: int | None = None,
                         cursor: int | None = None, *, every_user: bool = False,
                         ) -> tuple[list[dict[str, Any]], int | None]:
        """One page of the user's tasks, newest first, and the cursor of the next page.

        ``every_user``: every user's tasks (``/api/admin/tasks``, administrators only).
        """
        query: dict[str, str] = {}
        if status:
            query["status"] = status
        if limit is not None:
            query["limit"] = str(limit)
        if cursor is not None:
            query["cursor"] = str(cursor)
        path = "api/admin/tasks" if every_user else "api/tasks"
        body = await self._request("GET", path, params=query)
        return body["tasks"], body.get("nextCursor")

    async def iter_tasks(self, status: str | None = None, page_size: int = 100, *,
                         every_user: bool = False) -> AsyncIterator[dict[str, Any]]:
        """Every task of the user (or of every user), newest first, fetching pages as needed."""
        cursor = None
        while True:
            tasks, cursor = await self.list_tasks(status, page_size, cursor,
                                                  every_user=every_user)
            for task in tasks:
                yield task
            if cursor is None:
                return

    async def cancel(self, task_id: int) -> dict[str, Any]:
        """Cancel a pending or processing task (credits refunded); 409 if already final."""
        return (await self._request("POST", f"api/tasks/{int(task_id)}/cancel"))["task"]

    async def retry(self, task_id: int) -> dict[str, Any]:
        """Queue a failed or cancelled task again (charged again)."""
        return (await self._request("POST", f"api/tasks/{int(task_id)}/retry"))["task"]

    async def delete(self, task_id: int) -> None:
        """Delete a task, its files and (if running) cancel it."""
        await self._request("DELETE", f"api/tasks/{int(task_id)}")

    async def download_result(self, task_id: int, out_path: str | Path) -> Path:
        """Stream a completed task's result to ``out_path``; returns the file written.

        If ``out_path`` is a directory, the file takes the name the server gives
        in ``Content-Disposition`` (its UTF-8 ``filename*``), with `` (1)``... added
        if that name is taken: a translation keeps its original's name, and
        must not replace the original beside it. The file appears only once
        complete (written aside, then renamed).
        """
        out = Path(out_path)
        part: Path | None = None
        try:
            async with self.session.get(self.url(f"api/tasks/{int(task_id)}/result")) as response:
                if response.status >= 400:
                    raise await _error_from(response)
                if await asyncio.to_thread(out.is_dir):
                    name = _disposition_name(response.headers.get("Content-Disposition"))
                    out = await asyncio.to_thread(
                        _unused, out / _safe_name(name, f"task-{int(task_id)}-result"))
                part = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.part")
                file = await asyncio.to_thread(part.open, "wb")
                try:
                    async for chunk in response.content.iter_chunked(CHUNK_BYTES):
                        await asyncio.to_thread(file.write, chunk)
                finally:
                    file.close()
        except BaseException as e:
            if part is not None:
                await asyncio.to_thread(part.unlink, missing_ok=True)
            if isinstance(e, aiohttp.ClientError):
                raise _unreachable(self.server, e) from e
            raise
        await asyncio.to_thread(part.replace, out)
        return out

    # ---------------------------------------------------------------- stream
    async def follow(self, task_id: int, last_event_id: str | int | None = None, *,
                     on_reconnect: Callable[[str, float], None] | None = None,
                     ) -> AsyncIterator[SSEEvent]:
        """The events of one task, until its final status; survives drops and restarts.

        When the connection drops (or the server restarts, or answers 429/5xx),
        it waits (the server's ``retry:``, doubling up to ``max_backoff``) and
        reconnects with ``Last-Event-ID``; the server replays what was missed.
        ``on_reconnect(reason, delay)`` is told before each wait. If the server
        answers 204 (the stream is over: the last event was already seen), the
        task is fetched and its state yielded as a final ``status_update``.
        As a safety net, a stream quiet (heartbeats only) for ``stall_seconds``
        makes it look the task up; a final task ends the iteration the same way.
        Close it early with ``contextlib.aclosing``.
        """
        last_id = None if last_event_id is None else str(last_event_id)
        base_delay, delay = 1.0, 1.0
        quiet_since = asyncio.get_running_loop().time()
        while True:
            parser = SSEParser()
            try:
                stream = self._stream_once(int(task_id), last_id, parser)
                async with contextlib.aclosing(stream) as events:
                    async for event in events:
                        now = asyncio.get_running_loop().time()
                        if event is None:  # a heartbeat
                            if now - quiet_since < self.stall_seconds:
                                continue
                            quiet_since = now
                            task = await self.get_task(task_id)
                            if task.get("taskStatus") not in FINAL_STATUSES:
                                continue
                            event = SSEEvent(last_id, "status_update", status_data(task))
                        quiet_since = now
                        if event.id is not None:
                            last_id = event.id
                        delay = base_delay
                        yield event
                        if event.is_final:
                            return
                reason = "the stream ended before the task did"
            except _StreamOver:
                task = await self.get_task(task_id)
                yield SSEEvent(last_id, "status_update", status_data(task))
                return
            except (_Retryable, aiohttp.ClientError, TimeoutError) as e:
                reason = str(e) or type(e).__name__
            if parser.retry_ms is not None:
                base_delay = max(0.1, parser.retry_ms / 1000)
                delay = max(delay, base_delay)
            logger.debug("task %s stream: %s; reconnecting in %.1f s", task_id, reason, delay)
            if on_reconnect is not None:
                on_reconnect(reason, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, max(self.max_backoff, base_delay))

    async def _stream_once(self, task_id: int, last_id: str | None,
                           parser: SSEParser) -> AsyncIterator[SSEEvent | None]:
        """One connection's events; ``None`` for data that completed none (a heartbeat)."""
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if last_id:
            headers["Last-Event-ID"] = last_id
        async with self.session.get(self.url(f"api/sse/tasks/{task_id}"),
                                    headers=headers) as response:
            if response.status == 204:
                raise _StreamOver
            if response.status == 429 or response.status >= 500:
                error = await _error_from(response)
                raise _Retryable(f"the server answered {response.status}: {error.message}")
            if response.status != 200:
                raise await _error_from(response)
            async for chunk in response.content.iter_any():
                messages = parser.feed(chunk)
                if not messages:
                    yield None
                for message in messages:
                    yield SSEEvent.from_message(message)
            for message in parser.end():
                yield SSEEvent.from_message(message)


class _StreamOver(Exception):
    """The server answered 204: this task's stream has nothing more to send."""


async def _error_from(response: aiohttp.ClientResponse) -> ZhiyiError:
    """The contract's error envelope as a :class:`ZhiyiError`."""
    try:
        body = await response.json(content_type=None)
    except (json.JSONDecodeError, UnicodeDecodeError, aiohttp.ClientError):
        body = None
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return ZhiyiError(response.status, str(body.get("code") or "error"), body["message"])
    return ZhiyiError(response.status, "http_error",
                      f"the server answered {response.status} {response.reason or ''}".strip())


def _unreachable(server: str, error: BaseException) -> ZhiyiError:
    reason = str(error) or type(error).__name__
    if isinstance(error, aiohttp.ClientConnectorError) and error.errno:
        reason = os.strerror(error.errno).lower()  # "connection refused", not a repr
    return ZhiyiError(0, "network_error", f"cannot reach {server.rstrip('/')}: {reason}")


# ---------------------------------------------------------------- settings
@dataclass(frozen=True)
class Settings:
    """Where the commands connect, and with which token."""

    server: str
    token: str | None


def config_path(env: dict[str, str] | None = None) -> Path:
    """``$XDG_CONFIG_HOME/zhiyi/config.json``, or ``~/.config/zhiyi/config.json``."""
    env = dict(os.environ if env is None else env)
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "zhiyi" / "config.json"


def _read_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ZhiyiError(0, "bad_config", f"cannot read {path}: {e}") from e
    return data if isinstance(data, dict) else {}


def resolve_settings(server: str | None, token: str | None,
                     env: dict[str, str] | None = None) -> Settings:
    """Flags win, then ``ZHIYI_SERVER``/``ZHIYI_TOKEN``, then the config file, then defaults."""
    env = dict(os.environ if env is None else env)
    config = _read_config(config_path(env))
    return Settings(
        server=server or env.get("ZHIYI_SERVER") or config.get("server") or DEFAULT_SERVER,
        token=token or env.get("ZHIYI_TOKEN") or config.get("token") or None,
    )


def write_config(path: Path, settings: Settings) -> None:
    """Write the config file readable by its owner only (it holds a token)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    body = json.dumps({"server": settings.server, "token": settings.token}, indent=2) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        os.fchmod(f.fileno(), 0o600)  # the file may have existed with looser bits
        f.write(body)
