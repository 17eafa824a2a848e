"""Dramatiq driver: dramatiq.Worker with the Redis broker, one process,
worker_threads = concurrency (the CLI default is 8 threads per process).

The I/O-bound job is an async actor (AsyncIO middleware added, as Dramatiq
documents for async actors); each worker thread still runs one job at a time.
Defaults kept: prefetch = 2 x threads, Retries middleware, heartbeat timeout
60 s (unacked messages of a dead worker are requeued by broker maintenance,
which runs on a random 1/1000 of fetches).  No batch enqueue API.
"""

from __future__ import annotations

import argparse
from typing import Any

from bench.drivers import common as c

_ACTORS: dict[str, Any] = {}


def _setup(url: str) -> Any:
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker
    from dramatiq.middleware import AsyncIO

    broker = RedisBroker(url=url)
    broker.add_middleware(AsyncIO())
    dramatiq.set_broker(broker)

    @dramatiq.actor(actor_name="noop", queue_name=c.QUEUE)
    def noop() -> None:
        c.sync_noop()

    @dramatiq.actor(actor_name="sleep", queue_name=c.QUEUE)
    async def sleep() -> None:
        await c.async_sleep()

    @dramatiq.actor(actor_name="latency", queue_name=c.QUEUE)
    def latency(ts: float) -> None:
        c.sync_latency(ts)

    @dramatiq.actor(actor_name="hold", queue_name=c.QUEUE)
    def hold(i: int, hold: float) -> None:
        c.sync_hold(i, hold)

    _ACTORS.update(noop=noop, sleep=sleep, latency=latency, hold=hold)
    return broker


class DramatiqProducer(c.Producer):
    def __init__(self, url: str) -> None:
        self.broker = _setup(url)

    def one(self, workload: str, kwargs: dict[str, Any]) -> None:
        _ACTORS[workload].send_with_options(kwargs=kwargs)

    def close(self) -> None:
        self.broker.close()


class DramatiqDriver(c.Driver):
    name = "dramatiq"
    dist = "dramatiq"
    default_concurrency = 8  # dramatiq CLI: --threads 8 per process
    max_concurrency = None
    batch_api = None
    sleep_impl = "async actor (AsyncIO middleware), await asyncio.sleep(0.001)"
    notes = "threads = concurrency, 1 process; no batch enqueue API"

    def worker(self, a: argparse.Namespace) -> None:
        import dramatiq

        broker = _setup(a.redis_url)
        w = dramatiq.Worker(broker, worker_threads=a.concurrency, queues={c.QUEUE})
        w.start()
        c.announce_ready()
        try:
            c.wait_for_term()
        finally:
            w.stop(timeout=5000)
            broker.close()

    def enqueue(self, a: argparse.Namespace) -> dict[str, Any]:
        prod = DramatiqProducer(a.redis_url)
        try:
            return c.run_sync_enqueue(prod, a, False)
        finally:
            prod.close()


if __name__ == "__main__":
    c.run_main(DramatiqDriver)
