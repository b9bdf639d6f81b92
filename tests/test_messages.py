"""Every message the server sends carries a stable code and its parameters.

The English texts stay as they were (clients read them); the codes come from
messages.py. These tests run real tasks through the real app and check each
event and Task object a client sees; the page's side (every code has Chinese)
is tests/test_page.py::test_every_server_code_has_chinese.
"""

from __future__ import annotations

from aiohttp.test_utils import TestClient
from helpers import Gates, add_user, create, get_task, make_registry, wait_status

import messages
from zhiyi_server import STORE

# One real sample of each text the code writes (the catalog must know them all).
SAMPLES = {
    "waiting for a worker": ("queued", {}),
    "starting": ("starting", {}),
    "reading the document": ("reading", {}),
    "segment 4 of 10": ("segments", {"done": 4, "total": 10}),
    "writing the translated document": ("writing", {}),
    "writing the translated document (3 of 9 segments from memory)":
        ("writing", {"fromMemory": 3, "segments": 9}),
    "completed (3 of 9 segments from memory; 1 glossary term applied (1 distinct))":
        ("completed", {"fromMemory": 3, "segments": 9, "terms": 1, "distinct": 1}),
    "2 segments lost inline formatting (the engine broke its tags); the text is complete":
        ("formatting_lost", {"count": 2}),
    "Connection refused; retrying in 0.4 s": ("retrying", {"error": "Connection refused",
                                                           "seconds": 0.4}),
    "Gave up after 3 attempts: HTTP 502": ("gave_up", {"attempts": 3, "error": "HTTP 502"}),
    "Processing took longer than 600 s.": ("timed_out", {"seconds": 600}),
    "Processing failed: division by zero": ("processing_failed", {"error": "division by zero"}),
    "interrupted too many times (the server stopped while it ran)": ("interrupted", {}),
    "a sentence of an external service": ("text", {"text": "a sentence of an external service"}),
}


def test_texts_map_to_codes_and_params() -> None:
    for text, expected in SAMPLES.items():
        assert messages.describe(text) == expected, text
    assert messages.describe(None) == (None, {})


def test_every_catalog_code_is_reachable_and_unique() -> None:
    """No pattern hides another: each code's own example text comes back as that code."""
    found = {messages.describe(text)[0] for text in SAMPLES}
    assert found <= set(messages.STATUS_MESSAGES) | {messages.FREE_TEXT}
    for code, pattern in messages.STATUS_MESSAGES.items():
        assert "(?P<" in pattern or messages.describe(_plain(pattern))[0] == code, code


def _plain(pattern: str) -> str:
    """The literal text of a pattern without groups."""
    return pattern.replace("\\(", "(").replace("\\)", ")").replace("\\.", ".")


async def test_events_and_tasks_carry_codes(client: TestClient) -> None:
    """A real translation: every status_update and notification has its code; the Task too."""
    headers = await add_user(client, credits=100)
    body = await create(client, headers, content="One.\n\nTwo.\n\nThree.\n")
    task_id = body["taskId"]
    done = await wait_status(client, headers, task_id, "completed")
    assert done["messageCode"] == "completed" and done["stageCode"] == "done"
    assert done["errorMessageCode"] is None and done["errorParams"] == {}
    store = client.app[STORE]
    events = await store.events_after(0, user_id="alice")
    updates = [e.data for e in events if e.type == "status_update"]
    assert updates and all(u["messageCode"] not in (None, "text") for u in updates), updates
    assert {u["messageCode"] for u in updates} >= {"queued", "starting", "segments", "completed"}
    assert all(u["stageCode"] == u["stage"] for u in updates)
    segments = [u for u in updates if u["messageCode"] == "segments"]
    # progress is coalesced: some "segment N of 3" was written, with numbers as numbers
    assert all(s["messageParams"]["total"] == 3 and 0 <= s["messageParams"]["done"] <= 3
               for s in segments)
    assert updates[-1]["completedAt"] == done["completedAt"]
    notices = [e.data for e in events if e.type == "notification"]
    assert notices[0]["code"] == "credits_charged"
    assert notices[0]["params"] == {"amount": done["creditsCost"], "taskId": task_id,
                                    "taskNo": done["userTaskNo"]}
    assert all(n["code"] in messages.NOTIFICATIONS for n in notices)


async def test_failures_and_retries_carry_codes_and_params(make_client) -> None:
    """A processor's bug, and a transient error retried until the attempts ran out."""
    gates = Gates()
    gates.fail_times = 10
    client = await make_client(registry=make_registry(gates), max_attempts=2)
    headers = await add_user(client, credits=100)
    buggy = await create(client, headers, task_type="buggy", params={})
    failed = await wait_status(client, headers, buggy["taskId"], "failed")
    assert (failed["errorCode"], failed["errorMessageCode"]) == ("processor_error",
                                                                 "processing_failed")
    assert failed["errorParams"] == {"error": "'missing'"}
    assert failed["messageCode"] == "processing_failed"

    flaky = await create(client, headers, task_type="flaky", params={})
    gave_up = await wait_status(client, headers, flaky["taskId"], "failed")
    assert gave_up["errorMessageCode"] == "gave_up"
    assert gave_up["errorParams"] == {"attempts": 2, "error": "flaky failure 2"}
    events = await client.app[STORE].events_after(0, task_id=flaky["taskId"])
    retrying = [e.data for e in events if e.data.get("messageCode") == "retrying"]
    assert retrying and retrying[0]["status"] == "pending"
    assert retrying[0]["messageParams"]["error"] == "flaky failure 1"
    assert retrying[0]["attempts"] == 1
    last = events[-1].data
    assert (last["status"], last["errorCode"], last["errorMessageCode"]) == (
        "failed", "processor_error", "gave_up")
    assert last["errorParams"] == gave_up["errorParams"]
    assert again_matches(await get_task(client, headers, flaky["taskId"]), gave_up)


def again_matches(task: dict, earlier: dict) -> bool:
    keys = ("messageCode", "messageParams", "errorMessageCode", "errorParams", "stageCode")
    return all(task[k] == earlier[k] for k in keys)


async def test_grant_notification_has_code(client: TestClient) -> None:
    await add_user(client, credits=0)
    store = client.app[STORE]
    await store.grant_credits("alice", 5)
    await store.grant_credits("alice", -2)
    events = await store.events_after(0, user_id="alice")
    grants = [e.data for e in events if e.type == "notification"]
    assert [(g["code"], g["params"], g["credits"]) for g in grants] == [
        ("credits_granted", {"amount": 5}, 5), ("credits_granted", {"amount": -2}, 3)]
    assert [g["message"] for g in grants] == ["+5 credits", "-2 credits"]


def test_every_api_error_code_is_in_the_catalog() -> None:
    """The page says each ``code`` of the API's error answers: all are listed for it."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    source = "".join((root / name).read_text() for name in ("zhiyi_server.py", "request_guards.py"))
    raised = set(re.findall(r'ApiError\(\s*\d{3},\s*"([a-z_]+)"', source))
    unlisted = raised - set(messages.API_ERRORS)
    # Webhook and stream-only codes are for services and scripts, not for the page.
    assert unlisted <= {"bad_signature", "webhook_disabled"}, unlisted
