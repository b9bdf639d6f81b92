"""Server-Sent Events: the registry of live connections and the streams themselves.

The seed's two managers are the two maps of :class:`SSEHub`: subscribers by
task id and by user. Publishing encodes an event's bytes once. A stream that
is still sending its snapshot and replay gets them in a bounded buffer; a live
stream gets them written straight to its socket in the publish call, so no
coroutine wakes per event and subscriber. A client whose socket backs up past
the bound is dropped (its stream ends, and it resumes with ``Last-Event-ID``
from the database), so one slow reader never delays the others.

Framing is written by hand rather than with aiohttp-sse: in the fan-out
benchmark (``bench/fanout.py``) this hub spent 0.22-0.25 of aiohttp-sse's
server CPU per delivered event (N = 1,000 / 5,000); see the README.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import HttpVersion11, hdrs, web

from storage import Event

__all__ = [
    "REPLAY_PAGE",
    "SSEHub",
    "StreamLimitReached",
    "Subscriber",
    "encode_event",
    "stream_events",
]

logger = logging.getLogger(__name__)

# No "Connection: keep-alive": aiohttp says what holds for the request's HTTP version
# (an HTTP/1.0 stream ends by closing the connection).
SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
PING = b": ping\n\n"
#: events per replay query; the replay callable returns at most this many
REPLAY_PAGE = 500


def encode_event(event_id: int, type_: str, data: dict[str, Any], raw: str = "") -> bytes:
    """One SSE message: ``id:`` and one ``data:`` line of JSON (default event name).

    ``raw`` is ``data`` already encoded as compact JSON (as the store keeps it).
    """
    body = raw or json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f'id: {event_id}\ndata: {{"type":"{type_}","data":{body}}}\n\n'.encode()


class StreamLimitReached(Exception):
    """Too many streams, for one user (``per_user``) or in all (``total``)."""

    def __init__(self, scope: str, limit: int) -> None:
        super().__init__(f"{scope} limit of {limit} streams reached")
        self.scope = scope
        self.limit = limit


@dataclass(eq=False)
class Subscriber:
    """One stream: a bounded buffer until it is live, then its socket directly.

    While the stream sends its snapshot and replay, published events wait in
    ``buffer``. Once live, :meth:`offer` writes each event straight to the
    connection's transport (no coroutine wakes per event), and the bytes still
    unsent by the kernel are the bound: past it the client is too slow.
    """

    user_id: str
    task_id: int | None
    max_buffer: int
    buffer: deque[tuple[int, bytes, bool]] = field(default_factory=deque)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    #: set when the client fell behind; the stream ends so it resumes from the DB
    overflowed: bool = False
    closed: bool = False
    #: the stream sent its final event (task streams end then)
    finished: bool = False
    transport: asyncio.WriteTransport | None = None
    chunked: bool = True
    ends_on_final: bool = False
    last_id: int = 0
    #: what the stream was opened with (a token hash); revoking it ends the stream
    credential: str | None = None

    @property
    def max_pending_bytes(self) -> int:
        """Unsent bytes past which a live stream is too slow: 64 KiB, or more for a
        larger ``max_buffer`` (reckoned at 1 KiB per buffered event, a generous event)."""
        return max(64 * 1024, self.max_buffer * 1024)

    def offer(self, event_id: int, payload: bytes, final: bool) -> bool:
        if self.overflowed or self.closed or self.finished:
            return False
        if self.transport is not None:
            return self._write_now(event_id, payload, final)
        if len(self.buffer) >= self.max_buffer:
            self._overflow()
            return False
        self.buffer.append((event_id, payload, final))
        return True

    def go_live(self, transport: asyncio.WriteTransport, *, chunked: bool, last_id: int,
                ends_on_final: bool) -> None:
        """From now on, events are written to ``transport`` as they are published."""
        self.transport = transport
        self.chunked = chunked
        self.last_id = last_id
        self.ends_on_final = ends_on_final

    def ping(self) -> None:
        # Before going live the stream is busy writing its replay: no ping needed.
        if self.transport is not None and not self._send(PING):
            self.wakeup.set()

    def _write_now(self, event_id: int, payload: bytes, final: bool) -> bool:
        if event_id <= self.last_id:
            return True
        if not self._send(payload):
            return False
        self.last_id = event_id
        if final and self.ends_on_final:
            self.finished = True
            self.wakeup.set()
        return True

    def _send(self, data: bytes) -> bool:
        """Write one message (as one HTTP chunk when the response is chunked)."""
        transport = self.transport
        assert transport is not None
        if transport.is_closing():  # the client went away: end the stream
            self.closed = True
            self.wakeup.set()
            return False
        transport.write(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)
        if transport.get_write_buffer_size() > self.max_pending_bytes:
            self._overflow()
        return True

    def _overflow(self) -> None:
        self.overflowed = True
        self.buffer.clear()
        self.wakeup.set()

    def close(self, retry_ms: int | None = None) -> None:
        """End the stream; a live one is first told when to reconnect (``retry:``)."""
        if retry_ms is not None and self.transport is not None and not self.closed:
            self._send(f"retry: {retry_ms}\n\n".encode())
        self.closed = True
        self.wakeup.set()


class SSEHub:
    """All live streams of one app, by task and by user (notification streams)."""

    def __init__(
        self,
        *,
        max_per_user: int = 32,
        max_total: int = 10_000,
        buffer_size: int = 256,
        on_publish: Callable[[int], None] | None = None,
        on_drop: Callable[[], None] | None = None,
    ) -> None:
        self.max_per_user = max_per_user
        self.max_total = max_total
        self.buffer_size = buffer_size
        self._by_task: dict[int, set[Subscriber]] = {}
        self._by_user: dict[str, set[Subscriber]] = {}
        self._per_user_count: dict[str, int] = {}
        self._total = 0
        self._on_publish = on_publish
        self._on_drop = on_drop
        self.closing = False

    @property
    def connection_count(self) -> int:
        return self._total

    def subscribe(self, user_id: str, task_id: int | None = None, *,
                  credential: str | None = None) -> Subscriber:
        """Register a stream of one task (or, without ``task_id``, of all the user's)."""
        if self._total >= self.max_total:
            raise StreamLimitReached("total", self.max_total)
        if self._per_user_count.get(user_id, 0) >= self.max_per_user:
            raise StreamLimitReached("per_user", self.max_per_user)
        sub = Subscriber(user_id, task_id, self.buffer_size, credential=credential)
        registry: dict[Any, set[Subscriber]]
        registry, key = (self._by_task, task_id) if task_id is not None else (
            self._by_user, user_id)
        registry.setdefault(key, set()).add(sub)
        self._per_user_count[user_id] = self._per_user_count.get(user_id, 0) + 1
        self._total += 1
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        registry: dict[Any, set[Subscriber]]
        registry, key = (self._by_task, sub.task_id) if sub.task_id is not None else (
            self._by_user, sub.user_id)
        subs = registry.get(key)
        if subs is None or sub not in subs:
            return
        subs.discard(sub)
        if not subs:
            del registry[key]
        remaining = self._per_user_count[sub.user_id] - 1
        if remaining:
            self._per_user_count[sub.user_id] = remaining
        else:
            del self._per_user_count[sub.user_id]
        self._total -= 1

    def publish(self, event: Event) -> None:
        """Hand a committed event to its task's streams and its user's notification streams."""
        task_subs = self._by_task.get(event.task_id, ()) if event.task_id is not None else ()
        user_subs = self._by_user.get(event.user_id, ())
        if not task_subs and not user_subs:
            return
        payload = encode_event(event.id, event.type, event.data, event.raw)
        final = event.is_final
        delivered = 0
        for sub in (*task_subs, *user_subs):
            was_overflowed = sub.overflowed
            if sub.offer(event.id, payload, final):
                delivered += 1
            # A live stream can overflow on a write that still went out: count it either way.
            if sub.overflowed and not was_overflowed and self._on_drop is not None:
                self._on_drop()
        if self._on_publish is not None:
            self._on_publish(delivered)

    def subscribers(self) -> list[Subscriber]:
        return [sub for registry in (self._by_task, self._by_user)
                for subs in registry.values() for sub in subs]

    async def heartbeat(self, interval: float, still_valid: CredentialCheck | None = None,
                        ) -> None:
        """Every ``interval`` seconds, ask every stream to write a ping.

        One timer for all streams instead of a timeout per stream and per wake-up:
        the live path of a stream is then a bare ``Event.wait()``. With
        ``still_valid``, the streams' credentials are then checked in one batch
        and the streams of revoked ones end.
        """
        while True:
            await asyncio.sleep(interval)
            for sub in self.subscribers():
                sub.ping()
            if still_valid is not None:
                await self._recheck_credentials(still_valid)

    async def _recheck_credentials(self, still_valid: CredentialCheck) -> None:
        held = {sub.credential for sub in self.subscribers() if sub.credential is not None}
        if not held:
            return
        try:
            valid = await still_valid(held)
        except Exception:  # the database is busy or gone: keep the streams, check next time
            logger.exception("could not re-check the streams' credentials")
            return
        self.close_credentials(held - valid)

    def close_user(self, user_id: str) -> int:
        """End every stream of the user (all their tokens were revoked); returns how many."""
        ended = [sub for sub in self.subscribers() if sub.user_id == user_id]
        for sub in ended:
            sub.close()
        return len(ended)

    def close_credentials(self, credentials: set[str]) -> int:
        """End the streams opened with these credentials (revoked); returns how many."""
        if not credentials:
            return 0
        ended = [sub for sub in self.subscribers() if sub.credential in credentials]
        for sub in ended:
            sub.close()
        if ended:
            logger.info("ended %d stream(s) whose token was revoked", len(ended))
        return len(ended)

    def close_all(self, retry_ms: int | None = None) -> None:
        """End every stream (graceful shutdown), telling live ones when to come back."""
        self.closing = True
        for registry in (self._by_task, self._by_user):
            for subs in registry.values():
                for sub in subs:
                    sub.close(retry_ms)


Replay = Callable[[int], Awaitable[list[Event]]]
#: which of the given credentials are still valid (the store answers)
CredentialCheck = Callable[[Iterable[str]], Awaitable[set[str]]]


class EventStreamResponse(web.StreamResponse):
    """A stream response that stays uncompressed.

    The hub writes live events straight to the socket, framed as the prepared
    response says; a compressed body would be corrupted by those writes, so a
    hook that asks for compression is refused (and logged).
    """

    def enable_compression(self, *args: Any, **kwargs: Any) -> None:
        logger.warning("compression of an event stream was asked for and refused")


@dataclass(frozen=True)
class StreamPlan:
    """What a stream sends before going live, decided by the handler from the database."""

    #: messages to send first (snapshot or reset), already encoded
    preamble: list[bytes]
    #: id of the last event the client has (from Last-Event-ID or the snapshot)
    last_id: int
    #: fetches events after an id, oldest first, in pages
    replay: Replay
    #: the stream ends after the first final event (task streams)
    ends_on_final: bool
    #: the preamble already carried the final state
    already_final: bool = False
    #: read the database for events after ``last_id`` before going live. Not needed
    #: after a snapshot or reset: it was read after the subscriber was registered, so
    #: every event past it reaches the buffer, and a replay would find only those.
    replay_first: bool = True


async def stream_events(
    request: web.Request,
    sub: Subscriber,
    plan: StreamPlan,
    *,
    retry_ms: int = 3000,
) -> web.StreamResponse:
    """Write one SSE response: ``retry:``, preamble, replay from the DB, then live events.

    The subscriber is registered before the replay is read, so an event
    committed meanwhile is in its buffer; ids at or below the last one sent are
    skipped, which makes the hand-over gap-free and duplicate-free.
    """
    response = EventStreamResponse(headers=SSE_HEADERS)
    if request.version < HttpVersion11:
        # HTTP/1.0 has no chunks: the stream's end is the connection's end.
        response.force_close()
    await response.prepare(request)
    if request.method == hdrs.METH_HEAD:
        return response  # the headers a GET would get, and no stream
    last_id = plan.last_id
    try:
        await response.write(f"retry: {retry_ms}\n\n".encode() + b"".join(plan.preamble))
        if plan.already_final and plan.ends_on_final:
            return response
        while plan.replay_first:
            events = await plan.replay(last_id)
            if events:
                await response.write(b"".join(
                    encode_event(e.id, e.type, e.data, e.raw) for e in events))
                last_id = events[-1].id
                if plan.ends_on_final and any(e.is_final for e in events):
                    return response
            if len(events) < REPLAY_PAGE:  # a short page is the last one
                break
        await _live(request, response, sub, last_id, plan.ends_on_final)
    except ConnectionResetError:
        logger.debug("stream of user %s closed by the client", sub.user_id)
    return response


def _drain(sub: Subscriber, last_id: int, ends_on_final: bool) -> tuple[list[bytes], int, bool]:
    """Buffered events after ``last_id``, up to the final one for a task stream."""
    chunks: list[bytes] = []
    while sub.buffer:
        event_id, payload, final = sub.buffer.popleft()
        if event_id <= last_id:
            continue
        chunks.append(payload)
        last_id = event_id
        if final and ends_on_final:
            return chunks, last_id, True
    return chunks, last_id, False


async def _live(
    request: web.Request,
    response: web.StreamResponse,
    sub: Subscriber,
    last_id: int,
    ends_on_final: bool,
) -> None:
    """Send what was buffered during the replay, then let the hub write directly.

    The buffer is drained until it stays empty across a write: events published
    while a write was awaited land in it too. Going live follows the last check
    with no await in between, so nothing falls between buffer and socket.
    """
    while sub.buffer:
        chunks, last_id, final_seen = _drain(sub, last_id, ends_on_final)
        if chunks:
            await response.write(b"".join(chunks))
        if final_seen:
            return
    if sub.overflowed or sub.closed:
        return
    transport = request.transport
    if transport is None or transport.is_closing():
        return
    # A StreamResponse without Content-Length is chunked on HTTP/1.1 and sent bare
    # (ended by closing the connection) on HTTP/1.0; the hub's direct writes must
    # frame theirs the same way.
    sub.go_live(transport, chunked=request.version >= HttpVersion11, last_id=last_id,
                ends_on_final=ends_on_final)
    while not (sub.closed or sub.finished or sub.overflowed):
        await sub.wakeup.wait()
        sub.wakeup.clear()
    if sub.overflowed:
        logger.info("dropping a slow stream of user %s", sub.user_id)
