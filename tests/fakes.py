"""Loopback fakes of the translation services the engines talk to, for tests.

Each fake is a small aiohttp app that records every request and can be scripted to
fail. Serve it with pytest-aiohttp's ``aiohttp_server`` fixture (or :func:`serve`
outside a fixture)::

    fake = FakeLibreTranslate(api_key="secret")
    server = await aiohttp_server(fake.app)
    settings = EngineSettings(libretranslate_url=fake.url(server), libretranslate_api_key="secret")
    fake.fail_next(429, retry_after="1")       # the next request is rate limited
    ...
    assert fake.segments == ["Hello"]           # everything asked to be translated, in order

Translations are deterministic, :func:`fake_translation`: ``f"<{target}>{text}"``, so
placeholder tokens pass through untouched.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

__all__ = [
    "FakeDeepL",
    "FakeLibreTranslate",
    "FakeOpenAI",
    "RecordedRequest",
    "Step",
    "fake_translation",
    "serve",
]

logger = logging.getLogger(__name__)


def fake_translation(text: str, target: str) -> str:
    """What the fakes answer for ``text`` translated to ``target``."""
    return f"<{target}>{text}"


@dataclass(frozen=True)
class RecordedRequest:
    """One request a fake received."""

    #: ``time.monotonic()`` when it arrived, before any scripted delay.
    at: float
    method: str
    path: str
    headers: dict[str, str]
    #: The parsed JSON body, or None if it was not JSON.
    body: Any
    #: The texts it asked to translate, in order.
    segments: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Step:
    """How a fake answers one request; consumed in order from ``fake.script``."""

    #: An error status to answer with (with the service's error body), or None.
    status: int | None = None
    retry_after: str | None = None
    message: str | None = None
    #: Seconds to wait before answering; the wait ends early if the client hangs up.
    delay: float = 0.0
    #: Answer one translation fewer than asked.
    wrong_count: bool = False
    #: Answer exactly this JSON (with ``status`` or 200) instead of translating.
    body: Any = None


class _FakeService:
    """Recording, scripting and serving shared by the fakes.

    ``latency`` delays every answer; ``capacity`` is the service's own concurrency cap:
    a request arriving while ``capacity`` are being worked on gets 429 at once (with
    ``Retry-After: retry_after`` when set), as a small self-hosted server's rate
    limiter does. ``max_inflight`` is the most requests it ever worked on at once.
    """

    def __init__(
        self,
        api_key: str | None = None,
        *,
        latency: float = 0.0,
        capacity: int | None = None,
        retry_after: str | None = None,
    ) -> None:
        #: When set, requests without this key are refused like the real service does.
        self.api_key = api_key
        self.latency = latency
        self.capacity = capacity
        self.retry_after = retry_after
        self.requests: list[RecordedRequest] = []
        self.script: deque[Step] = deque()
        #: Texts of the requests answered with translations, in answer order.
        self.answered: list[str] = []
        #: Requests refused for being past ``capacity``.
        self.refused = 0
        self.inflight = 0
        self.max_inflight = 0
        self._arrived = asyncio.Condition()
        self._open = asyncio.Event()
        self._open.set()
        self.app = web.Application()
        self._add_routes(self.app)

    def _add_routes(self, app: web.Application) -> None:
        raise NotImplementedError

    # -- scripting

    def fail_next(
        self,
        status: int,
        times: int = 1,
        retry_after: str | None = None,
        message: str | None = None,
    ) -> None:
        """Answer the next ``times`` requests with ``status`` (and ``Retry-After``)."""
        self.script.extend([Step(status=status, retry_after=retry_after, message=message)] * times)

    def slow_next(self, seconds: float, times: int = 1) -> None:
        """Delay the next ``times`` answers by ``seconds`` (then answer normally)."""
        self.script.extend([Step(delay=seconds)] * times)

    def wrong_count_next(self, times: int = 1) -> None:
        """Answer the next ``times`` requests with one translation missing."""
        self.script.extend([Step(wrong_count=True)] * times)

    def reply_next(self, body: Any, status: int = 200, times: int = 1) -> None:
        """Answer the next ``times`` requests with this exact JSON body."""
        self.script.extend([Step(status=status, body=body)] * times)

    def hold(self) -> None:
        """Keep every request from now on waiting (in flight) until :meth:`release`."""
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    # -- inspection

    @property
    def segments(self) -> list[str]:
        """Every text every request asked to translate, in arrival order."""
        return [text for request in self.requests for text in request.segments]

    async def wait_for_requests(self, count: int, within: float = 10.0) -> None:
        """Wait until at least ``count`` requests have arrived (TimeoutError after ``within`` s)."""
        async with asyncio.timeout(within), self._arrived:
            await self._arrived.wait_for(lambda: len(self.requests) >= count)

    # -- helpers for handlers

    async def _record(self, request: web.Request, segments_of: Any) -> tuple[Any, Step]:
        try:
            body = await request.json()
        except ValueError:
            body = None
        try:
            segments = segments_of(body)
        except (AttributeError, KeyError, TypeError, ValueError):
            segments = []
        self.requests.append(
            RecordedRequest(
                at=time.monotonic(),
                method=request.method,
                path=request.path,
                headers=dict(request.headers),
                body=body,
                segments=segments,
            )
        )
        async with self._arrived:
            self._arrived.notify_all()
        step = self.script.popleft() if self.script else Step()
        if step.delay:
            await _linger(request, step.delay)
        return body, step

    async def _work(self, request: web.Request, answer: Any) -> web.Response:
        """Answer ``answer()`` after the latency, or 429 past the capacity."""
        if self.capacity is not None and self.inflight >= self.capacity:
            self.refused += 1
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            return web.json_response(self._busy_body(), status=429, headers=headers)
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            if self.latency:
                await _linger(request, self.latency)
            await self._open.wait()
            body, segments = answer()
            transport = request.transport
            if transport is not None and not transport.is_closing():
                self.answered.extend(segments)
            return web.json_response(body)
        finally:
            self.inflight -= 1

    def _busy_body(self) -> dict[str, Any]:
        return {"error": "Too many requests"}

    def _scripted(self, step: Step, error_body: dict[str, Any]) -> web.Response | None:
        if step.body is not None:
            return web.json_response(step.body, status=step.status or 200)
        if step.status is None:
            return None
        headers = {"Retry-After": step.retry_after} if step.retry_after is not None else {}
        return web.json_response(error_body, status=step.status, headers=headers)


async def _linger(request: web.Request, seconds: float) -> None:
    """Sleep, but stop as soon as the client has hung up (so teardown is quick)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        transport = request.transport
        if transport is None or transport.is_closing():
            return
        await asyncio.sleep(0.01)


def _base_url(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


class FakeLibreTranslate(_FakeService):
    """A LibreTranslate server: ``POST /translate`` and ``GET /languages``.

    Answers ``{"translatedText": [...]}`` for an array ``q`` (a string for a string
    ``q``), ``{"error": ...}`` on failure, 403 for a wrong ``api_key`` when
    ``api_key`` is set, 400 when ``q`` or ``target`` is missing.
    """

    def url(self, server: TestServer) -> str:
        """The value for ``LIBRETRANSLATE_URL`` once served by ``server``."""
        return _base_url(server)

    def _add_routes(self, app: web.Application) -> None:
        app.router.add_post("/translate", self._translate)
        app.router.add_get("/languages", self._languages)

    async def _languages(self, request: web.Request) -> web.Response:
        codes = ["en", "de", "fr", "zh"]
        return web.json_response([{"code": code, "name": code, "targets": codes} for code in codes])

    async def _translate(self, request: web.Request) -> web.Response:
        body, step = await self._record(request, _libre_segments)
        message = step.message or _LIBRE_MESSAGES.get(step.status or 0, "Error")
        scripted = self._scripted(step, {"error": message})
        if scripted is not None:
            return scripted
        if not isinstance(body, dict) or body.get("q") is None:
            return web.json_response({"error": "Invalid request: missing q parameter"}, status=400)
        if not body.get("target"):
            return web.json_response(
                {"error": "Invalid request: missing target parameter"}, status=400
            )
        if self.api_key is not None and body.get("api_key") != self.api_key:
            return web.json_response({"error": "Invalid API key"}, status=403)
        return await self._work(
            request, lambda: (_libre_answer(body, step.wrong_count), _libre_segments(body)))


_LIBRE_MESSAGES = {
    429: "Too many request limits violations",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def _libre_segments(body: Any) -> list[str]:
    q = body["q"]
    return [q] if isinstance(q, str) else list(q)


def _libre_answer(body: dict[str, Any], wrong_count: bool) -> dict[str, Any]:
    target, q = body["target"], body["q"]
    if isinstance(q, str):
        answer: dict[str, Any] = {"translatedText": fake_translation(q, target)}
        detected: Any = {"confidence": 90.0, "language": "en"}
    else:
        texts = q[:-1] if wrong_count else q
        answer = {"translatedText": [fake_translation(text, target) for text in texts]}
        detected = [{"confidence": 90.0, "language": "en"} for _ in texts]
    if body.get("source", "auto") == "auto":
        answer["detectedLanguage"] = detected
    return answer


class FakeOpenAI(_FakeService):
    """An OpenAI-compatible chat API: ``POST /v1/chat/completions``.

    Understands the request engines.py sends - a user message that is JSON
    ``{"source", "target", "segments": {"1": text, ...}}`` - and answers a chat
    completion whose content is ``{"segments": {"1": translation, ...}}``. Any other
    user message is answered with its whole text "translated" to ``"xx"``. Errors use
    OpenAI's shape ``{"error": {"message", "type", "code"}}``; a wrong bearer key gets
    401 when ``api_key`` is set.
    """

    def url(self, server: TestServer) -> str:
        """The value for ``OPENAI_BASE_URL`` (ending in ``/v1``) once served by ``server``."""
        return f"{_base_url(server)}/v1"

    def _add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._chat)

    async def _chat(self, request: web.Request) -> web.Response:
        body, step = await self._record(request, lambda b: list(_openai_request(b)[1].values()))
        message = step.message or _OPENAI_MESSAGES.get(step.status or 0, "Error")
        scripted = self._scripted(step, _openai_error(message, step.status or 500))
        if scripted is not None:
            return scripted
        expected = f"Bearer {self.api_key}"
        if self.api_key is not None and request.headers.get("Authorization") != expected:
            return web.json_response(
                _openai_error("Incorrect API key provided.", 401, "invalid_api_key"), status=401
            )
        if not isinstance(body, dict) or not body.get("model") or not body.get("messages"):
            return web.json_response(_openai_error("Missing model or messages.", 400), status=400)

        def answer() -> tuple[Any, list[str]]:
            content = self._content(body, step.wrong_count)
            try:
                sent = list(_openai_request(body)[1].values())
            except (KeyError, TypeError, ValueError):
                sent = []
            return _completion(body, content), sent

        return await self._work(request, answer)

    def _busy_body(self) -> dict[str, Any]:
        return _openai_error("Rate limit reached for requests.", 429)

    def _content(self, body: dict[str, Any], wrong_count: bool) -> str:
        try:
            target, segments = _openai_request(body)
        except (KeyError, TypeError, ValueError):
            return fake_translation(str(body["messages"][-1].get("content")), "xx")
        numbers = list(segments)[:-1] if wrong_count else list(segments)
        translated = {n: fake_translation(segments[n], target) for n in numbers}
        return json.dumps({"segments": translated}, ensure_ascii=False)


_OPENAI_MESSAGES = {
    429: "Rate limit reached for requests.",
    500: "The server had an error while processing your request.",
    503: "The engine is currently overloaded, please try again later.",
}


def _openai_request(body: Any) -> tuple[str, dict[str, str]]:
    """(target, numbered segments) from the user message engines.py sends."""
    user = next(m for m in reversed(body["messages"]) if m["role"] == "user")
    request = json.loads(user["content"])
    segments = request["segments"]
    if not isinstance(segments, dict):
        raise ValueError("segments is not an object")
    return request["target"], segments


def _openai_error(message: str, status: int, code: str | None = None) -> dict[str, Any]:
    kind = "rate_limit_exceeded" if status == 429 else "invalid_request_error"
    if status >= 500:
        kind = "server_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _completion(body: dict[str, Any], content: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body["model"],
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


class FakeDeepL(_FakeService):
    """DeepL's API v2: ``POST /v2/translate`` and ``POST /v2/glossaries``.

    Needs ``Authorization: DeepL-Auth-Key <api_key>`` (403 otherwise). A translation
    is :func:`fake_translation` with the lower-cased ``target_lang``, after the named
    glossary's source terms were replaced by their target terms (whole words, any
    case), so a glossary shows in the output as DeepL's would. ``quota_left`` in
    characters: past it, 456 as DeepL answers.
    """

    def __init__(self, api_key: str = "key:fx", quota_left: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(api_key, **kwargs)
        self.quota_left = quota_left
        #: glossary id -> (source_lang, target_lang, [(source, target), ...])
        self.glossaries: dict[str, tuple[str, str, list[tuple[str, str]]]] = {}

    def url(self, server: TestServer) -> str:
        """The value for ``DEEPL_API_URL`` once served by ``server``."""
        return _base_url(server)

    def _add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v2/translate", self._translate)
        app.router.add_post("/v2/glossaries", self._glossary)

    def _authorised(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"DeepL-Auth-Key {self.api_key}"

    async def _glossary(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return web.json_response({"message": "Forbidden"}, status=403)
        body = await request.json()
        if body.get("entries_format") != "tsv" or not body.get("source_lang"):
            return web.json_response({"message": "Bad request"}, status=400)
        pairs = [tuple(line.split("\t")) for line in body["entries"].splitlines() if line]
        glossary_id = f"g{len(self.glossaries) + 1}"
        self.glossaries[glossary_id] = (body["source_lang"], body["target_lang"],
                                        [(a, b) for a, b in pairs])
        return web.json_response({"glossary_id": glossary_id, "ready": True,
                                  "entry_count": len(pairs)}, status=201)

    async def _translate(self, request: web.Request) -> web.Response:
        body, step = await self._record(request, lambda b: list(b["text"]))
        scripted = self._scripted(step, {"message": step.message or "Too many requests"})
        if scripted is not None:
            return scripted
        if not self._authorised(request):
            return web.json_response({"message": "Forbidden"}, status=403)
        if not isinstance(body, dict) or not body.get("text") or not body.get("target_lang"):
            return web.json_response({"message": "Value for 'text' not supplied."}, status=400)
        glossary = body.get("glossary_id")
        if glossary is not None and (glossary not in self.glossaries
                                     or not body.get("source_lang")):
            return web.json_response({"message": "Invalid glossary"}, status=400)
        size = sum(map(len, body["text"]))
        if self.quota_left is not None:
            if size > self.quota_left:
                return web.json_response({"message": "Quota exceeded"}, status=456)
            self.quota_left -= size
        terms = self.glossaries[glossary][2] if glossary else []
        target = body["target_lang"].lower()

        def answer() -> tuple[Any, list[str]]:
            out = [{"detected_source_language": "EN",
                    "text": fake_translation(_apply_terms(text, terms), target)}
                   for text in body["text"]]
            return {"translations": out}, list(body["text"])

        return await self._work(request, answer)

    def _busy_body(self) -> dict[str, Any]:
        return {"message": "Too many requests"}


def _apply_terms(text: str, terms: list[tuple[str, str]]) -> str:
    for source, target in terms:
        text = re.sub(rf"\b{re.escape(source)}\b", target, text, flags=re.IGNORECASE)
    return text


@asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[TestServer]:
    """Serve ``app`` on 127.0.0.1 for the duration of the block, outside pytest fixtures.

    Use ``fake.url(server)`` for the address.
    """
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield server
    finally:
        await server.close()
