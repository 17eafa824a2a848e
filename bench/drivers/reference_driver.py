"""The reference Streams worker: the least a Python worker can do per job for this job
body, so jobqd's throughput can be read as a fraction of what the job body allows.

One asyncio process (uvloop when importable, like jobqd), redis-py with hiredis, one
consumer group on one stream. The loop is:

    XREADGROUP COUNT C  ->  run the C jobs concurrently  ->  XACK them, pipelined
                                                            with the next XREADGROUP

Each entry carries the task name and its JSON keyword arguments, so the worker
decodes and dispatches like any queue worker does, then runs the very same job body
as every other system (`common.async_noop` etc.: one INCR through redis.asyncio).
What it leaves out on purpose: retries, leases, timeouts, status records, recovery
of a dead consumer's pending entries, metrics. It is a yardstick, not a queue:
`bench/run.py` runs only its processing phases and never counts it as a peer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from typing import Any

from bench.drivers import common as c

STREAM = "bench:ref:stream"
GROUP = "g"
FIELD_TASK = b"t"
FIELD_ARGS = b"a"

HANDLERS: dict[bytes, Any] = {
    b"noop": c.async_noop,
    b"sleep": c.async_sleep,
    b"latency": c.async_latency,
    b"hold": c.async_hold,
}


def _loads() -> Any:
    try:
        import orjson

        return orjson.loads
    except ImportError:
        return json.loads


async def _consume(url: str, concurrency: int) -> None:
    import redis.asyncio as aredis
    from redis.exceptions import ResponseError

    loads = _loads()
    r = aredis.Redis.from_url(url)  # fetch + ack; the job bodies use common's client
    try:
        await r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    except ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def run_one(fields: dict[bytes, bytes]) -> None:
        await HANDLERS[fields[FIELD_TASK]](**loads(fields[FIELD_ARGS]))

    c.announce_ready()
    acks: list[bytes] = []
    streams = {STREAM: ">"}
    while not stop.is_set():
        if acks:
            pipe = r.pipeline(transaction=False)
            pipe.xack(STREAM, GROUP, *acks)
            pipe.xreadgroup(GROUP, "c1", streams, count=concurrency, block=500)
            _, resp = await pipe.execute()
        else:
            resp = await r.xreadgroup(GROUP, "c1", streams, count=concurrency, block=500)
        acks = []
        if not resp:
            continue
        entries = resp[0][1]
        await asyncio.gather(*(run_one(fields) for _id, fields in entries))
        acks = [eid for eid, _ in entries]
    if acks:
        await r.xack(STREAM, GROUP, *acks)
    await r.aclose()


class RefProducer(c.AsyncProducer):
    def __init__(self, url: str) -> None:
        self.url = url

    async def open(self) -> None:
        import redis.asyncio as aredis

        self.r = aredis.Redis.from_url(self.url)

    async def one(self, workload: str, kwargs: dict[str, Any]) -> None:
        await self.r.xadd(STREAM, {FIELD_TASK: workload, FIELD_ARGS: json.dumps(kwargs)})

    async def many(self, workload: str, kwargs_list: list[dict[str, Any]]) -> None:
        pipe = self.r.pipeline(transaction=False)
        for kw in kwargs_list:
            pipe.xadd(STREAM, {FIELD_TASK: workload, FIELD_ARGS: json.dumps(kw)})
        await pipe.execute()

    async def close(self) -> None:
        await self.r.aclose()


def _run(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


class ReferenceDriver(c.Driver):
    name = "reference"
    dist = "redis"  # the version reported is redis-py's
    default_concurrency = 16  # jobqd's default `consumers`, so the ratios compare like with like
    max_concurrency = None
    batch_api = "pipelined XADD"
    notes = (
        "yardstick, not a queue: XREADGROUP COUNT C, the C jobs concurrently, XACK "
        "pipelined with the next XREADGROUP; no retries/leases/status/recovery"
    )

    def worker(self, a: argparse.Namespace) -> None:
        _run(_consume(a.redis_url, a.concurrency))

    def enqueue(self, a: argparse.Namespace) -> dict[str, Any]:
        return _run(c.run_async_enqueue(RefProducer(a.redis_url), a, True))


if __name__ == "__main__":
    c.run_main(ReferenceDriver)
