"""Concurrent batches: per-task and per-engine limits, AIMD on 429, resume by segment.

The engine is a real loopback LibreTranslate fake with its own concurrency cap
(429 past it); counts and order are asserted, never durations.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
from fakes import FakeLibreTranslate
from helpers import (
    ServerProcess,
    add_user,
    create,
    free_port,
    make_user,
    poll_until_ended,
    wait_status,
)

from engines import AdaptiveLimit, EngineSettings, make_engine

PARAMS = {"targetLang": "fr", "engine": "libretranslate"}


def paragraphs(n: int, tag: str = "") -> list[str]:
    return [f"Paragraph {tag}{i} says hello." for i in range(n)]


async def result_text(client, headers, task_id: int) -> str:
    task = await wait_status(client, headers, task_id, "completed", "failed")
    assert task["taskStatus"] == "completed", task
    resp = await client.get(task["resultUrl"], headers=headers)
    return await resp.text()


async def ledger(client, headers) -> list[dict]:
    resp = await client.get("/api/me/ledger?limit=100", headers=headers)
    return (await resp.json())["entries"]


# ------------------------------------------------------------------ the limiter


async def test_adaptive_limit_cuts_once_per_round_and_grows_back_slowly() -> None:
    limit = AdaptiveLimit(10)
    slots = [limit.slot() for _ in range(10)]
    held = [await s.__aenter__() for s in slots]
    assert limit.inflight == 10 and limit.slots == 10
    # Four answers of the same round are rate limited: one cut (x 0.8), not four.
    for slot in held[:4]:
        slot.rate_limited()
    assert limit.slots == 8 and limit.decreases == 1
    # Answers to requests sent before the cut neither cut again nor grow the limit.
    for s in slots:
        await s.__aexit__(None, None, None)
    assert limit.limit == 8.0
    # A request of the new round that is rejected cuts again: 8 x 0.8 = 6.4.
    async with limit.slot() as slot:
        slot.rate_limited()
    assert limit.slots == 6 and limit.decreases == 2
    # Additive increase: about one slot per round of successes (6.4 + 1/6.4 + ...).
    async with limit.slot():
        pass
    assert limit.slots == 6
    for _ in range(3):
        async with limit.slot():
            pass
    assert limit.slots == 7
    # Within one slot of the rejected 8, growth is 8 times slower: a capped engine is
    # probed rarely.
    for _ in range(10):
        async with limit.slot():
            pass
    assert limit.slots == 7
    for _ in range(1000):
        async with limit.slot():
            pass
    assert limit.slots == 10  # never above the maximum


async def test_adaptive_limit_admits_in_order_and_survives_cancelled_waiters() -> None:
    limit = AdaptiveLimit(1)
    order: list[int] = []
    first = limit.slot()
    await first.__aenter__()

    async def request(n: int) -> None:
        async with limit.slot():
            order.append(n)
            await asyncio.sleep(0)

    waiting = [asyncio.create_task(request(n)) for n in range(4)]
    await asyncio.sleep(0)
    waiting[1].cancel()  # a task cancelled while waiting gives up its place
    await first.__aexit__(None, None, None)
    await asyncio.gather(*waiting, return_exceptions=True)
    assert order == [0, 2, 3]
    assert limit.inflight == 0 and limit.peak == 1


async def test_engine_waits_out_429_without_spending_retries(aiohttp_server) -> None:
    fake = FakeLibreTranslate()
    server = await aiohttp_server(fake.app)
    # More 429s than max_retries allows failures: a rate limit is not a failure.
    fake.fail_next(429, times=5, retry_after="0")
    settings = EngineSettings(libretranslate_url=fake.url(server), max_retries=1,
                              retry_base_seconds=0.01)
    async with aiohttp.ClientSession() as session:
        engine = make_engine("libretranslate", settings, session)
        assert await engine.translate(["Hello."], "en", "fr") == ["<fr>Hello."]
    assert len(fake.requests) == 6


# ----------------------------------------------------------------- one task


async def test_one_task_keeps_engine_concurrency_batches_in_flight(make_client,
                                                                   aiohttp_server) -> None:
    fake = FakeLibreTranslate()
    server = await aiohttp_server(fake.app)
    client = await make_client(libretranslate_url=fake.url(server), engine_concurrency=3)
    headers = await add_user(client, credits=100)
    texts = paragraphs(200)  # 8 batches of 25
    fake.hold()
    created = await create(client, headers, content="\n\n".join(texts), params=PARAMS)
    # Held requests pile up to exactly the per-task limit, and no further.
    async with asyncio.timeout(30):
        while fake.inflight < 3:
            await asyncio.sleep(0.01)
    fake.release()
    text = await result_text(client, headers, created["taskId"])
    assert text.split("\n\n") == [f"<fr>{p}" for p in texts]
    assert fake.max_inflight == 3
    assert len(fake.requests) == 8
    assert sorted(fake.segments) == sorted(texts)  # each sent once
    charges = [e for e in await ledger(client, headers) if e["reason"] == "charge"]
    assert [e["taskId"] for e in charges] == [created["taskId"]]


async def test_tasks_against_a_capped_engine_lose_nothing_and_send_nothing_twice(
        make_client, aiohttp_server) -> None:
    # The engine works on 3 requests at once and refuses the rest with 429; three
    # tasks of 4 batches in flight each start by asking for 12.
    fake = FakeLibreTranslate(latency=0.05, capacity=3, retry_after="0.05")
    server = await aiohttp_server(fake.app)
    client = await make_client(libretranslate_url=fake.url(server), engine_concurrency=4,
                               engine_max_inflight=16, worker_concurrency=3)
    headers = await add_user(client, credits=100)
    documents = [paragraphs(150, tag=f"{n}-") for n in range(3)]
    fake.hold()
    ids = [(await create(client, headers, content="\n\n".join(d), name=f"d{n}.txt",
                         params=PARAMS))["taskId"] for n, d in enumerate(documents)]
    async with asyncio.timeout(30):
        while fake.refused == 0:
            await asyncio.sleep(0.01)
    fake.release()
    for task_id, texts in zip(ids, documents, strict=True):
        text = await result_text(client, headers, task_id)
        assert text.split("\n\n") == [f"<fr>{p}" for p in texts]
    assert fake.refused > 0 and fake.max_inflight == 3
    # Every segment was translated exactly once: refused requests did no work.
    everything = [p for d in documents for p in d]
    assert Counter(fake.answered) == Counter(everything)
    entries = await ledger(client, headers)
    assert Counter(e["taskId"] for e in entries if e["reason"] == "charge") == dict.fromkeys(
        ids, 1)
    assert not [e for e in entries if e["reason"] == "refund"]


async def test_a_batch_failing_for_good_stops_the_others_and_refunds(make_client,
                                                                     aiohttp_server) -> None:
    fake = FakeLibreTranslate(api_key="right")
    server = await aiohttp_server(fake.app)
    client = await make_client(libretranslate_url=fake.url(server), engine_concurrency=4)
    headers = await add_user(client, credits=100)
    created = await create(client, headers, content="\n\n".join(paragraphs(200)),
                           params=PARAMS)
    task = await wait_status(client, headers, created["taskId"], "failed")
    assert task["errorCode"] == "engine_error" and "API key" in task["errorMessage"]
    assert (await (await client.get("/api/me", headers=headers)).json())["credits"] == 100


# ------------------------------------------------------------------ kill -9


def journalled(data: Path) -> int:
    return sum(len(p.read_bytes().splitlines()) for p in data.glob("*/**/work/translated.jsonl"))


@pytest.mark.slow
async def test_kill_9_during_concurrent_batches_resends_only_what_was_in_flight(
        tmp_path: Path, aiohttp_server) -> None:
    fake = FakeLibreTranslate(latency=0.05)
    fake_server = await aiohttp_server(fake.app)
    proc = ServerProcess(free_port(), tmp_path / "data", env={
        "LIBRETRANSLATE_URL": fake.url(fake_server), "ENGINE_CONCURRENCY": "4"})
    proc.data.mkdir(parents=True)
    token = await make_user(proc.data, 100)
    texts = paragraphs(400)
    try:
        await asyncio.to_thread(proc.start)
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as s:
            form = aiohttp.FormData()
            form.add_field("taskType", "translate")
            form.add_field("params", json.dumps(PARAMS))
            form.add_field("file", "\n\n".join(texts).encode(), filename="long.txt")
            async with s.post(f"{proc.url}/api/tasks/create", data=form) as resp:
                task_id = (await resp.json())["taskId"]
            await fake.wait_for_requests(6, within=30)
            fake.hold()
            # Wait until every answered batch is in the journal and 4 batches are in
            # flight: those 4 are all the kill may lose.
            async with asyncio.timeout(30):
                while fake.inflight < 4 or journalled(proc.data) < len(fake.answered):
                    await asyncio.sleep(0.02)
            answered_before = set(fake.answered)
            in_flight = {t for r in fake.requests[-4:] for t in r.segments}
            await asyncio.to_thread(proc.kill)
            fake.release()
            await asyncio.to_thread(proc.start)
            async with asyncio.timeout(60):
                task = await poll_until_ended(s, proc.url, task_id)
            assert task["taskStatus"] == "completed", task
            async with s.get(f"{proc.url}{task['resultUrl']}") as resp:
                result = await resp.text()
            async with s.get(f"{proc.url}/api/me/ledger") as resp:
                entries = (await resp.json())["entries"]
    finally:
        await asyncio.to_thread(proc.stop)
    assert result.split("\n\n") == [f"<fr>{p}" for p in texts]
    counts = Counter(fake.segments)
    assert set(counts) == set(texts)
    resent = {t for t, n in counts.items() if n > 1}
    assert answered_before and not resent & answered_before
    assert resent <= in_flight and all(n == 2 for n in counts.values() if n > 1)
    assert [e["reason"] for e in entries] == ["charge", "grant"]
