"""`jobqd recover`: outbox jobs lost by Redis are re-published, exactly once."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aredis

from jobqd import config, ledger, ops, outbox
from jobqd import relay as relay_mod
from jobqd.keys import QueueKeys
from jobqd.runtime import Runtime
from tests.conftest import PG_DSN, REDIS_URL, DaemonProcess, wait_for


class Relay:
    def __init__(self, cfg: config.Config) -> None:
        self.rt = Runtime(config=cfg, redis=aredis.Redis.from_url(REDIS_URL))
        self.stop_event = asyncio.Event()
        self.task = asyncio.create_task(relay_mod.run(self.rt, self.stop_event))

    async def stop(self) -> None:
        self.stop_event.set()
        await asyncio.wait_for(self.task, 10)
        await self.rt.redis.aclose()



async def delete_prefix(r: aredis.Redis, prefix: str, match: str | None = None) -> int:
    """Every key jobqd keeps under `prefix` (global ``p:*`` and per queue ``{p:q}:*``)."""
    n = 0
    for pattern in ([match] if match else [f"{prefix}:*", f"\\{{{prefix}:*"]):
        batch = [k async for k in r.scan_iter(match=pattern, count=1000)]
        for i in range(0, len(batch), 500):
            n += await r.delete(*batch[i:i + 500])
    return n


async def all_published(db: asyncpg.Connection) -> bool:
    return bool(await db.fetchval("SELECT bool_and(published_at IS NOT NULL) FROM outbox"))


async def test_redis_data_loss_recovered_exactly_once(
        db: asyncpg.Connection, pg_schema: str, prefix: str, r: aredis.Redis,
        write_config: Callable[..., Path], spawn: Callable[[Path], DaemonProcess]) -> None:
    pgc = {"dsn": PG_DSN, "schema": pg_schema}
    idle_cfg = write_config(consumers=0, postgres=pgc)  # routes, runs nothing
    cfg = config.load(write_config(postgres=pgc))
    runs = [f"runs-{prefix}-{i}" for i in range(50)]  # one counter per business item

    daemon = spawn(idle_cfg)
    daemon.wait_ready()
    relay = Relay(cfg)
    async with db.transaction():
        await outbox.enqueue_many(db, "record", [{"key": k} for k in runs], prefix=prefix,
                                  schema=pg_schema)
    await wait_for(lambda: all_published(db), what="50 rows relayed")
    assert await r.xlen(QueueKeys(prefix, "default").stream) == 50
    await relay.stop()
    daemon.kill()  # kill -9
    assert await delete_prefix(r, prefix) > 0  # Redis lost everything
    assert [k async for k in r.scan_iter(match=f"*{prefix}*")] == []

    first = await relay_mod.recover(cfg)
    assert first["checked"] == 50 and first["requeued"] == 50 and first["present"] == 0
    # Redis lost the routing too: recover published it first, so the jobs are back in
    # their queue at once, runnable by the next daemon (none runs now)
    assert first["published"] == 50 and first["pending"] == 0
    assert await r.hexists(f"{prefix}:routing", "record")
    assert await r.xlen(QueueKeys(prefix, "default").stream) == 50
    second = await relay_mod.recover(cfg)
    assert second["requeued"] == 0 and second["present"] == 50 and second["pending"] == 0

    daemon = spawn(write_config(postgres=pgc))
    daemon.wait_ready()
    relay = Relay(cfg)

    async def all_ran() -> bool:
        counts = [await r.hgetall(k) for k in runs]
        return all(counts)

    try:
        await wait_for(all_ran, what="all 50 recovered jobs to run")
        await asyncio.sleep(1.0)  # let any duplicate show up
    finally:
        await relay.stop()
    for k in runs:  # each business item ran exactly once
        assert list((await r.hgetall(k)).values()) == [b"1"], k
    rows = await db.fetch("SELECT * FROM outbox")
    assert all(x["recovered"] == 1 and x["job_id"] for x in rows)
    third = await relay_mod.recover(cfg)  # nothing was lost this time
    assert third["requeued"] == 0 and third["present"] == 0
    assert third["checked"] == third["finished"]  # every job succeeded: rows marked finished
    assert await db.fetchval("SELECT bool_and(final_status = 'succeeded') FROM outbox")
    for k in runs:
        assert list((await r.hgetall(k)).values()) == [b"1"], k
    for k in runs:
        await r.delete(k, k + ":order")


async def test_recover_publishes_at_once_when_routed_and_is_idempotent(
        db: asyncpg.Connection, pg_schema: str, prefix: str, r: aredis.Redis,
        write_config: Callable[..., Path], start_daemon: Callable[..., Any]) -> None:
    cfg = config.load(write_config(postgres={"dsn": PG_DSN, "schema": pg_schema}))
    await start_daemon(consumers=0)
    key = f"{prefix}:runs"
    relay = Relay(cfg)
    async with db.transaction():
        await outbox.enqueue_many(db, "record", [{"key": key} for _ in range(10)],
                                  prefix=prefix, schema=pg_schema)
    await wait_for(lambda: all_published(db), what="10 rows relayed")
    await relay.stop()
    old = {x["job_id"] for x in await db.fetch("SELECT job_id FROM outbox")}

    assert (await relay_mod.recover(cfg))["requeued"] == 0  # nothing lost: nothing to do
    # lose the jobs and their idempotency keys, keep the routing and queue conf
    qk = QueueKeys(prefix, "default")
    await r.delete(qk.stream, qk.state)  # (the consumer group goes with the stream)
    await delete_prefix(r, prefix, match=f"\\{{{prefix}:default}}:i:*")

    first = await relay_mod.recover(cfg)
    assert first == {"checked": 10, "present": 0, "finished": 0, "requeued": 10,
                     "published": 10, "pending": 0}
    new = {x["job_id"] for x in await db.fetch("SELECT job_id FROM outbox")}
    assert len(new) == 10 and not new & old  # re-published as new jobs
    second = await relay_mod.recover(cfg)  # the new jobs are present: skipped
    assert second == {"checked": 10, "present": 10, "finished": 0, "requeued": 0,
                      "published": 0, "pending": 0}
    await start_daemon()

    async def ran() -> bool:
        return len(await r.hgetall(key)) == 10

    await wait_for(ran, what="10 jobs to run")
    await asyncio.sleep(0.5)
    runs = await r.hgetall(key)
    assert {ops.s(k) for k in runs} == new and set(runs.values()) == {b"1"}


async def test_recover_trusts_the_ledger_for_finished_jobs(
        db: asyncpg.Connection, pg_schema: str, prefix: str,
        write_config: Callable[..., Path]) -> None:
    cfg = config.load(write_config(postgres={"dsn": PG_DSN, "schema": pg_schema,
                                             "ledger": True}))
    done_row = await outbox.enqueue(db, "record", {}, prefix=prefix, schema=pg_schema)
    lost_row = await outbox.enqueue(db, "record", {}, prefix=prefix, schema=pg_schema)
    done_id, lost_id = "01ARZ3NDEKTSV4RRFFQ69G5FAA-default", "01ARZ3NDEKTSV4RRFFQ69G5FAB-default"
    await db.execute("UPDATE outbox SET published_at = now(), job_id = CASE id WHEN $1 "
                     "THEN $2 ELSE $3 END", done_row, done_id, lost_id)
    # the job finished (ledger knows) and its Redis record expired long ago
    await db.execute("INSERT INTO jobs (id, prefix, queue, task, status, event_ms, finished_at) "
                     "VALUES ($1, $2, 'default', 'record', 'succeeded', 1, now())",
                     done_id, prefix)
    counts = await relay_mod.recover(cfg)
    assert counts["finished"] == 1 and counts["requeued"] == 1
    rows = {x["id"]: x for x in await db.fetch("SELECT * FROM outbox")}
    assert rows[done_row]["final_status"] == "succeeded"
    assert rows[done_row]["job_id"] == done_id
    # re-published at once as a new job (recover published the missing routing first)
    assert rows[lost_row]["recovered"] == 1 and rows[lost_row]["job_id"] not in (None, lost_id)
    assert (await ledger.lookup(cfg, done_id)) is not None
