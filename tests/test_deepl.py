"""The DeepL engine against a loopback fake of DeepL's API v2 (tests/fakes.py)."""

from __future__ import annotations

import aiohttp
import pytest
from fakes import FakeDeepL
from helpers import add_user, create, wait_status

from engines import EngineError, EngineSettings, engine_statuses, make_engine


def settings_for(fake: FakeDeepL, server, **extra) -> EngineSettings:
    return EngineSettings(deepl_api_key=fake.api_key, deepl_api_url=fake.url(server),
                          retry_base_seconds=0.01, max_retries=2, **extra)


async def test_deepl_sends_batches_in_order_with_its_key(aiohttp_server) -> None:
    fake = FakeDeepL(api_key="secret:fx")
    server = await aiohttp_server(fake.app)
    texts = [f"Sentence {i} with {{name}}." for i in range(60)]
    async with aiohttp.ClientSession() as session:
        engine = make_engine("deepl", settings_for(fake, server), session)
        out = await engine.translate(texts, "en", "de")
    assert out == [f"<de>{t}" for t in texts]
    assert [len(r.segments) for r in fake.requests] == [25, 25, 10]
    first = fake.requests[0]
    assert first.headers["Authorization"] == "DeepL-Auth-Key secret:fx"
    assert first.body["target_lang"] == "DE" and first.body["source_lang"] == "EN"
    assert "[X0X]" in first.segments[0]  # placeholders travel as tokens


async def test_deepl_waits_out_retry_after_and_auto_source(aiohttp_server) -> None:
    fake = FakeDeepL()
    server = await aiohttp_server(fake.app)
    fake.fail_next(429, times=3, retry_after="0")
    async with aiohttp.ClientSession() as session:
        engine = make_engine("deepl", settings_for(fake, server), session)
        assert await engine.translate(["Hello."], "auto", "fr") == ["<fr>Hello."]
    assert len(fake.requests) == 4
    assert "source_lang" not in fake.requests[-1].body  # DeepL detects it


@pytest.mark.parametrize(("status", "words"), [(456, "quota"), (403, "DEEPL_API_KEY")])
async def test_deepl_quota_and_key_errors_are_clear_failures(aiohttp_server, status,
                                                             words) -> None:
    fake = FakeDeepL(quota_left=0) if status == 456 else FakeDeepL(api_key="right")
    server = await aiohttp_server(fake.app)
    settings = settings_for(fake, server)
    if status == 403:
        settings = EngineSettings(deepl_api_key="wrong", deepl_api_url=fake.url(server))
    async with aiohttp.ClientSession() as session:
        engine = make_engine("deepl", settings, session)
        with pytest.raises(EngineError) as caught:
            await engine.translate(["Hello."], "en", "fr")
    assert words in str(caught.value) and f"HTTP {status}" in str(caught.value)
    assert len(fake.requests) == 1  # not retried


async def test_deepl_glossary_is_made_once_and_used(aiohttp_server) -> None:
    fake = FakeDeepL()
    server = await aiohttp_server(fake.app)
    terms = [("widget", "Gerät"), ("Zhiyi", "Zhiyi")]
    async with aiohttp.ClientSession() as session:
        engine = make_engine("deepl", settings_for(fake, server), session)
        first = await engine.translate(["A widget.", "No term."], "en", "de", glossary=terms)
        second = await engine.translate(["Two widgets? One Widget."], "en", "de",
                                        glossary=terms)
        with pytest.raises(EngineError, match="sourceLang"):
            await engine.translate(["A widget."], "auto", "de", glossary=terms)
    assert first == ["<de>A Gerät.", "<de>No term."]
    assert second == ["<de>Two widgets? One Gerät."]
    assert list(fake.glossaries) == ["g1"]
    assert fake.glossaries["g1"][2] == terms
    assert {r.body.get("glossary_id") for r in fake.requests} == {"g1"}


def test_deepl_status_names_the_variable() -> None:
    status = {s.name: s for s in engine_statuses(EngineSettings())}["deepl"]
    assert not status.available and "DEEPL_API_KEY" in (status.reason or "")
    status = {s.name: s for s in engine_statuses(EngineSettings(deepl_api_key="k"))}["deepl"]
    assert status.available


async def test_deepl_through_the_server_and_quota_refund(make_client, aiohttp_server) -> None:
    fake = FakeDeepL(quota_left=60)
    server = await aiohttp_server(fake.app)
    client = await make_client(deepl_api_key=fake.api_key, deepl_api_url=fake.url(server))
    headers = await add_user(client, credits=10)
    params = {"targetLang": "de", "engine": "deepl", "sourceLang": "en"}
    created = await create(client, headers, content="Hello world.\n\nSecond one.\n",
                           params=params)
    task = await wait_status(client, headers, created["taskId"], "completed", "failed")
    assert task["taskStatus"] == "completed", task
    result = await (await client.get(task["resultUrl"], headers=headers)).text()
    assert result == "<de>Hello world.\n\n<de>Second one.\n"
    created = await create(client, headers, content="A much longer text. " * 10,
                           params=params)
    task = await wait_status(client, headers, created["taskId"], "failed")
    assert task["errorCode"] == "engine_error" and "quota" in task["errorMessage"]
    resp = await client.get("/api/me", headers=headers)
    assert (await resp.json())["credits"] == 10 - 1  # the failed task was refunded
