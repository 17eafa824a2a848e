"""The gauge-refresh loop: queue depths, lag, dead letters, accepting state,
weights and the enqueue counters (every producer's, kept by enqueue.lua) read
from Redis (true across daemons) on a timer, never per scrape; plus this
daemon's consumer states."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from jobqd import ops
from jobqd.aio import sleep_or_stop
from jobqd.channels import QueueWeights
from jobqd.deps import is_redis_error
from jobqd.runtime import Runtime

log = logging.getLogger("jobqd.gauges")

INTERVAL_S = 2.0


async def refresh(rt: Runtime, snapshot: Callable[[], dict[str, int]],
                  weights: QueueWeights) -> list[ops.QueueStats]:
    snap = snapshot()
    m = rt.metrics
    m.consumers.labels("busy").set(snap["running"])
    m.consumers.labels("idle").set(max(0, snap["capacity"] - snap["running"]))
    stats: list[ops.QueueStats] = await ops.AsyncRunner(rt.redis).run(
        ops.queue_stats(rt.config.redis.prefix, list(rt.config.queues)))
    for st in stats:
        m.queue_depth.labels(st.name).set(st.depth)
        m.queue_lag.labels(st.name).set(st.lag_s)
        m.dlq_depth.labels(st.name).set(st.dead)
        m.accepting.labels(st.name).set(1 if st.accepting else 0)
        m.weight.labels(st.name).set(weights.weights.get(st.name, st.weight or 0))
        m.set_enqueued(st.name, st.enqueued)
    return stats


async def run(rt: Runtime, snapshot: Callable[[], dict[str, int]], weights: QueueWeights,
              stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            await refresh(rt, snapshot, weights)
        except Exception as e:
            if not is_redis_error(e):
                raise
            log.debug("gauge refresh failed: %s", e)
        await sleep_or_stop(INTERVAL_S, stop)
