"""Schedules, the parts without a loop: tick times, the plan of one turn, the
state kept in Redis, and what `jobqd schedules` and ``GET /v1/schedules`` show.

Ticks come from cronsim (5 fields, or 6 with seconds first; DST like Debian
cron) or from ``every_s`` (aligned to the Unix epoch), always on the Redis
clock. The loop that fires them is `jobqd/cron.py`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import redis.asyncio as aredis
from cronsim import CronSim

from jobqd import ops
from jobqd.config import Config, ScheduleConfig
from jobqd.errors import JobNotFound
from jobqd.keys import GlobalKeys

GRACE_MS = 2000  # a tick handled later than this after its time is "missed" (misfire policy)
MAX_FIRES = 100  # on-time ticks handled per schedule per turn (bounds one turn's work)


# ---------------------------------------------------------------- ticks (pure)


def spec_of(sc: ScheduleConfig) -> str:
    """What the ticks depend on: a change of it restarts the schedule's misfire window."""
    if sc.cron is not None:
        return f"cron:{sc.cron}@{sc.timezone}"
    return f"every:{sc.every_s:g}"


def expression(sc: ScheduleConfig) -> str:
    return sc.cron if sc.cron is not None else f"every {sc.every_s:g}s"


def _dt(sc: ScheduleConfig, ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000.0, tz=ZoneInfo(sc.timezone))


def next_tick(sc: ScheduleConfig, after_ms: int) -> int:
    """The first tick strictly after `after_ms` (ms since the epoch)."""
    if sc.every_s is not None:
        period = round(sc.every_s * 1000)
        return (after_ms // period + 1) * period
    assert sc.cron is not None
    return int(next(CronSim(sc.cron, _dt(sc, after_ms))).timestamp()) * 1000


def prev_tick(sc: ScheduleConfig, at_ms: int) -> int:
    """The last tick at or before `at_ms`."""
    if sc.every_s is not None:
        period = round(sc.every_s * 1000)
        return at_ms // period * period
    assert sc.cron is not None
    # cronsim counts the whole second of a datetime with microseconds as a candidate
    start = datetime.fromtimestamp((at_ms // 1000) + 0.5, tz=ZoneInfo(sc.timezone))
    return int(next(CronSim(sc.cron, start, reverse=True)).timestamp()) * 1000


def jitter_s(sc: ScheduleConfig, tick_ms: int) -> float:
    """A delay in [0, jitter_s) that every daemon derives alike for this tick."""
    if sc.jitter_s <= 0:
        return 0.0
    h = hashlib.blake2b(f"{sc.name}:{tick_ms}".encode(), digest_size=8).digest()
    return sc.jitter_s * int.from_bytes(h, "big") / 2.0**64


@dataclass(frozen=True, slots=True)
class State:
    """One schedule's state in Redis."""

    tick_ms: int  # the last tick handled (fired, skipped or caught up)
    spec: str  # spec_of() when it was handled
    job: str | None = None  # the last job made for this schedule (by any daemon)
    job_tick_ms: int | None = None  # the tick that job was for

    def encode(self) -> tuple[int, bytes]:
        return self.tick_ms, orjson.dumps({"spec": self.spec, "job": self.job,
                                           "job_tick": self.job_tick_ms})

    @classmethod
    def decode(cls, raw: bytes | str | None) -> State | None:
        if raw is None:
            return None
        text = raw.decode() if isinstance(raw, bytes) else raw
        tick, _, info = text.partition(" ")
        try:
            d = orjson.loads(info)
            return cls(tick_ms=int(tick), spec=str(d.get("spec")), job=d.get("job"),
                       job_tick_ms=d.get("job_tick"))
        except (ValueError, orjson.JSONDecodeError, AttributeError):
            return None


@dataclass(frozen=True, slots=True)
class Fire:
    tick_ms: int
    key: str  # the idempotency key: the same on every daemon


@dataclass(frozen=True, slots=True)
class Plan:
    base_ms: int  # the tick handled before this turn (or the baseline of a new schedule)
    fires: list[Fire]
    through_ms: int  # every tick up to here is handled once the fires are made
    next_ms: int  # the next tick after now
    due_ms: int  # the last tick at or before now (its job should exist)


def plan(sc: ScheduleConfig, state: State | None, now_ms: int,
         grace_ms: int = GRACE_MS) -> Plan:
    """Which jobs to make now. Pure: every daemon computes the same keys."""
    edge = now_ms - grace_ms
    spec = spec_of(sc)
    if state is None or state.spec != spec:  # new or changed: no misfires before now
        base = max(edge, state.tick_ms if state is not None else edge)
    else:
        base = state.tick_ms
    fires: list[Fire] = []
    start = base
    if base < edge and next_tick(sc, base) <= edge:  # ticks were missed
        if sc.misfire == "once":
            fires.append(Fire(prev_tick(sc, edge), f"sched:{sc.name}:catchup:{base}"))
        start = edge
    t = next_tick(sc, start)
    while t <= now_ms and len(fires) < MAX_FIRES:
        fires.append(Fire(t, f"sched:{sc.name}:{t}"))
        t = next_tick(sc, t)
    through = max(base, fires[-1].tick_ms if fires else prev_tick(sc, now_ms))
    return Plan(base_ms=base, fires=fires, through_ms=through, next_ms=next_tick(sc, now_ms),
                due_ms=prev_tick(sc, now_ms))


# ---------------------------------------------------------------- Redis


async def redis_now_ms(r: aredis.Redis) -> int:
    sec, usec = await r.time()
    return int(sec) * 1000 + int(usec) // 1000


async def read_states(r: aredis.Redis, prefix: str,
                      names: list[str]) -> dict[str, State | None]:
    if not names:
        return {}
    raw = await r.hmget(GlobalKeys(prefix).schedules, names)
    return {n: State.decode(v) for n, v in zip(names, raw, strict=True)}


# ---------------------------------------------------------------- visibility


async def describe(r: aredis.Redis, cfg: Config) -> list[dict[str, Any]]:
    """Every configured schedule with its next run and its last job (CLI, HTTP)."""
    names = list(cfg.schedules)
    now = await redis_now_ms(r)
    states = await read_states(r, cfg.redis.prefix, names)
    runner = ops.AsyncRunner(r)
    out = []
    for sc in cfg.schedules.values():
        st = states.get(sc.name)
        status: str | None = None
        if st is not None and st.job:
            try:
                status = (await runner.run(ops.status(cfg.redis.prefix, st.job))).status
            except JobNotFound:
                status = "expired"  # its record outlived results.ttl_s
        out.append({
            "name": sc.name, "task": sc.task, "queue": sc.queue, "cron": sc.cron,
            "every_s": sc.every_s, "expression": expression(sc), "timezone": sc.timezone,
            "misfire": sc.misfire, "jitter_s": sc.jitter_s, "enabled": sc.enabled,
            "next_run": next_tick(sc, now) / 1000.0 if sc.enabled else None,
            "last_run": st.job_tick_ms / 1000.0 if st and st.job_tick_ms is not None else None,
            "last_job_id": st.job if st else None, "last_job_status": status,
        })
    return out
