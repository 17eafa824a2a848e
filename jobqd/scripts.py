"""Lua scripts, loaded once and called by SHA (EVALSHA), reloaded on NOSCRIPT.

The scripts live in ``jobqd/lua/`` and are documented in docs/architecture.md.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis
import redis.asyncio as aredis
from redis.exceptions import NoScriptError


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: str
    sha: str

    async def __call__(self, r: aredis.Redis, keys: list[str], args: list[Any]) -> Any:
        try:
            return await r.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await r.script_load(self.source)
            return await r.evalsha(self.sha, len(keys), *keys, *args)

    def call_sync(self, r: redis.Redis, keys: list[str], args: list[Any]) -> Any:
        try:
            return r.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            r.script_load(self.source)
            return r.evalsha(self.sha, len(keys), *keys, *args)


def _load(name: str) -> Script:
    source = resources.files("jobqd").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")
    return Script(name=name, source=source, sha=hashlib.sha1(source.encode()).hexdigest())


ENQUEUE = _load("enqueue")
COMPLETE = _load("complete")
PROMOTE = _load("promote")
STATUS = _load("status")
DLQ_REPLAY = _load("dlq_replay")
DLQ_REMOVE = _load("dlq_remove")
LOCK = _load("lock")
HEARTBEAT = _load("heartbeat")
FORGET_CONSUMER = _load("forget_consumer")
ALL = (ENQUEUE, COMPLETE, PROMOTE, STATUS, DLQ_REPLAY, DLQ_REMOVE, LOCK, HEARTBEAT,
       FORGET_CONSUMER)


async def preload(r: aredis.Redis) -> None:
    """Load every script in one round trip (after connect or a Redis restart)."""
    async with r.pipeline(transaction=False) as p:
        for s in ALL:
            p.script_load(s.source)
        await p.execute()
