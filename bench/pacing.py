"""What every benchmark server shares: the publisher's pacing and the timestamp it stamps.

The publisher runs inside the server under test (as a real publisher would),
so its pacing code must be the same in Zhiyi's launcher and in the references.
The stamp is ``time.monotonic_ns()`` at the moment the publisher decides to
publish; CLOCK_MONOTONIC is one clock for all processes of the machine, so a
client process subtracts it from its own receipt time.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator

__all__ = ["STAMP_RE", "paced", "stamp"]

#: how a client finds the publish time in an event's bytes
STAMP_RE = re.compile(rb"@ts=(\d+)@")
#: the task benchmark's work shape
STEPS = 10


def stamp(seq: int) -> str:
    """The notification message of event ``seq``: carries its publish time."""
    return f"bench event {seq} @ts={time.monotonic_ns()}@"


async def paced(count: int, rate: float) -> AsyncIterator[int]:
    """Yield 0..count-1 at ``rate`` per second (0: as fast as the loop allows)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    for seq in range(count):
        if rate > 0:
            delay = start + seq / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        else:
            # Yield anyway, so the streams interleave with a burst as they would in production.
            await asyncio.sleep(0)
        yield seq
