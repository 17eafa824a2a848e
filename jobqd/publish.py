"""Publish this daemon's routing to Redis (on start and on every reload).

Producers need only the Redis URL: they read ``<prefix>:routing`` (task ->
queue) and the enqueue script checks the queue's ``conf`` hash (known tasks,
watermarks, payload limit) inside the same atomic step that adds the job.
Every daemon sharing a prefix is expected to run the same config; the last
one to start or reload wins.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import redis.asyncio as aredis

from jobqd import connect, scripts
from jobqd.config import Config
from jobqd.keys import GlobalKeys, QueueKeys

log = logging.getLogger("jobqd.publish")


async def publish_config(cfg: Config) -> None:
    """Publish routing, queue settings and weights without running a daemon
    (`jobqd publish`: a deploy step, so producers can enqueue before any daemon
    has started with this prefix)."""
    r = connect.connect(cfg.redis_url)
    try:
        await scripts.preload(r)
        await publish(r, cfg)
        await publish_weights(r, cfg)
    finally:
        await r.aclose()


async def publish(r: aredis.Redis, cfg: Config) -> None:
    """The routing, each queue's settings and consumer group."""
    g = GlobalKeys(cfg.redis.prefix)
    routing = cfg.routing()
    known = {m.decode() if isinstance(m, bytes) else m for m in await r.smembers(g.queues)}
    await r.sadd(g.queues, *cfg.queues)  # before the routing names them
    async with r.pipeline(transaction=True) as p:  # one key: one slot on a cluster too
        p.delete(g.routing)
        if routing:
            p.hset(g.routing, mapping=routing)  # type: ignore[arg-type]
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


_warned: set[tuple[str, str, str]] = set()


def parse_weights(raw: Mapping[bytes | str, bytes | str], key: str) -> dict[str, int]:
    """A weights hash as {queue: weight}; a value that is not a whole number >= 0 (written
    by hand, say) is skipped with one warning, so it cannot stop the daemon."""
    out: dict[str, int] = {}
    for k, v in raw.items():
        q = k.decode() if isinstance(k, bytes) else k
        text = v.decode() if isinstance(v, bytes) else v
        try:
            w = int(text)
        except ValueError:
            w = -1
        if w < 0:
            if (key, q, text) not in _warned:
                _warned.add((key, q, text))
                log.warning("ignoring weight %r of queue %r in %s: not a whole number >= 0",
                            text, q, key)
            continue
        out[q] = w
    return out


async def publish_weights(r: aredis.Redis, cfg: Config) -> None:
    """Apply the YAML weights with the documented precedence: a queue whose YAML weight
    changed since it was last applied (``<prefix>:weights:yaml``) is overwritten with
    it; an unchanged YAML weight leaves the runtime value (`jobqd weights set`) alone."""
    g = GlobalKeys(cfg.redis.prefix)
    seed = parse_weights(await r.hgetall(g.weights_seed), g.weights_seed)
    changed = {q.name: q.weight for q in cfg.queues.values() if seed.get(q.name) != q.weight}
    if changed:
        # two global keys, so two slots on a cluster: not one transaction. The seed is
        # written second: a crash in between re-applies the same YAML weight next time
        await r.hset(g.weights, mapping=changed)  # type: ignore[arg-type]
        await r.hset(g.weights_seed, mapping=changed)  # type: ignore[arg-type]
