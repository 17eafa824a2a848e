"""Redis memory (issue 17): the compact job envelope still reads jobs queued in the old
format (an upgrade with a backlog), what a succeeded job keeps (`keep_result`), and
`redis.max_memory_fraction`: a Redis with a small maxmemory is filled through the
producer API until refused, with the clear error and never Redis's own OOM, while the
daemon keeps settling; it accepts again once drained and loses nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aredis

from jobqd import Client, QueueFull, RedisMemoryFull, RedisOutOfMemory, SyncClient, config
from jobqd.cli import main
from jobqd.errors import JobNotFound
from jobqd.exitcodes import ExitCode
from jobqd.ids import new_job_id
from jobqd.jobs import decode_job, encode_job, view
from jobqd.keys import QueueKeys
from jobqd.ops import fields_dict

from .conftest import wait_for, wait_status
from .own_redis import needs_redis_server, own_redis


def _old(job_id: str, task: str, args: dict[str, Any], attempt: int = 0,
         err: str | None = None) -> bytes:
    """A job exactly as enqueue wrote it before the compact envelope."""
    env: dict[str, Any] = {"id": job_id, "task": task, "args": args, "attempt": attempt,
                           "lost": 0, "enq": time.time() * 1000.0}
    if err is not None:
        env["err"] = err
    return orjson.dumps(env)


def test_compact_envelope_round_trip_and_old_format() -> None:
    jid = new_job_id("default", 1_700_000_000_123)
    raw = encode_job(jid, "noop", {}, 1_700_000_000_123)
    # the queue suffix, the defaults and the ULID time are left out
    assert orjson.loads(raw) == {"i": jid[:26], "t": "noop"}
    env = decode_job(raw, "default")
    assert (env.id, env.task, env.args, env.attempt, env.lost, env.enq_ms) == (
        jid, "noop", {}, 0, 0, 1_700_000_000_123.0)
    nxt = decode_job(env.next(attempt=1, err="boom", lost=2), "default")
    assert (nxt.attempt, nxt.lost, nxt.fields()["err"]) == (1, 2, "boom")
    # a different enqueue time, an expiry and an idempotency key are kept
    full = decode_job(encode_job(jid, "t", {"a": 1}, 5.5, idem="k", exp_ms=9.0), "default")
    assert full.enq_ms == 5.5 and full.exp_ms == 9.0 and full.fields()["idem"] == "k"
    # the old format: read as it was, re-encoded compact
    old = decode_job(_old(jid, "noop", {"x": 1}, attempt=2, err="e"), "default")
    assert (old.id, old.task, old.args, old.attempt) == (jid, "noop", {"x": 1}, 2)
    assert view(old.raw, "default")["err"] == "e"
    again = decode_job(old.next(attempt=3), "default")
    assert "i" in again.raw and again.attempt == 3 and again.args == {"x": 1}
    assert again.enq_ms == old.enq_ms and again.id == jid
    assert view(orjson.loads(old.next()), "default")["id"] == jid
    # an id that is not a jobqd id is kept whole
    assert orjson.loads(encode_job("x", "t", {}, None))["i"] == "x"


async def test_jobs_queued_in_the_old_format_still_run(
        make_rt: Callable[..., Any], start_daemon: Callable[..., Any], client: Client,
        r: aredis.Redis, prefix: str) -> None:
    """Jobs written by the previous enqueue.lua (queued, scheduled, a retry, a dead
    letter) are shown by status and run to succeeded by the new daemon."""
    from jobqd import publish, scripts

    rt = make_rt()
    await scripts.preload(rt.redis)
    await publish.publish(rt.redis, rt.config)
    qk = QueueKeys(prefix, "default")
    key = f"{prefix}:runs"
    queued, scheduled, retry, dead = (new_job_id("default") for _ in range(4))
    eid = await r.xadd(qk.stream, {"j": _old(queued, "record", {"key": key, "value": 1})})
    await r.hset(qk.state, queued, eid)
    await r.zadd(qk.delayed, {scheduled: 0})
    await r.hset(qk.state, scheduled, b"d" + _old(scheduled, "record", {"key": key}))
    # attempt 1 already failed; fails once more, then succeeds (re-encoded on the way)
    eid = await r.xadd(qk.stream, {"j": _old(retry, "fail_times", {"key": key, "times": 2},
                                             attempt=1, err="earlier")})
    await r.hset(qk.state, retry, eid)
    did = await r.xadd(qk.dlq, {"j": _old(dead, "record", {"key": key}),
                                "e": orjson.dumps({"reason": "failed", "error": "x",
                                                   "attempts": 1, "lost": 0, "died": 1.0})})
    await r.hset(qk.state, dead, b"x" + did)

    info = await client.status(queued)
    assert info.status == "queued" and info.task == "record" and info.enqueued_at
    info = await client.status(retry)
    assert info.attempts == 1 and info.error == "earlier"
    info = await client.status(scheduled)
    assert info.status == "scheduled" and info.task == "record"
    assert (await client.dlq_show(dead)).job_id == dead

    await start_daemon()
    assert await client.dlq_replay(dead) == dead
    assert (await wait_status(client, queued, "succeeded")).result == 1
    await wait_status(client, scheduled, "succeeded")
    await wait_status(client, dead, "succeeded")
    done = await wait_status(client, retry, "succeeded")
    assert done.result == "ok on attempt 3" and done.attempts == 3
    runs = await r.hgetall(key)
    assert runs == {queued.encode(): b"1", scheduled.encode(): b"1", retry.encode(): b"2",
                    dead.encode(): b"1"}


async def test_keep_result_full_status_none(
        start_daemon: Callable[..., Any], client: Client, r: aredis.Redis, prefix: str,
        redis_url: str) -> None:
    """full: the result record; status: a small record saying succeeded; none: nothing
    (a wait already pending returns via the done notification; status then finds no
    job). results.keep is the default, tasks.X.keep_result overrides it."""
    await start_daemon(results={"ttl_s": 600, "keep": "none"}, tasks={
        "full": {"handler": "tests.handlers:record", "keep_result": "full"},
        "status": {"handler": "tests.handlers:record", "keep_result": "status"},
        "default": {"handler": "tests.handlers:record"}})
    qk = QueueKeys(prefix, "default")
    key = f"{prefix}:runs"
    full = await client.enqueue("full", {"key": key, "value": {"big": "x" * 100}})
    assert await client.wait(full.id, timeout_s=10) == {"big": "x" * 100}
    assert (await client.status(full.id)).result == {"big": "x" * 100}
    assert await r.pttl(qk.result(full.id)) > 0

    st = await client.enqueue("status", {"key": key, "value": {"big": "x" * 100}})
    assert await client.wait(st.id, timeout_s=10) is None
    info = await client.status(st.id)
    assert info.status == "succeeded" and info.attempts == 1 and info.result is None
    rec = await r.get(qk.result(st.id))
    assert rec is not None and len(rec) <= 44 and await r.pttl(qk.result(st.id)) > 0

    # none: waits registered before the job ends return (async and blocking clients)
    a = await client.enqueue("default", {"key": key, "value": 1}, delay_s=1.0)
    b = await client.enqueue("default", {"key": key, "value": 2}, delay_s=1.0)
    with SyncClient(redis_url, prefix) as sc:
        got = await asyncio.gather(client.wait(a.id, timeout_s=10),
                                   asyncio.to_thread(sc.wait, b.id, 10))
    assert got == [None, None]
    assert await r.hgetall(key) == {full.id.encode(): b"1", st.id.encode(): b"1",
                                    a.id.encode(): b"1", b.id.encode(): b"1"}
    for jid in (a.id, b.id):
        assert not await r.exists(qk.result(jid))
        assert not await r.hexists(qk.state, jid)
        with pytest.raises(JobNotFound):
            await client.status(jid)
        with pytest.raises(JobNotFound):  # a wait that starts afterwards has nothing
            await client.wait(jid, timeout_s=5)


def test_keep_result_config() -> None:
    base = "redis: {url: 'redis://127.0.0.1:6379/0'}\ntasks: {t: {handler: 'tests.handlers:noop'"
    assert config.loads(base + "}}\n").results.keep == "full"
    assert config.loads(base + ", keep_result: none}}\n").tasks["t"].keep_result == "none"
    with pytest.raises(config.ConfigError, match="keep_result"):
        config.loads(base + ", keep_result: some}}\n")
    with pytest.raises(config.ConfigError, match="max_memory_fraction"):
        config.loads("redis: {url: 'redis://127.0.0.1:6379/0', max_memory_fraction: 0}\n")
    with pytest.raises(config.ConfigError, match="max_memory_fraction"):
        config.loads("redis: {url: 'redis://127.0.0.1:6379/0', max_memory_fraction: 1.5}\n")


BLOB = "x" * 200  # ~0.45 KB of Redis a queued job


@needs_redis_server
@pytest.mark.timeout(60)
async def test_max_memory_fraction_refuses_enqueues_before_redis_oom(
        tmp_path: Path, start_daemon: Callable[..., Any], write_config: Callable[..., Path],
        prefix: str, capsys: pytest.CaptureFixture[str]) -> None:
    fraction = 0.6
    with own_redis(tmp_path / "redis", "--maxmemory", "20mb",
                   "--maxmemory-policy", "noeviction") as srv:
        admin = aredis.Redis.from_url(srv.url)
        over = {"redis": {"url": srv.url, "prefix": prefix, "max_memory_fraction": fraction},
                "results": {"ttl_s": 600, "keep": "none"}, "consumers": 8,
                "tasks": {"blob": {"handler": "tests.handlers:noop_blob"}}}
        d = await start_daemon(**over)
        try:
            await _fill_and_drain(d, admin, srv.url, prefix, fraction, write_config(**over),
                                  capsys)
        finally:
            await d.stop()
            await admin.aclose()


async def _fill_and_drain(d: Any, admin: aredis.Redis, url: str, prefix: str,
                          fraction: float, cfg: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    maxmem = int((await admin.info("memory"))["maxmemory"])
    qk = QueueKeys(prefix, "default")
    accepted: list[str] = []
    refusal: QueueFull | None = None
    async with Client(url, prefix) as c:
        # fill: 200-job batches, as fast as the producer goes, until refused
        while refusal is None:
            try:
                accepted += [j.id for j in await c.enqueue_many("blob", [{"b": BLOB}] * 200)]
            except QueueFull as e:
                refusal = e
                accepted += [j.id for j in e.accepted]
        assert isinstance(refusal, RedisMemoryFull) and refusal.reason == "memory"
        assert not isinstance(refusal, RedisOutOfMemory)
        assert "redis memory is full" in str(refusal) and refusal.max_bytes == maxmem
        assert refusal.used_bytes > fraction * maxmem
        assert len(accepted) > 10_000, len(accepted)
        # the other producers say it clearly too: HTTP 503 reason memory, CLI exit 3
        assert d.daemon.rt is not None
        host, port = d.daemon.http_address
        async with aiohttp.ClientSession(f"http://{host}:{port}") as s, \
                s.post("/v1/jobs", json={"task": "blob", "args": {}}) as resp:
            body = await resp.json()
            refused_http = resp.status == 503 and body["reason"] == "memory"
            if resp.status == 202:  # drained meanwhile: it was accepted
                accepted.append(body["id"])
        code = await asyncio.to_thread(main, ["-c", str(cfg), "enqueue", "blob"])
        out, err = capsys.readouterr()
        if code == 0:  # drained meanwhile: it was accepted (the CLI prints its id)
            accepted.append(out.strip())
        refused_cli = code == ExitCode.QUEUE_FULL and "redis memory is full" in err
        assert refused_http or refused_cli, (body, code, err)
        # the daemon keeps settling: memory falls, and enqueues are accepted again
        deadline = time.monotonic() + 30
        while True:
            try:
                job = await c.enqueue("blob", {})
            except RedisMemoryFull:
                assert time.monotonic() < deadline, "never accepted again"
                await asyncio.sleep(0.05)
                continue
            accepted.append(job.id)
            break
        used = int((await admin.info("memory"))["used_memory"])
        assert used <= fraction * maxmem + 65536, (used, maxmem)  # the guard cleared it

        async def settled() -> bool:
            return int(await admin.get(qk.done) or 0) >= len(accepted) and \
                not await admin.xlen(qk.stream)

        await wait_for(settled, timeout=30, what="every accepted job to settle")
        # nothing accepted was lost: each settled once, as succeeded (keep none:
        # no record; nothing dead, nothing left in the state hash)
        assert int(await admin.get(qk.done) or 0) == len(set(accepted))
        assert await admin.xlen(qk.dlq) == 0 and await admin.hlen(qk.state) == 0
        assert int(await admin.hget(qk.enqueued, "blob") or 0) == len(set(accepted))
        # Redis itself never refused a write for lack of memory
        errors = await admin.info("errorstats")
        assert not any("OOM" in k for k in errors), errors


async def test_a_memory_marker_nobody_refreshes_expires(
        make_rt: Callable[..., Any], client: Client, r: aredis.Redis, prefix: str) -> None:
    """With every daemon gone, the refusal lasts at most the marker's PX."""
    from jobqd import publish, scripts
    from jobqd.redisguard import MEM_MARK_TTL_MS

    rt = make_rt()
    await scripts.preload(rt.redis)
    await publish.publish(rt.redis, rt.config)
    qk = QueueKeys(prefix, "default")
    await r.set(qk.memfull, "95 100 0.9", px=300)
    with pytest.raises(RedisMemoryFull) as ei:
        await client.enqueue("noop", {})
    assert (ei.value.used_bytes, ei.value.max_bytes, ei.value.fraction) == (95, 100, 0.9)
    await asyncio.sleep(0.4)
    job = await client.enqueue("noop", {})
    assert job.created and MEM_MARK_TTL_MS <= 5000
    # an idempotent hit is not a new job: never refused
    await client.enqueue("noop", {}, idempotency_key="k")
    await r.set(qk.memfull, "95 100 0.9", px=5000)
    again = await client.enqueue("noop", {}, idempotency_key="k")
    assert not again.created
    entries = await r.xrange(qk.stream)
    assert [decode_job(fields_dict(f)["j"], "default").task for _, f in entries] == ["noop", "noop"]


async def test_only_new_jobs_are_refused_while_memory_is_full(
        start_daemon: Callable[..., Any], client: Client, r: aredis.Redis,
        prefix: str) -> None:
    """While the marker stands, settles, the dead-letter queue, cancels and DLQ replays
    go on; only enqueues of new jobs are refused."""
    await start_daemon()
    qk = QueueKeys(prefix, "default")
    dies = await client.enqueue("fail_now", {"reason": "no"}, delay_s=0.5)
    later = await client.enqueue("record", {"key": f"{prefix}:k"}, delay_s=60)
    await r.set(qk.memfull, "95 100 0.9", px=30_000)
    with pytest.raises(RedisMemoryFull):
        await client.enqueue("noop", {})
    assert (await wait_status(client, dies.id, "dead")).reason == "failed"
    assert (await client.cancel(later.id)).outcome == "cancelled"
    assert await client.dlq_replay(dies.id) == dies.id  # never refused
    await wait_for(lambda: _dead_again(client, dies.id), timeout=10, what="dead again")
    with pytest.raises(RedisMemoryFull):
        await client.enqueue("noop", {})
    await r.delete(qk.memfull)
    await wait_status(client, (await client.enqueue("noop", {})).id, "succeeded")


async def _dead_again(client: Client, job_id: str) -> bool:
    return len(await client.dlq_list()) == 1 and \
        (await client.status(job_id)).status == "dead"


@pytest.mark.parametrize("can_fill", [True, False])
async def test_the_guard_reads_memory_often_only_while_it_can_fill(can_fill: bool) -> None:
    """`redisguard.run` reads INFO memory every MEM_INTERVAL_S while some master has a
    maxmemory (and the fraction is under 1), else once per INTERVAL_S, like its other
    checks: a daemon on a Redis without maxmemory does not poll five times a second."""
    from jobqd import redisguard

    calls = {"memory": 0, "check": 0}

    class Guard:
        async def check_memory(self) -> bool:
            calls["memory"] += 1
            return can_fill

        async def check(self) -> None:
            calls["check"] += 1

    stop = asyncio.Event()
    task = asyncio.create_task(redisguard.run(Guard(), stop))  # type: ignore[arg-type]
    await asyncio.sleep(2.1)
    stop.set()
    await asyncio.wait_for(task, 2)
    assert 1 <= calls["check"] <= 3, calls
    if can_fill:
        assert calls["memory"] >= 6, calls  # ~10 in 2 s
    else:
        assert calls["memory"] <= 3, calls  # ~2 in 2 s


@needs_redis_server
@pytest.mark.timeout(60)
async def test_check_memory_says_whether_memory_can_fill(
        tmp_path: Path, write_config: Callable[..., Path], prefix: str) -> None:
    """The real `Guard.check_memory` decides the cadence above: True on a Redis with a
    maxmemory (fraction under 1), False without one, and False with the fraction at 1
    (the guard off)."""
    from jobqd.channels import QueueWeights
    from jobqd.redisguard import Guard
    from jobqd.runtime import Runtime

    async def can_fill(url: str, fraction: float) -> bool:
        cfg = config.load(write_config(redis={"url": url, "prefix": prefix,
                                              "max_memory_fraction": fraction}))
        rt = Runtime(config=cfg, redis=aredis.Redis.from_url(url))
        try:
            return await Guard(rt, QueueWeights()).check_memory()
        finally:
            await rt.redis.aclose()

    with own_redis(tmp_path / "redis", "--maxmemory", "20mb",
                   "--maxmemory-policy", "noeviction") as srv:
        assert await can_fill(srv.url, 0.9) is True
        assert await can_fill(srv.url, 1.0) is False
        limitless = aredis.Redis.from_url(srv.url)
        try:
            await limitless.config_set("maxmemory", 0)
        finally:
            await limitless.aclose()
        assert await can_fill(srv.url, 0.9) is False


async def test_the_guard_loop_outlasts_redis_errors_and_keeps_its_cadence() -> None:
    """Redis failing every check (an outage) neither stops `redisguard.run` nor slows
    its memory reads (the last answer stands: here, the initial "can fill"); a bug (any
    other exception) still propagates."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from jobqd import redisguard

    calls = {"memory": 0, "check": 0}

    class Down:
        async def check_memory(self) -> bool:
            calls["memory"] += 1
            raise RedisConnectionError("connection refused")

        async def check(self) -> None:
            calls["check"] += 1
            raise RedisConnectionError("connection refused")

    stop = asyncio.Event()
    task = asyncio.create_task(redisguard.run(Down(), stop))  # type: ignore[arg-type]
    await asyncio.sleep(1.1)
    stop.set()
    await asyncio.wait_for(task, 2)
    assert calls["memory"] >= 3 and calls["check"] >= 1, calls

    class Buggy(Down):
        async def check_memory(self) -> bool:
            raise KeyError("used_memory")

    with pytest.raises(KeyError):
        await asyncio.wait_for(redisguard.run(Buggy(), asyncio.Event()), 2)  # type: ignore[arg-type]
