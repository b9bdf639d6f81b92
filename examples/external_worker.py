"""An external translation service that speaks Zhiyi's asynchronous protocol.

It stands for the GPU box or vendor API that Zhiyi's ``external`` engine talks to,
and needs nothing but aiohttp (it does not import Zhiyi):

1. Zhiyi POSTs multipart ``file``, ``taskType``, ``params`` (JSON text) and
   ``callbackUrl`` to ``EXTERNAL_SERVICE_URL``; this service stores the file and
   answers 202 ``{"externalTaskId": "<uuid>"}`` at once.
2. In the background it pseudo-translates the document paragraph by paragraph in
   a process pool, POSTing signed ``processing`` webhooks to ``callbackUrl``.
3. It ends with a signed ``completed`` webhook whose ``resultUrl`` points at
   ``GET /results/{id}`` here (or, with ``--inline``, carries ``resultText``),
   or with a ``failed`` one.

Run it::

    python examples/external_worker.py --port 8090 --secret s3cret

See ``examples/README.md`` for running it beside Zhiyi and for the three places
to change to put a real model or vendor API behind it.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import site
import tempfile
import time
import unicodedata
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote, unquote

import aiohttp
from aiohttp import web
from yarl import URL

__all__ = [
    "BadDocument",
    "WorkerConfig",
    "create_app",
    "main",
    "pseudo_translate",
    "sign",
]

logger = logging.getLogger("zhiyi.external_worker")

#: Header names of the webhook signature (API.md, "Webhook").
TIMESTAMP_HEADER = "X-Zhiyi-Timestamp"
SIGNATURE_HEADER = "X-Zhiyi-Signature"

#: Uploads are streamed to disk; this caps what one job may write there.
MAX_UPLOAD_BYTES = 64 * 1024 * 1024
#: Text fields (taskType, params, callbackUrl) are small; refuse anything bigger.
MAX_FIELD_BYTES = 64 * 1024
#: A long document is grouped into at most this many chunks, so it sends at most
#: this many progress webhooks (and waits ``delay`` at most this many times).
MAX_PROGRESS_REPORTS = 50
#: Webhook deliveries tried in all before giving up.
WEBHOOK_ATTEMPTS = 4
#: 4xx answers worth retrying. 404 is here because the first webhook can beat
#: Zhiyi to recording our externalTaskId (it learns it from our 202 answer).
RETRYABLE_4XX = frozenset({404, 408, 425, 429})
#: This file's directory, which worker processes need on sys.path.
_HERE = str(Path(__file__).resolve().parent)


# --------------------------------------------------------------------------
# Pseudo translation (pure functions; they run in the worker processes)
# --------------------------------------------------------------------------

_ACCENTS = str.maketrans(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "áƀçðéƒĝĥîĵķļɱñöþǫŕšţûṽŵẋýžÅƁÇÐÉƑĜĤÎĴĶĻṀÑÖÞǪŔŠŢÛṼŴẊÝŽ",
)

#: Kept verbatim: URLs, {{x}}, {x}, printf (%s, %(x)d), tags, entities, `code`.
#: One capturing group, so ``split`` puts protected pieces at odd indexes.
_PROTECTED = re.compile(
    r"("
    r"https?://[^\s<>\"'`]+[^\s<>\"'`.,;:!?)\]]"
    r"|\{\{.*?\}\}"
    r"|\{[^{}\s]*\}"
    r"|%(?:\([^)\s]+\))?[-#0+]*(?:\d+|\*)?(?:\.(?:\d+|\*))?[diouxXeEfFgGcrsa%]"
    r"|</?[A-Za-z!?][^<>]*>"
    r"|&(?:#\d+|#x[0-9A-Fa-f]+|\w+);"
    r"|`[^`]+`"
    r")"
)

#: Markdown structure at the start of a line stays outside the brackets, so a
#: heading or a list item is still one after pseudo translation.
_LEADING_MARKUP = re.compile(r"\s*(?:(?:#{1,6}|>|[-*+]|\d+[.)])\s+)*")

_PARAGRAPH_BREAK = re.compile(r"(\n[ \t\r]*\n)")

#: Roughly how much longer translations run than English; pseudo translation
#: pads by this much so layouts get tested for it.
EXPANSION = 0.3
_FILLER = "·"


def _pseudo_line(line: str) -> str:
    """Pseudo-translate one line; lines with no letters (SRT timings) stay as they are."""
    body = line.rstrip("\r\n")
    ending = line[len(body) :]
    lead = _LEADING_MARKUP.match(body)
    prefix = body[: lead.end()] if lead else ""
    rest = body[len(prefix) :]
    text = rest.rstrip()
    trailing = rest[len(text) :]

    pieces = _PROTECTED.split(text)
    visible = "".join(pieces[0::2])
    if not any(ch.isalpha() for ch in visible):
        return line
    accented = "".join(
        piece if index % 2 else piece.translate(_ACCENTS) for index, piece in enumerate(pieces)
    )
    padding = _FILLER * math.ceil(len(visible) * EXPANSION)
    return f"{prefix}[{accented} {padding}]{trailing}{ending}"


def pseudo_translate(text: str) -> str:
    """Pseudo-localize ``text``: accented look-alike letters, brackets, ~30% longer.

    Placeholders (``{name}``, ``{{count}}``, ``%s``, ``%(user)d``), tags, entities,
    inline code and URLs are kept verbatim, line structure is preserved.
    """
    return "".join(_pseudo_line(line) for line in text.splitlines(keepends=True))


def pseudo_translate_batch(paragraphs: list[str]) -> list[str]:
    """Translate several paragraphs in one trip to a worker process."""
    return [pseudo_translate(paragraph) for paragraph in paragraphs]


# --------------------------------------------------------------------------
# Documents
# --------------------------------------------------------------------------


class BadDocument(Exception):
    """The uploaded file is not text this service can translate."""


def decode_document(raw: bytes) -> str:
    """Decode ``raw`` as UTF-8 (BOM allowed), falling back to GB18030."""
    if b"\x00" in raw:
        # GB18030 decodes almost any bytes, so a .docx or .pdf would "decode"
        # to garbage; NUL bytes are the cheap sign of a binary format.
        raise BadDocument("the file is binary; this example service translates text files only")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    try:
        return raw.decode("gb18030")
    except UnicodeDecodeError as e:
        raise BadDocument("the file is neither UTF-8 nor GB18030 text") from e


def split_paragraphs(text: str) -> tuple[list[str], list[str]]:
    """Split ``text`` into paragraphs and the blank-line runs between them.

    ``join_paragraphs(split_paragraphs(t)) == t`` for every ``t``.
    """
    parts = _PARAGRAPH_BREAK.split(text)
    return parts[0::2], parts[1::2]


def join_paragraphs(paragraphs: Sequence[str], breaks: Sequence[str]) -> str:
    """Inverse of :func:`split_paragraphs`."""
    out = [paragraphs[0]] if paragraphs else []
    for separator, paragraph in zip(breaks, paragraphs[1:], strict=True):
        out += [separator, paragraph]
    return "".join(out)


def clean_file_name(name: str | None) -> str:
    """The last path component of a client's file name, safe to use as one."""
    # aiohttp's FormData (what Zhiyi sends with) percent-encodes non-ASCII
    # names; browsers and curl send them raw. unquote() reads both.
    base = PurePosixPath(unquote(name or "").replace("\\", "/")).name
    base = "".join(ch for ch in base if unicodedata.category(ch)[0] != "C").strip()
    return base if base not in ("", ".", "..") else "upload"


# --------------------------------------------------------------------------
# Webhooks
# --------------------------------------------------------------------------


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``X-Zhiyi-Signature`` value for ``body`` sent at ``timestamp``.

    ``sha256=`` + hex HMAC-SHA256 of ``b"<timestamp>." + body`` keyed with ``secret``.
    """
    message = str(timestamp).encode("ascii") + b"." + body
    digest = hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


class WebhookSender:
    """Delivers signed webhooks, retrying with backoff when retrying can help."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        secret: str,
        *,
        retry_delay: float,
        attempts: int = WEBHOOK_ATTEMPTS,
    ) -> None:
        self._session = session
        self._secret = secret
        self._retry_delay = retry_delay
        self._attempts = attempts

    async def send(self, url: str, payload: Mapping[str, Any]) -> bool:
        """POST ``payload`` to ``url``; True once a 2xx answer came back."""
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        for attempt in range(1, self._attempts + 1):
            try:
                status = await self._post(url, body)
            except (aiohttp.ClientError, TimeoutError) as e:
                problem = f"{type(e).__name__}: {e}"
            else:
                if 200 <= status < 300:
                    return True
                if status < 500 and status not in RETRYABLE_4XX:
                    logger.error("webhook to %s refused with HTTP %d; not retrying", url, status)
                    return False
                problem = f"HTTP {status}"
            if attempt < self._attempts:
                pause = self._retry_delay * 2 ** (attempt - 1)
                logger.warning(
                    "webhook to %s failed (%s), attempt %d of %d; retrying in %.2fs",
                    url,
                    problem,
                    attempt,
                    self._attempts,
                    pause,
                )
                await asyncio.sleep(pause)
        logger.error(
            "webhook to %s failed (%s); giving up after %d attempts", url, problem, self._attempts
        )
        return False

    async def _post(self, url: str, body: bytes) -> int:
        # A fresh timestamp per attempt, so a late retry is not refused as stale.
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            TIMESTAMP_HEADER: str(timestamp),
            SIGNATURE_HEADER: sign(self._secret, timestamp, body),
        }
        async with self._session.post(url, data=body, headers=headers) as response:
            await response.read()
            return response.status


# --------------------------------------------------------------------------
# Jobs
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """Settings of one worker app, fixed when the app is made."""

    secret: str
    #: Seconds to wait between progress reports, so people can watch progress.
    delay: float = 0.2
    #: Send ``resultText`` in the final webhook instead of a ``resultUrl``.
    inline: bool = False
    #: Base URL of this service as Zhiyi sees it; None: the origin Zhiyi called.
    public_url: str | None = None
    #: Paths that accept ``POST`` of a new job.
    job_paths: tuple[str, ...] = ("/", "/jobs")
    #: Processes in the translation pool.
    workers: int = 2
    #: First pause before a webhook is retried; it doubles on each retry.
    retry_delay: float = 0.5


@dataclass(frozen=True, slots=True)
class Job:
    """One accepted job: what was asked and where its file is."""

    id: str
    task_type: str
    params: dict[str, Any]
    callback_url: str
    source: Path
    file_name: str
    #: Base of this service's URLs, for the resultUrl.
    base_url: str


class Worker:
    """Runs accepted jobs in tracked background tasks and keeps their results."""

    def __init__(
        self,
        config: WorkerConfig,
        pool: ProcessPoolExecutor,
        webhooks: WebhookSender,
        workdir: Path,
    ) -> None:
        self._config = config
        self._pool = pool
        self._webhooks = webhooks
        self._workdir = workdir
        self._results: dict[str, Path] = {}
        #: Running jobs; ``close`` cancels and awaits them.
        self.tasks: set[asyncio.Task[None]] = set()

    def job_dir(self, job_id: str) -> Path:
        """A new directory for the files of job ``job_id``."""
        path = self._workdir / job_id
        path.mkdir()
        return path

    def result_path(self, job_id: str) -> Path | None:
        """The result file of a completed job, or None."""
        return self._results.get(job_id)

    def submit(self, job: Job) -> None:
        """Start ``job`` in the background; the task is tracked, not forgotten."""
        task = asyncio.create_task(self._run(job), name=f"job-{job.id}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def close(self) -> None:
        """Cancel the running jobs and wait until they have stopped."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _run(self, job: Job) -> None:
        # The one catch-all: any error fails the job (CancelledError is not an
        # Exception, so shutdown still cancels us).
        try:
            final = await self._translate(job)
        except BadDocument as e:
            logger.warning("job %s: %s", job.id, e)
            final = self._status(job, "failed", message=str(e))
        except Exception:
            logger.exception("job %s failed", job.id)
            final = self._status(job, "failed", message="the translation service failed")
        finally:
            job.source.unlink(missing_ok=True)
        await self._webhooks.send(job.callback_url, final)

    async def _translate(self, job: Job) -> dict[str, Any]:
        """Translate chunk by chunk, reporting progress; return the final webhook."""
        text = decode_document(await asyncio.to_thread(job.source.read_bytes))
        paragraphs, breaks = split_paragraphs(text)
        total = len(paragraphs)
        logger.info(
            "job %s: %s, %d paragraphs, params %s", job.id, job.file_name, total, job.params
        )
        await self._progress(job, 0, total)

        loop = asyncio.get_running_loop()
        step = max(1, math.ceil(total / MAX_PROGRESS_REPORTS))
        translated: list[str] = []
        for start in range(0, total, step):
            await asyncio.sleep(self._config.delay)
            # CHANGE ME (2 of 3): the translation call. CPU work goes to the pool
            # so the event loop stays free to answer; a model's batch call or a
            # vendor API request goes here instead.
            batch = paragraphs[start : start + step]
            translated += await loop.run_in_executor(self._pool, pseudo_translate_batch, batch)
            await self._progress(job, len(translated), total)

        result = join_paragraphs(translated, breaks)
        if self._config.inline:
            return self._status(job, "completed", progress=100, resultText=result)
        await self._store_result(job, result)
        return self._status(
            job, "completed", progress=100, resultUrl=f"{job.base_url}/results/{job.id}"
        )

    async def _progress(self, job: Job, done: int, total: int) -> None:
        # 100 is kept for "completed", so Zhiyi never shows 100% of a job not done.
        progress = min(99, done * 100 // total) if total else 0
        message = f"paragraph {done} of {total}"
        await self._webhooks.send(
            job.callback_url, self._status(job, "processing", progress=progress, message=message)
        )

    async def _store_result(self, job: Job, text: str) -> None:
        # CHANGE ME (3 of 3): where results live. They stay here until the
        # worker stops; a real service would expire them or use object storage.
        path = job.source.parent / "result" / job.file_name
        path.parent.mkdir()
        await asyncio.to_thread(path.write_bytes, text.encode("utf-8"))
        self._results[job.id] = path

    @staticmethod
    def _status(job: Job, status: str, **fields: Any) -> dict[str, Any]:
        return {"externalTaskId": job.id, "status": status, **fields}


# --------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------

CONFIG = web.AppKey("external_worker.config", WorkerConfig)
POOL = web.AppKey("external_worker.pool", ProcessPoolExecutor)
WEBHOOKS = web.AppKey("external_worker.webhooks", WebhookSender)
WORKER = web.AppKey("external_worker.worker", Worker)


class BadRequest(Exception):
    """A job submission this service cannot accept."""

    def __init__(self, message: str, *, code: str = "bad_request", status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


@dataclass(slots=True)
class _Form:
    fields: dict[str, str]
    file_name: str | None = None
    file_path: Path | None = None


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"success": False, "code": code, "message": message}, status=status)


async def _read_text_field(part: aiohttp.BodyPartReader) -> str:
    data = bytearray()
    while chunk := await part.read_chunk():
        data += chunk
        if len(data) > MAX_FIELD_BYTES:
            raise BadRequest(f"field {part.name!r} is longer than {MAX_FIELD_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(f"field {part.name!r} is not UTF-8 text") from e


async def _save_file(part: aiohttp.BodyPartReader, path: Path) -> None:
    """Stream an upload to ``path`` without holding it in memory."""
    loop = asyncio.get_running_loop()
    size = 0
    with path.open("wb") as out:
        while chunk := await part.read_chunk():
            size += len(chunk)
            if size > MAX_UPLOAD_BYTES:
                raise BadRequest(
                    f"the file is larger than {MAX_UPLOAD_BYTES // 2**20} MiB",
                    code="too_large",
                    status=413,
                )
            await loop.run_in_executor(None, out.write, chunk)


async def _read_form(request: web.Request, job_dir: Path) -> _Form:
    if request.content_type != "multipart/form-data":
        raise BadRequest("send the job as multipart/form-data")
    form = _Form(fields={})
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, aiohttp.BodyPartReader):
                raise BadRequest("nested multipart bodies are not accepted")
            if part.name == "file":
                if form.file_path is not None:
                    raise BadRequest("send exactly one file")
                form.file_name = clean_file_name(part.filename)
                form.file_path = job_dir / form.file_name
                await _save_file(part, form.file_path)
            elif part.name:
                form.fields[part.name] = await _read_text_field(part)
    except ValueError as e:  # aiohttp's word for a malformed multipart body
        raise BadRequest(f"malformed multipart body: {e}") from e
    return form


def _parse_job(form: _Form, job_id: str, base_url: str) -> Job:
    """Check the submitted fields and make the job, or raise BadRequest."""
    missing = [name for name in ("taskType", "callbackUrl") if not form.fields.get(name)]
    if form.file_path is None or form.file_name is None:
        missing.insert(0, "file")
    if missing:
        raise BadRequest(f"missing field(s): {', '.join(missing)}", code="missing_field")

    task_type = form.fields["taskType"]
    if task_type != "translate":
        raise BadRequest(
            f"task type {task_type!r} is not offered here; only 'translate' is",
            code="unsupported_task_type",
        )

    try:
        params = json.loads(form.fields.get("params") or "{}")
    except json.JSONDecodeError as e:
        raise BadRequest(f"params is not valid JSON: {e}", code="bad_params") from e
    if not isinstance(params, dict):
        raise BadRequest("params must be a JSON object", code="bad_params")

    try:
        callback = URL(form.fields["callbackUrl"])
    except ValueError as e:
        raise BadRequest("callbackUrl is not a URL", code="bad_callback_url") from e
    if callback.scheme not in ("http", "https") or not callback.host:
        raise BadRequest("callbackUrl must be an absolute http(s) URL", code="bad_callback_url")

    return Job(
        id=job_id,
        task_type=task_type,
        params=params,
        callback_url=str(callback),
        source=form.file_path,
        file_name=form.file_name,
        base_url=base_url,
    )


async def accept_job(request: web.Request) -> web.Response:
    """``POST /jobs`` (and ``/``): store the file, answer 202, work in the background."""
    worker = request.config_dict[WORKER]
    config = request.config_dict[CONFIG]
    job_id = str(uuid.uuid4())
    job_dir = worker.job_dir(job_id)
    # The origin Zhiyi called is, by construction, the one it accepts resultUrls from.
    base_url = (config.public_url or str(request.url.origin())).rstrip("/")
    try:
        job = _parse_job(await _read_form(request, job_dir), job_id, base_url)
    except BadRequest as e:
        shutil.rmtree(job_dir, ignore_errors=True)
        logger.info("refused a job: %s", e)
        return _error(e.status, e.code, str(e))
    except BaseException:  # a dropped upload, a cancel: leave no files behind
        shutil.rmtree(job_dir, ignore_errors=True)
        raise
    worker.submit(job)
    logger.info("accepted job %s (%s), callback %s", job.id, job.file_name, job.callback_url)
    return web.json_response({"externalTaskId": job.id}, status=202)


async def get_result(request: web.Request) -> web.StreamResponse:
    """``GET /results/{id}``: the translated file, UTF-8, under its original name."""
    path = request.config_dict[WORKER].result_path(request.match_info["job_id"])
    if path is None:
        return _error(404, "result_not_found", "no result with that id (yet)")
    kind = path.suffix.lower()
    content_type = {".html": "text/html", ".htm": "text/html", ".md": "text/markdown"}.get(
        kind, "text/plain"
    )
    ascii_name = path.name.encode("ascii", "replace").decode().replace('"', "_")
    headers = {
        "Content-Type": f"{content_type}; charset=utf-8",
        "Content-Disposition": (
            f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(path.name, safe='')}"
        ),
    }
    return web.FileResponse(path, headers=headers)


# --------------------------------------------------------------------------
# Resources, one cleanup_ctx each
# --------------------------------------------------------------------------


async def _pool_ctx(app: web.Application) -> AsyncIterator[None]:
    # CHANGE ME (1 of 3): what translates. A GPU box loads its model once per
    # process in the pool's initializer; a vendor API needs no pool but a
    # ClientSession (and its API key from the environment) instead.
    # "spawn" rather than fork: forking a process that runs an event loop and
    # threads can deadlock. Spawned children import this module by name, so
    # they get its directory on sys.path (examples/ is not a package).
    pool = ProcessPoolExecutor(
        max_workers=app[CONFIG].workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=site.addsitedir,
        initargs=(_HERE,),
    )
    app[POOL] = pool
    yield
    await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)


async def _webhooks_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        app[WEBHOOKS] = WebhookSender(session, config.secret, retry_delay=config.retry_delay)
        yield


async def _worker_ctx(app: web.Application) -> AsyncIterator[None]:
    workdir = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="zhiyi-worker-"))
    worker = Worker(app[CONFIG], app[POOL], app[WEBHOOKS], workdir)
    app[WORKER] = worker
    try:
        yield
    finally:
        # Jobs stop before the session and the pool they use are closed
        # (cleanup_ctx tears down in reverse order).
        await worker.close()
        await asyncio.to_thread(shutil.rmtree, workdir, ignore_errors=True)


def create_app(
    secret: str,
    *,
    delay: float = 0.2,
    inline: bool = False,
    public_url: str | None = None,
    job_paths: Sequence[str] = ("/", "/jobs"),
    workers: int = 2,
    retry_delay: float = 0.5,
) -> web.Application:
    """Make the worker's aiohttp application; it does no I/O until started.

    ``secret`` signs the webhooks (Zhiyi's ``WEBHOOK_SECRET``); ``delay`` is the
    pause between progress reports; ``inline`` sends ``resultText`` instead of a
    ``resultUrl``; ``public_url`` is the base of ``resultUrl`` (default: the
    origin the job was posted to); ``job_paths`` are the paths accepting jobs.
    """
    if not secret:
        raise ValueError("a webhook secret is required")
    if delay < 0 or retry_delay < 0 or workers < 1:
        raise ValueError("delay and retry_delay must be >= 0, workers >= 1")
    app = web.Application()
    app[CONFIG] = WorkerConfig(
        secret=secret,
        delay=delay,
        inline=inline,
        public_url=public_url,
        job_paths=tuple(job_paths),
        workers=workers,
        retry_delay=retry_delay,
    )
    app.cleanup_ctx.extend([_pool_ctx, _webhooks_ctx, _worker_ctx])
    for path in app[CONFIG].job_paths:
        app.router.add_post(path, accept_job)
    app.router.add_get("/results/{job_id}", get_result)
    return app


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def _non_negative(value: str) -> float:
    number = float(value)
    if number < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return number


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="An example external translation service for Zhiyi's 'external' engine."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8090, help="port to bind (default 8090)")
    parser.add_argument(
        "--secret",
        "--callback-secret",
        dest="secret",
        default=os.environ.get("WEBHOOK_SECRET"),
        help="webhook signing secret, Zhiyi's WEBHOOK_SECRET (default: $WEBHOOK_SECRET)",
    )
    parser.add_argument(
        "--delay",
        type=_non_negative,
        default=0.2,
        help="seconds between progress reports (default 0.2)",
    )
    parser.add_argument(
        "--inline", action="store_true", help="send resultText instead of a resultUrl"
    )
    parser.add_argument(
        "--public-url",
        help="base of resultUrl as Zhiyi reaches this service "
        "(default: the origin Zhiyi posted the job to, http://HOST:PORT)",
    )
    parser.add_argument(
        "--jobs-path",
        dest="job_paths",
        action="append",
        help="path accepting jobs; repeat for several (default: / and /jobs)",
    )
    parser.add_argument("--workers", type=int, default=2, help="translation processes (default 2)")
    args = parser.parse_args(argv)
    if not args.secret:
        parser.error("a secret is required: --secret or the WEBHOOK_SECRET environment variable")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Run the worker from the command line."""
    args = _parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(
        args.secret,
        delay=args.delay,
        inline=args.inline,
        public_url=args.public_url,
        job_paths=args.job_paths or ("/", "/jobs"),
        workers=args.workers,
    )
    web.run_app(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
