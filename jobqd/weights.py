"""Weighted fair scheduling across queues, and the weight-refresh loop.

The fetcher (`jobqd.fetch.SmoothWRR`) orders job starts by these weights; a
queue whose weight is 0 starts nothing. This loop re-reads them, with the paused
queues, into the `channels.QueueWeights` the pool reads.

Runtime weights live in Redis (``<prefix>:weights``); the YAML gives the
initial values (`publish.publish_weights`, on start and on every reload).
"""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aredis

from jobqd import ops
from jobqd.aio import sleep_or_stop
from jobqd.channels import QueueWeights
from jobqd.config import Config
from jobqd.deps import is_redis_error
from jobqd.keys import GlobalKeys
from jobqd.publish import parse_weights
from jobqd.runtime import Runtime

log = logging.getLogger("jobqd.weights")


async def refresh(r: aredis.Redis, cfg: Config, view: QueueWeights) -> dict[str, int]:
    """Re-read the runtime weights and the paused queues (one round trip) into `view`."""
    g = GlobalKeys(cfg.redis.prefix)
    async with r.pipeline(transaction=False) as p:
        p.hgetall(g.weights)
        p.smembers(g.paused)
        raw, paused_raw = await p.execute()
    stored = parse_weights(raw, g.weights)
    weights = {q.name: stored.get(q.name, q.weight) for q in cfg.queues.values()}
    if weights != view.weights:
        if view.weights:
            log.info("weights changed", extra={"weights": weights})
        view.weights = weights
    paused = frozenset(ops.s(x) for x in paused_raw)
    if paused != view.paused:
        log.info("paused queues: %s", ", ".join(sorted(paused)) or "none")
        view.paused = paused
    return weights


async def run(rt: Runtime, view: QueueWeights, stop: asyncio.Event) -> None:
    """The weight-refresh loop: re-read runtime weights every refresh_interval_s."""
    while not stop.is_set():
        try:
            await refresh(rt.redis, rt.config, view)
        except (OSError, ConnectionError, TimeoutError) as e:
            log.warning("cannot refresh weights: %s", e)
        except Exception as e:
            if not is_redis_error(e):
                raise
            log.warning("cannot refresh weights: %s", e)
        await sleep_or_stop(rt.config.weights.refresh_interval_s, stop)
