"""Glossaries: terms come out as given, for every engine, through the real server.

Engines are the pseudo engine and loopback fakes of LibreTranslate, an
OpenAI-compatible API and DeepL (tests/fakes.py).
"""

from __future__ import annotations

import io

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from fakes import FakeDeepL, FakeLibreTranslate, FakeOpenAI
from helpers import add_user, create, form, wait_status

from translation_memory import BadGlossary, TermPlan, parse_glossary

CSV = "source,target\nwidget,Gerät\nZhiyi,Zhiyi\nhard disk,Festplatte\n"
TEXT = ("The widget is new.\n\nZhiyi ships a Widget and another widget.\n\n"
        "Nothing to see here.\n")


def glossary_form(content: bytes | str, *, name: str = "tech", file_name: str = "terms.csv",
                  source: str = "en", target: str = "de") -> aiohttp.FormData:
    data = aiohttp.FormData()
    for key, value in (("name", name), ("sourceLang", source), ("targetLang", target)):
        data.add_field(key, value)
    raw = content.encode() if isinstance(content, str) else content
    data.add_field("file", io.BytesIO(raw), filename=file_name)
    return data


async def upload(client: TestClient, headers, content=CSV, **kwargs) -> dict:
    resp = await client.post("/api/glossaries", data=glossary_form(content, **kwargs),
                             headers=headers)
    body = await resp.json()
    assert resp.status in (200, 201), body
    return body


async def translated(client: TestClient, headers, params: dict) -> tuple[dict, str]:
    created = await create(client, headers, content=TEXT, params=params)
    task = await wait_status(client, headers, created["taskId"], "completed", "failed")
    assert task["taskStatus"] == "completed", task
    result = await client.get(task["resultUrl"], headers=headers)
    return task, await result.text()


@pytest.mark.parametrize("engine", ["pseudo", "libretranslate", "openai", "deepl"])
async def test_terms_come_out_as_given_for_every_engine(make_client, aiohttp_server,
                                                        engine: str) -> None:
    settings: dict = {}
    fake = None
    if engine == "libretranslate":
        fake = FakeLibreTranslate()
        settings = {"libretranslate_url": fake.url(await aiohttp_server(fake.app))}
    elif engine == "openai":
        fake = FakeOpenAI()
        settings = {"openai_base_url": fake.url(await aiohttp_server(fake.app))}
    elif engine == "deepl":
        fake = FakeDeepL()
        settings = {"deepl_api_key": fake.api_key,
                    "deepl_api_url": fake.url(await aiohttp_server(fake.app))}
    client = await make_client(**settings)
    headers = await add_user(client, credits=100)
    await upload(client, headers)
    task, text = await translated(client, headers, {"targetLang": "de", "engine": engine,
                                                    "glossary": "tech"})
    paragraphs = text.strip().split("\n\n")
    assert paragraphs[0].count("Gerät") == 1 and paragraphs[1].count("Gerät") == 2
    assert "Zhiyi" in paragraphs[1]
    assert "widget" not in text.lower()
    assert "4 glossary terms applied (2 distinct)" in task["statusMessage"]
    if engine == "deepl":
        assert fake is not None and len(fake.glossaries) == 1  # DeepL's own glossary
    elif fake is not None:
        # Terms travelled as placeholders: the engine never saw them.
        assert not any("widget" in s.lower() for s in fake.segments)


async def test_glossary_upload_list_get_delete_and_bad_input(client: TestClient) -> None:
    headers = await add_user(client)
    created = await upload(client, headers)
    assert created["glossary"] | {"createdAt": None} == {
        "name": "tech", "sourceLang": "en", "targetLang": "de", "terms": 3, "createdAt": None}
    tbx = ('<?xml version="1.0"?><martif type="TBX" xml:lang="en"><text><body>'
           '<termEntry><langSet xml:lang="en"><tig><term>gizmo</term></tig></langSet>'
           '<langSet xml:lang="de"><tig><term>Dings</term></tig></langSet></termEntry>'
           '</body></text></martif>')
    resp = await client.post("/api/glossaries", headers=headers,
                             data=glossary_form(tbx, name="tech", file_name="t.tbx"))
    assert resp.status == 200 and (await resp.json())["glossary"]["terms"] == 1  # replaced
    resp = await client.get("/api/glossaries/tech", headers=headers)
    assert (await resp.json())["glossary"]["entries"] == [{"source": "gizmo",
                                                           "target": "Dings"}]
    listed = await (await client.get("/api/glossaries", headers=headers)).json()
    assert [g["name"] for g in listed["glossaries"]] == ["tech"]

    for content, file_name, code in (("one column only\n", "x.csv", "bad_glossary"),
                                     ("a,b\n", "x.pdf", "bad_glossary"),
                                     ("<nope", "x.tbx", "bad_glossary"),
                                     (b"\xff\xfe\x00", "x.csv", "bad_glossary")):
        resp = await client.post("/api/glossaries", headers=headers,
                                 data=glossary_form(content, file_name=file_name, name="bad"))
        body = await resp.json()
        assert resp.status == 422 and body["code"] == code, body
    resp = await client.post("/api/glossaries", headers=headers,
                             data=glossary_form(CSV, name="x", source="auto"))
    assert resp.status == 400
    resp = await client.post("/api/glossaries", headers=headers,
                             data=glossary_form(CSV, name="a/b"))
    assert resp.status == 400

    # A task naming a missing glossary, or one for another pair, is refused at create.
    for params, words in (({"glossary": "nope"}, "no glossary called 'nope'"),
                          ({"glossary": "tech", "targetLang": "fr"}, "en to de")):
        resp = await client.post("/api/tasks/create", headers=headers, data=form(
            TEXT, params={"targetLang": "de", "engine": "pseudo", **params}))
        body = await resp.json()
        assert resp.status == 400 and body["code"] == "unknown_glossary", body
        assert words in body["message"]
    assert (await client.delete("/api/glossaries/tech", headers=headers)).status == 200
    assert (await client.delete("/api/glossaries/tech", headers=headers)).status == 404
    assert (await client.get("/api/glossaries/tech", headers=headers)).status == 404


async def test_translations_with_a_glossary_are_remembered_apart(make_client,
                                                                 aiohttp_server) -> None:
    fake = FakeLibreTranslate()
    client = await make_client(libretranslate_url=fake.url(await aiohttp_server(fake.app)))
    headers = await add_user(client, credits=100)
    await upload(client, headers)
    params = {"targetLang": "de", "sourceLang": "en", "engine": "libretranslate"}
    await translated(client, headers, params)
    sent = len(fake.segments)
    task, text = await translated(client, headers, {**params, "glossary": "tech"})
    assert len(fake.segments) == 2 * sent  # not served from the plain memory
    assert "Gerät" in text
    task, again = await translated(client, headers, {**params, "glossary": "tech"})
    assert len(fake.segments) == 2 * sent and again == text  # from the glossary's memory
    assert task["creditsCost"] == 0


def test_term_plan_whole_words_longest_first_any_case() -> None:
    plan = TermPlan([("disk", "Platte"), ("hard disk", "Festplatte"), ("C++", "C++")])
    protected, targets = plan.protect("A Hard Disk, a disk, diskette, and C++.")
    assert targets == ["Festplatte", "Platte", "C++"]
    assert "diskette" in protected and "Hard" not in protected
    assert plan.restore(protected, targets) == "A Festplatte, a Platte, diskette, and C++."
    assert plan.find("No terms.") == []


def test_csv_with_semicolons_and_header_of_language_codes() -> None:
    pairs = parse_glossary("en;de\nwidget;Gerät\n".encode(), "t.csv", "en", "de")
    assert pairs == [("widget", "Gerät")]
    with pytest.raises(BadGlossary, match="no term pairs"):
        parse_glossary(b"source,target\n", "t.csv", "en", "de")
