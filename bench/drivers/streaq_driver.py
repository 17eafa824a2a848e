"""streaq driver: streaq.Worker (anyio on asyncio, Redis Streams through coredis).

Defaults kept: concurrency 16 (its default), prefetch = concurrency, results kept
5 min, idle_timeout 60 s (a dead worker's tasks are re-enqueued after it: what the
recovery phase measures). Batch enqueue: `Worker.enqueue_many` (one pipeline).
The job bodies use redis-py like every other system (streaq itself uses coredis).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from bench.drivers import common as c


async def noop() -> None:
    await c.async_noop()


async def sleep() -> None:
    await c.async_sleep()


async def latency(ts: float) -> None:
    await c.async_latency(ts)


async def hold(i: int, hold: float) -> None:
    await c.async_hold(i, hold)


@contextlib.asynccontextmanager
async def _announce() -> AsyncIterator[None]:
    c.announce_ready()
    yield None


def _worker(url: str, concurrency: int, ready: bool) -> tuple[Any, dict[str, Any]]:
    from streaq import Worker

    kw: dict[str, Any] = {"lifespan": _announce} if ready else {}
    w = Worker(redis_url=url, concurrency=concurrency, queue_name=c.QUEUE, **kw)
    tasks = {f.__name__: w.task(f) for f in (noop, sleep, latency, hold)}
    return w, tasks


class StreaqProducer(c.AsyncProducer):
    def __init__(self, url: str) -> None:
        self.url = url

    async def open(self) -> None:
        self.w, self.tasks = _worker(self.url, 16, False)
        await self.w.__aenter__()

    async def one(self, workload: str, kwargs: dict[str, Any]) -> None:
        await self.tasks[workload].enqueue(**kwargs)

    async def many(self, workload: str, kwargs_list: list[dict[str, Any]]) -> None:
        t = self.tasks[workload]
        await self.w.enqueue_many([t.enqueue(**kw) for kw in kwargs_list])

    async def close(self) -> None:
        await self.w.__aexit__(None, None, None)


class StreaqDriver(c.Driver):
    name = "streaq"
    dist = "streaq"
    default_concurrency = 16  # Worker(concurrency=16) default
    max_concurrency = None
    batch_api = "Worker.enqueue_many()"
    notes = "coredis client with its defaults (runtime validations on); results kept 5 min"

    def worker(self, a: argparse.Namespace) -> None:
        w, _ = _worker(a.redis_url, a.concurrency, True)
        w.run_sync()

    def enqueue(self, a: argparse.Namespace) -> dict[str, Any]:
        return asyncio.run(c.run_async_enqueue(StreaqProducer(a.redis_url), a, True))


if __name__ == "__main__":
    c.run_main(StreaqDriver)
