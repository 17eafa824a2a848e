"""An evicting maxmemory-policy silently drops accepted jobs (issue 10): a daemon refuses
to run on such a Redis (exit 78, a message naming the policy and the key to set)
unless redis.allow_eviction is true; a running daemon that finds the policy changed
stops consuming and says ``redis_eviction`` in /readyz until it is fixed. Every test
runs its own redis-server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
import redis.asyncio as aredis

from jobqd import Client, redisguard
from jobqd.exitcodes import ExitCode

from .conftest import DaemonProcess, wait_for, wait_status
from .own_redis import OwnRedis, free_port, needs_redis_server, own_redis

pytestmark = needs_redis_server


def wait_ready_on(srv: OwnRedis, d: DaemonProcess, prefix: str, timeout: float = 20) -> None:
    r = srv.client()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            assert d.proc is not None
            if d.proc.poll() is not None:
                raise AssertionError(f"daemon exited {d.proc.returncode}:\n{d.log()}")
            if any(f":{d.pid}:" in n.decode() for n in r.zrange(f"{prefix}:hb", 0, -1)):
                return
            time.sleep(0.05)
    finally:
        r.close()
    raise AssertionError(f"daemon not ready in {timeout}s:\n{d.log()}")


async def test_policy_is_read_from_info_when_config_is_renamed(tmp_path: Path) -> None:
    with own_redis(tmp_path / "r", "--maxmemory-policy", "allkeys-lru",
                   "--rename-command", "CONFIG", "") as srv:
        r = aredis.Redis.from_url(srv.url)
        try:
            with pytest.raises(redis.ResponseError):
                await r.config_get("maxmemory-policy")
            assert await redisguard.read_policy(r) == "allkeys-lru"
        finally:
            await r.aclose()


@pytest.mark.timeout(60)
def test_evicting_redis_daemon_refuses_to_run_exit_78(
        tmp_path: Path, write_config: Callable[..., Path],
        spawn: Callable[[Path], DaemonProcess], prefix: str) -> None:
    with own_redis(tmp_path / "r", "--maxmemory-policy", "allkeys-lru") as srv:
        d = spawn(write_config(redis={"url": srv.url, "prefix": prefix}))
        assert d.wait(30) == ExitCode.CONFIG == 78, d.log()
        text = d.log()
        assert "maxmemory-policy allkeys-lru" in text, text
        assert "noeviction" in text and "redis.allow_eviction: true" in text, text
        # it refused before publishing anything
        r = srv.client()
        try:
            assert not r.exists(f"{prefix}:routing")
        finally:
            r.close()


@pytest.mark.timeout(90)
def test_allow_eviction_runs_and_reports_the_policy(
        tmp_path: Path, write_config: Callable[..., Path],
        spawn: Callable[[Path], DaemonProcess], prefix: str) -> None:
    port = free_port()
    with own_redis(tmp_path / "r", "--maxmemory-policy", "allkeys-lru") as srv:
        d = spawn(write_config(redis={"url": srv.url, "prefix": prefix,
                                      "allow_eviction": True},
                               http={"listen": f"127.0.0.1:{port}"}))
        wait_ready_on(srv, d, prefix)

        async def check() -> None:
            async with Client(srv.url, prefix) as c:
                job = await c.enqueue("noop", {})
                await wait_status(c, job.id, "succeeded")
            async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as s:
                async with s.get("/readyz") as resp:
                    body = await resp.json()
                assert body["redis"]["maxmemory_policy"] == "allkeys-lru", body
                assert body["redis"]["eviction_ok"] is True
                assert "redis_eviction" not in body["problems"]
                async with s.get("/metrics") as resp:
                    text = await resp.text()
                assert "jobqd_redis_eviction_policy_ok 1.0" in text

        asyncio.run(check())
        assert "allow_eviction is set" in d.log()


async def test_policy_changed_while_running_pauses_consuming(
        tmp_path: Path, start_daemon: Callable[..., Any], prefix: str) -> None:
    with own_redis(tmp_path / "r") as srv:  # noeviction: the default
        d = await start_daemon(redis={"url": srv.url, "prefix": prefix})
        host, port = d.daemon.http_address
        admin = srv.client()
        async with Client(srv.url, prefix) as c, \
                aiohttp.ClientSession(f"http://{host}:{port}") as s:
            first = await c.enqueue("noop", {})
            await wait_status(c, first.id, "succeeded")

            async def readyz() -> tuple[int, dict[str, Any]]:
                async with s.get("/readyz") as resp:
                    return resp.status, await resp.json()

            admin.config_set("maxmemory-policy", "allkeys-lru")

            async def says_eviction() -> bool:
                status, body = await readyz()
                return status == 503 and "redis_eviction" in body["problems"]

            await wait_for(says_eviction, timeout=10, what="/readyz to say redis_eviction")
            _, body = await readyz()
            assert body["redis"]["maxmemory_policy"] == "allkeys-lru"
            async with s.get("/metrics") as resp:
                assert "jobqd_redis_eviction_policy_ok 0.0" in await resp.text()
            # a blocking fetch already waiting (up to 2 s, pool.BLOCK_MS) may return once
            await asyncio.sleep(2.5)
            paused = await c.enqueue("noop", {})
            await asyncio.sleep(3)
            assert (await c.status(paused.id)).status == "queued"  # not consumed
            # fixed: consuming resumes, /readyz is happy again
            admin.config_set("maxmemory-policy", "noeviction")
            await wait_status(c, paused.id, "succeeded")

            async def ready() -> bool:
                return (await readyz())[0] == 200

            await wait_for(ready, timeout=10, what="/readyz 200 again")
        admin.close()
