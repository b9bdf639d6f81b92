"""The processors: what each task type does, and the registry that names them.

A processor is a coroutine ``async def fn(ctx: TaskContext) -> Path | AwaitExternal``.
It reads ``ctx.input_path``, reports ``await ctx.progress(percent, message)``,
may keep a small checkpoint, and returns the result file it wrote under
``ctx.result_dir``. It knows nothing of the app, the database or HTTP routes:
the runner (worker.py) builds the context and records what happens.

Embedding apps register their own types on a :class:`Registry`::

    registry = default_registry().copy()

    @registry.processor("shout", extensions=(".txt",), description="Upper-cases a text")
    async def shout(ctx: TaskContext) -> Path: ...
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import zhiyi_modules

zhiyi_modules.refuse_shadowed_modules()  # before the sibling imports below, which it checks

import engines
import formats
import sandbox
import translation_memory as memory

__all__ = [
    "AwaitExternal",
    "ExternalSubmitter",
    "ParamSpec",
    "PermanentError",
    "Processor",
    "Quote",
    "Registry",
    "TaskContext",
    "TaskType",
    "TransientError",
    "default_registry",
    "processor",
]

logger = logging.getLogger(__name__)


class TransientError(Exception):
    """A failure worth another attempt later (a service was down, rate limited...)."""


class PermanentError(Exception):
    """A failure another attempt will not fix; fails the task at once."""

    def __init__(self, message: str, code: str = "processor_error") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class AwaitExternal:
    """Returned by a processor that handed the work to an external service."""

    external_task_id: str


class ExternalSubmitter(Protocol):
    """Sends a task's document to the external service; returns its external task id."""

    async def __call__(
        self, input_path: Path, file_name: str, task_type: str, params: dict[str, Any]
    ) -> str: ...


ProgressFn = Callable[[float, str, str | None], Awaitable[None]]
CheckpointFn = Callable[[Any], Awaitable[None]]
EngineFactory = Callable[[str], engines.Engine]


@dataclass
class TaskContext:
    """Everything a processor may use for one attempt of one task."""

    task_id: int
    user_id: str
    task_type: str
    params: dict[str, Any]
    input_path: Path
    file_name: str
    result_dir: Path
    work_dir: Path
    #: the checkpoint saved by an earlier attempt of this run, or None
    checkpoint: Any
    attempt: int
    _progress: ProgressFn
    _save_checkpoint: CheckpointFn
    _engine: EngineFactory
    _submit_external: ExternalSubmitter | None = None
    #: batches a translate attempt keeps in flight at once (ENGINE_CONCURRENCY)
    engine_concurrency: int = 4
    #: the user's translation memory, when the runner has one
    memory: TranslationMemory | None = None
    #: set by a processor: the completed task's status message (e.g. what a glossary did)
    summary: str | None = None
    #: where the task's document is parsed (bounded child processes); see sandbox.py
    _sandbox: sandbox.DocumentSandbox | None = None

    async def progress(self, percent: float, message: str, *, stage: str | None = None) -> None:
        """Report progress; cheap to call often (the runner coalesces writes)."""
        await self._progress(percent, message, stage)

    async def save_checkpoint(self, data: Any) -> None:
        """Keep a small JSON value that a resumed attempt receives as ``ctx.checkpoint``."""
        self.checkpoint = data
        await self._save_checkpoint(data)

    def engine(self, name: str) -> engines.Engine:
        return self._engine(name)

    async def submit_external(self) -> AwaitExternal:
        """Hand this task to the external service; return the value to return."""
        if self._submit_external is None:
            raise PermanentError(
                "No external service is configured (set EXTERNAL_SERVICE_URL).",
                "external_error",
            )
        external_id = await self._submit_external(
            self.input_path, self.file_name, self.task_type, self.params
        )
        return AwaitExternal(external_id)

    def result_path(self, name: str) -> Path:
        """Where to write a result file (the runner made the folder; no I/O here)."""
        return self.result_dir / Path(name).name


class Processor(Protocol):
    """What ``@registry.processor`` accepts: a coroutine function of the context."""

    __name__: str

    def __call__(self, ctx: TaskContext) -> Awaitable[Path | AwaitExternal]: ...


@dataclass(frozen=True)
class Quote:
    """What a document weighs, for the cost rule of a task type."""

    file_size: int
    stats: formats.DocumentStats | None
    #: segments the user's translation memory already holds (not sent, not charged)
    remembered_segments: int = 0
    #: their characters
    remembered_characters: int = 0

    @property
    def all_remembered(self) -> bool:
        return bool(self.stats and self.stats.segments
                    and self.remembered_segments >= self.stats.segments)


class TranslationMemory(Protocol):
    """The user's translation memory, as the runner lends it to a processor."""

    async def lookup(self, scope: memory.Scope, keys: Sequence[str]) -> dict[str, str]:
        """Remembered translations of these source keys: ``{key: translation}``."""
        ...

    async def remember(self, entries: Sequence[memory.Entry]) -> None:
        """Remember new translations."""
        ...

    async def glossary(self, name: str) -> memory.Glossary | None:
        """The user's glossary called ``name``, if it exists."""
        ...


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a task type, as ``/api/task-types`` shows it."""

    type: str = "string"
    required: bool = False
    default: Any = None
    description: str = ""
    choices: tuple[str, ...] | None = None

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"type": self.type, "required": self.required,
                                "description": self.description}
        if self.default is not None:
            data["default"] = self.default
        if self.choices:
            data["choices"] = list(self.choices)
        return data


CostRule = Callable[[Quote, dict[str, Any]], int]


def per_thousand_chars(rate: int) -> CostRule:
    """Characters / 1000 rounded up, times ``rate``, at least 1.

    Characters of remembered segments are not counted; when every segment is
    remembered the cost is 0.
    """

    def cost(quote: Quote, params: dict[str, Any]) -> int:
        if quote.all_remembered:
            return 0
        characters = quote.stats.characters if quote.stats else quote.file_size
        characters -= quote.remembered_characters
        return max(1, math.ceil(characters / 1000) * rate)

    return cost


def flat(amount: int) -> CostRule:
    def cost(quote: Quote, params: dict[str, Any]) -> int:
        return amount

    return cost


@dataclass(frozen=True)
class TaskType:
    """A registered task type."""

    name: str
    processor: Processor | None
    description: str
    extensions: tuple[str, ...]
    params: dict[str, ParamSpec] = field(default_factory=dict)
    cost: CostRule = field(default_factory=lambda: flat(1))
    cost_description: str = "1 credit"
    #: handled entirely by the external service (no local processor)
    external: bool = False
    #: the document is parsed at create (cost from its text; bad files refused)
    parses_document: bool = True
    #: what each accepted extension becomes (".pdf" -> ".docx"); empty: not said
    results: dict[str, str] = field(default_factory=dict)


class Registry:
    """Task types by name."""

    def __init__(self) -> None:
        self._types: dict[str, TaskType] = {}

    def copy(self) -> Registry:
        clone = Registry()
        clone._types = dict(self._types)
        return clone

    def register(self, task_type: TaskType) -> None:
        if task_type.name in self._types:
            raise ValueError(f"task type {task_type.name!r} is already registered")
        fn = task_type.processor
        if fn is not None and not inspect.iscoroutinefunction(fn):
            raise TypeError(f"processor for {task_type.name!r} must be an async function")
        self._types[task_type.name] = task_type

    def processor(
        self,
        name: str,
        *,
        extensions: tuple[str, ...],
        description: str = "",
        params: dict[str, ParamSpec] | None = None,
        cost: CostRule | None = None,
        cost_description: str = "1 credit",
        parses_document: bool = True,
        results: dict[str, str] | None = None,
    ) -> Callable[[Processor], Processor]:
        """Decorator registering ``fn`` as the processor of task type ``name``."""

        def decorate(fn: Processor) -> Processor:
            self.register(TaskType(
                name=name, processor=fn, description=description or (fn.__doc__ or "").strip(),
                extensions=tuple(e.lower() for e in extensions), params=params or {},
                cost=cost or flat(1), cost_description=cost_description,
                parses_document=parses_document, results=dict(results or {}),
            ))
            return fn

        return decorate

    def external(self, name: str, *, extensions: tuple[str, ...], description: str = "",
                 params: dict[str, ParamSpec] | None = None, cost: CostRule | None = None,
                 cost_description: str = "1 credit") -> None:
        """Route task type ``name`` wholly to the external service."""
        self.register(TaskType(
            name=name, processor=None, description=description,
            extensions=tuple(e.lower() for e in extensions), params=params or {},
            cost=cost or flat(1), cost_description=cost_description, external=True,
            parses_document=False,
        ))

    def get(self, name: str) -> TaskType | None:
        return self._types.get(name)

    def __iter__(self) -> Iterator[TaskType]:
        return iter(self._types.values())

    def __contains__(self, name: object) -> bool:
        return name in self._types


_DEFAULT = Registry()


def default_registry() -> Registry:
    """The registry holding the built-in task types."""
    return _DEFAULT


processor = _DEFAULT.processor

DOCUMENT_EXTENSIONS = formats.SUPPORTED_EXTENSIONS
TRANSLATE_RATE = 1
EXTRACT_RATE_CHARS = 10_000

TRANSLATE_PARAMS = {
    "targetLang": ParamSpec(required=True, description="Language to translate into, e.g. zh"),
    "sourceLang": ParamSpec(default="auto", description="Language of the document, or auto"),
    "engine": ParamSpec(default="pseudo", description="Translation engine",
                        choices=(*engines.ENGINE_NAMES, "external")),
    "glossary": ParamSpec(description="Name of one of your glossaries for this language "
                                      "pair: its terms come out as given"),
    "memory": ParamSpec(choices=("use", "ignore"),
                        description="use (the default): segments in your translation memory "
                                    "are not sent or charged; ignore: translate everything "
                                    "again"),
    "outputEncoding": ParamSpec(choices=("source", "utf-8"),
                                description="source (the default): a text file comes back in "
                                            "its own encoding and byte-order mark; utf-8: as "
                                            "UTF-8"),
}
#: analyze quotes a translation when told its languages and engine
ANALYZE_PARAMS = {
    "targetLang": ParamSpec(description="Quote a translation into this language "
                                        "(counts segments in your translation memory)"),
    "sourceLang": ParamSpec(default="auto", description="Language of the document, or auto"),
    "engine": ParamSpec(default="pseudo", description="Engine of the quoted translation",
                        choices=(*engines.ENGINE_NAMES, "external")),
}


def memory_scope(params: dict[str, Any], language: str,
                 glossary: memory.Glossary | None = None) -> memory.Scope | None:
    """Where a translation with these params looks segments up; None: no memory.

    A source language of ``auto`` is the document's detected ``language``. Translations
    made with a glossary are remembered apart: the engine is ``NAME+<terms digest>``.
    """
    engine = str(params.get("engine") or "pseudo")
    target = params.get("targetLang")
    if engine == "external" or not target:
        return None
    source = str(params.get("sourceLang") or "auto")
    if source == "auto":
        source = language
    if glossary is not None:
        engine = f"{engine}+{memory.glossary_fingerprint(glossary.terms)}"
    return memory.Scope(source.lower(), str(target).lower(), engine)


def glossary_problem(glossary: memory.Glossary | None, name: str, source: str,
                     target: str) -> str | None:
    """Why the glossary called ``name`` cannot serve this pair, or None if it can."""
    if glossary is None:
        return f"You have no glossary called {name!r}."
    if glossary.target_lang.lower() != target.lower() or (
            source.lower() not in ("auto", "unknown")
            and glossary.source_lang.lower() != source.lower()):
        return (f"The glossary {name!r} is for {glossary.source_lang} to "
                f"{glossary.target_lang}, not {source} to {target}.")
    return None


def segment_keys(doc: formats.Document) -> list[tuple[str, int]]:
    """``(memory key, characters)`` of every segment, in order (CPU work: run in a thread)."""
    return [(memory.memory_key(segment), len(segment)) for segment in doc.segments()]


def remembered(keys: list[tuple[str, int]], found: Collection[str]) -> tuple[int, int]:
    """How many of ``keys`` are in ``found``, and their characters."""
    hits = [size for key, size in keys if key in found]
    return len(hits), sum(hits)


def translate_cost(quote: Quote, params: dict[str, Any]) -> int:
    return per_thousand_chars(TRANSLATE_RATE)(quote, params)


def extract_cost(quote: Quote, params: dict[str, Any]) -> int:
    characters = quote.stats.characters if quote.stats else quote.file_size
    return max(1, math.ceil(characters / EXTRACT_RATE_CHARS))


T = TypeVar("T")


async def _parsed(ctx: TaskContext, work: Callable[[sandbox.DocumentSandbox], Awaitable[T]]) -> T:
    """Run a read of the (untrusted) document in the sandbox; a refused one fails the task."""
    if ctx._sandbox is None:
        raise PermanentError("This task has no document sandbox to read its file in.")
    try:
        return await work(ctx._sandbox)
    except sandbox.DocumentRefused as e:
        raise PermanentError(str(e), "bad_document") from e


async def _open(ctx: TaskContext) -> sandbox.ParsedDocument:
    """The task's document, parsed: the parse kept from pricing at create if it is there
    (see ``zhiyi_server._parse_upload``), else parsed now in the sandbox."""
    if ctx._sandbox is not None and (kept := await ctx._sandbox.reopen(
            ctx.input_path, user=ctx.user_id, work_dir=ctx.work_dir)):
        return kept  # read once at create (pricing): no second parse, nothing to report
    await ctx.progress(0, "reading the document", stage="parsing")
    return await _parsed(ctx, lambda documents: documents.open(
        ctx.input_path, user=ctx.user_id, work_dir=ctx.work_dir))


@processor("analyze", extensions=DOCUMENT_EXTENSIONS, cost=flat(1),
           cost_description="1 credit", params=ANALYZE_PARAMS,
           results=dict.fromkeys(DOCUMENT_EXTENSIONS, ".analysis.json"),
           description="A JSON report: characters, words, segments, language, credit quotes")
async def analyze(ctx: TaskContext) -> Path:
    """A JSON report on the document and what each task type would cost.

    With ``targetLang`` the translate quote counts the segments the user's
    translation memory holds for that pair and engine (``fromMemory``), exactly
    as creating that translate task would charge.
    """
    doc = await _open(ctx)
    stats = doc.stats
    quote = Quote(ctx.input_path.stat().st_size, stats)
    costs = {t.name: t.cost(quote, {}) for t in _DEFAULT if not t.external}
    per_engine = dict.fromkeys((*engines.ENGINE_NAMES, "external"), costs["translate"])
    from_memory = 0
    if ctx.params.get("targetLang") and ctx.memory is not None:
        keys = await asyncio.to_thread(segment_keys, doc)
        for name in per_engine:
            scope = memory_scope({**ctx.params, "engine": name}, stats.language)
            if scope is None:
                continue
            found = await ctx.memory.lookup(scope, [key for key, _ in keys])
            hits, characters = remembered(keys, found)
            engine_quote = Quote(quote.file_size, stats, hits, characters)
            per_engine[name] = translate_cost(engine_quote, ctx.params)
            if name == (ctx.params.get("engine") or "pseudo"):
                from_memory = hits
        costs["translate"] = per_engine[ctx.params.get("engine") or "pseudo"]
    report = {
        "characters": stats.characters,
        "words": stats.words,
        "segments": stats.segments,
        "language": stats.language,
        "fromMemory": from_memory,
        "quote": costs,
        "quotePerEngine": per_engine,
    }
    out = ctx.result_path(Path(ctx.file_name).stem + ".analysis.json")
    out.write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
    await ctx.progress(100, "analysed", stage="writing")
    return out


@processor("extract", extensions=DOCUMENT_EXTENSIONS, cost=extract_cost,
           results=dict.fromkeys(DOCUMENT_EXTENSIONS, ".txt"),
           cost_description="1 credit per 10,000 characters, at least 1",
           description="The document's plain text (UTF-8)")
async def extract(ctx: TaskContext) -> Path:
    """The document's plain text."""
    out = ctx.result_path(Path(ctx.file_name).stem + ".txt")
    await ctx.progress(10, "extracting text", stage="extracting")
    await _parsed(ctx, lambda documents: documents.extract_text(
        ctx.input_path, out, user=ctx.user_id))
    await ctx.progress(100, "extracted", stage="writing")
    return out


@processor("translate", extensions=DOCUMENT_EXTENSIONS, params=TRANSLATE_PARAMS,
           results={ext: formats.result_extension(ext) for ext in DOCUMENT_EXTENSIONS},
           cost=translate_cost, cost_description="1 credit per 1,000 characters, at least 1",
           description="Translates the document segment by segment, keeping its format")
async def translate(ctx: TaskContext) -> Path | AwaitExternal:
    """Translate segment by segment; resumes from the segments already done."""
    engine_name = ctx.params.get("engine") or "pseudo"
    if engine_name == "external":
        await ctx.progress(0, "sending to the external service", stage="submitting")
        return await ctx.submit_external()
    doc = await _open(ctx)
    engine = ctx.engine(engine_name)
    return await SegmentTranslation(ctx, doc, engine).run()


class SegmentTranslation:
    """One translate attempt: concurrent batches to the engine, a journal, render.

    Up to ``ctx.engine_concurrency`` batches are in flight at once and finish in any
    order. Each finished batch appends ``[index, translation]`` lines to a journal in
    the task's work directory (flushed per batch), so a resumed attempt sends no
    segment the journal already holds, whatever order the batches ended in; the
    progress reported counts segments done. The translations are kept until the
    document is rendered (about the size of its text).
    """

    def __init__(self, ctx: TaskContext, doc: sandbox.ParsedDocument,
                 engine: engines.Engine) -> None:
        self.ctx = ctx
        self.doc = doc
        self.engine = engine
        self.journal = ctx.work_dir / "translated.jsonl"
        self.source = ctx.params.get("sourceLang") or "auto"
        self.target = str(ctx.params["targetLang"])
        self.translations: dict[int, str] = {}
        self.total = 0
        self.engine_name = str(ctx.params.get("engine") or "pseudo")
        #: where segments are looked up and remembered; None without a memory
        self.scope: memory.Scope | None = None
        self.from_memory = 0
        #: memory "ignore": translate everything again (and remember the new translations)
        self.recall = ctx.params.get("memory") != "ignore"
        self.glossary: memory.Glossary | None = None
        self.terms: memory.TermPlan | None = None
        # One journal writer at a time: lines of two batches must not interleave.
        self._journal_lock = asyncio.Lock()

    async def run(self) -> Path:
        # One hop off the loop for the count, the journal and the first chunk (for most
        # documents, all their segments) rather than one for each.
        self.total, self.translations, segments, first = await asyncio.to_thread(self._begin)
        if self.translations:
            logger.info("task %s resumes with %d of %d segments done", self.ctx.task_id,
                        len(self.translations), self.total)
        await self._report()
        await self._load_glossary()
        await self._choose_memory_scope()
        resumed = frozenset(self.translations)
        await _bounded_gather(self._batches(segments, resumed, first), self._translate_batch,
                              max(1, self.ctx.engine_concurrency))
        summary = await self._summary()
        await self.ctx.progress(99, f"writing the translated document{summary}",
                                stage="writing")
        self.ctx.summary = f"completed{summary}"
        out = self.ctx.result_path(translated_name(self.doc.result_name(self.ctx.file_name),
                                                   self.target))
        in_order = (self.translations[i] for i in range(self.total))
        encoding = str(self.ctx.params.get("outputEncoding") or "source")
        lost = await _parsed(self.ctx, lambda _: self.doc.render(in_order, out, encoding))
        if lost:
            # The text is all there; only bold, links and the like fell back to plain.
            await self.ctx.progress(
                99, f"{lost} segment{'' if lost == 1 else 's'} lost inline formatting "
                "(the engine broke its tags); the text is complete", stage="writing")
        return out

    def _begin(self) -> tuple[int, dict[int, str], Iterator[tuple[int, str]], _Chunk]:
        """(segments in all, the journal, the segments' reader, its first chunk): blocking.

        The parse counted the segments it spooled: no pass over them to count again."""
        total = self.doc.stats.segments
        journal = self._load_journal()
        segments = enumerate(self.doc.segments())
        return total, journal, segments, _next_chunk(segments, frozenset(journal), MEMORY_CHUNK)

    async def _batches(self, segments: Iterator[tuple[int, str]], resumed: frozenset[int],
                       first: _Chunk) -> AsyncIterator[_Batch]:
        """Batches of the segments to send: not journalled earlier, not in the memory.

        Segments are read (off the loop) in chunks of ``MEMORY_CHUNK``, ``first``
        already read; each chunk is looked up in the memory at once and its hits
        journalled, so the batches sent hold only misses: a revised document's few
        changed paragraphs travel together.
        """
        batch: _Batch = []
        size = 0
        chunk, more = first
        while chunk:
            known = await self._recall([text for _, text in chunk])
            if known:
                await self._journal_batch([(chunk[pos][0], text) for pos, text in known.items()])
            for pos, (index, text) in enumerate(chunk):
                if pos in known:
                    continue
                batch.append((index, text))
                size += len(text)
                if len(batch) >= BATCH_MAX_ITEMS or size >= BATCH_MAX_CHARS:
                    yield batch
                    batch, size = [], 0
            chunk, more = (await asyncio.to_thread(_next_chunk, segments, resumed, MEMORY_CHUNK)
                           if more else ([], False))
        if batch:
            yield batch

    async def _load_glossary(self) -> None:
        name = self.ctx.params.get("glossary")
        if not name:
            return
        found = await self.ctx.memory.glossary(str(name)) if self.ctx.memory else None
        problem = glossary_problem(found, str(name), self.source, self.target)
        if problem:
            raise PermanentError(problem, "bad_params")
        assert found is not None
        self.glossary, self.terms = found, memory.TermPlan(found.terms)
        if self.source == "auto":  # the glossary says what the source language is
            self.source = found.source_lang

    async def _choose_memory_scope(self) -> None:
        params = {**self.ctx.params, "engine": self.engine_name}
        if self.ctx.memory is None or memory_scope(params, "unknown") is None:
            return
        language = "unknown"
        if self.ctx.params.get("sourceLang") in (None, "", "auto"):
            # the detected language, as the quote at create used
            language = self.doc.stats.language
        self.scope = memory_scope(params, language, self.glossary)

    async def _summary(self) -> str:
        """`` (40 from memory; 7 glossary terms applied)``, or empty."""
        parts = []
        if self.from_memory:
            parts.append(f"{self.from_memory} of {self.total} segments from memory")
        if self.terms is not None:
            applied = await asyncio.to_thread(_count_terms, self.terms, self.doc.segments())
            distinct = len(set(t.casefold() for t in applied))
            parts.append(f"{len(applied)} glossary term{'' if len(applied) == 1 else 's'} "
                         f"applied ({distinct} distinct)")
        return f" ({'; '.join(parts)})" if parts else ""

    async def _translate_batch(self, batch: _Batch) -> None:
        texts = [text for _, text in batch]
        translated = await self._translate(texts)
        await self._remember(texts, translated)
        await self._journal_batch(
            [(index, text) for (index, _), text in zip(batch, translated, strict=True)])

    async def _recall(self, texts: list[str]) -> dict[int, str]:
        """Translations the memory holds, by position in ``texts``; they are not sent."""
        if self.scope is None or self.ctx.memory is None or not self.recall:
            return {}
        keys = [memory.memory_key(text) for text in texts]
        found = await self.ctx.memory.lookup(self.scope, keys)
        known = {pos: memory.reuse(found[key], texts[pos])
                 for pos, key in enumerate(keys) if key in found}
        self.from_memory += len(known)
        return known

    async def _remember(self, texts: list[str], translated: list[str]) -> None:
        if self.scope is None or self.ctx.memory is None:
            return
        scope = self.scope
        await self.ctx.memory.remember([
            memory.Entry(scope.source, scope.target, scope.engine, text, translation)
            for text, translation in zip(texts, translated, strict=True)
            if memory.normalise(text)])

    async def _journal_batch(self, done: list[tuple[int, str]]) -> None:
        # The journal is what a resumed attempt starts from; no database checkpoint is
        # written beside it (it would be one more transaction per batch, read by nobody).
        async with self._journal_lock:
            await asyncio.to_thread(self._append, done)
            self.translations.update(done)
        await self._report()

    async def _translate(self, batch: list[str]) -> list[str]:
        """The engine's translations; glossary terms through the engine's own glossary
        (DeepL) or as placeholders every engine keeps, with the target terms put back."""
        if self.terms is None or self.glossary is None:
            return await self._send(batch)
        if getattr(self.engine, "native_glossary", False):
            return await self._send(batch, glossary=self.glossary.terms)
        protected = [self.terms.protect(text) for text in batch]
        translated = await self._send([text for text, _ in protected])
        return [self.terms.restore(text, targets)
                for text, (_, targets) in zip(translated, protected, strict=True)]

    async def _send(self, batch: list[str], **glossary: Any) -> list[str]:
        try:
            result = await self.engine.translate(batch, self.source, self.target, **glossary)
        except engines.TransientEngineError as e:
            raise TransientError(str(e)) from e
        except engines.EngineError as e:
            raise PermanentError(str(e), "engine_error") from e
        if len(result) != len(batch):
            raise TransientError(
                f"the engine returned {len(result)} segments for {len(batch)}")
        return result

    async def _report(self) -> None:
        done, total = len(self.translations), self.total
        percent = 100 * done / total if total else 100
        # Leave the last percent for writing the document.
        await self.ctx.progress(min(percent, 98), f"segment {done} of {total}",
                                stage="translating")

    def _load_journal(self) -> dict[int, str]:
        """The journalled translations by segment index; a torn last line is cut off.

        A line is ``[index, translation]``; a bare string (journals written before
        batches ran concurrently) is the translation of the segment at its line number.
        """
        translations: dict[int, str] = {}
        if not self.journal.exists():
            return translations
        good_bytes = 0
        with self.journal.open("rb") as f:
            for number, line in enumerate(f):
                if not line.endswith(b"\n"):
                    break
                entry = json.loads(line)
                index, text = (number, entry) if isinstance(entry, str) else entry
                translations[int(index)] = text
                good_bytes += len(line)
        with self.journal.open("r+b") as f:
            f.truncate(good_bytes)
        return translations

    def _append(self, done: list[tuple[int, str]]) -> None:
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        with self.journal.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps([i, t], ensure_ascii=False) + "\n" for i, t in done))
            f.flush()


_Batch = list[tuple[int, str]]
#: segments read at once, and whether the document may hold more
_Chunk = tuple[_Batch, bool]
_Item = TypeVar("_Item")


async def _bounded_gather(items: AsyncIterator[_Item],
                          work: Callable[[_Item], Awaitable[None]], limit: int) -> None:
    """Run ``work(item)`` for every item, at most ``limit`` at once, items taken as slots free.

    The first failure cancels the rest and is raised as itself (not an
    ExceptionGroup), so the runner tells transient errors from permanent ones.
    """
    running: set[asyncio.Task[None]] = set()
    try:
        async with contextlib.aclosing(items):
            await _start_all(items, work, limit, running)
        while running:
            finished, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            _raise_first(finished)
    finally:
        for job in running:
            job.cancel()
        await asyncio.gather(*running, return_exceptions=True)


async def _start_all(items: AsyncIterator[_Item], work: Callable[[_Item], Awaitable[None]],
                     limit: int, running: set[asyncio.Task[None]]) -> None:
    """Start ``work`` on each item, waiting for a free slot (and failing fast) past ``limit``."""
    async for item in items:
        running.add(asyncio.ensure_future(work(item)))
        if len(running) >= limit:
            finished, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            running -= finished
            _raise_first(finished)


def _raise_first(finished: set[asyncio.Task[None]]) -> None:
    # Every exception is fetched, so none is logged later as "never retrieved".
    errors = [job.exception() for job in finished if not job.cancelled()]
    for error in errors:
        if error is not None:
            raise error


def translated_name(name: str, target: str) -> str:
    """``report.docx`` translated to zh is ``report.zh.docx``: never mistaken for the original."""
    path = Path(name)
    safe_target = "".join(c for c in target if c.isalnum() or c == "-")[:16] or "translated"
    return f"{path.stem}.{safe_target}{path.suffix}"


BATCH_MAX_CHARS = 4000
BATCH_MAX_ITEMS = 25
#: segments read and looked up in the translation memory at once
MEMORY_CHUNK = 500


def _count_terms(terms: memory.TermPlan, segments: Iterator[str]) -> list[str]:
    return [term for segment in segments for term in terms.find(segment)]


def _next_chunk(segments: Iterator[tuple[int, str]], done: frozenset[int],
                size: int) -> _Chunk:
    """The next ``size`` segments not in ``done``; False once the document ended."""
    chunk: _Batch = []
    for index, segment in segments:
        if index not in done:
            chunk.append((index, segment))
            if len(chunk) >= size:
                return chunk, True
    return chunk, False
