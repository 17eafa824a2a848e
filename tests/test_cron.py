"""Schedules (cron): one job per tick across daemons and crashes, misfire, DST, reload."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import orjson
import pytest
import redis
import redis.asyncio as aredis

from jobqd import config, cron, publish, schedules
from jobqd.cli import main
from jobqd.config import ScheduleConfig
from jobqd.errors import ConfigError
from jobqd.exitcodes import ExitCode
from jobqd.keys import GlobalKeys, QueueKeys
from jobqd.runtime import Runtime
from jobqd.schedules import State, next_tick, plan, prev_tick

from .conftest import wait_for

BERLIN = ZoneInfo("Europe/Berlin")
MIN = "redis:\n  url: redis://127.0.0.1:6379/0\n"
TASKS = "tasks:\n  hello: {handler: 'jobqd.examples:hello'}\n"


def ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


def sc(**kw: Any) -> ScheduleConfig:
    kw.setdefault("name", "s")
    kw.setdefault("task", "hello")
    kw.setdefault("queue", "default")
    return ScheduleConfig(**kw)


# ---------------------------------------------------------------- tick math (pure)


def test_dst_spring_forward_berlin() -> None:
    """02:30 does not exist on 2026-03-29 in Berlin: the job runs once, at 03:00 CEST
    (the instant after the jump), and the next day at 02:30 CEST again."""
    s = sc(cron="30 2 * * *", timezone="Europe/Berlin")
    t = next_tick(s, ms(datetime(2026, 3, 29, 0, 0, tzinfo=BERLIN)))
    assert datetime.fromtimestamp(t / 1000, BERLIN) == datetime(2026, 3, 29, 3, 0, tzinfo=BERLIN)
    t2 = next_tick(s, t)
    assert datetime.fromtimestamp(t2 / 1000, BERLIN) == datetime(2026, 3, 30, 2, 30,
                                                                 tzinfo=BERLIN)
    hourly = sc(cron="0 * * * *", timezone="Europe/Berlin")  # 01:00 CET, then 03:00 CEST
    a = next_tick(hourly, ms(datetime(2026, 3, 29, 0, 30, tzinfo=BERLIN)))
    b = next_tick(hourly, a)
    assert b - a == 3600_000  # one real hour apart, though the wall clock says two


def test_dst_fall_back_berlin() -> None:
    """02:30 happens twice on 2026-10-25 in Berlin: the job runs once."""
    s = sc(cron="30 2 * * *", timezone="Europe/Berlin")
    t = next_tick(s, ms(datetime(2026, 10, 25, 0, 0, tzinfo=BERLIN)))
    t2 = next_tick(s, t)
    assert t2 - t == 25 * 3600_000  # the next one is the next day (a 25-hour day)
    assert datetime.fromtimestamp(t2 / 1000, BERLIN).day == 26
    # the same expression in UTC is 24 hours apart: the zone is honoured
    u = sc(cron="30 2 * * *")
    tu = next_tick(u, ms(datetime(2026, 10, 25, 0, 0, tzinfo=BERLIN)))
    assert next_tick(u, tu) - tu == 24 * 3600_000


def test_six_fields_have_seconds_first_and_prev_tick() -> None:
    s = sc(cron="*/20 * * * * *")
    base = ms(datetime(2026, 1, 1, 0, 0, 0, tzinfo=ZoneInfo("UTC")))
    assert next_tick(s, base) == base + 20_000
    assert prev_tick(s, base) == base  # at or before
    assert prev_tick(s, base + 19_999) == base
    e = sc(every_s=5)
    assert next_tick(e, 12_345) == 15_000 and prev_tick(e, 12_345) == 10_000
    assert next_tick(e, 15_000) == 20_000 and prev_tick(e, 15_000) == 15_000


def test_plan_on_time_skip_and_once() -> None:
    s = sc(every_s=1)
    spec = schedules.spec_of(s)
    # on time: the one new tick
    p = plan(s, State(10_000, spec), 11_005)
    assert [(f.tick_ms, f.key) for f in p.fires] == [(11_000, "sched:s:11000")]
    assert p.through_ms == 11_000 and p.next_ms == 12_000 and p.due_ms == 11_000
    # nothing new
    assert plan(s, State(11_000, spec), 11_900).fires == []
    # 10 s down, skip: only the ticks within the grace fire; the rest are skipped
    p = plan(s, State(10_000, spec), 20_500)
    assert [f.tick_ms for f in p.fires] == [19_000, 20_000] and p.through_ms == 20_000
    # once: one more job for all the missed ticks, keyed by the last tick handled
    o = sc(every_s=1, misfire="once")
    p = plan(o, State(10_000, spec), 20_500)
    assert [f.key for f in p.fires] == ["sched:s:catchup:10000", "sched:s:19000",
                                        "sched:s:20000"]
    # daemons evaluating a moment apart agree on the catch-up key
    assert plan(o, State(10_000, spec), 20_900).fires[0].key == "sched:s:catchup:10000"
    # a new schedule, or a changed expression, has no misfires: only the grace window
    assert [f.tick_ms for f in plan(o, None, 20_500).fires] == [19_000, 20_000]
    assert [f.tick_ms for f in plan(o, State(10_000, "every:60"), 20_500).fires] == [
        19_000, 20_000]


def test_jitter_is_deterministic_and_bounded() -> None:
    s = sc(every_s=60, jitter_s=30)
    offsets = [schedules.jitter_s(s, t * 60_000) for t in range(200)]
    assert all(0 <= o < 30 for o in offsets)
    assert offsets == [schedules.jitter_s(s, t * 60_000) for t in range(200)]
    assert len(set(offsets)) > 150  # spread, not one value
    assert schedules.jitter_s(sc(every_s=60), 60_000) == 0.0


# ---------------------------------------------------------------- config


def cfg_err(tmp_path: Path, text: str) -> ConfigError:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as ei:
        config.load(p)
    assert str(p) in str(ei.value)
    return ei.value


def test_bad_cron_expression_is_a_config_error_with_key_and_line(tmp_path: Path) -> None:
    e = cfg_err(tmp_path, MIN + TASKS + "schedules:\n  nightly:\n    task: hello\n"
                "    cron: '61 * * * *'\n")
    assert e.key == "schedules.nightly.cron" and e.line == 8
    assert "61 * * * *" in str(e) and "line 8" in str(e)
    e = cfg_err(tmp_path, MIN + TASKS + "schedules:\n  n:\n    task: hello\n"
                "    cron: '* * *'\n")
    assert e.key == "schedules.n.cron" and "5 fields" in str(e)


@pytest.mark.parametrize(("body", "key", "words"), [
    ("task: hello\n    cron: '* * * * *'\n    timezone: Mars/Olympus", "schedules.n.timezone",
     "unknown time zone"),
    ("task: hello\n    cron: '* * * * *'\n    every_s: 5", "schedules.n", "exactly one"),
    ("task: hello", "schedules.n", "exactly one"),
    ("task: nope\n    every_s: 5", "schedules.n.task", "not declared"),
    ("task: hello\n    every_s: 0.5", "schedules.n.every_s", ">= 1"),
    ("task: hello\n    every_s: 5\n    misfire: twice", "schedules.n.misfire", "skip or once"),
    ("task: hello\n    every_s: 5\n    queue: nope", "schedules.n.queue", "not declared"),
    ("task: hello\n    every_s: 5\n    args: [1]", "schedules.n.args", "mapping"),
    ("task: hello\n    every_s: 5\n    jitter_s: -1", "schedules.n.jitter_s", ">= 0"),
    ("task: hello\n    every_s: 5\n    bogus: 1", "schedules.n.bogus", "unknown key"),
])
def test_bad_schedule_values(tmp_path: Path, body: str, key: str, words: str) -> None:
    e = cfg_err(tmp_path, MIN + TASKS + "schedules:\n  n:\n    " + body + "\n")
    assert e.key == key and words in str(e), str(e)


def test_schedule_defaults(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(MIN + "queues: {default: {}, bulk: {}}\n"
                 "tasks:\n  hello: {handler: 'jobqd.examples:hello', queue: bulk}\n"
                 "schedules:\n  n: {task: hello, cron: '0 3 * * *', args: {name: x}}\n")
    s = config.load(p).schedules["n"]
    assert (s.queue, s.timezone, s.misfire, s.jitter_s, s.enabled) == (
        "bulk", "UTC", "skip", 0.0, True)  # the task's queue by default
    assert dict(s.args) == {"name": "x"}


# ---------------------------------------------------------------- against Redis


def tick_keys(sync_r: redis.Redis, prefix: str, name: str,
              queue: str = "default") -> dict[str, str]:
    """idempotency key suffix (tick ms, or catchup:<ms>) -> job id, for one schedule."""
    qk = QueueKeys(prefix, queue)
    head = qk.idem(f"sched:{name}:")
    out = {}
    for k in sync_r.scan_iter(match=head.replace("[", "\\[") + "*", count=1000):
        out[k.decode()[len(head):]] = sync_r.get(k).decode()  # type: ignore[union-attr]
    return out


def ticks(keys: dict[str, str]) -> list[int]:
    return sorted(int(k) for k in keys if k.isdigit())


async def test_racing_daemons_make_one_job_per_tick(
        make_rt: Callable[..., Runtime], sync_r: redis.Redis, prefix: str) -> None:
    """Three daemons' schedule loops turning at the same moments: one job per tick, and
    jobqd_schedule_runs_total counts only the jobs each one really created."""
    over = {"schedules": {"beat": {"task": "noop", "every_s": 1}}}
    rts = [make_rt(**over) for _ in range(3)]
    await publish.publish(rts[0].redis, rts[0].config)
    crons = [cron.Cron(rt) for rt in rts]
    deadline = time.monotonic() + 3.5
    while time.monotonic() < deadline:
        await asyncio.gather(*(c.turn() for c in crons))
        await asyncio.sleep(0.1)
    keys = tick_keys(sync_r, prefix, "beat")
    t = ticks(keys)
    assert len(t) >= 4 and t == list(range(t[0], t[-1] + 1000, 1000))  # no gap
    assert len(set(keys.values())) == len(keys)  # one job per tick
    qk = QueueKeys(prefix, "default")
    assert sync_r.xlen(qk.stream) == len(keys)  # and no other job exists
    created = sum(rt.metrics.schedule_runs.labels("beat")._value.get() for rt in rts)
    assert created == len(keys)
    raw = sync_r.hget(GlobalKeys(prefix).schedules, "beat")
    st = State.decode(raw)
    assert st is not None and st.job_tick_ms == t[-1] and st.job == keys[str(t[-1])]
    last = rts[0].metrics.schedule_last_run.labels("beat")._value.get()
    assert last * 1000 in t


@pytest.mark.redis62
async def test_a_daemon_dying_between_enqueue_and_mark_makes_no_duplicate(
        make_rt: Callable[..., Runtime], sync_r: redis.Redis, prefix: str,
        client: Any) -> None:
    """A daemon made the tick's job and died before marking the tick handled: the
    next daemon gets the same job back; a disabled schedule never fires."""
    rt = make_rt(schedules={"beat": {"task": "noop", "every_s": 1},
                            "off": {"task": "noop", "every_s": 1, "enabled": False}})
    await publish.publish(rt.redis, rt.config)
    c = cron.Cron(rt)
    await c.turn()
    now = await schedules.redis_now_ms(rt.redis)
    nxt = next_tick(rt.config.schedules["beat"], now)
    ghost = await client.enqueue("noop", {}, idempotency_key=f"sched:beat:{nxt}")
    await asyncio.sleep((nxt - now) / 1000 + 0.05)
    await c.turn()
    keys = tick_keys(sync_r, prefix, "beat")
    assert keys[str(nxt)] == ghost.id
    assert sync_r.xlen(QueueKeys(prefix, "default").stream) == len(keys)
    assert rt.metrics.schedule_runs.labels("beat")._value.get() == len(keys) - 1
    st = State.decode(sync_r.hget(GlobalKeys(prefix).schedules, "beat"))
    assert st is not None and st.tick_ms >= nxt
    assert tick_keys(sync_r, prefix, "off") == {}
    assert sync_r.hget(GlobalKeys(prefix).schedules, "off") is None


async def test_jitter_delays_the_job(make_rt: Callable[..., Runtime], sync_r: redis.Redis,
                                     prefix: str) -> None:
    rt = make_rt(schedules={"j": {"task": "noop", "every_s": 1, "jitter_s": 30}})
    await publish.publish(rt.redis, rt.config)
    c = cron.Cron(rt)
    await c.turn()
    keys = tick_keys(sync_r, prefix, "j")
    assert keys
    qk = QueueKeys(prefix, "default")
    for tick, job_id in keys.items():
        due = sync_r.zscore(qk.delayed, job_id)
        assert due is not None  # scheduled, not queued
        want = int(tick) + schedules.jitter_s(rt.config.schedules["j"], int(tick)) * 1000
        assert abs(due - want) < 1500  # the same offset every daemon derives


async def test_misfire_skip_vs_once_after_downtime(start_daemon: Callable[..., Any],
                                                   sync_r: redis.Redis, prefix: str) -> None:
    """Both schedules run, every daemon stops for ~5 s, a daemon starts again: `skip`
    made no job for the missed ticks, `once` made exactly one for all of them."""
    over = {"schedules": {"skipper": {"task": "noop", "every_s": 1},
                          "oncer": {"task": "noop", "every_s": 1, "misfire": "once"}}}
    d = await start_daemon(**over)
    await wait_for(lambda: _has_ticks(sync_r, prefix, 2), timeout=10)
    await d.stop()
    before = {n: ticks(tick_keys(sync_r, prefix, n))[-1] for n in ("skipper", "oncer")}
    handled = {n: State.decode(sync_r.hget(GlobalKeys(prefix).schedules, n))
               for n in ("skipper", "oncer")}
    await asyncio.sleep(5.5)
    restart_ms = _redis_ms(sync_r)
    d2 = await start_daemon(**over)
    await wait_for(lambda: _has_ticks_after(sync_r, prefix, restart_ms + 1000), timeout=10)
    await d2.stop()
    for name in ("skipper", "oncer"):
        keys = tick_keys(sync_r, prefix, name)
        after = [t for t in ticks(keys) if t > before[name]]
        gap = after[0] - before[name]
        assert gap >= 3000, (name, gap)  # ticks in between were missed...
        assert after[0] >= restart_ms - schedules.GRACE_MS  # ...on-time ticks resumed
        catchups = [k for k in keys if k.startswith("catchup:")]
        if name == "skipper":
            assert catchups == []  # ...and skipped
        else:
            st = handled[name]
            assert st is not None
            assert catchups == [f"catchup:{st.tick_ms}"]  # ...or made one job
            info = sync_r.hget(QueueKeys(prefix, "default").state, keys[catchups[0]])
            assert info is not None or _finished(sync_r, prefix, keys[catchups[0]])


def _finished(sync_r: redis.Redis, prefix: str, job_id: str) -> bool:
    return bool(sync_r.exists(QueueKeys(prefix, "default").result(job_id)))


def _redis_ms(sync_r: redis.Redis) -> int:
    sec, usec = sync_r.time()
    return int(sec) * 1000 + int(usec) // 1000


async def _has_ticks(sync_r: redis.Redis, prefix: str, n: int) -> bool:
    return all(len(ticks(tick_keys(sync_r, prefix, name))) >= n
               for name in ("skipper", "oncer"))


async def _has_ticks_after(sync_r: redis.Redis, prefix: str, at_ms: int) -> bool:
    return all(any(t > at_ms for t in ticks(tick_keys(sync_r, prefix, name)))
               for name in ("skipper", "oncer"))


async def test_reload_adds_and_removes_schedules(start_daemon: Callable[..., Any],
                                                 write_config: Callable[..., Path],
                                                 sync_r: redis.Redis, prefix: str) -> None:
    d = await start_daemon(schedules={"old": {"task": "noop", "every_s": 1}})

    async def n_ticks(name: str, n: int) -> bool:
        return len(ticks(tick_keys(sync_r, prefix, name))) >= n

    await wait_for(lambda: n_ticks("old", 2), timeout=10)
    rt = d.daemon.rt
    rt.swap_config(config.load(write_config(
        schedules={"new": {"task": "noop", "every_s": 1}})))
    swapped_ms = _redis_ms(sync_r)
    await wait_for(lambda: n_ticks("new", 3), timeout=10)
    await asyncio.sleep(1.2)
    assert all(t <= swapped_ms for t in ticks(tick_keys(sync_r, prefix, "old")))  # never again
    new = ticks(tick_keys(sync_r, prefix, "new"))
    assert new[0] >= swapped_ms - schedules.GRACE_MS  # fired from the reload on
    m = rt.metrics.exposition().decode()
    assert 'jobqd_schedule_last_run_timestamp_seconds{schedule="new"}' in m
    assert 'jobqd_schedule_last_run_timestamp_seconds{schedule="old"}' not in m
    assert 'jobqd_schedule_due_timestamp_seconds{schedule="old"}' not in m


async def test_schedules_cli_and_http(start_daemon: Callable[..., Any],
                                      write_config: Callable[..., Path], sync_r: redis.Redis,
                                      prefix: str, capsys: pytest.CaptureFixture[str]) -> None:
    over = {"schedules": {"beat": {"task": "noop", "every_s": 1},
                          "nightly": {"task": "noop", "cron": "0 3 * * *",
                                      "timezone": "Europe/Berlin", "enabled": False}}}
    d = await start_daemon(**over)
    await wait_for(lambda: _any_tick(sync_r, prefix), timeout=10)
    host, port = d.daemon.http_address
    async with aiohttp.ClientSession() as s, s.get(f"http://{host}:{port}/v1/schedules") as resp:
        assert resp.status == 200
        body = await resp.json()
    rows = {row["name"]: row for row in body["schedules"]}
    beat = rows["beat"]
    assert beat["expression"] == "every 1s" and beat["task"] == "noop"
    assert beat["last_job_id"] and beat["last_job_status"] in (
        "queued", "running", "succeeded", "scheduled")
    assert beat["next_run"] > beat["last_run"]
    assert rows["nightly"]["next_run"] is None and rows["nightly"]["timezone"] == "Europe/Berlin"
    path = write_config(**over)
    assert await asyncio.to_thread(main, ["-c", str(path), "schedules", "--json"]) == 0
    out = orjson.loads(capsys.readouterr().out)
    assert {row["name"] for row in out["schedules"]} == {"beat", "nightly"}
    assert await asyncio.to_thread(main, ["-c", str(path), "schedules"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^beat\s+noop\s+every 1s\s+UTC\s+\d{4}-", text, re.M), text
    assert re.search(r"^nightly\s+noop\s+0 3 \* \* \*\s+Europe/Berlin\s+disabled", text, re.M)


async def _any_tick(sync_r: redis.Redis, prefix: str) -> bool:
    return bool(tick_keys(sync_r, prefix, "beat"))


# ---------------------------------------------------------------- crash: subprocess daemons


def test_three_daemons_one_killed_exactly_one_job_per_tick(
        spawn: Callable[[Path], Any], write_config: Callable[..., Path], sync_r: redis.Redis,
        prefix: str) -> None:
    """Three daemons run an every_s: 1 schedule for ~15 s; one is kill -9'd 1 ms after a
    tick (~4 s in) and restarted 5 s later, then all three run on for the rest. Every tick
    has exactly one job, with no gap, and every job ran."""
    path = write_config(schedules={"beat": {"task": "record", "every_s": 1,
                                            "args": {"key": f"{prefix}:runs"}}},
                        log={"level": "WARNING"})
    daemons = [spawn(path) for _ in range(3)]
    for dp in daemons:
        dp.wait_ready(prefix)
    started = time.monotonic()
    time.sleep(3.5)
    now_ms = _redis_ms(sync_r)
    time.sleep((1000 - now_ms % 1000 + 1) / 1000)  # 1 ms after a tick, on the Redis clock
    daemons[0].kill()  # kill -9, whatever it was doing at the tick
    time.sleep(5)
    daemons.append(spawn(path))
    daemons[-1].wait_ready(prefix)
    time.sleep(max(0.0, 15 - (time.monotonic() - started)))
    for dp in daemons[1:]:
        dp.signal(signal.SIGTERM)
    for dp in daemons[1:]:
        assert dp.wait(30) == ExitCode.OK, dp.log()
    keys = tick_keys(sync_r, prefix, "beat")
    t = ticks(keys)
    assert len(t) >= 12, t
    assert t == list(range(t[0], t[-1] + 1000, 1000))  # no gap while a daemon lived
    jobs = set(keys.values())
    assert len(jobs) == len(t) and len(keys) == len(t)  # one job per tick, no catch-ups
    ran = {k.decode() for k in sync_r.hkeys(f"{prefix}:runs")}
    waiting = {k.decode() for k in sync_r.hkeys(QueueKeys(prefix, "default").state)}
    assert ran | waiting == jobs  # no other job exists: each one ran or still waits
    assert len(ran) >= len(jobs) - 3  # and the daemons ran them as they came


async def test_redis_errors_do_not_crash_the_loop(make_rt: Callable[..., Runtime]) -> None:
    """A Redis that is down makes the loop back off; a stop ends it promptly."""
    rt = make_rt(schedules={"beat": {"task": "noop", "every_s": 1}})
    await rt.redis.aclose()
    rt.redis = aredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    stop = asyncio.Event()
    task = asyncio.create_task(cron.run(rt, stop))
    await asyncio.sleep(0.5)
    assert not task.done()
    stop.set()
    await asyncio.wait_for(task, 5)
