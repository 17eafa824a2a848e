"""Shared part of every benchmark driver: the CLI contract, the job bodies and
the Redis keys the orchestrator (bench/run.py) reads back.

A driver module ``bench/drivers/<system>_driver.py`` subclasses :class:`Driver`
and ends with ``if __name__ == "__main__": main(MyDriver())``.  See
bench/drivers/README.md for the contract.

This module must only import the standard library at import time; ``redis``
(redis-py, present in every peer environment and in the project venv) is
imported lazily by the job bodies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

# ---------------------------------------------------------------- constants
QUEUE = "bench"  # queue / stream / list name every driver uses
KEY_DONE = "bench:done"  # INCR once per finished job (all workloads)
KEY_LAT = "bench:lat"  # RPUSH "<ms>" per latency job: handler start - enqueue time
KEY_STARTED = "bench:started"  # INCR when a "hold" job starts
KEY_DONE_SET = "bench:done_set"  # SADD job index when a "hold" job finishes
WORKLOADS = ("noop", "sleep", "latency", "hold")
SLEEP_S = 0.001  # the I/O-bound job's sleep
ENV_URL = "BENCH_REDIS_URL"


def redis_url() -> str:
    url = os.environ.get(ENV_URL)
    if not url:
        raise RuntimeError(f"{ENV_URL} is not set (drivers set it from --redis-url)")
    return url


# ---------------------------------------------------------------- clients
_sync_clients: dict[int, Any] = {}
_sync_lock = threading.Lock()


def sync_client() -> Any:
    """A thread-safe redis-py client, one per process (safe after fork)."""
    pid = os.getpid()
    client = _sync_clients.get(pid)
    if client is None:
        with _sync_lock:
            client = _sync_clients.get(pid)
            if client is None:
                import redis

                client = redis.Redis.from_url(redis_url())
                _sync_clients[pid] = client
    return client


_async_clients: dict[tuple[int, int], Any] = {}


def async_client() -> Any:
    """A redis.asyncio client bound to the running loop (one per process+loop).

    Only for long-lived loops (a worker's loop); for a loop per job use the
    sync client.
    """
    loop = asyncio.get_running_loop()
    key = (os.getpid(), id(loop))
    client = _async_clients.get(key)
    if client is None:
        import redis.asyncio as aredis

        client = aredis.Redis.from_url(redis_url())
        _async_clients[key] = client
    return client


# ---------------------------------------------------------------- job bodies
# Every driver's handlers call exactly one of these, so the work per job is the
# same in every system: one Redis round trip (plus the sleep / hold).


def sync_noop() -> None:
    sync_client().incr(KEY_DONE)


def sync_sleep() -> None:
    """I/O-bound job for libraries without native coroutine handlers."""
    time.sleep(SLEEP_S)
    sync_client().incr(KEY_DONE)


def sync_latency(ts: float) -> None:
    ms = (time.time() - ts) * 1000.0
    pipe = sync_client().pipeline(transaction=False)
    pipe.rpush(KEY_LAT, f"{ms:.3f}")
    pipe.incr(KEY_DONE)
    pipe.execute()


def sync_hold(i: int, hold: float) -> None:
    client = sync_client()
    client.incr(KEY_STARTED)
    time.sleep(hold)
    pipe = client.pipeline(transaction=False)
    pipe.sadd(KEY_DONE_SET, i)
    pipe.incr(KEY_DONE)
    pipe.execute()


# bench/overhead.py: with BENCH_EMPTY_BODY=1 the no-op job makes no Redis call of its
# own; every EMPTY_BATCH-th job adds EMPTY_BATCH to the done counter. What is left per
# job is the queue's own work (fetch, bookkeeping, settle).
EMPTY_BODY = os.environ.get("BENCH_EMPTY_BODY") == "1"
EMPTY_BATCH = 100
_empty_done = [0]


async def async_noop() -> None:
    if EMPTY_BODY:
        _empty_done[0] += 1
        if _empty_done[0] % EMPTY_BATCH == 0:
            await async_client().incrby(KEY_DONE, EMPTY_BATCH)
        return
    await async_client().incr(KEY_DONE)


async def async_sleep() -> None:
    await asyncio.sleep(SLEEP_S)
    await async_client().incr(KEY_DONE)


async def async_latency(ts: float) -> None:
    ms = (time.time() - ts) * 1000.0
    pipe = async_client().pipeline(transaction=False)
    pipe.rpush(KEY_LAT, f"{ms:.3f}")
    pipe.incr(KEY_DONE)
    await pipe.execute()


async def async_hold(i: int, hold: float) -> None:
    client = async_client()
    await client.incr(KEY_STARTED)
    await asyncio.sleep(hold)
    pipe = client.pipeline(transaction=False)
    pipe.sadd(KEY_DONE_SET, i)
    pipe.incr(KEY_DONE)
    await pipe.execute()


# Coroutine job bodies for a library that runs each coroutine job in a fresh
# event loop (RQ: asyncio.run per job), so they use the sync client.
async def fresh_loop_sleep() -> None:
    await asyncio.sleep(SLEEP_S)
    sync_client().incr(KEY_DONE)


async def fresh_loop_hold(i: int, hold: float) -> None:
    sync_client().incr(KEY_STARTED)
    await asyncio.sleep(hold)
    pipe = sync_client().pipeline(transaction=False)
    pipe.sadd(KEY_DONE_SET, i)
    pipe.incr(KEY_DONE)
    pipe.execute()


def job_kwargs(workload: str, i: int, hold: float) -> dict[str, Any]:
    """Keyword arguments of job number ``i``; latency jobs get ``ts`` now."""
    if workload == "latency":
        return {"ts": time.time()}
    if workload == "hold":
        return {"i": i, "hold": hold}
    return {}


# ---------------------------------------------------------------- worker side
def announce_ready(**extra: Any) -> None:
    """Print the ready line; call it when the worker is about to consume."""
    emit({"event": "ready", "pid": os.getpid(), **extra})


def emit(obj: dict[str, Any]) -> None:
    """One JSON line on file descriptor 1 (bypasses stdout redirection that
    some workers, e.g. Celery's, install)."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    data = (json.dumps(obj) + "\n").encode()
    while data:
        data = data[os.write(1, data) :]


def wait_for_term() -> None:
    """Block the main thread until SIGTERM or SIGINT (for thread-based workers)."""
    ev = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        ev.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    while not ev.wait(0.5):
        pass


def quiet_logging() -> None:
    """All systems run with library log level WARNING (no per-job log lines)."""
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)


# ---------------------------------------------------------------- producer side
class Producer:
    """Synchronous producer API a driver implements for ``enqueue``."""

    def one(self, workload: str, kwargs: dict[str, Any]) -> None:
        raise NotImplementedError

    def many(self, workload: str, kwargs_list: list[dict[str, Any]]) -> None:
        """The library's batch API; only called when Driver.batch_api is set."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class AsyncProducer:
    """Asynchronous producer API (all methods are coroutines)."""

    async def open(self) -> None:
        pass

    async def one(self, workload: str, kwargs: dict[str, Any]) -> None:
        raise NotImplementedError

    async def many(self, workload: str, kwargs_list: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        pass


def _chunks(n: int, size: int) -> Iterable[range]:
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


def run_sync_enqueue(prod: Producer, a: argparse.Namespace, has_batch: bool) -> dict[str, Any]:
    deadline = time.monotonic() + a.max_seconds
    done = 0
    use_batch = a.mode == "batch" or (a.mode == "fill" and has_batch)
    t0 = time.perf_counter()
    if use_batch:
        for rng in _chunks(a.n, a.batch_size):
            prod.many(a.workload, [job_kwargs(a.workload, i, a.hold) for i in rng])
            done += len(rng)
            if time.monotonic() > deadline:
                break
    else:
        rate = a.rate
        for i in range(a.n):
            if rate:
                delay = t0 + i / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            prod.one(a.workload, job_kwargs(a.workload, i, a.hold))
            done += 1
            if time.monotonic() > deadline:
                break
    elapsed = time.perf_counter() - t0
    return _enqueue_result(a, done, elapsed, use_batch)


async def run_async_enqueue(
    prod: AsyncProducer, a: argparse.Namespace, has_batch: bool
) -> dict[str, Any]:
    await prod.open()
    try:
        deadline = time.monotonic() + a.max_seconds
        done = 0
        use_batch = a.mode == "batch" or (a.mode == "fill" and has_batch)
        t0 = time.perf_counter()
        if use_batch:
            for rng in _chunks(a.n, a.batch_size):
                await prod.many(a.workload, [job_kwargs(a.workload, i, a.hold) for i in rng])
                done += len(rng)
                if time.monotonic() > deadline:
                    break
        elif a.mode == "fill":
            # no batch API: keep FILL_CONCURRENCY single enqueues in flight
            for rng in _chunks(a.n, FILL_CONCURRENCY):
                await asyncio.gather(
                    *(prod.one(a.workload, job_kwargs(a.workload, i, a.hold)) for i in rng)
                )
                done += len(rng)
                if time.monotonic() > deadline:
                    break
        else:
            rate = a.rate
            for i in range(a.n):
                if rate:
                    delay = t0 + i / rate - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                await prod.one(a.workload, job_kwargs(a.workload, i, a.hold))
                done += 1
                if time.monotonic() > deadline:
                    break
        elapsed = time.perf_counter() - t0
    finally:
        await prod.close()
    return _enqueue_result(a, done, elapsed, use_batch)


FILL_CONCURRENCY = 50


def _enqueue_result(
    a: argparse.Namespace, done: int, elapsed: float, batch: bool
) -> dict[str, Any]:
    return {
        "event": "enqueued",
        "mode": a.mode,
        "used_batch_api": batch,
        "workload": a.workload,
        "n_requested": a.n,
        "n": done,
        "seconds": elapsed,
        "jobs_per_s": done / elapsed if elapsed > 0 else None,
        "truncated": done < a.n,
    }


# ---------------------------------------------------------------- driver base
class Driver:
    """Subclass per system.  Class attributes are reported by ``info``."""

    name: str = "?"
    dist: str = "?"  # distribution whose version is reported
    default_concurrency: int = 1
    max_concurrency: int | None = None  # None: no library cap (100 is used)
    batch_api: str | None = None  # name of the batch enqueue API, None if none
    sleep_impl: str = "await asyncio.sleep(0.001)"
    notes: str = ""

    def info(self) -> dict[str, Any]:
        try:
            from importlib.metadata import version

            ver = version(self.dist)
        except Exception:
            ver = "unknown"
        return {
            "event": "info",
            "system": self.name,
            "version": ver,
            "python": sys.version.split()[0],
            "default_concurrency": self.default_concurrency,
            "max_concurrency": self.max_concurrency,
            "batch": self.batch_api is not None,
            "batch_api": self.batch_api,
            "sleep_impl": self.sleep_impl,
            "notes": self.notes,
        }

    # worker: block until SIGTERM; call announce_ready() when consuming.
    def worker(self, a: argparse.Namespace) -> None:
        raise NotImplementedError

    # enqueue: return the dict from run_sync_enqueue / run_async_enqueue.
    def enqueue(self, a: argparse.Namespace) -> dict[str, Any]:
        raise NotImplementedError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="benchmark driver (see bench/drivers/README.md)")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="print a JSON line describing the system")
    w = sub.add_parser("worker", help="run one worker process until SIGTERM")
    w.add_argument("--redis-url", default=os.environ.get(ENV_URL))
    w.add_argument("--concurrency", type=int, required=True)
    w.add_argument("--workload", choices=WORKLOADS, required=True)
    e = sub.add_parser("enqueue", help="enqueue N jobs, print a JSON line with timings")
    e.add_argument("--redis-url", default=os.environ.get(ENV_URL))
    e.add_argument("--mode", choices=("single", "batch", "fill"), required=True)
    e.add_argument("--n", type=int, required=True)
    e.add_argument("--workload", choices=WORKLOADS, required=True)
    e.add_argument("--rate", type=float, default=0.0, help="jobs/s pacing (single mode)")
    e.add_argument("--hold", type=float, default=2.0, help="seconds a 'hold' job runs")
    e.add_argument("--batch-size", type=int, default=1000)
    e.add_argument("--max-seconds", type=float, default=600.0, help="stop enqueueing after this")
    return p


def main(driver: Driver, argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.cmd == "info":
        emit(driver.info())
        return 0
    if not a.redis_url:
        print("--redis-url (or BENCH_REDIS_URL) is required", file=sys.stderr)
        return 2
    os.environ[ENV_URL] = a.redis_url
    quiet_logging()
    if a.cmd == "worker":
        driver.worker(a)
        return 0
    if a.mode == "batch" and driver.batch_api is None:
        emit({"event": "enqueued", "unsupported": True, "mode": "batch"})
        return 0
    emit(driver.enqueue(a))
    return 0


def run_main(driver_factory: Callable[[], Driver]) -> None:
    sys.exit(main(driver_factory()))
