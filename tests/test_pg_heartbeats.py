"""Schema migrations and the PostgreSQL heartbeat store, against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aredis

from jobqd import config, heartbeat, pg, reaper
from jobqd.runtime import Runtime
from tests.conftest import PG_DSN, REDIS_URL


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return int(port)


@pytest.fixture
async def pgconn() -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(PG_DSN)
    yield conn
    await conn.close()




async def test_migrate_is_idempotent(pgconn: asyncpg.Connection, pg_schema: str) -> None:
    assert await pg.migrate(pgconn, pg_schema) == [v for v, _ in pg.MIGRATIONS]
    assert await pg.migrate(pgconn, pg_schema) == []
    assert await pg.applied_versions(pgconn, pg_schema) == [v for v, _ in pg.MIGRATIONS]
    tables = {r["table_name"] for r in await pgconn.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", pg_schema)}
    assert {"schema_migrations", "workers", "outbox", "jobs"} <= tables


async def test_migrate_concurrently_creates_the_schema_once(pgconn: asyncpg.Connection,
                                                            pg_schema: str) -> None:
    # the schema does not exist yet: CREATE SCHEMA itself must not race
    await pgconn.execute(f'DROP SCHEMA "{pg_schema}" CASCADE')
    conns = [await asyncpg.connect(PG_DSN) for _ in range(5)]
    try:
        results = await asyncio.gather(*(pg.migrate(c, pg_schema) for c in conns))
    finally:
        for c in conns:
            await c.close()
    applied = sorted(v for r in results for v in r)
    assert applied == [v for v, _ in pg.MIGRATIONS]  # each version applied exactly once
    assert sum(1 for r in results if r) == 1
    rows = await pgconn.fetch(f'SELECT version FROM "{pg_schema}".schema_migrations')
    assert sorted(r["version"] for r in rows) == applied


async def test_connect_pool_sets_search_path(write_config: Callable[..., Path],
                                             pg_schema: str) -> None:
    cfg = config.load(write_config(postgres={"dsn": PG_DSN, "schema": pg_schema}))
    pool = await pg.connect_pool(cfg)
    try:
        await pg.migrate(pool, pg_schema)
        assert await pool.fetchval("SHOW search_path") == pg_schema
        assert await pool.fetchval("SELECT count(*) FROM workers") == 0  # unqualified name
    finally:
        await pool.close()


async def test_beat_alive_workers_remove(make_rt: Callable[..., Runtime], pg_schema: str,
                                         pgconn: asyncpg.Connection) -> None:
    rt = make_rt(postgres={"dsn": PG_DSN, "schema": pg_schema})
    store = pg.PgHeartbeats(rt)
    await store.start()
    try:
        await store.beat("a", {"host": "h1", "pid": 1})
        await store.beat("b", {"host": "h2", "pid": 2})
        await store.beat("a", {"host": "h1", "pid": 1, "running": 3})  # upsert
        assert await store.alive(5.0) == {"a", "b"}
        # b went silent 30 s ago (PostgreSQL's clock, not ours)
        await pgconn.execute(f'UPDATE "{pg_schema}".workers SET last_beat = now() - '
                             "interval '30 seconds' WHERE name = 'b'")
        assert await store.alive(5.0) == {"a"}
        assert await store.alive(60.0) == {"a", "b"}
        workers = {w["name"]: w for w in await store.workers()}
        listed = await pg.list_workers(rt.config)  # what `jobqd stats` would show
        assert [w["name"] for w in listed] == ["a", "b"] and listed[0]["running"] == 3
        assert workers["a"]["running"] == 3 and workers["a"]["host"] == "h1"
        age = workers["b"]["heartbeat_age_s"]
        assert isinstance(age, float) and 29 < age < 40
        # another prefix sharing the schema is invisible
        other = make_rt(redis={"url": REDIS_URL, "prefix": rt.config.redis.prefix + "x"},
                        postgres={"dsn": PG_DSN, "schema": pg_schema})
        other_store = pg.PgHeartbeats(other)
        await other_store.start()
        assert await other_store.alive(60.0) == set()
        await other_store.close()
        await store.remove("a")
        assert await store.alive(60.0) == {"b"}
        # rows silent for over an hour are forgotten
        await pgconn.execute(f'UPDATE "{pg_schema}".workers SET last_beat = now() - '
                             "interval '2 hours'")
        store._last_prune = 0.0
        assert await store.alive(5.0) == set()
        assert await pgconn.fetchval(f'SELECT count(*) FROM "{pg_schema}".workers') == 0
    finally:
        await store.close()


async def test_unreachable_postgres_is_a_blip_not_a_death(make_rt: Callable[..., Runtime],
                                                          pg_schema: str) -> None:
    rt = make_rt(postgres={"dsn": f"postgresql://postgres@127.0.0.1:{closed_port()}/test",
                           "schema": pg_schema})
    store = pg.PgHeartbeats(rt)
    await store.start()  # logged, not raised: the daemon still starts
    assert rt.health.postgres_ok is False
    assert await store.alive(10.0) is None  # unknown, never "everyone is dead"
    assert await store.alive(10.0) is None  # also while a reconnect is pending
    with pytest.raises(ConnectionError):  # what heartbeat.run tolerates
        await store.beat(rt.name, {})
    # the heartbeat loop keeps going and stops cleanly
    stop = asyncio.Event()
    task = asyncio.create_task(heartbeat.run(rt, store, stop))
    await asyncio.sleep(0.3)
    assert not task.done()
    stop.set()
    await asyncio.wait_for(task, 5)
    # and the reaper, seeing None, reclaims nothing by liveness
    assert await reaper.reap_once(rt, store) == {"worker_lost": 0, "stalled": 0, "dead": 0}
    await store.close()


async def test_alive_survives_terminated_connections(make_rt: Callable[..., Runtime],
                                                     pg_schema: str,
                                                     pgconn: asyncpg.Connection) -> None:
    rt = make_rt(postgres={"dsn": PG_DSN, "schema": pg_schema})
    store = pg.PgHeartbeats(rt)
    await store.start()
    try:
        await store.beat("a", {})
        await pgconn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                             "WHERE application_name = 'jobqd' AND pid <> pg_backend_pid() "
                             "AND query NOT ILIKE '%pg_terminate_backend%' "
                             "AND datname = current_database()")
        results = [await store.alive(10.0) for _ in range(3)]
        assert all(r is None or r == {"a"} for r in results)  # a blip at most, never raises
        assert results[-1] == {"a"}  # and the pool reconnects by itself
    finally:
        await store.close()


async def test_daemon_uses_pg_heartbeats(start_daemon: Callable[..., Any], pg_schema: str,
                                         pgconn: asyncpg.Connection, prefix: str,
                                         r: aredis.Redis) -> None:
    d = await start_daemon(postgres={"dsn": PG_DSN, "schema": pg_schema})
    name = d.daemon.rt.name
    rows: list[Any] = []
    for _ in range(100):
        rows = await pgconn.fetch(f'SELECT name, info FROM "{pg_schema}".workers '
                                  "WHERE prefix = $1", prefix)
        if rows:
            break
        await asyncio.sleep(0.05)
    assert [x["name"] for x in rows] == [name]
    assert await r.zcard(f"{prefix}:hb") == 0  # not in Redis
    await d.stop()
    assert await pgconn.fetchval(f'SELECT count(*) FROM "{pg_schema}".workers') == 0
