"""``zhiyi submit``, ``zhiyi tasks`` and ``zhiyi login`` against real server subprocesses.

Also the client layer on its own: the SSE parser, Content-Disposition names, and
:class:`client.ZhiyiClient` against a real server.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from page_helpers import (
    REPO,
    FakeEngine,
    ZhiyiServer,
    api,
    base_env,
    create_task,
    slow_document,
    wait_until,
)

from client import (
    SSEEvent,
    SSEParser,
    ZhiyiClient,
    ZhiyiError,
    _disposition_name,
    resolve_settings,
)

# Real server subprocesses (and a slow fake engine) for most tests here.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

MakeServer = Callable[..., ZhiyiServer]


@pytest.fixture(scope="module")
def engine() -> Iterator[FakeEngine]:
    fake = FakeEngine(delay=0.3).start()
    yield fake
    fake.stop()


@pytest.fixture
def make_server(tmp_path: Path, engine: FakeEngine) -> Iterator[MakeServer]:
    """``make_server(**env)``: a started server whose ``openai`` engine is the fake."""
    servers: list[ZhiyiServer] = []

    def make(key: str | None = None, **env: str) -> ZhiyiServer:
        data = tmp_path / f"data{len(servers)}"
        server = ZhiyiServer(data, env={**engine.server_env(key), **env})
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def server(make_server: MakeServer) -> ZhiyiServer:
    return make_server()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


def cli_env(tmp_path: Path, server: ZhiyiServer | None = None, **extra: str) -> dict[str, str]:
    env = base_env(PYTHONPATH=str(REPO), XDG_CONFIG_HOME=str(tmp_path / "config"), **extra)
    if server is not None:
        env.update(ZHIYI_SERVER=server.url, ZHIYI_TOKEN=server.local_token)
    return env


def zhiyi(*args: str, cwd: Path, env: dict[str, str],
          timeout: float = 90) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run([sys.executable, "-m", "zhiyi_server", *args], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"zhiyi {' '.join(args)} did not finish in {timeout} s:\n"
                             f"{e.stdout}\n{e.stderr}") from None


def zhiyi_background(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "zhiyi_server", *args], cwd=cwd, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen[str], timeout: float = 90) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        raise AssertionError(f"zhiyi did not finish:\n{out}\n{err}") from None
    return process.returncode, out, err


def only_task(server: ZhiyiServer) -> dict[str, Any]:
    _, body, _ = api(server.url, server.local_token, "GET", "api/tasks")
    return body["tasks"][0] if body and body["tasks"] else {}


def running(server: ZhiyiServer) -> dict[str, Any]:
    """Wait until the (only) task is processing and has made progress."""
    return wait_until(lambda: (t := only_task(server)) and t["taskStatus"] == "processing"
                      and t["progressPercent"] > 0 and t, 30, what="a running task")


def translate_args(doc: Path, engine: str = "openai") -> list[str]:
    return ["submit", str(doc), "--type", "translate", "--param", "targetLang=zh",
            "--param", f"engine={engine}"]


# ------------------------------------------------------------------- submit
def test_submit_completes_and_downloads(server: ZhiyiServer, tmp_path: Path,
                                        workdir: Path) -> None:
    doc = slow_document(workdir / "notes.txt", 60)
    done = zhiyi(*translate_args(doc), cwd=workdir, env=cli_env(tmp_path, server))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    task = only_task(server)
    assert task["taskStatus"] == "completed"
    assert f"task {task['taskId']} created ({task['creditsCost']} credits)" in done.stdout
    assert "[100%] completed" in done.stdout  # plain lines: stdout is not a terminal
    # The translation is named for its language, beside the original.
    result = workdir / "notes.zh.txt"
    assert f"saved {result}" in done.stdout
    _, _, served = api(server.url, server.local_token, "GET",
                       f"api/tasks/{task['taskId']}/result")
    assert result.read_bytes() == served
    assert "[zh] Paragraph 59" in result.read_text(encoding="utf-8")
    assert doc.read_text(encoding="utf-8").startswith("Paragraph 0")

    out = tmp_path / "explicit.txt"
    again = zhiyi("submit", str(doc), "--type", "extract", "-o", str(out),
                  cwd=workdir, env=cli_env(tmp_path, server))
    assert again.returncode == 0, again.stderr
    assert out.read_text(encoding="utf-8").startswith("Paragraph 0")


def test_submit_survives_server_restart(server: ZhiyiServer, tmp_path: Path,
                                        workdir: Path) -> None:
    doc = slow_document(workdir / "long.txt", 400)
    process = zhiyi_background(*translate_args(doc), cwd=tmp_path, env=cli_env(tmp_path, server))
    try:
        task = running(server)
        server.kill()  # a crash, by PID
        server.start()  # same port, same data
    finally:
        code, out, err = finish(process)
    assert code == 0, err
    assert "reconnecting" in out
    final = only_task(server)
    assert final["taskId"] == task["taskId"] and final["taskStatus"] == "completed"
    result = tmp_path / "long.zh.txt"
    assert result.read_text(encoding="utf-8").count("[zh] Paragraph") == 400


def test_failed_task_exits_1_with_the_message(make_server: MakeServer, tmp_path: Path,
                                              workdir: Path) -> None:
    server = make_server(key="sk-wrong", MAX_ATTEMPTS="1")
    doc = slow_document(workdir / "doomed.txt", 10)
    done = zhiyi(*translate_args(doc), cwd=workdir, env=cli_env(tmp_path, server))
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    task = only_task(server)
    assert task["taskStatus"] == "failed"
    assert lines[0] == f"zhiyi: task {task['taskId']} failed: {task['errorMessage']}"
    assert "API key" in lines[0]
    assert not (workdir / "doomed.zh.txt").exists()


def test_cancelled_from_elsewhere_exits_1(server: ZhiyiServer, tmp_path: Path,
                                          workdir: Path) -> None:
    doc = slow_document(workdir / "long.txt", 400)
    process = zhiyi_background(*translate_args(doc), cwd=workdir, env=cli_env(tmp_path, server))
    try:
        task = running(server)
        status, _, _ = api(server.url, server.local_token, "POST",
                           f"api/tasks/{task['taskId']}/cancel")
        assert status == 200
    finally:
        code, _, err = finish(process)
    assert code == 1
    assert err == f"zhiyi: task {task['taskId']} was cancelled\n"


@pytest.mark.parametrize("answer", ["y", "n"])
def test_ctrl_c_asks_whether_to_cancel(server: ZhiyiServer, tmp_path: Path, workdir: Path,
                                       answer: str) -> None:
    doc = slow_document(workdir / "long.txt", 400)
    process = zhiyi_background(*translate_args(doc), cwd=workdir, env=cli_env(tmp_path, server))
    try:
        task = running(server)
        os.kill(process.pid, signal.SIGINT)
        assert process.stdin is not None
        process.stdin.write(answer + "\n")
        process.stdin.flush()
    finally:
        code, out, err = finish(process)
    assert "Cancel the task on the server? [y/N]" in out
    if answer == "y":
        assert code == 1
        assert err == f"zhiyi: task {task['taskId']} was cancelled\n"
        assert only_task(server)["taskStatus"] == "cancelled"
    else:
        assert code == 130
        assert f"task {task['taskId']} is still running" in out
        wait_until(lambda: only_task(server)["taskStatus"] == "completed", 60,
                   what="the task left running to complete")


# ------------------------------------------------------------ tasks, login
def test_tasks_lists_the_users_tasks(server: ZhiyiServer, tmp_path: Path) -> None:
    first = create_task(server.url, server.local_token, slow_document(tmp_path / "a.txt", 3),
                        "analyze")
    second = create_task(server.url, server.local_token, slow_document(tmp_path / "b.txt", 3),
                         "extract")
    done = zhiyi("tasks", cwd=tmp_path, env=cli_env(tmp_path, server))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split("\t") == ["id", "status", "progress", "type", "file", "credits",
                                    "created", "message"]
    rows = [line.split("\t") for line in lines[1:]]
    assert [r[0] for r in rows] == [str(second["taskId"]), str(first["taskId"])]
    assert [(r[3], r[4]) for r in rows] == [("extract", "b.txt"), ("analyze", "a.txt")]
    limited = zhiyi("tasks", "--limit", "1", cwd=tmp_path, env=cli_env(tmp_path, server))
    assert len(limited.stdout.splitlines()) == 2
    # Every user's tasks: administrators only, with a user column.
    env = cli_env(tmp_path, server)
    refused = zhiyi("tasks", "--all", cwd=tmp_path, env=env)
    assert refused.returncode == 1 and "zhiyi user admin NAME" in refused.stderr
    data = ["--data", str(server.data_dir)]
    other = zhiyi("user", "add", "bob", "--credits", "50", *data, cwd=tmp_path, env=env)
    bobs = create_task(server.url, other.stdout.strip().splitlines()[-1],
                       slow_document(tmp_path / "c.txt", 3), "extract")
    assert zhiyi("user", "admin", "local", *data, cwd=tmp_path, env=env).returncode == 0
    every = zhiyi("tasks", "--all", cwd=tmp_path, env=env)
    assert every.returncode == 0, every.stderr
    lines = every.stdout.splitlines()
    assert lines[0].split("\t")[:2] == ["user", "id"]
    assert [line.split("\t")[:2] for line in lines[1:]] == [
        ["bob", str(bobs["taskId"])], ["local", str(second["taskId"])],
        ["local", str(first["taskId"])]]


def test_login_writes_the_config_used_later(server: ZhiyiServer, tmp_path: Path) -> None:
    env = cli_env(tmp_path)  # no ZHIYI_SERVER / ZHIYI_TOKEN
    config = tmp_path / "config" / "zhiyi" / "config.json"
    refused = zhiyi("login", "--server", server.url, "--token", "zy_wrong", cwd=tmp_path,
                    env=env)
    assert refused.returncode == 1
    assert refused.stderr == f"zhiyi: that token is not valid on {server.url}\n"
    assert not config.exists()

    done = zhiyi("login", "--server", server.url, "--token", server.local_token,
                 cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert "as local" in done.stdout
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert json.loads(config.read_text()) == {"server": server.url,
                                              "token": server.local_token}
    create_task(server.url, server.local_token, slow_document(tmp_path / "c.txt", 3), "analyze")
    listed = zhiyi("tasks", cwd=tmp_path, env=env)
    assert listed.returncode == 0, listed.stderr
    assert "c.txt" in listed.stdout


def test_bad_usage_exits_2_and_failures_1(server: ZhiyiServer, tmp_path: Path,
                                          workdir: Path) -> None:
    doc = slow_document(workdir / "d.txt", 3)
    env = cli_env(tmp_path, server)
    assert zhiyi("submit", str(doc), cwd=workdir, env=env).returncode == 2  # no --type
    assert zhiyi("submit", str(doc), "--type", "translate", "--param", "oops",
                 cwd=workdir, env=env).returncode == 2
    missing = zhiyi("submit", "nope.txt", "--type", "extract", cwd=workdir, env=env)
    assert missing.returncode == 2 and "no such file: nope.txt" in missing.stderr
    no_token = zhiyi("tasks", cwd=workdir, env=cli_env(tmp_path))
    assert no_token.returncode == 2 and "no token" in no_token.stderr

    refused = zhiyi("submit", str(doc), "--type", "translate", cwd=workdir, env=env)
    assert refused.returncode == 1
    assert refused.stderr.startswith("zhiyi: The parameter targetLang is required")
    assert len(refused.stderr.splitlines()) == 1
    down = zhiyi("tasks", "--server", "http://127.0.0.1:9", cwd=workdir, env=env)
    assert down.returncode == 1
    assert down.stderr.startswith("zhiyi: cannot reach http://127.0.0.1:9")
    assert len(down.stderr.splitlines()) == 1


def test_errors_name_the_next_step(server: ZhiyiServer, tmp_path: Path,
                                   workdir: Path) -> None:
    doc = slow_document(workdir / "d.txt", 3)
    env = cli_env(tmp_path, server)
    made = zhiyi("user", "add", "poor", "--data", str(server.data_dir), cwd=workdir, env=env)
    assert made.returncode == 0, made.stderr
    assert "give some with `zhiyi user credit poor N`" in made.stderr
    poor = {**env, "ZHIYI_TOKEN": made.stdout.strip().splitlines()[-1]}
    broke = zhiyi(*translate_args(doc), cwd=workdir, env=poor)
    assert broke.returncode == 1
    assert broke.stderr.startswith("zhiyi: This needs ")
    assert broke.stderr.rstrip().endswith(
        "To get more, ask the server's administrator to run "
        "'zhiyi user credit NAME AMOUNT' on the server.")
    bare = server.url.removeprefix("http://")
    no_scheme = zhiyi("tasks", "--server", bare, cwd=workdir, env=env)
    assert no_scheme.returncode == 2
    assert (f"--server must start with http:// or https://, e.g. {server.url} "
            f"(not {bare!r})") in no_scheme.stderr
    from_env = zhiyi("tasks", cwd=workdir, env={**env, "ZHIYI_SERVER": bare})
    assert from_env.returncode == 2 and "ZHIYI_SERVER must start with http://" in from_env.stderr
    down = zhiyi("tasks", "--server", "http://127.0.0.1:9", cwd=workdir, env=env)
    assert down.returncode == 1
    assert "is `zhiyi serve` running there?" in down.stderr


def test_settings_precedence(tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    assert resolve_settings(None, None, env).server == "http://127.0.0.1:8080"
    (tmp_path / "zhiyi").mkdir()
    (tmp_path / "zhiyi" / "config.json").write_text('{"server": "http://c", "token": "tc"}')
    settings = resolve_settings(None, None, env)
    assert (settings.server, settings.token) == ("http://c", "tc")
    env.update(ZHIYI_SERVER="http://e", ZHIYI_TOKEN="te")
    settings = resolve_settings(None, None, env)
    assert (settings.server, settings.token) == ("http://e", "te")
    settings = resolve_settings("http://f", "tf", env)
    assert (settings.server, settings.token) == ("http://f", "tf")


# ------------------------------------------------------------- the client
def test_sse_parser_follows_the_standard() -> None:
    parser = SSEParser()
    stream = (b"\xef\xbb\xbfretry: 2500\r\n: ping\r\n\r\nid: 7\r\ndata: {\"type\":\"a\",\r\n"
              b"data: \"data\":{}}\r\n\r\nevent: other\rdata:x\r\rdata: y\n\n"
              b"id\ndata: z\n\nid: bad\x00\ndata: w\n\ndata: partial")
    messages = []
    for i in range(len(stream)):  # byte by byte: every split point, CRLF included
        messages += parser.feed(stream[i:i + 1])
    messages += parser.end()
    assert parser.retry_ms == 2500
    assert [(m.id, m.event, m.data) for m in messages] == [
        ("7", "message", '{"type":"a",\n"data":{}}'),
        ("7", "other", "x"),
        ("7", "message", "y"),  # the id persists
        (None, "message", "z"),  # a bare "id" resets it
        (None, "message", "w"),  # an id with NUL is ignored
    ]
    event = SSEEvent.from_message(messages[0])
    assert (event.id, event.type, event.data) == ("7", "a", {})


def test_content_disposition_names() -> None:
    header = "attachment; filename=\"report_.txt\"; filename*=UTF-8''%E6%8A%A5%E5%91%8A.txt"
    assert _disposition_name(header) == "报告.txt"
    assert _disposition_name('attachment; filename="plain.txt"') == "plain.txt"
    assert _disposition_name(None) is None


async def test_client_methods(server: ZhiyiServer, tmp_path: Path) -> None:
    doc = slow_document(tmp_path / "c.txt", 60)
    async with ZhiyiClient(server.url, server.local_token) as client:
        me = await client.me()
        assert me["userId"] == "local"
        types = {t["taskType"] for t in await client.task_types()}
        assert {"translate", "analyze", "extract"} <= types
        task = await client.create_task(doc, "translate", {"targetLang": "zh", "engine": "openai"},
                                        idempotency_key="k1")
        again = await client.create_task(doc, "translate", {"targetLang": "zh"},
                                         idempotency_key="k1")
        assert again["taskId"] == task["taskId"]
        events = [e async for e in client.follow(task["taskId"])]
        assert events[-1].type == "status_update"
        assert events[-1].data["status"] == "completed"
        ids = [int(e.id) for e in events if e.id]
        assert ids == sorted(ids)
        # Resuming after the last event: the server answers 204; follow fetches the task.
        resumed = [e async for e in client.follow(task["taskId"], last_event_id=ids[-1])]
        assert [e.data["status"] for e in resumed] == ["completed"]
        saved = await client.download_result(task["taskId"], tmp_path)
        assert saved == tmp_path / "c.zh.txt"
        tasks, cursor = await client.list_tasks(limit=1)
        assert [t["taskId"] for t in tasks] == [task["taskId"]] and cursor is None
        with pytest.raises(ZhiyiError) as refused:
            await client.cancel(task["taskId"])
        assert refused.value.status == 409
        long = slow_document(tmp_path / "long.txt", 400)
        second = await client.create_task(long, "translate",
                                           {"targetLang": "zh", "engine": "openai"})
        # Cancel it while it runs, then retry: cancelling a running attempt must leave
        # the store writable (an earlier store left its write transaction open).
        while (await client.get_task(second["taskId"]))["progressPercent"] == 0:
            await asyncio.sleep(0.05)
        assert (await client.cancel(second["taskId"]))["taskStatus"] == "cancelled"
        assert (await client.retry(second["taskId"]))["taskStatus"] == "pending"
        await client.delete(second["taskId"])  # cancels it, with a refund
        # Cancelled in its first milliseconds (mid-write, as likely as not), then retried.
        third = await client.create_task(long, "translate", {"targetLang": "zh",
                                                              "engine": "openai"})
        await client.cancel(third["taskId"])
        assert (await client.retry(third["taskId"]))["taskStatus"] == "pending"
        await client.delete(third["taskId"])
        with pytest.raises(ZhiyiError) as gone:
            await client.get_task(second["taskId"])
        assert (gone.value.status, gone.value.code) == (404, "task_not_found")
        assert (await client.me())["credits"] == me["credits"] - task["creditsCost"]


def _fake_task(status: str) -> dict[str, Any]:
    return {"taskId": 1, "taskStatus": status, "progressPercent": 100 if status == "completed"
            else 50, "statusMessage": status, "stage": None, "etaSeconds": None,
            "resultUrl": "/api/tasks/1/result" if status == "completed" else None}


async def test_follow_resumes_with_last_event_id_and_survives_a_quiet_stream(
        aiohttp_server: Any) -> None:
    """A scripted server: a dropped stream, a resume with Last-Event-ID, a lost final event."""
    from aiohttp import web

    seen: list[str | None] = []

    async def stream(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("Last-Event-ID"))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if len(seen) == 1:  # an event, then the connection drops
            await response.write(b'retry: 50\n\nid: 5\ndata: {"type":"status_update","data":'
                                 b'{"taskId":1,"status":"processing","progress":50}}\n\n')
            return response
        # Resumed: only heartbeats; the final event never comes (the task ended anyway).
        for _ in range(100):
            await response.write(b": ping\n\n")
            await asyncio.sleep(0.05)
        return response

    async def task(request: web.Request) -> web.Response:
        return web.json_response({"success": True, "task": _fake_task("completed")})

    app = web.Application()
    app.router.add_get("/api/sse/tasks/1", stream)
    app.router.add_get("/api/tasks/1", task)
    server = await aiohttp_server(app)
    reconnects: list[str] = []
    async with ZhiyiClient(str(server.make_url("/")), "t", stall_seconds=0.3) as client:
        events = [e async for e in client.follow(
            1, on_reconnect=lambda reason, delay: reconnects.append(reason))]
    assert seen == [None, "5"]
    assert len(reconnects) == 1
    assert [(e.id, e.data["status"]) for e in events] == [("5", "processing"), ("5", "completed")]


async def test_follow_204_means_over(aiohttp_server: Any) -> None:
    from aiohttp import web

    async def stream(request: web.Request) -> web.Response:
        assert request.headers["Last-Event-ID"] == "9"
        return web.Response(status=204)

    async def task(request: web.Request) -> web.Response:
        return web.json_response({"success": True, "task": _fake_task("cancelled")})

    app = web.Application()
    app.router.add_get("/api/sse/tasks/1", stream)
    app.router.add_get("/api/tasks/1", task)
    server = await aiohttp_server(app)
    async with ZhiyiClient(str(server.make_url("/")), "t") as client:
        events = [e async for e in client.follow(1, last_event_id=9)]
    assert [(e.type, e.data["status"]) for e in events] == [("status_update", "cancelled")]


# ------------------------------------------- one task: quote, result, watch, cancel, retry, rm
def test_task_commands_act_on_an_existing_task(server: ZhiyiServer, tmp_path: Path,
                                               workdir: Path) -> None:
    env = cli_env(tmp_path, server)
    doc = slow_document(workdir / "notes.txt", 3)
    quoted = zhiyi("quote", str(doc), "--param", "targetLang=zh", "--param", "engine=openai",
                   cwd=workdir, env=env)
    assert quoted.returncode == 0, quoted.stderr
    assert quoted.stdout.startswith("notes.txt: 1 credits (")
    assert "; balance 1000, after: 999" in quoted.stdout
    assert only_task(server) == {}, "a quote keeps nothing"

    task = create_task(server.url, server.local_token, doc,
                       params={"targetLang": "zh", "engine": "openai"})
    task_id = str(task["taskId"])
    early = zhiyi("result", task_id, cwd=workdir, env=env)
    if early.returncode != 0:  # it may already be done; if not, the message names watch
        assert f"follow it with 'zhiyi watch {task_id}'" in early.stderr
    watched = zhiyi("watch", task_id, cwd=workdir, env=env)
    assert watched.returncode == 0, watched.stderr
    assert f"download it with 'zhiyi result {task_id}'" in watched.stdout
    fetched = zhiyi("result", task_id, "-o", str(workdir / "out.txt"), cwd=workdir, env=env)
    assert fetched.returncode == 0, fetched.stderr
    assert (workdir / "out.txt").read_text(encoding="utf-8").strip()

    refused = zhiyi("cancel", task_id, cwd=workdir, env=env)
    assert refused.returncode == 1 and f"cannot cancel task {task_id}" in refused.stderr
    removed = zhiyi("rm", task_id, cwd=workdir, env=env)
    assert removed.returncode == 0 and removed.stdout == f"task {task_id} deleted\n"
    gone = zhiyi("watch", task_id, cwd=workdir, env=env)
    assert gone.returncode == 1
    assert gone.stderr == (f"zhiyi: there is no task {task_id} of yours on this server; "
                           "'zhiyi tasks' lists them\n")


def test_cancel_then_retry_from_the_command_line(make_server: MakeServer, tmp_path: Path,
                                                 workdir: Path) -> None:
    server = make_server(WORKER_CONCURRENCY="0")  # no workers: the task waits, for certain
    env = cli_env(tmp_path, server)
    task = create_task(server.url, server.local_token, slow_document(workdir / "long.txt", 40),
                       params={"targetLang": "zh", "engine": "openai"})
    task_id = str(task["taskId"])
    cancelled = zhiyi("cancel", task_id, cwd=workdir, env=env)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout == f"task {task_id} is cancelled (refunded)\n"
    retried = zhiyi("retry", task_id, cwd=workdir, env=env)
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout == (f"task {task_id} is pending ({task['creditsCost']} credits "
                              f"charged); follow it with 'zhiyi watch {task_id}'\n")
    again = zhiyi("retry", task_id, cwd=workdir, env=env)
    assert again.returncode == 1
    assert again.stderr == f"zhiyi: cannot retry task {task_id}: Cannot retry a task that is " \
                           "pending.\n"
