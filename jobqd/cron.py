"""Schedules (cron): exactly one job per tick, however many daemons run.

Every daemon evaluates every schedule; there is no leader to elect or lose.
Ticks are computed on the Redis clock (`TIME`), and each tick's job is enqueued
through the ordinary atomic enqueue with an idempotency key derived from the
schedule name and the tick time (``sched:<name>:<tick ms>``): daemons racing
for one tick make one job, and a daemon killed at the tick leaves the tick to
the others, which enqueue it too.

Per-schedule state lives in the hash ``<prefix>:sched`` (field = schedule name,
value ``"<last tick handled, ms> <info json>"``), moved only forward by
``sched_mark.lua``. After downtime, ticks older than `GRACE_MS` are missed:
``misfire: skip`` drops them, ``misfire: once`` makes one job for all of them,
keyed by the last tick handled before the gap, so racing daemons agree on it.

The loop sleeps until the next tick of any schedule (at most `MAX_SLEEP_S`)
and wakes at once when a reload swaps the config; it reads `rt.config` each
turn, so a removed schedule never fires again and a new one fires from its
next tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime

import redis.asyncio as aredis

from jobqd import ops, scripts
from jobqd.aio import run_turns
from jobqd.config import Config, ScheduleConfig
from jobqd.errors import JobqdError
from jobqd.keys import GlobalKeys
from jobqd.runtime import Runtime
from jobqd.schedules import Fire, Plan, State, jitter_s, plan, read_states, redis_now_ms, spec_of

log = logging.getLogger("jobqd.cron")

MAX_SLEEP_S = 5.0  # re-read the Redis clock at least this often
MIN_SLEEP_S = 0.005
RETRY_S = 1.0  # after a refused enqueue (queue full): try the tick again this soon
# Idempotency keys of schedule jobs live this long: a duplicate needs a daemon that read
# the state before the tick was marked and then stalled this long before its enqueue.
IDEM_TTL_MS = 3600 * 1000


async def _mark(r: aredis.Redis, prefix: str, name: str, st: State, *,
                only_new: bool = False) -> bool:
    tick, info = st.encode()
    return bool(await scripts.SCHED_MARK(r, [GlobalKeys(prefix).schedules],
                                         [name, tick, info, "1" if only_new else "0"]))


class _Refused(Exception):
    pass


class Cron:
    """The schedule loop of one daemon."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.runner = ops.AsyncRunner(rt.redis)
        self.routing: dict[str, ops.Routing] = {}
        self.exported: set[str] = set()

    async def turn(self) -> float:
        """Fire every due tick of every enabled schedule; seconds until the next tick."""
        cfg = self.rt.config
        prefix = cfg.redis.prefix
        scheds = [sc for sc in cfg.schedules.values() if sc.enabled]
        self._forget_gone({sc.name for sc in scheds})
        if not scheds:
            return MAX_SLEEP_S
        r = self.rt.redis
        now = await redis_now_ms(r)
        states = await read_states(r, prefix, [sc.name for sc in scheds])
        wait = MAX_SLEEP_S
        for sc in scheds:
            try:
                p = await self._run_one(cfg, sc, states[sc.name], now)
            except _Refused:
                wait = min(wait, RETRY_S)
                continue
            wait = min(wait, (p.next_ms - now) / 1000.0 + 0.002)
        return max(MIN_SLEEP_S, wait)

    async def _run_one(self, cfg: Config, sc: ScheduleConfig, state: State | None,
                       now: int) -> Plan:
        r = self.rt.redis
        prefix = cfg.redis.prefix
        spec = spec_of(sc)
        p = plan(sc, state, now)
        if state is None or state.spec != spec:  # baseline for a new or changed schedule
            carried = state if state is not None else State(p.base_ms, spec)
            await _mark(r, prefix, sc.name, State(p.base_ms, spec, carried.job,
                                                  carried.job_tick_ms), only_new=state is None)
        job = state.job if state is not None else None
        job_tick = state.job_tick_ms if state is not None else None
        try:
            for f in p.fires:
                job = await self._enqueue(cfg, sc, f)
                job_tick = f.tick_ms
                await _mark(r, prefix, sc.name, State(f.tick_ms, spec, job, job_tick))
            await _mark(r, prefix, sc.name, State(p.through_ms, spec, job, job_tick))
        finally:
            self._export(sc, job_tick, p.due_ms)
        return p

    async def _enqueue(self, cfg: Config, sc: ScheduleConfig, f: Fire) -> str:
        prefix = cfg.redis.prefix
        routing = self.routing.setdefault(prefix, ops.Routing(prefix))
        delay = jitter_s(sc, f.tick_ms)
        op = ops.enqueue(prefix, routing, sc.task, [dict(sc.args)], queue=sc.queue,
                         delay_s=delay or None, idempotency_keys=[f.key],
                         idem_ttl_ms=IDEM_TTL_MS, wait_replicas=cfg.redis.wait_replicas,
                         wait_timeout_ms=round(cfg.redis.wait_timeout_s * 1000))
        try:
            jobs = await self.runner.run(op)
        except JobqdError as e:  # queue full, unknown task, payload too large
            log.warning("schedule %s: the job for the tick at %s was refused (%s: %s); "
                        "trying again", sc.name, _iso(f.tick_ms), type(e).__name__, e)
            raise _Refused from e
        job = jobs[0]
        if job.created:
            self.rt.metrics.schedule_runs.labels(sc.name).inc()
            log.info("schedule %s: job %s for the tick at %s", sc.name, job.id, _iso(f.tick_ms))
        return str(job.id)

    def _export(self, sc: ScheduleConfig, job_tick: int | None, due_ms: int) -> None:
        """Both gauges in one step, so an alert comparing them never sees half a turn."""
        m = self.rt.metrics
        self.exported.add(sc.name)
        if job_tick is not None:
            m.schedule_last_run.labels(sc.name).set(job_tick / 1000.0)
        m.schedule_due.labels(sc.name).set(due_ms / 1000.0)

    def _forget_gone(self, names: set[str]) -> None:
        m = self.rt.metrics
        for gone in self.exported - names:
            for g in (m.schedule_last_run, m.schedule_due):
                with contextlib.suppress(KeyError):
                    g.remove(gone)
        self.exported &= names


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000.0, tz=UTC).isoformat().replace("+00:00", "Z")


async def run(rt: Runtime, stop: asyncio.Event, *,
              changed: asyncio.Event | None = None) -> None:
    """Fire schedules until `stop`; `changed` (set by the daemon after an applied
    reload) re-plans at once, so added, changed and removed schedules take effect at
    their next tick."""
    await run_turns(Cron(rt).turn, stop, wake=changed, what="schedules", log=log)


