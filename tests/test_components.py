"""Component-level tests against the real Redis: heartbeats, the reaper's rarer
paths, the log formatters."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Callable
from typing import Any

import orjson
import pytest
import redis.asyncio as aredis

from jobqd import Client, logs
from jobqd.heartbeat import RedisHeartbeats, worker_info
from jobqd.keys import GROUP, GlobalKeys, QueueKeys
from jobqd.publish import publish
from jobqd.reaper import reap_once
from jobqd.runtime import Runtime

from .conftest import REDIS_URL


async def test_redis_heartbeats_alive_workers_and_pruning(
        make_rt: Callable[..., Runtime], prefix: str, r: aredis.Redis) -> None:
    rt = make_rt()
    hb = RedisHeartbeats(rt.redis, rt.config.redis.prefix)
    await hb.beat("w1", worker_info(rt, {"running": 0}))
    g = GlobalKeys(prefix)
    sec, usec = await r.time()
    now_ms = sec * 1000 + usec // 1000
    await r.zadd(g.heartbeats, {"stale": now_ms - 60_000, "ancient": now_ms - 7_200_000})
    await r.hset(g.workers, mapping={"stale": orjson.dumps({"host": "h"}),
                                     "ancient": orjson.dumps({"host": "h"})})
    assert await hb.alive(10) == {"w1"}
    assert await r.zscore(g.heartbeats, "ancient") is None  # silent > 1 h: forgotten
    workers = {w["name"]: w for w in await hb.workers()}
    assert set(workers) == {"w1", "stale"}
    assert workers["w1"]["pid"] and float(workers["w1"]["heartbeat_age_s"]) < 5  # type: ignore[arg-type]
    assert float(workers["stale"]["heartbeat_age_s"]) >= 59  # type: ignore[arg-type]
    await hb.remove("w1")
    assert await hb.alive(10) == set()


async def test_redis_heartbeats_blip_returns_none() -> None:
    from jobqd import config

    cfg = config.loads("redis: {url: 'redis://127.0.0.1:1/0'}\n")
    bad = aredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    try:
        assert await RedisHeartbeats(bad, cfg.redis.prefix).alive(10) is None
    finally:
        await bad.aclose()


class _Nobody:
    async def alive(self, timeout_s: float) -> set[str]:
        return set()


@pytest.mark.redis62
async def test_reaper_dead_consumer_with_garbage_and_an_empty_dead_consumer(
        make_rt: Callable[..., Runtime], prefix: str, r: aredis.Redis) -> None:
    rt = make_rt(heartbeat={"interval_s": 0.1, "timeout_s": 0.2},
                 reaper={"visibility_timeout_s": 60})
    await publish(rt.redis, rt.config)
    qk = QueueKeys(prefix, "default")
    async with Client(REDIS_URL, prefix) as c:
        job = await c.enqueue("noop")
    await r.xadd(qk.stream, {"garbage": "1"})
    await r.xreadgroup(GROUP, "dead-1", {qk.stream: ">"}, count=10)  # both now owned by dead-1
    await r.xgroup_createconsumer(qk.stream, GROUP, "dead-empty")

    await asyncio.sleep(0.3)  # idle in the group past heartbeat.timeout_s
    counts = await reap_once(rt, _Nobody())  # type: ignore[arg-type]
    assert counts["worker_lost"] == 1  # the job; the garbage entry goes to the DLQ
    consumers = {c["name"] for c in await r.xinfo_consumers(qk.stream, GROUP)}
    assert b"dead-empty" not in consumers  # owned nothing: removed
    async with Client(REDIS_URL, prefix) as c:
        info = await c.status(job.id)
        # back (held beside another entry: spread through the delayed set, see reaper.py)
        assert info.status in ("scheduled", "queued") and info.lost == 1
        dead = await c.dlq_list()
        assert [d.death["reason"] for d in dead] == ["malformed"]  # the garbage entry
    assert await reap_once(rt, _Nobody()) == {  # type: ignore[arg-type]
        "worker_lost": 0, "stalled": 0, "dead": 0}  # dead-1 owns nothing any more


async def test_the_reaper_wakes_the_scheduler_after_handing_jobs_back(
        make_rt: Callable[..., Runtime], prefix: str, r: aredis.Redis) -> None:
    """A dead consumer's jobs come back spread over reaper.SPREAD_S through the delayed
    set; the reaper wakes its daemon's scheduler, so that it promotes each at its own
    due time rather than together at its next turn (up to 0.5 s later), to be fetched
    side by side with a poison job again."""
    from jobqd import reaper

    rt = make_rt(heartbeat={"interval_s": 0.1, "timeout_s": 0.2},
                 reaper={"interval_s": 0.1, "visibility_timeout_s": 60})
    await publish(rt.redis, rt.config)
    qk = QueueKeys(prefix, "default")
    async with Client(REDIS_URL, prefix) as c:
        await c.enqueue_many("noop", [{}, {}])
    await r.xreadgroup(GROUP, "dead-1", {qk.stream: ">"}, count=10)  # both owned by dead-1
    await asyncio.sleep(0.3)  # idle in the group past heartbeat.timeout_s
    stop, wakeup = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(reaper.run(rt, _Nobody(), stop, wakeup))  # type: ignore[arg-type]
    try:
        await asyncio.wait_for(wakeup.wait(), 5)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
    assert await r.zcard(qk.delayed) + await r.xlen(qk.stream) == 2  # back, spread


def test_log_formatters() -> None:
    rec = logging.LogRecord("jobqd.pool", logging.WARNING, __file__, 1, "job failed: %s",
                            ("boom",), None)
    rec.job_id, rec.task = "j1", "send"
    line = json.loads(logs.JsonFormatter().format(rec))
    assert line["msg"] == "job failed: boom" and line["job_id"] == "j1"
    assert line["level"] == "warning" and line["ts"].endswith("Z")
    try:
        raise ValueError("x")
    except ValueError:
        import sys

        rec.exc_info = sys.exc_info()
    assert "ValueError" in json.loads(logs.JsonFormatter().format(rec))["exc"]
    text = logs.TextFormatter().format(rec)
    assert "job failed: boom" in text and "job_id=j1" in text and "task=send" in text


def test_log_setup_chooses_the_format(monkeypatch: Any) -> None:
    root = logging.getLogger()
    before = list(root.handlers), root.level
    try:
        buf = io.StringIO()
        monkeypatch.setattr("sys.stderr", buf)
        logs.setup("DEBUG", "json")
        logging.getLogger("jobqd.test").info("hello")
        assert json.loads(buf.getvalue().splitlines()[-1])["msg"] == "hello"
        logs.setup("INFO", "text")
        logging.getLogger("jobqd.test").info("plain")
        assert buf.getvalue().splitlines()[-1].endswith("jobqd.test: plain")
        assert sum(getattr(h, "_jobqd", False) for h in root.handlers) == 1  # replaced
        logs.set_level("WARNING")
        assert logging.getLogger("jobqd").level == logging.WARNING
    finally:
        for h in list(root.handlers):
            if getattr(h, "_jobqd", False):
                root.removeHandler(h)
        for h in before[0]:
            if h not in root.handlers:
                root.addHandler(h)
        root.setLevel(before[1])
        logging.getLogger("jobqd").setLevel(logging.NOTSET)


def test_json_log_line_survives_text_that_is_not_utf8() -> None:
    """A log line about a job whose error holds a lone surrogate (os.fsdecode of a Linux
    file name) is still written, as valid JSON (the logging of a failure must not fail)."""
    import json
    import os

    from jobqd.logs import JsonFormatter

    name = os.fsdecode(b"/tmp/\xff.txt")
    rec = logging.LogRecord("jobqd", logging.ERROR, __file__, 1, "cannot open %s", (name,),
                            None)
    rec.task = name
    line = JsonFormatter().format(rec)
    assert json.loads(line)["msg"] == f"cannot open {name}"
