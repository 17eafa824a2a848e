"""Small asyncio plumbing written once: wait for the first of several events,
sleep until stopped, and capped exponential backoff."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable


async def wait_first(*events: asyncio.Event,
                     timeout_s: float | None = None) -> asyncio.Event | None:
    """Wait until one of `events` is set, at most `timeout_s` seconds.

    Returns the first event found set (in argument order), or None at the timeout.
    Returns at once when one is set already. Never leaves a waiter task behind.
    """
    for e in events:
        if e.is_set():
            return e
    if timeout_s is not None and timeout_s <= 0:
        return None
    if len(events) == 1:  # the common case (the acker's linger): no waiter task at all
        try:
            async with asyncio.timeout(timeout_s):
                await events[0].wait()
        except TimeoutError:
            return None
        return events[0]
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
    for e in events:
        if e.is_set():
            return e
    return None


async def sleep_or_stop(seconds: float, stop: asyncio.Event) -> bool:
    """Sleep up to `seconds`; return True as soon as `stop` is set."""
    return await wait_first(stop, timeout_s=max(0.0, seconds)) is stop


async def run_turns(turn: Callable[[], Awaitable[float]], stop: asyncio.Event, *,
                    wake: asyncio.Event | None = None, what: str,
                    log: logging.Logger) -> None:
    """The loop of a periodic component, written once: `turn()` until `stop`, sleeping
    the seconds it returns; a dependency outage (`deps.is_outage`) backs off
    (0.1 -> 5 s, logged) instead of crashing; `wake` cuts a sleep short."""
    from jobqd.deps import is_outage  # noqa: PLC0415 - deps imports nothing of ours

    backoff = Backoff()
    wake = wake or asyncio.Event()
    while not stop.is_set():
        try:
            wait = await turn()
            backoff.reset()
        except Exception as e:
            if not is_outage(e):
                raise
            wait = backoff.next()
            log.warning("%s cannot reach redis (%s); retrying in %.1fs", what, e, wait)
        if await wait_first(stop, wake, timeout_s=wait) is wake:
            wake.clear()


class Backoff:
    """Capped exponential backoff for reconnect loops (never a busy loop)."""

    def __init__(self, first_s: float = 0.1, max_s: float = 5.0) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self.n = 0

    def next(self) -> float:
        d = float(min(self.max_s, self.first_s * 2.0**self.n))
        self.n += 1
        return d

    def reset(self) -> None:
        self.n = 0
