"""Task handlers used by the tests (imported by daemons from their YAML).

Handlers that count executions write to Redis (JOBQD_TEST_REDIS_URL), under a
key the test passes in, so a test in one process can count runs in another.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any

import redis
import redis.asyncio as aredis

from jobqd import Fail, Retry, current_job

URL = os.environ.get("JOBQD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
_sync = redis.Redis.from_url(URL)


_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop,
                                    tuple[aredis.Redis, AsyncIterator[None]]] = \
    weakref.WeakKeyDictionary()


async def _r() -> aredis.Redis:
    """This event loop's client, made on first use. One client per loop, not per call:
    building a redis-py client costs ~4 ms of CPU, which held a daemon running `record`
    to ~200 jobs/s (against ~3,600 for `noop`). The client is closed when its loop shuts
    down: an async generator holds it, and asyncio.run, uvloop.run and pytest-asyncio
    close async generators (loop.shutdown_asyncgens) before closing the loop."""
    loop = asyncio.get_running_loop()
    held = _clients.get(loop)
    if held is None:
        client = aredis.Redis.from_url(URL)
        closer = _close_at_shutdown(client)
        await anext(closer)
        held = _clients[loop] = (client, closer)
    return held[0]


async def _close_at_shutdown(client: aredis.Redis) -> AsyncIterator[None]:
    try:
        yield
    finally:
        await client.aclose()


async def record(key: str, value: Any = None, sleep_s: float = 0.0) -> Any:
    """Count one run of this job under hash `key` (field = job id), log its start order."""
    job = current_job()
    r = await _r()
    async with r.pipeline(transaction=False) as p:
        p.hincrby(key, job.id, 1)
        p.rpush(key + ":order", f"{job.queue}|{job.id}")
        await p.execute()
    if sleep_s:
        await asyncio.sleep(sleep_s)
    return value


def record_sync(key: str, value: Any = None, sleep_s: float = 0.0) -> Any:
    job = current_job()
    _sync.hincrby(key, job.id, 1)
    _sync.rpush(key + ":threads", threading.current_thread().name)
    if sleep_s:
        time.sleep(sleep_s)
    return value


async def fail_times(key: str, times: int) -> str:
    """Fail the first `times` attempts, then succeed."""
    job = current_job()
    r = await _r()
    await r.hincrby(key, job.id, 1)
    if job.attempt <= times:
        raise RuntimeError(f"failing attempt {job.attempt}")
    return f"ok on attempt {job.attempt}"


async def always_fail(key: str = "") -> None:
    if key:
        r = await _r()
        await r.hincrby(key, current_job().id, 1)
    raise ValueError("boom")


async def fail_now(reason: str = "bad input") -> None:
    raise Fail(reason)


async def retry_once(delay_s: float) -> int:
    if current_job().attempt == 1:
        raise Retry(delay_s=delay_s)
    return current_job().attempt


async def sleep(seconds: float, key: str = "") -> float:
    if key:
        r = await _r()
        await r.hincrby(key + ":started", current_job().id, 1)
    await asyncio.sleep(seconds)
    if key:
        r = await _r()
        await r.hincrby(key, current_job().id, 1)
    return seconds


def sleep_sync(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


async def crash(key: str = "") -> None:
    """Kill the whole worker process, every time (a poison job)."""
    if key:
        r = await _r()
        await r.hincrby(key, current_job().id, 1)
    os._exit(1)


async def unserialisable() -> object:
    return object()


async def noop() -> None:
    return None


async def noop_blob(b: str = "") -> None:
    """A no-op that takes a payload (to fill Redis)."""
    return None


async def raise_timeout() -> None:
    raise TimeoutError("socket timed out")


async def limit_probe(key: str, sleep_s: float = 0.0) -> None:
    """For limit tests: count runs per job under hash `key`, log each start as
    "<runs at once>|<start ms>|<end ms>" (Redis clock) to list `key:log`."""
    job = current_job()
    r = await _r()
    async with r.pipeline(transaction=True) as p:
        p.incr(key + ":cur")
        p.time()
        p.hincrby(key, job.id, 1)
        at_once, (sec, usec), _ = await p.execute()
    try:
        if sleep_s:
            await asyncio.sleep(sleep_s)
    finally:
        async with r.pipeline(transaction=True) as p:
            p.decr(key + ":cur")
            p.time()
            _, (sec2, usec2) = await p.execute()
        await r.rpush(key + ":log", f"{at_once}|{sec * 1000 + usec // 1000}|"
                                    f"{sec2 * 1000 + usec2 // 1000}")


async def swallow_cancel(seconds: float) -> str:
    """Ignores cancellation (badly written handler) for up to `seconds`, then returns."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end:
        try:
            await asyncio.sleep(end - loop.time())
        except asyncio.CancelledError:
            continue
    return "swallowed"


async def fail_any(**kwargs: Any) -> None:
    """Takes any args (however deep), always fails: its retry re-encodes the job."""
    raise ValueError("fails whatever it is given")


async def fail_fs_name() -> None:
    """An error whose text is not valid UTF-8: an ordinary Linux file name."""
    raise FileNotFoundError(2, "No such file", os.fsdecode(b"/tmp/caf\xe9-\xff.txt"))


class _BrokenStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ is broken")


async def fail_broken_str() -> None:
    raise _BrokenStr()


async def retry_bad_delay(delay: str) -> None:
    """Retry(delay_s=inf|nan|huge): `delay` is a string because JSON has no inf/nan."""
    raise Retry(delay_s=float(delay))


async def needs_a(a: int) -> int:
    return a


def sync_until_cancelled(key: str, seconds: float = 10.0) -> str:
    """A plain def that polls its cancel flag (how a long sync job honours a cancel)."""
    job = current_job()
    _sync.hincrby(key, job.id, 1)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        job.check_cancelled()
        time.sleep(0.01)
    return "ran to the end"


async def progress_then_wait(key: str) -> str:
    """Report progress, then wait until the test sets `key` (bounded)."""
    current_job().progress(0.5, "half way")
    r = await _r()
    for _ in range(500):
        if await r.exists(key):
            break
        await asyncio.sleep(0.02)
    return "done"


# -- plain defs for executor: process (they run in a worker process) -----------------


def _note_pid(key: str) -> None:
    """Record which process runs this job: hash `key:pids` (job id -> pid), one
    start more in hash `key` (job id -> runs)."""
    if key:
        job = current_job()
        with _sync.pipeline(transaction=False) as p:
            p.hset(key + ":pids", job.id, os.getpid())
            p.hincrby(key, job.id, 1)
            p.execute()


def proc_info(key: str = "") -> dict[str, Any]:
    """What current_job() says inside the worker process, and which process it is."""
    _note_pid(key)
    job = current_job()
    return {"pid": os.getpid(), "id": job.id, "task": job.task, "queue": job.queue,
            "attempt": job.attempt}


def cpu_burn(seconds: float, key: str = "") -> int:
    """Hold a CPU (no sleeping, no I/O) for `seconds`, then return the pid."""
    _note_pid(key)
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += sum(i * i for i in range(1000))
    return os.getpid()


def cpu_work(n: int = 200_000) -> int:
    """A fixed amount of pure-Python CPU work (for throughput comparisons)."""
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


def proc_exit(code: int = 1, key: str = "") -> None:
    """Kill its own worker process from inside (as a segfault would)."""
    _note_pid(key)
    os._exit(code)


def proc_wait(key: str, seconds: float = 60.0) -> int:
    """First delivery: wait (to be killed from outside); later ones return at once."""
    _note_pid(key)
    if int(_sync.hget(key, current_job().id) or 0) == 1:
        time.sleep(seconds)
    return os.getpid()


def proc_fail(reason: str = "proc boom") -> None:
    raise ValueError(reason)


def proc_fail_now(reason: str = "bad input") -> None:
    raise Fail(reason)


def proc_retry(delay_s: float) -> int:
    if current_job().attempt == 1:
        raise Retry(delay_s=delay_s)
    return current_job().attempt


def proc_unserialisable() -> object:
    return object()


_leak: list[bytearray] = []


def alloc_mb(mb: int, key: str = "") -> int:
    """Keep `mb` MiB of touched memory alive in this worker process (a leak)."""
    _note_pid(key)
    _leak.append(bytearray(b"\x01") * (mb * 1024 * 1024))
    return os.getpid()


def proc_ignore_term(key: str, seconds: float = 60.0) -> None:
    """A handler that ignores SIGTERM (only SIGKILL stops it)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _note_pid(key)
    time.sleep(seconds)


def proc_progress(key: str) -> str:
    """A process job that reports progress, then waits until the test sets `key`."""
    current_job().progress(0.25, "a quarter")
    for _ in range(500):
        if _sync.exists(key):
            break
        time.sleep(0.02)
    return "done"


async def needs_key(key: str) -> str:
    """Fails (no retries configured) until Redis key `key` exists: its input gets fixed."""
    r = await _r()
    if not await r.exists(key):
        raise LookupError(f"redis key {key} is not set")
    return "found " + key


async def fail_with(message: str) -> None:
    """Fails with the caller's text as the error (job data in an error message)."""
    raise ValueError(message)
