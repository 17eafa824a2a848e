"""Job control against the real Redis with real daemons: cancel (queued,
scheduled, running async and sync, after a lost message, finished, in bulk),
pause and resume across two daemons, expiry, waiting for results (pushed, on
10,000 jobs over a bounded number of connections), and progress."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aredis

from jobqd import Client, JobCancelled, JobFailed, SyncClient
from jobqd.keys import QueueKeys
from tests.conftest import REDIS_URL, base_config, pool_parked, wait_for, wait_status


def _tasks() -> dict[str, Any]:
    tasks = base_config("x")["tasks"]
    tasks["sync_until_cancelled"] = {"handler": "tests.handlers:sync_until_cancelled"}
    tasks["progress_then_wait"] = {"handler": "tests.handlers:progress_then_wait"}
    tasks["sleep"] = {"handler": "tests.handlers:sleep", "max_retries": 3}
    return tasks


@pytest.mark.redis62
async def test_cancel_queued_and_scheduled_jobs_never_run(start_daemon: Callable[..., Any],
                                                          client: Client, prefix: str,
                                                          r: aredis.Redis) -> None:
    d = await start_daemon(tasks=_tasks(), consumers=0)  # routes, runs nothing
    queued = await client.enqueue("record", {"key": f"{prefix}:runs"})
    later = await client.enqueue("record", {"key": f"{prefix}:runs"}, delay_s=0.5)
    assert (await client.cancel(queued.id)).to_dict() == {
        "id": queued.id, "outcome": "cancelled", "status": "queued"}
    assert (await client.cancel(later.id)).status == "scheduled"
    await d.stop()
    await start_daemon(tasks=_tasks())
    ok = await client.enqueue("record", {"key": f"{prefix}:runs"})
    await wait_status(client, ok.id, "succeeded")
    await asyncio.sleep(0.8)  # past the scheduled one's due time
    assert await r.hkeys(f"{prefix}:runs") == [ok.id.encode()]
    for j in (queued, later):
        info = await client.status(j.id)
        assert info.status == "cancelled" and info.task == "record"
    again = await client.cancel(queued.id)
    assert again.outcome == "finished" and again.status == "cancelled"


@pytest.mark.redis62
async def test_cancel_a_running_async_job_stops_it_within_a_second_and_never_retries(
        start_daemon: Callable[..., Any], client: Client, prefix: str,
        r: aredis.Redis) -> None:
    await start_daemon(tasks=_tasks())
    job = await client.enqueue("sleep", {"seconds": 30, "key": f"{prefix}:n"})
    await wait_status(client, job.id, "running")
    await wait_for(lambda: r.hexists(f"{prefix}:n:started", job.id), 5, "the handler started")
    t0 = time.monotonic()
    assert (await client.cancel(job.id)).outcome == "cancelling"
    info = await wait_status(client, job.id, "cancelled", timeout=5)
    assert time.monotonic() - t0 < 1.0
    assert info.attempts == 1
    await asyncio.sleep(0.5)
    assert await r.hget(f"{prefix}:n:started", job.id) == b"1"  # never retried
    assert (await client.status(job.id)).status == "cancelled"


async def test_cancel_a_running_sync_job_sets_its_flag(start_daemon: Callable[..., Any],
                                                       client: Client, prefix: str,
                                                       r: aredis.Redis) -> None:
    await start_daemon(tasks=_tasks())
    job = await client.enqueue("sync_until_cancelled", {"key": f"{prefix}:n"})
    await wait_for(lambda: r.hexists(f"{prefix}:n", job.id), 5, "the handler started")
    t0 = time.monotonic()
    await client.cancel(job.id)
    await wait_status(client, job.id, "cancelled", timeout=5)
    assert time.monotonic() - t0 < 1.0
    assert await r.hget(f"{prefix}:n", job.id) == b"1"


@pytest.mark.redis62
async def test_a_cancel_whose_message_was_lost_is_honoured_from_redis_state(
        start_daemon: Callable[..., Any], client: Client, prefix: str,
        r: aredis.Redis) -> None:
    """The cancel is state in Redis, not only a message: a daemon that missed the
    message (cut off when it was sent) finds it in the cancel set."""
    await start_daemon(tasks=_tasks())
    job = await client.enqueue("sleep", {"seconds": 30, "key": f"{prefix}:n"})
    await wait_for(lambda: r.hexists(f"{prefix}:n:started", job.id), 5, "the handler started")
    await r.sadd(QueueKeys(prefix, "default").cancel, job.id)  # as cancel.lua, no PUBLISH
    await wait_status(client, job.id, "cancelled", timeout=5)


async def test_cancel_in_bulk_by_queue_and_task(start_daemon: Callable[..., Any],
                                                client: Client, prefix: str) -> None:
    d = await start_daemon(tasks=_tasks(), consumers=0)
    keep = await client.enqueue("noop")
    drop = [await client.enqueue("record", {"key": f"{prefix}:n"}, delay_s=60)
            for _ in range(3)]
    drop += await client.enqueue_many("record", [{"key": f"{prefix}:n"}] * 4)
    counts = await client.cancel_many("default", task="record", scheduled_only=True)
    assert counts == {"cancelled": 3, "cancelling": 0}
    counts = await client.cancel_many("default", task="record")
    assert counts == {"cancelled": 4, "cancelling": 0}
    for j in drop:
        assert (await client.status(j.id)).status == "cancelled"
    assert (await client.status(keep.id)).status == "queued"
    await d.stop()


async def test_pause_and_resume_across_two_daemons(start_daemon: Callable[..., Any],
                                                   client: Client, prefix: str,
                                                   r: aredis.Redis) -> None:
    await start_daemon(tasks=_tasks())
    await start_daemon(tasks=_tasks())
    await client.pause("default")
    await asyncio.sleep(0.5)  # > weights.refresh_interval_s (0.2)
    jobs = await client.enqueue_many("record", [{"key": f"{prefix}:n"}] * 10)  # accepted
    await asyncio.sleep(0.6)
    assert await r.hlen(f"{prefix}:n") == 0
    [stats] = [q for q in await client.queues() if q.name == "default"]
    assert stats.paused and stats.waiting == 10
    await client.resume("default")
    for j in jobs:
        await wait_status(client, j.id, "succeeded")
    with pytest.raises(Exception, match="unknown queue"):
        await client.pause("nope")


async def test_an_expired_job_never_runs(start_daemon: Callable[..., Any], client: Client,
                                         prefix: str, r: aredis.Redis) -> None:
    d = await start_daemon(tasks=_tasks(), consumers=0)
    stale = await client.enqueue("record", {"key": f"{prefix}:n"}, expires_s=0.2)
    fresh = await client.enqueue("record", {"key": f"{prefix}:n"}, expires_s=60)
    await asyncio.sleep(0.4)
    await d.stop()
    await start_daemon(tasks=_tasks())
    info = await wait_status(client, stale.id, "dead")
    assert info.reason == "expired"
    await wait_status(client, fresh.id, "succeeded")
    assert await r.hkeys(f"{prefix}:n") == [fresh.id.encode()]
    with pytest.raises(ValueError, match="expires_s"):
        await client.enqueue("noop", expires_s=float("inf"))


@pytest.mark.redis62
async def test_wait_returns_results_and_raises_for_dead_and_cancelled(
        start_daemon: Callable[..., Any], client: Client, prefix: str) -> None:
    await start_daemon(tasks=_tasks())
    ok = await client.enqueue("record", {"key": f"{prefix}:n", "value": {"v": 1}})
    assert await client.wait(ok.id, timeout_s=10) == {"v": 1}
    assert await client.wait(ok.id, timeout_s=1) == {"v": 1}  # finished before: at once
    bad = await client.enqueue("fail_now", {"reason": "nope"})
    with pytest.raises(JobFailed) as e:
        await client.wait(bad.id, timeout_s=10)
    assert e.value.reason == "failed" and e.value.error == "nope" and e.value.attempts == 1
    slow = await client.enqueue("sleep", {"seconds": 30})
    with pytest.raises(TimeoutError):
        await client.wait(slow.id, timeout_s=0.3)
    waiter = asyncio.create_task(client.wait(slow.id, timeout_s=10))
    await asyncio.sleep(0.3)
    await client.cancel(slow.id)
    with pytest.raises(JobCancelled):
        await waiter
    with SyncClient(REDIS_URL, prefix) as sc:
        job = sc.enqueue("record", {"key": f"{prefix}:n", "value": 7})
        assert await asyncio.to_thread(sc.wait, job.id, 10) == 7


async def test_wait_on_10000_jobs_uses_a_bounded_number_of_connections(
        start_daemon: Callable[..., Any], prefix: str, r: aredis.Redis) -> None:
    await start_daemon(tasks=_tasks(), consumers=50)
    name = f"w{prefix}"
    own = aredis.Redis.from_url(REDIS_URL, client_name=name)
    async with Client(REDIS_URL, prefix, redis_client=own) as c:
        jobs = await c.enqueue_many("noop", [{}] * 10_000)
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                clients = await r.client_list()
                peak = max(peak, sum(1 for x in clients if x.get("name") == name))
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch())
        try:
            results = await asyncio.wait_for(
                asyncio.gather(*(c.wait(j.id, timeout_s=60) for j in jobs)), 90)
        finally:
            watcher.cancel()
        assert results == [None] * 10_000
        assert 1 <= peak <= 4, peak  # pub/sub + registration, not one per waiter
    await own.aclose()


@pytest.mark.parametrize("after_idle", [False, True])
async def test_progress_is_seen_by_status_and_cleared_at_the_end(
        start_daemon: Callable[..., Any], client: Client, prefix: str,
        r: aredis.Redis, after_idle: bool) -> None:
    """after_idle: the job comes once the pool went idle, when the progress writer
    waits for work instead of polling (an idle daemon does not wake for it)."""
    d = await start_daemon(tasks=_tasks())
    if after_idle:
        pool = d.daemon.pool

        async def parked() -> bool:
            return pool_parked(pool)

        await wait_for(parked, 5, "the pool to go idle")
    job = await client.enqueue("progress_then_wait", {"key": f"{prefix}:go"})

    async def reported() -> bool:
        return (await client.status(job.id)).progress is not None

    await wait_for(reported, 5, "progress")
    info = await client.status(job.id)
    assert info.status == "running" and info.progress is not None
    assert info.progress["fraction"] == 0.5 and info.progress["message"] == "half way"
    await r.set(f"{prefix}:go", 1)
    await wait_status(client, job.id, "succeeded")
    assert not await r.hexists(QueueKeys(prefix, "default").progress, job.id)


def test_a_cancel_sent_while_the_daemon_is_cut_off_is_honoured_after_it_reconnects(
        write_config: Callable[..., Any], spawn: Callable[..., Any], prefix: str,
        sync_r: Any) -> None:
    """A subprocess daemon talks to Redis through a proxy. Its connections are cut
    (blackholed: nothing gets through, nothing is closed) and new ones refused; the
    cancel is sent meanwhile, so the control message never reaches it. Once it can
    reconnect, it finds the cancel in Redis and stops the job."""
    from urllib.parse import urlsplit

    from tests.proxies import BlackholeProxy

    target = urlsplit(REDIS_URL)  # the tests' Redis (JOBQD_TEST_REDIS_URL), proxied
    proxy = BlackholeProxy(target.port or 6379)
    try:
        url = f"redis://127.0.0.1:{proxy.port}{target.path or '/0'}"
        # redis.socket_timeout_s: how soon its silent connections fail and are replaced
        d = spawn(write_config(redis={"url": url, "prefix": prefix, "socket_timeout_s": 3},
                               tasks=_tasks()))
        d.wait_ready(prefix)
        with SyncClient(REDIS_URL, prefix) as c:
            job = c.enqueue("sleep", {"seconds": 120, "key": f"{prefix}:n"})
            deadline = time.monotonic() + 10
            while not sync_r.hexists(f"{prefix}:n:started", job.id):
                assert time.monotonic() < deadline, "the handler did not start"
                time.sleep(0.05)
            proxy.gated.set()  # no new connection gets through
            proxy.blackhole()  # and the open ones go silent
            assert c.cancel(job.id).outcome == "cancelling"
            time.sleep(1.0)
            assert c.status(job.id).status == "running"  # it cannot know yet
            proxy.gated.clear()  # the network is back
            deadline = time.monotonic() + 40  # its socket timeout (3 s), then a renewal
            while c.status(job.id).status != "cancelled":
                assert time.monotonic() < deadline, c.status(job.id)
                time.sleep(0.1)
            assert sync_r.hget(f"{prefix}:n:started", job.id) == b"1"  # never ran again
        d.signal(signal.SIGTERM)
        assert d.wait(30) == 0
    finally:
        proxy.close()


async def test_the_control_loop_survives_redis_py_s_torn_down_transport_error(
        start_daemon: Callable[..., Any], client: Client, prefix: str, r: aredis.Redis,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """redis-py (through 8.1.0) lets a write on a connection torn down under it escape
    as AttributeError (redis/redis-py#4287); a Redis Cluster failover once crashed the
    pool that way, when its control loop re-subscribed. The control channel's first
    subscribe fails with that very error, raised by redis-py's own connection code:
    the pool logs it, subscribes again, and a cancel still reaches the running job."""
    from redis.asyncio.client import PubSub

    control = f"{prefix}:control"
    real_subscribe = PubSub.subscribe
    calls: list[str] = []

    async def subscribe(self: PubSub, *channels: Any, **kw: Any) -> Any:
        if control in channels or control.encode() in channels:
            calls.append("subscribe")
            if len(calls) == 1:  # a connection redis-py had torn down, as in the failover
                await aredis.Connection()._send_packed_command(  # never connected
                    [b"*2\r\n$9\r\nSUBSCRIBE\r\n$1\r\nx\r\n"])
        return await real_subscribe(self, *channels, **kw)

    monkeypatch.setattr(PubSub, "subscribe", subscribe)
    # leases renewed every 5 s: a renewal (which also reads the cancel set) cannot be
    # what finds the cancel within the second asserted below
    d = await start_daemon(tasks=_tasks(), heartbeat={"interval_s": 5, "timeout_s": 15})
    await wait_for(lambda: asyncio.sleep(0, len(calls) >= 2), 5, "a second subscribe")
    assert "control channel lost (AttributeError" in caplog.text
    job = await client.enqueue("sleep", {"seconds": 30, "key": f"{prefix}:n"})
    await wait_for(lambda: r.hexists(f"{prefix}:n:started", job.id), 5, "the handler started")
    t0 = time.monotonic()
    assert (await client.cancel(job.id)).outcome == "cancelling"
    await wait_status(client, job.id, "cancelled", timeout=5)
    assert time.monotonic() - t0 < 1.0  # pushed on the channel, not found by a renewal
    assert d.task is not None and not d.task.done()


async def test_a_wait_survives_a_killed_pubsub_connection(start_daemon: Callable[..., Any],
                                                           prefix: str,
                                                           r: aredis.Redis) -> None:
    """The waiter's pub/sub connection is killed by Redis and the job ends at once,
    while it reconnects: the notification is lost, the wait still returns."""
    await start_daemon(tasks=_tasks(), consumers=0)  # routes; runs nothing
    name = f"w{prefix}"
    own = aredis.Redis.from_url(REDIS_URL, client_name=name)
    async with Client(REDIS_URL, prefix, redis_client=own) as c:
        job = await c.enqueue("noop")
        waiter = asyncio.create_task(c.wait(job.id, timeout_s=20))

        async def subscribed() -> list[Any]:
            return [x for x in await r.client_list()
                    if x.get("name") == name and "P" in x.get("flags", "")]

        await wait_for(subscribed, 5, "the waiter's pub/sub connection")
        for conn in await subscribed():
            await r.client_kill_filter(_id=conn["id"])
        assert (await c.cancel(job.id)).outcome == "cancelled"  # published while it is gone
        with pytest.raises(JobCancelled):
            await waiter
    await own.aclose()
