"""Request guards: who is asking, and whether the request may go on.

The credential of a request (a Bearer token, else the session cookie; looked up on every
request, so a revocation holds at once) and the session's sliding expiry and cookie; the
same-origin check for cookie-authenticated writes (403 ``cross_site``); the body caps and
deadline every route reads its body through (``metered_body``: 413, 408); the protective
headers on every answer. A guard refuses with :class:`ApiError`, which zhiyi_server's
``error_middleware`` turns into the JSON envelope. Handlers and wiring stay in zhiyi_server,
which re-exports the names here that others import from it (``SESSION_COOKIE``, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

from aiohttp import hdrs, web
from yarl import URL

from storage import Credential, parse_time
from zhiyi_config import CONFIG, STORE

__all__ = [
    "MIN_UPLOAD_BYTES_PER_SECOND",
    "MULTIPART_SLACK_BYTES",
    "RESULT_CSP",
    "SAFE_METHODS",
    "SECURITY_HEADERS",
    "SESSION_COOKIE",
    "SESSION_MAX_BYTES",
    "SLID_SESSION",
    "WEBHOOK_MAX_BYTES",
    "ApiError",
    "add_security_headers",
    "cross_site",
    "current_credential",
    "current_user",
    "is_top_level_navigation",
    "metered_body",
    "read_body",
    "refresh_session_cookie",
    "require_same_origin",
    "same_origin",
    "set_session_cookie",
]

logger = logging.getLogger(__name__)

SESSION_COOKIE = "zhiyi_session"
#: the session token whose expiry this request slid: its cookie is set again
SLID_SESSION = web.RequestKey("zhiyi.slid_session", str)


# The refusal a guard or a handler raises; zhiyi_server's error_middleware answers it.
class ApiError(Exception):
    """An answer other than success: status, stable ``code``, a sentence for a person."""

    def __init__(self, status: int, code: str, message: str, *,
                 headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}  #: e.g. Retry-After
        self.extra = extra


# ----------------------------------------------------------------------- auth
async def current_credential(request: web.Request) -> Credential:
    """The valid token or session of the request (Bearer first, then the cookie); 401 otherwise.

    Looked up in the database on every request (no cache), so a revocation
    by any process holds at once. A session in use slides its expiry, with at
    most one write per token per :func:`_slide_interval`.
    """
    store = request.config_dict[STORE]
    header = request.headers.get("Authorization", "")
    token = header[7:].strip() if header[:7].lower() == "bearer " else None
    if not token and (token := request.cookies.get(SESSION_COOKIE)):
        require_same_origin(request)  # a cookie rides along cross-site; a bearer token cannot
    credential = await store.credential_for_token(token) if token else None
    if credential is None:
        raise ApiError(401, "unauthenticated",
                       "User not authenticated: send 'Authorization: Bearer <token>' "
                       "or log in at the page.")
    assert token is not None  # a credential was found for it
    _record_use(request, credential, token)
    return credential


async def current_user(request: web.Request) -> str:
    """The user of a Bearer token or of the session cookie; 401 otherwise."""
    return (await current_credential(request)).user_id


def _slide_interval(lifetime: timedelta) -> timedelta:
    return min(timedelta(hours=1), lifetime / 10)


def _record_use(request: web.Request, credential: Credential, token: str) -> None:
    """Note the use (for ``zhiyi user tokens``); a session's expiry slides with it."""
    store = request.config_dict[STORE]
    lifetime = request.config_dict[CONFIG].session_lifetime
    last = parse_time(credential.last_used_at) if credential.last_used_at else None
    if last is not None and store.now() - last < _slide_interval(lifetime):
        return
    # Queued, not awaited: bookkeeping must neither delay a request nor, with the database
    # locked or full, turn a read into a 503 (a failed note is logged; the next use retries).
    written = store.queue_record_use(credential.token_hash, lifetime)
    written.add_done_callback(_log_use_not_recorded)
    if credential.kind == "session" and request.cookies.get(SESSION_COOKIE) == token:
        request[SLID_SESSION] = token


def _log_use_not_recorded(written: asyncio.Future[None]) -> None:
    if not written.cancelled() and written.exception() is not None:
        logger.warning("a token's last use was not recorded: %s", written.exception())


async def refresh_session_cookie(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: a slid session's cookie lives as long as the session."""
    token = request.get(SLID_SESSION)
    if token is not None and SESSION_COOKIE not in response.cookies:
        _put_session_cookie(request, response, token)
        # aiohttp may already have turned ``response.cookies`` into headers by now.
        morsel = response.cookies.pop(SESSION_COOKIE)
        response.headers.add(hdrs.SET_COOKIE, morsel.OutputString())


async def set_session_cookie(request: web.Request, response: web.StreamResponse,
                              user: str) -> None:
    lifetime = request.config_dict[CONFIG].session_lifetime
    session = await request.config_dict[STORE].issue_token(user, kind="session",
                                                           lifetime=lifetime)
    _put_session_cookie(request, response, session)


def _put_session_cookie(request: web.Request, response: web.StreamResponse,
                        session: str) -> None:
    config = request.config_dict[CONFIG]
    secure = request.secure or (config.public_url or "").lower().startswith("https://")
    response.set_cookie(SESSION_COOKIE, session, httponly=True, samesite="Strict", path="/",
                        max_age=int(config.session_lifetime.total_seconds()), secure=secure)


# ------------------------------------------------------------- request guards
SAFE_METHODS = frozenset({hdrs.METH_GET, hdrs.METH_HEAD, hdrs.METH_OPTIONS})
WEBHOOK_MAX_BYTES = 1024 * 1024
SESSION_MAX_BYTES = 4 * 1024
#: the multipart body of a create: the file cap plus room for the small fields and headers
MULTIPART_SLACK_BYTES = 256 * 1024
#: an upload slower than this on average (after its first BODY_TIMEOUT_SECONDS) is 408
MIN_UPLOAD_BYTES_PER_SECOND = 4 * 1024
#: every response; the page loads only its own files and needs no inline script or style
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}
#: a result is never rendered as a page of this origin, even if opened in place
RESULT_CSP = "default-src 'none'; sandbox; frame-ancestors 'none'"


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: the same protective headers on every answer."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


def _origin_key(text: str) -> tuple[str, str, int | None] | None:
    try:
        url = URL(text)
    except (ValueError, TypeError):
        return None
    if not url.absolute or not url.host:
        return None
    return url.scheme.lower(), url.host.lower(), url.port


def _own_origins(request: web.Request) -> set[tuple[str, str, int | None]]:
    """This server's origins: as the request reached it, and as ``PUBLIC_URL`` names it."""
    candidates = [f"{request.scheme}://{request.host}",
                  request.config_dict[CONFIG].public_url or ""]
    return {key for text in candidates if text and (key := _origin_key(text))}


def same_origin(request: web.Request) -> bool | None:
    """Whether the browser says this request comes from this server's own pages.

    ``Sec-Fetch-Site`` when sent (every current browser), else ``Origin``, else
    the origin of ``Referer``; None when the request says nothing (not a browser).
    """
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        return site.strip().lower() == "same-origin"
    source = request.headers.get(hdrs.ORIGIN) or request.headers.get(hdrs.REFERER)
    if not source:
        return None
    key = _origin_key(source)
    return key is not None and key in _own_origins(request)


def cross_site() -> ApiError:
    return ApiError(403, "cross_site",
                    "Refused: a change made with the session cookie must come from this "
                    "server's own page. Scripts should send 'Authorization: Bearer <token>'.")


def require_same_origin(request: web.Request) -> None:
    """403 ``cross_site`` for an unsafe request that does not prove it is same-origin."""
    if request.method not in SAFE_METHODS and same_origin(request) is not True:
        raise cross_site()


def is_top_level_navigation(request: web.Request) -> bool:
    """A page load in the address bar or from a link, not an image, script or frame."""
    dest = request.headers.get("Sec-Fetch-Dest")
    mode = request.headers.get("Sec-Fetch-Mode")
    if dest is not None or mode is not None:
        return dest == "document" and mode in (None, "navigate")
    # No Fetch Metadata (an old browser): a navigation asks for HTML, sub-requests do not.
    return "text/html" in request.headers.get(hdrs.ACCEPT, "")


def _too_large_body(limit: int) -> ApiError:
    size = f"{limit // 1024} KB" if limit < 1024 * 1024 else f"{limit // (1024 * 1024)} MB"
    return ApiError(413, "too_large", f"The request body is larger than this route's "
                    f"{size} limit.", limit=limit)


def _slow_body(seconds: float) -> ApiError:
    return ApiError(408, "request_timeout",
                    f"The request body did not arrive in time ({seconds:g} s); send it again.")


@contextlib.asynccontextmanager
async def metered_body(request: web.Request, limit: int, *, rolling: bool = False,
                       too_large: ApiError | None = None) -> AsyncIterator[Callable[[], None]]:
    """Read a body under a size cap and a deadline; yields ``progress()`` to call per piece.

    ``progress()`` refuses the body (413) once more than ``limit`` bytes were
    received. The deadline is ``BODY_TIMEOUT_SECONDS`` for the whole body, or
    with ``rolling`` for each pause between pieces (large uploads), and then
    the upload must also average ``MIN_UPLOAD_BYTES_PER_SECOND`` after its first
    ``BODY_TIMEOUT_SECONDS``, so a trickle cannot hold a connection; past it, 408.
    ``too_large`` replaces the generic 413 (an upload's says which file cap).
    """
    refusal = too_large or _too_large_body(limit)
    if request.content_length is not None and request.content_length > limit:
        raise refusal
    seconds = request.config_dict[CONFIG].body_timeout_seconds
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        async with asyncio.timeout(seconds) as deadline:

            def progress() -> None:
                received = request.content.total_bytes
                if received > limit:
                    raise refusal
                if rolling:
                    earned = started + seconds + received / MIN_UPLOAD_BYTES_PER_SECOND
                    deadline.reschedule(min(loop.time() + seconds, earned))

            yield progress
    except TimeoutError as e:
        raise _slow_body(seconds) from e


async def read_body(request: web.Request, limit: int, *,
                    too_large: ApiError | None = None) -> bytes:
    """The whole body, within ``limit`` bytes and the body deadline."""
    data = bytearray()
    async with metered_body(request, limit, too_large=too_large) as progress:
        while chunk := await request.content.readany():
            data += chunk
            progress()
    return bytes(data)
