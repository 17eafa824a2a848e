"""Per-task limits (concurrency, rate) across daemons, against the real Redis.

Two layers: the `Limiter` itself, with one Runtime (own Redis client) per
simulated daemon; then end to end with two in-process daemons, active once the
pool calls the limiter (`Pool.limiter`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aredis

from jobqd import Client
from jobqd.config import Config, HeartbeatConfig, RateLimit, RedisConfig, TaskConfig
from jobqd.keys import GlobalKeys
from jobqd.limits import CONCURRENCY_WAIT_S, RECHECKS_S, Limiter, limited
from jobqd.runtime import Runtime

from .conftest import REDIS_URL, DaemonProcess


def _config(prefix: str, hb_s: float = 0.5) -> Config:
    return Config(path="test", redis=RedisConfig(url=REDIS_URL, prefix=prefix),
                  heartbeat=HeartbeatConfig(interval_s=hb_s, timeout_s=max(1.0, 2 * hb_s)))


def _task(name: str = "t", concurrency: int | None = None,
          rate: tuple[int, float] | None = None) -> TaskConfig:
    return TaskConfig(name=name, handler="tests.handlers:noop", concurrency=concurrency,
                      rate_limit=RateLimit(*rate) if rate else None)


@pytest.fixture
async def daemons(prefix: str) -> AsyncIterator[Callable[..., Limiter]]:
    """daemons(hb_s=...) -> a Limiter on its own Runtime and Redis client."""
    made: list[Limiter] = []

    def make(hb_s: float = 0.5, url: str = REDIS_URL) -> Limiter:
        rt = Runtime(config=_config(prefix, hb_s), redis=aredis.Redis.from_url(url))
        lim = Limiter(rt)
        made.append(lim)
        return lim

    yield make
    for lim in made:
        await lim.close(5)
        await lim.rt.redis.aclose()


async def _redis_ms(r: aredis.Redis) -> float:
    sec, usec = await r.time()
    return sec * 1000 + usec / 1000


# ---------------------------------------------------------------- the Limiter


async def test_unlimited_task_costs_no_round_trip(daemons: Callable[..., Limiter]) -> None:
    lim = daemons(url="redis://127.0.0.1:1/0")  # nothing listens there: any I/O would fail
    t = _task()
    assert not limited(t)
    assert await lim.acquire(t, "j1") is None
    lim.release(t, "j1")
    assert lim.held == {} and await lim.renew() == 0


@pytest.mark.redis62
async def test_concurrency_is_global_across_two_daemons(daemons: Callable[..., Limiter],
                                                        prefix: str, r: aredis.Redis) -> None:
    a, b = daemons(), daemons()
    t = _task(concurrency=3)
    ids = [f"j{i}" for i in range(12)]
    waits = await asyncio.gather(*((a if i % 2 else b).acquire(t, j) for i, j in enumerate(ids)))
    granted = [j for j, w in zip(ids, waits, strict=True) if w is None]
    assert len(granted) == 3
    # 9 waiting: their retry-afters spread them over ~9 / RECHECKS_S[0] s, at least 50 ms
    assert all(CONCURRENCY_WAIT_S[0] <= w <= 1.5 * 9 / RECHECKS_S[0] for w in waits if w)
    running = GlobalKeys(prefix).task_running("t")
    assert await r.zcard(running) == 3
    assert 0 < await r.pttl(running) <= 1500  # 3 heartbeats: the key cannot outlive a lease
    assert sum(len(v) for v in a.held.values()) + sum(len(v) for v in b.held.values()) == 3

    # a freed slot is taken by a job on the other daemon
    owner = a if any(granted[0] in v for v in a.held.values()) else b
    other = b if owner is a else a
    waiting = [j for j in ids if j not in granted]
    assert await other.acquire(t, waiting[0]) is not None
    owner.release(t, granted[0])
    await owner.flush()
    assert await other.acquire(t, waiting[0]) is None
    assert await other.acquire(t, waiting[1]) is not None
    assert await r.zcard(running) == 3


async def test_a_backlog_rechecks_at_a_bounded_rate(daemons: Callable[..., Limiter],
                                                  prefix: str, r: aredis.Redis) -> None:
    """300 jobs wait for one slot: together they re-check ~RECHECKS_S[0] times a second
    (not 300 / 0.15 s), and a freed slot is still taken quickly."""
    a, b = daemons(), daemons()
    t = _task(concurrency=1)
    assert await a.acquire(t, "holder") is None
    calls: list[float] = []
    got: list[float] = []
    released = asyncio.Event()

    async def job(n: int) -> None:
        lim = a if n % 2 else b
        while True:
            calls.append(time.monotonic())
            wait = await lim.acquire(t, f"j{n}")
            if wait is None:
                got.append(time.monotonic())
                return
            assert 0 < wait <= 30
            if released.is_set():
                return
            await asyncio.sleep(wait)

    async def renew() -> None:  # the holder's daemon is alive
        while True:
            await a.renew()
            await asyncio.sleep(0.2)

    renewer = asyncio.create_task(renew())
    t0 = time.monotonic()
    jobs = [asyncio.create_task(job(n)) for n in range(300)]
    await asyncio.sleep(3.0)
    steady = [c for c in calls if c > t0 + 1.0]  # past the arrival burst
    assert len(steady) < 2 * 2.0 * RECHECKS_S[0] + 20, len(steady)  # ~40 in 2 s
    waiting = GlobalKeys(prefix).task_waiting("t")
    assert 280 <= await r.zcard(waiting) <= 300
    assert not got
    t1 = time.monotonic()
    a.release(t, "holder")
    await a.flush()
    while not got:
        assert time.monotonic() - t1 < 1.0, "a freed slot was not taken within 1 s"
        await asyncio.sleep(0.01)
    released.set()
    for j in [*jobs, renewer]:
        j.cancel()
    await asyncio.gather(*jobs, renewer, return_exceptions=True)
    assert await r.zcard(waiting) <= 299  # the job that got the slot waits no more


async def test_release_is_sent_on_flush_and_close(daemons: Callable[..., Limiter], prefix: str,
                                                  r: aredis.Redis) -> None:
    lim = daemons()
    t = _task(concurrency=50)
    for i in range(20):
        assert await lim.acquire(t, f"j{i}") is None
    for i in range(20):
        lim.release(t, f"j{i}")  # never blocks; batched in the background
    lim.release(t, "never-acquired")  # harmless
    await lim.close(5)
    assert await r.zcard(GlobalKeys(prefix).task_running("t")) == 0
    assert lim.held == {}


async def test_rerun_before_release_is_sent_keeps_its_slot(daemons: Callable[..., Limiter],
                                                           prefix: str, r: aredis.Redis) -> None:
    lim = daemons()
    t = _task(concurrency=1)
    assert await lim.acquire(t, "j") is None
    lim.release(t, "j")  # e.g. a retry with a tiny backoff comes straight back
    assert await lim.acquire(t, "j") is None
    await lim.flush()
    assert await r.zrange(GlobalKeys(prefix).task_running("t"), 0, -1) == [b"j"]
    assert lim.held == {"t": {"j"}}


@pytest.mark.redis62
async def test_slots_of_a_dead_daemon_expire_with_their_lease(daemons: Callable[..., Limiter]
                                                              ) -> None:
    dead, alive = daemons(hb_s=0.1), daemons(hb_s=0.1)  # lease: 3 x 0.1 s
    t = _task(concurrency=2)
    assert await dead.acquire(t, "a") is None
    assert await dead.acquire(t, "b") is None
    t0 = time.monotonic()
    assert await alive.acquire(t, "c") is not None
    # `dead` never renews nor releases: within the lease (plus slack) the slots are free
    while await alive.acquire(t, "c") is not None:
        assert time.monotonic() - t0 < 2.0, "slot of a dead holder never freed"
        await asyncio.sleep(0.02)
    assert time.monotonic() - t0 >= 0.2
    # both slots are freed ("b" was taken a round trip after "a": its lease ends a bit later)
    while await alive.acquire(t, "d") is not None:
        assert time.monotonic() - t0 < 2.0, "second slot of a dead holder never freed"
        await asyncio.sleep(0.02)
    assert await alive.acquire(t, "e") is not None  # and the cap holds again


async def test_renewed_slots_do_not_expire(daemons: Callable[..., Limiter]) -> None:
    # lease 0.9 s, renewed every ~0.05 s: a stall of the test process below ~0.8 s (a busy
    # shared machine) cannot let it expire; with 0.1 s heartbeats (lease 0.3 s) one did
    holder, other = daemons(hb_s=0.3), daemons(hb_s=0.3)
    t = _task(concurrency=1)
    assert await holder.acquire(t, "a") is None
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.8:  # two leases long
        assert await holder.renew() == 0
        assert await other.acquire(t, "b") is not None
        await asyncio.sleep(0.05)


@pytest.mark.redis62
async def test_renew_takes_back_a_lost_slot(daemons: Callable[..., Limiter], prefix: str,
                                            r: aredis.Redis) -> None:
    lim = daemons()
    t = _task(concurrency=2)
    assert await lim.acquire(t, "a") is None
    assert await lim.acquire(t, "b") is None
    running = GlobalKeys(prefix).task_running("t")
    await r.delete(running)  # e.g. Redis restarted without persistence
    assert await lim.renew() == 2
    assert await r.zcard(running) == 2  # the set counts what really runs again
    assert await lim.acquire(t, "c") is not None
    # an explicit map (task -> job ids) is renewed the same way
    await r.delete(running)
    assert await lim.renew({"t": ["a"]}) == 1


async def test_same_job_redelivered_reuses_its_slot(daemons: Callable[..., Limiter]) -> None:
    dead, alive = daemons(), daemons()
    t = _task(concurrency=1)
    assert await dead.acquire(t, "a") is None
    assert await alive.acquire(t, "b") is not None
    assert await alive.acquire(t, "a") is None  # its worker died; the reaper handed it over


async def test_token_bucket_burst_then_refill_rate(daemons: Callable[..., Limiter],
                                                   r: aredis.Redis) -> None:
    lim = daemons()
    t = _task(rate=(20, 1.0))
    burst = [await lim.acquire(t, f"b{i}") for i in range(20)]
    assert burst == [None] * 20  # the bucket starts full
    w = await lim.acquire(t, "x")
    assert w is not None and 0 < w <= 0.06  # the next token is ~50 ms away

    # two daemons, four workers each, honour the retry-after they are given
    a, b = lim, daemons()
    grants: list[float] = []
    calls = 0
    start = await _redis_ms(r)
    window_ms = 1500.0

    async def worker(lim: Limiter, n: int) -> None:
        nonlocal calls
        i = 0
        while await _redis_ms(r) - start < window_ms:
            calls += 1
            wait = await lim.acquire(t, f"w{n}-{i}")
            if wait is None:
                grants.append(await _redis_ms(r))
                i += 1
            else:
                assert wait > 0
                await asyncio.sleep(wait)

    await asyncio.gather(*(worker(a if n % 2 else b, n) for n in range(8)))
    elapsed_s = (max(grants) - start) / 1000
    assert len(grants) <= 20 * elapsed_s + 2
    assert len(grants) >= 20 * (window_ms / 1000) - 4  # ~20/s, no more, no less
    # no busy loop: refused tries are about one per worker per token, not thousands
    assert calls < 4 * len(grants) + 16


@pytest.mark.redis62
async def test_refused_jobs_are_told_successive_token_times(daemons: Callable[..., Limiter]
                                                            ) -> None:
    lim = daemons()
    t = _task(rate=(10, 1.0))  # a token per 100 ms
    for i in range(10):
        assert await lim.acquire(t, f"b{i}") is None
    waits = [await lim.acquire(t, f"w{i}") for i in range(10)]
    assert all(w is not None for w in waits)
    ws = [w for w in waits if w is not None]
    assert ws == sorted(ws) and 0 < ws[0] <= 0.11
    assert 0.8 <= ws[-1] - ws[0] <= 1.0  # spread out one token apart: no thundering herd


async def test_per_minute_rate(daemons: Callable[..., Limiter]) -> None:
    lim = daemons()
    t = _task(rate=(3, 60.0))
    assert [await lim.acquire(t, f"j{i}") for i in range(3)] == [None] * 3
    w = await lim.acquire(t, "j3")
    assert w is not None and 19 <= w <= 20.1  # 3/m: one token per 20 s


@pytest.mark.redis62
async def test_token_only_spent_when_a_slot_is_free(daemons: Callable[..., Limiter],
                                                    prefix: str, r: aredis.Redis) -> None:
    lim = daemons()
    t = _task(concurrency=1, rate=(3, 60.0))
    assert await lim.acquire(t, "a") is None
    for i in range(5):  # refused for concurrency: the bucket is untouched
        w = await lim.acquire(t, f"x{i}")
        assert w is not None and CONCURRENCY_WAIT_S[0] <= w <= 1.5 * 5 / RECHECKS_S[0]
    bucket = GlobalKeys(prefix).task_bucket("t")
    assert 2 <= float(await r.hget(bucket, "t") or 0) < 2.1
    assert 0 < await r.pttl(bucket) <= 61_000  # a full refill later the key is gone
    lim.release(t, "a")
    await lim.flush()
    assert await lim.acquire(t, "b") is None
    lim.release(t, "b")
    await lim.flush()
    assert await lim.acquire(t, "c") is None  # the last token
    lim.release(t, "c")
    await lim.flush()
    w = await lim.acquire(t, "d")  # a free slot but no token: no slot taken either
    assert w is not None and w > 15
    assert await r.zcard(GlobalKeys(prefix).task_running("t")) == 0


async def test_redis_down_defers_instead_of_raising(daemons: Callable[..., Limiter]) -> None:
    lim = daemons(url="redis://127.0.0.1:1/0")
    w = await lim.acquire(_task(concurrency=1), "j")
    assert w is not None and 1.0 <= w <= 1.5  # fail closed, no busy loop
    assert lim.held == {}
    assert await lim.renew({"t": ["j"]}) == 0  # logged, not raised


async def test_limit_keys_share_one_hash_tag(prefix: str) -> None:
    k = GlobalKeys(prefix)
    tag = "{" + prefix + ":task:send.email}"
    assert k.task_running("send.email") == tag + ":running"
    assert k.task_bucket("send.email") == tag + ":bucket"


# ---------------------------------------------------------------- end to end



def _log(raw: list[Any]) -> list[tuple[int, int, int]]:
    out = []
    for line in raw:
        n, s, e = line.decode().split("|")
        out.append((int(n), int(s), int(e)))
    return out


def _max_overlap(runs: list[tuple[int, int, int]]) -> int:
    events = sorted([(s, 1) for _, s, _ in runs] + [(e, -1) for _, _, e in runs],
                    key=lambda x: (x[0], x[1]))  # an end before a start at the same ms
    cur = peak = 0
    for _, d in events:
        cur += d
        peak = max(peak, cur)
    return peak


async def _wait_done(c: Client, ids: list[str], timeout: float) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        infos = [await c.status(i) for i in ids]
        if all(i.status == "succeeded" for i in infos):
            return infos
        if time.monotonic() > deadline:
            raise AssertionError(f"not done: {[i.status for i in infos]}")
        await asyncio.sleep(0.1)


def _tasks(**tasks: dict[str, Any]) -> dict[str, Any]:
    return {name: {"handler": "tests.handlers:limit_probe", **t} for name, t in tasks.items()}


async def test_e2e_concurrency_two_daemons(start_daemon: Callable[..., Any], client: Client,
                                           prefix: str, r: aredis.Redis) -> None:
    tasks = _tasks(capped={"concurrency": 2})
    await start_daemon(consumers=8, tasks=tasks)
    await start_daemon(consumers=8, tasks=tasks)
    key = f"{prefix}:probe"
    jobs = await client.enqueue_many("capped", [{"key": key, "sleep_s": 0.3}] * 10)
    infos = await _wait_done(client, [j.id for j in jobs], 30)
    assert all(i.attempts == 1 for i in infos)  # waiting used no attempt
    runs = _log(await r.lrange(f"{key}:log", 0, -1))
    assert len(runs) == 10
    assert _max_overlap(runs) == 2 and max(n for n, _, _ in runs) <= 2
    assert {int(v) for v in (await r.hgetall(key)).values()} == {1}
    assert await r.zcard(GlobalKeys(prefix).task_running("capped")) == 0  # all released


async def test_e2e_rate_limit_two_daemons(start_daemon: Callable[..., Any], client: Client,
                                          prefix: str, r: aredis.Redis) -> None:
    tasks = _tasks(paced={"rate_limit": "10/s"})
    await start_daemon(consumers=8, tasks=tasks)
    await start_daemon(consumers=8, tasks=tasks)
    key = f"{prefix}:probe"
    jobs = await client.enqueue_many("paced", [{"key": key}] * 30)
    infos = await _wait_done(client, [j.id for j in jobs], 30)
    assert all(i.attempts == 1 for i in infos)
    starts = sorted(s for _, s, _ in _log(await r.lrange(f"{key}:log", 0, -1)))
    assert len(starts) == 30
    assert starts[-1] - starts[0] >= 1800  # a burst of 10, then 20 more at 10/s: ~2 s
    for i, s in enumerate(starts):  # no window of 1 s holds more than burst + refill
        assert sum(1 for x in starts[i:] if x < s + 1000) <= 21


async def test_e2e_limited_task_does_not_block_others(start_daemon: Callable[..., Any],
                                                      client: Client, prefix: str,
                                                      r: aredis.Redis) -> None:
    tasks = _tasks(capped={"concurrency": 1})
    await start_daemon(consumers=8, tasks=tasks)
    await start_daemon(consumers=8, tasks=tasks)
    key = f"{prefix}:probe"
    t0 = time.monotonic()
    await client.enqueue_many("capped", [{"key": key, "sleep_s": 0.2}] * 50)  # >= 10 s of work
    free = await client.enqueue_many("record", [{"key": f"{prefix}:free"}] * 50)
    await _wait_done(client, [j.id for j in free], 5)
    assert time.monotonic() - t0 < 5
    assert await r.hlen(f"{prefix}:free") == 50
    runs = _log(await r.lrange(f"{key}:log", 0, -1))
    assert len(runs) < 50 and _max_overlap(runs) <= 1


async def test_e2e_slot_renewed_while_running_and_freed_after_kill9(
        write_config: Callable[..., Path], spawn: Callable[[Path], DaemonProcess],
        daemons: Callable[..., Limiter], client: Client, prefix: str,
        r: aredis.Redis) -> None:
    cfg = write_config(consumers=2, tasks=_tasks(capped={"concurrency": 1}),
                       heartbeat={"interval_s": 0.2, "timeout_s": 1})  # lease 0.6 s
    d = spawn(cfg)
    d.wait_ready(prefix)
    key = f"{prefix}:probe"
    await client.enqueue("capped", {"key": key, "sleep_s": 60})
    running = GlobalKeys(prefix).task_running("capped")
    deadline = time.monotonic() + 10
    while not await r.zcard(running):
        assert time.monotonic() < deadline, d.log()
        await asyncio.sleep(0.02)
    rows: list[Any] = await r.zrange(running, 0, -1, withscores=True)
    first = float(rows[0][1])
    await asyncio.sleep(1.0)  # longer than the lease: it must have been renewed
    rows = await r.zrange(running, 0, -1, withscores=True)
    assert len(rows) == 1
    later = float(rows[0][1])
    assert later > first and later > await _redis_ms(r)
    other = daemons(hb_s=0.2)
    assert await other.acquire(_task("capped", concurrency=1), "someone-else") is not None
    d.kill()
    t0 = time.monotonic()
    while await other.acquire(_task("capped", concurrency=1), "someone-else") is not None:
        assert time.monotonic() - t0 < 3, "the slot of a killed daemon was not freed"
        await asyncio.sleep(0.05)
