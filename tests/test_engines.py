"""Tests of engines.py against real loopback HTTP fakes (tests/fakes.py), no mocks."""

from __future__ import annotations

import asyncio
import email.utils
import re
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from fakes import FakeLibreTranslate, FakeOpenAI, fake_translation
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

import engines
from engines import (
    ENGINE_NAMES,
    Engine,
    EngineError,
    EngineSettings,
    TransientEngineError,
    UnknownEngine,
    batch_segments,
    engine_statuses,
    make_engine,
    protect_placeholders,
    pseudo_localize,
    restore_placeholders,
)

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]

FAST = EngineSettings(retry_base_seconds=0.01, max_retries=2, request_timeout=5.0)

PLACEHOLDERS = [
    "{name}",
    "{0}",
    "{}",
    "{0:.2f}",
    "%s",
    "%d",
    "%(count)d",
    "%1$s",
    "{{ user.name }}",
    "${total}",
    "<b>",
    "</b>",
    "<br/>",
    '<a href="https://example.com/x">',
    "&amp;",
    "&#8212;",
    "&#x4E2D;",
    "https://example.com/path?q=1&r=2",
    "\ue000",
    "\uf8ff",
]

SAMPLE = (
    "Hello {name}, you have %d new <b>messages</b> &amp; 1 alert; "
    "see https://example.com/inbox?id=7. \ue000Bold\ue001 and {{ user }}."
)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def libre(aiohttp_server: ServerFactory) -> tuple[FakeLibreTranslate, EngineSettings]:
    fake = FakeLibreTranslate(api_key="libre-key")
    server = await aiohttp_server(fake.app)
    return fake, replace(
        FAST, libretranslate_url=fake.url(server), libretranslate_api_key="libre-key"
    )


@pytest.fixture
async def openai(aiohttp_server: ServerFactory) -> tuple[FakeOpenAI, EngineSettings]:
    fake = FakeOpenAI(api_key="sk-test")
    server = await aiohttp_server(fake.app)
    return fake, replace(
        FAST, openai_base_url=fake.url(server), openai_api_key="sk-test", openai_model="m-1"
    )


class RetryWaits:
    """Records the wait each engine retry chose (``engines._backoff_seconds``).

    Tests assert the chosen wait, not the time that passed: with ``sleep`` off
    the engine retries at once, so no test measures the machine's clock.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.chosen: list[float] = []
        self.sleep = True
        self.reached = asyncio.Event()
        self._real = engines._backoff_seconds
        monkeypatch.setattr(engines, "_backoff_seconds", self._choose)

    def _choose(self, attempt: int, settings: EngineSettings, retry_after: float | None) -> float:
        delay = self._real(attempt, settings, retry_after)
        self.chosen.append(delay)
        self.reached.set()  # the engine goes straight on to sleep(delay), without a yield
        return delay if self.sleep else 0.0


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> RetryWaits:
    recorder = RetryWaits(monkeypatch)
    recorder.sleep = False
    return recorder


def _chat(content: str) -> dict[str, Any]:
    """A minimal chat completion answering ``content``."""
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}


def _plain(text: str) -> str:
    """The text with every placeholder removed."""
    protected, _ = protect_placeholders(text)
    return re.sub(r"\[X\d+X\]", "", protected)


# --------------------------------------------------------------------------- batch_segments


@pytest.mark.parametrize(
    ("texts", "max_chars", "max_items", "expected"),
    [
        ([], 10, 3, []),
        (["a", "b", "c", "d"], 100, 3, [["a", "b", "c"], ["d"]]),
        (["aaa", "bbbbb", "cc"], 8, 10, [["aaa", "bbbbb"], ["cc"]]),
        (["x" * 50, "y", "z"], 10, 10, [["x" * 50], ["y", "z"]]),
        (["y", "x" * 50, "z"], 10, 10, [["y"], ["x" * 50], ["z"]]),
        (["", "", ""], 1, 2, [["", ""], [""]]),
    ],
)
def test_batch_segments_examples(
    texts: list[str], max_chars: int, max_items: int, expected: list[list[str]]
) -> None:
    assert list(batch_segments(texts, max_chars, max_items)) == expected


@hypothesis_settings(database=None, max_examples=300, deadline=None)
@given(
    texts=st.lists(st.text(max_size=30), max_size=60),
    max_chars=st.integers(1, 80),
    max_items=st.integers(1, 10),
)
def test_batch_segments_never_drops_reorders_or_exceeds(
    texts: list[str], max_chars: int, max_items: int
) -> None:
    batches = list(batch_segments(iter(texts), max_chars, max_items))
    assert [text for batch in batches for text in batch] == texts
    for batch in batches:
        assert 1 <= len(batch) <= max_items
        # Only a lone oversized segment may exceed the character budget.
        assert sum(map(len, batch)) <= max_chars or len(batch) == 1


def test_batch_segments_refuses_empty_limits() -> None:
    with pytest.raises(ValueError):
        list(batch_segments(["a"], 0, 1))
    with pytest.raises(ValueError):
        list(batch_segments(["a"], 1, 0))


# --------------------------------------------------------------------------- placeholders


@pytest.mark.parametrize("placeholder", PLACEHOLDERS)
def test_protect_replaces_each_placeholder_kind(placeholder: str) -> None:
    protected, originals = protect_placeholders(f"Before {placeholder} after")
    assert protected == "Before [X0X] after"
    assert originals == [placeholder]


def test_protect_numbers_tokens_in_order_and_restores() -> None:
    protected, originals = protect_placeholders(SAMPLE)
    assert protected.startswith("Hello [X0X], you have [X1X] new [X2X]messages[X3X] [X4X]")
    assert "{" not in protected and "<" not in protected and "\ue000" not in protected
    assert "https" not in protected
    assert protected.count("[X") == len(originals)
    assert restore_placeholders(protected, originals) == SAMPLE


def test_protect_keeps_trailing_punctuation_out_of_urls() -> None:
    _, originals = protect_placeholders("Go to https://example.com/a, then http://b.org.")
    assert originals == ["https://example.com/a", "http://b.org"]


def test_protect_leaves_plain_percent_alone() -> None:
    assert protect_placeholders("50% done, 100 % sure") == ("50% done, 100 % sure", [])


def test_literal_token_in_the_source_is_protected_too() -> None:
    text = "A literal [X0X] and [x1x] before {name}"
    protected, originals = protect_placeholders(text)
    assert originals == ["[X0X]", "[x1x]", "{name}"]
    assert restore_placeholders(protected, originals) == text


def test_restore_tolerates_reordering_case_and_spacing() -> None:
    originals = ["<b>", "</b>", "{n}"]
    assert restore_placeholders("[X2X] [ x 0 X ]fett[X1X ]", originals) == "{n} <b>fett</b>"


@pytest.mark.parametrize(
    ("translation", "complaint"),
    [
        ("Hallo [X0X]", "lost the placeholder '</b>'"),
        ("Hallo [X0X][X1X][X1X]", "repeats the placeholder '</b>'"),
        ("Hallo [X0X][X1X][X2X]", "[X2X] that was not sent"),
    ],
)
def test_restore_refuses_a_garbled_translation(translation: str, complaint: str) -> None:
    with pytest.raises(TransientEngineError, match=re.escape(complaint)) as info:
        restore_placeholders(translation, ["<b>", "</b>"])
    assert isinstance(info.value, EngineError)


@hypothesis_settings(database=None, max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from([*PLACEHOLDERS, "a", " ", "%", "{", "<", "[X1X]", "é"])).map("".join)
)
def test_protect_restore_round_trip(text: str) -> None:
    assert restore_placeholders(*protect_placeholders(text)) == text


@hypothesis_settings(database=None, max_examples=300, deadline=None)
@given(st.text())
def test_protect_restore_round_trip_any_text(text: str) -> None:
    assert restore_placeholders(*protect_placeholders(text)) == text


# --------------------------------------------------------------------------- pseudo


def test_pseudo_localize_accents_pads_and_brackets() -> None:
    result = pseudo_localize("Save file")
    assert result.startswith("[Šáṽé ƒíļé ")
    assert result.endswith("]")
    assert len(result) >= len("Save file") * 1.3


def test_pseudo_localize_is_deterministic() -> None:
    assert pseudo_localize(SAMPLE) == pseudo_localize(SAMPLE)


@pytest.mark.parametrize("placeholder", PLACEHOLDERS)
def test_pseudo_localize_keeps_placeholders(placeholder: str) -> None:
    assert placeholder in pseudo_localize(f"Open {placeholder} now")


def test_pseudo_localize_keeps_private_use_markers_and_outer_whitespace() -> None:
    result = pseudo_localize("  \ue000Bold\ue001 text\uf8ff\n")
    assert result.startswith("  [\ue000Ɓóļð\ue001")
    assert result.endswith("]\n")
    assert "\uf8ff" in result


@pytest.mark.parametrize("blank", ["", " ", "\n\t "])
def test_pseudo_localize_leaves_blank_text(blank: str) -> None:
    assert pseudo_localize(blank) == blank


@hypothesis_settings(database=None, max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([*PLACEHOLDERS, "Hello", " ", ".", "中"])).map("".join))
def test_pseudo_localize_leaves_no_ascii_letters_outside_placeholders(text: str) -> None:
    result = pseudo_localize(text)
    assert not re.search("[A-Za-z]", _plain(result))
    assert Counter(protect_placeholders(result)[1]) == Counter(protect_placeholders(text)[1])


async def test_pseudo_engine_translates_in_order(session: aiohttp.ClientSession) -> None:
    engine = make_engine("pseudo", EngineSettings(), session)
    assert isinstance(engine, Engine)
    assert (engine.name, engine.paid) == ("pseudo", False)
    texts = ["One", "", "Two {x}"]
    assert await engine.translate(texts, "auto", "de") == [pseudo_localize(t) for t in texts]


async def test_pseudo_engine_large_batch_matches(session: aiohttp.ClientSession) -> None:
    engine = make_engine("pseudo", EngineSettings(), session)
    texts = [f"Paragraph {i}: {SAMPLE}" for i in range(600)]  # > 50 KB: the thread path
    assert sum(map(len, texts)) > 50_000
    assert await engine.translate(texts, "en", "de") == [pseudo_localize(t) for t in texts]


# --------------------------------------------------------------------------- statuses, factory


def _status(settings: EngineSettings, name: str) -> engines.EngineStatus:
    return next(s for s in engine_statuses(settings) if s.name == name)


def test_engine_statuses_unconfigured() -> None:
    statuses = engine_statuses(EngineSettings())
    assert [s.name for s in statuses] == list(ENGINE_NAMES)
    by_name = {s.name: s for s in statuses}
    assert by_name["pseudo"].available and by_name["pseudo"].reason is None
    assert not by_name["argos"].available
    assert by_name["argos"].reason == "Install the argos extra: pip install 'zhiyi[argos]'."
    assert not by_name["libretranslate"].available
    assert "LIBRETRANSLATE_URL" in (by_name["libretranslate"].reason or "")
    assert not by_name["openai"].available
    assert "OPENAI_BASE_URL" in (by_name["openai"].reason or "")


def test_engine_statuses_configured() -> None:
    settings = EngineSettings(
        libretranslate_url="http://127.0.0.1:5000", openai_base_url="http://127.0.0.1:8080/v1"
    )
    # A local OpenAI-compatible server needs no key.
    assert _status(settings, "libretranslate") == engines.EngineStatus("libretranslate", True, None)
    assert _status(settings, "openai") == engines.EngineStatus("openai", True, None)


def test_openai_itself_needs_a_key() -> None:
    status = _status(EngineSettings(openai_base_url="https://api.openai.com/v1"), "openai")
    assert not status.available
    assert "OPENAI_API_KEY" in (status.reason or "")
    with_key = EngineSettings(openai_base_url="https://api.openai.com/v1", openai_api_key="sk")
    assert _status(with_key, "openai").available


@pytest.mark.parametrize("name", ["external", "google", ""])
async def test_make_engine_unknown(session: aiohttp.ClientSession, name: str) -> None:
    with pytest.raises(UnknownEngine, match="pseudo, argos, libretranslate, openai, deepl"):
        make_engine(name, EngineSettings(), session)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("argos", "pip install 'zhiyi[argos]'"),
        ("libretranslate", "LIBRETRANSLATE_URL"),
        ("openai", "OPENAI_BASE_URL"),
        ("deepl", "DEEPL_API_KEY"),
    ],
)
async def test_make_engine_unavailable(
    session: aiohttp.ClientSession, name: str, reason: str
) -> None:
    with pytest.raises(EngineError, match=re.escape(reason)) as info:
        make_engine(name, EngineSettings(), session)
    assert not isinstance(info.value, TransientEngineError)


# --------------------------------------------------------------------------- LibreTranslate


async def test_libretranslate_success(
    session: aiohttp.ClientSession, libre: tuple[FakeLibreTranslate, EngineSettings]
) -> None:
    fake, settings = libre
    engine = make_engine("libretranslate", settings, session)
    assert (engine.name, engine.paid) == ("libretranslate", True)
    assert await engine.translate(["Hello", "World"], "auto", "de") == [
        "<de>Hello",
        "<de>World",
    ]
    [request] = fake.requests
    assert request.path == "/translate"
    assert request.body == {
        "q": ["Hello", "World"],
        "source": "auto",
        "target": "de",
        "format": "text",
        "api_key": "libre-key",
    }


async def test_libretranslate_batches_each_segment_once_in_order(
    session: aiohttp.ClientSession, libre: tuple[FakeLibreTranslate, EngineSettings]
) -> None:
    fake, settings = libre
    settings = replace(settings, batch_max_items=3, batch_max_chars=40)
    texts = [f"Sentence number {i}." for i in range(10)]
    engine = make_engine("libretranslate", settings, session)
    assert await engine.translate(texts, "en", "fr") == [fake_translation(t, "fr") for t in texts]
    assert fake.segments == texts
    for request in fake.requests:
        assert len(request.segments) <= 3
        assert sum(map(len, request.segments)) <= 40


async def test_libretranslate_skips_blank_and_duplicate_segments(
    session: aiohttp.ClientSession, libre: tuple[FakeLibreTranslate, EngineSettings]
) -> None:
    fake, settings = libre
    texts = ["Hi {a}", "", "  ", "{0}", "42", "Hi {b}", "Hi {a}", "Bye"]
    engine = make_engine("libretranslate", settings, session)
    assert await engine.translate(texts, "en", "de") == [
        "<de>Hi {a}",
        "",
        "  ",
        "{0}",
        "42",
        "<de>Hi {b}",
        "<de>Hi {a}",
        "<de>Bye",
    ]
    # "Hi {a}" and "Hi {b}" are the same segment once protected: sent once.
    assert fake.segments == ["Hi [X0X]", "Bye"]


async def test_libretranslate_keeps_placeholders(
    session: aiohttp.ClientSession, libre: tuple[FakeLibreTranslate, EngineSettings]
) -> None:
    fake, settings = libre
    engine = make_engine("libretranslate", settings, session)
    assert await engine.translate([SAMPLE], "en", "de") == [f"<de>{SAMPLE}"]
    # The wire carries tokens, never the placeholders themselves.
    assert fake.segments == [protect_placeholders(SAMPLE)[0]]


async def test_libretranslate_lost_token_is_retried(
    session: aiohttp.ClientSession, libre: tuple[FakeLibreTranslate, EngineSettings]
) -> None:
    fake, settings = libre
    fake.reply_next({"translatedText": ["<de>Hallo"]})
    engine = make_engine("libretranslate", settings, session)
    assert await engine.translate(["Hello {name}"], "en", "de") == ["<de>Hello {name}"]
    assert len(fake.requests) == 2


async def test_libretranslate_lost_token_forever_is_transient(
    session: aiohttp.ClientSession, libre: tuple[FakeLibreTranslate, EngineSettings]
) -> None:
    fake, settings = libre
    fake.reply_next({"translatedText": ["<de>Hallo"]}, times=10)
    engine = make_engine("libretranslate", settings, session)
    with pytest.raises(TransientEngineError) as info:
        await engine.translate(["Hello {name}"], "en", "de")
    assert str(info.value) == (
        "LibreTranslate did not keep the placeholders. The translation lost the placeholder "
        "'{name}'. Gave up after 3 attempts."
    )


async def test_libretranslate_honours_retry_after_seconds(
    session: aiohttp.ClientSession, libre: tuple[FakeLibreTranslate, EngineSettings],
    waits: RetryWaits,
) -> None:
    fake, settings = libre
    fake.fail_next(429, retry_after="1")
    engine = make_engine("libretranslate", settings, session)
    assert await engine.translate(["Hello"], "en", "de") == ["<de>Hello"]
    assert [r.segments for r in fake.requests] == [["Hello"], ["Hello"]]
    assert waits.chosen == [1.0]  # Retry-After wins over the 0.01 s backoff


async def test_libretranslate_honours_retry_after_http_date(
    session: aiohttp.ClientSession, libre: tuple[FakeLibreTranslate, EngineSettings],
    waits: RetryWaits,
) -> None:
    fake, settings = libre
    fake.fail_next(503, retry_after=email.utils.formatdate(time.time() + 30, usegmt=True))
    engine = make_engine("libretranslate", settings, session)
    assert await engine.translate(["Hello"], "en", "de") == ["<de>Hello"]
    assert len(fake.requests) == 2
    # The date has whole-second precision: the wait is 29-30 s (28 allows a stalled machine).
    assert len(waits.chosen) == 1 and 28 < waits.chosen[0] <= 30


async def test_libretranslate_5xx_then_success(
    session: aiohttp.ClientSession, libre: tuple[FakeLibreTranslate, EngineSettings]
) -> None:
    fake, settings = libre
    fake.fail_next(500, times=2)
    engine = make_engine("libretranslate", settings, session)
    assert await engine.translate(["Hello"], "en", "de") == ["<de>Hello"]
    assert len(fake.requests) == 3


async def test_libretranslate_5xx_forever_is_transient(
    session: aiohttp.ClientSession, libre: tuple[FakeLibreTranslate, EngineSettings]
) -> None:
    fake, settings = libre
    fake.fail_next(503, times=10)
    engine = make_engine("libretranslate", settings, session)
    with pytest.raises(TransientEngineError) as info:
        await engine.translate(["Hello"], "en", "de")
    assert str(info.value) == (
        "LibreTranslate failed (HTTP 503): Service Unavailable. Gave up after 3 attempts."
    )
    assert len(fake.requests) == settings.max_retries + 1


async def test_libretranslate_rejected_key_is_permanent(
    session: aiohttp.ClientSession, libre: tuple[FakeLibreTranslate, EngineSettings]
) -> None:
    fake, settings = libre
    settings = replace(settings, libretranslate_api_key="wrong")
    engine = make_engine("libretranslate", settings, session)
    with pytest.raises(EngineError) as info:
        await engine.translate(["Hello"], "en", "de")
    assert not isinstance(info.value, TransientEngineError)
    assert str(info.value) == "LibreTranslate rejected the API key (HTTP 403): Invalid API key."
    assert len(fake.requests) == 1


async def test_libretranslate_bad_request_is_permanent_with_server_message(
    session: aiohttp.ClientSession, libre: tuple[FakeLibreTranslate, EngineSettings]
) -> None:
    fake, settings = libre
    fake.fail_next(400, message="xx is not supported")
    engine = make_engine("libretranslate", settings, session)
    with pytest.raises(EngineError) as info:
        await engine.translate(["Hello"], "en", "xx")
    assert not isinstance(info.value, TransientEngineError)
    assert str(info.value) == (
        "LibreTranslate rejected the request (HTTP 400): xx is not supported."
    )
    assert len(fake.requests) == 1


async def test_libretranslate_wrong_count_retried_then_success(
    session: aiohttp.ClientSession, libre: tuple[FakeLibreTranslate, EngineSettings]
) -> None:
    fake, settings = libre
    fake.wrong_count_next()
    engine = make_engine("libretranslate", settings, session)
    assert await engine.translate(["One", "Two"], "en", "de") == ["<de>One", "<de>Two"]
    assert len(fake.requests) == 2


async def test_libretranslate_wrong_count_forever_is_transient(
    session: aiohttp.ClientSession, libre: tuple[FakeLibreTranslate, EngineSettings]
) -> None:
    fake, settings = libre
    fake.wrong_count_next(times=10)
    engine = make_engine("libretranslate", settings, session)
    with pytest.raises(TransientEngineError, match="returned 1 translation for 2 segments"):
        await engine.translate(["One", "Two"], "en", "de")
    assert len(fake.requests) == 3


async def test_libretranslate_timeout_is_transient(
    session: aiohttp.ClientSession, libre: tuple[FakeLibreTranslate, EngineSettings]
) -> None:
    fake, settings = libre
    settings = replace(settings, request_timeout=0.2, max_retries=1)
    fake.slow_next(5, times=2)
    engine = make_engine("libretranslate", settings, session)
    with pytest.raises(TransientEngineError) as info:
        await engine.translate(["Hello"], "en", "de")
    assert str(info.value) == (
        "LibreTranslate did not answer within 0.2 seconds. Gave up after 2 attempts."
    )
    assert len(fake.requests) == 2


async def test_libretranslate_timeout_then_success(
    session: aiohttp.ClientSession, libre: tuple[FakeLibreTranslate, EngineSettings]
) -> None:
    fake, settings = libre
    fake.slow_next(5)
    engine = make_engine("libretranslate", replace(settings, request_timeout=0.2), session)
    assert await engine.translate(["Hello"], "en", "de") == ["<de>Hello"]


async def test_unreachable_server_is_transient(session: aiohttp.ClientSession) -> None:
    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = replace(FAST, libretranslate_url=f"http://127.0.0.1:{port}", max_retries=1)
    engine = make_engine("libretranslate", settings, session)
    with pytest.raises(TransientEngineError, match=r"^Could not reach LibreTranslate"):
        await engine.translate(["Hello"], "en", "de")


# --------------------------------------------------------------------------- OpenAI-compatible


async def test_openai_success(
    session: aiohttp.ClientSession, openai: tuple[FakeOpenAI, EngineSettings]
) -> None:
    fake, settings = openai
    engine = make_engine("openai", settings, session)
    assert (engine.name, engine.paid) == ("openai", True)
    texts = ["Hello", "World", "Hello"]
    assert await engine.translate(texts, "en", "ja") == ["<ja>Hello", "<ja>World", "<ja>Hello"]
    [request] = fake.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["Authorization"] == "Bearer sk-test"
    assert request.body["model"] == "m-1"
    assert request.body["response_format"] == {"type": "json_object"}
    assert request.body["messages"][0]["role"] == "system"
    assert request.segments == ["Hello", "World"]


async def test_openai_without_key_sends_no_authorization(
    session: aiohttp.ClientSession, aiohttp_server: ServerFactory
) -> None:
    fake = FakeOpenAI()
    server = await aiohttp_server(fake.app)
    engine = make_engine("openai", replace(FAST, openai_base_url=fake.url(server)), session)
    assert await engine.translate(["Hello"], "auto", "de") == ["<de>Hello"]
    assert "Authorization" not in fake.requests[0].headers


async def test_openai_keeps_placeholders(
    session: aiohttp.ClientSession, openai: tuple[FakeOpenAI, EngineSettings]
) -> None:
    fake, settings = openai
    engine = make_engine("openai", settings, session)
    texts = [SAMPLE, "Plain", "<i>Click</i> {here}"]
    assert await engine.translate(texts, "en", "de") == [f"<de>{t}" for t in texts]
    assert fake.segments == [protect_placeholders(t)[0] for t in texts]


@pytest.mark.parametrize(
    "content",
    [
        '```json\n{"segments": {"1": "<de>A", "2": "<de>B"}}\n```',
        '{"segments": ["<de>A", "<de>B"]}',
        '["<de>A", "<de>B"]',
    ],
)
async def test_openai_accepts_common_answer_shapes(
    session: aiohttp.ClientSession, openai: tuple[FakeOpenAI, EngineSettings], content: str
) -> None:
    fake, settings = openai
    fake.reply_next(_chat(content))
    engine = make_engine("openai", settings, session)
    assert await engine.translate(["A", "B"], "en", "de") == ["<de>A", "<de>B"]
    assert len(fake.requests) == 1


@pytest.mark.parametrize(
    "answer",
    [
        _chat("Sorry, I cannot do that."),
        _chat('{"segments": {"1": 42}}'),
        _chat('{"segments": {"0": "<de>A"}}'),  # right count, wrong numbering
        {"choices": []},
        "not json at all",
    ],
)
async def test_openai_malformed_answer_is_retried(
    session: aiohttp.ClientSession, openai: tuple[FakeOpenAI, EngineSettings], answer: Any
) -> None:
    fake, settings = openai
    fake.reply_next(answer)
    engine = make_engine("openai", settings, session)
    assert await engine.translate(["A"], "en", "de") == ["<de>A"]
    assert len(fake.requests) == 2


async def test_openai_rejected_key_is_permanent(
    session: aiohttp.ClientSession, openai: tuple[FakeOpenAI, EngineSettings]
) -> None:
    fake, settings = openai
    engine = make_engine("openai", replace(settings, openai_api_key="sk-wrong"), session)
    with pytest.raises(EngineError) as info:
        await engine.translate(["Hello"], "en", "de")
    assert not isinstance(info.value, TransientEngineError)
    assert str(info.value) == (
        "OpenAI-compatible API rejected the key (HTTP 401); check OPENAI_API_KEY: "
        "Incorrect API key provided."
    )
    assert "sk-wrong" not in str(info.value)
    assert len(fake.requests) == 1


async def test_openai_forbidden_is_permanent(
    session: aiohttp.ClientSession, openai: tuple[FakeOpenAI, EngineSettings]
) -> None:
    fake, settings = openai
    fake.fail_next(403, message="Project does not have access to model m-1")
    engine = make_engine("openai", settings, session)
    with pytest.raises(EngineError, match=r"refused access \(HTTP 403\).*model m-1") as info:
        await engine.translate(["Hello"], "en", "de")
    assert not isinstance(info.value, TransientEngineError)


async def test_openai_exhausted_quota_is_permanent(
    session: aiohttp.ClientSession, openai: tuple[FakeOpenAI, EngineSettings]
) -> None:
    fake, settings = openai
    quota = {"error": {"message": "You exceeded your current quota.", "code": "insufficient_quota"}}
    fake.reply_next(quota, status=429)
    engine = make_engine("openai", settings, session)
    with pytest.raises(EngineError, match="no quota left") as info:
        await engine.translate(["Hello"], "en", "de")
    assert not isinstance(info.value, TransientEngineError)
    assert len(fake.requests) == 1


async def test_openai_honours_retry_after(
    session: aiohttp.ClientSession, openai: tuple[FakeOpenAI, EngineSettings],
    waits: RetryWaits,
) -> None:
    fake, settings = openai
    fake.fail_next(429, retry_after="1")
    engine = make_engine("openai", settings, session)
    assert await engine.translate(["Hello"], "en", "de") == ["<de>Hello"]
    assert len(fake.requests) == 2
    assert waits.chosen == [1.0]


async def test_openai_5xx_then_success_and_forever(
    session: aiohttp.ClientSession, openai: tuple[FakeOpenAI, EngineSettings]
) -> None:
    fake, settings = openai
    engine = make_engine("openai", settings, session)
    fake.fail_next(500)
    assert await engine.translate(["Hello"], "en", "de") == ["<de>Hello"]
    fake.fail_next(502, times=10)
    with pytest.raises(TransientEngineError, match=r"failed \(HTTP 502\).*after 3 attempts"):
        await engine.translate(["Hello"], "en", "de")
    assert len(fake.requests) == 2 + 3


async def test_openai_wrong_count_retried_then_error(
    session: aiohttp.ClientSession, openai: tuple[FakeOpenAI, EngineSettings]
) -> None:
    fake, settings = openai
    engine = make_engine("openai", settings, session)
    fake.wrong_count_next()
    assert await engine.translate(["A", "B", "C"], "en", "de") == ["<de>A", "<de>B", "<de>C"]
    assert len(fake.requests) == 2

    fake.wrong_count_next(times=10)
    with pytest.raises(TransientEngineError) as info:
        await engine.translate(["A", "B", "C"], "en", "de")
    assert str(info.value) == (
        "OpenAI-compatible API returned 2 translations for 3 segments. Gave up after 3 attempts."
    )
    assert len(fake.requests) == 2 + 3


async def test_openai_timeout_is_transient(
    session: aiohttp.ClientSession, openai: tuple[FakeOpenAI, EngineSettings]
) -> None:
    fake, settings = openai
    fake.slow_next(5, times=3)
    engine = make_engine("openai", replace(settings, request_timeout=0.2), session)
    with pytest.raises(TransientEngineError, match=re.escape("did not answer within 0.2 seconds")):
        await engine.translate(["Hello"], "en", "de")
    assert len(fake.requests) == 3


# --------------------------------------------------------------------------- cancellation


@pytest.fixture(params=["libretranslate", "openai"])
async def http_engine(
    request: pytest.FixtureRequest, aiohttp_server: ServerFactory
) -> tuple[str, FakeLibreTranslate | FakeOpenAI, EngineSettings]:
    """Each HTTP engine's name, its fake (served) and settings pointing at it."""
    if request.param == "libretranslate":
        libre = FakeLibreTranslate()
        server = await aiohttp_server(libre.app)
        return request.param, libre, replace(FAST, libretranslate_url=libre.url(server))
    openai = FakeOpenAI()
    server = await aiohttp_server(openai.app)
    return request.param, openai, replace(FAST, openai_base_url=openai.url(server))


async def test_cancel_during_slow_request_propagates(
    session: aiohttp.ClientSession,
    http_engine: tuple[str, FakeLibreTranslate | FakeOpenAI, EngineSettings],
) -> None:
    name, fake, settings = http_engine
    fake.slow_next(30)
    engine = make_engine(name, replace(settings, request_timeout=60), session)
    task = asyncio.create_task(engine.translate(["Hello"], "en", "de"))
    await fake.wait_for_requests(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(fake.requests) == 1


async def test_cancel_during_backoff_propagates(
    session: aiohttp.ClientSession, libre: tuple[FakeLibreTranslate, EngineSettings],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake, settings = libre
    fake.fail_next(503, retry_after="30")
    waits = RetryWaits(monkeypatch)  # really sleeps the 30 s, so the cancel lands in it
    engine = make_engine("libretranslate", settings, session)
    task = asyncio.create_task(engine.translate(["Hello"], "en", "de"))
    await asyncio.wait_for(waits.reached.wait(), 10)  # the engine is in its backoff sleep
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(fake.requests) == 1


# --------------------------------------------------------------------------- Retry-After parsing


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, None),
        ("", None),
        ("soon", None),
        ("nan", None),
        ("2", 2.0),
        ("0.5", 0.5),
        ("-3", 0.0),
        ("3600", 60.0),  # capped: an hour-long wait fails the batch's retries instead
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # in the past
    ],
)
def test_parse_retry_after(header: str | None, seconds: float | None) -> None:
    assert engines._parse_retry_after(header) == seconds

