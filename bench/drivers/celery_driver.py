"""Celery driver: `celery worker` (app.worker_main) with the Redis broker.

Default concurrency: the prefork pool with 2 children (= nproc here, Celery's
default).  Concurrency 100: the threads pool with 100 threads (100 prefork
children would be 100 processes).  Celery tasks are synchronous, so the
I/O-bound job is time.sleep(0.001) in the pool.  Defaults kept: no result
backend, early ack (task_acks_late=False), prefetch multiplier 4, Redis
transport visibility_timeout 3600 s.  Batch API: group(...).apply_async().
"""

from __future__ import annotations

import argparse
from typing import Any

from bench.drivers import common as c

_TASKS: dict[str, Any] = {}


def _setup(url: str) -> Any:
    from celery import Celery

    app = Celery("bench", broker=url)
    app.conf.task_default_queue = c.QUEUE
    app.conf.broker_connection_retry_on_startup = True

    @app.task(name="noop")
    def noop() -> None:
        c.sync_noop()

    @app.task(name="sleep")
    def sleep() -> None:
        c.sync_sleep()

    @app.task(name="latency")
    def latency(ts: float) -> None:
        c.sync_latency(ts)

    @app.task(name="hold")
    def hold(i: int, hold: float) -> None:
        c.sync_hold(i, hold)

    _TASKS.update(noop=noop, sleep=sleep, latency=latency, hold=hold)
    return app


class CeleryProducer(c.Producer):
    def __init__(self, url: str) -> None:
        self.app = _setup(url)

    def one(self, workload: str, kwargs: dict[str, Any]) -> None:
        _TASKS[workload].apply_async(kwargs=kwargs)

    def many(self, workload: str, kwargs_list: list[dict[str, Any]]) -> None:
        from celery import group

        t = _TASKS[workload]
        group(t.s(**kw) for kw in kwargs_list).apply_async()

    def close(self) -> None:
        self.app.close()


class CeleryDriver(c.Driver):
    name = "celery"
    dist = "celery"
    default_concurrency = 2  # prefork, concurrency = CPU count (2 here)
    max_concurrency = None
    batch_api = "group(...).apply_async()"
    sleep_impl = "time.sleep(0.001) (Celery tasks are synchronous)"
    notes = "prefork pool at default concurrency, threads pool at concurrency > default"

    def worker(self, a: argparse.Namespace) -> None:
        from celery.signals import worker_ready

        app = _setup(a.redis_url)

        @worker_ready.connect(weak=False)
        def _ready(**kw: Any) -> None:
            c.announce_ready()

        pool = "prefork" if a.concurrency <= self.default_concurrency else "threads"
        app.worker_main(
            argv=[
                "worker",
                f"--pool={pool}",
                f"--concurrency={a.concurrency}",
                f"--queues={c.QUEUE}",
                "--loglevel=WARNING",
            ]
        )

    def enqueue(self, a: argparse.Namespace) -> dict[str, Any]:
        prod = CeleryProducer(a.redis_url)
        try:
            return c.run_sync_enqueue(prod, a, True)
        finally:
            prod.close()


if __name__ == "__main__":
    c.run_main(CeleryDriver)
