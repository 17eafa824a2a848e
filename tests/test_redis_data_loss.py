"""Redis lost its data under a running daemon (issue 10): FLUSHALL, or a restart without
persistence. The daemon notices (its epoch key vanished), logs an ERROR, counts it in
/metrics and republishes routing, weights and groups at once, so producers can
enqueue again without a manual `jobqd publish`. `jobqd recover` re-publishes lost
outbox jobs runnable, and `jobqd recover --report` lists what the ledger saw accepted
and never finish that Redis no longer holds. Each test runs its own redis-server
(no AOF): only that one is flushed or restarted."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aredis

from jobqd import Client, SyncClient, UnknownTask, config, ledger, outbox, relay
from jobqd.cli import main
from jobqd.exitcodes import ExitCode
from jobqd.runtime import Runtime

from .conftest import PG_DSN, DaemonProcess, wait_for, wait_status
from .own_redis import free_port, needs_redis_server, own_redis
from .test_redis_eviction import wait_ready_on

pytestmark = needs_redis_server


def enqueue_until_routed(url: str, prefix: str, within_s: float) -> tuple[str, float]:
    """Enqueue one job, retrying while the task is unknown; (job id, seconds it took)."""
    t0 = time.monotonic()
    with SyncClient(url, prefix) as c:
        while True:
            try:
                return c.enqueue("noop", {}).id, time.monotonic() - t0
            except UnknownTask:
                if time.monotonic() - t0 > within_s:
                    raise
                time.sleep(0.05)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["flushall", "restart_empty"])
def test_running_daemon_republishes_after_redis_lost_its_data(
        how: str, tmp_path: Path, write_config: Callable[..., Path],
        spawn: Callable[[Path], DaemonProcess], prefix: str) -> None:
    port = free_port()
    with own_redis(tmp_path / "r") as srv:
        d = spawn(write_config(redis={"url": srv.url, "prefix": prefix},
                               http={"listen": f"127.0.0.1:{port}"}))
        wait_ready_on(srv, d, prefix)
        job, _ = enqueue_until_routed(srv.url, prefix, 0)

        async def succeeded(job_id: str) -> None:
            async with Client(srv.url, prefix) as c:
                await wait_status(c, job_id, "succeeded", timeout=20)

        asyncio.run(succeeded(job))
        if how == "flushall":
            admin = srv.client()
            admin.flushall()
            admin.close()
        else:
            srv.kill()
            srv.start()
        # the routing went with the data; no manual publish: the daemon puts it back
        # within a few seconds (the metric below shows it noticed the loss)
        after, took = enqueue_until_routed(srv.url, prefix, 10)
        print(f"\n[{how}] producers enqueue again {took:.2f}s after the loss")
        asyncio.run(succeeded(after))  # and the consumers run it

        async def metrics() -> str:
            async with aiohttp.ClientSession() as s, \
                    s.get(f"http://127.0.0.1:{port}/metrics") as resp:
                return await resp.text()

        assert "jobqd_redis_data_loss_total 1.0" in asyncio.run(metrics())
        text = d.log()
        assert "redis lost its data" in text and "ERROR" in text.upper(), text
        assert d.proc is not None and d.proc.poll() is None, text


@pytest.mark.timeout(90)
async def test_recover_republishes_lost_outbox_jobs_runnable(
        tmp_path: Path, db: asyncpg.Connection, pg_schema: str, prefix: str,
        write_config: Callable[..., Path], start_daemon: Callable[..., Any],
        r: aredis.Redis) -> None:
    with own_redis(tmp_path / "r") as srv:
        pgc = {"dsn": PG_DSN, "schema": pg_schema}
        redis_cfg = {"url": srv.url, "prefix": prefix}
        await start_daemon(redis=redis_cfg, postgres=pgc)  # runs the outbox relay too
        key = f"{prefix}:runs"  # run counts go to the shared test Redis (tests.handlers)
        async with db.transaction():  # delayed: still in Redis when it loses its data
            ids = await outbox.enqueue_many(db, "record", [{"key": key, "value": i}
                                                           for i in range(20)],
                                            delay_s=3, prefix=prefix, schema=pg_schema)

        async def published() -> bool:
            return bool(await db.fetchval("SELECT bool_and(published_at IS NOT NULL) "
                                          "FROM outbox"))

        await wait_for(published, timeout=15, what="rows relayed")
        admin = srv.client()
        admin.flushall()
        cfg = config.load(write_config(redis=redis_cfg, postgres=pgc))
        counts = await relay.recover(cfg)
        # (published by recover itself or by the daemon's relay, woken by its NOTIFY)
        assert counts["requeued"] == 20, counts

        admin.close()

        async def all_ran() -> bool:
            return len(await r.hgetall(key)) == 20

        await wait_for(all_ran, timeout=30, what="the 20 recovered jobs to run")
        await asyncio.sleep(0.5)
        assert set((await r.hgetall(key)).values()) == {b"1"}  # each ran once
        rows = await db.fetch("SELECT * FROM outbox WHERE id = ANY($1)", ids)
        assert all(x["recovered"] == 1 for x in rows)


async def test_recover_report_lists_ledger_jobs_redis_lost(
        db: asyncpg.Connection, pg_schema: str, prefix: str,
        write_config: Callable[..., Path], make_rt: Callable[..., Runtime], client: Client,
        capsys: pytest.CaptureFixture[str]) -> None:
    pgc = {"dsn": PG_DSN, "schema": pg_schema, "ledger": True}
    cfg_path = str(write_config(postgres=pgc))
    rt = make_rt(postgres=pgc)
    from jobqd import publish

    await publish.publish(rt.redis, rt.config)
    lg = ledger.Ledger(rt)
    t = time.time() * 1000
    lost = "01ARZ3NDEKTSV4RRFFQ69G5FA1-default"  # enqueued straight to Redis, started, lost
    via_outbox = "01ARZ3NDEKTSV4RRFFQ69G5FA2-default"  # lost, but an outbox row holds it
    done = "01ARZ3NDEKTSV4RRFFQ69G5FA3-default"  # finished: nothing to report
    present = (await client.enqueue("noop", {}, delay_s=600)).id  # Redis still holds it
    for jid in (lost, via_outbox, present):
        lg.record("started", jid, "default", "noop", attempt=1, lost=0, ts_ms=t, enq_ms=t - 1)
    lg.record("succeeded", done, "default", "noop", attempt=1, lost=0, ts_ms=t)
    await lg.flush()
    await lg.db.close()
    row = await outbox.enqueue(db, "noop", {}, prefix=prefix, schema=pg_schema)
    await db.execute("UPDATE outbox SET published_at = now(), job_id = $1 WHERE id = $2",
                     via_outbox, row)

    async def cli(*args: str) -> tuple[int, str, str]:
        code = await asyncio.to_thread(main, list(args))
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = await cli("-c", cfg_path, "recover", "--report")
    assert code == ExitCode.OK, err
    rep = json.loads(out)
    by_id = {j["id"]: j for j in rep["jobs"]}
    assert set(by_id) == {lost, via_outbox}, rep
    assert by_id[lost]["outbox_id"] is None and by_id[lost]["last_status"] == "running"
    assert by_id[lost]["task"] == "noop" and by_id[lost]["started_at"] is not None
    assert by_id[via_outbox]["outbox_id"] == row
    assert rep["missing"] == 2 and rep["recoverable"] == 1 and rep["checked"] == 3
    # --report changed nothing
    assert (await db.fetchrow("SELECT * FROM outbox WHERE id = $1", row))["recovered"] == 0

    # recover re-publishes the outbox job; its old id ends dead (redis_lost) in the
    # ledger, so the report then lists only the job nothing can bring back
    code, out, err = await cli("-c", cfg_path, "recover")
    assert code == ExitCode.OK and json.loads(out)["requeued"] == 1, (out, err)
    old = await ledger.lookup(db, via_outbox)
    assert old is not None and old.status == "dead" and old.reason == "redis_lost"
    code, out, _ = await cli("-c", cfg_path, "recover", "--report")
    assert [j["id"] for j in json.loads(out)["jobs"]] == [lost]

    # without the ledger there is nothing to report from: a config error
    code, _, err = await cli("-c", str(write_config(postgres={"dsn": PG_DSN,
                                                               "schema": pg_schema})),
                             "recover", "--report")
    assert code == ExitCode.CONFIG and "postgres.ledger: true" in err
