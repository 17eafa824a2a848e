"""SAQ driver: asyncio worker (saq.Worker) on a saq Redis queue.

Defaults kept: concurrency 10, job timeout 10 s, sweep every 60 s (stuck
jobs of a dead worker are re-queued by the sweep).  SAQ has no batch enqueue
API (Queue.map enqueues concurrently and then waits for results).
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from bench.drivers import common as c


async def noop(ctx: dict[str, Any]) -> None:
    await c.async_noop()


async def sleep(ctx: dict[str, Any]) -> None:
    await c.async_sleep()


async def latency(ctx: dict[str, Any], *, ts: float) -> None:
    await c.async_latency(ts)


async def hold(ctx: dict[str, Any], *, i: int, hold: float) -> None:
    await c.async_hold(i, hold)


FUNCS = [noop, sleep, latency, hold]


class SaqProducer(c.AsyncProducer):
    def __init__(self, url: str) -> None:
        self.url = url

    async def open(self) -> None:
        from saq import Queue

        self.queue = Queue.from_url(self.url, name=c.QUEUE)
        await self.queue.connect()

    async def one(self, workload: str, kwargs: dict[str, Any]) -> None:
        await self.queue.enqueue(workload, **kwargs)

    async def close(self) -> None:
        await self.queue.disconnect()


class SaqDriver(c.Driver):
    name = "saq"
    dist = "saq"
    default_concurrency = 10  # Worker(concurrency=10) default
    max_concurrency = None
    batch_api = None
    notes = "no batch enqueue API"

    def worker(self, a: argparse.Namespace) -> None:
        from saq import Queue, Worker

        async def startup(ctx: dict[str, Any]) -> None:
            c.announce_ready()

        async def run() -> None:
            queue = Queue.from_url(a.redis_url, name=c.QUEUE)
            w = Worker(queue, functions=FUNCS, concurrency=a.concurrency, startup=startup)
            try:
                await queue.connect()
                await w.start()
            finally:
                await queue.disconnect()

        asyncio.run(run())

    def enqueue(self, a: argparse.Namespace) -> dict[str, Any]:
        return asyncio.run(c.run_async_enqueue(SaqProducer(a.redis_url), a, False))


if __name__ == "__main__":
    c.run_main(SaqDriver)
