"""The reaper: takes back the jobs of dead or stalled consumers.

One reaper is active at a time across all daemons, under a lease lock
(``<prefix>:reaper:lock``, PX = 3 x interval) that a kill -9 cannot leave held:
the lock simply expires. Each round, for every queue:

1. Liveness. A consumer of the group whose heartbeat is older than
   ``heartbeat.timeout_s`` is dead: its pending entries are claimed and handed
   to live consumers at once (re-added at the stream tail), and the consumer is
   removed from the group once it owns nothing. Skipped entirely while the
   heartbeat store is unreachable (the blip rule, see `jobqd.heartbeat`).
2. Visibility backstop. An entry idle longer than ``reaper.visibility_timeout_s``
   (its owner stopped renewing its lease: a hung event loop) is taken back too.

A reclaim counts a delivery (``lost``); a job lost ``reaper.max_deliveries``
times goes to the dead-letter queue with reason ``worker_lost`` instead of
killing the next worker. Reclaims never use up exception retries.

Bystanders: a poison job that kills its worker takes the jobs running beside it
down too. Re-added side by side they would be fetched together again and die
with it three times. So when a dead consumer held more than one job, they come
back spread at random over `SPREAD_S` (through the delayed set), and the
culprit soon runs without the same companions. For the spread to hold, the
reaper's settles wake its daemon's scheduler (as the pool's retries do,
`Settler.scheduled`): it then promotes each job at its own due time, instead of
those due within its next `scheduler.MAX_SLEEP_S` (0.5 s, half of `SPREAD_S`)
together, to be fetched side by side again.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import Any, Protocol

from redis.exceptions import ResponseError

from jobqd import scripts
from jobqd.aio import Backoff, sleep_or_stop
from jobqd.deps import is_redis_error
from jobqd.keys import GROUP, GlobalKeys, QueueKeys
from jobqd.ops import s
from jobqd.outcomes import Dead, Delivery, HandedBack, Outcome
from jobqd.runtime import Runtime
from jobqd.settle import Settle, Settler, try_decode

log = logging.getLogger("jobqd.reaper")

class Liveness(Protocol):
    """What the reaper needs of the heartbeat store (`jobqd.heartbeat`): who is alive."""

    async def alive(self, timeout_s: float) -> set[str] | None:
        """Consumers that beat within `timeout_s`; None when the store cannot tell."""


CLAIM_BATCH = 100
MAX_SCAN_CALLS = 100  # per queue and round: up to ~100,000 pending entries looked at
SPREAD_S = 1.0  # reclaimed jobs of one dead consumer come back spread over this window


async def reap_once(rt: Runtime, store: Liveness, *, liveness: bool = True,
                    scheduled: asyncio.Event | None = None) -> dict[str, int]:
    """One reaper round; returns counts by reason (for tests and logs). `scheduled` is
    set when jobs went back through the delayed set (see "Bystanders" above)."""
    cfg = rt.config
    r = rt.redis
    counts = {"worker_lost": 0, "stalled": 0, "dead": 0}
    settler = Settler(rt.metrics, rt.events, rt.reaper_name, lambda: rt.config,
                      scheduled=scheduled)
    rnd = _Round(rt, settler, counts)
    alive = await store.alive(cfg.heartbeat.timeout_s) if liveness else None
    if alive is None and liveness:
        log.warning("heartbeat store unreachable: no reclaim by liveness this round")
    timeout_ms = int(cfg.heartbeat.timeout_s * 1000)
    for q in cfg.queues:
        qk = QueueKeys(cfg.redis.prefix, q)
        if alive is not None:
            try:
                consumers = await r.xinfo_consumers(qk.stream, GROUP)
            except ResponseError:  # no stream or group yet
                continue
            for c in consumers:
                name = s(c["name"])
                if name in alive or name in (rt.name, rt.reaper_name):
                    continue
                # silent in the group too: a live owner renews its leases (XCLAIM JUSTID
                # resets the idle time) far more often than heartbeat.timeout_s. This
                # also covers a daemon that started after `alive` was read.
                if int(c["idle"]) <= timeout_ms:
                    continue
                if int(c["pending"]) > 0:
                    await _reclaim_consumer(rnd, qk, q, name)
                elif await scripts.FORGET_CONSUMER(r, [qk.stream], [GROUP, name]):
                    log.info("removed dead consumer %s from %s", name, q)
        start = "0-0"
        for _ in range(MAX_SCAN_CALLS):  # XAUTOCLAIM scans <= 10 x COUNT entries a call
            try:
                reply = await r.xautoclaim(qk.stream, GROUP, rt.reaper_name,
                                           int(cfg.reaper.visibility_timeout_s * 1000),
                                           start_id=start, count=CLAIM_BATCH)
            except ResponseError:
                break
            start, entries = s(reply[0]), reply[1]
            gone = [e[0] for e in entries if e and e[0] is not None and e[1] is None]
            if gone:  # Redis 6.2 claims deleted entries as nil: ack them away
                await r.xack(qk.stream, GROUP, *gone)
            live = [e for e in entries if e and e[1] is not None]
            if live:
                await _hand_back(rnd, q, live, "stalled")
            if start == "0-0":
                break
    return counts


@dataclass(slots=True)
class _Round:
    rt: Runtime
    settler: Settler
    counts: dict[str, int]


async def _reclaim_consumer(rnd: _Round, qk: QueueKeys, q: str, name: str) -> None:
    r = rnd.rt.redis
    while True:
        rows = await r.xpending_range(qk.stream, GROUP, min="-", max="+", count=CLAIM_BATCH,
                                      consumername=name)
        if not rows:
            return
        ids: list[Any] = [row["message_id"] for row in rows]
        entries = await r.xclaim(qk.stream, GROUP, rnd.rt.reaper_name, 0, ids)
        present = {e[0] for e in entries if e and e[1] is not None}
        gone = [i for i in ids if i not in present]
        if gone:  # pending but deleted from the stream: nothing left to run
            await r.xack(qk.stream, GROUP, *gone)
        log.warning("consumer %s is dead: reclaiming %d jobs from %s", name, len(present), q)
        await _hand_back(rnd, q, [e for e in entries if e and e[1] is not None], "worker_lost")
        if len(rows) < CLAIM_BATCH:
            return


async def _hand_back(rnd: _Round, q: str, entries: list[Any], reason: str) -> None:
    """Give the claimed entries back to the queue (``lost + 1``), or dead-letter a job
    whose worker was lost `reaper.max_deliveries` times."""
    rt, counts = rnd.rt, rnd.counts
    cfg = rt.config
    out: list[Settle] = []
    for eid, fields in entries:
        if fields is None:
            continue
        d = Delivery(q, eid, fields)
        env = try_decode(d)
        outcome: Outcome
        if env is None:  # not a job: to the dead-letter queue, not counted as a reclaim
            outcome = Dead("malformed", "malformed entry found by the reaper")
        else:
            lost = env.lost + 1
            if lost >= cfg.reaper.max_deliveries:
                outcome = Dead("worker_lost", f"worker lost {lost} times ({reason})", lost=lost)
                counts["dead"] += 1
            else:
                delay = random.uniform(0, SPREAD_S) if len(entries) > 1 else 0.0
                outcome = HandedBack(lost=lost, delay_s=delay)
            counts[reason] += 1
            rt.metrics.reclaimed.labels(reason).inc()
        s = rnd.settler.build(outcome, d, env)
        if s is not None:
            out.append(s)
    if out:
        await rnd.settler.settle(rt.redis, cfg, {q: out})


async def _holder_is_dead(rt: Runtime, store: Liveness, lock: str) -> bool:
    """Is the reaper lock held by a daemon whose heartbeat is stale? Then release it
    (compare-and-delete on its token), instead of waiting up to 3 x reaper.interval_s
    for it to expire: a killed reaper must not delay the recovery of its own jobs."""
    holder = await rt.redis.get(lock)
    if holder is None:
        return True
    alive = await store.alive(rt.config.heartbeat.timeout_s)
    if alive is None or s(holder) in alive:  # the blip rule: unsure means alive
        return False
    released = await scripts.LOCK(rt.redis, [lock], [s(holder), 0, "release"])
    if released:
        log.warning("the reaper %s stopped beating: taking over its lock", s(holder))
    return bool(released)


async def _forget_reaper_consumer(rt: Runtime) -> None:
    """At exit: drop the reaper's consumer from groups where it owns nothing."""
    for q in rt.config.queues:
        try:
            await asyncio.wait_for(scripts.FORGET_CONSUMER(
                rt.redis, [QueueKeys(rt.config.redis.prefix, q).stream],
                [GROUP, rt.reaper_name]), 2.0)
        except Exception as e:
            if isinstance(e, ResponseError | TimeoutError) or is_redis_error(e):
                continue
            raise


async def run(rt: Runtime, store: Liveness, stop: asyncio.Event,
              scheduler_wakeup: asyncio.Event | None = None) -> None:
    """Reaper rounds under the lease lock until `stop`; `scheduler_wakeup` is set after a
    round that handed jobs back through the delayed set (see "Bystanders" above)."""
    g = GlobalKeys(rt.config.redis.prefix)
    backoff = Backoff()
    held = False
    loop = asyncio.get_running_loop()
    # When Redis came back after an outage (None while unreachable). Every beat
    # stored before the outage is stale then: live workers get heartbeat.timeout_s
    # to beat again before the reaper judges them. At start there was no outage.
    reachable_since: float | None = float("-inf")
    try:
        while not stop.is_set():
            interval = rt.config.reaper.interval_s
            try:
                got = await scripts.LOCK(rt.redis, [g.reaper_lock],
                                         [rt.name, int(interval * 3000), "acquire"])
                if reachable_since is None:
                    reachable_since = loop.time()
                settled = loop.time() - reachable_since >= rt.config.heartbeat.timeout_s
                if not got and settled and await _holder_is_dead(rt, store, g.reaper_lock):
                    got = await scripts.LOCK(rt.redis, [g.reaper_lock],
                                             [rt.name, int(interval * 3000), "acquire"])
                if got and not held:
                    log.info("this daemon is now the reaper")
                held = bool(got)
                if held:
                    counts = await reap_once(rt, store, liveness=settled,
                                             scheduled=scheduler_wakeup)
                    if any(counts.values()):
                        log.info("reaper round: %s", counts)
                backoff.reset()
            except Exception as e:
                if not is_redis_error(e):
                    raise
                reachable_since = None
                log.warning("reaper cannot reach redis: %s", e)
                await sleep_or_stop(backoff.next(), stop)
                continue
            await sleep_or_stop(interval, stop)
    finally:
        await _forget_reaper_consumer(rt)
        if held:
            try:
                await asyncio.wait_for(
                    scripts.LOCK(rt.redis, [g.reaper_lock], [rt.name, 0, "release"]), 2.0)
            except Exception as e:
                log.debug("could not release the reaper lock (it expires): %s", e)
