"""Zhiyi's Python client, and the ``zhiyi submit``, ``zhiyi tasks`` and ``zhiyi login`` commands.

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

import argparse
import asyncio
import codecs
import contextlib
import getpass
import json
import logging
import os
import re
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
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
    "add_cli_commands",
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
                         cursor: int | None = None) -> tuple[list[dict[str, Any]], int | None]:
        """One page of the user's tasks, newest first, and the cursor of the next page."""
        query: dict[str, str] = {}
        if status:
            query["status"] = status
        if limit is not None:
            query["limit"] = str(limit)
        if cursor is not None:
            query["cursor"] = str(cursor)
        body = await self._request("GET", "api/tasks", params=query)
        return body["tasks"], body.get("nextCursor")

    async def iter_tasks(self, status: str | None = None,
                         page_size: int = 100) -> AsyncIterator[dict[str, Any]]:
        """Every task of the user, newest first, fetching pages as needed."""
        cursor = None
        while True:
            tasks, cursor = await self.list_tasks(status, page_size, cursor)
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


# ------------------------------------------------------------------- the CLI
class _UsageError(Exception):
    """Bad usage: exit status 2."""


def _fail(message: str) -> int:
    print(f"zhiyi: {message}", file=sys.stderr, flush=True)
    return 1


def _command(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn the client's errors into one line on stderr and the contract's exit status."""

    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except _UsageError as e:
            print(f"zhiyi {args.command}: error: {e}", file=sys.stderr, flush=True)
            return 2
        except ZhiyiError as e:
            return _fail(e.message)
        except OSError as e:
            return _fail(f"{e.strerror or e}: {e.filename}" if e.filename else str(e))

    run.__doc__ = fn.__doc__
    return run


def _settings(args: argparse.Namespace, *, need_token: bool = True) -> Settings:
    settings = resolve_settings(args.server, args.token)
    if need_token and not settings.token:
        raise _UsageError("no token: pass --token, set ZHIYI_TOKEN, or run 'zhiyi login'")
    return settings


def _param(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value


def _existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


def _connection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default=None,
                        help=f"server URL (env ZHIYI_SERVER, the config file, {DEFAULT_SERVER})")
    parser.add_argument("--token", default=None,
                        help="API token (env ZHIYI_TOKEN, or the config file of 'zhiyi login')")


def add_cli_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``submit``, ``tasks`` and ``login`` to the ``zhiyi`` command."""
    submit = commands.add_parser("submit", help="upload a document, follow it, download the result")
    submit.add_argument("file", type=_existing_file, help="the document")
    submit.add_argument("--type", dest="task_type", required=True,
                        help="task type: translate, analyze, extract, ...")
    submit.add_argument("--param", action="append", default=[], type=_param,
                        metavar="KEY=VALUE", help="a task parameter, e.g. targetLang=zh")
    _connection_args(submit)
    submit.add_argument("-o", "--output", default=None,
                        help="where to save the result (a file, or a directory)")
    submit.set_defaults(run=_command(run_submit))

    tasks = commands.add_parser("tasks", help="list your tasks")
    tasks.add_argument("--status", default=None,
                       choices=["pending", "processing", "completed", "failed", "cancelled"])
    tasks.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    _connection_args(tasks)
    tasks.set_defaults(run=_command(run_tasks))

    login = commands.add_parser("login", help="check a token and save it with the server URL")
    _connection_args(login)
    login.set_defaults(run=_command(run_login))

    quote = commands.add_parser("quote", help="what a document would cost, without uploading "
                                "it as a task")
    quote.add_argument("file", type=_existing_file, help="the document")
    quote.add_argument("--type", dest="task_type", default="translate",
                       help="task type (default translate)")
    quote.add_argument("--param", action="append", default=[], type=_param,
                       metavar="KEY=VALUE", help="a task parameter, e.g. targetLang=zh")
    _connection_args(quote)
    quote.set_defaults(run=_command(run_quote))

    result = commands.add_parser("result", help="download a completed task's result")
    result.add_argument("task_id", type=int, metavar="ID")
    result.add_argument("-o", "--output", default=None,
                        help="where to save it (a file, or a directory; default here)")
    _connection_args(result)
    result.set_defaults(run=_command(run_result))

    watch = commands.add_parser("watch", help="follow a task live until it ends")
    watch.add_argument("task_id", type=int, metavar="ID")
    _connection_args(watch)
    watch.set_defaults(run=_command(run_watch))

    for name, help_text in (("cancel", "cancel a pending or running task (refunded)"),
                            ("retry", "run a failed or cancelled task again (charged again)"),
                            ("rm", "delete a task and its files (cancelled first if running)")):
        action = commands.add_parser(name, help=help_text)
        action.add_argument("task_id", type=int, metavar="ID")
        _connection_args(action)
        action.set_defaults(run=_command(run_task_action))


# -------------------------------------------------------------------- submit
@dataclass
class _Submission:
    """What is known so far, for the Ctrl-C handler."""

    idempotency_key: str = field(default_factory=lambda: uuid.uuid4().hex)
    task_id: int | None = None


def run_submit(args: argparse.Namespace) -> int:
    """``zhiyi submit``: upload, follow with a progress bar, download; 1 if it did not complete."""
    settings = _settings(args)
    submission = _Submission()
    try:
        return asyncio.run(_submit(args, settings, submission))
    except KeyboardInterrupt:
        return _interrupted(settings, submission)


async def _submit(args: argparse.Namespace, settings: Settings, submission: _Submission) -> int:
    async with ZhiyiClient(settings.server, settings.token) as client:
        task = await client.create_task(args.file, args.task_type, dict(args.param),
                                        idempotency_key=submission.idempotency_key)
        task_id = submission.task_id = int(task["taskId"])
        _say(f"task {task_id} created ({task['creditsCost']} credits)")
        final = await _follow_with_progress(client, task)
        status = final.get("status")
        if status == "completed":
            out = Path(args.output) if args.output else Path.cwd()
            saved = await client.download_result(task_id, out)
            _say(f"saved {saved}")
            return 0
        if status == "failed":
            return _fail(f"task {task_id} failed: {final.get('error') or final.get('message')}")
        if status == "cancelled":
            return _fail(f"task {task_id} was cancelled")
        return _fail(f"task {task_id} was deleted")


def _say(text: str) -> None:
    print(text, flush=True)


async def _follow_with_progress(client: ZhiyiClient, task: dict[str, Any]) -> dict[str, Any]:
    """Follow the task's stream, showing progress; returns the final status data."""
    final: dict[str, Any] = status_data(task)
    with _progress_display(task["fileName"]) as show:
        show(final)
        events = client.follow(task["taskId"], on_reconnect=lambda reason, delay: show(
            {**final, "message": f"connection lost; reconnecting in {delay:.0f} s"}))
        async with contextlib.aclosing(events) as stream:
            async for event in stream:
                if event.type == "task_deleted":
                    return {"status": "deleted"}
                if event.type in ("status_update", "reset"):
                    final = event.data
                    show(final)
    return final


@contextlib.contextmanager
def _progress_display(name: str) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A rich progress bar on a terminal; plain lines (on change) otherwise."""
    if not sys.stdout.isatty():
        last: list[tuple[Any, ...]] = []

        def plain(data: dict[str, Any]) -> None:
            line = (data.get("status"), int(data.get("progress") or 0), data.get("message"))
            if not last or last[-1] != line:
                last[:] = [line]
                status, percent, message = line
                detail = f": {message}" if message and message != status else ""
                print(f"[{percent:3d}%] {status}{detail}", flush=True)

        yield plain
        return

    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
               TimeElapsedColumn(), TextColumn("{task.fields[status]}"))
    with Progress(*columns, transient=False) as progress:
        bar = progress.add_task(name, total=100, status="")

        def fancy(data: dict[str, Any]) -> None:
            status, message = data.get("status") or "", data.get("message") or ""
            text = status if message in ("", status) else f"{status} · {message}"
            progress.update(bar, completed=float(data.get("progress") or 0), status=text)

        yield fancy


def _interrupted(settings: Settings, submission: _Submission) -> int:
    """Ctrl-C: offer to cancel the task on the server, or leave it running."""
    if submission.task_id is None:
        return _fail("interrupted before the task was created")
    try:
        answer = input("\nCancel the task on the server? [y/N] ")
    except EOFError:
        answer = ""
    if answer.strip().lower() not in ("y", "yes"):
        print(f"task {submission.task_id} is still running on the server: follow it with "
              f"'zhiyi watch {submission.task_id}', fetch it later with "
              f"'zhiyi result {submission.task_id}'", flush=True)
        return 130

    async def cancel() -> None:
        async with ZhiyiClient(settings.server, settings.token) as client:
            await client.cancel(submission.task_id or 0)

    try:
        asyncio.run(cancel())
    except ZhiyiError as e:
        return _fail(f"could not cancel task {submission.task_id}: {e.message}")
    return _fail(f"task {submission.task_id} was cancelled")


# --------------------------------------------------------------------- tasks
def run_tasks(args: argparse.Namespace) -> int:
    """``zhiyi tasks``: the user's tasks, newest first (a table; tab-separated when piped)."""
    if args.limit < 1:
        raise _UsageError("--limit must be at least 1")
    settings = _settings(args)

    async def fetch() -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        async with ZhiyiClient(settings.server, settings.token) as client:
            async with contextlib.aclosing(client.iter_tasks(args.status,
                                                             min(args.limit, 100))) as tasks:
                async for task in tasks:
                    found.append(task)
                    if len(found) >= args.limit:
                        break
        return found

    _print_tasks(asyncio.run(fetch()))
    return 0


TASK_COLUMNS = ("id", "status", "progress", "type", "file", "credits", "created", "message")


def _task_row(task: dict[str, Any]) -> tuple[str, ...]:
    message = task.get("errorMessage") or task.get("statusMessage") or ""
    return (str(task["taskId"]), task["taskStatus"], f"{task.get('progressPercent', 0)}%",
            task["taskType"], task["fileName"], str(task.get("creditsCost", "")),
            str(task.get("createdAt") or "")[:19].replace("T", " "), message)


def _print_tasks(tasks: list[dict[str, Any]]) -> None:
    if not sys.stdout.isatty():
        print("\t".join(TASK_COLUMNS))
        for task in tasks:
            print("\t".join(c.replace("\t", " ") for c in _task_row(task)))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(*TASK_COLUMNS, title=f"{len(tasks)} tasks")
    for task in tasks:
        table.add_row(*_task_row(task))
    Console().print(table)


# --------------------------------------------------------------------- login
def run_login(args: argparse.Namespace) -> int:
    """``zhiyi login``: check the token against the server, then save both in the config file."""
    settings = _settings(args, need_token=False)
    token = args.token or os.environ.get("ZHIYI_TOKEN")
    if not token and sys.stdin.isatty():
        token = getpass.getpass("API token: ").strip()
    if not token:
        raise _UsageError("pass --token (or set ZHIYI_TOKEN)")
    settings = Settings(settings.server, token)

    async def check() -> dict[str, Any]:
        async with ZhiyiClient(settings.server, token) as client:
            return await client.me()

    try:
        who = asyncio.run(check())
    except ZhiyiError as e:
        if e.status == 401:
            return _fail(f"that token is not valid on {settings.server}")
        raise
    path = config_path()
    write_config(path, settings)
    print(f"logged in to {settings.server} as {who.get('userId')} "
          f"({who.get('credits')} credits); saved {path}")
    return 0


# ------------------------------------------------- one task: quote, result, watch, actions
def _run(settings: Settings, action: Callable[[ZhiyiClient], Awaitable[int]]) -> int:
    async def go() -> int:
        async with ZhiyiClient(settings.server, settings.token) as client:
            return await action(client)

    return asyncio.run(go())


def _not_found(task_id: int) -> str:
    return f"there is no task {task_id} of yours on this server; 'zhiyi tasks' lists them"


def run_quote(args: argparse.Namespace) -> int:
    """``zhiyi quote FILE``: the cost, the memory hits and the balance after, nothing kept."""
    settings = _settings(args)

    async def action(client: ZhiyiClient) -> int:
        quote = await client.quote(args.file, args.task_type, dict(args.param))
        balance = (await client.me())["credits"]
        memory = quote.get("fromMemory") or 0
        parts = [f"{quote['characters']} characters" if quote.get("characters") is not None
                 else None,
                 f"{memory} segment(s) from translation memory (free)" if memory else None]
        detail = ", ".join(p for p in parts if p)
        print(f"{args.file.name}: {quote['credits']} credits"
              + (f" ({detail})" if detail else "")
              + f"; balance {balance}, after: {balance - quote['credits']}")
        if quote["credits"] > balance:
            return _fail(f"not enough credits: {quote['credits']} needed, {balance} left; "
                         "ask the server's administrator for more "
                         "('zhiyi user credit NAME AMOUNT' on the server)")
        return 0

    return _run(settings, action)


def run_result(args: argparse.Namespace) -> int:
    """``zhiyi result ID``: download a completed task's result."""
    settings = _settings(args)

    async def action(client: ZhiyiClient) -> int:
        try:
            saved = await client.download_result(args.task_id, Path(args.output or Path.cwd()))
        except ZhiyiError as e:
            if e.status == 404:
                return _fail(_not_found(args.task_id))
            if e.code == "not_completed" or e.status == 409:
                return _fail(f"task {args.task_id} has not completed ({e.message}); follow it "
                             f"with 'zhiyi watch {args.task_id}'")
            if e.status == 410:
                return _fail(f"the result of task {args.task_id} was deleted after the "
                             "retention period; submit the document again")
            raise
        _say(f"saved {saved}")
        return 0

    return _run(settings, action)


def run_watch(args: argparse.Namespace) -> int:
    """``zhiyi watch ID``: follow a task with a progress bar until it ends."""
    settings = _settings(args)

    async def action(client: ZhiyiClient) -> int:
        try:
            task = await client.get_task(args.task_id)
        except ZhiyiError as e:
            if e.status == 404:
                return _fail(_not_found(args.task_id))
            raise
        final = await _follow_with_progress(client, task)
        status = final.get("status")
        if status == "completed":
            _say(f"task {args.task_id} completed; download it with "
                 f"'zhiyi result {args.task_id}'")
            return 0
        if status == "failed":
            return _fail(f"task {args.task_id} failed: "
                         f"{final.get('error') or final.get('message')}; "
                         f"'zhiyi retry {args.task_id}' runs it again")
        return _fail(f"task {args.task_id} was {status or 'deleted'}")

    return _run(settings, action)


def run_task_action(args: argparse.Namespace) -> int:
    """``zhiyi cancel|retry|rm ID``."""
    settings = _settings(args)

    async def action(client: ZhiyiClient) -> int:
        try:
            if args.command == "rm":
                await client.delete(args.task_id)
                _say(f"task {args.task_id} deleted")
                return 0
            task = await (client.cancel if args.command == "cancel" else client.retry)(
                args.task_id)
        except ZhiyiError as e:
            if e.status == 404:
                return _fail(_not_found(args.task_id))
            if e.status == 409:
                return _fail(f"cannot {args.command} task {args.task_id}: {e.message}")
            if e.status == 402:
                return _fail(f"{e.message} Ask the server's administrator for credits "
                             "('zhiyi user credit NAME AMOUNT' on the server).")
            raise
        credits = ("refunded" if args.command == "cancel"
                   else f"{task.get('creditsCost')} credits charged")
        _say(f"task {args.task_id} is {task['taskStatus']} ({credits})"
             + (f"; follow it with 'zhiyi watch {args.task_id}'" if args.command == "retry"
                else ""))
        return 0

    return _run(settings, action)
