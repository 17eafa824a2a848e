"""Per-task limits, global across every daemon: concurrency and rate.

* ``tasks.<name>.concurrency``: at most N jobs of the task run at once. A running
  job holds a slot: a member of ``{p:task:<name>}:running`` (ZSET job id -> lease
  expiry, ms, Redis clock). The holder renews its leases every heartbeat
  (`Limiter.renew`), so the slots of a daemon that crashed free themselves after
  ``3 * heartbeat.interval_s``: `limit_acquire.lua` prunes expired members first.
* ``tasks.<name>.rate_limit`` ("100/s"): a token bucket in ``{p:task:<name>}:bucket``
  (capacity = count, refilled at count/period), evaluated with Redis ``TIME``.

Both are checked by one script on one task's keys (one hash tag), atomically: a
token is only spent when a slot is free, a slot only taken when a token is there.

A job over its limit is neither run nor failed. `acquire` returns how long to
wait; the pool settles the entry as a deferral (through the delayed set, no
attempt used), so the consumer moves on to other work at once (no head-of-line
blocking) and the job comes back later (no busy loop). Tasks without limits
never pay a round trip.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import Counter

from jobqd import scripts
from jobqd.aio import Backoff
from jobqd.config import TaskConfig
from jobqd.deps import is_redis_error
from jobqd.keys import GlobalKeys
from jobqd.runtime import Runtime

log = logging.getLogger("jobqd.limits")

ACQUIRE = scripts.LIMIT_ACQUIRE
RENEW = scripts.LIMIT_RENEW

LEASE_HEARTBEATS = 3  # a slot's lease: this many heartbeat.interval_s
# A job refused for concurrency waits at least CONCURRENCY_WAIT_S (uniform in the
# range); with many waiting, longer: all of a task's waiting jobs together re-check
# about RECHECKS_PER_SLOT_S * concurrency times a second (clamped to RECHECKS_S), so
# a freed slot is soon found and a backlog of any size costs the same.
CONCURRENCY_WAIT_S = (0.05, 0.25)
CONCURRENCY_MAX_WAIT_S = 30.0
RECHECKS_PER_SLOT_S = 10
RECHECKS_S = (20, 200)
WAITING_GRACE_S = 10.0  # a refused job this late back is no longer counted as waiting
MAX_CALLS_IN_FLIGHT = 32  # acquire calls at once per daemon (the Redis pool holds 100)
REDIS_ERROR_WAIT_S = 1.0  # Redis unreachable: defer (fail closed) about this long
WARN_EVERY_S = 10.0
RELEASE_TRIES = 3  # then give up: the lease frees the slot anyway
RENEW_CHUNK = 1000

_NO_TOKEN = 2  # limit_acquire.lua: 1 concurrency full, 2 no token


def limited(task: TaskConfig) -> bool:
    """Does this task have a limit (and so cost a round trip before it starts)?"""
    return task.concurrency is not None or task.rate_limit is not None


class Limiter:
    """One per daemon (per `Runtime`). All methods run on the daemon's event loop."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.held: dict[str, set[str]] = {}  # task -> job ids holding a slot through us
        self._pending: dict[str, set[str]] = {}  # releases not sent yet
        self._inflight: dict[str, set[str]] = {}  # releases being sent
        self._inflight_done = asyncio.Event()  # set when that round trip is over
        self._flusher: asyncio.Task[None] | None = None
        self._io = asyncio.Lock()  # renewals and releases never overtake each other
        self._calls = asyncio.Semaphore(MAX_CALLS_IN_FLIGHT)
        self._counters: dict[tuple[str, str], Any] = {}
        self._warned = -WARN_EVERY_S
        self.deferred = rt.metrics.component(
            Counter, "jobqd_jobs_deferred", "Job starts put off because the task was at its "
            "concurrency or rate limit (or Redis was unreachable to check)", ("task", "reason"))

    # ------------------------------------------------------------ acquire

    def applies(self, task: TaskConfig) -> bool:
        """Does this task have a limit (and so cost a round trip before it starts)?"""
        return limited(task)

    def lease_ms(self) -> int:
        return max(1, round(LEASE_HEARTBEATS * self.rt.config.heartbeat.interval_s * 1000))

    async def acquire(self, task: TaskConfig, job_id: str) -> float | None:
        """None: start the job now (it holds a slot / spent a token). Else seconds to wait."""
        conc = task.concurrency or 0
        rate = task.rate_limit
        if not conc and rate is None:
            return None
        name = task.name
        if conc:
            await self._supersede_release(name, job_id)
        keys = GlobalKeys(self.rt.config.redis.prefix)
        rechecks = min(max(RECHECKS_PER_SLOT_S * conc, RECHECKS_S[0]), RECHECKS_S[1])
        args = [job_id, conc, self.lease_ms(), rate.count if rate else 0,
                round(rate.per_s * 1000) if rate else 0, rechecks, random.random(),
                round(CONCURRENCY_WAIT_S[0] * 1000), round(CONCURRENCY_WAIT_S[1] * 1000),
                round(CONCURRENCY_MAX_WAIT_S * 1000), round(WAITING_GRACE_S * 1000)]
        try:
            async with self._calls:
                ok, reason, wait_ms = await ACQUIRE(
                    self.rt.redis,
                    [keys.task_running(name), keys.task_bucket(name), keys.task_waiting(name)],
                    args)
        except asyncio.CancelledError:
            if conc:  # the script may have run: do not leave the slot to its lease
                self._queue_release(name, job_id)
            raise
        except Exception as e:
            if not is_redis_error(e):
                raise
            if conc:
                self._queue_release(name, job_id)
            now = time.monotonic()
            if now - self._warned >= WARN_EVERY_S:  # one line per outage, not per job
                self._warned = now
                log.warning("cannot check the limits of task %s (%s: %s); its jobs are "
                            "deferred until Redis answers", name, type(e).__name__, e)
            self._count(name, "redis_error")
            return REDIS_ERROR_WAIT_S * random.uniform(1.0, 1.5)
        if int(ok) == 1:
            if conc:
                self.held.setdefault(name, set()).add(job_id)
            return None
        self._count(name, "rate_limit" if int(reason) == _NO_TOKEN else "concurrency")
        return max(0.001, int(wait_ms) / 1000.0)

    async def _supersede_release(self, name: str, job_id: str) -> None:
        """The job runs again here before its last release was sent: keep the slot."""
        pending = self._pending.get(name)
        if pending is not None and job_id in pending:
            pending.discard(job_id)
            if not pending:
                del self._pending[name]
        inflight = self._inflight.get(name)
        if inflight is not None and job_id in inflight:
            await self._inflight_done.wait()  # let the ZREM land before we take it again

    def _count(self, task: str, reason: str) -> None:
        c = self._counters.get((task, reason))
        if c is None:
            c = self._counters[(task, reason)] = self.deferred.labels(task, reason)
        c.inc()

    # ------------------------------------------------------------ release

    def release(self, task: TaskConfig | str, job_id: str) -> None:
        """The job finished (any outcome) or was handed back: free its slot.

        Never blocks: releases are sent in the background, batched per round trip.
        A no-op for a job that holds no slot (no concurrency limit, or deferred).
        """
        name = task if isinstance(task, str) else task.name
        ids = self.held.get(name)
        if ids is None or job_id not in ids:
            return
        ids.discard(job_id)
        if not ids:
            del self.held[name]
        self._queue_release(name, job_id)

    def _queue_release(self, name: str, job_id: str) -> None:
        self._pending.setdefault(name, set()).add(job_id)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(
                self._flush_loop(), name="jobqd-limit-release")

    async def _flush_loop(self) -> None:
        backoff = Backoff()
        tries = 0
        while self._pending:
            delay = 0.0
            async with self._io:
                batch, self._pending = self._pending, {}
                self._inflight = batch
                self._inflight_done = done = asyncio.Event()
                keys = GlobalKeys(self.rt.config.redis.prefix)
                try:
                    async with self.rt.redis.pipeline(transaction=False) as p:
                        for name, ids in batch.items():
                            p.zrem(keys.task_running(name), *ids)
                        await p.execute()
                    tries = 0
                    backoff.reset()
                except Exception as e:  # never let a release failure escape the task
                    tries += 1
                    n = sum(len(ids) for ids in batch.values())
                    if tries < RELEASE_TRIES and is_redis_error(e):
                        for name, ids in batch.items():
                            again = ids - self.held.get(name, set())
                            if again:
                                self._pending.setdefault(name, set()).update(again)
                        delay = backoff.next()
                        log.warning("releasing %d limit slots failed (%s: %s); retrying in "
                                    "%.1fs", n, type(e).__name__, e, delay)
                    else:
                        log.error("could not release %d limit slots (%s: %s); their leases "
                                  "free them within %.1fs", n, type(e).__name__, e,
                                  self.lease_ms() / 1000)
                        tries = 0
                finally:
                    self._inflight = {}
                    done.set()
            if delay:
                await asyncio.sleep(delay)

    async def flush(self) -> None:
        """Wait until every release so far is sent (or given up on)."""
        while self._flusher is not None and not self._flusher.done():
            await asyncio.shield(self._flusher)

    async def close(self, timeout_s: float) -> None:
        """Flush releases (bounded), then stop the background sender. Call at drain."""
        try:
            await asyncio.wait_for(self.flush(), timeout_s)
        except TimeoutError:
            n = sum(len(ids) for ids in self._pending.values())
            log.error("could not release %d limit slots within %gs; their leases free them",
                      n, timeout_s)
        if self._flusher is not None and not self._flusher.done():
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)

    # ------------------------------------------------------------ leases

    async def renew(self, held: Mapping[str, Iterable[str]] | None = None) -> int:
        """Extend the leases of the slots held (default: every slot this Limiter holds).

        Call every heartbeat.interval_s. One round trip for every task. Redis errors
        are logged, not raised (the next call retries). Returns how many leases had
        expired and were taken again (the daemon stalled, or Redis lost the key).
        """
        async with self._io:
            source = self.held if held is None else held
            snap = {name: list(ids) for name, ids in source.items()}
            calls: list[tuple[str, list[str]]] = [
                (name, ids[i:i + RENEW_CHUNK])
                for name, ids in snap.items() for i in range(0, len(ids), RENEW_CHUNK)]
            if not calls:
                return 0
            keys = GlobalKeys(self.rt.config.redis.prefix)
            lease = self.lease_ms()
            r = self.rt.redis
            try:
                replies = await scripts.pipelined(r, [
                    scripts.ScriptCall(RENEW, [keys.task_running(name)], [lease, *ids])
                    for name, ids in calls])
                for x in replies:
                    if isinstance(x, Exception):
                        raise x
            except Exception as e:
                if not is_redis_error(e):
                    raise
                log.warning("renewing limit slots failed (%s: %s)", type(e).__name__, e)
                return 0
        retaken = sum(int(x) for x in replies)
        if retaken:
            log.warning("%d limit slot leases had expired while their jobs ran (a stall, or "
                        "Redis lost the key); taken again", retaken)
        return retaken

    def snapshot(self) -> dict[str, int]:
        """Slots held through this daemon, per task."""
        return {name: len(ids) for name, ids in self.held.items()}
