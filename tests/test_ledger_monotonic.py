"""Ledger rows are monotonic (issue 10): a finished job's row is never rewritten by a
later or late event -- the outcome of a stalled (SIGSTOPped) worker resumed after its
job was reclaimed and finished elsewhere -- whatever order the batches land in. Only a
dead-letter replay (same job id, started again after its death) reopens a dead row."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

from jobqd import ledger
from jobqd.runtime import Runtime
from tests.conftest import PG_DSN


@pytest.fixture
def ledger_rt(make_rt: Callable[..., Runtime], pg_schema: str) -> Callable[..., Runtime]:
    def make(**over: Any) -> Runtime:
        return make_rt(postgres={"dsn": PG_DSN, "schema": pg_schema, "ledger": True}, **over)

    return make


def jid(n: int) -> str:
    return f"01ARZ3NDEKTSV4RRFFQ69G5F{n:02d}-default"


async def row(db: asyncpg.Connection, job_id: str) -> asyncpg.Record:
    got = await db.fetchrow("SELECT * FROM jobs WHERE id = $1", job_id)
    assert got is not None
    return got


async def test_finished_rows_are_never_rewritten(ledger_rt: Callable[..., Runtime],
                                                 db: asyncpg.Connection) -> None:
    rt = ledger_rt()
    b, stalled = ledger.Ledger(rt), ledger.Ledger(rt)  # two daemons
    t = time.time() * 1000
    try:
        # 1. B reclaimed and finished the job; the stalled daemon resumes later and
        #    reports a retry of its old delivery (a later timestamp)
        b.record("started", jid(1), "default", "record", attempt=1, lost=1, ts_ms=t + 10)
        b.record("succeeded", jid(1), "default", "record", attempt=1, lost=1, ts_ms=t + 20,
                 result="from B")
        await b.flush()
        before = await row(db, jid(1))
        stalled.record("retried", jid(1), "default", "record", attempt=1, lost=0,
                       ts_ms=t + 30, error="TimeoutError: late")
        await stalled.flush()
        after = await row(db, jid(1))
        assert after["status"] == "succeeded" and after["error"] is None
        assert dict(after) == dict(before)  # not a column changed, updated_at included

        # 2. a late *terminal* event of the stalled worker does not rewrite it either
        stalled.record("succeeded", jid(1), "default", "record", attempt=1, lost=0,
                       ts_ms=t + 40, result="from the stalled worker")
        await stalled.flush()
        assert dict(await row(db, jid(1))) == dict(before)

        # 3. dead is final too: a late retry or success leaves it dead
        b.record("dead", jid(2), "default", "record", attempt=3, lost=0, ts_ms=t + 10,
                 error="boom", reason="max_retries")
        await b.flush()
        stalled.record("retried", jid(2), "default", "record", attempt=2, lost=0,
                       ts_ms=t + 20, error="x")
        stalled.record("succeeded", jid(2), "default", "record", attempt=2, lost=0,
                       ts_ms=t + 30, result=1)
        await stalled.flush()
        r2 = await row(db, jid(2))
        assert (r2["status"], r2["reason"], r2["error"]) == ("dead", "max_retries", "boom")

        # 4. the other order: the stalled worker's retry lands first, then the older
        #    success of the daemon that really finished the job
        stalled.record("started", jid(3), "default", "record", attempt=1, lost=0, ts_ms=t)
        stalled.record("retried", jid(3), "default", "record", attempt=1, lost=0,
                       ts_ms=t + 30, error="late")
        await stalled.flush()
        b.record("started", jid(3), "default", "record", attempt=1, lost=1, ts_ms=t + 10)
        b.record("succeeded", jid(3), "default", "record", attempt=1, lost=1, ts_ms=t + 20,
                 result="ok")
        await b.flush()
        r3 = await row(db, jid(3))
        assert r3["status"] == "succeeded" and r3["error"] is None
        assert r3["result"] == '"ok"'

        # 5. within one batch: a terminal event is not undone by a later one
        b.record("succeeded", jid(4), "default", "record", attempt=1, lost=0, ts_ms=t,
                 result=1)
        b.record("retried", jid(4), "default", "record", attempt=1, lost=0, ts_ms=t + 1,
                 error="x")
        await b.flush()
        assert (await row(db, jid(4)))["status"] == "succeeded"
    finally:
        await b.db.close()
        await stalled.db.close()


async def test_a_dead_letter_replay_reopens_a_dead_row(ledger_rt: Callable[..., Runtime],
                                                       db: asyncpg.Connection) -> None:
    rt = ledger_rt()
    lg, other = ledger.Ledger(rt), ledger.Ledger(rt)
    t = time.time() * 1000
    try:
        lg.record("started", jid(5), "default", "record", attempt=1, lost=0, ts_ms=t)
        lg.record("dead", jid(5), "default", "record", attempt=1, lost=0, ts_ms=t + 1,
                  error="bad", reason="failed")
        await lg.flush()
        # replayed: started again after its death (one batch with its success)
        lg.record("started", jid(5), "default", "record", attempt=1, lost=0, ts_ms=t + 100)
        lg.record("succeeded", jid(5), "default", "record", attempt=1, lost=0, ts_ms=t + 101,
                  result="second life")
        await lg.flush()
        r5 = await row(db, jid(5))
        assert r5["status"] == "succeeded" and r5["result"] == '"second life"'
        assert r5["error"] is None and r5["reason"] is None

        # replayed, started (flushed), then the first life's death lands late: the
        # running row is not sent back to dead
        lg.record("started", jid(6), "default", "record", attempt=1, lost=0, ts_ms=t + 100)
        await lg.flush()
        other.record("dead", jid(6), "default", "record", attempt=1, lost=0, ts_ms=t + 1,
                     error="first life", reason="failed")
        await other.flush()
        assert (await row(db, jid(6)))["status"] == "running"
        # but a succeeded row is never reopened, not even by a start
        lg.record("succeeded", jid(7), "default", "record", attempt=1, lost=0, ts_ms=t)
        await lg.flush()
        other.record("started", jid(7), "default", "record", attempt=1, lost=0, ts_ms=t + 50)
        await other.flush()
        assert (await row(db, jid(7)))["status"] == "succeeded"
    finally:
        await lg.db.close()
        await other.db.close()
