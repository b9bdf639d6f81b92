"""Translation memory: remembered segments are neither sent nor charged; quote == charge.

A real app over a real SQLite file and a loopback LibreTranslate fake that records
every segment it is sent.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from fakes import FakeLibreTranslate
from helpers import add_user, create, form, wait_status
from hypothesis import given, settings
from hypothesis import strategies as st

import processors
from zhiyi_server import CONFIG, STORE

PARAMS = {"targetLang": "fr", "sourceLang": "en", "engine": "libretranslate"}


def document(paragraphs: list[str]) -> str:
    return "\n\n".join(paragraphs) + "\n"


def hundred() -> list[str]:
    return [f"Paragraph {i} of the annual report, which says something new." for i in range(100)]


async def balance(client: TestClient, headers) -> int:
    return (await (await client.get("/api/me", headers=headers)).json())["credits"]


async def quote(client: TestClient, headers, text: str, params=PARAMS) -> dict:
    resp = await client.post("/api/tasks/quote", data=form(text, params=params),
                             headers=headers)
    body = await resp.json()
    assert resp.status == 200, body
    return body["quote"]


async def translate(client: TestClient, headers, text: str, params=PARAMS) -> tuple[dict, str]:
    """Create, wait, download; returns (the create answer, the result text)."""
    created = await create(client, headers, content=text, params=params)
    task = await wait_status(client, headers, created["taskId"], "completed", "failed")
    assert task["taskStatus"] == "completed", task
    result = await client.get(task["resultUrl"], headers=headers)
    return created, await result.text()


async def setup(make_client, aiohttp_server, **overrides):
    fake = FakeLibreTranslate()
    server = await aiohttp_server(fake.app)
    client = await make_client(libretranslate_url=fake.url(server), **overrides)
    headers = await add_user(client, credits=1000)
    return fake, client, headers


async def test_the_same_document_again_costs_nothing_and_sends_nothing(
        make_client, aiohttp_server) -> None:
    fake, client, headers = await setup(make_client, aiohttp_server)
    text = document(hundred())
    first_quote = await quote(client, headers, text)
    assert first_quote["fromMemory"] == 0 and first_quote["segments"] == 100
    before = await balance(client, headers)
    created, first = await translate(client, headers, text)
    assert created["quote"] == first_quote
    assert before - await balance(client, headers) == first_quote["credits"] > 1
    sent = len(fake.segments)
    assert sent == 100

    second_quote = await quote(client, headers, text)
    assert second_quote == {**first_quote, "credits": 0, "fromMemory": 100,
                            "charactersFromMemory": first_quote["characters"]}
    before = await balance(client, headers)
    created, second = await translate(client, headers, text)
    assert created["quote"] == second_quote and created["task"]["creditsCost"] == 0
    assert await balance(client, headers) == before
    assert len(fake.segments) == sent  # nothing sent
    assert second == first


async def test_a_revised_document_sends_and_charges_only_the_changed_paragraphs(
        make_client, aiohttp_server) -> None:
    fake, client, headers = await setup(make_client, aiohttp_server)
    original = hundred()
    await translate(client, headers, document(original))
    revised = list(original)
    for i in (5, 50, 95):
        revised[i] = f"Paragraph {i} was rewritten for the second edition."
    fake.requests.clear()
    revised_quote = await quote(client, headers, document(revised))
    assert revised_quote["fromMemory"] == 97
    changed_chars = sum(len(revised[i]) for i in (5, 50, 95))
    assert revised_quote["credits"] == math.ceil(changed_chars / 1000)
    before = await balance(client, headers)
    created, result = await translate(client, headers, document(revised))
    assert created["quote"] == revised_quote
    assert before - await balance(client, headers) == revised_quote["credits"]
    assert sorted(fake.segments) == sorted(revised[i] for i in (5, 50, 95))
    assert result.strip().split("\n\n") == [f"<fr>{p}" for p in revised]


@pytest.mark.parametrize("chunk", [7, 10, 100, 101])
async def test_chunks_of_any_size_send_each_changed_segment_once_in_order(
        make_client, aiohttp_server, monkeypatch, chunk: int) -> None:
    """Segments are read in chunks (the first with the count and the journal): a chunk
    size that divides the document, one that does not, the whole and more."""
    monkeypatch.setattr(processors, "MEMORY_CHUNK", chunk)
    fake, client, headers = await setup(make_client, aiohttp_server)
    original = hundred()
    await translate(client, headers, document(original[::2]))  # the even ones remembered
    fake.requests.clear()
    _, result = await translate(client, headers, document(original))
    assert sorted(fake.segments) == sorted(original[1::2])
    assert result.strip().split("\n\n") == [f"<fr>{p}" for p in original]


async def test_pricing_asks_the_memory_by_key_and_no_balance_it_needs_not(
        make_client, monkeypatch) -> None:
    """Pricing asks whether the memory holds anything (for the least cost, then for the
    pair) by key, never by counting it (that grew with everything the user translated);
    with a memory the least cost is 0, which any balance covers: the user is not read."""
    client = await make_client()
    headers = await add_user(client, credits=1000)
    pseudo = {"targetLang": "fr", "engine": "pseudo"}
    text = document(hundred()[:10])
    await translate(client, headers, text, params=pseudo)
    store = client.app[STORE]
    statements: list[str] = []

    def counted(read: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        def run(sql: str, args: Any = ()) -> Awaitable[Any]:
            statements.append(" ".join(sql.split()))
            return read(sql, args)
        return run

    for name in ("_fetchall", "_fetch_keyed"):
        monkeypatch.setattr(store, name, counted(getattr(store, name)))
    created = await create(client, headers, content=text, params=pseudo)
    assert created["quote"]["fromMemory"] == 10 and created["quote"]["credits"] == 0
    memory = [sql for sql in statements if "FROM translation_memory" in sql]
    assert len(memory) == 3, memory  # anything remembered; for the pair; the keys
    assert not [sql for sql in memory if "COUNT(" in sql]
    assert not [sql for sql in statements if sql.startswith("SELECT * FROM users")]


async def test_analyze_quotes_like_create_and_memory_can_be_ignored(make_client,
                                                                    aiohttp_server) -> None:
    fake, client, headers = await setup(make_client, aiohttp_server)
    paragraphs = hundred()
    await translate(client, headers, document(paragraphs[:60]))
    text = document(paragraphs)
    created = await create(client, headers, content=text, task_type="analyze",
                           params={"targetLang": "fr", "sourceLang": "en",
                                   "engine": "libretranslate"})
    task = await wait_status(client, headers, created["taskId"], "completed")
    report = json.loads(await (await client.get(task["resultUrl"], headers=headers)).read())
    expected = await quote(client, headers, text)
    assert report["fromMemory"] == expected["fromMemory"] == 60
    assert report["quote"]["translate"] == expected["credits"]
    assert report["quotePerEngine"]["libretranslate"] == expected["credits"]
    assert report["quotePerEngine"]["pseudo"] > expected["credits"]  # another engine's memory
    # memory=ignore: everything is sent and charged again, and remembered anew.
    fake.requests.clear()
    ignoring = {**PARAMS, "memory": "ignore"}
    full = await quote(client, headers, text, params=ignoring)
    assert full["fromMemory"] == 0
    created, _ = await translate(client, headers, text, params=ignoring)
    assert created["task"]["creditsCost"] == full["credits"]
    assert len(fake.segments) == 100
    resp = await client.post("/api/tasks/quote", headers=headers,
                             data=form(text, params={**PARAMS, "memory": "maybe"}))
    assert resp.status == 400 and (await resp.json())["code"] == "bad_params"


async def test_detected_language_is_the_source_and_memory_survives_a_restart(
        make_client, aiohttp_server) -> None:
    fake, client, headers = await setup(make_client, aiohttp_server)
    auto = {"targetLang": "fr", "engine": "libretranslate"}
    text = document(hundred()[:10])
    await translate(client, headers, text, params=auto)
    summary = await (await client.get("/api/memory", headers=headers)).json()
    assert summary["scopes"] == [{"sourceLang": "en", "targetLang": "fr",
                                  "engine": "libretranslate", "segments": 10}]
    await client.close()
    # A new server process over the same data folder.
    again = await make_client(libretranslate_url=client.app[CONFIG].libretranslate_url)
    sent = len(fake.segments)
    assert (await quote(again, headers, text, params=auto))["credits"] == 0
    # sourceLang "en" given explicitly finds what "auto" (detected: en) remembered.
    assert (await quote(again, headers, text))["fromMemory"] == 10
    await translate(again, headers, text, params=auto)
    assert len(fake.segments) == sent


async def test_clear_export_and_import_as_tmx(make_client, aiohttp_server) -> None:
    fake, client, headers = await setup(make_client, aiohttp_server)
    text = document(hundred()[:20])
    await translate(client, headers, text)
    resp = await client.get("/api/memory/export.tmx", headers=headers)
    assert resp.status == 200 and resp.content_type == "application/x-tmx+xml"
    tmx = await resp.read()
    assert tmx.count(b"<tu>") == 20 and b"x-zhiyi-engine: libretranslate" in tmx

    resp = await client.delete("/api/memory?sourceLang=en", headers=headers)
    assert resp.status == 400  # all three or none
    resp = await client.delete("/api/memory", headers=headers)
    assert (await resp.json())["deleted"] == 20
    assert (await quote(client, headers, text))["fromMemory"] == 0

    resp = await client.post("/api/memory/import", data=tmx, headers=headers)
    assert (await resp.json())["imported"] == 20
    sent = len(fake.segments)
    created, result = await translate(client, headers, text)
    assert created["task"]["creditsCost"] == 0 and len(fake.segments) == sent
    assert result.strip().split("\n\n") == [f"<fr>{p}" for p in hundred()[:20]]


async def test_import_of_another_tools_tmx_and_bad_files(make_client, aiohttp_server) -> None:
    fake, client, headers = await setup(make_client, aiohttp_server)
    foreign = (b'<?xml version="1.0" encoding="UTF-8"?><tmx version="1.4"><header '
               b'srclang="en" datatype="plaintext" segtype="sentence" adminlang="en" '
               b'o-tmf="x" creationtool="x" creationtoolversion="1"/><body>'
               b'<tu><tuv xml:lang="en"><seg>Good  morning.</seg></tuv>'
               b'<tuv xml:lang="fr"><seg>Bonjour.</seg></tuv></tu></body></tmx>')
    resp = await client.post("/api/memory/import", data=foreign, headers=headers)
    body = await resp.json()
    assert resp.status == 422 and body["code"] == "bad_tmx" and "?engine=" in body["message"]
    resp = await client.post("/api/memory/import?engine=nope", data=foreign, headers=headers)
    assert resp.status == 400 and (await resp.json())["code"] == "unknown_engine"
    for bad in (b"not xml at all", b"<html><body>hi</body></html>"):
        resp = await client.post("/api/memory/import?engine=libretranslate", data=bad,
                                 headers=headers)
        body = await resp.json()
        assert resp.status == 422 and body["code"] == "bad_tmx", body
        assert body["message"].startswith("The file is not a TMX document")
    resp = await client.post("/api/memory/import?engine=libretranslate", data=foreign,
                             headers=headers)
    assert (await resp.json())["imported"] == 1
    # Normalised: "Good morning." (one space) is the remembered "Good  morning.".
    created, result = await translate(client, headers, "Good morning.\n")
    assert created["quote"]["fromMemory"] == 1 and created["task"]["creditsCost"] == 0
    assert result == "Bonjour.\n" and fake.segments == []


async def test_memory_is_per_user(make_client, aiohttp_server) -> None:
    _fake, client, alice = await setup(make_client, aiohttp_server)
    bob = await add_user(client, "bob", credits=100)
    text = document(hundred()[:5])
    await translate(client, alice, text)
    assert (await quote(client, bob, text))["fromMemory"] == 0
    body = await (await client.get("/api/memory", headers=bob)).json()
    assert body == {"success": True, "segments": 0, "scopes": []}


async def test_tmx_entity_tricks_are_refused_or_inert(make_client, aiohttp_server) -> None:
    _fake, client, headers = await setup(make_client, aiohttp_server)
    levels = "".join(
        f'<!ENTITY l{n} "{f"&l{n - 1};" * 10}">' for n in range(1, 10))
    bomb = (f'<?xml version="1.0"?><!DOCTYPE t [<!ENTITY l0 "lol">{levels}]>'
            '<tmx version="1.4"><header/><body><tu><tuv xml:lang="en"><seg>&l9;</seg></tuv>'
            '<tuv xml:lang="fr"><seg>x</seg></tuv></tu></body></tmx>').encode()
    resp = await client.post("/api/memory/import?engine=pseudo", data=bomb, headers=headers)
    body = await resp.json()
    assert resp.status == 422 and body["code"] == "bad_tmx", body
    secret = Path(__file__)  # any local file: its text must never reach the memory
    external = (f'<?xml version="1.0"?><!DOCTYPE t [<!ENTITY e SYSTEM "file://{secret}">]>'
                '<tmx version="1.4"><header/><body><tu><tuv xml:lang="en"><seg>&e;</seg>'
                '</tuv><tuv xml:lang="fr"><seg>x</seg></tuv></tu></body></tmx>').encode()
    resp = await client.post("/api/memory/import?engine=pseudo", data=external,
                             headers=headers)
    assert resp.status in (200, 422)
    exported = await (await client.get("/api/memory/export.tmx", headers=headers)).read()
    assert b"test_tmx_entity_tricks" not in exported


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(
    "ab É\u0301e\u0301 \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u2000\u2028\u3000\u200b中"),
    max_size=40))
def test_segments_are_compared_with_white_space_runs_as_one_space(text: str) -> None:
    """normalise() as it was defined: NFC, every run of \\s as one space, trimmed."""
    import re
    import unicodedata

    from translation_memory import normalise

    defined = re.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip()
    assert normalise(text) == defined
