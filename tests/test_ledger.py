"""The PostgreSQL job ledger, against real PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from jobqd import Client, JobNotFound, ledger, outbox
from jobqd.runtime import Runtime
from tests.conftest import PG_DSN, InProcessDaemon, wait_for


@pytest.fixture
def ledger_rt(make_rt: Callable[..., Runtime], pg_schema: str) -> Callable[..., Runtime]:
    def make(**over: Any) -> Runtime:
        pgc = {"dsn": PG_DSN, "schema": pg_schema, "ledger": True, **over.pop("postgres", {})}
        return make_rt(postgres=pgc, **over)

    return make



async def test_lifecycle_is_recorded_and_status_falls_back_to_the_ledger(
        start_daemon: Callable[..., Awaitable[InProcessDaemon]], pg_schema: str, client: Client,
        db: asyncpg.Connection, prefix: str) -> None:
    d = await start_daemon(postgres={"dsn": PG_DSN, "schema": pg_schema, "ledger": True},
                           results={"ttl_s": 1})
    lg = d.daemon.rt.events  # the daemon wires the ledger itself
    assert isinstance(lg, ledger.Ledger)
    key = f"{prefix}:runs"
    ok = await client.enqueue("record", {"key": key, "value": {"answer": 42}})
    retried = await client.enqueue("fail_times", {"key": key, "times": 1})
    exhausted = await client.enqueue("always_fail", {"key": key})
    failed = await client.enqueue("fail_now", {"reason": "bad input"})
    ids = [ok.id, retried.id, exhausted.id, failed.id]

    async def all_finished() -> bool:
        n = await db.fetchval("SELECT count(*) FROM jobs WHERE id = ANY($1) "
                              "AND status IN ('succeeded', 'dead')", ids)
        return bool(n == 4)

    await wait_for(all_finished, what="the ledger to record 4 finished jobs")
    rows = {x["id"]: x for x in await db.fetch("SELECT * FROM jobs WHERE id = ANY($1)", ids)}
    assert rows[ok.id]["status"] == "succeeded" and rows[ok.id]["attempts"] == 1
    assert rows[ok.id]["task"] == "record" and rows[ok.id]["queue"] == "default"
    assert rows[ok.id]["prefix"] == prefix
    assert rows[ok.id]["error"] is None
    for col in ("enqueued_at", "started_at", "finished_at"):
        assert rows[ok.id][col] is not None
    assert (rows[ok.id]["enqueued_at"] <= rows[ok.id]["started_at"]
            <= rows[ok.id]["finished_at"])
    assert rows[retried.id]["status"] == "succeeded" and rows[retried.id]["attempts"] == 2
    assert rows[exhausted.id]["status"] == "dead"
    assert rows[exhausted.id]["reason"] == "max_retries"
    assert rows[exhausted.id]["attempts"] == 3 and "boom" in rows[exhausted.id]["error"]
    assert rows[failed.id]["status"] == "dead" and rows[failed.id]["reason"] == "failed"
    assert rows[failed.id]["error"] == "bad input"

    # once Redis forgot the finished job, the ledger still answers
    await asyncio.sleep(1.2)
    with pytest.raises(JobNotFound):
        await client.status(ok.id)
    cfg = d.cfg
    info = await ledger.lookup(cfg, ok.id)
    assert info is not None and info.status == "succeeded"
    assert info.result == {"answer": 42} and info.attempts == 1 and info.task == "record"
    assert info.started_at is not None and info.finished_at is not None
    info2 = await ledger.lookup(cfg, retried.id)
    assert info2 is not None and info2.status == "succeeded" and info2.attempts == 2
    assert await ledger.lookup(cfg, "01ARZ3NDEKTSV4RRFFQ69G5FAV-default") is None
    assert await lg.lookup(ok.id) == info  # the daemon's own pool
    assert lg.dropped == 0


async def test_running_and_scheduled_states(ledger_rt: Callable[..., Runtime],
                                            db: asyncpg.Connection) -> None:
    rt = ledger_rt()
    lg = ledger.Ledger(rt)
    jid = "01ARZ3NDEKTSV4RRFFQ69G5FAV-default"
    t = time.time() * 1000
    lg.record("started", jid, "default", "record", attempt=1, lost=0, ts_ms=t, enq_ms=t - 5)
    await lg.flush()
    assert (await ledger.lookup(db, jid)).status == "running"  # type: ignore[union-attr]
    lg.record("retried", jid, "default", "record", attempt=1, lost=0, ts_ms=t + 1,
              error="RuntimeError: x")
    await lg.flush()
    info = await ledger.lookup(db, jid)
    assert info is not None and info.status == "scheduled" and info.error == "RuntimeError: x"
    # within one batch, events apply in order
    lg.record("started", jid, "default", "record", attempt=2, lost=0, ts_ms=t + 2)
    lg.record("succeeded", jid, "default", "record", attempt=2, lost=0, ts_ms=t + 3,
              result=[1, "two"])
    await lg.flush()
    info = await ledger.lookup(db, jid)
    assert info is not None and info.status == "succeeded" and info.attempts == 2
    assert info.result == [1, "two"] and info.error is None
    assert info.enqueued_at == pytest.approx((t - 5) / 1000, abs=1e-3)
    assert info.started_at == pytest.approx((t + 2) / 1000, abs=1e-3)
    await lg.db.close()


async def test_a_late_older_event_does_not_override(ledger_rt: Callable[..., Runtime],
                                                    db: asyncpg.Connection) -> None:
    # a job retried on daemon A and finished on daemon B: B's batch lands first
    rt = ledger_rt()
    a, b = ledger.Ledger(rt), ledger.Ledger(rt)
    jid = "01ARZ3NDEKTSV4RRFFQ69G5FAW-default"
    t = time.time() * 1000
    b.record("started", jid, "default", "record", attempt=2, lost=0, ts_ms=t + 10)
    b.record("succeeded", jid, "default", "record", attempt=2, lost=0, ts_ms=t + 20, result=1)
    await b.flush()
    a.record("started", jid, "default", "record", attempt=1, lost=0, ts_ms=t, enq_ms=t - 1)
    a.record("retried", jid, "default", "record", attempt=1, lost=0, ts_ms=t + 1, error="e")
    await a.flush()
    info = await ledger.lookup(db, jid)
    assert info is not None and info.status == "succeeded" and info.attempts == 2
    assert info.result == 1
    assert info.enqueued_at is not None  # facts the late batch knew are still merged
    await a.db.close()
    await b.db.close()


async def test_buffer_is_bounded_and_drops_oldest(ledger_rt: Callable[..., Runtime],
                                                  db: asyncpg.Connection) -> None:
    rt = ledger_rt()
    lg = ledger.Ledger(rt, max_buffer=10)
    for i in range(25):
        lg.record("started", f"01ARZ3NDEKTSV4RRFFQ69G{i:04d}-default", "default", "record",
                  attempt=1, lost=0, ts_ms=time.time() * 1000)
    assert len(lg.buffer) == 10 and lg.dropped == 15
    assert lg.buffer[0].job_id.startswith("01ARZ3NDEKTSV4RRFFQ69G0015")  # oldest went
    assert b"jobqd_ledger_events_dropped_total 15.0" in rt.metrics.exposition()
    assert await lg.flush() == 10
    assert await db.fetchval("SELECT count(*) FROM jobs") == 10
    await lg.db.close()


async def test_postgres_down_buffers_without_blocking_then_stop(
        ledger_rt: Callable[..., Runtime]) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    rt = ledger_rt(postgres={"dsn": f"postgresql://postgres@127.0.0.1:{port}/test"})
    lg = ledger.Ledger(rt)
    stop = asyncio.Event()
    task = asyncio.create_task(lg.run(stop))
    for i in range(100):
        lg.record("started", f"01ARZ3NDEKTSV4RRFFQ69G{i:04d}-default", "default", "record",
                  attempt=1, lost=0, ts_ms=time.time() * 1000)
    await asyncio.sleep(0.5)
    assert not task.done()
    assert len(lg.buffer) == 100 and lg.dropped == 0  # kept for when PostgreSQL is back
    assert rt.health.postgres_ok is False
    stop.set()
    await asyncio.wait_for(task, ledger.DRAIN_TIMEOUT_S + 5)
    assert lg.dropped == 100  # counted, not silently lost


async def test_stop_drains_everything(ledger_rt: Callable[..., Runtime],
                                      db: asyncpg.Connection) -> None:
    rt = ledger_rt()
    lg = ledger.Ledger(rt)
    stop = asyncio.Event()
    task = asyncio.create_task(lg.run(stop))
    n = 20_000
    t = time.time() * 1000
    t0 = time.perf_counter()
    for i in range(n):
        lg.record("succeeded", f"01ARZ3NDEKTSV4RR{i:010d}-default", "default", "record",
                  attempt=1, lost=0, ts_ms=t, enq_ms=t, result={"i": i})
    record_cost = (time.perf_counter() - t0) / n
    stop.set()
    t1 = time.perf_counter()
    await asyncio.wait_for(task, 30)
    elapsed = time.perf_counter() - t1
    assert await db.fetchval("SELECT count(*) FROM jobs") == n
    assert lg.written == n and not lg.buffer and lg.dropped == 0
    print(f"\nledger: record() {record_cost * 1e6:.2f} us/event; "
          f"flush {n / elapsed:,.0f} events/s ({n} one-event jobs)")


async def test_prune_by_retention(ledger_rt: Callable[..., Runtime],
                                  db: asyncpg.Connection) -> None:
    rt = ledger_rt(postgres={"ledger_retention_days": 7})
    lg = ledger.Ledger(rt)
    t = time.time() * 1000
    for i in range(3):
        lg.record("succeeded", f"01ARZ3NDEKTSV4RRFFQ69G{i:04d}-default", "default", "record",
                  attempt=1, lost=0, ts_ms=t)
    await lg.flush()
    await db.execute("UPDATE jobs SET updated_at = now() - interval '8 days' "
                     "WHERE id LIKE '%0000-default' OR id LIKE '%0001-default'")
    assert await lg.prune() == 2
    assert await db.fetchval("SELECT count(*) FROM jobs") == 1
    await lg.db.close()


async def test_ledger_marks_outbox_rows_finished(ledger_rt: Callable[..., Runtime],
                                                 db: asyncpg.Connection, pg_schema: str,
                                                 prefix: str) -> None:
    rt = ledger_rt()
    row_id = await outbox.enqueue(db, "record", {}, prefix=prefix, schema=pg_schema)
    jid = "01ARZ3NDEKTSV4RRFFQ69G5FAX-default"
    await db.execute("UPDATE outbox SET published_at = now(), job_id = $1", jid)
    lg = ledger.Ledger(rt)
    t = time.time() * 1000
    lg.record("started", jid, "default", "record", attempt=1, lost=0, ts_ms=t)
    await lg.flush()
    assert await db.fetchval("SELECT finished_at FROM outbox WHERE id = $1", row_id) is None
    lg.record("dead", jid, "default", "record", attempt=1, lost=0, ts_ms=t + 1,
              error="x", reason="failed")
    await lg.flush()
    row = await db.fetchrow("SELECT * FROM outbox WHERE id = $1", row_id)
    assert row["final_status"] == "dead" and row["finished_at"] is not None
    await lg.db.close()


async def test_nul_characters_do_not_poison_a_batch(ledger_rt: Callable[..., Runtime],
                                                    db: asyncpg.Connection) -> None:
    rt = ledger_rt()
    lg = ledger.Ledger(rt)
    t = time.time() * 1000
    lg.record("dead", "01ARZ3NDEKTSV4RRFFQ69G5FAY-default", "default", "record", attempt=1,
              lost=0, ts_ms=t, error="bad\x00byte", reason="failed")
    lg.record("succeeded", "01ARZ3NDEKTSV4RRFFQ69G5FAZ-default", "default", "record",
              attempt=1, lost=0, ts_ms=t, result={"s": "a\x00b"})
    assert await lg.flush() == 2
    assert await db.fetchval("SELECT count(*) FROM jobs") == 2
    await lg.db.close()
