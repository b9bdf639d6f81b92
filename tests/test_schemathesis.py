"""Schemathesis against openapi.yaml and a real server: every check, stateful phase included.

A real ``zhiyi serve`` on 127.0.0.1 (a temp data dir, one user with ample credits) is
tested by the ``st`` command with ``--checks all``, a fixed seed and a fixed number of
examples per operation, so the run is bounded and repeatable. What the document cannot
say is set here, each for a stated reason:

- the engines a server offers depend on its configuration: the document lists every
  engine, and the copy given to Schemathesis keeps those this server reports available
  in ``GET /api/task-types`` (a client reads the same list); likewise ``glossary`` names
  one of the user's glossaries, and this user has none;
- whether an upload's bytes are a readable document (text in a ``.txt``, a Word zip in a
  ``.docx``, a TMX file) is beyond JSON Schema, so ``createTask``, ``quoteTask`` and
  ``importMemory`` may answer a schema-valid request with their documented 422;
- ``clearMemory`` takes its three query parameters together or not at all, which OpenAPI
  parameters cannot express, so it may answer 400 to a schema-valid subset;
- a glossary's name may hold letters of any script, which an ECMA pattern cannot say, so
  ``uploadGlossary`` is not held to reject names the pattern refuses.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from page_helpers import ZhiyiServer, add_user, base_env

SPEC_PATH = Path(__file__).resolve().parent.parent / "openapi.yaml"
ST = Path(sys.executable).with_name("st")
SEED = 20251201
EXAMPLES = 5  # per operation and phase

CONFIG = """\
[[operations]]
include-operation-id = ["createTask", "quoteTask", "importMemory", "uploadGlossary"]
# bad_document / bad_tmx / bad_glossary: the bytes are not a readable file of that type
checks.positive_data_acceptance.expected-statuses = [
    "2xx", "3xx", "401", "403", "404", "409", "422", "429",
]

[[operations]]
include-operation-id = "uploadGlossary"
# A name may hold letters of any script (Python's \\w); a JSON Schema pattern (ECMA \\w is
# ASCII) cannot say so, so a schema-invalid name in Chinese is rightly accepted.
checks.negative_data_rejection.enabled = false

[[operations]]
include-operation-id = "clearMemory"
# sourceLang, targetLang and engine go together or not at all, which OpenAPI cannot say
checks.positive_data_acceptance.expected-statuses = [
    "2xx", "3xx", "400", "401", "403", "404", "409", "429",
]

[[operations]]
include-tag = "streams"
# A stream may stay open: read its first event, or what comes within the timeout.
max-stream-events = 1
request-timeout = 1
"""


def engines_available(server: ZhiyiServer) -> list[str]:
    with urllib.request.urlopen(f"{server.url}/api/task-types", timeout=30) as response:
        types = json.load(response)["taskTypes"]
    (translate,) = (t for t in types if t["taskType"] == "translate")
    return [e["name"] for e in translate["engines"] if e["available"]]


def spec_for(server: ZhiyiServer) -> dict[str, Any]:
    """openapi.yaml with the engines this server offers and the user's glossaries (none)."""
    spec = yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8"))
    schemas = spec["components"]["schemas"]
    engine = schemas["EngineName"]
    offered = set(engines_available(server))
    engine["enum"] = [name for name in engine["enum"] if name in offered or not name]
    schemas["TranslateParams"]["properties"]["glossary"]["enum"] = ["", None]
    return spec


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_schemathesis_finds_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    token = add_user(data, "alice", 10**9)
    server = ZhiyiServer(data, token=token, env={
        "MAX_ACTIVE_TASKS_PER_USER": "100000"}).start()
    try:
        schema = tmp_path / "openapi.yaml"
        schema.write_text(yaml.safe_dump(spec_for(server), allow_unicode=True, sort_keys=False),
                          encoding="utf-8")
        (tmp_path / "schemathesis.toml").write_text(CONFIG, encoding="utf-8")
        done = subprocess.run(
            [str(ST), "--config-file", "schemathesis.toml", "run", str(schema),
             "--url", server.url, "--header", f"Authorization: Bearer {token}",
             "--checks", "all", "--phases", "examples,coverage,fuzzing,stateful",
             "--max-examples", str(EXAMPLES), "--seed", str(SEED), "--workers", "1",
             "--request-timeout", "10", "--no-color"],
            cwd=tmp_path, env=base_env(), capture_output=True, text=True, timeout=540)
    finally:
        server.stop()
    report = done.stdout + done.stderr
    assert done.returncode == 0, report[-20000:]
    # aiohttp logs the malformed requests it refuses itself (400); none of ours may fail.
    assert "unhandled error" not in server.log()
