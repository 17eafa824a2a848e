"""Publish this daemon's routing to Redis (on start and on every reload).

Producers need only the Redis URL: they read ``<prefix>:routing`` (task ->
queue) and the enqueue script checks the queue's ``conf`` hash (known tasks,
watermarks, payload limit) inside the same atomic step that adds the job.
Every daemon sharing a prefix is expected to run the same config; the last
one to start or reload wins.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from jobqd import scripts
from jobqd.config import Config
from jobqd.keys import GlobalKeys, QueueKeys
from jobqd.runtime import Runtime

log = logging.getLogger("jobqd.publish")


async def publish_config(cfg: Config) -> None:
    """Publish routing, queue settings and weights without running a daemon
    (`jobqd publish`: a deploy step, so producers can enqueue before any daemon
    has started with this prefix)."""
    import redis.asyncio as aredis  # noqa: PLC0415

    from jobqd import scripts, weights  # noqa: PLC0415

    r = aredis.Redis.from_url(cfg.redis_url)
    try:
        rt = Runtime(config=cfg, redis=r)
        await scripts.preload(r)
        await publish(rt)
        await weights.publish(rt)
    finally:
        await r.aclose()


async def publish(rt: Runtime, cfg: Config | None = None) -> None:
    cfg = cfg or rt.config
    r = rt.redis
    g = GlobalKeys(cfg.redis.prefix)
    routing = cfg.routing()
    known = {m.decode() if isinstance(m, bytes) else m for m in await r.smembers(g.queues)}
    async with r.pipeline(transaction=True) as p:
        p.delete(g.routing)
        if routing:
            p.hset(g.routing, mapping=routing)  # type: ignore[arg-type]
        p.sadd(g.queues, *cfg.queues)
        await p.execute()
    for q in cfg.queues.values():
        qk = QueueKeys(cfg.redis.prefix, q.name)
        conf: dict[str, str | int] = {f"t:{t}": 1 for t in routing}
        conf["maxp"] = cfg.max_payload_bytes
        if q.high_watermark is not None:
            conf["high"] = q.high_watermark
            conf["low"] = q.low_watermark or 0
        async with r.pipeline(transaction=True) as p:
            p.delete(qk.conf)
            p.hset(qk.conf, mapping=conf)  # type: ignore[arg-type]
            if q.high_watermark is None:
                p.delete(qk.full)
            await p.execute()
        await scripts.ensure_group(r, qk.stream)
    gone = known - set(cfg.queues)
    held = await held_jobs(r, cfg.redis.prefix, gone)
    for name in sorted(gone):  # a removed queue refuses new jobs
        await r.delete(QueueKeys(cfg.redis.prefix, name).conf)
        if name in held:
            queued, scheduled = held[name]
            log.warning("queue %r is no longer configured but still holds %s: it refuses new "
                        "jobs, and these wait until it is configured again", name,
                        describe_held(queued, scheduled),
                        extra={"queue": name, "queued": queued, "scheduled": scheduled})
        else:
            log.info("queue %r is no longer configured (it is empty): it refuses new jobs", name)


async def held_jobs(r: Any, prefix: str, queues: Iterable[str]) -> dict[str, tuple[int, int]]:
    """{queue: (queued or running, scheduled)} for each of `queues` still holding jobs:
    XLEN of its stream (entries not yet acked) and ZCARD of its delayed set."""
    names = sorted(queues)
    if not names:
        return {}
    async with r.pipeline(transaction=False) as p:
        for q in names:
            qk = QueueKeys(prefix, q)
            p.xlen(qk.stream)
            p.zcard(qk.delayed)
        counts = await p.execute()
    out: dict[str, tuple[int, int]] = {}
    for i, q in enumerate(names):
        queued, scheduled = int(counts[2 * i]), int(counts[2 * i + 1])
        if queued or scheduled:
            out[q] = (queued, scheduled)
    return out


def describe_held(queued: int, scheduled: int) -> str:
    return f"{queued} queued or running and {scheduled} scheduled jobs"
