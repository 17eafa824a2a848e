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
    """Promote every due job of every queue; return seconds until the next one is due.

    One pipelined round trip for all queues; again only for the queues that had more
    than a batch due."""
    cfg = rt.config
    next_due = MAX_SLEEP_S
    todo = list(cfg.queues)
    while todo:
        calls = [scripts.ScriptCall(scripts.PROMOTE, [qk.stream, qk.delayed, qk.state],
                                    [PROMOTE_BATCH])
                 for qk in (QueueKeys(cfg.redis.prefix, q) for q in todo)]
        replies = await scripts.pipelined(rt.redis, calls)
        more = []
        for q, reply in zip(todo, replies, strict=True):
            if isinstance(reply, Exception):
                raise reply
            moved, wait_ms = reply
            if int(moved) >= PROMOTE_BATCH:
                more.append(q)
            elif int(wait_ms) >= 0:
                next_due = min(next_due, int(wait_ms) / 1000.0)
        todo = more
    return max(MIN_SLEEP_S, next_due)


async def run(rt: Runtime, wakeup: asyncio.Event, stop: asyncio.Event) -> None:
    """Promote due jobs until `stop`; `wakeup` (set by the pool when it schedules a
    retry or a deferral) re-plans the sleep at once."""
    await run_turns(lambda: promote_once(rt), stop, wake=wakeup, what="scheduler", log=log)
