"""Hostile documents are read in bounded child processes (sandbox.py).

Zip and PDF bombs are refused with 422 naming the limit, a parser killed by a
limit is a 422 (at create) or a failed task (in processing), other users and
the server's own endpoints are served while a bomb is being read, the server's
memory stays bounded, and a user who cannot pay is refused before any parse.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import multiprocessing.forkserver
import os
import re
import subprocess
import sys
import time
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import docx
import pytest
from aiohttp.test_utils import TestClient
from helpers import (
    ServerProcess,
    add_user,
    create,
    form,
    free_port,
    make_user,
    peak_rss_mb,
    wait_status,
)
from pypdf import PdfWriter
from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

import sandbox as sandbox_module
from sandbox import DocumentRefused, DocumentSandbox, ParseLimits
from zhiyi_server import CONFIG, STORE

MB = 1024 * 1024
#: the issue's zip bomb: a ~650 KB .docx whose body is 600 MB of spaces (the slow test)
ISSUE_BOMB_MB = 600
#: a smaller one for the quick tests (its ratio, ~1000 to 1, is the same)
BOMB_MB = 100


def docx_bomb(path: Path, megabytes: int) -> None:
    """A real .docx whose word/document.xml inflates to ``megabytes`` MB (of spaces)."""
    document = docx.Document()
    document.add_paragraph("Hello world.")
    buffer = io.BytesIO()
    document.save(buffer)
    with (zipfile.ZipFile(buffer) as source,
          zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as bomb):
        for item in source.infolist():
            data = source.read(item)
            if item.filename != "word/document.xml":
                bomb.writestr(item, data)
                continue
            head, tail = data.split(b"</w:body>")
            with bomb.open(item.filename, "w", force_zip64=True) as f:
                f.write(head)
                spaces = b" " * MB
                for _ in range(megabytes):
                    f.write(spaces)
                f.write(b"</w:body>" + tail)


def pdf_bomb(pages: int, operations: int) -> bytes:
    """``pages`` pages sharing one content stream of ``operations`` text operations.

    A few KB on disk; extracting its text costs CPU in proportion to pages × operations.
    """
    writer = PdfWriter()
    content = DecodedStreamObject()
    content.set_data(b"BT /F1 1 Tf " + b"(ab) Tj 1 0 Td " * operations + b"ET\n")
    content_ref = writer._add_object(content.flate_encode())
    font_ref = writer._add_object(DictionaryObject({
        NameObject("/Type"): NameObject("/Font"), NameObject("/Subtype"): NameObject("/Type1"),
        NameObject("/BaseFont"): NameObject("/Helvetica")}))
    resources = DictionaryObject({NameObject("/Font"): DictionaryObject(
        {NameObject("/F1"): font_ref})})
    for _ in range(pages):
        page = writer.add_blank_page(612, 792)
        page[NameObject("/Contents")] = content_ref
        page[NameObject("/Resources")] = resources
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


#: about a second of CPU per page (more on a slower machine): minutes for the whole file
CPU_BOMB = pdf_bomb(pages=500, operations=60_000)


@pytest.fixture(scope="session")
def zip_bomb(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("bombs") / "bomb.docx"
    docx_bomb(path, BOMB_MB)
    return path.read_bytes()


@pytest.fixture(scope="session")
def issue_zip_bomb(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("bombs") / "issue-bomb.docx"
    docx_bomb(path, ISSUE_BOMB_MB)
    return path.read_bytes()


async def metric(client: TestClient, name: str) -> float:
    """A sample of /metrics (0 when absent), read as a client would."""
    resp = await client.get("/metrics")
    text = await resp.text()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


async def until_metric(client: TestClient, name: str, value: float) -> None:
    while await metric(client, name) < value:
        await asyncio.sleep(0.05)


async def post_create(client: TestClient, headers: dict[str, str], **kwargs: Any
                      ) -> tuple[int, dict[str, Any]]:
    resp = await client.post("/api/tasks/create", data=form(**kwargs), headers=headers)
    return resp.status, await resp.json()


# ----------------------------------------------------------- refused before inflating
async def test_zip_bomb_refused_from_its_directory(make_client, zip_bomb: bytes) -> None:
    client = await make_client()
    alice = await add_user(client, "alice", 1000)
    status, body = await post_create(client, alice, content=zip_bomb, name="bomb.docx")
    assert status == 422, body
    assert body["code"] == "bad_document"
    assert "MAX_ZIP_RATIO" in body["message"], body["message"]
    assert (await (await client.get("/api/tasks", headers=alice)).json())["tasks"] == []


async def test_zip_limits_name_themselves(make_client, zip_bomb: bytes) -> None:
    client = await make_client(max_zip_ratio=100_000, max_zip_uncompressed_mb=50)
    alice = await add_user(client, "alice", 1000)
    status, body = await post_create(client, alice, content=zip_bomb, name="bomb.docx")
    assert (status, body["code"]) == (422, "bad_document")
    assert "101 MB" in body["message"] and "MAX_ZIP_UNCOMPRESSED_MB" in body["message"]

    crowded = io.BytesIO()
    with zipfile.ZipFile(crowded, "w") as archive:
        for n in range(40):
            archive.writestr(f"part{n}.xml", "<x/>")
    client = await make_client(max_zip_members=30)  # the same database: alice exists
    status, body = await post_create(client, alice, content=crowded.getvalue(), name="many.docx")
    assert (status, body["code"]) == (422, "bad_document")
    assert "40 parts" in body["message"] and "MAX_ZIP_MEMBERS" in body["message"]


async def test_pdf_page_count_capped(make_client) -> None:
    client = await make_client(max_pdf_pages=20)
    alice = await add_user(client, "alice", 1000)
    status, body = await post_create(client, alice, content=pdf_bomb(pages=21, operations=1),
                                     name="long.pdf")
    assert (status, body["code"]) == (422, "bad_document")
    assert "21 pages" in body["message"] and "MAX_PDF_PAGES" in body["message"]
    ok = await create(client, alice, content=pdf_bomb(pages=20, operations=1), name="ok.pdf",
                      task_type="extract")
    done = await wait_status(client, alice, ok["taskId"], "completed", "failed")
    assert done["taskStatus"] == "completed", done


# ------------------------------------------------------------ killed by a limit
async def test_parser_over_the_memory_limit_is_a_422(make_client, zip_bomb: bytes) -> None:
    # The directory checks let it through, so the parser really inflates 100 MB.
    client = await make_client(max_zip_ratio=100_000, max_zip_uncompressed_mb=100_000,
                               parse_memory_mb=50)
    alice = await add_user(client, "alice", 1000)
    status, body = await post_create(client, alice, content=zip_bomb, name="bomb.docx")
    assert (status, body["code"]) == (422, "bad_document"), body
    assert "50 MB" in body["message"] and "PARSE_MEMORY_MB" in body["message"]
    assert await metric(client, "zhiyi_document_parses_running") == 0


async def test_parser_over_the_wall_time_limit_is_killed(make_client) -> None:
    client = await make_client(parse_wall_seconds=0.5, parse_cpu_seconds=3600)
    alice = await add_user(client, "alice", 1000)
    status, body = await post_create(client, alice, content=CPU_BOMB, name="slow.pdf")
    assert (status, body["code"]) == (422, "bad_document"), body
    assert "0.5 s" in body["message"] and "PARSE_WALL_SECONDS" in body["message"]
    assert await metric(client, 'zhiyi_document_parses_total{event="wall_limit"}') == 1
    assert await metric(client, "zhiyi_document_parses_running") == 0


@pytest.mark.slow
async def test_pdf_bomb_while_others_are_served(make_client) -> None:
    """A CPU bomb is read while another user's task completes and the server answers."""
    client = await make_client(parse_workers=2, max_parses_per_user=1, parse_cpu_seconds=4,
                               parse_wall_seconds=3600)
    mallory = await add_user(client, "mallory", 1000)
    bob = await add_user(client, "bob", 1000)

    first = asyncio.ensure_future(post_create(client, mallory, content=CPU_BOMB, name="a.pdf"))
    await until_metric(client, "zhiyi_document_parses_running", 1)
    # Mallory's second bomb waits for her one slot, though the pool has another.
    second = asyncio.ensure_future(post_create(client, mallory, content=CPU_BOMB, name="b.pdf"))
    await until_metric(client, "zhiyi_document_parses_waiting", 1)
    assert await metric(client, "zhiyi_document_parses_running") == 1

    # Meanwhile Bob's small task is priced, processed and downloaded; the server answers.
    created = await create(client, bob, content="Hello world.\n")
    done = await wait_status(client, bob, created["taskId"], "completed", "failed", timeout=600)
    assert done["taskStatus"] == "completed", done
    assert (await client.get(done["resultUrl"], headers=bob)).status == 200
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/static/app.js")).status == 200  # a FileResponse
    assert not first.done()  # all of that happened while the bomb was being read

    for answer in (first, second):
        status, body = await answer
        assert (status, body["code"]) == (422, "bad_document"), body
        assert "4 s" in body["message"] and "PARSE_CPU_SECONDS" in body["message"]
    assert await metric(client, 'zhiyi_document_parses_total{event="cpu_limit"}') == 2
    tasks = (await (await client.get("/api/tasks", headers=mallory)).json())["tasks"]
    assert tasks == []
    me = await (await client.get("/api/me", headers=mallory)).json()
    assert me["credits"] == 1000


async def test_parse_stopped_when_the_request_is_cancelled(make_client) -> None:
    # aiohttp's test server cancels a handler whose client went away; `zhiyi serve`
    # does not, and its polling is tested on a real server below.
    client = await make_client(parse_cpu_seconds=3600, parse_wall_seconds=3600)
    alice = await add_user(client, "alice", 1000)
    await abandon_a_parse(client.make_url(""), alice,
                          lambda name: metric(client, name))
    assert (await (await client.get("/api/tasks", headers=alice)).json())["tasks"] == []


async def abandon_a_parse(base: Any, headers: dict[str, str],
                          read_metric: Callable[[str], Awaitable[float]]) -> None:
    """Send a CPU bomb, close the connection while it is read, see the parser killed."""
    async with aiohttp.ClientSession() as session:
        request = asyncio.ensure_future(session.post(
            f"{str(base).rstrip('/')}/api/tasks/create",
            data=form(content=CPU_BOMB, name="a.pdf"), headers=headers))
        while await read_metric("zhiyi_document_parses_running") < 1:
            await asyncio.sleep(0.05)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
    while await read_metric('zhiyi_document_parses_total{event="abandoned"}') < 1:
        await asyncio.sleep(0.05)
    assert await read_metric("zhiyi_document_parses_running") == 0


@pytest.mark.slow
async def test_real_server_memory_stays_bounded(tmp_path: Path, issue_zip_bomb: bytes) -> None:
    """`zhiyi serve`: the bomb is inflated (checks loosened) in a child, never in the server."""
    server = ServerProcess(free_port(), tmp_path / "data", env={
        "PARSE_MEMORY_MB": "200", "MAX_ZIP_RATIO": "100000", "MAX_ZIP_UNCOMPRESSED_MB": "100000",
        "PARSE_CPU_SECONDS": "3600", "PARSE_WALL_SECONDS": "3600"})
    server.data.mkdir(parents=True)
    token = await make_user(server.data, 1000)
    headers = {"Authorization": f"Bearer {token}"}
    try:
        await asyncio.to_thread(server.start)
        assert server.proc is not None
        baseline = peak_rss_mb(server.proc.pid)
        async with aiohttp.ClientSession(headers=headers) as session:

            async def read_metric(name: str) -> float:
                async with session.get(f"{server.url}/metrics") as resp:
                    text = await resp.text()
                match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
                return float(match.group(1)) if match else 0.0

            async with session.post(f"{server.url}/api/tasks/create",
                                    data=form(content=issue_zip_bomb, name="bomb.docx")) as resp:
                body = await resp.json()
            assert (resp.status, body["code"]) == (422, "bad_document"), body
            assert "PARSE_MEMORY_MB" in body["message"]
            assert await read_metric('zhiyi_document_parses_total{event="memory_limit"}') == 1

            # A real server does not cancel handlers: the parse notices the client left.
            await abandon_a_parse(server.url, headers, read_metric)

            async with session.post(f"{server.url}/api/tasks/create",
                                    data=form(content="Hello world.\n")) as resp:
                assert resp.status == 201, await resp.text()
        growth = peak_rss_mb(server.proc.pid) - baseline
    finally:
        await asyncio.to_thread(server.stop)
    print(f"server peak memory grew by {growth:.0f} MB while a {ISSUE_BOMB_MB} MB bomb was read")
    assert growth < 200, f"the server grew by {growth:.0f} MB, past PARSE_MEMORY_MB"


# --------------------------------------------------------------- balance first
async def test_no_credits_refused_before_any_parse(make_client) -> None:
    # No workers: a worker reading the created task's document would count a parse too.
    client = await make_client(worker_concurrency=0)
    broke = await add_user(client, "broke", 0)
    rich = await add_user(client, "rich", 1_000_000)
    large = ("A sentence of the large document. " * 30 + "\n\n") * 5000  # ~5 MB
    status, body = await post_create(client, broke, content=large, name="big.txt")
    assert (status, body["code"]) == (402, "insufficient_credits"), body
    assert (body["needed"], body["balance"]) == (1, 0)
    assert await metric(client, 'zhiyi_document_parses_total{event="started"}') == 0
    # The same document from a user who can pay is read (so the counter counts).
    await create(client, rich, content=large, name="big.txt")
    assert await metric(client, 'zhiyi_document_parses_total{event="started"}') == 1


async def test_exact_charge_still_checked_after_the_parse(make_client) -> None:
    client = await make_client(worker_concurrency=0)
    poor = await add_user(client, "poor", 2)
    status, body = await post_create(client, poor, content="word " * 1000, name="x.txt")
    assert (status, body["code"]) == (402, "insufficient_credits"), body
    assert (body["needed"], body["balance"]) == (5, 2)
    assert await metric(client, 'zhiyi_document_parses_total{event="started"}') == 1


# ------------------------------------------------------- one parse per task (issue 13)
PARSES = 'zhiyi_document_parses_total{event="started"}'
TWO_LINES = "Hello world.\n\nSecond paragraph.\n"


async def translated(client: TestClient, headers: dict[str, str], task_id: int) -> str:
    task = await wait_status(client, headers, task_id, "completed", "failed")
    assert task["taskStatus"] == "completed", task
    resp = await client.get(f"/api/tasks/{task_id}/result", headers=headers)
    assert resp.status == 200
    return await resp.text()


async def stages(client: TestClient, task_id: int) -> list[str]:
    """The stages the task's events went through, in order."""
    events = await client.app[STORE].events_after(0, task_id=task_id)
    return [e.data["stage"] for e in events if e.data.get("stage")]


async def test_a_translation_reads_its_document_once(make_client) -> None:
    """Pricing parses the file; the attempt uses that parse, and a small plain text is
    rendered from the tokens the parse kept: one parser read per task, also when the
    user's memory holds segments (looked up at create). A document whose tokens are not
    kept (markup) is rendered by a parser, which reads the file again."""
    client = await make_client()
    alice = await add_user(client, "alice", 1000)
    first = await create(client, alice, content=TWO_LINES)
    expected = await translated(client, alice, first["taskId"])
    assert expected.count("\n") == 3 and "Hello" not in expected  # pseudo-translated
    assert await metric(client, PARSES) == 1  # at create only
    assert "parsing" not in await stages(client, first["taskId"])  # nothing parsed

    again = await create(client, alice, content=TWO_LINES)  # both segments remembered now
    assert again["quote"]["fromMemory"] == 2
    assert await translated(client, alice, again["taskId"]) == expected
    assert await metric(client, PARSES) == 2

    marked = await create(client, alice, content="Run `make` now.\n", name="doc.md")
    assert "`make`" in await translated(client, alice, marked["taskId"])
    assert await metric(client, PARSES) == 4  # at create, then the render


async def test_torn_kept_tokens_are_rendered_by_a_parser(make_client) -> None:
    idle = await make_client(worker_concurrency=0)
    alice = await add_user(idle, "alice", 1000)
    created = await create(idle, alice, content=TWO_LINES)
    [tokens] = idle.app[CONFIG].data_path.glob("alice/**/work/doc.txt.tokens.json")
    tokens.write_text(tokens.read_text()[:20])
    worker = await make_client(worker_concurrency=1)  # the same data, with a worker
    text = await translated(worker, alice, created["taskId"])
    assert text.count("\n") == 3 and "Hello" not in text
    assert await metric(worker, PARSES) == 1  # the render, in a parser


@pytest.mark.parametrize("damage", ["removed", "torn", "spool removed"])
async def test_an_attempt_without_the_kept_parse_parses_again(make_client,
                                                              damage: str) -> None:
    idle = await make_client(worker_concurrency=0)
    alice = await add_user(idle, "alice", 1000)
    created = await create(idle, alice, content=TWO_LINES)
    [kept] = idle.app[CONFIG].data_path.glob("alice/**/work/doc.txt.parsed.json")
    if damage == "removed":
        kept.unlink()
    elif damage == "torn":
        kept.write_text(kept.read_text()[:20])
    else:
        kept.with_name("doc.txt.segments.jsonl").unlink()

    worker = await make_client(worker_concurrency=1)  # the same data, with a worker
    text = await translated(worker, alice, created["taskId"])
    assert text.count("\n") == 3 and "Hello" not in text
    # parsed again; the render from the tokens kept at create (the same file's)
    assert await metric(worker, PARSES) == 1
    assert "parsing" in await stages(worker, created["taskId"])


# ------------------------------------------------------------------ processing
async def test_bomb_met_during_processing_fails_the_task(make_client, zip_bomb: bytes) -> None:
    """A document that changed after pricing (or limits that did) fails with bad_document."""
    idle = await make_client(worker_concurrency=0)
    alice = await add_user(idle, "alice", 1000)
    small = io.BytesIO()
    document = docx.Document()
    document.add_paragraph("Hello world.")
    document.save(small)
    created = await create(idle, alice, content=small.getvalue(), name="doc.docx")
    [original] = idle.app[CONFIG].data_path.glob("alice/**/original/doc.docx")
    original.write_bytes(zip_bomb)

    worker = await make_client(worker_concurrency=1)  # the same data, with a worker
    task = await wait_status(worker, alice, created["taskId"], "completed", "failed")
    assert (task["taskStatus"], task["errorCode"]) == ("failed", "bad_document"), task
    assert "MAX_ZIP_RATIO" in task["errorMessage"]
    assert (await (await worker.get("/api/me", headers=alice)).json())["credits"] == 1000


def test_parsers_do_not_run_the_main_script_again(tmp_path: Path) -> None:
    """An embedding app's unguarded main script (the README's example) runs once, not
    once more in every parser process."""
    script = tmp_path / "app_main.py"
    runs = tmp_path / "runs.log"
    document = tmp_path / "doc.txt"
    document.write_text("Hello world.\n")
    script.write_text(f"""
import asyncio
from pathlib import Path
from sandbox import DocumentSandbox

with open({str(runs)!r}, "a") as log:  # what a module-level run_app would be
    log.write("ran\\n")

async def main():
    sandbox = DocumentSandbox()
    await sandbox.start()
    for _ in range(3):
        print((await sandbox.stats(Path({str(document)!r}), user="u")).words)
    await sandbox.close()

asyncio.run(main())
""")
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root)}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2", "2", "2"]
    assert runs.read_text() == "ran\n"


# ------------------------------------------------------------------ warm parsers
@contextlib.asynccontextmanager
async def running_sandbox(limits: ParseLimits | None = None, *, workers: int = 1,
                          **kwargs: Any) -> AsyncIterator[DocumentSandbox]:
    sandbox = DocumentSandbox(limits, workers=workers, **kwargs)
    await sandbox.start()
    try:
        yield sandbox
    finally:
        await sandbox.close()


@pytest.fixture
def note(tmp_path: Path) -> Path:
    """A two-word .txt."""
    path = tmp_path / "note.txt"
    path.write_text("Hello world.\n")
    return path


def _burn_cpu(limits: Any, seconds: float) -> tuple[int, float]:
    """A sandbox job (run in a parser): spend ``seconds`` of CPU time; return the soft
    CPU limit it ran under and the parser's CPU time when it began."""
    import resource

    def used() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    began = used()
    while used() - began < seconds:
        pass
    return resource.getrlimit(resource.RLIMIT_CPU)[0], began


async def test_one_parser_reads_document_after_document(note: Path) -> None:
    async with running_sandbox() as sandbox:
        for _ in range(5):
            assert (await sandbox.stats(note, user="u")).words == 2
        assert sandbox.started == 1


async def test_each_document_gets_the_whole_cpu_limit() -> None:
    """Two reads of 1.5 s of CPU each in one parser, under a 2 s limit: the limit is
    counted per document, not over the parser's life (which would kill the second)."""
    async with running_sandbox(ParseLimits(cpu_seconds=2, wall_seconds=3600)) as sandbox:
        first_limit, _ = await sandbox._run("u", _burn_cpu, (1.5,))
        second_limit, second_began = await sandbox._run("u", _burn_cpu, (1.5,))
        assert sandbox.started == 1  # the same warm parser read both
        assert second_began >= 1.5
        assert second_limit >= second_began + 2 > first_limit


async def test_a_parser_that_hit_a_limit_is_replaced(tmp_path: Path, note: Path,
                                                     zip_bomb: bytes) -> None:
    bomb = tmp_path / "bomb.docx"
    bomb.write_bytes(zip_bomb)
    events: list[str] = []
    limits = ParseLimits(memory_mb=50, max_zip_ratio=100_000, max_zip_uncompressed_mb=100_000)
    async with running_sandbox(limits, observe=events.append) as sandbox:
        assert (await sandbox.stats(note, user="u")).words == 2
        with pytest.raises(DocumentRefused, match="50 MB"):
            await sandbox.stats(bomb, user="u")
        # The parser that ran out of memory retired; a fresh one reads the next document
        # with the whole memory limit again.
        assert (await sandbox.stats(note, user="u")).words == 2
        assert sandbox.started == 2
        assert events == ["started", "ok", "started", "memory_limit", "started", "ok"]


async def test_a_parser_killed_while_idle_is_replaced(note: Path) -> None:
    """A parser that dies between documents is replaced; the next document, which it
    never saw, is read by a fresh one rather than refused."""
    async with running_sandbox() as sandbox:
        await sandbox.stats(note, user="u")
        [parser] = sandbox._idle
        os.kill(parser._process.pid, 9)
        while not parser.dead:  # its end of file reaches the loop
            await asyncio.sleep(0.01)
        assert (await sandbox.stats(note, user="u")).words == 2
        assert sandbox.started == 2
        assert parser.exitcode == -9  # reaped


async def test_a_parser_that_dies_reading_is_a_refused_document(note: Path) -> None:
    """Death mid-read (here: the process ends itself) is the document's refusal, with
    the way it ended; the parser after it is a fresh one."""
    async with running_sandbox() as sandbox:
        with pytest.raises(DocumentRefused, match="exit status 7"):
            await sandbox._run("u", _exit_now, (7,))
        assert (await sandbox.stats(note, user="u")).words == 2
        assert sandbox.started == 2


def _exit_now(limits: Any, status: int) -> None:
    """A sandbox job (run in a parser) that ends the process without an answer."""
    os._exit(status)


@pytest.mark.parametrize("paragraphs", [3, 3000])
async def test_render_sends_short_translations_along_and_long_ones_by_file(
        tmp_path: Path, paragraphs: int) -> None:
    """3 paragraphs go with the request, 3,000 (~60 KB) through a file: the same result."""
    document = tmp_path / "doc.txt"
    document.write_text("".join(f"Paragraph number {n}.\n\n" for n in range(paragraphs)))
    translations = [f"Paragraphe {n}." for n in range(paragraphs)]
    assert sandbox_module._fits_in_a_request(translations) == (paragraphs == 3)
    async with running_sandbox() as sandbox:
        parsed = await sandbox.open(document, user="u", work_dir=tmp_path)
        out = tmp_path / "out.txt"
        await parsed.render(translations, out)
        assert out.read_text() == "".join(f"{t}\n\n" for t in translations)
        leftovers = await asyncio.to_thread(lambda: list(tmp_path.glob("*.translations.jsonl")))
        assert not leftovers  # the file, if any, is gone


async def test_parsers_retire_after_their_share_of_documents(note: Path) -> None:
    async with running_sandbox(ParseLimits(parser_documents=3)) as sandbox:
        for _ in range(7):
            await sandbox.stats(note, user="u")
        assert sandbox.started == 3  # 3 + 3 + 1 documents


async def test_a_parser_that_grew_retires_after_the_document(note: Path) -> None:
    async with running_sandbox(ParseLimits(parser_growth_mb=64)) as sandbox:
        for _ in range(3):
            await sandbox.stats(note, user="u")
        # Under the growth limit (with this module, which the parser imports to run the
        # job): the parser stays.
        await sandbox._run("u", _keep_memory, (1,))
        await sandbox.stats(note, user="u")
        assert sandbox.started == 1
        await sandbox._run("u", _keep_memory, (100,))  # past it: retires after answering
        await sandbox.stats(note, user="u")
        assert sandbox.started == 2


_KEPT: list[bytearray] = []


def _keep_memory(limits: Any, megabytes: int) -> None:
    """A sandbox job (run in a parser) that allocates memory and keeps it, as a leak would."""
    _KEPT.append(bytearray(megabytes * MB))


async def test_parsers_killed_under_load_lose_no_read_and_leak_nothing(tmp_path: Path) -> None:
    """60 reads over 2 parsers while parsers are killed from outside: every read ends
    (an answer, or a refusal naming SIGKILL for a document being read when its parser
    died), nothing stays running, and every parser process is reaped."""
    document = tmp_path / "doc.txt"
    document.write_text("Hello world. " * 2000 + "\n")
    async with running_sandbox(workers=2, per_user=2) as sandbox:
        reads = [asyncio.ensure_future(sandbox.stats(document, user=f"u{n % 3}"))
                 for n in range(60)]
        kills = 0
        while not all(read.done() for read in reads) and kills < 5:
            running = [p for p in sandbox._busy | set(sandbox._idle) if not p.dead]
            if running:
                os.kill(running[0]._process.pid, 9)
                kills += 1
            await asyncio.sleep(0.005)
        results = await asyncio.gather(*reads, return_exceptions=True)
        refused = [r for r in results if isinstance(r, DocumentRefused)]
        print(f"{kills} parsers killed, {len(refused)} reads refused, {sandbox.started} started")
        assert all("SIGKILL" in str(r) for r in refused), refused
        assert len(refused) <= kills
        assert [r.words for r in results if not isinstance(r, BaseException)] == [4000] * (
            60 - len(refused))
        assert sandbox.in_flight == 0 and len(sandbox._idle) <= 2
        assert (await sandbox.stats(document, user="u")).words == 4000
    # Every parser (a child of the forkserver) has been killed and reaped: none lives on.
    forkserver = multiprocessing.forkserver._forkserver._forkserver_pid
    deadline = time.monotonic() + 10
    while (parsers := children_of(forkserver)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not parsers


def children_of(pid: int) -> list[int]:
    """The PIDs whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found
