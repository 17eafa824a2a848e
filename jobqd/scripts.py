"""Every Lua script, and the Redis plumbing written once.

* Scripts live in ``jobqd/lua/`` (documented in docs/architecture.md), are loaded
  once (`preload`) and called by SHA. After a Redis restart empties the script
  cache, a NOSCRIPT reply reloads them and the call is retried once: `Script`
  for a single call (async and sync), `pipelined` for many in one round trip.
* `ensure_group`: create a stream's consumer group (and the stream) unless it
  exists.
* `check_lua`: the daemon's start-up check that Redis's Lua has what the scripts
  use beyond the core language (the ``struct`` library of ``complete.lua``).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis
import redis.asyncio as aredis
from redis.exceptions import NoScriptError, ResponseError

from jobqd.connect import is_cluster, primaries
from jobqd.keys import GROUP


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: str
    sha: str

    async def __call__(self, r: aredis.Redis, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        try:
            return await r.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await r.script_load(self.source)
            return await r.evalsha(self.sha, len(keys), *keys, *args)

    def call_sync(self, r: redis.Redis, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        try:
            return r.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            r.script_load(self.source)
            return r.evalsha(self.sha, len(keys), *keys, *args)


@dataclass(frozen=True, slots=True)
class Command:
    """A plain Redis command in a pipeline."""

    args: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class ScriptCall:
    """A script call (EVALSHA) in a pipeline."""

    script: Script
    keys: Sequence[Any]
    args: Sequence[Any]


PipeCall = Command | ScriptCall


def wait_call(replicas: int, timeout_ms: int) -> Command:
    """``WAIT`` (``redis.wait_replicas``): block until `replicas` replicas acknowledged
    every write this connection sent before it, or `timeout_ms` passed; replies how
    many did. Last in a pipeline it covers the whole pipeline."""
    return Command(("WAIT", replicas, max(1, timeout_ms)))


def _queue(p: Any, c: PipeCall) -> None:
    if isinstance(c, Command):
        p.execute_command(*c.args)
    else:
        # as a raw command: a cluster pipeline refuses its evalsha() method, but routes
        # a raw EVALSHA by its keys like any other command
        p.execute_command("EVALSHA", c.script.sha, len(c.keys), *c.keys, *c.args)


def _is_wait(c: PipeCall) -> bool:
    return isinstance(c, Command) and str(c.args[0]).upper() == "WAIT"


def _again(calls: Sequence[PipeCall], todo: list[int], got: list[Any]) -> list[int]:
    """What a NOSCRIPT retry runs again: the script calls that found no script, and a
    WAIT after them (it must cover their writes, which its first run preceded)."""
    again = [i for i, x in zip(todo, got, strict=True) if isinstance(x, NoScriptError)]
    if again:
        again += [i for i in todo if i > again[0] and _is_wait(calls[i])]
    return sorted(set(again))


async def pipelined(r: aredis.Redis, calls: Sequence[PipeCall]) -> list[Any]:
    """Run commands and script calls in one pipelined round trip (not a transaction).

    NOSCRIPT-safe: when script calls find the cache empty (Redis restarted), every
    script is loaded again and only those calls are run again (the others ran: a
    second run of an enqueue would duplicate jobs), and so is a WAIT that follows them.
    Replies come back in order; an
    error reply is returned in its place (never raised), so the caller decides per
    call.
    """
    replies: list[Any] = [None] * len(calls)
    todo = list(range(len(calls)))
    for attempt in range(2):
        async with r.pipeline(transaction=False) as p:
            for i in todo:
                _queue(p, calls[i])
            got = await p.execute(raise_on_error=False)
        for i, x in zip(todo, got, strict=True):
            replies[i] = x
        todo = _again(calls, todo, got)
        if attempt == 0 and todo:
            await preload(r)
            continue
        break
    return replies


def pipelined_sync(r: redis.Redis, calls: Sequence[PipeCall]) -> list[Any]:
    """`pipelined` for a blocking client."""
    replies: list[Any] = [None] * len(calls)
    todo = list(range(len(calls)))
    for attempt in range(2):
        with r.pipeline(transaction=False) as p:
            for i in todo:
                _queue(p, calls[i])
            got = p.execute(raise_on_error=False)
        for i, x in zip(todo, got, strict=True):
            replies[i] = x
        todo = _again(calls, todo, got)
        if attempt == 0 and todo:
            preload_sync(r)
            continue
        break
    return replies


async def redis_time_ms(r: aredis.Redis, key: str) -> int:
    """The Redis clock (ms) of the server holding `key`: on a Redis Cluster each
    master has its own clock, and a stamp written by a script must be compared
    with the clock that wrote it."""
    if is_cluster(r):
        await r.initialize()  # the slot map, once
        node = r.get_node_from_key(key)  # type: ignore[attr-defined]
        sec, usec = await r.execute_command("TIME", target_nodes=node)  # type: ignore[no-untyped-call]
    else:
        sec, usec = await r.time()
    return int(sec) * 1000 + int(usec) // 1000


async def ensure_group(r: aredis.Redis, stream: str) -> None:
    """Create the consumer group (and the stream) unless the group exists."""
    try:
        await r.xgroup_create(stream, GROUP, id="0", mkstream=True)
    except ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise


def ensure_group_sync(r: redis.Redis, stream: str) -> None:
    """`ensure_group` for a blocking client."""
    try:
        r.xgroup_create(stream, GROUP, id="0", mkstream=True)
    except ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise


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
CANCEL = _load("cancel")
LIMIT_ACQUIRE = _load("limit_acquire")
LIMIT_RENEW = _load("limit_renew")
SCHED_MARK = _load("sched_mark")
# run once at start (check_lua); preloaded with the rest, so that check is one EVALSHA
STRUCT_PROBE = _load("struct_probe")
ALL = (ENQUEUE, COMPLETE, PROMOTE, STATUS, DLQ_REPLAY, DLQ_REMOVE, LOCK, HEARTBEAT,
       FORGET_CONSUMER, CANCEL, LIMIT_ACQUIRE, LIMIT_RENEW, SCHED_MARK, STRUCT_PROBE)


async def preload(r: aredis.Redis) -> None:
    """Load every script in one round trip (after connect or a Redis restart). On a
    Redis Cluster, into every master (a cluster pipeline refuses SCRIPT LOAD; the
    client sends it to all primaries), concurrently."""
    if is_cluster(r):
        await asyncio.gather(*(r.script_load(s.source) for s in ALL))
        return
    async with r.pipeline(transaction=False) as p:
        for s in ALL:
            p.script_load(s.source)
        await p.execute()


def preload_sync(r: redis.Redis) -> None:
    if is_cluster(r):
        for s in ALL:
            r.script_load(s.source)
        return
    with r.pipeline(transaction=False) as p:
        for s in ALL:
            p.script_load(s.source)
        p.execute()


async def check_lua(r: aredis.Redis) -> str | None:
    """None if Redis runs `STRUCT_PROBE` (``struct.pack``/``struct.unpack``, which
    ``complete.lua`` settles every batch with), else why not: a Redis built without
    the library would refuse every settle. Called like every other script (SCRIPT
    LOAD, EVALSHA), so it needs no permission the daemon does not need anyway. On a
    Redis Cluster, on every master. A Redis error other than a script's (a lost
    connection) is raised."""
    try:
        if is_cluster(r):
            nodes = await primaries(r)
            await r.script_load(STRUCT_PROBE.source)  # into every master
            await asyncio.gather(*(r.execute_command(  # type: ignore[no-untyped-call]
                "EVALSHA", STRUCT_PROBE.sha, 0, target_nodes=n) for n in nodes))
        else:
            await STRUCT_PROBE(r, [], [])
    except ResponseError as e:
        return (f"redis failed the start-up check of Lua's struct library (struct.pack, "
                f"struct.unpack), which complete.lua settles every job with: "
                f"{str(e).rstrip('.')}. Every official Redis build since 2.6 bundles struct; "
                f"one without it cannot settle jobs")
    return None
