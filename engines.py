"""Translation engines: translate a batch of text segments behind one small interface.

This layer knows nothing of the app, the database or document formats. A caller
builds an engine with :func:`make_engine` and awaits ``engine.translate(texts,
source, target)``, which returns one translation per text, in order.

Engines:

* ``pseudo`` - pseudo-localization for testing software localization (offline).
* ``argos`` - Argos Translate, offline, when ``argostranslate`` and a model are installed.
* ``libretranslate`` - a LibreTranslate server (``POST {url}/translate``).
* ``openai`` - an OpenAI-compatible chat API (``POST {base}/chat/completions``).
* ``deepl`` - DeepL's API v2 (``POST {url}/v2/translate``), with its own glossaries.

HTTP engines protect placeholders, inline tags, entities and URLs with tokens
(:func:`protect_placeholders`), send segments in batches (:func:`batch_segments`),
retry rate limits, server errors, timeouts and malformed answers with backoff,
and raise :class:`TransientEngineError` once their retries are spent or
:class:`EngineError` for failures that retrying cannot fix.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email.utils
import functools
import html
import json
import logging
import math
import re
import zipfile
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, TypeVar, cast, runtime_checkable

import aiohttp
from yarl import URL

__all__ = [
    "ENGINE_NAMES",
    "ENGINE_PREFERENCE",
    "AdaptiveLimit",
    "Engine",
    "EngineError",
    "EngineLimits",
    "EngineSettings",
    "EngineStatus",
    "Glossary",
    "RateLimited",
    "TransientEngineError",
    "UnknownEngine",
    "batch_segments",
    "check_argos_model",
    "engine_statuses",
    "install_argos",
    "make_engine",
    "protect_placeholders",
    "pseudo_localize",
    "restore_placeholders",
]

logger = logging.getLogger(__name__)

#: Engines this module builds; ``external`` is handled by the server, not here.
ENGINE_NAMES: tuple[str, ...] = ("pseudo", "argos", "libretranslate", "openai", "deepl")

_T = TypeVar("_T")

# A Retry-After of an hour (a daily quota) should fail the batch and let the task-level
# retry take over, not pin a worker; we wait at most this long between attempts.
_MAX_RETRY_WAIT_SECONDS = 60.0
# Above this many characters pseudo-localization moves to a thread: the regex pass
# over a whole book would otherwise stall the event loop (and every SSE stream) for
# tens of milliseconds.
_PSEUDO_THREAD_THRESHOLD = 50_000
_PSEUDO_EXPANSION = 0.3
_ERROR_DETAIL_MAX = 300

_LIBRE_LABEL = "LibreTranslate"
_OPENAI_LABEL = "OpenAI-compatible API"
_ARGOS_LABEL = "Argos Translate"
_DEEPL_LABEL = "DeepL"


# --------------------------------------------------------------------------- errors


class EngineError(Exception):
    """A permanent engine failure; ``str()`` is a sentence a person can act on.

    Example: ``LibreTranslate rejected the API key (HTTP 403): Invalid API key.``
    """


class TransientEngineError(EngineError):
    """A failure worth retrying later: rate limited, a 5xx, a timeout, a garbled answer.

    Engines raise it once their own retries are exhausted. ``retry_after`` is the
    delay (seconds) the service last asked for, if it said.
    """

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimited(TransientEngineError):
    """The service said "too many requests" (429, or an answer carrying Retry-After).

    Not a failure of the batch: the engine's concurrency limit shrinks and the batch
    waits its turn again, without spending one of its retries.
    """


class UnknownEngine(ValueError):
    """The engine name is not one of :data:`ENGINE_NAMES`."""


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class EngineSettings:
    """Configuration for every engine; the server builds it once from its config."""

    libretranslate_url: str | None = None
    libretranslate_api_key: str | None = None
    #: Base URL as the OpenAI SDK takes it, e.g. ``http://127.0.0.1:9999/v1``.
    openai_base_url: str | None = None
    #: Optional: local OpenAI-compatible servers (llama.cpp, Ollama, vLLM) need none.
    openai_api_key: str | None = None
    openai_model: str = "gpt-4o-mini"
    deepl_api_key: str | None = None
    #: ``https://api-free.deepl.com`` or ``https://api.deepl.com``; None: chosen by the key
    #: (free keys end in ``:fx``).
    deepl_api_url: str | None = None
    #: Total seconds for one HTTP request, connect to last byte.
    request_timeout: float = 60.0
    #: Extra attempts per batch for 429, 5xx, timeouts and malformed answers.
    max_retries: int = 4
    #: Backoff is ``retry_base_seconds * 2**attempt``; a Retry-After header wins.
    retry_base_seconds: float = 1.0
    batch_max_chars: int = 4000
    batch_max_items: int = 25
    #: Requests in flight to one engine across every task of the process (the AIMD ceiling).
    max_inflight: int = 16
    #: Total seconds one batch may spend waiting out rate limits before it fails (transient).
    rate_limit_patience: float = 600.0


@dataclass(frozen=True)
class EngineStatus:
    """Whether an engine can be used with the current settings, and if not, why."""

    name: str
    available: bool
    #: Why it is not available, as a sentence; ``None`` when available.
    reason: str | None
    #: Language pairs ``(source, target)`` an offline engine has installed (argos only).
    pairs: tuple[tuple[str, str], ...] = ()


@runtime_checkable
class Engine(Protocol):
    """What every engine offers."""

    name: str
    #: True for engines that cost money per request; informational.
    paid: bool

    async def translate(self, texts: Sequence[str], source: str, target: str) -> list[str]:
        """Translate ``texts`` from ``source`` (or ``"auto"``) to ``target``.

        Returns exactly one string per text, in order.
        """
        ...


# --------------------------------------------------------------------------- placeholders

# Token shape for protected spans: ``[X0X]``. Weblate's machine-translation layer uses
# the same shape (weblate/machinery/base.py, ``format_replacement``) for LibreTranslate,
# DeepL and LLM backends: it is plain ASCII, so SentencePiece models (Argos, which powers
# LibreTranslate) copy it instead of emitting <unk>, which fancy brackets such as ``⟦0⟧``
# risk; it is not a word in any language, so nothing translates it; and LLMs keep it when
# told to. Restoring tolerates the case and spacing changes MT engines make.
_TOKEN_FORMAT = "[X{}X]"
_TOKEN_RE = re.compile(r"\[\s*X\s*(\d+)\s*X\s*\]", re.IGNORECASE)

_PLACEHOLDER_RE = re.compile(
    "|".join(
        [
            # Our own token shape, so a literal "[X0X]" in a document is protected too
            # and can never be confused with a token we made.
            r"(?i:\[\s*X\s*\d+\s*X\s*\])",
            # URLs, without the sentence punctuation that follows them.
            r"(?:https?|ftp)://[^\s<>\"']*[^\s<>\"'.,;:!?)\]}]",
            r"\{\{.*?\}\}",  # {{ jinja }}, {{handlebars}}
            r"\$\{[^{}]*\}",  # ${js}
            r"\{[^{}\s]*\}",  # {name} {0} {0:.2f} {}
            # printf: %s %d %5.2f %1$s %(name)s %%; no space flag, or "50% done" would match.
            r"%(?:\([^()\s]+\))?[-+#0]*(?:\d+\$)?(?:\d+|\*)?(?:\.\d+)?[sdifuxXoeEgGcr%]",
            r"<!--.*?-->",
            r"</?[A-Za-z][\w:.-]*(?:\s[^<>]*)?/?>",  # <b>, </b>, <br/>, <a href="...">
            r"&(?:[A-Za-z][A-Za-z0-9]{1,31}|#\d{1,7}|#[xX][0-9A-Fa-f]{1,6});",
            # Private-use characters: markers other layers put around protected spans.
            "[\ue000-\uf8ff]+",
        ]
    ),
    re.DOTALL,
)


# Inline tags that formats/ puts in a segment (``<x1>bold</x1>``, ``<x2/>``) mark
# formatting, not placeholders: an engine that reads tags gets them as written
# (``inline_tags="native"``: LibreTranslate's HTML mode, an LLM told to keep them), the
# others as tokens. Either way a lost or moved tag is no error here: formats/ maps back
# what comes, and falls back to the text without its inline formatting.
_INLINE_TAG_RE = re.compile(r"<\s*/?\s*[xX]\d{1,4}\s*/?\s*>")


def _inline_tag_tokens(protected: str, originals: list[str], native: bool) -> tuple[str, set[int]]:
    """The indexes of `originals` that are inline tags; with `native`, the text with
    those tokens put back as the tags themselves."""
    tags = {i for i, original in enumerate(originals) if _INLINE_TAG_RE.fullmatch(original)}
    if native and tags:
        protected = _TOKEN_RE.sub(
            lambda m: originals[int(m.group(1))] if int(m.group(1)) in tags else m.group(),
            protected,
        )
    return protected, tags


def _escape_around_tags(text: str) -> str:
    """HTML-escape the text between inline tags (for an engine's HTML/XML mode)."""
    parts = _INLINE_TAG_RE.split(text)
    tags = _INLINE_TAG_RE.findall(text)
    out = [html.escape(parts[0], quote=False)]
    for tag, part in zip(tags, parts[1:], strict=True):
        out += [tag, html.escape(part, quote=False)]
    return "".join(out)


def _unescape_around_tags(text: str) -> str:
    parts = _INLINE_TAG_RE.split(text)
    tags = _INLINE_TAG_RE.findall(text)
    out = [html.unescape(parts[0])]
    for tag, part in zip(tags, parts[1:], strict=True):
        out += [tag, html.unescape(part)]
    return "".join(out)


def protect_placeholders(text: str) -> tuple[str, list[str]]:
    """Replace placeholders, inline tags, entities, URLs and private-use markers with tokens.

    Returns the protected text, with tokens ``[X0X]``, ``[X1X]``, ... in order, and the
    original spans, so that ``restore_placeholders(*protect_placeholders(t)) == t``.
    """
    originals: list[str] = []

    def token(match: re.Match[str]) -> str:
        originals.append(match.group())
        return _TOKEN_FORMAT.format(len(originals) - 1)

    return _PLACEHOLDER_RE.sub(token, text), originals


def restore_placeholders(
    text: str, originals: list[str], optional: Collection[int] = ()
) -> str:
    """Put the original spans back in place of the tokens of a translated text.

    Raises :class:`TransientEngineError` (an :class:`EngineError`) when a token went
    missing, was duplicated or was invented: engines treat that as a garbled answer
    and retry the batch. Tokens whose index is in `optional` (inline tags) may go
    missing or repeat.
    """
    seen: list[int] = []

    def original(match: re.Match[str]) -> str:
        index = int(match.group(1))
        seen.append(index)
        return originals[index] if index < len(originals) else match.group()

    restored = _TOKEN_RE.sub(original, text)
    required = [i for i in seen if i not in optional]
    if sorted(required) != [i for i in range(len(originals)) if i not in optional]:
        raise TransientEngineError(_token_problem(required, originals, optional))
    return restored


def _token_problem(
    seen: list[int], originals: list[str], optional: Collection[int] = ()
) -> str:
    """Say, in a sentence, what went wrong with the tokens of one translation."""
    missing = [originals[i] for i in range(len(originals)) if i not in seen and i not in optional]
    if missing:
        return f"The translation lost the placeholder {missing[0]!r}."
    invented = [i for i in seen if i >= len(originals)]
    if invented:
        return f"The translation contains a placeholder token [X{invented[0]}X] that was not sent."
    repeated = next(i for i in seen if seen.count(i) > 1)
    return f"The translation repeats the placeholder {originals[repeated]!r}."


def _wrong_count(got: int, sent: int) -> str:
    """``"2 translations for 3 segments"``, for errors about a miscounted answer."""
    return (
        f"{got} translation{'' if got == 1 else 's'} for {sent} segment{'' if sent == 1 else 's'}"
    )


def _worth_sending(protected: str) -> bool:
    """Whether a protected segment has any words; "{0}", "42" or "---" need no engine."""
    return any(ch.isalpha() for ch in _INLINE_TAG_RE.sub("", _TOKEN_RE.sub("", protected)))


# --------------------------------------------------------------------------- pseudo

_ACCENTED = str.maketrans(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "áƀçðéƒĝĥíĵķļɱñóþǫŕšţúṽŵẋýžÁƁÇÐÉƑĜĤÍĴĶĻṀÑÓÞǪŔŠŢÚṼŴẊÝŽ",
)
# A middle dot pads: "~" would be strikethrough in Markdown, "!" reads as real punctuation.
_PSEUDO_PAD = "·"


def pseudo_localize(text: str) -> str:
    """Pseudo-localize ``text``: accented look-alikes, ~30 % padding, ``[`` ``]`` around.

    Placeholders, inline tags, entities, URLs and private-use characters are kept
    verbatim, as is leading and trailing whitespace; blank text is returned as is.
    Deterministic: the same text always gives the same result.
    """
    core = text.strip()
    if not core:
        return text
    start = len(text) - len(text.lstrip())
    lead, trail = text[:start], text[start + len(core) :]
    parts: list[str] = []
    pos = 0
    for match in _PLACEHOLDER_RE.finditer(core):
        parts.append(core[pos : match.start()].translate(_ACCENTED))
        parts.append(match.group())
        pos = match.end()
    parts.append(core[pos:].translate(_ACCENTED))
    padding = _PSEUDO_PAD * math.ceil(len(core) * _PSEUDO_EXPANSION)
    return f"{lead}[{''.join(parts)} {padding}]{trail}"


def _pseudo_all(texts: list[str]) -> list[str]:
    return [pseudo_localize(text) for text in texts]


class _PseudoEngine:
    """Pseudo-localization; offline, free, instant."""

    name = "pseudo"
    paid = False

    async def translate(self, texts: Sequence[str], source: str, target: str) -> list[str]:
        items = list(texts)
        if sum(map(len, items)) > _PSEUDO_THREAD_THRESHOLD:
            return await asyncio.to_thread(_pseudo_all, items)
        return _pseudo_all(items)


# --------------------------------------------------------------------------- batching


def batch_segments(texts: Iterable[str], max_chars: int, max_items: int) -> Iterator[list[str]]:
    """Group ``texts``, in order, into lists of at most ``max_items`` and ``max_chars``.

    Nothing is dropped, split or reordered: a single text longer than ``max_chars``
    travels alone in its own batch.
    """
    if max_chars < 1 or max_items < 1:
        raise ValueError("max_chars and max_items must be at least 1")
    batch: list[str] = []
    size = 0
    for text in texts:
        if batch and (len(batch) >= max_items or size + len(text) > max_chars):
            yield batch
            batch, size = [], 0
        batch.append(text)
        size += len(text)
    if batch:
        yield batch


# --------------------------------------------------------------------------- retries


def _parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta seconds or HTTP date), capped."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), _MAX_RETRY_WAIT_SECONDS)


def _backoff_seconds(attempt: int, settings: EngineSettings, retry_after: float | None) -> float:
    """The wait before attempt ``attempt + 1``; the service's Retry-After wins."""
    if retry_after is not None:
        return retry_after
    return min(settings.retry_base_seconds * 2**attempt, _MAX_RETRY_WAIT_SECONDS)


async def _with_retries(
    attempt: Callable[[], Awaitable[_T]],
    settings: EngineSettings,
    limit: AdaptiveLimit | None = None,
) -> _T:
    """Await ``attempt()`` in a slot of ``limit`` until it stops raising, or gives up.

    Failures (5xx, timeouts, garbled answers) spend one of ``max_retries``; a rate
    limit (:class:`RateLimited`) spends none: it shrinks the engine's limit and the
    batch waits (Retry-After, or a doubling pause) for another slot, up to
    ``rate_limit_patience`` seconds in all.
    """
    limit = limit or AdaptiveLimit(1_000_000)
    attempts = max(settings.max_retries, 0) + 1
    failures = rate_limits = 0
    waited = 0.0
    while True:
        async with limit.slot() as slot:
            try:
                return await attempt()
            except RateLimited as e:
                slot.rate_limited()
                error: TransientEngineError = e
            except TransientEngineError as e:
                error = e
        if isinstance(error, RateLimited):
            # The first retry without Retry-After only waits for a slot under the cut
            # limit: that is the backpressure. Later ones back off, doubling.
            delay = (_backoff_seconds(rate_limits - 1, settings, error.retry_after)
                     if rate_limits or error.retry_after is not None else 0.0)
            rate_limits += 1
            if waited + delay > settings.rate_limit_patience:
                raise TransientEngineError(
                    f"{error} Still rate limited after waiting {waited:g} s.",
                    retry_after=error.retry_after,
                ) from error
            waited += delay
        else:
            failures += 1
            if failures >= attempts:
                if attempts == 1:
                    raise error
                raise TransientEngineError(
                    f"{error} Gave up after {attempts} attempts.", retry_after=error.retry_after
                ) from error
            delay = _backoff_seconds(failures - 1, settings, error.retry_after)
        logger.warning("%s Retrying in %.2f s.", error, delay)
        await asyncio.sleep(delay)


# --------------------------------------------------------------------------- limits


class AdaptiveLimit:
    """How many requests may be in flight to one engine: AIMD, as TCP does.

    Starts at ``maximum``. A rate-limited answer multiplies the limit by
    ``DECREASE`` (0.8: halving, or CUBIC's 0.7, left a capped engine partly idle for
    several rounds after each probe; bench/engine_figures.py), once per round:
    rejections of requests sent before the last cut do not cut again. Every successful answer adds
    ``1 / limit`` (additive increase: about one more slot per round of successes),
    up to ``maximum``; within one slot of the limit that was last rejected, growth
    is ``PLATEAU`` times slower, so a capped engine is probed rarely (CUBIC's
    plateau). Waiters get slots in arrival order.
    """

    DECREASE = 0.8
    #: growth is this many times slower within one slot of the last rejected limit
    PLATEAU = 8

    def __init__(self, maximum: int, *, minimum: int = 1) -> None:
        if maximum < 1:
            raise ValueError("maximum must be at least 1")
        self.maximum = maximum
        self.minimum = max(1, min(minimum, maximum))
        self.limit = float(maximum)
        self.inflight = 0
        #: highest number of requests seen in flight at once (for tests and benchmarks)
        self.peak = 0
        #: how many times the limit was cut
        self.decreases = 0
        self._round = 0
        #: the limit when the engine last said no (CUBIC's W_max)
        self._rejected_at = float("inf")
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def slots(self) -> int:
        """Whole requests allowed in flight now."""
        return max(self.minimum, int(self.limit))

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[_Slot]:
        """Hold one slot for the duration of the block (one request)."""
        await self._acquire()
        held = _Slot(self, self._round)
        try:
            yield held
        finally:
            if held.ok and held.round == self._round:
                self._grow()  # answers to requests sent before a cut say nothing new
            self.inflight -= 1
            self._wake()

    async def _acquire(self) -> None:
        if self.inflight < self.slots and not self._waiters:
            self._take()
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.inflight -= 1  # granted just as we were cancelled: give it back
                self._wake()
            else:
                self._waiters.remove(waiter)
            raise

    def _take(self) -> None:
        self.inflight += 1
        self.peak = max(self.peak, self.inflight)

    def _wake(self) -> None:
        while self._waiters and self.inflight < self.slots:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._take()
                waiter.set_result(None)

    def _grow(self) -> None:
        step = 1.0 / self.limit
        if self.limit + 1 > self._rejected_at:
            step /= self.PLATEAU  # near where the engine said no: probe rarely
        self.limit = min(float(self.maximum), self.limit + step)

    def _shrink(self, round_: int) -> None:
        if round_ != self._round:
            return  # this round already paid for the rejection
        self._round += 1
        self.decreases += 1
        self._rejected_at = self.limit
        self.limit = max(float(self.minimum), self.limit * self.DECREASE)
        logger.info("engine rate limited: at most %d requests in flight now", self.slots)


class _Slot:
    """One request's hold on an :class:`AdaptiveLimit`; says how the request went."""

    def __init__(self, owner: AdaptiveLimit, round_: int) -> None:
        self._owner = owner
        #: the limit's round when the request was sent
        self.round = round_
        self.ok = True

    def rate_limited(self) -> None:
        self.ok = False
        self._owner._shrink(self.round)


class EngineLimits:
    """One :class:`AdaptiveLimit` per engine name, shared by every task of a process."""

    def __init__(self, max_inflight: int) -> None:
        self.max_inflight = max_inflight
        self._limits: dict[str, AdaptiveLimit] = {}

    def __getitem__(self, engine: str) -> AdaptiveLimit:
        if engine not in self._limits:
            self._limits[engine] = AdaptiveLimit(self.max_inflight)
        return self._limits[engine]


# --------------------------------------------------------------------------- shared pipeline

_SendBatch = Callable[[list[str]], Awaitable[list[str]]]


async def _translate_protected(
    texts: Sequence[str],
    send: _SendBatch,
    settings: EngineSettings,
    label: str,
    limit: AdaptiveLimit | None = None,
    inline_tags: str = "tokens",
) -> list[str]:
    """Protect placeholders, send each distinct segment once in batches, restore.

    Segments without words are returned untouched, and identical segments (after
    protection) are sent once: both save money on paid engines. A batch whose answer
    has the wrong count or lost a token is retried like a transport failure. Inline
    tags travel as tokens, or as written with ``inline_tags="native"``.
    """
    prepared: list[tuple[str, list[str], set[int]]] = []
    for text in texts:
        protected, originals = protect_placeholders(text)
        protected, tags = _inline_tag_tokens(protected, originals, inline_tags == "native")
        prepared.append((protected, originals, tags))
    pending: dict[str, list[str]] = {}
    optional: dict[str, set[int]] = {}
    for protected, originals, tags in prepared:
        if _worth_sending(protected):
            pending.setdefault(protected, originals)
            optional.setdefault(protected, tags)

    translated: dict[str, str] = {}
    for batch in batch_segments(pending, settings.batch_max_chars, settings.batch_max_items):

        async def attempt(batch: list[str] = batch) -> list[str]:
            answer = await send(batch)
            if len(answer) != len(batch):
                raise TransientEngineError(
                    f"{label} returned {_wrong_count(len(answer), len(batch))}."
                )
            for protected, translation in zip(batch, answer, strict=True):
                try:
                    restore_placeholders(translation, pending[protected], optional[protected])
                except TransientEngineError as e:
                    raise TransientEngineError(f"{label} did not keep the placeholders. {e}") from e
            return answer

        logger.debug("%s: sending %d segments", label, len(batch))
        answer = await _with_retries(attempt, settings, limit)
        translated.update(zip(batch, answer, strict=True))

    return [
        restore_placeholders(translated[protected], originals, tags)
        if protected in translated
        else text
        for text, (protected, originals, tags) in zip(texts, prepared, strict=True)
    ]


# --------------------------------------------------------------------------- HTTP helpers


@dataclass(frozen=True)
class _Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes


async def _post_json(
    session: aiohttp.ClientSession,
    url: str,
    payload: dict[str, Any],
    headers: Mapping[str, str],
    settings: EngineSettings,
    label: str,
) -> _Reply:
    """POST JSON and read the whole answer; transport failures become transient errors."""
    timeout = aiohttp.ClientTimeout(total=settings.request_timeout)
    try:
        async with session.post(url, json=payload, headers=headers, timeout=timeout) as resp:
            return _Reply(resp.status, resp.headers, await resp.read())
    except aiohttp.InvalidURL as e:
        raise EngineError(f"{label} URL {url!r} is not a valid URL.") from e
    except TimeoutError as e:
        raise TransientEngineError(
            f"{label} did not answer within {settings.request_timeout:g} seconds."
        ) from e
    except aiohttp.ClientError as e:
        raise TransientEngineError(f"Could not reach {label}: {e or type(e).__name__}.") from e


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError):
        return None


def _error_detail(body: bytes) -> str:
    """The service's own error message from a JSON or text body, shortened."""
    data = _json_or_none(body)
    detail: Any = None
    if isinstance(data, dict):
        detail = data.get("error") or data.get("message") or data.get("detail")
        if isinstance(detail, dict):
            detail = detail.get("message")
    if not isinstance(detail, str):
        detail = body.decode("utf-8", "replace")
    detail = " ".join(detail.split())
    if len(detail) > _ERROR_DETAIL_MAX:
        detail = detail[: _ERROR_DETAIL_MAX - 1] + "…"
    return detail


def _sentence(head: str, detail: str = "") -> str:
    """``head: detail.`` as one sentence, whatever punctuation the detail brings."""
    text = f"{head}: {detail}" if detail else head
    return text if text.endswith((".", "!", "?", "…")) else text + "."


def _raise_for_retryable(reply: _Reply, label: str) -> None:
    """Raise TransientEngineError for 408, 429 and 5xx answers.

    A 429, or a 503 that says when to come back (Retry-After), is :class:`RateLimited`.
    """
    if reply.status not in (408, 429) and reply.status < 500:
        return
    what = "rate-limited the request" if reply.status == 429 else "failed"
    retry_after = _parse_retry_after(reply.headers.get("Retry-After"))
    error = RateLimited if reply.status == 429 or (
        reply.status == 503 and retry_after is not None) else TransientEngineError
    raise error(
        _sentence(f"{label} {what} (HTTP {reply.status})", _error_detail(reply.body)),
        retry_after=retry_after,
    )


def _json_answer(reply: _Reply, label: str) -> Any:
    data = _json_or_none(reply.body)
    if data is None:
        raise TransientEngineError(f"{label} answered with something that is not JSON.")
    return data


def _required_url(value: str | None, variable: str) -> str:
    if not value:
        raise EngineError(f"Set {variable}.")
    return value.rstrip("/")


# --------------------------------------------------------------------------- LibreTranslate


class _LibreTranslateEngine:
    """A LibreTranslate server; ``q`` is sent as an array, one request per batch."""

    name = "libretranslate"
    paid = True

    def __init__(
        self,
        settings: EngineSettings,
        session: aiohttp.ClientSession,
        limit: AdaptiveLimit | None = None,
    ) -> None:
        self._settings = settings
        self._session = session
        self._limit = limit
        base = _required_url(settings.libretranslate_url, "LIBRETRANSLATE_URL")
        self._url = f"{base}/translate"

    async def translate(self, texts: Sequence[str], source: str, target: str) -> list[str]:
        send = functools.partial(self._send, source=source or "auto", target=target)
        return await _translate_protected(
            texts, send, self._settings, _LIBRE_LABEL, self._limit, inline_tags="native"
        )

    async def _send(self, batch: list[str], source: str, target: str) -> list[str]:
        # Segments with inline tags go in HTML mode, which moves tags with their words.
        tagged = any(_INLINE_TAG_RE.search(text) for text in batch)
        sent = [_escape_around_tags(text) for text in batch] if tagged else batch
        payload: dict[str, Any] = {"q": sent, "source": source, "target": target}
        payload["format"] = "html" if tagged else "text"
        if self._settings.libretranslate_api_key:
            payload["api_key"] = self._settings.libretranslate_api_key
        reply = await _post_json(
            self._session, self._url, payload, {}, self._settings, _LIBRE_LABEL
        )
        _raise_for_retryable(reply, _LIBRE_LABEL)
        if reply.status >= 300:
            raise EngineError(_libre_rejection(reply))
        data = _json_answer(reply, _LIBRE_LABEL)
        out = data.get("translatedText") if isinstance(data, dict) else None
        if isinstance(out, str) and len(batch) == 1:  # servers that unwrap a 1-item q
            out = [out]
        if not isinstance(out, list) or not all(isinstance(item, str) for item in out):
            raise TransientEngineError(f"{_LIBRE_LABEL} answered without a list of translations.")
        return [_unescape_around_tags(text) for text in out] if tagged else out


def _libre_rejection(reply: _Reply) -> str:
    detail = _error_detail(reply.body)
    if reply.status == 403:
        head = f"{_LIBRE_LABEL} rejected the API key (HTTP 403)"
    elif reply.status == 400:
        head = f"{_LIBRE_LABEL} rejected the request (HTTP 400)"
    else:
        head = f"{_LIBRE_LABEL} answered HTTP {reply.status}; check LIBRETRANSLATE_URL"
    return _sentence(head, detail)


# --------------------------------------------------------------------------- OpenAI-compatible

# Protocol: the user message is JSON {"source", "target", "segments": {"1": text, ...}}
# and the answer must be JSON {"segments": {"1": translation, ...}} (response_format
# json_object). Numbered keys rather than a bare array: the model keeps alignment
# better when each segment has a visible number, and a merged or dropped segment shows
# up as a missing number instead of silently shifting every later translation.
# No temperature is sent: reasoning models reject any value but the default.
_OPENAI_SYSTEM_PROMPT = """\
You are a professional translator. The user sends a JSON object with "source" (a \
language code, or "auto": detect it), "target" (a language code) and "segments" (an \
object mapping numbers to texts). Translate every segment into the target language.
Answer with only a JSON object {"segments": {...}} that has exactly the same numbers \
as keys, each mapped to the translation of the segment with that number. Never merge, \
split, drop or add segments. Keep tokens such as [X0X] exactly as written, where they \
belong in the translation. Segments may hold inline tags such as <x1>...</x1> and \
<x2/>: keep each one exactly once, around the translated words they mark. Keep line \
breaks and leading or trailing spaces. A segment that needs no translation is returned \
unchanged."""


class _OpenAIEngine:
    """An OpenAI-compatible chat completions API (OpenAI, llama.cpp, Ollama, vLLM, ...)."""

    name = "openai"
    paid = True

    def __init__(
        self,
        settings: EngineSettings,
        session: aiohttp.ClientSession,
        limit: AdaptiveLimit | None = None,
    ) -> None:
        self._settings = settings
        self._session = session
        self._limit = limit
        base = _required_url(settings.openai_base_url, "OPENAI_BASE_URL")
        self._url = f"{base}/chat/completions"
        self._headers = (
            {"Authorization": f"Bearer {settings.openai_api_key}"}
            if settings.openai_api_key
            else {}
        )

    async def translate(self, texts: Sequence[str], source: str, target: str) -> list[str]:
        send = functools.partial(self._send, source=source or "auto", target=target)
        return await _translate_protected(
            texts, send, self._settings, _OPENAI_LABEL, self._limit, inline_tags="native"
        )

    async def _send(self, batch: list[str], source: str, target: str) -> list[str]:
        numbered = {str(number): text for number, text in enumerate(batch, 1)}
        request = {"source": source, "target": target, "segments": numbered}
        payload = {
            "model": self._settings.openai_model,
            "messages": [
                {"role": "system", "content": _OPENAI_SYSTEM_PROMPT},
                {"role": "user", "content": json.dumps(request, ensure_ascii=False)},
            ],
            "response_format": {"type": "json_object"},
        }
        reply = await _post_json(
            self._session, self._url, payload, self._headers, self._settings, _OPENAI_LABEL
        )
        if reply.status == 429 and _is_quota_exhausted(reply.body):
            raise EngineError(
                _sentence(
                    f"{_OPENAI_LABEL} says the account has no quota left (HTTP 429)",
                    _error_detail(reply.body),
                )
            )
        _raise_for_retryable(reply, _OPENAI_LABEL)
        if reply.status >= 300:
            raise EngineError(_openai_rejection(reply))
        return _parse_segments(_chat_content(_json_answer(reply, _OPENAI_LABEL)), len(batch))


def _is_quota_exhausted(body: bytes) -> bool:
    """OpenAI answers 429 also for an empty balance, which no retry will fix."""
    data = _json_or_none(body)
    error = data.get("error") if isinstance(data, dict) else None
    return isinstance(error, dict) and "insufficient_quota" in (
        error.get("code"),
        error.get("type"),
    )


def _openai_rejection(reply: _Reply) -> str:
    detail = _error_detail(reply.body)
    if reply.status == 401:
        head = f"{_OPENAI_LABEL} rejected the key (HTTP 401); check OPENAI_API_KEY"
    elif reply.status == 403:
        head = f"{_OPENAI_LABEL} refused access (HTTP 403)"
    elif reply.status == 404:
        head = (
            f"{_OPENAI_LABEL} has no such endpoint or model (HTTP 404); check OPENAI_BASE_URL "
            "(it usually ends in /v1) and OPENAI_MODEL"
        )
    else:
        head = f"{_OPENAI_LABEL} rejected the request (HTTP {reply.status})"
    return _sentence(head, detail)


def _chat_content(data: Any) -> str:
    """``choices[0].message.content`` of a chat completion, or a transient error."""
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        content = None
    if not isinstance(content, str):
        raise TransientEngineError(f"{_OPENAI_LABEL} answered without a message.")
    return content


_FENCE_RE = re.compile(r"^\s*```[\w-]*\s*\n(.*)\n\s*```\s*$", re.DOTALL)


def _parse_segments(content: str, expected: int) -> list[str]:
    """The translations from the model's JSON, in order; garbled answers are transient."""
    fenced = _FENCE_RE.match(content)  # local models wrap JSON in ``` despite being told
    data = _json_or_none((fenced.group(1) if fenced else content).encode())
    segments = data.get("segments") if isinstance(data, dict) else data
    if isinstance(segments, dict):
        numbers = {str(number) for number in range(1, expected + 1)}
        if set(segments) != numbers:
            raise TransientEngineError(
                f"{_OPENAI_LABEL} returned {_wrong_count(len(segments), expected)}"
                + (" with other numbers." if len(segments) == expected else ".")
            )
        segments = [segments[str(number)] for number in range(1, expected + 1)]
    if not isinstance(segments, list) or not all(isinstance(s, str) for s in segments):
        raise TransientEngineError(
            f"{_OPENAI_LABEL} did not answer with a JSON object of translated segments."
        )
    return segments


# --------------------------------------------------------------------------- DeepL

#: Term pairs ``(source term, target term)`` of a glossary, for engines that take one.
Glossary = Sequence[tuple[str, str]]


class _DeepLEngine:
    """DeepL's API v2: ``POST /v2/translate`` with a list of texts; its own glossaries.

    Inline tags go with ``tag_handling=xml``. With a glossary the engine creates it
    once (``POST /v2/glossaries``, TSV entries) and names it in every request; DeepL
    then needs the source language. 456 (quota exceeded) is a permanent failure.
    """

    name = "deepl"
    paid = True
    #: takes a glossary itself (others get terms as placeholders from the processor)
    native_glossary = True

    def __init__(
        self,
        settings: EngineSettings,
        session: aiohttp.ClientSession,
        limit: AdaptiveLimit | None = None,
    ) -> None:
        self._settings = settings
        self._session = session
        self._limit = limit
        key = settings.deepl_api_key or ""
        default = "https://api-free.deepl.com" if key.endswith(":fx") else "https://api.deepl.com"
        self._base = (settings.deepl_api_url or default).rstrip("/")
        self._headers = {"Authorization": f"DeepL-Auth-Key {key}"}
        #: glossary ids made by this engine, by (source, target, terms)
        self._glossaries: dict[tuple[str, str, tuple[tuple[str, str], ...]], str] = {}

    async def translate(
        self, texts: Sequence[str], source: str, target: str, glossary: Glossary | None = None
    ) -> list[str]:
        glossary_id = None
        if glossary:
            if not source or source == "auto":
                raise EngineError(f"{_DEEPL_LABEL} needs sourceLang to use a glossary.")
            glossary_id = await self._glossary_id(source, target, tuple(glossary))
        send = functools.partial(self._send, source=source, target=target,
                                 glossary_id=glossary_id)
        return await _translate_protected(
            texts, send, self._settings, _DEEPL_LABEL, self._limit, inline_tags="native"
        )

    async def _send(
        self, batch: list[str], source: str, target: str, glossary_id: str | None
    ) -> list[str]:
        tagged = any(_INLINE_TAG_RE.search(text) for text in batch)
        sent = [_escape_around_tags(text) for text in batch] if tagged else batch
        payload: dict[str, Any] = {"text": sent, "target_lang": _deepl_lang(target)}
        if source and source != "auto":
            payload["source_lang"] = _deepl_lang(source).split("-")[0]
        if glossary_id:
            payload["glossary_id"] = glossary_id
        if tagged:
            payload["tag_handling"] = "xml"
        reply = await self._post("/v2/translate", payload)
        data = _json_answer(reply, _DEEPL_LABEL)
        items = data.get("translations") if isinstance(data, dict) else None
        out = [item.get("text") for item in items if isinstance(item, dict)] if isinstance(
            items, list) else None
        if out is None or not all(isinstance(text, str) for text in out):
            raise TransientEngineError(f"{_DEEPL_LABEL} answered without a list of translations.")
        texts = cast(list[str], out)
        return [_unescape_around_tags(text) for text in texts] if tagged else texts

    async def _glossary_id(self, source: str, target: str,
                           terms: tuple[tuple[str, str], ...]) -> str:
        key = (source, target, terms)
        if key not in self._glossaries:
            entries = "".join(f"{_tsv_cell(a)}\t{_tsv_cell(b)}\n" for a, b in terms)
            payload = {"name": f"zhiyi {source}-{target}", "source_lang": source.split("-")[0],
                       "target_lang": target.split("-")[0], "entries": entries,
                       "entries_format": "tsv"}

            async def create() -> str:
                reply = await self._post("/v2/glossaries", payload)
                data = _json_answer(reply, _DEEPL_LABEL)
                glossary_id = data.get("glossary_id") if isinstance(data, dict) else None
                if not isinstance(glossary_id, str):
                    raise TransientEngineError(f"{_DEEPL_LABEL} made no glossary.")
                return glossary_id

            self._glossaries[key] = await _with_retries(create, self._settings, self._limit)
        return self._glossaries[key]

    async def _post(self, path: str, payload: dict[str, Any]) -> _Reply:
        reply = await _post_json(self._session, self._base + path, payload, self._headers,
                                 self._settings, _DEEPL_LABEL)
        if reply.status == 456:
            raise EngineError(_sentence(
                f"{_DEEPL_LABEL} says the account's character quota is used up (HTTP 456); "
                "wait for the next billing period or raise the limit",
                _error_detail(reply.body)))
        _raise_for_retryable(reply, _DEEPL_LABEL)
        if reply.status >= 300:
            raise EngineError(_deepl_rejection(reply))
        return reply


def _deepl_lang(code: str) -> str:
    """DeepL's spelling of a language code: ``zh`` -> ``ZH``, ``en-us`` -> ``EN-US``."""
    return code.strip().upper()


def _tsv_cell(text: str) -> str:
    """A term as one TSV cell (DeepL refuses tabs and newlines inside entries)."""
    return " ".join(text.split())


def _deepl_rejection(reply: _Reply) -> str:
    detail = _error_detail(reply.body)
    if reply.status == 403:
        head = f"{_DEEPL_LABEL} rejected the key (HTTP 403); check DEEPL_API_KEY and DEEPL_API_URL"
    elif reply.status == 404:
        head = f"{_DEEPL_LABEL} has no such endpoint (HTTP 404); check DEEPL_API_URL"
    else:
        head = f"{_DEEPL_LABEL} rejected the request (HTTP {reply.status})"
    return _sentence(head, detail)


# --------------------------------------------------------------------------- Argos


@functools.cache
def _argos() -> ModuleType | None:
    """The ``argostranslate`` package, or None; imported once, it loads native libraries."""
    try:
        import argostranslate.package
        import argostranslate.translate
    except (ImportError, OSError) as e:
        logger.debug("argostranslate is not usable: %s", e)
        return None
    return argostranslate


def _argos_pairs(argos: ModuleType) -> tuple[tuple[str, str], ...]:
    packages = argos.package.get_installed_packages()
    return tuple(sorted({(p.from_code, p.to_code) for p in packages}))


class _ArgosEngine:
    """Offline Argos Translate; CPU-bound, so each batch runs in a thread."""

    name = "argos"
    paid = False

    def __init__(self, settings: EngineSettings, argos: ModuleType) -> None:
        self._settings = settings
        self._argos = argos

    async def translate(self, texts: Sequence[str], source: str, target: str) -> list[str]:
        translation = await asyncio.to_thread(self._translation, source, target)

        async def send(batch: list[str]) -> list[str]:
            return await asyncio.to_thread(lambda: [translation.translate(t) for t in batch])

        # The model is deterministic: a retry would give the same garbled answer.
        settings = replace(self._settings, max_retries=0)
        try:
            return await _translate_protected(texts, send, settings, _ARGOS_LABEL)
        except TransientEngineError as e:
            raise EngineError(str(e)) from e

    def _translation(self, source: str, target: str) -> Any:
        """The installed (possibly pivoted through English) translation for the pair."""
        languages = {lang.code: lang for lang in self._argos.translate.get_installed_languages()}
        if source in ("", "auto"):
            source = self._only_source_for(target)
        src, dst = languages.get(source), languages.get(target)
        translation = src.get_translation(dst) if src is not None and dst is not None else None
        if translation is None:
            raise EngineError(
                f"{_ARGOS_LABEL} has no model for {source} to {target}; install one with "
                f"zhiyi engine install argos {source} {target}."
            )
        return translation

    def _only_source_for(self, target: str) -> str:
        """Argos cannot detect languages; guess only when one installed source fits."""
        sources = sorted({s for s, t in _argos_pairs(self._argos) if t == target})
        if len(sources) != 1:
            raise EngineError(
                f"{_ARGOS_LABEL} cannot detect the source language; give sourceLang "
                f"(installed sources for {target}: {', '.join(sources) or 'none'})."
            )
        return sources[0]


# Argos models are zip archives of one folder holding metadata.json ("type", "from_code",
# "to_code", ...) beside the model: argostranslate's package format.
_ARGOS_NO_LIBRARY = "Argos Translate is not installed; install it with pip install 'zhiyi[argos]'."


def check_argos_model(path: Path, source: str, target: str) -> dict[str, Any]:
    """The metadata of an ``.argosmodel`` file, if it is a translation model for the pair.

    Raises :class:`EngineError` saying what the file is instead.
    """
    if not path.is_file():
        raise EngineError(f"There is no file {str(path)!r}.")
    if not zipfile.is_zipfile(path):
        raise EngineError(f"{path.name} is not an Argos model (an .argosmodel is a zip archive).")
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.count("/") == 1
                 and n.endswith("/metadata.json")]
        if len(names) != 1:
            raise EngineError(f"{path.name} is not an Argos model: it has no "
                              "<folder>/metadata.json.")
        try:
            metadata = json.loads(archive.read(names[0]))
        except (ValueError, UnicodeDecodeError) as e:
            raise EngineError(f"{path.name}: its metadata.json is not JSON.") from e
    if not isinstance(metadata, dict):
        raise EngineError(f"{path.name}: its metadata.json is not a JSON object.")
    pair = (metadata.get("from_code"), metadata.get("to_code"))
    if metadata.get("type", "translate") != "translate" or pair != (source, target):
        raise EngineError(
            f"{path.name} is a {metadata.get('type', 'translate')} model for "
            f"{pair[0]} to {pair[1]}, not a translation model for {source} to {target}."
        )
    return metadata


def install_argos(source: str, target: str, file: Path | None = None) -> str:
    """Install an Argos Translate model for ``source`` to ``target``; says what it did.

    From ``file`` (an ``.argosmodel``), or else from argostranslate's package index
    (which needs the network). Blocking: run it in a thread or from the command line.
    Raises :class:`EngineError` with a sentence a person can act on.
    """
    if file is not None:
        check_argos_model(file, source, target)
    argos = _argos()
    if argos is None:
        raise EngineError(_ARGOS_NO_LIBRARY)
    if (source, target) in _argos_pairs(argos):
        return f"{_ARGOS_LABEL} already has a model for {source} to {target}."
    if file is not None:
        argos.package.install_from_path(file)
    else:
        _install_argos_from_index(argos, source, target)
    if (source, target) not in _argos_pairs(argos):
        raise EngineError(f"{_ARGOS_LABEL} did not take the model for {source} to {target}.")
    return f"Installed the {_ARGOS_LABEL} model for {source} to {target}."


def _install_argos_from_index(argos: ModuleType, source: str, target: str) -> None:
    try:
        argos.package.update_package_index()
        available = argos.package.get_available_packages()
    except Exception as e:  # urllib, JSON and file errors from the library
        raise EngineError(
            f"Could not read the Argos package index ({e}); download the model "
            f"elsewhere and install it with zhiyi engine install argos {source} {target} "
            "--file MODEL.argosmodel."
        ) from e
    found = [p for p in available if (p.from_code, p.to_code) == (source, target)]
    if not found:
        pairs = sorted(f"{p.from_code}-{p.to_code}" for p in available)
        raise EngineError(f"The Argos package index has no model for {source} to {target} "
                          f"(it has {', '.join(pairs[:40]) or 'none'}).")
    try:
        argos.package.install_from_path(found[0].download())
    except Exception as e:
        raise EngineError(f"Downloading the Argos model failed ({e}); use --file.") from e


# --------------------------------------------------------------------------- registry


def _pseudo_status(settings: EngineSettings) -> EngineStatus:
    return EngineStatus("pseudo", True, None)


def _argos_status(settings: EngineSettings) -> EngineStatus:
    argos = _argos()
    if argos is None:
        return EngineStatus("argos", False, "Install the argos extra: pip install 'zhiyi[argos]'.")
    pairs = _argos_pairs(argos)
    if not pairs:
        return EngineStatus(
            "argos",
            False,
            "Argos Translate has no language model installed; install one with "
            "zhiyi engine install argos FROM TO (e.g. en de).",
        )
    return EngineStatus("argos", True, None, pairs)


def _libretranslate_status(settings: EngineSettings) -> EngineStatus:
    if not settings.libretranslate_url:
        return EngineStatus(
            "libretranslate", False, "Set LIBRETRANSLATE_URL to a LibreTranslate server."
        )
    return EngineStatus("libretranslate", True, None)


def _deepl_status(settings: EngineSettings) -> EngineStatus:
    if not settings.deepl_api_key:
        return EngineStatus("deepl", False, "Set DEEPL_API_KEY to a DeepL API key.")
    return EngineStatus("deepl", True, None)


def _openai_status(settings: EngineSettings) -> EngineStatus:
    # The base URL is required and the key optional: local OpenAI-compatible servers
    # (llama.cpp, Ollama, vLLM) take none. OpenAI itself always needs one.
    if not settings.openai_base_url:
        return EngineStatus(
            "openai",
            False,
            "Set OPENAI_BASE_URL to an OpenAI-compatible API (e.g. https://api.openai.com/v1),"
            " and OPENAI_API_KEY if it needs a key.",
        )
    if not settings.openai_api_key and URL(settings.openai_base_url).host == "api.openai.com":
        return EngineStatus("openai", False, "Set OPENAI_API_KEY: api.openai.com needs a key.")
    return EngineStatus("openai", True, None)


_STATUSES: dict[str, Callable[[EngineSettings], EngineStatus]] = {
    "pseudo": _pseudo_status,
    "argos": _argos_status,
    "libretranslate": _libretranslate_status,
    "openai": _openai_status,
    "deepl": _deepl_status,
}


#: Best first: the engine a page picks when the user has not chosen (pseudo last: fake text).
ENGINE_PREFERENCE: tuple[str, ...] = ("deepl", "openai", "libretranslate", "argos", "pseudo")

#: Target languages of DeepL's API (its documented list, by base code).
DEEPL_LANGUAGES: tuple[str, ...] = (
    "ar", "bg", "cs", "da", "de", "el", "en", "es", "et", "fi", "fr", "hu", "id", "it", "ja",
    "ko", "lt", "lv", "nb", "nl", "pl", "pt", "ro", "ru", "sk", "sl", "sv", "tr", "uk", "zh",
)
#: What a page offers for a general language model (it may do more; these it does well).
LLM_LANGUAGES: tuple[str, ...] = (
    "ar", "bg", "cs", "da", "de", "el", "en", "es", "et", "fa", "fi", "fr", "he", "hi", "hu",
    "id", "it", "ja", "ko", "lt", "lv", "ms", "nb", "nl", "pl", "pt", "ro", "ru", "sk", "sl",
    "sv", "th", "tr", "uk", "vi", "zh",
)
#: Seconds to wait for LibreTranslate's ``/languages`` before offering every language.
LANGUAGES_TIMEOUT = 3.0


def default_engine(available: Iterable[str]) -> str:
    """The best of the ``available`` engines' names (``pseudo`` only when no real one is)."""
    names = set(available)
    return next((name for name in ENGINE_PREFERENCE if name in names), "pseudo")


async def supported_languages(name: str, settings: EngineSettings,
                              session: aiohttp.ClientSession) -> list[str] | None:
    """The language codes an engine translates into; ``None``: any (pseudo), or unknown.

    LibreTranslate says its own (``GET /languages``); DeepL and language models have a
    static list; argos its installed pairs' targets.
    """
    if name == "deepl":
        return list(DEEPL_LANGUAGES)
    if name == "openai":
        return list(LLM_LANGUAGES)
    if name == "argos":
        return sorted({target for _, target in _STATUSES[name](settings).pairs}) or None
    if name == "libretranslate" and settings.libretranslate_url:
        return await _libretranslate_languages(settings.libretranslate_url, session)
    return None


async def _libretranslate_languages(base: str, session: aiohttp.ClientSession
                                    ) -> list[str] | None:
    url = f"{base.rstrip('/')}/languages"
    try:
        async with session.get(url, allow_redirects=False,
                               timeout=aiohttp.ClientTimeout(total=LANGUAGES_TIMEOUT)) as reply:
            if reply.status != 200:
                return None
            listed = await reply.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:
        logger.warning("LibreTranslate's language list at %s: %s", url, e)
        return None
    if not isinstance(listed, list):
        return None
    codes = {str(item["code"]) for item in listed if isinstance(item, dict) and "code" in item}
    return sorted(codes) or None


def engine_statuses(settings: EngineSettings) -> list[EngineStatus]:
    """Every engine of :data:`ENGINE_NAMES`, in that order, with whether it can be used."""
    return [_STATUSES[name](settings) for name in ENGINE_NAMES]


def is_available(name: str, settings: EngineSettings) -> bool:
    """Whether the engine called ``name`` exists and can be used (one engine's check, where
    :func:`engine_statuses` checks them all)."""
    status = _STATUSES.get(name)
    return status is not None and status(settings).available


def make_engine(
    name: str,
    settings: EngineSettings,
    session: aiohttp.ClientSession,
    limits: EngineLimits | None = None,
) -> Engine:
    """Build the engine called ``name``; HTTP engines use ``session`` for every request.

    ``limits`` holds the process-wide in-flight limit of each engine; HTTP engines
    take a slot of theirs for every request.

    Raises :class:`UnknownEngine` for a name not in :data:`ENGINE_NAMES` and
    :class:`EngineError` (with the reason) for an engine that is not configured.
    """
    if name not in _STATUSES:
        raise UnknownEngine(f"Unknown engine {name!r}; the engines are {', '.join(ENGINE_NAMES)}.")
    status = _STATUSES[name](settings)
    if not status.available:
        raise EngineError(f"The {name} engine is not available. {status.reason}")
    if name == "pseudo":
        return _PseudoEngine()
    if name == "argos":
        return _ArgosEngine(settings, cast(ModuleType, _argos()))  # available: it imported
    limit = limits[name] if limits is not None else None
    if name == "libretranslate":
        return _LibreTranslateEngine(settings, session, limit)
    if name == "deepl":
        return _DeepLEngine(settings, session, limit)
    return _OpenAIEngine(settings, session, limit)
