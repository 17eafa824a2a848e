"""Regression tests for defects found in review: each fails without its fix."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aredis

from jobqd import Client, PayloadTooLarge
from jobqd.keys import GROUP, QueueKeys
from jobqd.publish import publish
from jobqd.reaper import reap_once
from jobqd.runtime import Runtime

from .conftest import wait_status


@pytest.mark.redis62
async def test_drain_hands_back_entries_a_lost_fetch_delivered(
        start_daemon: Callable[..., Any], client: Client, prefix: str,
        r: aredis.Redis) -> None:
    """F1: never DELCONSUMER a consumer that owns entries (they would be lost)."""
    queues = {"default": {"weight": 0}}  # paused: the daemon itself fetches nothing
    d = await start_daemon(consumers=1, queues=queues)
    job = await client.enqueue("noop")
    stream = QueueKeys(prefix, "default").stream
    # what a fetch whose reply was lost leaves behind: delivered to us, not held
    await r.xreadgroup(GROUP, d.daemon.rt.name, {stream: ">"}, count=10)
    assert (await r.xpending(stream, GROUP))["pending"] == 1
    assert await d.stop() == 0
    info = await client.status(job.id)
    assert info.status == "queued" and info.attempts == 0  # handed back, not lost
    await start_daemon(consumers=1)
    await wait_status(client, job.id, "succeeded")


async def test_sync_job_running_at_drain_end_is_left_to_the_reaper(
        start_daemon: Callable[..., Any], client: Client) -> None:
    """F3: a thread cannot be stopped: do not hand its job to another worker."""
    d = await start_daemon(consumers=1, shutdown={"drain_timeout_s": 0.2,
                                                  "handback_timeout_s": 1})
    job = await client.enqueue("sleep_sync", {"seconds": 2.5})
    await wait_status(client, job.id, "running")
    assert await d.stop() == 0
    info = await client.status(job.id)
    assert info.status == "running" and info.worker == d.daemon.rt.name  # still ours
    await asyncio.sleep(2.5)  # let the thread end before the next daemon starts
    await start_daemon(consumers=1)  # its reaper recovers it like a dead worker's job
    info = await wait_status(client, job.id, "succeeded")
    assert info.lost == 1


async def test_partial_enqueue_many_reports_what_was_accepted(
        start_daemon: Callable[..., Any], client: Client, prefix: str,
        r: aredis.Redis) -> None:
    """F4: one chunk's error must not hide jobs the other chunks created."""
    await start_daemon(consumers=0, max_payload_bytes=1000)
    args: list[dict[str, Any]] = [{"i": i} for i in range(1200)]
    args[700] = {"blob": "x" * 2000}  # the second chunk (500-999) is refused whole
    with pytest.raises(PayloadTooLarge) as ei:
        await client.enqueue_many("noop", args)
    assert len(ei.value.accepted) == 700  # chunks 0-499 and 1000-1199
    assert await r.xlen(QueueKeys(prefix, "default").stream) == 700


class _Alive:
    def __init__(self, names: set[str]) -> None:
        self.names = names

    async def alive(self, timeout_s: float) -> set[str]:
        return self.names

    async def beat(self, name: str, info: dict[str, object]) -> None: ...

    async def remove(self, name: str) -> None: ...

    async def workers(self) -> list[dict[str, object]]:
        return []


@pytest.mark.redis62
async def test_visibility_scan_reaches_stalled_entries_behind_1000_live_ones(
        make_rt: Callable[..., Runtime], client: Client, prefix: str, r: aredis.Redis) -> None:
    """F5: XAUTOCLAIM looks at <= 10 x COUNT entries a call; keep scanning to the end."""
    rt = make_rt(heartbeat={"interval_s": 0.1, "timeout_s": 0.2},
                 reaper={"visibility_timeout_s": 0.35})
    await publish(rt.redis, rt.config)
    stream = QueueKeys(prefix, "default").stream
    jobs = await client.enqueue_many("noop", [{}] * 1101)
    reply = await r.xreadgroup(GROUP, "live-worker", {stream: ">"}, count=2000)
    eids = [e[0] for e in reply[0][1]]
    await asyncio.sleep(0.5)  # every entry idle past the visibility timeout...
    await r.xclaim(stream, GROUP, "live-worker", 0, eids[:1100], justid=True)  # ...renewed
    counts = await reap_once(rt, _Alive({"live-worker"}))  # type: ignore[arg-type]
    assert counts["stalled"] == 1
    info = await client.status(jobs[-1].id)
    assert info.status == "queued" and info.lost == 1
    assert (await client.status(jobs[0].id)).lost == 0


@pytest.mark.redis62
async def test_reaper_spares_a_consumer_that_is_active_in_the_group(
        make_rt: Callable[..., Runtime], client: Client, prefix: str, r: aredis.Redis) -> None:
    """F2: missing from the heartbeat snapshot but active in the group: not dead."""
    rt = make_rt()
    await publish(rt.redis, rt.config)
    stream = QueueKeys(prefix, "default").stream
    await client.enqueue_many("noop", [{}] * 3)
    await r.xreadgroup(GROUP, "just-started", {stream: ">"}, count=10)
    counts = await reap_once(rt, _Alive(set()))  # type: ignore[arg-type]
    assert counts["worker_lost"] == 0
    assert (await r.xpending(stream, GROUP))["consumers"][0]["name"] == b"just-started"


async def test_timeouts_keep_working_after_a_handler_swallowed_one(
        start_daemon: Callable[..., Any], client: Client) -> None:
    """F9: a swallowed deadline must not disable deadlines for that consumer."""
    await start_daemon(consumers=1, tasks={
        "swallow": {"handler": "tests.handlers:swallow_cancel", "timeout_s": 0.2},
        "sleep": {"handler": "tests.handlers:sleep", "timeout_s": 0.2, "max_retries": 0}})
    first = await client.enqueue("swallow", {"seconds": 0.5})
    await wait_status(client, first.id, "succeeded")
    second = await client.enqueue("sleep", {"seconds": 5})
    info = await wait_status(client, second.id, "dead", timeout=3)
    assert info.reason == "timeout"


async def test_drain_is_bounded_when_a_handler_ignores_cancellation(
        start_daemon: Callable[..., Any], client: Client) -> None:
    """F7: the drain abandons a consumer that will not stop."""
    d = await start_daemon(consumers=1, shutdown={"drain_timeout_s": 0.2,
                                                  "handback_timeout_s": 0.4},
                           tasks={"swallow": {"handler": "tests.handlers:swallow_cancel"}})
    job = await client.enqueue("swallow", {"seconds": 3})
    await wait_status(client, job.id, "running")
    t0 = time.monotonic()
    assert await d.stop() == 0
    assert time.monotonic() - t0 < 2.0
    await asyncio.sleep(3)  # let the stubborn handler end inside this test's loop


async def test_unserialisable_result_is_dead_not_rerun(start_daemon: Callable[..., Any],
                                                       client: Client) -> None:
    await start_daemon(tasks={"unserialisable": {"handler": "tests.handlers:unserialisable",
                                                 "max_retries": 3}})
    job = await client.enqueue("unserialisable")
    info = await wait_status(client, job.id, "dead")
    assert info.reason == "bad_result" and info.attempts == 1  # not retried: it did its work
