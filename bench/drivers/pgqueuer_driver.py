"""pgqueuer driver: a PostgreSQL queue (asyncpg, FOR UPDATE SKIP LOCKED, LISTEN/NOTIFY),
measured in the processing rows only (bench/run.py: it is not a Redis queue, so its
enqueue rows would compare PostgreSQL inserts with Redis writes).

The queue lives in its own database `jobqd_bench_pgq` on the local PostgreSQL
(BENCH_PG_DSN, default postgresql://postgres@127.0.0.1:5432/test, is used to create it
once; `pgq install` equivalent on first use). The orchestrator flushes only Redis, so
every `enqueue` first clears pgqueuer's queue and log tables. Job bodies are the shared
redis-py ones, like every system's. Worker: `PgQueuer.run(batch_size=10,
max_concurrent_tasks=C)` (its defaults otherwise; C >= 20 as pgqueuer requires twice
the batch size); heartbeat_timeout 30 s (its default) decides recovery.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
from typing import Any
from urllib.parse import urlparse, urlunparse

from bench.drivers import common as c

DB = "jobqd_bench_pgq"


def _dsns() -> tuple[str, str]:
    base = os.environ.get("BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
    u = urlparse(base)
    return base, urlunparse(u._replace(path=f"/{DB}"))


async def _connect() -> Any:
    import asyncpg
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.queries import Queries

    admin_dsn, dsn = _dsns()
    try:
        conn = await asyncpg.connect(dsn)
    except asyncpg.InvalidCatalogNameError:
        admin = await asyncpg.connect(admin_dsn)
        try:
            await admin.execute(f"CREATE DATABASE {DB}")
        finally:
            await admin.close()
        conn = await asyncpg.connect(dsn)
    q = Queries(AsyncpgDriver(conn))
    if not await conn.fetchval("SELECT to_regclass('pgqueuer') IS NOT NULL"):
        await q.install()
    return conn, q


HANDLERS = {"noop": c.async_noop, "sleep": c.async_sleep, "latency": c.async_latency,
            "hold": c.async_hold}


class PgqProducer(c.AsyncProducer):
    def __init__(self, url: str) -> None:
        self.url = url

    async def open(self) -> None:
        self.conn, self.q = await _connect()
        await self.q.clear_queue()
        await self.q.clear_queue_log()

    async def one(self, workload: str, kwargs: dict[str, Any]) -> None:
        await self.q.enqueue(workload, json.dumps(kwargs).encode())

    async def many(self, workload: str, kwargs_list: list[dict[str, Any]]) -> None:
        n = len(kwargs_list)
        await self.q.enqueue([workload] * n, [json.dumps(k).encode() for k in kwargs_list],
                             [0] * n)

    async def close(self) -> None:
        await self.conn.close()


class PgqueuerDriver(c.Driver):
    name = "pgqueuer"
    dist = "pgqueuer"
    default_concurrency = 20  # the least max_concurrent_tasks its default batch_size allows
    max_concurrency = None
    batch_api = "Queries.enqueue(lists)"
    notes = ("PostgreSQL queue (local PostgreSQL, own database), processing rows only; "
             "batch_size 10, max_concurrent_tasks = concurrency")

    def worker(self, a: argparse.Namespace) -> None:
        import uvloop
        from pgqueuer import PgQueuer
        from pgqueuer.db import AsyncpgDriver

        async def run() -> None:
            conn, _ = await _connect()
            pgq = PgQueuer(AsyncpgDriver(conn))
            for name, fn in HANDLERS.items():
                def make(fn: Any) -> Any:
                    async def handler(job: Any) -> None:
                        await fn(**json.loads(job.payload or b"{}"))
                    return handler
                pgq.entrypoint(name)(make(fn))
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, pgq.shutdown.set)
            c.announce_ready()
            await pgq.run(batch_size=10, max_concurrent_tasks=max(20, a.concurrency))

        uvloop.run(run())

    def enqueue(self, a: argparse.Namespace) -> dict[str, Any]:
        import uvloop

        return uvloop.run(c.run_async_enqueue(PgqProducer(a.redis_url), a, True))


if __name__ == "__main__":
    c.run_main(PgqueuerDriver)
