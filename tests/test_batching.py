"""Batching by design (pool.py): under a backlog, fetches come in batches and the
settles ride on them, whatever the timing of round trips; at low load a settle
is still one round trip after its job."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from jobqd import Client, pool, scripts
from jobqd.keys import QueueKeys
from tests.conftest import wait_for


class _Spy:
    """Records, per pipelined round trip, how many settle calls and reads it held."""

    def __init__(self) -> None:
        self.trips: list[tuple[int, int]] = []  # (complete.lua calls, XREADGROUPs)

    def wrap(self, real: Any) -> Any:
        async def pipelined(r: Any, calls: Any) -> Any:
            settles = sum(1 for c in calls if isinstance(c, scripts.ScriptCall)
                          and c.script is scripts.COMPLETE)
            reads = sum(1 for c in calls if isinstance(c, scripts.Command)
                        and c.args[0] == "XREADGROUP")
            self.trips.append((settles, reads))
            return await real(r, calls)
        return pipelined


async def test_a_backlog_is_fetched_in_batches_with_the_settles_riding_along(
        start_daemon: Callable[..., Any], client: Client, prefix: str,
        monkeypatch: pytest.MonkeyPatch, r: Any) -> None:
    n = 1500
    await start_daemon(consumers=0)  # publish routing only
    await client.enqueue_many("noop", [{} for _ in range(n)])
    spy = _Spy()
    monkeypatch.setattr(scripts, "pipelined", spy.wrap(scripts.pipelined))
    await start_daemon(consumers=16)
    qk = QueueKeys(prefix, "default")

    async def drained() -> bool:
        return int(await r.get(qk.done) or 0) >= n

    await wait_for(drained, timeout=60)
    fetches = [t for t in spy.trips if t[1]]
    riding = sum(s for s, reads in spy.trips if reads)
    alone = sum(s for s, reads in spy.trips if not reads)
    # prefetch: 64 ahead, refilled at half: >= 8 jobs per fetch on average whatever
    # the load (the old design fetched one free slot's worth whenever one freed:
    # ~2-5 per fetch)
    assert len(fetches) <= n / 8, (len(fetches), n)
    assert riding > 0, "no settle rode on a fetch"
    assert riding + alone <= n / 4, "settles were not batched"


async def test_at_low_load_a_settle_is_not_held_back(start_daemon: Callable[..., Any],
                                                      client: Client,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # a linger far longer than the bound below: only the idle-fetcher rule can pass
    monkeypatch.setattr(pool, "ACK_LINGER_S", 30.0)
    await start_daemon(consumers=4)
    for _ in range(5):
        t0 = time.monotonic()
        job = await client.enqueue("noop")
        await client.wait(job.id, timeout_s=20)  # returns once it succeeded
        # the fetcher sits in its blocking read between jobs: the acker flushes at
        # once instead of waiting for a fetch to carry the settle
        assert time.monotonic() - t0 < 10


async def test_long_jobs_buffered_behind_busy_consumers_go_to_an_idle_daemon(
        start_daemon: Callable[..., Any], client: Client, prefix: str, r: Any) -> None:
    key = f"{prefix}:runs"
    # drain_timeout_s 0: at the end the 8-s jobs are handed back, not waited for
    await start_daemon(consumers=2, shutdown={"drain_timeout_s": 0})
    warm = [await client.enqueue("noop") for _ in range(5)]  # short runs: prefetch on
    for j in warm:
        await client.wait(j.id, timeout_s=20)
    jobs = await client.enqueue_many("sleep", [{"seconds": 8, "key": key}] * 4)
    t0 = time.monotonic()

    async def two_started() -> bool:
        return int(await r.hlen(key + ":started")) >= 2

    await wait_for(two_started, timeout=10)
    await start_daemon(consumers=2, shutdown={"drain_timeout_s": 0})  # idle: it gets
    # what the first one buffered

    async def all_started() -> bool:
        return int(await r.hlen(key + ":started")) == 4

    await wait_for(all_started, timeout=20)
    # the first daemon's two runs take 8 s; the buffered pair was handed back after
    # BUFFER_STALE_S and ran on the second daemon long before that
    assert time.monotonic() - t0 < 7.5
    for j in jobs:
        assert int(await r.hget(key + ":started", j.id) or 0) == 1  # each started once
