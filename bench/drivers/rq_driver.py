"""RQ driver: rq.Worker, which forks a work horse per job (RQ's default).

One job at a time per worker process, so concurrency is always 1 (no
"concurrency 100" run).  Coroutine jobs are run by RQ with asyncio.run per
job.  Batch API: Queue.enqueue_many (one pipeline per batch).  Defaults
kept: after a kill -9 the job stays in the StartedJobRegistry until the
worker's heartbeat expires, then it is moved to the FailedJobRegistry; with
no Retry configured it is not run again.
See rq_simple_driver.py for SimpleWorker (no fork).
"""

from __future__ import annotations

import argparse
from typing import Any

from bench.drivers import common as c

FUNCS = {
    "noop": "bench.drivers.common.sync_noop",
    "sleep": "bench.drivers.common.fresh_loop_sleep",
    "latency": "bench.drivers.common.sync_latency",
    "hold": "bench.drivers.common.fresh_loop_hold",
}


class RqProducer(c.Producer):
    def __init__(self, url: str) -> None:
        from redis import Redis
        from rq import Queue

        self.Queue = Queue
        self.queue = Queue(c.QUEUE, connection=Redis.from_url(url))

    def one(self, workload: str, kwargs: dict[str, Any]) -> None:
        self.queue.enqueue(FUNCS[workload], **kwargs)

    def many(self, workload: str, kwargs_list: list[dict[str, Any]]) -> None:
        f = FUNCS[workload]
        self.queue.enqueue_many([self.Queue.prepare_data(f, kwargs=kw) for kw in kwargs_list])


class RqDriver(c.Driver):
    name = "rq"
    dist = "rq"
    default_concurrency = 1
    max_concurrency = 1
    batch_api = "Queue.enqueue_many"
    sleep_impl = "async def + asyncio.sleep(0.001), run by RQ via asyncio.run per job"
    notes = "rq.Worker: fork per job (default); one job at a time per worker"
    worker_class = "Worker"

    def worker(self, a: argparse.Namespace) -> None:
        import rq
        from redis import Redis

        cls = getattr(rq, self.worker_class)
        w = cls([c.QUEUE], connection=Redis.from_url(a.redis_url))
        c.announce_ready()
        w.work(logging_level="WARNING")

    def enqueue(self, a: argparse.Namespace) -> dict[str, Any]:
        prod = RqProducer(a.redis_url)
        return c.run_sync_enqueue(prod, a, True)


if __name__ == "__main__":
    c.run_main(RqDriver)
