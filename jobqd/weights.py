"""Weighted fair scheduling across queues, and the weight-refresh loop.

The fetcher (`jobqd.fetch.SmoothWRR`) orders job starts by these weights; a
queue whose weight is 0 is paused.

Runtime weights live in Redis (``<prefix>:weights``); the YAML gives the
initial values. On start and on every reload a queue whose YAML weight changed
since it was last applied (``<prefix>:weights:yaml``) is overwritten with it;
an unchanged YAML weight leaves the runtime value (set by `jobqd weights set`)
alone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from jobqd import ops
from jobqd.aio import sleep_or_stop
from jobqd.deps import is_redis_error
from jobqd.keys import GlobalKeys

if TYPE_CHECKING:
    from jobqd.runtime import Runtime

log = logging.getLogger("jobqd.weights")

_warned: set[tuple[str, str, str]] = set()


def _parse(raw: Mapping[bytes | str, bytes | str], key: str) -> dict[str, int]:
    """A weights hash as {queue: weight}; a value that is not a whole number >= 0 (written
    by hand, say) is skipped with one warning, so it cannot stop the daemon."""
    out: dict[str, int] = {}
    for k, v in raw.items():
        q, text = ops.s(k), ops.s(v)
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


async def publish(rt: Runtime) -> dict[str, int]:
    """Apply YAML weights with the documented precedence; return the effective weights."""
    g = GlobalKeys(rt.config.redis.prefix)
    r = rt.redis
    seed_raw = await r.hgetall(g.weights_seed)
    seed = _parse(seed_raw, g.weights_seed)
    changed = {q.name: q.weight for q in rt.config.queues.values() if seed.get(q.name) != q.weight}
    if changed:
        async with r.pipeline(transaction=True) as p:
            p.hset(g.weights, mapping=changed)  # type: ignore[arg-type]
            p.hset(g.weights_seed, mapping=changed)  # type: ignore[arg-type]
            await p.execute()
    return await refresh(rt)


async def refresh(rt: Runtime) -> dict[str, int]:
    """Re-read the runtime weights and the paused queues (one round trip)."""
    g = GlobalKeys(rt.config.redis.prefix)
    async with rt.redis.pipeline(transaction=False) as p:
        p.hgetall(g.weights)
        p.smembers(g.paused)
        raw, paused_raw = await p.execute()
    stored = _parse(raw, g.weights)
    weights = {q.name: stored.get(q.name, q.weight) for q in rt.config.queues.values()}
    if not rt.health.redis_eviction_ok:  # jobqd.redisguard: an evicting Redis pauses consuming
        weights = dict.fromkeys(weights, 0)
    if weights != rt.weights:
        if rt.weights:
            log.info("weights changed", extra={"weights": weights})
        rt.weights = weights
    paused = frozenset(ops.s(x) for x in paused_raw)
    if paused != rt.paused:
        log.info("paused queues: %s", ", ".join(sorted(paused)) or "none")
        rt.paused = paused
    return weights


async def run(rt: Runtime, stop: asyncio.Event) -> None:
    """The weight-refresh loop: re-read runtime weights every refresh_interval_s."""
    while not stop.is_set():
        try:
            await refresh(rt)
        except (OSError, ConnectionError, TimeoutError) as e:
            log.warning("cannot refresh weights: %s", e)
        except Exception as e:
            if not is_redis_error(e):
                raise
            log.warning("cannot refresh weights: %s", e)
        await sleep_or_stop(rt.config.weights.refresh_interval_s, stop)
