"""The external-service protocol, both directions: submission out, signed webhook in.

Out: a task's document is POSTed to ``EXTERNAL_SERVICE_URL`` with the callback
URL; the service answers with its ``externalTaskId``. In: the service reports
back through the signed webhook; this module checks the signature and fetches
a ``resultUrl`` (only from the service's own origin, with a size cap and a
timeout, streamed to disk). No knowledge of the app or the database.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import aiofiles
import aiofiles.os
import aiohttp
from yarl import URL

from processors import PermanentError, TransientError

__all__ = [
    "ExternalService",
    "ResultFetchError",
    "SignatureError",
    "check_signature_headers",
    "sign",
    "verify_signature",
]

logger = logging.getLogger(__name__)

SIGNATURE_WINDOW_SECONDS = 300


class SignatureError(Exception):
    """The webhook's signature or timestamp is missing, wrong or stale."""


class ResultFetchError(Exception):
    """The result could not be fetched; ``str()`` says why, for the task's error."""


def sign(secret: str, timestamp: int | str, body: bytes) -> str:
    """``sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">``, the header value."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


TIMESTAMP_PATTERN = re.compile(r"[0-9]{1,12}")
SIGNATURE_PATTERN = re.compile(r"sha256=[0-9a-f]{64}")


def check_signature_headers(
    timestamp: str | None, signature: str | None, *, now: float | None = None,
) -> None:
    """Everything that can be checked before the body is read: presence, form, the window.

    The patterns are ASCII-only, so a header of any other text is refused here
    rather than reaching the constant-time compare (which takes ASCII only).
    """
    if not timestamp or not signature:
        raise SignatureError("missing X-Zhiyi-Timestamp or X-Zhiyi-Signature header")
    if not TIMESTAMP_PATTERN.fullmatch(timestamp.strip()):
        raise SignatureError("X-Zhiyi-Timestamp is not a number of seconds")
    if not SIGNATURE_PATTERN.fullmatch(signature.strip().lower()):
        raise SignatureError("X-Zhiyi-Signature is not sha256= and 64 hex digits")
    current = time.time() if now is None else now
    if abs(current - int(timestamp)) > SIGNATURE_WINDOW_SECONDS:
        raise SignatureError("the timestamp is more than 300 seconds away from the server's time")


def verify_signature(
    secret: str, timestamp: str | None, signature: str | None, body: bytes,
    *, now: float | None = None,
) -> None:
    """Raise :class:`SignatureError` unless the headers sign ``body`` within the window."""
    check_signature_headers(timestamp, signature, now=now)
    assert timestamp is not None and signature is not None
    expected = sign(secret, timestamp.strip(), body)
    if not hmac.compare_digest(expected, signature.strip().lower()):
        raise SignatureError("the signature does not match the body")


class ExternalService:
    """The configured external service: submit documents, fetch results."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        service_url: str,
        callback_url: str,
        *,
        max_result_bytes: int,
        timeout: float = 60.0,
        attempts: int = 3,
        retry_base_seconds: float = 1.0,
    ) -> None:
        self.session = session
        self.service_url = URL(service_url)
        self.callback_url = callback_url
        self.max_result_bytes = max_result_bytes
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.attempts = attempts
        self.retry_base_seconds = retry_base_seconds

    async def __call__(
        self, input_path: Path, file_name: str, task_type: str, params: dict[str, Any]
    ) -> str:
        """Submit with retries and backoff; returns the ``externalTaskId``."""
        last_error = ""
        for attempt in range(1, self.attempts + 1):
            try:
                return await self._submit_once(input_path, file_name, task_type, params)
            except (aiohttp.ClientError, TimeoutError, _RetryableAnswer) as e:
                last_error = str(e) or type(e).__name__
                logger.warning("external submission attempt %d failed: %s", attempt, last_error)
            if attempt < self.attempts:
                await asyncio.sleep(self.retry_base_seconds * 2 ** (attempt - 1))
        raise TransientError(f"The external service could not be reached: {last_error}")

    async def _submit_once(
        self, input_path: Path, file_name: str, task_type: str, params: dict[str, Any]
    ) -> str:
        form = aiohttp.FormData()
        form.add_field("taskType", task_type)
        form.add_field("params", json.dumps(params, ensure_ascii=False))
        form.add_field("callbackUrl", self.callback_url)
        async with aiofiles.open(input_path, "rb") as f:
            form.add_field("file", await f.read(), filename=file_name)
        async with self.session.post(self.service_url, data=form, timeout=self.timeout,
                                     allow_redirects=False) as resp:
            if resp.status >= 500 or resp.status == 429:
                raise _RetryableAnswer(f"HTTP {resp.status}")
            if resp.status >= 300:
                text = (await resp.text())[:200]
                raise PermanentError(
                    f"The external service refused the task (HTTP {resp.status}): {text}",
                    "external_error")
            try:
                answer = await resp.json(content_type=None)
                external_id = str(answer["externalTaskId"])
            except (ValueError, KeyError, TypeError) as e:
                raise _RetryableAnswer("the answer had no externalTaskId") from e
        return external_id

    async def fetch_result(self, url: str, out: Path) -> None:
        """Stream ``url`` to ``out``: only from the service's origin, no redirects, capped."""
        try:
            target = URL(url)
        except (ValueError, TypeError) as e:
            raise ResultFetchError("The result URL is not a URL; it was not fetched.") from e
        self._check_origin(target)
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            await self._download(target, out)
        except ResultFetchError:
            await _remove(out)
            raise
        except (aiohttp.ClientError, TimeoutError) as e:
            await _remove(out)
            reason = str(e) or type(e).__name__
            raise ResultFetchError(f"The result could not be downloaded: {reason}") from e
        except BaseException:
            await _remove(out)
            raise

    def _check_origin(self, url: URL) -> None:
        if not url.absolute or url.origin() != self.service_url.origin():
            raise ResultFetchError(
                f"The result URL is not on the external service's origin "
                f"({self.service_url.origin()}); it was not fetched.")

    async def _download(self, target: URL, out: Path) -> None:
        # No redirects: a redirect could lead anywhere, and the origin check would be moot.
        async with self.session.get(target, timeout=self.timeout,
                                    allow_redirects=False) as resp:
            self._check_origin(resp.url)
            if 300 <= resp.status < 400:
                raise ResultFetchError(
                    f"The result URL answered with a redirect (HTTP {resp.status}); "
                    "redirects are not followed, so nothing was fetched.")
            if resp.status != 200:
                raise ResultFetchError(f"The result download answered HTTP {resp.status}.")
            if (resp.content_length or 0) > self.max_result_bytes:
                raise ResultFetchError(self._too_large())
            size = 0
            async with aiofiles.open(out, "wb") as f:
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    size += len(chunk)
                    if size > self.max_result_bytes:
                        raise ResultFetchError(self._too_large())
                    await f.write(chunk)

    def _too_large(self) -> str:
        return (f"The result is larger than the {self.max_result_bytes // (1024 * 1024)} MB cap; "
                "it was not kept.")


class _RetryableAnswer(Exception):
    pass


async def _remove(path: Path) -> None:
    try:
        await aiofiles.os.remove(path)
    except FileNotFoundError:
        pass
