"""The scheduler: moves due delayed jobs and retries into their streams.

Every daemon runs it; PROMOTE.lua is atomic, so several at once are harmless.
It sleeps until the next due job, at most `MAX_SLEEP_S`: a job is never run
before it is due (the Redis clock decides). When this daemon schedules a retry
or a deferral itself it wakes the scheduler, which re-plans at once; a job
scheduled by another process is promoted at most `MAX_SLEEP_S` late.
"""

from __future__ import annotations

import asyncio
import logging

from jobqd import scripts
from jobqd.aio import run_turns
from jobqd.keys import QueueKeys
from jobqd.runtime import Runtime

log = logging.getLogger("jobqd.scheduler")

MAX_SLEEP_S = 0.5  # also the worst-case lateness of a job scheduled by another process
MIN_SLEEP_S = 0.002
PROMOTE_BATCH = 1000


async def promote_once(rt: Runtime) -> float:
    """Promote every due job of every queue; return seconds until the next one is due."""
    cfg = rt.config
    next_due = MAX_SLEEP_S
    for q in cfg.queues:
        qk = QueueKeys(cfg.redis.prefix, q)
        while True:
            moved, wait_ms = await scripts.PROMOTE(rt.redis, [qk.stream, qk.delayed, qk.state],
                                                   [PROMOTE_BATCH])
            if int(moved) < PROMOTE_BATCH:
                break
        if int(wait_ms) >= 0:
            next_due = min(next_due, int(wait_ms) / 1000.0)
    return max(MIN_SLEEP_S, next_due)


async def run(rt: Runtime, wakeup: asyncio.Event, stop: asyncio.Event) -> None:
    """Promote due jobs until `stop`; `wakeup` (set by the pool when it schedules a
    retry or a deferral) re-plans the sleep at once."""
    await run_turns(lambda: promote_once(rt), stop, wake=wakeup, what="scheduler", log=log)
