"""Heartbeats: who is alive, as the reaper sees it.

Each daemon beats every ``heartbeat.interval_s`` for its consumer name. A
consumer whose last beat is older than ``heartbeat.timeout_s`` is dead and
its pending jobs are reclaimed at once.

The blip rule: `alive()` returns None when the heartbeat store itself cannot
be read, and the reaper then reclaims nothing by liveness (a store outage must
never make live workers look dead); the visibility-timeout backstop, which
needs only Redis, still applies. A daemon that cannot beat keeps working.

Stores: Redis (default, ``<prefix>:hb``), or PostgreSQL when ``postgres.dsn``
is set (`jobqd.pg`). Both stamp beats with the store's own clock, so clock
skew between hosts cannot fake a death.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import orjson
import redis.asyncio as aredis

from jobqd import __version__, scripts
from jobqd.aio import sleep_or_stop
from jobqd.deps import is_outage, is_redis_error
from jobqd.keys import GlobalKeys
from jobqd.runtime import Runtime

log = logging.getLogger("jobqd.heartbeat")


class HeartbeatStore(Protocol):
    async def start(self) -> None: ...  # connect (and migrate); may not raise on a blip

    async def close(self) -> None: ...

    async def beat(self, name: str, info: dict[str, object]) -> None: ...

    async def alive(self, timeout_s: float) -> set[str] | None: ...

    async def remove(self, name: str) -> None: ...

    async def workers(self) -> list[dict[str, object]]: ...


class RedisHeartbeats:
    def __init__(self, r: aredis.Redis, prefix: str) -> None:
        self.r = r
        self.g = GlobalKeys(prefix)

    async def start(self) -> None:  # the daemon's Redis connection is already up
        return None

    async def close(self) -> None:
        return None

    async def beat(self, name: str, info: dict[str, object]) -> None:
        replies = await scripts.pipelined(self.r, [
            scripts.ScriptCall(scripts.HEARTBEAT, [self.g.heartbeats], [name]),
            scripts.Command(("HSET", self.g.workers, name, orjson.dumps(info)))])
        for x in replies:
            if isinstance(x, Exception):
                raise x

    async def alive(self, timeout_s: float) -> set[str] | None:
        try:
            r = self.r
            now_ms = await scripts.redis_time_ms(r, self.g.heartbeats)
            names = await r.zrangebyscore(self.g.heartbeats, now_ms - timeout_s * 1000, "+inf")
            # forget workers silent for a long time (keeps the hash small)
            old = await r.zrangebyscore(self.g.heartbeats, "-inf", now_ms - 3600_000)
            if old:
                async with r.pipeline(transaction=False) as p:
                    p.zrem(self.g.heartbeats, *old)
                    p.hdel(self.g.workers, *old)
                    await p.execute()
        except Exception as e:
            if not is_redis_error(e):
                raise
            return None
        return {n.decode() if isinstance(n, bytes) else str(n) for n in names}

    async def remove(self, name: str) -> None:
        async with self.r.pipeline(transaction=False) as p:
            p.zrem(self.g.heartbeats, name)
            p.hdel(self.g.workers, name)
            await p.execute()

    async def workers(self) -> list[dict[str, object]]:
        r = self.r
        now_ms = await scripts.redis_time_ms(r, self.g.heartbeats)
        beats: dict[Any, float] = dict(
            await r.zrange(self.g.heartbeats, 0, -1, withscores=True))  # type: ignore[arg-type]
        infos = await r.hgetall(self.g.workers)
        out = []
        for name, raw in infos.items():
            info = orjson.loads(raw)
            info["name"] = name.decode() if isinstance(name, bytes) else name
            last = beats.get(name)
            info["heartbeat_age_s"] = None if last is None else (now_ms - last) / 1000.0
            out.append(info)
        return out


def make_store(rt: Runtime) -> HeartbeatStore:
    if rt.config.postgres.dsn:
        from jobqd.pg import PgHeartbeats  # noqa: PLC0415 - needs asyncpg only then

        store: HeartbeatStore = PgHeartbeats(rt)
        return store
    return RedisHeartbeats(rt.redis, rt.config.redis.prefix)


def worker_info(rt: Runtime, stats: Mapping[str, int]) -> dict[str, object]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "version": __version__,
            "started": rt.started_at, "queues": list(rt.config.queues), **stats}


async def run(rt: Runtime, store: HeartbeatStore, stop: asyncio.Event, *,
              stats: Callable[[], Mapping[str, int]] = dict) -> None:
    """Beat until `stop`; then deregister (the pool has drained by then). `stats`: the
    pool's numbers (busy, capacity...), sent with each beat for `jobqd stats`."""
    failing = False
    try:
        while not stop.is_set():
            try:
                await store.beat(rt.name, worker_info(rt, stats()))
                if failing:
                    log.info("heartbeat store reachable again")
                failing = False
            except Exception as e:
                if not is_outage(e):
                    raise
                if not failing:
                    log.warning("cannot write heartbeat (%s); jobs keep running", e)
                failing = True
            await sleep_or_stop(rt.config.heartbeat.interval_s, stop)
    finally:
        try:
            await asyncio.wait_for(store.remove(rt.name), 2.0)
        except Exception as e:  # best effort: the reaper forgets silent workers anyway
            log.debug("could not deregister heartbeat: %s", e)
