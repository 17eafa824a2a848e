"""taskiq driver: taskiq receiver (taskiq.api.run_receiver_task, what the
`taskiq worker` process runs) with taskiq_redis.RedisStreamBroker, the broker
taskiq-redis's README shows first (Redis streams, with acknowledgements).

Default concurrency: max_async_tasks=100 (taskiq's default), so the default
and the 100 runs are the same setting.  Defaults kept: xread_count 100,
idle_timeout 600 s before unacknowledged messages of a dead consumer are
re-claimed.  No batch enqueue API.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

from bench.drivers import common as c

_TASKS: dict[str, Any] = {}


def _setup(url: str) -> Any:
    from taskiq_redis import RedisStreamBroker

    broker = RedisStreamBroker(url=url, queue_name=c.QUEUE)

    @broker.task(task_name="noop")
    async def noop() -> None:
        await c.async_noop()

    @broker.task(task_name="sleep")
    async def sleep() -> None:
        await c.async_sleep()

    @broker.task(task_name="latency")
    async def latency(ts: float) -> None:
        await c.async_latency(ts)

    @broker.task(task_name="hold")
    async def hold(i: int, hold: float) -> None:
        await c.async_hold(i, hold)

    _TASKS.update(noop=noop, sleep=sleep, latency=latency, hold=hold)
    return broker


class TaskiqProducer(c.AsyncProducer):
    def __init__(self, url: str) -> None:
        self.url = url

    async def open(self) -> None:
        self.broker = _setup(self.url)
        await self.broker.startup()

    async def one(self, workload: str, kwargs: dict[str, Any]) -> None:
        await _TASKS[workload].kiq(**kwargs)

    async def close(self) -> None:
        await self.broker.shutdown()


class TaskiqDriver(c.Driver):
    name = "taskiq"
    dist = "taskiq"
    default_concurrency = 100  # max_async_tasks default
    max_concurrency = None
    batch_api = None
    notes = "RedisStreamBroker; max_async_tasks = concurrency; no batch enqueue API"

    def worker(self, a: argparse.Namespace) -> None:
        from taskiq.api import run_receiver_task

        async def run() -> None:
            broker = _setup(a.redis_url)
            broker.is_worker_process = True
            await broker.startup()
            task = asyncio.ensure_future(run_receiver_task(broker, max_async_tasks=a.concurrency))
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, task.cancel)
            c.announce_ready()
            try:
                await task
            except asyncio.CancelledError:
                pass
            finally:
                await broker.shutdown()

        asyncio.run(run())

    def enqueue(self, a: argparse.Namespace) -> dict[str, Any]:
        return asyncio.run(c.run_async_enqueue(TaskiqProducer(a.redis_url), a, False))


if __name__ == "__main__":
    c.run_main(TaskiqDriver)
