"""arq driver: asyncio worker (arq.worker.Worker), max_jobs = concurrency.

Defaults kept: poll_delay 0.5 s, job_timeout 300 s, keep_result 3600 s,
in-progress key expiry = job timeout (this governs recovery after kill -9).
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


FUNCS = {"noop": noop, "sleep": sleep, "latency": latency, "hold": hold}


def _settings(url: str) -> Any:
    from arq.connections import RedisSettings

    return RedisSettings.from_dsn(url)


class ArqProducer(c.AsyncProducer):
    def __init__(self, url: str) -> None:
        self.url = url

    async def open(self) -> None:
        from arq import create_pool

        self.pool = await create_pool(_settings(self.url), default_queue_name=c.QUEUE)

    async def one(self, workload: str, kwargs: dict[str, Any]) -> None:
        await self.pool.enqueue_job(workload, **kwargs)

    async def close(self) -> None:
        await self.pool.aclose()


class ArqDriver(c.Driver):
    name = "arq"
    dist = "arq"
    default_concurrency = 10  # Worker(max_jobs=10) default
    max_concurrency = None
    batch_api = None
    notes = "no batch enqueue API; polls the queue every 0.5 s (poll_delay default)"

    def worker(self, a: argparse.Namespace) -> None:
        from arq.worker import Worker, func

        async def startup(ctx: dict[str, Any]) -> None:
            c.announce_ready()

        w = Worker(
            functions=[func(f, name=k) for k, f in FUNCS.items()],
            redis_settings=_settings(a.redis_url),
            queue_name=c.QUEUE,
            max_jobs=a.concurrency,
            on_startup=startup,
            handle_signals=True,
        )
        w.run()

    def enqueue(self, a: argparse.Namespace) -> dict[str, Any]:
        return asyncio.run(c.run_async_enqueue(ArqProducer(a.redis_url), a, False))


if __name__ == "__main__":
    c.run_main(ArqDriver)
