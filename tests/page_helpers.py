"""Helpers for the end-to-end tests: real ``zhiyi serve`` subprocesses and a slow fake engine.

Each server runs on 127.0.0.1 on a free port over a temporary data directory,
with its output in a log file; it is stopped (or killed, to test recovery) by
its own PID only. The fake OpenAI-compatible engine runs as a subprocess too
(``python tests/page_helpers.py fake-openai --port N --delay S --key K``), so a
translation takes as long as a test needs and fails on demand (a wrong key).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "REPO",
    "FakeEngine",
    "ZhiyiServer",
    "add_user",
    "api",
    "create_task",
    "free_port",
    "slow_document",
    "wait_until",
]

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
FAKE_KEY = "sk-test-fake"
T = TypeVar("T")


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check: Callable[[], T], timeout: float = 20.0, interval: float = 0.1,
               what: str = "condition") -> T:
    """Poll ``check`` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def base_env(**extra: str) -> dict[str, str]:
    """The environment of a subprocess: ours, minus settings a developer may have exported."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ZHIYI_", "OPENAI_", "LIBRETRANSLATE_", "EXTERNAL_"))
           and k not in ("DATA_STORAGE_PATH", "WEBHOOK_SECRET")}
    env.update(PYTHONUNBUFFERED="1", ZHIYI_LOG_LEVEL="INFO", **extra)
    return env


@dataclass
class ZhiyiServer:
    """``zhiyi serve`` in a subprocess; ``start``, ``kill`` (crash), ``stop``, ``restart``."""

    data_dir: Path
    port: int = field(default_factory=free_port)
    env: dict[str, str] = field(default_factory=dict)
    #: run this instead of ``zhiyi serve`` (``{port}`` and ``{data}`` filled in); it must
    #: print ``Open <url>`` like ``zhiyi serve`` does
    command: list[str] | None = None
    #: the token for tests to use, if not the local user's from the printed URL
    token: str | None = None
    #: ``--workers``: 0 (the default here) runs the workers in the server process, so a
    #: started server is a ready one (worker processes import slowly on a loaded machine);
    #: None leaves ``zhiyi serve``'s own default (worker processes)
    workers: int | None = 0
    process: subprocess.Popen[bytes] | None = None
    login_url: str | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def local_token(self) -> str:
        """The token of the ``local`` user, from the URL ``zhiyi serve`` printed."""
        if self.token:
            return self.token
        assert self.login_url and "token=" in self.login_url, "start the server first"
        return self.login_url.split("token=", 1)[1]

    @property
    def log_path(self) -> Path:
        return self.data_dir / f"server-{self.starts}.log"

    def start(self, timeout: float = 20.0) -> ZhiyiServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        # The server's own env (self.env) wins over these test defaults.
        env = base_env(**{"WORKER_CONCURRENCY": "2", "RETRY_BASE_SECONDS": "0.2",
                          "SSE_HEARTBEAT_SECONDS": "2", **self.env})
        with self.log_path.open("wb") as log:
            argv = [PYTHON, "-m", "zhiyi_server", "serve", "--port", "{port}", "--data", "{data}"]
            if self.workers is not None:
                argv += ["--workers", str(self.workers)]
            self.process = subprocess.Popen(
                [a.format(port=self.port, data=self.data_dir) for a in self.command or argv],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            found = wait_until(self._printed_url, timeout, what=f"the server on {self.port}")
            wait_until(lambda: _port_open(self.port), timeout, what="the port")
            wait_until(lambda: self._healthy(found), timeout, what="/healthz")
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"zhiyi serve did not start:\n{self.log()}") from None
        self.login_url = found
        return self

    def _printed_url(self) -> str | None:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"zhiyi serve exited with {self.process.returncode}:\n{self.log()}")
        match = re.search(r"Open (http://\S+)", self.log())
        return match.group(1) if match else None

    def _healthy(self, printed_url: str) -> bool:
        """``healthz`` (beside the printed URL: the app may be mounted under a prefix)
        answers 200: the store is open and the app serves."""
        url = urllib.parse.urljoin(printed_url.split("?", 1)[0], "healthz")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        """A crash: SIGKILL to our own subprocess, by its PID."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        """A clean stop (SIGTERM), killed if it takes too long."""
        self._end(signal.SIGTERM)

    def _end(self, sig: signal.Signals) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            if process is not None:
                process.wait()
            return
        os.kill(process.pid, sig)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()

    def restart(self, *, crash: bool = True) -> ZhiyiServer:
        """Kill (or stop) and start again on the same port and data directory."""
        self.kill() if crash else self.stop()
        return self.start()


def add_user(data_dir: Path, name: str, credits: int) -> str:
    """``zhiyi user add``; the token it prints on its last line."""
    done = subprocess.run(
        [PYTHON, "-m", "zhiyi_server", "user", "add", name, "--credits", str(credits),
         "--data", str(data_dir)],
        cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=30, check=True)
    return done.stdout.strip().splitlines()[-1]


# ---------------------------------------------------------------- HTTP, sync
def api(server: str, token: str, method: str, path: str, body: bytes | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:
    """One API call with a Bearer token: ``(status, parsed JSON or None, raw body)``."""
    request = urllib.request.Request(
        f"{server.rstrip('/')}/{path.lstrip('/')}", data=body, method=method,
        headers={"Authorization": f"Bearer {token}", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as e:
        with e:
            status, raw = e.code, e.read()
    try:
        parsed = json.loads(raw) if raw else None
    except ValueError:
        parsed = None
    return status, parsed, raw


def create_task(server: str, token: str, path: Path, task_type: str = "translate",
                params: dict[str, Any] | None = None) -> dict[str, Any]:
    """``POST api/tasks/create`` with a hand-made multipart body; the created Task object."""
    boundary = uuid.uuid4().hex
    parts = [("taskType", None, task_type.encode()),
             ("params", None, json.dumps(params if params is not None else {}).encode()),
             ("file", path.name, path.read_bytes())]
    body = b""
    for name, file_name, value in parts:
        disposition = f'form-data; name="{name}"' + (
            f'; filename="{file_name}"' if file_name else "")
        body += (f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n").encode()
        body += value + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    status, data, raw = api(server, token, "POST", "api/tasks/create", body,
                            {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    if status != 201:
        raise AssertionError(f"create answered {status}: {raw[:500]!r}")
    return data["task"]


def slow_document(path: Path, paragraphs: int) -> Path:
    """A .txt of distinct paragraphs (the engines send identical ones only once)."""
    path.write_text("\n\n".join(
        f"Paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(paragraphs)),
        encoding="utf-8")
    return path


# ----------------------------------------------------- the slow fake engine
@dataclass
class FakeEngine:
    """The fake OpenAI-compatible API in a subprocess: ``delay`` seconds per request."""

    delay: float = 0.5
    key: str = FAKE_KEY
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        """The value for ``OPENAI_BASE_URL``."""
        return f"http://127.0.0.1:{self.port}/v1"

    def server_env(self, key: str | None = None) -> dict[str, str]:
        """Settings that make the ``openai`` engine use this fake (with ``key``, or ours)."""
        return {"OPENAI_BASE_URL": self.base_url, "OPENAI_API_KEY": key or self.key}

    def start(self) -> FakeEngine:
        self.process = subprocess.Popen(
            [PYTHON, __file__, "fake-openai", "--port", str(self.port), "--delay",
             str(self.delay), "--key", self.key],
            cwd=REPO, env=base_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: _port_open(self.port), 20, what="the fake engine")
        return self

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()


def _fake_openai_app(delay: float, key: str) -> Any:
    from aiohttp import web

    async def chat(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {key}":
            return web.json_response({"error": {
                "message": "Incorrect API key provided.", "type": "invalid_request_error",
                "code": "invalid_api_key"}}, status=401)
        body = await request.json()
        asked = json.loads(body["messages"][-1]["content"])
        await asyncio.sleep(delay)
        target = asked.get("target", "xx")
        content = {"segments": {n: f"[{target}] {text}" for n, text in asked["segments"].items()}}
        return web.json_response({
            "id": "chatcmpl-fake", "object": "chat.completion", "model": body.get("model"),
            "choices": [{"index": 0, "finish_reason": "stop", "message": {
                "role": "assistant", "content": json.dumps(content, ensure_ascii=False)}}],
        })

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


def _main() -> None:
    parser = argparse.ArgumentParser(description="test helpers")
    commands = parser.add_subparsers(dest="command", required=True)
    fake = commands.add_parser("fake-openai", help="serve the slow fake engine")
    fake.add_argument("--port", type=int, required=True)
    fake.add_argument("--delay", type=float, default=0.5)
    fake.add_argument("--key", default=FAKE_KEY)
    args = parser.parse_args()
    from aiohttp import web

    web.run_app(_fake_openai_app(args.delay, args.key), host="127.0.0.1", port=args.port,
                print=None, access_log=None)


if __name__ == "__main__":
    _main()
