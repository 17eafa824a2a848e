"""The daemon's start-up faults that are the environment's, not a bug: a clear line
and a named exit code (see README's exit code table and systemd/jobqd.service)."""

from __future__ import annotations

import socket
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import redis.asyncio as aredis

from jobqd import scripts
from jobqd.exitcodes import ExitCode
from tests.conftest import REDIS_URL, DaemonProcess
from tests.own_redis import needs_redis_server, own_redis
from tests.proxies import RewriteProxy


def test_http_port_in_use_is_one_line_and_exit_unavailable(
        write_config: Callable[..., Path], spawn: Callable[[Path], DaemonProcess]) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        d = spawn(write_config(http={"listen": f"127.0.0.1:{port}"}))
        code = d.wait(30)
        out = d.log()
    assert code == ExitCode.UNAVAILABLE, out
    assert "Traceback" not in out, out
    lines = [ln for ln in out.splitlines() if f"127.0.0.1:{port}" in ln]
    assert len(lines) == 1, out
    assert "in use" in lines[0], lines




def _without_struct(args: list[bytes]) -> list[bytes]:
    """The struct probe's EVALSHA becomes an EVAL of the probe with ``struct`` renamed:
    Redis then answers it as a build without the library would (a script error naming
    the missing global); every other command passes unchanged."""
    if args[:2] != [b"EVALSHA", scripts.STRUCT_PROBE.sha.encode()]:
        return args
    body = scripts.STRUCT_PROBE.source.replace("struct.", "nostruct.").encode()
    return [b"EVAL", body, *args[2:]]


def _redis_port() -> int:
    return urllib.parse.urlsplit(REDIS_URL).port or 6379


async def test_lua_check_passes_on_this_redis(r: aredis.Redis) -> None:
    assert await scripts.check_lua(r) is None


@needs_redis_server
async def test_lua_check_after_preload_is_one_round_trip(tmp_path: Path) -> None:
    """The daemon preloads every script, the struct probe with them, before it checks:
    on a fresh Redis (an empty script cache, a server of the test's own, so its command
    counts are this test's alone) the check is one EVALSHA, with no NOSCRIPT and
    SCRIPT LOAD first."""
    with own_redis(tmp_path / "redis") as srv:
        r = aredis.Redis.from_url(srv.url)
        try:
            await scripts.preload(r)

            async def calls() -> dict[str, int]:
                stats = await r.info("commandstats")
                return {c: int(stats.get(f"cmdstat_{c}", {"calls": 0})["calls"])
                        for c in ("evalsha", "script|load", "script")}

            before = await calls()
            assert await scripts.check_lua(r) is None
            after = await calls()
        finally:
            await r.aclose()
    assert after["evalsha"] - before["evalsha"] == 1, (before, after)
    assert after["script|load"] == before["script|load"], (before, after)
    assert after["script"] == before["script"], (before, after)


async def test_lua_check_names_the_missing_struct_library() -> None:
    proxy = RewriteProxy(_redis_port(), _without_struct)
    r = aredis.Redis.from_url(proxy.url)
    try:
        problem = await scripts.check_lua(r)
    finally:
        await r.aclose()
        proxy.close()
    assert proxy.rewritten == 1
    assert problem is not None and "struct" in problem
    assert "nonexistent global variable 'nostruct'" in problem, problem


@pytest.mark.timeout(60)
def test_redis_without_lua_struct_is_one_line_and_exit_unavailable(
        write_config: Callable[..., Path], spawn: Callable[[Path], DaemonProcess],
        prefix: str) -> None:
    """A Redis whose Lua lacks ``struct`` would refuse every settle (complete.lua): the
    daemon refuses to start, before it publishes anything. The environment lacks what
    jobqd needs (like a missing redis-server for redis.url: embedded): 69."""
    proxy = RewriteProxy(_redis_port(), _without_struct)
    try:
        d = spawn(write_config(redis={"url": proxy.url, "prefix": prefix}))
        code = d.wait(30)
        out = d.log()
    finally:
        proxy.close()
    assert code == ExitCode.UNAVAILABLE, out
    assert proxy.rewritten >= 1, out
    assert "Traceback" not in out, out
    lines = [ln for ln in out.splitlines() if "refusing to run" in ln]
    assert len(lines) == 1 and "struct" in lines[0] and "nostruct" in lines[0], out
    r = redis.Redis.from_url(REDIS_URL)
    try:
        assert not r.exists(f"{prefix}:routing")
    finally:
        r.close()
