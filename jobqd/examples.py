"""Example task handlers, shipped so a new user sees jobs flow (etc/jobqd.yaml)."""

from __future__ import annotations

import asyncio
import hashlib
import random
import time

from jobqd.errors import Fail, Retry
from jobqd.jobs import current_job


async def hello(name: str = "world") -> str:
    """An async handler: runs on the daemon's event loop."""
    await asyncio.sleep(0.01)
    return f"hello, {name} (job {current_job().id}, attempt {current_job().attempt})"


def checksum(text: str, rounds: int = 1000) -> str:
    """A plain def handler: runs in a thread, so it may block."""
    digest = text.encode()
    for _ in range(rounds):
        digest = hashlib.sha256(digest).digest()
    return digest.hex()


async def flaky(fail_rate: float = 0.5) -> str:
    """Fails at random: watch it retry with backoff, and sometimes land in the DLQ."""
    if random.random() < fail_rate:
        raise RuntimeError("flaky failed this time")
    return "ok"


async def always_fails(reason: str = "this task always fails") -> None:
    """Goes straight to the dead-letter queue."""
    raise Fail(reason)


async def retry_later(delay_s: float = 1.0) -> str:
    """Asks for one retry at a fixed delay, then succeeds."""
    if current_job().attempt == 1:
        raise Retry(delay_s=delay_s)
    return "done on attempt 2"


def sleep_sync(seconds: float = 0.1) -> float:
    """Blocks a thread for a while."""
    time.sleep(seconds)
    return seconds


async def sleep(seconds: float = 0.1) -> float:
    await asyncio.sleep(seconds)
    return seconds


async def noop() -> None:
    """Does nothing (benchmarks)."""
