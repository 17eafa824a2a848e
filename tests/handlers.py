"""Task handlers used by the tests (imported by daemons from their YAML).

Handlers that count executions write to Redis (JOBQD_TEST_REDIS_URL), under a
key the test passes in, so a test in one process can count runs in another.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import redis
import redis.asyncio as aredis

from jobqd import Fail, Retry, current_job

URL = os.environ.get("JOBQD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
_sync = redis.Redis.from_url(URL)


def _r() -> aredis.Redis:
    """A client whose connection is returned and closed after each command."""
    return aredis.Redis.from_url(URL, single_connection_client=False, max_connections=1)


async def record(key: str, value: Any = None, sleep_s: float = 0.0) -> Any:
    """Count one run of this job under hash `key` (field = job id), log its start order."""
    job = current_job()
    async with _r() as r, r.pipeline(transaction=False) as p:
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
    async with _r() as r:
        await r.hincrby(key, job.id, 1)
    if job.attempt <= times:
        raise RuntimeError(f"failing attempt {job.attempt}")
    return f"ok on attempt {job.attempt}"


async def always_fail(key: str = "") -> None:
    if key:
        async with _r() as r:
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
        async with _r() as r:
            await r.hincrby(key + ":started", current_job().id, 1)
    await asyncio.sleep(seconds)
    if key:
        async with _r() as r:
            await r.hincrby(key, current_job().id, 1)
    return seconds


def sleep_sync(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


async def crash(key: str = "") -> None:
    """Kill the whole worker process, every time (a poison job)."""
    if key:
        async with _r() as r:
            await r.hincrby(key, current_job().id, 1)
    os._exit(1)


async def unserialisable() -> object:
    return object()


async def noop() -> None:
    return None


async def raise_timeout() -> None:
    raise TimeoutError("socket timed out")


async def limit_probe(key: str, sleep_s: float = 0.0) -> None:
    """For limit tests: count runs per job under hash `key`, log each start as
    "<runs at once>|<start ms>|<end ms>" (Redis clock) to list `key:log`."""
    job = current_job()
    async with _r() as r:
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
    async with _r() as r:
        for _ in range(500):
            if await r.exists(key):
                break
            await asyncio.sleep(0.02)
    return "done"
