"""Redis at maxmemory with noeviction refuses writes with "OOM command not allowed".
That is its own error everywhere (issue 10): RedisOutOfMemory from the Python
clients, HTTP 507 with a body that says so, CLI exit 75, /readyz ``redis_oom`` while
this daemon's last write was refused; and a batch refused part-way says exactly
which jobs were accepted (checked against the stream), so retrying the rest runs
nothing twice. Each test runs its own redis-server (maxmemory 2mb)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aredis

from jobqd import (
    Client,
    JobqdError,
    RedisMemoryFull,
    RedisOutOfMemory,
    SyncClient,
    config,
    publish,
    scripts,
)
from jobqd.cli import main
from jobqd.exitcodes import ExitCode
from jobqd.jobs import decode_job
from jobqd.keys import QueueKeys
from jobqd.ops import fields_dict
from jobqd.runtime import Runtime

from .own_redis import OwnRedis, needs_redis_server, own_redis
from .test_http import api, post_job

pytestmark = needs_redis_server

BLOB = "x" * 600  # ~0.7 KB a job: 2,000 of them do not fit in 2 MB


@pytest.fixture
def full_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    with own_redis(tmp_path / "redis", "--maxmemory", "2mb",
                   "--maxmemory-policy", "noeviction") as srv:
        yield srv


@pytest.fixture
async def rt_on(full_redis: OwnRedis, write_config: Callable[..., Path],
                prefix: str) -> Any:
    rt = Runtime(config=config.load(write_config(redis={"url": full_redis.url,
                                                        "prefix": prefix})),
                 redis=aredis.Redis.from_url(full_redis.url))
    await scripts.preload(rt.redis)
    await publish.publish(rt.redis, rt.config)
    yield rt
    await rt.redis.aclose()


async def fill(srv: OwnRedis, prefix: str) -> RedisOutOfMemory:
    """Put Redis firmly over maxmemory: 500 jobs, then maxmemory set 200 KB below the
    memory in use (this server is the test's own), so a connection's buffers coming and
    going cannot let a write through. Returns the refusal of a single enqueue."""
    async with Client(srv.url, prefix) as c:
        with contextlib.suppress(RedisOutOfMemory):  # already full: fine
            await c.enqueue_many("noop", [{"blob": BLOB}] * 500)
        r = srv.client()
        try:
            used = int(r.info("memory")["used_memory"])
            r.config_set("maxmemory", used - 200_000)
        finally:
            r.close()
        try:
            await c.enqueue("noop", {"blob": BLOB})
        except RedisOutOfMemory as e:
            return e
    raise AssertionError("redis accepted a job over maxmemory")


async def stream_ids(r: aredis.Redis, prefix: str) -> list[str]:
    entries = await r.xrange(QueueKeys(prefix, "default").stream)
    return [decode_job(fields_dict(f)["j"], "default").id for _, f in entries]


async def test_enqueue_many_refused_part_way_reports_exactly_the_accepted(
        rt_on: Runtime, full_redis: OwnRedis, prefix: str) -> None:
    async with Client(full_redis.url, prefix) as c:
        with pytest.raises(RedisOutOfMemory) as ei:
            await c.enqueue_many("noop", [{"blob": BLOB, "i": i} for i in range(2000)])
        err = ei.value
        assert isinstance(err, JobqdError) and "out of memory" in str(err)
        accepted = [j.id for j in err.accepted]
        assert 0 < len(accepted) < 2000, len(accepted)  # refused part-way (500-job chunks)
        in_stream = await stream_ids(rt_on.redis, prefix)
        assert sorted(in_stream) == sorted(accepted)
        # nothing of a refused chunk was written: the state hash holds the accepted only
        assert await rt_on.redis.hlen(QueueKeys(prefix, "default").state) == len(accepted)
    # a single enqueue gets the same error, with nothing accepted
    one = await fill(full_redis, prefix)
    assert list(one.accepted) == []
    accepted_before = await stream_ids(rt_on.redis, prefix)
    with SyncClient(full_redis.url, prefix) as sc, pytest.raises(RedisOutOfMemory):
        sc.enqueue_many("noop", [{"blob": BLOB}] * 600)
    assert await stream_ids(rt_on.redis, prefix) == accepted_before


async def test_http_answers_507_and_readyz_says_redis_oom(
        rt_on: Runtime, full_redis: OwnRedis, prefix: str) -> None:
    await fill(full_redis, prefix)
    async with api(rt_on) as s:
        status, body = await post_job(s, {"task": "noop", "args": {"blob": BLOB}})
        assert status == 507, body
        assert "redis is out of memory" in body["error"] and body["reason"] == "redis_oom"
        async with s.get("/readyz") as resp:
            ready = await resp.json()
        assert resp.status == 503 and "redis_oom" in ready["problems"], ready
        assert ready["redis"]["oom"] is True
        # memory freed: the next write goes through and /readyz stops saying redis_oom
        await rt_on.redis.delete(QueueKeys(prefix, "default").stream,
                                 QueueKeys(prefix, "default").state)
        status, body = await post_job(s, {"task": "noop", "args": {}})
        assert status == 202, body
        async with s.get("/readyz") as resp:
            ready = await resp.json()
        assert "redis_oom" not in ready["problems"], ready


async def test_cli_exits_75_with_a_clear_message(
        rt_on: Runtime, full_redis: OwnRedis, prefix: str, write_config: Callable[..., Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    await fill(full_redis, prefix)
    cfg = write_config(redis={"url": full_redis.url, "prefix": prefix})
    code = await asyncio.to_thread(main, ["-c", str(cfg), "enqueue", "noop", '{"a": 1}'])
    _, err = capsys.readouterr()
    assert code == ExitCode.REDIS_OOM == 75, err
    assert "redis is out of memory" in err and "cannot reach redis" not in err
    # a command outside the producer ops (raw redis-py errors) maps the same way
    code = await asyncio.to_thread(main, ["-c", str(cfg), "publish"])
    _, err = capsys.readouterr()
    assert code == ExitCode.REDIS_OOM and "out of memory" in err, err


async def test_running_daemon_reports_oom_and_carries_on(
        tmp_path: Path, start_daemon: Callable[..., Any], prefix: str) -> None:
    """The daemon's own probe write finds Redis full: /readyz says redis_oom (and the
    metric is 1) while it lasts, no component crashes, and all is well once memory is
    freed."""
    import aiohttp

    from .conftest import wait_for, wait_status

    with own_redis(tmp_path / "r2") as srv:  # noeviction, no maxmemory yet
        d = await start_daemon(redis={"url": srv.url, "prefix": prefix})
        host, port = d.daemon.http_address
        admin = srv.client()
        async with Client(srv.url, prefix) as c, \
                aiohttp.ClientSession(f"http://{host}:{port}") as s:
            await c.enqueue_many("sleep", [{"seconds": 0.5}] * 20)

            async def problems() -> list[str]:
                async with s.get("/readyz") as resp:
                    return list((await resp.json())["problems"])

            used = int(admin.info("memory")["used_memory"])
            admin.config_set("maxmemory", used - 200_000)
            await wait_for(lambda: _has(problems, "redis_oom"), timeout=10,
                           what="/readyz to say redis_oom")
            async with s.get("/metrics") as resp:
                assert "jobqd_redis_oom 1.0" in await resp.text()
            with pytest.raises(RedisOutOfMemory):
                await c.enqueue("noop", {})
            await asyncio.sleep(2)
            assert d.task is not None and not d.task.done()  # nothing crashed
            assert d.daemon.rt is not None and d.daemon.rt.health.crashed is None
            admin.config_set("maxmemory", 0)
            await wait_for(lambda: _lacks(problems, "redis_oom"), timeout=10,
                           what="/readyz to stop saying redis_oom")
            # the memory guard (redis.max_memory_fraction) reads INFO on its own tick
            # and may refuse an enqueue a moment longer: RedisMemoryFull says retry
            accepted: list[Any] = []

            async def enqueued() -> bool:
                with contextlib.suppress(RedisMemoryFull):
                    accepted.append(await c.enqueue("noop", {}))
                return bool(accepted)

            await wait_for(enqueued, timeout=10, what="enqueues to be accepted again")
            await wait_status(c, accepted[0].id, "succeeded")
        admin.close()


async def _has(get: Callable[[], Any], name: str) -> bool:
    return name in await get()


async def _lacks(get: Callable[[], Any], name: str) -> bool:
    return name not in await get()
