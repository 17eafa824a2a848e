"""Producer-side validation is the same at every entry point (issue 10): args nested
deeper than MAX_JSON_DEPTH and a delay_s that is not a finite number from 0 to
MAX_DELAY_S are refused with one clear message by the Python clients, the HTTP API,
the CLI, the outbox producer and the outbox relay (rows written by plain SQL)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
import redis.asyncio as aredis

from jobqd import Client, PayloadTooDeep, SyncClient, outbox, publish
from jobqd.cli import main
from jobqd.exitcodes import ExitCode
from jobqd.jobs import MAX_DELAY_S, MAX_JSON_DEPTH, check_depth, validate_delay_s
from jobqd.keys import QueueKeys
from jobqd.runtime import Runtime

from .conftest import REDIS_URL, wait_for
from .test_http import api, post_job
from .test_outbox import Relay, rows

BAD_DELAYS = [math.inf, -math.inf, math.nan, -1.0, MAX_DELAY_S * 2]


def nested(levels: int) -> dict[str, Any]:
    """Args nesting `levels` levels deep (the args object itself is level 1)."""
    d: dict[str, Any] = {"leaf": 1}
    for _ in range(levels - 1):
        d = {"a": d}
    return d


def test_depth_and_delay_rules() -> None:
    check_depth(nested(MAX_JSON_DEPTH))
    with pytest.raises(PayloadTooDeep, match=f"more than {MAX_JSON_DEPTH} levels"):
        check_depth(nested(MAX_JSON_DEPTH + 1))
    with pytest.raises(PayloadTooDeep):  # lists count too, and 1,000 levels do not recurse
        check_depth({"a": orjson.loads(b"[" * 1000 + b"]" * 1000)})
    # what the limit protects: such a job would be accepted but never re-encodable
    with pytest.raises(orjson.JSONEncodeError):
        orjson.dumps(orjson.loads(b"[" * 300 + b"]" * 300))
    assert validate_delay_s(0) == 0.0 and validate_delay_s(MAX_DELAY_S) == MAX_DELAY_S
    for bad in [*BAD_DELAYS, True, "5"]:
        with pytest.raises(ValueError, match="delay_s must be a finite number"):
            validate_delay_s(bad)  # type: ignore[arg-type]


async def test_python_clients_refuse_and_write_nothing(make_rt: Callable[..., Runtime],
                                                       prefix: str, r: aredis.Redis) -> None:
    rt0 = make_rt()
    await publish.publish(rt0.redis, rt0.config)
    qk = QueueKeys(prefix, "default")
    async with Client(REDIS_URL, prefix) as c:
        with pytest.raises(PayloadTooDeep):
            await c.enqueue("noop", nested(MAX_JSON_DEPTH + 1))
        with pytest.raises(PayloadTooDeep):  # one bad job in a batch: nothing written
            await c.enqueue_many("noop", [{}, nested(MAX_JSON_DEPTH + 1)])
        for bad in BAD_DELAYS:
            with pytest.raises(ValueError, match="delay_s must be a finite number"):
                await c.enqueue("noop", {}, delay_s=bad)
        ok = await c.enqueue("noop", nested(MAX_JSON_DEPTH), delay_s=MAX_DELAY_S)
        assert (await c.status(ok.id)).status == "scheduled"
    with SyncClient(REDIS_URL, prefix) as sc:
        with pytest.raises(PayloadTooDeep):
            sc.enqueue("noop", nested(MAX_JSON_DEPTH + 1))
        with pytest.raises(ValueError, match="delay_s must be a finite number"):
            sc.enqueue("noop", {}, delay_s=math.nan)
    assert await r.xlen(qk.stream) == 0 and await r.zcard(qk.delayed) == 1


async def test_http_refuses_with_400_naming_the_field(make_rt: Callable[..., Runtime],
                                                      prefix: str, r: aredis.Redis) -> None:
    rt = make_rt()
    await publish.publish(rt.redis, rt.config)
    async with api(rt) as s:
        status, body = await post_job(s, {"task": "noop", "args": nested(MAX_JSON_DEPTH + 1)})
        assert (status, body["field"]) == (400, "args"), body
        assert f"more than {MAX_JSON_DEPTH} levels" in body["error"]
        # 1,000 levels: orjson decodes it, the daemon could never re-encode it
        raw = b'{"task": "noop", "args": {"a": ' + b"[" * 1000 + b"]" * 1000 + b"}}"
        status, body = await post_job(s, raw)
        assert (status, body["field"]) == (400, "args"), body
        for bad in (-1, 1e300, MAX_DELAY_S + 1):
            status, body = await post_job(s, {"task": "noop", "args": {}, "delay_s": bad})
            assert (status, body["field"]) == (400, "delay_s"), body
            assert body["error"].startswith("delay_s must be a finite number"), body
        # NaN and Infinity are not JSON: orjson refuses them as malformed
        status, body = await post_job(s, b'{"task": "noop", "args": {}, "delay_s": NaN}')
        assert (status, body["field"]) == (400, "body"), body
        status, body = await post_job(s, {"task": "noop", "args": nested(MAX_JSON_DEPTH)})
        assert status == 202, body
    assert await r.xlen(QueueKeys(prefix, "default").stream) == 1


@pytest.mark.parametrize("extra", [["--delay-s", "inf"], ["--delay-s", "nan"],
                                   ["--delay-s", "-3"], ["--delay-s", "1e12"]])
async def test_cli_refuses_bad_delay(make_rt: Callable[..., Runtime],
                                     write_config: Callable[..., Path],
                                     capsys: pytest.CaptureFixture[str], extra: list[str]) -> None:
    rt0 = make_rt()
    await publish.publish(rt0.redis, rt0.config)
    code = await asyncio.to_thread(main, ["-c", str(write_config()), "enqueue", "noop", "{}",
                                          *extra])
    _, err = capsys.readouterr()
    assert code == ExitCode.USAGE, err
    assert "delay_s must be a finite number of seconds" in err


async def test_cli_refuses_deep_args(make_rt: Callable[..., Runtime],
                                     write_config: Callable[..., Path],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    rt0 = make_rt()
    await publish.publish(rt0.redis, rt0.config)
    code = await asyncio.to_thread(main, ["-c", str(write_config()), "enqueue", "noop",
                                          orjson.dumps(nested(MAX_JSON_DEPTH + 1)).decode()])
    _, err = capsys.readouterr()
    assert code == ExitCode.USAGE and f"more than {MAX_JSON_DEPTH} levels" in err, err


async def test_outbox_producer_refuses(db: asyncpg.Connection, pg_schema: str,
                                       prefix: str) -> None:
    async with db.transaction():
        with pytest.raises(PayloadTooDeep):
            await outbox.enqueue(db, "noop", nested(MAX_JSON_DEPTH + 1), prefix=prefix,
                                 schema=pg_schema)
        for bad in BAD_DELAYS:
            with pytest.raises(ValueError, match="delay_s must be a finite number"):
                await outbox.enqueue(db, "noop", {}, delay_s=bad, prefix=prefix,
                                     schema=pg_schema)
        with pytest.raises(PayloadTooDeep):
            await outbox.enqueue_many(db, "noop", [{}, nested(MAX_JSON_DEPTH + 1)],
                                      prefix=prefix, schema=pg_schema)
    assert await rows(db, pg_schema) == []


async def test_outbox_relay_marks_bad_rows_failed_and_keeps_going(
        db: asyncpg.Connection, pg_schema: str, prefix: str, start_daemon: Callable[..., Any],
        make_rt: Callable[..., Runtime], r: aredis.Redis) -> None:
    """Rows written by plain SQL bypass the producer's checks: the relay refuses them
    one by one (failed_at + the reason), and the good rows around them run."""
    from .conftest import PG_DSN

    await start_daemon()
    key = f"{prefix}:runs"
    deep = orjson.dumps({"key": key, **nested(MAX_JSON_DEPTH + 1)}).decode()
    very_deep = '{"a": ' + "[" * 2000 + "]" * 2000 + "}"  # deeper than orjson reads
    t = f'"{pg_schema}".outbox'
    async with db.transaction():
        bad = {
            "deep": await db.fetchval(f"INSERT INTO {t} (prefix, task, args) VALUES "
                                      "($1, 'record', $2::jsonb) RETURNING id", prefix, deep),
            "very_deep": await db.fetchval(f"INSERT INTO {t} (prefix, task, args) VALUES "
                                           "($1, 'record', $2::jsonb) RETURNING id",
                                           prefix, very_deep),
        }
        # (a negative delay_s is refused by the table's CHECK constraint)
        for name, delay in (("inf", "Infinity"), ("nan", "NaN"), ("huge", "1e15")):
            bad[name] = await db.fetchval(
                f"INSERT INTO {t} (prefix, task, args, delay_s) VALUES "
                f"($1, 'record', '{{}}'::jsonb, '{delay}'::float8) RETURNING id", prefix)
        good = await outbox.enqueue_many(db, "record", [{"key": key, "value": i}
                                                        for i in range(3)],
                                         prefix=prefix, schema=pg_schema)
    relay = Relay(make_rt(postgres={"dsn": PG_DSN, "schema": pg_schema})).start()
    try:
        async def settled() -> bool:
            by_id = {x["id"]: x for x in await rows(db, pg_schema)}
            return (all(by_id[i]["failed_at"] is not None for i in bad.values())
                    and len(await r.hgetall(key)) == 3)

        await wait_for(settled, timeout=20, what="bad rows failed, good rows run")
        assert relay.task is not None and not relay.task.done()
    finally:
        await relay.stop()
    by_id = {x["id"]: x for x in await rows(db, pg_schema)}
    assert "PayloadTooDeep" in by_id[bad["deep"]]["error"]
    assert "cannot be decoded" in by_id[bad["very_deep"]]["error"]
    for name in ("inf", "nan", "huge"):
        assert "delay_s must be a finite number" in by_id[bad[name]]["error"], name
        assert by_id[bad[name]]["job_id"] is None
    assert all(by_id[g]["published_at"] is not None for g in good)


async def test_dlq_replay_refuses_a_too_deep_job(make_rt: Callable[..., Runtime], prefix: str,
                                                 r: aredis.Redis) -> None:
    """A dead job written straight to Redis, past every producer check, is not put back
    into a queue it could never leave: replay refuses it (HTTP 422)."""
    from jobqd.jobs import BadJob

    rt = make_rt()
    await publish.publish(rt.redis, rt.config)
    qk = QueueKeys(prefix, "default")
    job_id = "01ARZ3NDEKTSV4RRFFQ69G5FB1-default"
    env = {"id": job_id, "task": "noop", "args": nested(MAX_JSON_DEPTH + 1), "attempt": 1,
           "lost": 0, "enq": 1}
    eid = await r.xadd(qk.dlq, {"j": orjson.dumps(env), "e": b'{"reason": "failed"}'})
    await r.hset(qk.state, job_id, b"x" + eid)
    async with Client(REDIS_URL, prefix) as c:
        with pytest.raises(BadJob, match="cannot be replayed"):
            await c.dlq_replay(job_id)
    async with api(rt) as s, s.post(f"/v1/dlq/{job_id}/replay") as resp:
        assert resp.status == 422
        assert "nested more than" in (await resp.json())["error"]
    assert await r.xlen(qk.stream) == 0 and await r.xlen(qk.dlq) == 1
