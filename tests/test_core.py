"""The data plane against the real Redis, one key prefix per test."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aredis

from jobqd import (
    Client,
    JobNotFound,
    PayloadTooLarge,
    QueueFull,
    SyncClient,
    UnknownQueue,
    UnknownTask,
)
from jobqd.keys import GROUP, QueueKeys

from .conftest import REDIS_URL, wait_status

# every test here drives the Lua scripts and stream commands of the data plane
pytestmark = pytest.mark.redis62


async def test_enqueue_run_succeeded(start_daemon: Callable[..., Any], client: Client,
                                     prefix: str, r: aredis.Redis) -> None:
    await start_daemon()
    job = await client.enqueue("record", {"key": f"{prefix}:runs", "value": {"x": [1, 2]}})
    assert job.created and job.queue == "default" and job.id.endswith("-default")
    info = await wait_status(client, job.id, "succeeded")
    assert info.result == {"x": [1, 2]}
    assert info.attempts == 1 and info.task == "record" and info.queue == "default"
    assert info.enqueued_at <= info.started_at <= info.finished_at
    assert await r.hget(f"{prefix}:runs", job.id) == b"1"
    qk = QueueKeys(prefix, "default")
    assert await r.xlen(qk.stream) == 0  # acked entries are deleted: length is depth
    assert await r.hlen(qk.state) == 0


async def test_status_queued_and_scheduled_without_daemon(client: Client, prefix: str,
                                                          write_config: Callable[..., Any],
                                                          start_daemon: Callable[..., Any]
                                                          ) -> None:
    d = await start_daemon(consumers=0)  # publishes routing, runs nothing
    job = await client.enqueue("noop")
    info = await client.status(job.id)
    assert info.status == "queued" and info.attempts == 0 and info.args == {}
    later = await client.enqueue("noop", delay_s=60)
    info = await client.status(later.id)
    assert info.status == "scheduled"
    assert info.scheduled_for is not None and info.scheduled_for - time.time() > 55
    with pytest.raises(JobNotFound):
        await client.status("01HZZZZZZZZZZZZZZZZZZZZZZZ-default")
    with pytest.raises(JobNotFound):
        await client.status("garbage")
    await d.stop()


async def test_running_status_names_the_worker(start_daemon: Callable[..., Any],
                                               client: Client) -> None:
    d = await start_daemon()
    job = await client.enqueue("sleep", {"seconds": 1.0})
    info = await wait_status(client, job.id, "running")
    assert info.worker == d.daemon.rt.name and info.attempts == 1


async def test_unknown_task_and_queue_refused(start_daemon: Callable[..., Any],
                                              client: Client) -> None:
    await start_daemon(consumers=0)
    with pytest.raises(UnknownTask, match="'nope'"):
        await client.enqueue("nope")
    with pytest.raises(UnknownQueue, match="'elsewhere'"):
        await client.enqueue("noop", queue="elsewhere")


async def test_unknown_task_without_any_daemon(client: Client) -> None:
    with pytest.raises(UnknownTask):
        await client.enqueue("noop")


async def test_payload_over_limit_refused(start_daemon: Callable[..., Any], client: Client,
                                          prefix: str, r: aredis.Redis) -> None:
    await start_daemon(consumers=0)
    big = "x" * (2 * 1024 * 1024)
    with pytest.raises(PayloadTooLarge, match="over max_payload_bytes=1048576"):
        await client.enqueue("noop", {"blob": big})
    assert await r.xlen(QueueKeys(prefix, "default").stream) == 0
    ok = await client.enqueue("noop", {"blob": "x" * 1000})  # the queue still works
    assert ok.created


async def test_retries_then_succeeds(start_daemon: Callable[..., Any], client: Client,
                                     prefix: str, r: aredis.Redis) -> None:
    await start_daemon()
    job = await client.enqueue("fail_times", {"key": f"{prefix}:n", "times": 2})
    info = await wait_status(client, job.id, "succeeded")
    assert info.attempts == 3 and info.result == "ok on attempt 3"
    assert await r.hget(f"{prefix}:n", job.id) == b"3"


async def test_dead_letter_after_max_retries_and_replay(start_daemon: Callable[..., Any],
                                                        client: Client, prefix: str,
                                                        r: aredis.Redis) -> None:
    await start_daemon()
    job = await client.enqueue("always_fail", {"key": f"{prefix}:n"})
    info = await wait_status(client, job.id, "dead")
    assert info.attempts == 3  # max_retries 2: three attempts in all
    assert info.reason == "max_retries" and "ValueError: boom" in (info.error or "")
    assert "Traceback" in (info.traceback or "")
    dead = await client.dlq_list()
    assert [d.ref for d in dead] == [job.id]
    row = dead[0].to_dict()
    assert row["task"] == "always_fail" and row["attempts"] == 3 and row["queue"] == "default"
    shown = await client.dlq_show(job.id)
    assert shown.death["reason"] == "max_retries"
    # replay: attempts reset, runs again (and dies again, three more attempts)
    assert await client.dlq_replay(job.id) == job.id
    # the old dead letter is gone (the job may already have died again: a new entry)
    assert dead[0].entry_id not in [d.entry_id for d in await client.dlq_list()]
    info = await wait_status(client, job.id, "dead")
    assert await r.hget(f"{prefix}:n", job.id) == b"6"
    assert await client.dlq_purge() == 1
    assert await client.dlq_list() == []
    with pytest.raises(JobNotFound):
        await client.status(job.id)


async def test_fail_goes_straight_to_dlq(start_daemon: Callable[..., Any],
                                         client: Client) -> None:
    await start_daemon()
    job = await client.enqueue("fail_now", {"reason": "invalid address"})
    info = await wait_status(client, job.id, "dead")
    assert info.attempts == 1 and info.reason == "failed" and info.error == "invalid address"


async def test_retry_with_explicit_delay(start_daemon: Callable[..., Any],
                                         client: Client) -> None:
    await start_daemon()
    job = await client.enqueue("retry_once", {"delay_s": 0.6})
    info = await wait_status(client, job.id, "scheduled")
    assert info.attempts == 1 and info.scheduled_for is not None
    t0 = time.time()
    info = await wait_status(client, job.id, "succeeded")
    assert info.result == 2
    assert info.started_at >= t0 + 0.3


async def test_unserialisable_result_is_a_failure(start_daemon: Callable[..., Any],
                                                  client: Client) -> None:
    await start_daemon()
    job = await client.enqueue("unserialisable")
    info = await wait_status(client, job.id, "dead")
    assert info.reason == "bad_result" and "not JSON-serialisable" in (info.error or "")


async def test_delayed_job_not_run_early(start_daemon: Callable[..., Any], client: Client,
                                         prefix: str, r: aredis.Redis) -> None:
    await start_daemon()
    t0 = time.time()
    job = await client.enqueue("record", {"key": f"{prefix}:runs"}, delay_s=1.0)
    await asyncio.sleep(0.8)
    assert await r.hget(f"{prefix}:runs", job.id) is None
    info = await wait_status(client, job.id, "succeeded")
    assert info.started_at >= t0 + 1.0 - 0.01  # the Redis clock decides; same host here
    assert info.started_at < t0 + 2.5


async def test_idempotency_key_same_job_runs_once(start_daemon: Callable[..., Any],
                                                  client: Client, prefix: str,
                                                  r: aredis.Redis) -> None:
    await start_daemon(consumers=0)
    results = await asyncio.gather(*[
        client.enqueue("record", {"key": f"{prefix}:runs"}, idempotency_key="order-42")
        for _ in range(20)])
    ids = {j.id for j in results}
    assert len(ids) == 1
    assert sum(j.created for j in results) == 1
    qk = QueueKeys(prefix, "default")
    assert await r.xlen(qk.stream) == 1
    # within one batch too
    jobs = await client.enqueue_many("noop", [{}, {}, {}], idempotency_keys=["a", "a", "b"])
    assert jobs[0].id == jobs[1].id != jobs[2].id
    assert [j.created for j in jobs] == [True, False, True]


async def test_idempotency_runs_once_with_daemon(start_daemon: Callable[..., Any],
                                                 client: Client, prefix: str,
                                                 r: aredis.Redis) -> None:
    await start_daemon()
    a = await client.enqueue("record", {"key": f"{prefix}:runs"}, idempotency_key="k")
    await wait_status(client, a.id, "succeeded")
    b = await client.enqueue("record", {"key": f"{prefix}:runs"}, idempotency_key="k")
    assert b.id == a.id and not b.created
    await asyncio.sleep(0.2)
    assert await r.hget(f"{prefix}:runs", a.id) == b"1"


async def test_garbage_entries_dead_lettered_and_later_jobs_run(
        start_daemon: Callable[..., Any], client: Client, prefix: str,
        r: aredis.Redis) -> None:
    await start_daemon()
    stream = QueueKeys(prefix, "default").stream
    await r.xadd(stream, {"nonsense": "1"})
    await r.xadd(stream, {"j": "{not json"})
    await r.xadd(stream, {"j": '{"id": "x", "task": "record"}'})
    await r.xadd(stream, {"j": '{"id": "01HZZZZZZZZZZZZZZZZZZZZZZZ-default", "task": "nope"}'})
    await r.xadd(stream, {"j": b"\xff\xfe"})
    good = await client.enqueue("record", {"key": f"{prefix}:runs"})
    await wait_status(client, good.id, "succeeded")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(await client.dlq_list()) < 5:
        await asyncio.sleep(0.05)
    dead = await client.dlq_list()
    reasons = sorted(d.death["reason"] for d in dead)
    assert reasons == ["malformed"] * 4 + ["unknown_task"]
    garbage = [d for d in dead if d.job is None]
    assert all(d.ref.startswith("default/") for d in garbage)
    shown = await client.dlq_show(garbage[0].ref)
    assert shown.death["reason"] == "malformed"
    replayed, skipped = await client.dlq_replay_all()
    assert (replayed, skipped) == (1, 4)  # the unknown-task job can go back; garbage cannot


async def test_sync_handler_runs_in_a_thread(start_daemon: Callable[..., Any], client: Client,
                                             prefix: str, r: aredis.Redis) -> None:
    await start_daemon()
    job = await client.enqueue("record_sync", {"key": f"{prefix}:runs", "value": 7})
    info = await wait_status(client, job.id, "succeeded")
    assert info.result == 7
    threads = await r.lrange(f"{prefix}:runs:threads", 0, -1)
    assert threads and threads[0].startswith(b"jobqd-sync")


async def test_sync_handlers_run_concurrently(start_daemon: Callable[..., Any],
                                              client: Client) -> None:
    await start_daemon(consumers=4)
    t0 = time.monotonic()
    jobs = await client.enqueue_many("sleep_sync", [{"seconds": 0.5}] * 4)
    for j in jobs:
        await wait_status(client, j.id, "succeeded")
    assert time.monotonic() - t0 < 1.8  # four in parallel, not 2 s in a row


async def test_enqueue_many_one_round_trip_per_batch(start_daemon: Callable[..., Any],
                                                     client: Client, prefix: str,
                                                     r: aredis.Redis) -> None:
    await start_daemon(consumers=0)
    jobs = await client.enqueue_many("noop", [{"i": i} for i in range(1200)])
    assert len({j.id for j in jobs}) == 1200
    assert await r.xlen(QueueKeys(prefix, "default").stream) == 1200
    assert await client.enqueue_many("noop", []) == []


async def test_backpressure_band(start_daemon: Callable[..., Any], client: Client,
                                 prefix: str) -> None:
    await start_daemon(consumers=0, queues={"default": {"weight": 1, "high_watermark": 100,
                                                        "low_watermark": 50}})
    for _ in range(100):
        await client.enqueue("noop")
    for _ in range(10):  # the 101st to 110th are refused
        with pytest.raises(QueueFull) as ei:
            await client.enqueue("noop")
    e = ei.value
    assert (e.queue, e.depth, e.high_watermark, e.low_watermark) == ("default", 100, 100, 50)
    assert e.retry_after_s > 0
    stats = {q.name: q for q in await client.queues()}
    assert stats["default"].accepting is False
    # a waiting producer gives up at its timeout
    t0 = time.monotonic()
    with pytest.raises(QueueFull):
        await client.enqueue("noop", wait=True, timeout_s=0.3)
    assert 0.25 < time.monotonic() - t0 < 1.5


async def test_backpressure_releases_at_low_watermark(start_daemon: Callable[..., Any],
                                                      client: Client, prefix: str,
                                                      r: aredis.Redis) -> None:
    d = await start_daemon(consumers=0, queues={
        "default": {"weight": 1, "high_watermark": 10, "low_watermark": 4}})
    for _ in range(10):
        await client.enqueue("noop")
    with pytest.raises(QueueFull):
        await client.enqueue("noop")
    stream = QueueKeys(prefix, "default").stream
    ids = [e[0] for e in await r.xrange(stream)]
    await r.xdel(stream, *ids[:5])  # depth 5: between the marks, still refusing
    with pytest.raises(QueueFull):
        await client.enqueue("noop")
    await r.xdel(stream, ids[5])  # depth 4 == low: accepting again
    waiter = asyncio.create_task(client.enqueue("noop", wait=True, timeout_s=5))
    assert (await waiter).created
    await d.stop()


async def test_sync_client_same_contract(start_daemon: Callable[..., Any], prefix: str) -> None:
    await start_daemon()
    def produce() -> tuple[str, Any]:
        with SyncClient(REDIS_URL, prefix) as c:
            job = c.enqueue("record", {"key": f"{prefix}:runs", "value": 1})
            many = c.enqueue_many("noop", [{}] * 3)
            assert len(many) == 3
            with pytest.raises(UnknownTask):
                c.enqueue("nope")
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                info = c.status(job.id)
                if info.status == "succeeded":
                    return job.id, info
                time.sleep(0.02)
            raise AssertionError("not done")
    _, info = await asyncio.to_thread(produce)
    assert info.result == 1


async def test_two_prefixes_never_meet(start_daemon: Callable[..., Any], client: Client,
                                       prefix: str) -> None:
    await start_daemon(consumers=0)
    async with Client(REDIS_URL, prefix + "other") as other:
        with pytest.raises(UnknownTask):  # no daemon publishes routing under that prefix
            await other.enqueue("noop")


async def test_each_of_1000_jobs_runs_exactly_once_in_process(
        start_daemon: Callable[..., Any], client: Client, prefix: str,
        r: aredis.Redis) -> None:
    await start_daemon(consumers=32)
    key = f"{prefix}:runs"
    jobs = await client.enqueue_many("record", [{"key": key}] * 1000)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and await r.hlen(key) < 1000:
        await asyncio.sleep(0.05)
    runs = await r.hgetall(key)
    assert len(runs) == 1000 and set(runs.values()) == {b"1"}
    assert {k.decode() for k in runs} == {j.id for j in jobs}


async def test_consumer_group_recreated_after_stream_loss(start_daemon: Callable[..., Any],
                                                          client: Client, prefix: str,
                                                          r: aredis.Redis) -> None:
    await start_daemon()
    stream = QueueKeys(prefix, "default").stream
    await r.delete(stream)  # as after a Redis flush: the group is gone too
    await asyncio.sleep(0.1)
    job = await client.enqueue("record", {"key": f"{prefix}:runs"})
    await wait_status(client, job.id, "succeeded", timeout=15)
    groups = await r.xinfo_groups(stream)
    assert [g["name"] for g in groups] == [GROUP.encode()]


async def test_async_timeout_is_a_failure_then_dead(start_daemon: Callable[..., Any],
                                                    client: Client) -> None:
    await start_daemon(tasks={"sleep": {"handler": "tests.handlers:sleep", "timeout_s": 0.2,
                                        "max_retries": 1,
                                        "retry_backoff": {"base_s": 0.01, "max_s": 0.02}}})
    t0 = time.monotonic()
    job = await client.enqueue("sleep", {"seconds": 5})
    info = await wait_status(client, job.id, "dead")
    assert info.reason == "timeout" and info.error == "timed out after 0.2s"
    assert info.attempts == 2
    assert time.monotonic() - t0 < 2.0  # two 0.2 s attempts, not two 5 s ones


async def test_an_idle_pool_does_not_tick_and_a_later_job_still_times_out(
        start_daemon: Callable[..., Any], client: Client) -> None:
    """With nothing running or buffered the deadline tick waits (an idle daemon does not
    wake 20 times a second); the job that starts next wakes it, so its timeout holds."""
    from .conftest import pool_parked, wait_for

    d = await start_daemon(tasks={"sleep": {"handler": "tests.handlers:sleep", "timeout_s": 0.2,
                                            "max_retries": 0}})
    pool = d.daemon.pool
    assert pool is not None

    async def parked() -> bool:
        return pool_parked(pool)

    await wait_for(parked, 5, "the deadline tick and the progress writer to wait")
    t0 = time.monotonic()
    job = await client.enqueue("sleep", {"seconds": 5})
    info = await wait_status(client, job.id, "dead")
    assert info.reason == "timeout"
    assert time.monotonic() - t0 < 2.0
    await wait_for(parked, 5, "both to wait again once idle")


async def test_timeouts_hold_for_jobs_that_start_just_as_the_pool_goes_idle(
        start_daemon: Callable[..., Any], client: Client) -> None:
    """One consumer, a short job, then after a gap of 0-100 ms one that must time out:
    the tick may be about to wait (nothing running, nothing buffered) exactly as the
    second job is handed to the consumer. Its start must wake it every time."""
    import random

    await start_daemon(consumers=1, tasks={
        "noop": {"handler": "tests.handlers:noop"},
        "sleep": {"handler": "tests.handlers:sleep", "timeout_s": 0.15, "max_retries": 0}})
    rng = random.Random(17)
    for _ in range(8):
        quick = await client.enqueue("noop", {})
        await wait_status(client, quick.id, "succeeded")
        await asyncio.sleep(rng.uniform(0.0, 0.1))
        t0 = time.monotonic()
        job = await client.enqueue("sleep", {"seconds": 5})
        info = await wait_status(client, job.id, "dead")
        assert info.reason == "timeout"
        assert time.monotonic() - t0 < 2.0


async def test_sync_timeout_stops_waiting_and_does_not_block_drain(
        start_daemon: Callable[..., Any], client: Client) -> None:
    d = await start_daemon(tasks={"sleep_sync": {"handler": "tests.handlers:sleep_sync",
                                                 "timeout_s": 0.2, "max_retries": 0}})
    job = await client.enqueue("sleep_sync", {"seconds": 3})
    info = await wait_status(client, job.id, "dead")
    assert info.reason == "timeout"
    other = await client.enqueue("noop")  # the pool is not stuck behind the thread
    await wait_status(client, other.id, "succeeded")
    t0 = time.monotonic()
    assert await d.stop() == 0
    assert time.monotonic() - t0 < 2.0  # the stuck thread does not hold the drain


async def test_handler_raising_timeout_error_is_an_ordinary_error(
        start_daemon: Callable[..., Any], client: Client) -> None:
    await start_daemon(tasks={"raise_timeout": {"handler": "tests.handlers:raise_timeout",
                                                "max_retries": 0}})
    job = await client.enqueue("raise_timeout")
    info = await wait_status(client, job.id, "dead")
    assert info.reason == "max_retries" and "TimeoutError: socket timed out" in (info.error or "")


async def test_drain_cancel_is_a_handback_not_a_timeout(start_daemon: Callable[..., Any],
                                                        client: Client, prefix: str,
                                                        r: aredis.Redis) -> None:
    d = await start_daemon(shutdown={"drain_timeout_s": 0.3, "handback_timeout_s": 2},
                           tasks={"sleep": {"handler": "tests.handlers:sleep",
                                            "timeout_s": 0.5}})
    job = await client.enqueue("sleep", {"seconds": 5})
    await wait_status(client, job.id, "running")
    assert await d.stop() == 0
    info = await client.status(job.id)
    assert info.status == "queued" and info.attempts == 0  # handed back, no attempt used


async def test_short_retry_is_not_held_back_by_the_scheduler_poll(
        start_daemon: Callable[..., Any], client: Client) -> None:
    await start_daemon()
    durations = []
    for _ in range(5):
        t0 = time.monotonic()
        job = await client.enqueue("retry_once", {"delay_s": 0.05})
        await wait_status(client, job.id, "succeeded")
        durations.append(time.monotonic() - t0)
    # the pool wakes the scheduler: ~0.05 s, not the 0.5 s poll
    assert sorted(durations)[2] < 0.3, durations


async def test_settle_carries_any_bytes_and_large_records(start_daemon: Callable[..., Any],
                                                          client: Client, prefix: str) -> None:
    """complete.lua gets each batch packed into one argument (`settle.pack_entries`):
    lengths, not separators, delimit the fields, so a result or error with NULs, quotes,
    non-ASCII text or over 64 KiB (4-byte lengths) comes back exactly, next to small
    ones settled in the same batch."""
    await start_daemon(consumers=8)
    big = "\x00|\"ü€𝄞\n" * 20_000  # 140,000 characters; the record is larger still
    values: list[Any] = [big, "", "\x00", {"k": ["\u2028", None, 1.5]}, "x" * 65_535]
    jobs = [await client.enqueue("record", {"key": f"{prefix}:runs", "value": v})
            for v in values]
    dead = await client.enqueue("fail_now", {"reason": big})
    for job, v in zip(jobs, values, strict=True):
        info = await wait_status(client, job.id, "succeeded")
        assert info.result == v
    info = await wait_status(client, dead.id, "dead")
    assert info.error is not None and info.error.startswith("\x00|\"ü€𝄞")
    (letter,) = await client.dlq_list("default")
    assert letter.job_id == dead.id and letter.job is not None
    assert letter.job["args"] == {"reason": big}  # the job's own bytes, kept whole
