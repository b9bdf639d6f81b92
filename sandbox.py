"""Untrusted-document parsing in bounded child processes.

Every read of an uploaded document (pricing at create, and the parse, text
extraction and write-back of a translation during processing) runs here, in
a parser process with its own limits: address space (``RLIMIT_AS``), CPU time
(``RLIMIT_CPU``) and a wall time the parent enforces by killing the parser. A
parser that dies or is killed becomes :class:`DocumentRefused` with a
sentence naming the limit, so the server process never holds a hostile
document's memory, and a parse never runs on the event loop's default
executor (which aiohttp's own file responses use).

Before a format parses anything, zip-based files are checked from their
central directory (member count, declared sizes, compression ratio) and
PDFs by page count. Those checks run in the parser too: even listing a zip's
directory allocates in proportion to it.

Parser processes are forked from multiprocessing's *forkserver*, which has
this module (and so ``formats`` with lxml, python-docx and pypdf) imported
once, and then kept warm: a parser reads one document at a time, for many
documents, so a read costs a pipe round trip (well under a millisecond)
rather than a fork, an import-free start and a reap (~15 ms of CPU each,
three reads per translation). Before each document its soft limits are
raised again from where the parser stands, so every document gets the whole
memory and CPU allowance. A parser retires after a failure that may have left
it unsound (out of memory, too deep, an unexpected error), after 500
documents, or when its memory grew by 64 MB (``ParseLimits``); one killed
(wall time, an abandoned read) or dead is simply replaced. Parsers keep no
state between documents: a job is a function of the file's path and its
answer. At most ``workers`` documents are read at once, and at most
``per_user`` of them for one user. Results come back as small picklable
values; anything large (segments, text, the rebuilt document) goes through
files in the task's folders.

Nothing here knows of HTTP or the database: the server turns
:class:`DocumentRefused` into ``422 bad_document``, processors into a failed
task.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import itertools
import json
import logging
import math
import multiprocessing
import multiprocessing.forkserver
import os
import pickle
import resource
import signal
import zipfile
from collections.abc import Awaitable, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import popen_forkserver, reduction, spawn, util
from multiprocessing.connection import Connection
from multiprocessing.context import set_spawning_popen
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, TypeVar

import formats

__all__ = [
    "ZIP_EXTENSIONS",
    "DocumentRefused",
    "DocumentSandbox",
    "ParseLimits",
    "ParsedDocument",
    "check_pdf",
    "check_zip",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: formats that are zip archives (today .docx; the others as formats add them)
ZIP_EXTENSIONS = frozenset({".docx", ".pptx", ".xlsx", ".odt", ".ods", ".odp", ".epub"})
# A member smaller than this is not judged by its ratio: a small, very compressible part
# (an XML file of repeated tags) is harmless whatever its ratio.
_RATIO_FLOOR_BYTES = 1 << 20
# A parser's answer is a few hundred bytes. Under 16 KB, multiprocessing sends it in one
# write, far under a pipe's buffer: the parser never blocks on it, and once the parent
# sees the pipe readable the whole answer is there.
_MAX_ANSWER_BYTES = 16 * 1024 - 64
# A request (a job, its paths and options, maybe a short document's translations) stays
# under this, so sending it into a parser's empty pipe (64 KB) never blocks the loop.
_MAX_REQUEST_BYTES = 32 * 1024
_POLL_SECONDS = 0.5
_MB = 1024 * 1024


class DocumentRefused(Exception):
    """The document cannot be read within the limits, or at all.

    ``str(exc)`` is one sentence a person can act on, naming the limit when one was hit.
    """


class ParseAbandoned(Exception):
    """The caller went away (the client disconnected); the parse was stopped."""


@dataclass(frozen=True)
class ParseLimits:
    """The limits of one document's parse; see the README's configuration table."""

    memory_mb: int = 512
    cpu_seconds: int = 60
    wall_seconds: float = 120.0
    max_zip_members: int = 10_000
    max_zip_uncompressed_mb: int = 512
    max_zip_ratio: int = 200
    max_pdf_pages: int = 2_000
    #: a parser process reads this many documents at most, then a fresh one takes its
    #: place: a bound on whatever a long life accumulates (fragmented arenas, caches)
    parser_documents: int = 500
    #: a parser whose address space grew this much past its start retires after the document
    parser_growth_mb: int = 64

    def memory_sentence(self) -> str:
        return (f"Reading this document needs more than the {self.memory_mb} MB memory limit "
                f"(PARSE_MEMORY_MB); split it into smaller files.")

    def cpu_sentence(self) -> str:
        return (f"Reading this document took more than the {self.cpu_seconds} s CPU-time limit "
                f"(PARSE_CPU_SECONDS); split it into smaller files.")

    def wall_sentence(self) -> str:
        return (f"Reading this document took longer than the {self.wall_seconds:g} s time limit "
                f"(PARSE_WALL_SECONDS); try again later or split it into smaller files.")

    def crash_sentence(self, how: str) -> str:
        return (f"The document reader stopped ({how}) on this file; it may be damaged or need "
                f"more than the {self.memory_mb} MB memory limit (PARSE_MEMORY_MB).")


# ------------------------------------------------------------------ pre-checks
def check_zip(path: Path, extension: str, limits: ParseLimits) -> None:
    """Refuse a zip-based document from its central directory, before anything is inflated.

    Only the directory is read. Declared sizes bound what is inflated later:
    ``zipfile`` stops a member at its declared size (and fails its CRC), so a
    member cannot inflate past what is checked here. A file that is not a
    readable zip is left to its format, which says so in its own words.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError):
        return
    if len(members) > limits.max_zip_members:
        raise DocumentRefused(
            f"This {extension} file holds {len(members):,} parts; the limit is "
            f"{limits.max_zip_members:,} (MAX_ZIP_MEMBERS).")
    for member in members:
        if member.file_size < _RATIO_FLOOR_BYTES:
            continue
        ratio = member.file_size / max(member.compress_size, 1)
        if ratio > limits.max_zip_ratio:
            raise DocumentRefused(
                f"A part of this {extension} file ({member.filename[:80]}) is compressed "
                f"{ratio:,.0f} to 1; the limit is {limits.max_zip_ratio:,} to 1 "
                f"(MAX_ZIP_RATIO), beyond which a file is treated as a zip bomb.")
    total = sum(member.file_size for member in members)
    if total > limits.max_zip_uncompressed_mb * _MB:
        raise DocumentRefused(
            f"This {extension} file would unpack to {total / _MB:,.0f} MB; the limit is "
            f"{limits.max_zip_uncompressed_mb:,} MB (MAX_ZIP_UNCOMPRESSED_MB).")


def check_pdf(path: Path, limits: ParseLimits) -> None:
    """Refuse a PDF with more pages than the limit, before any page's text is extracted.

    A file pypdf cannot open is left to the format, which says what is wrong.
    """
    from pypdf import PdfReader  # formats imported it already; only the name is needed

    try:
        reader = PdfReader(path)
        if reader.is_encrypted:
            reader.decrypt("")
        pages = len(reader.pages)
    except Exception:  # any failure to read is the format's to describe
        return
    if pages > limits.max_pdf_pages:
        raise DocumentRefused(
            f"This PDF has {pages:,} pages; the limit is {limits.max_pdf_pages:,} "
            f"(MAX_PDF_PAGES). Split it into smaller files.")


def _precheck(path: Path, extension: str, limits: ParseLimits) -> None:
    if extension in ZIP_EXTENSIONS:
        check_zip(path, extension, limits)
    elif extension == ".pdf":
        check_pdf(path, limits)


def _open(path: str, limits: ParseLimits) -> formats.Document:
    source = Path(path)
    extension = source.suffix.lower()
    _precheck(source, extension, limits)
    return formats.open_document(source)


# ------------------------------------------------------------ jobs (in a parser)
@dataclass(frozen=True)
class _Spooled:
    stats: formats.DocumentStats
    result_suffix: str
    extension: str


class _Spool:
    """A document whose segments are also written to a file as they are read.

    ``formats.document_stats`` reads the segments once; through this, that one
    pass also spools them, so the statistics cost no second parse.
    """

    def __init__(self, document: formats.Document, out: Any) -> None:
        self._document = document
        self._out = out

    def segments(self) -> Iterator[str]:
        for segment in self._document.segments():
            self._out.write(json.dumps(segment, ensure_ascii=False) + "\n")
            yield segment


def _stats_job(limits: ParseLimits, path: str) -> formats.DocumentStats:
    return formats.document_stats(_open(path, limits))


def _spool_job(limits: ParseLimits, path: str, segments_path: str,
               kept_path: str | None = None) -> _Spooled:
    """Write the segments, one JSON string a line, to ``segments_path``; measure them.

    With ``kept_path``, what was measured is written there too (see ``reopen``).
    """
    document = _open(path, limits)
    tmp = Path(segments_path + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        stats = formats.document_stats(_Spool(document, f))  # type: ignore[arg-type]
    tmp.replace(segments_path)
    suffix = Path(document.result_name("document" + document.extension)).suffix
    spooled = _Spooled(stats, suffix, document.extension)
    if kept_path is not None:
        tokens = formats.kept_tokens(document)
        if tokens is not None:  # before the parse is kept: kept means complete
            _write_whole(_tokens_file(Path(kept_path)), json.dumps(tokens, ensure_ascii=False))
        _write_whole(Path(kept_path), json.dumps({
            "stats": dataclasses.asdict(stats), "resultSuffix": suffix,
            "extension": document.extension}))
    return spooled


def _write_whole(path: Path, text: str) -> None:
    """Write a file whole or not at all (a torn one is never read as whole)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _read_kept(segments_path: Path, kept_path: Path) -> _Spooled | None:
    """A parse kept by ``open(keep=True)``, if both its files are there and whole."""
    try:
        saved = json.loads(kept_path.read_text(encoding="utf-8"))
        spooled = _Spooled(formats.DocumentStats(**saved["stats"]),
                           str(saved["resultSuffix"]), str(saved["extension"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # none kept (an older task, a retry after a cancel), or torn
    return spooled if segments_path.is_file() else None


def _render_job(limits: ParseLimits, path: str, translations_path: str, out: str,
                *options: Any) -> Any:
    document = _open(path, limits)
    return document.render(_read_jsonl(Path(translations_path)), Path(out), *options)


def _render_given_job(limits: ParseLimits, path: str, translations: list[str], out: str,
                      *options: Any) -> Any:
    return _open(path, limits).render(iter(translations), Path(out), *options)


def _extract_job(limits: ParseLimits, path: str, out: str) -> None:
    document = _open(path, limits)
    with Path(out).open("w", encoding="utf-8", newline="") as f:
        for chunk in document.plain_text():
            f.write(chunk)


def _read_jsonl(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def _address_space() -> int:
    """This process's virtual size in bytes (VmSize), what RLIMIT_AS counts."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _cpu_seconds_used() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _set_soft_limit(kind: int, soft: int) -> None:
    """Raise or lower a soft limit, never past the hard one (which only ever goes down)."""
    _, hard = resource.getrlimit(kind)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(kind, (soft, hard))


def _limit_next_job(limits: ParseLimits) -> None:
    """Give the next document the whole of its limits, counted from where the parser is now.

    The soft limits are raised per job: SIGXCPU (whose default action ends the
    process at once) after ``cpu_seconds`` more CPU, MemoryError past
    ``memory_mb`` more address space than the parser maps now (the interpreter,
    lxml and pypdf are ~45 MB), so a setting means the same on every machine and
    for every document a parser reads. The hard limits stay as inherited: a hard
    limit can never be raised again, and the parent's wall-time kill is the
    backstop of both.
    """
    _set_soft_limit(resource.RLIMIT_CPU, math.ceil(_cpu_seconds_used()) + limits.cpu_seconds)
    _set_soft_limit(resource.RLIMIT_AS, _address_space() + limits.memory_mb * _MB)


def _run_job(limits: ParseLimits, job: Callable[..., Any], args: tuple[Any, ...]
             ) -> tuple[tuple[str, Any], bool]:
    """One document's read: its answer, and whether this parser may read another after it.

    A document refused in the format's own words leaves the parser as it was;
    any other failure (out of memory, too deep, an unexpected error) may have left
    the interpreter in a state no later document should meet, so the parser retires.
    """
    try:
        _limit_next_job(limits)
        return ("ok", job(limits, *args)), True
    except (formats.BadDocument, DocumentRefused) as e:
        return ("refused", str(e)), True
    except MemoryError:
        return ("memory_limit", limits.memory_sentence()), False
    except RecursionError:
        return ("refused", "This document is nested too deeply to be read."), False
    except OSError as e:
        # The machine's trouble (a full disk), not the document's: the parent re-raises it.
        return ("os_error", (e.errno, e.strerror or str(e))), True
    except Exception as e:
        # The parent logs it with the task or request; the file is what was wrong.
        return ("refused", f"This file could not be read ({type(e).__name__}: {e})."[:500]), False


def _parser_main(conn: Connection, limits: ParseLimits) -> None:
    """A parser process: read one document per request, answer, until told to stop or retired.

    A request is a pickled ``(job, args)``; an answer is a pickled
    ``(status, value, retiring)``. The parser retires (answers, then exits) after
    a failure that may have left it unsound, after ``limits.parser_documents``
    documents, or when its address space grew by more than
    ``limits.parser_growth_mb`` (Python keeps freed arenas; a fresh parser starts
    small again). End of file on the
    pipe (the server closed it or died) ends it too.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C in a terminal is the server's
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    start_size = _address_space()
    for served in itertools.count(1):
        try:
            job, args = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        (status, value), sound = _run_job(limits, job, args)
        retiring = (not sound or served >= limits.parser_documents
                    or _address_space() - start_size > limits.parser_growth_mb * _MB)
        try:
            data = pickle.dumps((status, value, retiring))
            if len(data) > _MAX_ANSWER_BYTES:
                data = pickle.dumps(
                    ("refused", "The document reader gave too long an answer.", retiring))
            conn.send_bytes(data)
        except MemoryError:
            os._exit(3)
        if retiring:
            return


# ---------------------------------------------------------------- the parent side
class _UserSlots:
    """One user's parses: a semaphore."""

    def __init__(self, limit: int) -> None:
        self.semaphore = asyncio.Semaphore(limit)
        #: parses of this user running or waiting; the entry goes when it drops to 0
        self.holders = 0


Observe = Callable[[str], None]


class DocumentSandbox:
    """The pool of bounded parser processes of one app (or one worker pool).

    ``workers`` documents at most are read at once (the pool size), and at most
    ``per_user`` of them for one user; the others wait their turn (first come,
    first served), so one user's documents never take every slot.
    """

    def __init__(self, limits: ParseLimits | None = None, *, workers: int = 2,
                 per_user: int = 2, observe: Observe | None = None) -> None:
        self.limits = limits or ParseLimits()
        self.workers = max(1, workers)
        self.per_user = max(1, per_user)
        #: told each event: started, then ok, refused, memory_limit, cpu_limit, wall_limit,
        #: crashed, os_error; or abandoned (the caller went away or was cancelled, waiting or
        #: running; a running parser is killed)
        self._observe = observe or (lambda event: None)
        self._slots: asyncio.Semaphore | None = None
        self._users: dict[str, _UserSlots] = {}
        #: warm parsers waiting for a document, and those reading one now
        self._idle: list[_Parser] = []
        self._busy: set[_Parser] = set()
        # Starting a parser is a short blocking exchange with the forkserver: off the
        # loop, and off the default executor (aiohttp's file responses use that one).
        self._starter: ThreadPoolExecutor | None = None
        self.started = 0  #: parser processes started since the sandbox was made
        self.waiting = 0  #: parses waiting for a slot (the user's or the pool's)

    @property
    def in_flight(self) -> int:
        """Documents being read now (each by its own parser process)."""
        return len(self._busy)

    async def start(self) -> None:
        """Start the forkserver (imports the parsers once) so the first upload waits less."""
        self._starter = ThreadPoolExecutor(self.workers, thread_name_prefix="zhiyi-parse")
        await asyncio.get_running_loop().run_in_executor(self._starter, _ensure_forkserver)

    async def close(self) -> None:
        for parser in [*self._idle, *self._busy]:
            parser.stop()
        self._idle.clear()
        if self._starter is not None:
            self._starter.shutdown(wait=False, cancel_futures=True)
            self._starter = None

    # ------------------------------------------------------------- operations
    async def stats(self, path: Path, *, user: str,
                    still_wanted: Callable[[], bool] | None = None) -> formats.DocumentStats:
        """Characters, words, segments and language of the document (pricing, analyze)."""
        return await self._run(user, _stats_job, (str(path),), still_wanted=still_wanted)

    async def open(self, path: Path, *, user: str, work_dir: Path,
                   still_wanted: Callable[[], bool] | None = None,
                   keep: bool = False) -> ParsedDocument:
        """Parse the document; its segments are spooled to ``work_dir`` for the caller.

        With ``keep``, what the parse measured is kept beside the segments, so a
        later :meth:`reopen` (a task's attempt, after pricing at create) gives the
        same document without parsing the file again.
        """
        segments_path, kept_path = _parse_files(path, work_dir)
        spooled = await self._run(
            user, _spool_job, (str(path), str(segments_path), str(kept_path) if keep else None),
            still_wanted=still_wanted)
        return ParsedDocument(self, user, path, segments_path, work_dir, spooled)

    async def reopen(self, path: Path, *, user: str, work_dir: Path) -> ParsedDocument | None:
        """The parse kept by ``open(keep=True)`` in ``work_dir``; None if it is not there whole.

        Nothing is parsed: the segments were spooled by a parser, and the render
        still reads the file in a parser.
        """
        segments_path, kept_path = _parse_files(path, work_dir)
        spooled = await asyncio.to_thread(_read_kept, segments_path, kept_path)
        if spooled is None:
            return None
        return ParsedDocument(self, user, path, segments_path, work_dir, spooled)

    async def extract_text(self, path: Path, out: Path, *, user: str) -> None:
        """Write the document's plain text to ``out`` (UTF-8)."""
        await self._run(user, _extract_job, (str(path), str(out)))

    async def render_given(self, path: Path, translations: list[str], out: Path,
                           *options: Any, user: str) -> Any:
        """``render`` with the translations sent along with the request (a short list)."""
        return await self._run(
            user, _render_given_job, (str(path), translations, str(out), *options))

    async def render(self, path: Path, translations_path: Path, out: Path, *options: Any,
                     user: str) -> Any:
        """Write the document to ``out`` with segment i replaced by line i of the file.

        ``options`` go to the format's ``render`` after ``out``; returns what it returns.
        """
        return await self._run(
            user, _render_job, (str(path), str(translations_path), str(out), *options))

    # ------------------------------------------------------------- machinery
    async def _run(self, user: str, job: Callable[..., T], args: tuple[Any, ...], *,
                   still_wanted: Callable[[], bool] | None = None) -> T:
        slots = self._users.get(user) or self._users.setdefault(user, _UserSlots(self.per_user))
        slots.holders += 1
        try:
            return await _unless_abandoned(self._run_in_slot(slots, job, args), still_wanted)
        except (ParseAbandoned, asyncio.CancelledError):
            self._observe("abandoned")
            raise
        finally:
            slots.holders -= 1
            if not slots.holders:
                del self._users[user]

    async def _run_in_slot(self, slots: _UserSlots, job: Callable[..., T],
                           args: tuple[Any, ...]) -> T:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.workers)
        self.waiting += 1
        try:
            await slots.semaphore.acquire()
            try:
                await self._slots.acquire()
            except BaseException:
                slots.semaphore.release()
                raise
        finally:
            self.waiting -= 1
        try:
            return await self._run_in_parser(job, args)
        finally:
            self._slots.release()
            slots.semaphore.release()

    async def _run_in_parser(self, job: Callable[..., T], args: tuple[Any, ...]) -> T:
        """Read one document in a warm parser (started if none is idle); see ``_Parser``."""
        self._observe("started")
        while True:
            parser = await self._idle_parser()
            self._busy.add(parser)
            keep = False
            try:
                answer = await parser.ask(job, args, self.limits.wall_seconds)
                keep = answer is not None and not answer[2]
            finally:
                self._busy.discard(parser)
                if keep and self._starter is not None:
                    self._idle.append(parser)
                else:
                    await asyncio.shield(parser.retire())
            if answer is None and parser.dead and not parser.received:
                continue  # it had died while idle and never saw this document: not its fault
            return self._answer(parser, answer)

    async def _idle_parser(self) -> _Parser:
        """A warm parser that is alive, or a new one."""
        while self._idle:
            parser = self._idle.pop()
            if not parser.dead:
                return parser
            await parser.retire()  # died while idle (killed from outside): reap it
        if self._starter is None:
            await self.start()
        parser = await asyncio.get_running_loop().run_in_executor(
            self._starter, _Parser.start, self.limits)
        parser.watch()
        self.started += 1
        return parser

    def _answer(self, parser: _Parser, answer: tuple[str, Any, bool] | None) -> Any:
        if parser.timed_out:
            self._observe("wall_limit")
            raise DocumentRefused(self.limits.wall_sentence())
        if answer is None:
            raise DocumentRefused(self._death_sentence(parser.exitcode))
        status, value, _ = answer
        self._observe(status)
        if status == "os_error":
            raise OSError(*value)
        if status != "ok":
            raise DocumentRefused(value)
        return value

    def _death_sentence(self, exitcode: int | None) -> str:
        if exitcode == -signal.SIGXCPU:
            self._observe("cpu_limit")
            return self.limits.cpu_sentence()
        self._observe("crashed")
        how = (f"signal {signal.Signals(-exitcode).name}" if exitcode and exitcode < 0
               else f"exit status {exitcode}")
        logger.warning("a parser process ended without an answer (%s)", how)
        return self.limits.crash_sentence(how)


class _Parser:
    """One warm parser process and the parent's end of its pipe.

    It reads one document at a time, for as many documents as it stays sound
    (see ``_parser_main``), so a read costs a pipe round trip instead of a fork.
    The pipe stays registered with the event loop for the parser's life (no
    register and unregister per read); its answer, or its end of file when it
    dies, is read in the loop's callback. A parser that overruns the wall time,
    or whose caller gives up, is killed; one that died or retired is replaced by
    a fresh one on the next read.
    """

    def __init__(self, process: BaseProcess, conn: Connection) -> None:
        self._process = process
        self._conn = conn
        self._loop: asyncio.AbstractEventLoop | None = None
        self._answer: asyncio.Future[tuple[str, Any, bool] | None] | None = None
        self.timed_out = False
        #: the pipe reached end of file: the process has ended (or is ending)
        self.dead = False
        #: the last request was handed to the process (a dead one's pipe refuses it)
        self.received = False
        #: how the process ended, once it has been reaped (``retire``)
        self.exitcode: int | None = None

    @classmethod
    def start(cls, limits: ParseLimits) -> _Parser:
        """Fork a parser from the forkserver (blocking: run it in the starter thread).

        The forkserver closes its copy of the parser's pipe end after the fork, so
        the parser's death is end of file on ours.
        """
        _ensure_forkserver()  # restarts a forkserver that died (a cheap check when it lives)
        ours, theirs = multiprocessing.Pipe(duplex=True)
        process = _ParserProcess(target=_parser_main, args=(theirs, limits),
                                 name="zhiyi-parser", daemon=True)
        try:
            process.start()
        finally:
            theirs.close()
        return cls(process, ours)

    def watch(self) -> None:
        """Register the pipe with the running loop (once, from the loop's thread)."""
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._conn.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            answer = pickle.loads(self._conn.recv_bytes())
        except (EOFError, OSError, pickle.UnpicklingError):
            # End of file: the parser died (mid-read, or while idle). Unregister, or the
            # loop would call again at once forever.
            answer = None
            self.dead = True
            self._unwatch()
        if self._answer is not None and not self._answer.done():
            self._answer.set_result(answer)

    def _unwatch(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._conn.fileno())
            self._loop = None

    async def ask(self, job: Callable[..., Any], args: tuple[Any, ...],
                  wall_seconds: float) -> tuple[str, Any, bool] | None:
        """Send one read; its answer, or None when the parser ended without one.

        Past ``wall_seconds``, or when the caller is cancelled, the parser is killed
        (by ``retire``). The request is at most a few KB (paths, options, a short
        document's translations), far under a pipe's buffer, so sending never blocks.
        """
        assert self._loop is not None, "watch() the parser before asking it"
        self._answer = self._loop.create_future()
        self.received = False
        try:
            self._conn.send_bytes(pickle.dumps((job, args)))
        except OSError:
            self.dead = True  # it died while idle, before its end of file was seen
            return None
        self.received = True
        try:
            async with asyncio.timeout(wall_seconds):
                return await self._answer
        except TimeoutError:
            self.timed_out = True
            return None
        finally:
            self._answer = None

    def stop(self) -> None:
        """Kill the process and close the pipe now (the server is closing)."""
        self._unwatch()
        _kill(self._process)
        self._conn.close()
        if self._answer is not None and not self._answer.done():
            self._answer.set_result(None)  # a read in progress ends without an answer

    async def retire(self) -> None:
        """End the process, reap it and release its pipe.

        It may still be reading (killed: timed out, or its caller went away), have
        died (its exit code says how), or be leaving of itself after its answer.
        """
        self._unwatch()
        if self._process.exitcode is None:
            _kill(self._process)
        await _exited(self._process)
        self.exitcode = self._process.exitcode
        self._conn.close()
        self._process.close()


class ParsedDocument:
    """A document parsed in the sandbox: its segments on disk, its write-back in a child.

    Stands in for a ``formats.Document`` in processors: ``segments()`` streams
    the spooled segments (callers run it in a thread), ``render()`` rebuilds the
    document in a child process (rebuilding reads the untrusted file again), or, for a
    small plain text whose parse kept its tokens, from those in a thread (a parser's
    round trip cost more than the whole render).
    """

    def __init__(self, sandbox: DocumentSandbox, user: str, source: Path, segments_path: Path,
                 work_dir: Path, spooled: _Spooled) -> None:
        self._sandbox = sandbox
        self._user = user
        self._source = source
        self._segments_path = segments_path
        self._work_dir = work_dir
        self.extension = spooled.extension
        #: characters, words, segments and language, measured in the same pass
        self.stats = spooled.stats
        self._result_suffix = spooled.result_suffix

    def segments(self) -> Iterator[str]:
        """The translatable segments in document order; each call starts over."""
        return _read_jsonl(self._segments_path)

    def result_name(self, file_name: str) -> str:
        """The file name of the translated result ("report.pdf" -> "report.txt")."""
        return str(Path(file_name).with_suffix(self._result_suffix))

    async def render(self, translations: Iterable[str], out: Path, *options: Any) -> Any:
        """Write the document to ``out`` with segment i replaced by the i-th translation.

        ``options`` (the output encoding) go to the format's ``render``; returns what it
        returns (segments that lost their inline formatting).
        """
        given = list(translations)
        if formats.may_keep_tokens(self.extension):  # else no hop to look for them
            done, result = await asyncio.to_thread(
                _render_kept, _tokens_file(_parse_files(self._source, self._work_dir)[1]),
                self._source, given, out, options)
            if done:
                return result  # a small plain text: rebuilt from its kept tokens, no parser
        if _fits_in_a_request(given):
            # A short document's translations go with the request: no file to write,
            # read back and remove (three thread hops and a file per task).
            return await self._sandbox.render_given(self._source, given, out, *options,
                                                    user=self._user)
        feed = self._work_dir / f"{self._source.name}.translations.jsonl"
        await asyncio.to_thread(_write_jsonl, feed, given)
        try:
            return await self._sandbox.render(self._source, feed, out, *options,
                                              user=self._user)
        finally:
            await asyncio.to_thread(feed.unlink, True)


def _parse_files(source: Path, work_dir: Path) -> tuple[Path, Path]:
    """Where a parse of ``source`` spools its segments, and where it is kept."""
    return (work_dir / f"{source.name}.segments.jsonl",
            work_dir / f"{source.name}.parsed.json")


def _tokens_file(kept_path: Path) -> Path:
    """Beside a kept parse: the tokens a small plain text renders from without its file."""
    return kept_path.with_name(kept_path.name.removesuffix(".parsed.json") + ".tokens.json")


def _render_kept(tokens_path: Path, source: Path, translations: list[str], out: Path,
                 options: tuple[Any, ...]) -> tuple[bool, Any]:
    """In a thread: render from the kept tokens, if there are any; ``(done, result)``.

    The tokens are the parser's output, read as JSON and checked for shape (never
    unpickled); no byte of the untrusted file is read here. Anything unexpected (a
    torn file, an odd shape, a render that refuses the translations) returns not done,
    and the render goes to a parser as before, which answers in its own words.
    """
    try:
        data = json.loads(tokens_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return False, None  # not kept: a format or a size the tokens are not kept for
    except (OSError, ValueError) as e:
        logger.warning("kept tokens of %s unreadable (%s); rendering in a parser",
                       source.name, e)
        return False, None
    try:
        document = formats.KeptTokens(data, source)
        return True, document.render(iter(translations), out, *options)
    except OSError:
        raise  # the machine's trouble (a full disk), as a parser's os_error is
    except Exception as e:  # the shape or the render: the parser path decides
        logger.warning("kept tokens of %s not used (%s: %s); rendering in a parser",
                       source.name, type(e).__name__, e)
        return False, None


def _fits_in_a_request(translations: list[str]) -> bool:
    """Whether the translations, pickled, surely stay under ``_MAX_REQUEST_BYTES``.

    A character is at most 4 bytes of UTF-8 and a string's pickle adds at most 9.
    """
    return (4 * sum(map(len, translations)) + 9 * len(translations)
            <= _MAX_REQUEST_BYTES - 1024)


def _write_jsonl(path: Path, items: Iterable[str]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------ processes
_CONTEXT = multiprocessing.get_context("forkserver")


class _Popen(popen_forkserver.Popen):
    """The forkserver's launcher, except that the child does not import ``__main__``.

    multiprocessing re-imports the parent's main script in every child (to find
    functions defined there). Our jobs live in this module, and an embedding
    app's main script that starts its server at import (the README's example
    does) would start it again in every parser. ``_launch`` is the standard
    library's, with the two main-module keys dropped from the preparation data.
    """

    def _launch(self, process_obj: Any) -> None:
        prep_data = spawn.get_preparation_data(process_obj._name)
        prep_data.pop("init_main_from_path", None)
        prep_data.pop("init_main_from_name", None)
        buf = io.BytesIO()
        set_spawning_popen(self)
        try:
            reduction.dump(prep_data, buf)
            reduction.dump(process_obj, buf)
        finally:
            set_spawning_popen(None)
        self.sentinel, w = multiprocessing.forkserver.connect_to_new_process(self._fds)
        parent_w = os.dup(w)  # the child's sentinel of this parent, as in the original
        self.finalizer = util.Finalize(self, util.close_fds, (parent_w, self.sentinel))
        with open(w, "wb", closefd=True) as f:
            f.write(buf.getbuffer())
        self.pid = multiprocessing.forkserver.read_signed(self.sentinel)


class _ParserProcess(_CONTEXT.Process):  # type: ignore[name-defined,misc]
    @staticmethod
    def _Popen(process_obj: Any) -> _Popen:
        return _Popen(process_obj)


def _ensure_forkserver() -> None:
    # The forkserver imports this module (and the parsers) once; children fork from it.
    # A process-wide setting: the server is the only user of multiprocessing here.
    _CONTEXT.set_forkserver_preload([__name__])
    multiprocessing.forkserver.ensure_running()


def _kill(child: BaseProcess) -> None:
    with contextlib.suppress(ProcessLookupError, ValueError, AttributeError):
        child.kill()


def _exited(child: BaseProcess) -> Awaitable[None]:
    """A future done when the child has ended (its sentinel becomes readable)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    sentinel = child.sentinel

    def ready() -> None:
        loop.remove_reader(sentinel)
        if not done.done():
            done.set_result(None)

    def forget(_: asyncio.Future[None]) -> None:
        loop.remove_reader(sentinel)

    loop.add_reader(sentinel, ready)
    done.add_done_callback(forget)
    return _reap_after(child, done)


async def _reap_after(child: BaseProcess, done: asyncio.Future[None]) -> None:
    await done
    child.join(0)  # reads the exit status the forkserver wrote; does not block


async def _unless_abandoned(work: Awaitable[T], still_wanted: Callable[[], bool] | None) -> T:
    """Await ``work``; stop it (killing its parser) if ``still_wanted()`` turns false."""
    if still_wanted is None:
        return await work
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_POLL_SECONDS)
            if done:
                return task.result()
            if not still_wanted():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                raise ParseAbandoned("the caller went away")
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
