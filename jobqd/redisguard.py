"""Redis safety checks of a running daemon: eviction policy, out of memory, data loss.

jobqd keeps every accepted job in Redis only, so three Redis states would lose
work silently; this component finds each of them, at start and then every
`INTERVAL_S` (which covers every reconnect):

- **An evicting ``maxmemory-policy``** (``allkeys-lru`` ...) drops keys under
  memory pressure: jobs, their state, the routing. Read with ``CONFIG GET``, or
  from ``INFO memory`` where CONFIG is renamed or refused. At start, anything but
  ``noeviction`` makes the daemon refuse to run (exit 78, `problem` says which
  policy and which key to set) unless ``redis.allow_eviction: true``. Found later
  (a reconnect to a server whose policy changed): consuming pauses (every queue's
  weight reads 0), ``/readyz`` says ``redis_eviction``, an ERROR is logged; it
  resumes once the policy is ``noeviction`` again.
- **Out of memory** (``noeviction`` at ``maxmemory``): writes are refused. Each
  check writes one small key; while that (or the HTTP API's last enqueue) is
  refused, ``/readyz`` says ``redis_oom``.
- **Memory backpressure** (``redis.max_memory_fraction``): every
  `MEM_INTERVAL_S` the daemon reads ``INFO memory`` (every `INTERVAL_S` while no master
  has a maxmemory, or the fraction is 1); while ``used_memory`` is above
  that fraction of ``maxmemory`` it keeps a marker ``{p:q}:mem`` on each of its
  queues (PX `MEM_MARK_TTL_MS`, refreshed with PEXPIRE, which Redis allows even at
  maxmemory), and ``enqueue.lua`` refuses new jobs while it exists (`QueueFull` with
  reason "memory"), before Redis itself would refuse writes: settles, acks, the DLQ
  and cancels use the memory left. Back below, the daemon deletes the markers;
  a marker whose daemons all died expires by itself. No maxmemory: nothing to do.
- **Data loss** (Redis restarted without persistence, failed over to an empty
  replica, flushed): daemons share an epoch key ``<prefix>:epoch``, set once with
  a random token. When it vanished or changed, Redis lost its data: the daemon
  logs an ERROR, counts it (``jobqd_redis_data_loss_total``), republishes routing,
  queue settings, weights and consumer groups at once (so producers can enqueue
  again) and adopts the new epoch. Jobs that Redis held are gone with it; see
  README ("Redis data loss") for what each configuration can still account for.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aredis
from prometheus_client import Counter, Gauge
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.exceptions import ResponseError

from jobqd import ops, publish, scripts
from jobqd.aio import sleep_or_stop
from jobqd.channels import QueueWeights
from jobqd.config import Config, mask_url
from jobqd.connect import is_cluster, primaries
from jobqd.deps import is_oom, is_redis_error
from jobqd.keys import GlobalKeys, QueueKeys
from jobqd.runtime import Runtime

log = logging.getLogger("jobqd.redisguard")

INTERVAL_S = 1.0  # how often a running daemon checks
MEM_INTERVAL_S = 0.2  # how often it reads INFO memory (redis.max_memory_fraction)
MEM_MARK_TTL_MS = 3000  # a memory-full marker nobody refreshes expires after this
SAFE_POLICY = "noeviction"

T = TypeVar("T")


def epoch_key(prefix: str) -> str:
    return f"{prefix}:epoch"


async def read_policy(r: aredis.Redis) -> str | None:
    """Redis's maxmemory-policy: CONFIG GET, else INFO memory; None if neither answers
    (a Redis error other than a refused/renamed command is raised). On a Redis
    Cluster, every master's: the first that is not noeviction, else noeviction (each
    master holds some queues, and one that evicts loses theirs)."""
    if is_cluster(r):
        nodes = await primaries(r)
        got = await asyncio.gather(*(_read_policy(r, {"target_nodes": n}) for n in nodes))
        bad = [p for p in got if p != SAFE_POLICY]
        return bad[0] if bad else SAFE_POLICY
    return await _read_policy(r, {})


async def _read_policy(r: aredis.Redis, node: dict[str, Any]) -> str | None:
    try:
        reply: Any = await r.config_get("maxmemory-policy", **node)
        for k, v in (reply or {}).items():
            if ops.s(k) == "maxmemory-policy":
                return ops.s(v)
    except ResponseError:  # CONFIG renamed (unknown command) or refused (ACL NOPERM)
        pass
    try:
        info: Any = await r.info("memory", **node)
    except ResponseError:
        return None
    value = info.get("maxmemory_policy") if isinstance(info, dict) else None
    return None if value is None else ops.s(value)


def policy_problem(cfg: Config, policy: str | None) -> str | None:
    """Why this policy is unacceptable for `cfg`, or None."""
    if policy is None or policy == SAFE_POLICY or cfg.redis.allow_eviction:
        return None
    return (f"redis at {mask_url(cfg.redis_url)} has maxmemory-policy {policy}: under "
            "memory pressure it silently evicts keys, accepted jobs, their state and the "
            "routing included. Set maxmemory-policy noeviction on the Redis server "
            "(redis.conf, or CONFIG SET maxmemory-policy noeviction), or set "
            f"redis.allow_eviction: true in {cfg.path} to run anyway and accept that risk")


class Guard:
    """One daemon's checks; `start` before the components, then `run`."""

    def __init__(self, rt: Runtime, weights: QueueWeights | None = None) -> None:
        self.rt = rt
        self.weights = weights if weights is not None else QueueWeights()  # halted on eviction
        self.token: str | None = None  # the epoch this daemon knows
        m = rt.metrics
        self._m_policy_ok = m.component(
            Gauge, "jobqd_redis_eviction_policy_ok", "1 while Redis's maxmemory-policy is "
            "noeviction (or redis.allow_eviction is set), 0 while it may evict jobs")
        self._m_data_loss = m.component(
            Counter, "jobqd_redis_data_loss", "Times this daemon found that Redis had lost "
            "its data (the epoch key vanished or changed) and republished its routing")
        self._m_oom = m.component(Gauge, "jobqd_redis_oom", "1 while this daemon's last write "
                                  "to Redis was refused for lack of memory")
        self._m_mem_full = m.component(
            Gauge, "jobqd_redis_memory_full", "1 while Redis's used_memory is above "
            "redis.max_memory_fraction of its maxmemory and enqueues are refused")
        self._m_mem_full.set_function(lambda: 1.0 if rt.health.redis_memory_full else 0.0)
        self._m_policy_ok.set(1)
        self._m_oom.set_function(lambda: 1.0 if rt.health.redis_oom else 0.0)

    async def start(self) -> str | None:
        """At start: the policy check (returns the problem that must stop the daemon)
        and the epoch."""
        rt = self.rt
        policy = await read_policy(rt.redis)
        self._set_policy(policy)
        problem = policy_problem(rt.config, policy)
        if problem is not None:
            return problem
        if policy is None:
            log.warning("cannot read redis's maxmemory-policy (CONFIG and INFO refused): "
                        "make sure it is noeviction, or accepted jobs may be evicted")
        elif policy != SAFE_POLICY:
            log.warning("redis maxmemory-policy is %s and redis.allow_eviction is set: "
                        "accepted jobs may be evicted under memory pressure", policy)
        await self._adopt_epoch()
        return None

    def _set_policy(self, policy: str | None) -> bool:
        h = self.rt.health
        ok = policy_problem(self.rt.config, policy) is None
        h.redis_policy = policy
        h.redis_eviction_ok = ok
        self.weights.halted = not ok  # the pool starts nothing while Redis may evict
        self._m_policy_ok.set(1 if ok else 0)
        return ok

    async def _adopt_epoch(self) -> None:
        r = self.rt.redis
        key = epoch_key(self.rt.config.redis.prefix)
        await r.set(key, uuid.uuid4().hex, nx=True)
        got = await r.get(key)
        self.token = None if got is None else ops.s(got)

    async def check(self) -> None:
        """One round of checks (Redis errors propagate: the caller retries later)."""
        rt = self.rt
        r = rt.redis
        was_ok = rt.health.redis_eviction_ok
        policy = await read_policy(r)
        ok = self._set_policy(policy)
        if not ok and was_ok:
            log.error("consuming paused: %s", policy_problem(rt.config, policy))
        elif ok and not was_ok:
            log.warning("redis maxmemory-policy is %s again: consuming resumes", policy)

        prefix = rt.config.redis.prefix
        key = epoch_key(prefix)
        async with r.pipeline(transaction=False) as p:
            p.get(key)
            p.exists(GlobalKeys(prefix).routing)
            epoch_raw, routing_exists = await p.execute()
        epoch = None if epoch_raw is None else ops.s(epoch_raw)
        if epoch is None or epoch != self.token:
            rt.health.redis_data_losses += 1
            self._m_data_loss.inc()
            log.error("redis lost its data (epoch key %s %s): jobs it held are gone; "
                      "republishing routing, weights and consumer groups%s", key,
                      "vanished" if epoch is None else "changed",
                      "" if routing_exists else " now")
            if epoch is None or not routing_exists:
                await self._republish()
            await self._adopt_epoch()
            return
        if not routing_exists:
            log.warning("the routing %s is missing (evicted or deleted): republishing it",
                        GlobalKeys(prefix).routing)
            await self._republish()

        try:  # the out-of-memory probe: one small write
            await r.set(key, self.token, xx=True)
        except ResponseError as e:
            if not is_oom(e):
                raise
            if not rt.health.redis_oom:
                log.warning("redis is out of memory: writes are refused (%s)", e)
            rt.health.redis_oom = True
        else:
            if rt.health.redis_oom:
                log.info("redis accepts writes again")
            rt.health.redis_oom = False

    async def check_memory(self) -> bool:
        """Set or clear the queues' memory-full markers (redis.max_memory_fraction).
        Returns whether memory can fill up: some master has a maxmemory and the
        fraction is under 1 (if not, `run` checks only every INTERVAL_S)."""
        rt = self.rt
        cfg = rt.config
        r = rt.redis
        # on a Redis Cluster INFO goes to one node unless told: ask every master
        info: Any = await r.info("memory", **({"target_nodes": AsyncRedisCluster.PRIMARIES}
                                              if is_cluster(r) else {}))
        # one server: its fields; Redis Cluster (one dict per node): the fullest node
        nodes = [info] if isinstance(info, dict) and "used_memory" in info else [
            v for v in (info.values() if isinstance(info, dict) else ())
            if isinstance(v, dict) and "used_memory" in v]
        used = mx = 0
        for n in nodes:
            u, m = int(n.get("used_memory", 0)), int(n.get("maxmemory", 0))
            if m > 0 and (mx == 0 or u / m > used / mx):
                used, mx = u, m
        fraction = cfg.redis.max_memory_fraction
        can_fill = fraction < 1 and mx > 0
        full = can_fill and used > fraction * mx
        qkeys = [QueueKeys(cfg.redis.prefix, q).memfull for q in cfg.queues]
        if full:
            value = f"{used} {mx} {fraction:g}"
            async with r.pipeline(transaction=False) as p:
                for k in qkeys:
                    p.pexpire(k, MEM_MARK_TTL_MS)
                fresh = await p.execute()
            missing = [k for k, ok in zip(qkeys, fresh, strict=True) if not ok]
            if missing:
                async with r.pipeline(transaction=False) as p:
                    for k in missing:
                        p.set(k, value, px=MEM_MARK_TTL_MS)
                    await p.execute(raise_on_error=False)  # OOM already: the probe says so
            if not rt.health.redis_memory_full:
                log.warning("redis memory is full: used_memory %d is over "
                            "redis.max_memory_fraction %g of maxmemory %d; enqueues are "
                            "refused until running jobs have drained it", used, fraction, mx)
        elif rt.health.redis_memory_full:
            await r.delete(*qkeys)
            log.warning("redis memory is below redis.max_memory_fraction again (used_memory "
                        "%d of maxmemory %d): enqueues are accepted", used, mx)
        rt.health.redis_memory_full = full
        return can_fill

    async def _republish(self) -> None:
        rt = self.rt
        await scripts.preload(rt.redis)
        await publish.publish(rt.redis, rt.config)  # routing, queue settings, groups
        await publish.publish_weights(rt.redis, rt.config)
        log.warning("republished routing of %d tasks on %d queues", len(rt.config.tasks),
                    len(rt.config.queues))


async def run(guard: Guard, stop: asyncio.Event) -> None:
    """Check memory every MEM_INTERVAL_S while it can fill (`Guard.check_memory`), else
    every INTERVAL_S like the rest, until `stop`: a daemon on a Redis without maxmemory
    does not read INFO five times a second."""
    live = True  # until the first reading says otherwise
    next_full = time.monotonic() + INTERVAL_S
    while not await sleep_or_stop(MEM_INTERVAL_S if live else INTERVAL_S, stop):
        live = await _skip_redis_errors(guard.check_memory, live)
        if time.monotonic() >= next_full - MEM_INTERVAL_S / 2:
            next_full = time.monotonic() + INTERVAL_S
            await _skip_redis_errors(guard.check, None)


async def _skip_redis_errors(check: Callable[[], Awaitable[T]], otherwise: T) -> T:
    """`check()`, or `otherwise` if Redis failed it (logged at DEBUG: the next round
    tries again, and /readyz tells the operator about Redis)."""
    try:
        return await check()
    except Exception as e:
        if not is_redis_error(e):
            raise
        log.debug("redis check skipped: %s", e)
        return otherwise
