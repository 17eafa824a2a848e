"""The transactional outbox and its relay, against real PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aredis

from jobqd import Client, ops, outbox
from jobqd import relay as relay_mod
from jobqd.keys import QueueKeys
from jobqd.runtime import Runtime
from tests.conftest import PG_DSN, wait_for


class Relay:
    """The relay component run in the test process (as a daemon would run it)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.stop_event = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> Relay:
        self.stop_event = asyncio.Event()
        self.task = asyncio.create_task(relay_mod.run(self.rt, self.stop_event))
        return self

    async def stop(self) -> None:
        if self.task is not None and not self.task.done():
            self.stop_event.set()
            await asyncio.wait_for(self.task, 10)


@pytest.fixture
def relay_rt(make_rt: Callable[..., Runtime], pg_schema: str) -> Callable[..., Runtime]:
    def make(**over: Any) -> Runtime:
        return make_rt(postgres={"dsn": PG_DSN, "schema": pg_schema}, **over)

    return make


@pytest.fixture
async def relay(relay_rt: Callable[..., Runtime]) -> AsyncIterator[Callable[..., Relay]]:
    started: list[Relay] = []

    def start(**over: Any) -> Relay:
        rl = Relay(relay_rt(**over)).start()
        started.append(rl)
        return rl

    yield start
    for rl in started:
        await rl.stop()



async def rows(db: asyncpg.Connection, schema: str) -> list[asyncpg.Record]:
    return list(await db.fetch(f'SELECT * FROM "{schema}".outbox ORDER BY id'))


async def commit_jobs(db: asyncpg.Connection, schema: str, prefix: str, key: str,
                      n: int) -> list[int]:
    async with db.transaction():
        return await outbox.enqueue_many(db, "record", [{"key": key, "value": i}
                                                        for i in range(n)],
                                         prefix=prefix, schema=schema)


async def test_enqueue_validates_before_writing(db: asyncpg.Connection, pg_schema: str,
                                               prefix: str) -> None:
    async with db.transaction():
        with pytest.raises(TypeError):
            await outbox.enqueue(db, "", {}, prefix=prefix, schema=pg_schema)
        with pytest.raises(TypeError):
            await outbox.enqueue(db, "record", {"x": object()}, prefix=prefix, schema=pg_schema)
        with pytest.raises(TypeError):
            await outbox.enqueue(db, "record", [1, 2], prefix=prefix,  # type: ignore[arg-type]
                                 schema=pg_schema)
        with pytest.raises(ValueError):
            await outbox.enqueue(db, "record", {"s": "a\x00b"}, prefix=prefix, schema=pg_schema)
        with pytest.raises(ValueError):
            await outbox.enqueue(db, "record", {}, delay_s=-1, prefix=prefix, schema=pg_schema)
        # the caller's transaction is still usable
        row_id = await outbox.enqueue(db, "record", {"k": 1}, prefix=prefix, schema=pg_schema)
    got = await rows(db, pg_schema)
    assert [r["id"] for r in got] == [row_id]
    assert got[0]["published_at"] is None and got[0]["task"] == "record"


async def test_rollback_makes_no_job_commit_makes_one(
        db: asyncpg.Connection, pg_schema: str, prefix: str, start_daemon: Callable[..., Any],
        relay: Callable[..., Relay], r: aredis.Redis) -> None:
    await start_daemon()
    relay()
    key = f"{prefix}:runs"
    with pytest.raises(RuntimeError):
        async with db.transaction():
            await outbox.enqueue(db, "record", {"key": key, "value": "rolled back"},
                                 prefix=prefix, schema=pg_schema)
            raise RuntimeError("business write failed")
    async with db.transaction():
        row_id = await outbox.enqueue(db, "record", {"key": key, "value": "committed"},
                                      prefix=prefix, schema=pg_schema)

    async def one_run() -> bool:
        return len(await r.hgetall(key)) == 1

    await wait_for(one_run, what="the committed job to run")
    await asyncio.sleep(0.5)  # nothing else turns up
    runs = await r.hgetall(key)
    got = await rows(db, pg_schema)
    assert len(got) == 1 and got[0]["id"] == row_id
    assert list(runs) == [got[0]["job_id"].encode()] and list(runs.values()) == [b"1"]


async def test_relay_killed_between_redis_and_update_makes_no_second_job(
        db: asyncpg.Connection, pg_schema: str, prefix: str, start_daemon: Callable[..., Any],
        relay: Callable[..., Relay], r: aredis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    await start_daemon(consumers=0)  # publishes the routing; runs nothing
    await commit_jobs(db, pg_schema, prefix, f"{prefix}:runs", 50)
    in_redis = asyncio.Event()
    real_mark = relay_mod._mark_published

    async def die_here(conn: asyncpg.Connection, published: Sequence[tuple[int, str]]) -> None:
        in_redis.set()
        await asyncio.sleep(3600)  # the relay "dies" here: cancelled below

    monkeypatch.setattr(relay_mod, "_mark_published", die_here)
    first = relay()
    await asyncio.wait_for(in_redis.wait(), 15)
    stream = QueueKeys(prefix, "default").stream
    assert await r.xlen(stream) == 50  # the jobs are in Redis...
    assert first.task is not None
    first.task.cancel()  # ...and the relay dies before recording it
    with pytest.raises(asyncio.CancelledError):
        await first.task
    got = await rows(db, pg_schema)
    assert all(x["published_at"] is None and x["job_id"] is None for x in got)

    monkeypatch.setattr(relay_mod, "_mark_published", real_mark)
    relay()  # a new relay publishes the same rows again

    async def all_published() -> bool:
        return all(x["published_at"] is not None for x in await rows(db, pg_schema))

    await wait_for(all_published, what="all rows published")
    got = await rows(db, pg_schema)
    assert await r.xlen(stream) == 50  # still one job per row
    state = {ops.s(k) for k in await r.hkeys(QueueKeys(prefix, "default").state)}
    assert {x["job_id"] for x in got} == state and len(state) == 50


async def test_fifty_jobs_relayed_and_completed_with_latency(
        db: asyncpg.Connection, pg_schema: str, prefix: str, start_daemon: Callable[..., Any],
        relay: Callable[..., Relay], r: aredis.Redis, client: Client,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay_mod, "SWEEP_S", 0.2)
    await start_daemon()
    rl = relay()
    key = f"{prefix}:runs"
    committed: dict[int, float] = {}
    for i in range(50):  # one transaction per job, like real application writes
        async with db.transaction():
            row_id = await outbox.enqueue(db, "record", {"key": key, "value": i},
                                          prefix=prefix, schema=pg_schema)
            t0 = time.time()
        committed[row_id] = t0
        await asyncio.sleep(0.01)

    async def all_ran() -> bool:
        return len(await r.hgetall(key)) == 50

    await wait_for(all_ran, what="50 jobs to run")
    assert set((await r.hgetall(key)).values()) == {b"1"}
    got = await rows(db, pg_schema)
    latencies = []
    for x in got:
        info = await client.status(x["job_id"])
        assert info.status == "succeeded"
        assert info.started_at is not None
        latencies.append(info.started_at - committed[x["id"]])
    latencies.sort()
    p50 = statistics.median(latencies)
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    print(f"\noutbox relay latency commit -> job start: p50={p50 * 1000:.1f} ms "
          f"p99={p99 * 1000:.1f} ms max={latencies[-1] * 1000:.1f} ms (n={len(latencies)})")
    assert p99 < 5.0
    assert rl.rt.metrics.enqueued.labels("default", "record")._value.get() == 50

    async def all_finished() -> bool:
        return all(x["finished_at"] is not None for x in await rows(db, pg_schema))

    await wait_for(all_finished, what="the sweep to mark rows finished")
    assert {x["final_status"] for x in await rows(db, pg_schema)} == {"succeeded"}


async def test_plain_sql_insert_is_relayed(db: asyncpg.Connection, pg_schema: str, prefix: str,
                                           start_daemon: Callable[..., Any],
                                           relay: Callable[..., Relay], r: aredis.Redis) -> None:
    await start_daemon()
    relay()
    key = f"{prefix}:runs"
    await asyncio.sleep(0.3)  # let the relay LISTEN
    t0 = time.monotonic()
    await db.execute(f'INSERT INTO "{pg_schema}".outbox (prefix, task, args) '
                     "VALUES ($1, 'record', $2::jsonb)", prefix, f'{{"key": "{key}"}}')

    async def ran() -> bool:
        return len(await r.hgetall(key)) == 1

    await wait_for(ran, what="the inserted job to run")
    # woken by the trigger's NOTIFY, not only by the poll
    assert time.monotonic() - t0 < 5.0


async def test_bad_rows_do_not_block_the_outbox(
        db: asyncpg.Connection, pg_schema: str, prefix: str, start_daemon: Callable[..., Any],
        relay: Callable[..., Relay], r: aredis.Redis) -> None:
    await start_daemon(max_payload_bytes=2000)
    key = f"{prefix}:runs"
    async with db.transaction():
        unknown = await outbox.enqueue(db, "no_such_task", {}, prefix=prefix, schema=pg_schema)
        big = await outbox.enqueue(db, "record", {"key": key, "value": "x" * 5000},
                                   prefix=prefix, schema=pg_schema)
        good = await outbox.enqueue_many(db, "record", [{"key": key, "value": i}
                                                        for i in range(5)],
                                         prefix=prefix, schema=pg_schema)
        not_kwargs = await db.fetchval(
            f'INSERT INTO "{pg_schema}".outbox (prefix, task, args) '
            "VALUES ($1, 'record', '[1, 2]'::jsonb) RETURNING id", prefix)
    relay()

    async def good_ran() -> bool:
        return len(await r.hgetall(key)) == 5

    await wait_for(good_ran, what="the good rows to run")

    async def marked() -> bool:
        by_id = {x["id"]: x for x in await rows(db, pg_schema)}
        return (by_id[big]["failed_at"] is not None
                and by_id[not_kwargs]["failed_at"] is not None
                and by_id[unknown]["error"] is not None)

    await wait_for(marked, what="bad rows to be marked")
    by_id = {x["id"]: x for x in await rows(db, pg_schema)}
    assert "PayloadTooLarge" in by_id[big]["error"] and by_id[big]["job_id"] is None
    assert "JSON object" in by_id[not_kwargs]["error"]
    # an unknown task is not a permanent failure: it waits (a daemon may route it later)
    assert by_id[unknown]["failed_at"] is None and by_id[unknown]["published_at"] is None
    assert "unknown task" in by_id[unknown]["error"]
    assert by_id[unknown]["publish_attempts"] >= 1
    assert all(by_id[g]["published_at"] is not None for g in good)


async def test_backpressure_leaves_rows_until_the_queue_drains(
        db: asyncpg.Connection, pg_schema: str, prefix: str, start_daemon: Callable[..., Any],
        relay: Callable[..., Relay], r: aredis.Redis, client: Client) -> None:
    queues = {"default": {"weight": 1, "high_watermark": 10, "low_watermark": 2}}
    await start_daemon(consumers=0, queues=queues)
    key = f"{prefix}:runs"
    relay()
    await commit_jobs(db, pg_schema, prefix, key, 20)  # accepted: depth 0 < 10

    async def published(n: int) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            got = await rows(db, pg_schema)
            return sum(1 for x in got if x["published_at"] is not None) == n
        return check

    await wait_for(await published(20), what="first batch")
    await commit_jobs(db, pg_schema, prefix, key, 15)  # refused: depth 20 >= 10
    await asyncio.sleep(1.5)
    got = await rows(db, pg_schema)
    assert sum(1 for x in got if x["published_at"] is None) == 15
    assert all(x["failed_at"] is None and x["error"] is None for x in got)  # just waiting
    assert not (await client.queues())[0].accepting
    await start_daemon(queues=queues)  # a consumer drains the queue

    async def all_ran() -> bool:
        return len(await r.hgetall(key)) == 35

    await wait_for(all_ran, timeout=40, what="all 35 jobs to run")
    assert set((await r.hgetall(key)).values()) == {b"1"}


async def test_delay_counts_from_the_commit(db: asyncpg.Connection, pg_schema: str,
                                            prefix: str, start_daemon: Callable[..., Any],
                                            relay: Callable[..., Relay],
                                            client: Client) -> None:
    await start_daemon(consumers=0)
    async with db.transaction():
        await outbox.enqueue(db, "record", {"key": "k"}, delay_s=60, prefix=prefix,
                             schema=pg_schema)
    t_commit = time.time()
    relay()

    async def published() -> bool:
        return all(x["job_id"] for x in await rows(db, pg_schema))

    await wait_for(published, what="the row to be published")
    info = await client.status((await rows(db, pg_schema))[0]["job_id"])
    assert info.status == "scheduled" and info.scheduled_for is not None
    assert 55 < info.scheduled_for - t_commit <= 61


async def test_two_relays_share_the_work(db: asyncpg.Connection, pg_schema: str, prefix: str,
                                         start_daemon: Callable[..., Any],
                                         relay: Callable[..., Relay], r: aredis.Redis) -> None:
    await start_daemon()
    relay()
    relay()
    key = f"{prefix}:runs"
    for _ in range(4):
        await commit_jobs(db, pg_schema, prefix, key, 300)

    async def all_ran() -> bool:
        return len(await r.hgetall(key)) == 1200

    await wait_for(all_ran, timeout=60, what="1200 jobs to run")
    assert set((await r.hgetall(key)).values()) == {b"1"}

    async def all_acked() -> bool:  # the handlers ran; the last acks may still be landing
        return await r.xlen(QueueKeys(prefix, "default").stream) == 0

    await wait_for(all_acked, timeout=10, what="every entry acked")


def test_the_producer_half_imports_no_daemon_code() -> None:
    """A web app that imports `jobqd.outbox` gets no runtime, metrics or relay."""
    import subprocess
    import sys

    code = ("import sys, jobqd.outbox; "
            "bad = [m for m in sys.modules if m.startswith('prometheus_client') or m in "
            "('jobqd.runtime', 'jobqd.metrics', 'jobqd.relay', 'jobqd.pg', 'jobqd.daemon')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
