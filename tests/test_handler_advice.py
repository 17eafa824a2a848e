"""README's advice to handler authors on redis-py's `socket_timeout` rests on how the
installed redis-py behaves: these fail when an upgrade changes it, so the advice (and its
measured numbers) is revisited."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import redis.asyncio as aredis

from .conftest import REDIS_URL

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


async def _tasks_per_command(r: aredis.Redis, key: str, n: int = 200) -> float:
    loop = asyncio.get_running_loop()
    made = 0

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
        nonlocal made
        made += 1
        return asyncio.Task(coro, loop=loop, **kw)

    await r.incr(key)  # connected
    loop.set_task_factory(factory)
    try:
        for _ in range(n):
            await r.incr(key)
    finally:
        loop.set_task_factory(None)
    return made / n


async def test_from_url_defaults_to_a_5s_socket_timeout() -> None:
    assert "5 s `socket_timeout`" in README
    r = aredis.Redis.from_url(REDIS_URL)
    try:
        assert r.connection_pool.make_connection().socket_timeout == 5
    finally:
        await r.aclose()


async def test_a_task_per_command_only_with_a_socket_timeout(prefix: str) -> None:
    assert "socket_timeout=None" in README and "Python 3.12+ makes no Task" in README
    key = f"{prefix}:advice"
    default = aredis.Redis.from_url(REDIS_URL)
    untimed = aredis.Redis.from_url(REDIS_URL, socket_timeout=None)
    try:
        with_timeout = await _tasks_per_command(default, key)
        without = await _tasks_per_command(untimed, key)
    finally:
        await default.aclose()
        await untimed.aclose()
    assert without == 0
    assert with_timeout == (1 if sys.version_info < (3, 12) else 0)
