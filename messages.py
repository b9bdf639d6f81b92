"""The sentences the server sends to people, each with a stable code and its parameters.

Status and error messages stay English text in the API (clients and scripts
read them), and each one also travels as ``code`` + ``params`` so that a page
can say it in its own language. The codes are found here, in one place, by
matching the English text against the catalog below: the text is what the
worker, the processors and the store already write (and what databases made
by older versions hold), so old rows get codes too and no schema change is
needed. A text the catalog does not know (a message an external service sent)
gets the code ``text`` with the text itself as its one parameter.

This module is the vocabulary shared by storage.py (events) and
zhiyi_server.py (Task objects); it imports nothing of the project.
"""

from __future__ import annotations

import re
from typing import Any

#: code -> the English text as a regular expression; named groups are the parameters.
#: Keep in step with the places that write the text (processors.py, worker.py,
#: storage.py, zhiyi_server.py) and with static/i18n.js (tests/test_messages.py
#: walks every code).
STATUS_MESSAGES: dict[str, str] = {
    "queued": r"waiting for a worker",
    "starting": r"starting",
    "reading": r"reading the document",
    "segments": r"segment (?P<done>\d+) of (?P<total>\d+)",
    "writing": r"writing the translated document(?P<summary> \(.*\))?",
    "formatting_lost": r"(?P<count>\d+) segments? lost inline formatting "
                       r"\(the engine broke its tags\); the text is complete",
    "analysed": r"analysed",
    "extracting": r"extracting text",
    "extracted": r"extracted",
    "submitting": r"sending to the external service",
    "submitted": r"sent to the external service",
    "external_processing": r"processing externally",
    "resuming": r"interrupted; waiting to resume",
    "restarting": r"the server is restarting; waiting to resume",
    "cancelled": r"cancelled",
    "completed": r"completed(?P<summary> \(.*\))?",
    "retrying": r"(?P<error>.+); retrying in (?P<seconds>\d+(?:\.\d+)?) s",
    "gave_up": r"Gave up after (?P<attempts>\d+) attempts: (?P<error>.+)",
    "interrupted": r"interrupted too many times \(the server stopped while it ran\)",
    "timed_out": r"Processing took longer than (?P<seconds>\d+(?:\.\d+)?) s\.",
    "disk_full": r"The server's disk is full, so the result could not be written\. "
                 r"Retry the task once space has been freed\.",
    "processing_failed": r"Processing failed: (?P<error>.+)",
    "external_unreachable": r"The external service could not be reached: (?P<error>.+)",
    "external_late": r"The external service did not report back in time\.",
    "external_failed": r"The external service reported a failure\.",
    "no_external": r"No external service is configured \(set EXTERNAL_SERVICE_URL\)\.",
}

#: The ``errorCode`` words of failed tasks (the category; the text says the detail).
ERROR_CODES: tuple[str, ...] = (
    "processor_error", "bad_document", "bad_params", "engine_error", "engine_unavailable",
    "external_error", "external_timeout", "timeout", "insufficient_storage", "interrupted",
)

#: The stages a running task reports (``stage``; ``stageCode`` is the same word).
STAGES: tuple[str, ...] = (
    "starting", "parsing", "translating", "writing", "extracting", "submitting", "waiting",
    "done",
)

#: Notification codes (``code`` of a ``notification`` event's data; storage.py sets them
#: where it makes the notice) and the parameters each carries in ``params``.
NOTIFICATIONS: dict[str, tuple[str, ...]] = {
    "credits_granted": ("amount",),
    "credits_charged": ("amount", "taskId", "taskNo"),
    "credits_refunded": ("amount", "taskId", "taskNo"),
}

#: The ``code`` words of the API's error answers (zhiyi_server.py's ``ApiError``s), which a
#: page says in its own language; tests/test_messages.py holds this to the server's code.
API_ERRORS: tuple[str, ...] = (
    "unauthenticated",
    "not_admin",
    "user_exists",
    "user_not_found",
    "insufficient_credits",
    "file_too_large",
    "too_large",
    "unsupported_file_type",
    "unsupported_media_type",
    "too_many_active_tasks",
    "insufficient_storage",
    "bad_document",
    "bad_params",
    "bad_request",
    "missing_file",
    "unknown_engine",
    "unknown_glossary",
    "glossary_not_found",
    "bad_glossary",
    "bad_tmx",
    "unknown_task_type",
    "task_not_found",
    "invalid_state",
    "expired",
    "not_completed",
    "cross_site",
    "request_timeout",
    "internal_error",
    "store_unavailable",
    "unavailable",
    "too_many_streams",
)

#: The code of a text the catalog does not know; its parameter ``text`` is the text.
FREE_TEXT = "text"

_SUMMARY_PARTS = {
    "fromMemory": re.compile(r"(?P<fromMemory>\d+) of (?P<segments>\d+) segments from memory"),
    "terms": re.compile(r"(?P<terms>\d+) glossary terms? applied \((?P<distinct>\d+) distinct\)"),
}


def _compile(table: dict[str, str]) -> list[tuple[str, re.Pattern[str]]]:
    return [(code, re.compile(pattern, re.DOTALL)) for code, pattern in table.items()]


_STATUS = _compile(STATUS_MESSAGES)


def _params(match: re.Match[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name, value in match.groupdict().items():
        if value is None:
            continue
        if name == "summary":
            params.update(_summary(value))
        elif re.fullmatch(r"[+-]?\d+", value):
            params[name] = int(value)
        elif re.fullmatch(r"\d+\.\d+", value):
            params[name] = float(value)
        else:
            params[name] = value
    return params


def _summary(text: str) -> dict[str, int]:
    """`` (40 of 90 segments from memory; 7 glossary terms applied (3 distinct))``."""
    found: dict[str, int] = {}
    for pattern in _SUMMARY_PARTS.values():
        match = pattern.search(text)
        if match:
            found.update({k: int(v) for k, v in match.groupdict().items()})
    return found


def describe(text: str | None) -> tuple[str | None, dict[str, Any]]:
    """``(code, params)`` of a status or error message; ``(None, {})`` for no message."""
    if text is None:
        return None, {}
    for code, pattern in _STATUS:
        match = pattern.fullmatch(text)
        if match:
            return code, _params(match)
    return FREE_TEXT, {"text": text}


def message_fields(message: str | None) -> dict[str, Any]:
    """``messageCode`` and ``messageParams`` of a status message."""
    code, params = describe(message)
    return {"messageCode": code, "messageParams": params}


def error_fields(error: str | None) -> dict[str, Any]:
    """``errorMessageCode`` and ``errorParams`` of a failure's text (``errorCode``, its
    category, is stored with the task)."""
    code, params = describe(error)
    return {"errorMessageCode": code, "errorParams": params}
