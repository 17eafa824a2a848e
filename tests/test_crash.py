"""Crashes are tested by crashing: daemons run as subprocesses and get kill -9,
SIGTERM and poison jobs; every accepted job must still end as the contract says."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from jobqd import SyncClient
from jobqd.keys import QueueKeys

from .conftest import REDIS_URL, DaemonProcess, wait_until

FAST = {"heartbeat": {"interval_s": 0.5, "timeout_s": 2},
        "reaper": {"interval_s": 0.5, "visibility_timeout_s": 30, "max_deliveries": 3}}




def runs(r: redis.Redis, key: str) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in r.hgetall(key).items()}


@pytest.mark.redis62
def test_subprocess_runs_1000_jobs_exactly_once_and_exits_0_on_sigterm(
        write_config: Callable[..., Path], spawn: Callable[[Path], DaemonProcess],
        prefix: str, sync_r: redis.Redis) -> None:
    d = spawn(write_config(consumers=32, **FAST))
    d.wait_ready(prefix)
    key = f"{prefix}:runs"
    with SyncClient(REDIS_URL, prefix) as c:
        ids = [j.id for j in c.enqueue_many("record", [{"key": key}] * 1000)]
    wait_until(lambda: sync_r.hlen(key) >= 1000, 60, "1000 jobs")
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.wait(30) == 0, d.log()
    assert time.monotonic() - t0 < 10
    done = runs(sync_r, key)
    assert set(done) == set(ids) and set(done.values()) == {1}
    assert sync_r.zcard(f"{prefix}:hb") == 0  # deregistered on the way out


@pytest.mark.redis62
def test_kill9_one_of_two_daemons_other_finishes_everything(
        write_config: Callable[..., Path], spawn: Callable[[Path], DaemonProcess],
        prefix: str, sync_r: redis.Redis) -> None:
    cfg = write_config(consumers=100, **FAST)
    a = spawn(cfg)
    a.wait_ready(prefix)
    key = f"{prefix}:runs"
    with SyncClient(REDIS_URL, prefix) as c:
        # 4 s: A must still be running them once B has started (1.5 s was less than B's
        # start under coverage on a busy machine: A finished first, nothing was reclaimed)
        ids = [j.id for j in c.enqueue_many("sleep", [{"seconds": 4, "key": key}] * 200)]
    # all 200 in flight on A (100 running, the rest waiting) before B exists
    wait_until(lambda: sync_r.hlen(key + ":started") >= 100, 20,
               "A running 100 jobs")
    # B has a consumer for every job: it runs the waiting ones and the reclaimed ones at once
    b = spawn(write_config(consumers=200, **FAST))
    b.wait_ready(prefix)
    a.kill()
    killed_at = time.monotonic()
    # recovery begins within heartbeat.timeout_s (+ one reaper interval + one beat)
    started_before = sync_r.hgetall(key + ":started")
    assert len(started_before) > sync_r.hlen(key), "A finished its jobs before the kill"

    def restarted_elsewhere() -> bool:
        now = sync_r.hgetall(key + ":started")
        return any(int(v) > int(started_before.get(k, 0)) for k, v in now.items()
                   if k in started_before)

    wait_until(restarted_elsewhere, 15, "reclaimed jobs restarting")
    recovery_s = time.monotonic() - killed_at
    assert recovery_s <= 2 + 0.5 + 0.5 + 1.0, recovery_s
    wait_until(lambda: sync_r.hlen(key) >= 200, 60, "all 200 done")
    done = runs(sync_r, key)
    assert set(done) == set(ids)
    with SyncClient(REDIS_URL, prefix) as c:
        wait_until(lambda: all(c.status(i).status == "succeeded" for i in ids), 10,
                   "every status succeeded")
    print(f"\nkill -9 with 200 in flight: recovery began after {recovery_s:.2f}s")


@pytest.mark.redis62
def test_long_job_on_healthy_daemon_runs_exactly_once(
        write_config: Callable[..., Path], spawn: Callable[[Path], DaemonProcess],
        prefix: str, sync_r: redis.Redis) -> None:
    # visibility 1.5 s, the job runs 4.5 s (3x): lease renewal must keep it ours
    cfg = write_config(consumers=4, heartbeat={"interval_s": 0.5, "timeout_s": 2},
                       reaper={"interval_s": 0.3, "visibility_timeout_s": 1.5})
    a, b = spawn(cfg), spawn(cfg)
    a.wait_ready(prefix)
    b.wait_ready(prefix)
    key = f"{prefix}:runs"
    with SyncClient(REDIS_URL, prefix) as c:
        job = c.enqueue("sleep", {"seconds": 4.5, "key": key})
        wait_until(lambda: c.status(job.id).status == "succeeded",
                   20, "the long job")
        assert c.status(job.id).lost == 0
    assert runs(sync_r, key + ":started") == {job.id: 1}
    assert runs(sync_r, key) == {job.id: 1}


def test_poison_job_dead_lettered_worker_lost_while_others_flow(
        write_config: Callable[..., Path], spawn: Callable[[Path], DaemonProcess],
        prefix: str, sync_r: redis.Redis) -> None:
    cfg = write_config(consumers=8, **FAST)
    daemons = [spawn(cfg), spawn(cfg)]
    for d in daemons:
        d.wait_ready(prefix)
    key = f"{prefix}:runs"
    with SyncClient(REDIS_URL, prefix) as c:
        poison = c.enqueue("crash", {"key": f"{prefix}:crashes"})
        deadline = time.monotonic() + 60
        good: list[str] = []
        restarts = 0
        while time.monotonic() < deadline:
            good += [j.id for j in c.enqueue_many("record", [{"key": key}] * 5)]
            for i, d in enumerate(daemons):  # a supervisor (systemd) restarts what died
                if d.proc is not None and d.proc.poll() is not None:
                    restarts += 1
                    daemons[i] = spawn(cfg)
            if c.status(poison.id).status == "dead":
                break
            time.sleep(0.2)
        info = c.status(poison.id)
        assert info.status == "dead" and info.reason == "worker_lost", info
        assert info.lost == 3
        assert int(sync_r.hget(f"{prefix}:crashes", poison.id) or 0) == 3
        assert restarts >= 2
        wait_until(lambda: set(good) <= set(runs(sync_r, key)), 30,
                   "the other jobs")
        dead = c.dlq_list()
        assert [d.ref for d in dead] == [poison.id]


def test_sigterm_short_job_finishes_long_job_handed_back(
        write_config: Callable[..., Path], spawn: Callable[[Path], DaemonProcess],
        prefix: str, sync_r: redis.Redis) -> None:
    cfg = write_config(consumers=4, shutdown={"drain_timeout_s": 1.5, "handback_timeout_s": 3},
                       **FAST)
    a = spawn(cfg)
    a.wait_ready(prefix)
    key = f"{prefix}:runs"
    with SyncClient(REDIS_URL, prefix) as c:
        short = c.enqueue("sleep", {"seconds": 0.5, "key": key})
        long = c.enqueue("sleep", {"seconds": 4, "key": key})
        wait_until(lambda: sync_r.hlen(key + ":started") == 2, 10,
                   "both running")
        t0 = time.monotonic()
        a.signal(signal.SIGTERM)
        time.sleep(1.2)  # mid-drain: the long job still runs; heartbeats go on to the end
        beat_ms = sync_r.zscore(f"{prefix}:hb", next(
            n for n in sync_r.zrange(f"{prefix}:hb", 0, -1) if f":{a.pid}:" in n.decode()))
        sec, usec = sync_r.time()
        assert beat_ms is not None and sec * 1000 + usec // 1000 - beat_ms < 1000
        code = a.wait(20)
        elapsed = time.monotonic() - t0
        assert code == 0, a.log()
        assert elapsed < 1.5 + 3 + 1.5, elapsed
        assert c.status(short.id).status == "succeeded"
        info = c.status(long.id)
        assert info.status == "queued" and info.attempts == 0, info  # back, no attempt used
        b = spawn(cfg)
        b.wait_ready(prefix)
        wait_until(lambda: c.status(long.id).status == "succeeded",
                   15, "the long job elsewhere")
        assert c.status(long.id).attempts == 1
    assert runs(sync_r, key) == {short.id: 1, long.id: 1}


@pytest.mark.redis62
def test_sigterm_hands_back_fetched_but_unstarted_jobs_at_once(
        write_config: Callable[..., Path], spawn: Callable[[Path], DaemonProcess],
        prefix: str, sync_r: redis.Redis) -> None:
    cfg = write_config(consumers=2, shutdown={"drain_timeout_s": 10, "handback_timeout_s": 3},
                       **FAST)
    a = spawn(cfg)
    a.wait_ready(prefix)
    key = f"{prefix}:runs"
    with SyncClient(REDIS_URL, prefix) as c:
        jobs = c.enqueue_many("sleep", [{"seconds": 1.0, "key": key}] * 2)
        wait_until(lambda: sync_r.hlen(key + ":started") == 2, 10,
                   "two running")
        rest = c.enqueue_many("record", [{"key": key}] * 20)  # waiting in the stream
        a.signal(signal.SIGTERM)
        assert a.wait(20) == 0, a.log()
        assert all(c.status(j.id).status == "succeeded" for j in jobs)
        statuses = {c.status(j.id).status for j in rest}
        assert statuses <= {"queued", "succeeded"}
        qk = QueueKeys(prefix, "default")
        assert sync_r.xpending(qk.stream, "jobqd")["pending"] == 0  # nothing left held


def test_second_sigterm_forces_exit_and_jobs_are_recovered(
        write_config: Callable[..., Path], spawn: Callable[[Path], DaemonProcess],
        prefix: str, sync_r: redis.Redis) -> None:
    cfg = write_config(consumers=2, shutdown={"drain_timeout_s": 30, "handback_timeout_s": 3},
                       **FAST)
    a = spawn(cfg)
    a.wait_ready(prefix)
    key = f"{prefix}:runs"
    with SyncClient(REDIS_URL, prefix) as c:
        job = c.enqueue("sleep", {"seconds": 3, "key": key})
        wait_until(lambda: sync_r.hlen(key + ":started") == 1, 10,
                   "running")
        a.signal(signal.SIGTERM)
        time.sleep(0.3)
        t0 = time.monotonic()
        a.signal(signal.SIGINT)
        code = a.wait(10)
        assert time.monotonic() - t0 < 3
        assert code == 2, a.log()  # ExitCode.FORCED
        b = spawn(cfg)
        b.wait_ready(prefix)
        wait_until(lambda: c.status(job.id).status == "succeeded",
                   20, "the job, recovered by the reaper")


def test_config_error_exit_code(tmp_path: Path, spawn: Callable[[Path], DaemonProcess]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("redis:\n  url: redis://127.0.0.1:6379\nconsumerz: 3\n")
    d = spawn(bad)
    assert d.wait(20) == 78
    assert "consumerz" in d.log() and "line 3" in d.log()


def test_cannot_connect_exit_code(write_config: Callable[..., Any],
                                  spawn: Callable[[Path], DaemonProcess],
                                  monkeypatch: Any) -> None:
    cfg = write_config(redis={"url": "redis://127.0.0.1:1/0"})
    monkeypatch.setenv("JOBQD_CONNECT_TIMEOUT_S", "1")
    d = spawn(cfg)
    assert d.wait(40) == 69
    assert "cannot connect to redis" in d.log()


def test_killed_reaper_does_not_delay_its_own_recovery_by_its_lock(
        write_config: Callable[..., Path], spawn: Callable[[Path], DaemonProcess],
        prefix: str, sync_r: redis.Redis) -> None:
    # reaper.interval_s 3: the lock lives 9 s; heartbeat.timeout_s 2 says dead sooner
    cfg = write_config(consumers=8, heartbeat={"interval_s": 0.5, "timeout_s": 2},
                       reaper={"interval_s": 3, "visibility_timeout_s": 60})
    a = spawn(cfg)
    a.wait_ready(prefix)
    wait_until(lambda: sync_r.get(f"{prefix}:reaper:lock") is not None, 10, "A is the reaper")
    b = spawn(cfg)
    b.wait_ready(prefix)
    key = f"{prefix}:runs"
    with SyncClient(REDIS_URL, prefix) as c:
        ids = [j.id for j in c.enqueue_many("sleep", [{"seconds": 30, "key": key}] * 4)]
        wait_until(lambda: sync_r.hlen(key + ":started") >= 4, 10, "jobs running")
        on_a = [i for i in ids if (c.status(i).worker or "").split(":")[1] == str(a.pid)]
        assert on_a, "no job landed on A"
        a.kill()
        killed = time.monotonic()
        wait_until(lambda: all(c.status(i).lost == 1 for i in on_a), 15, "A's jobs reclaimed")
        took = time.monotonic() - killed
    assert took < 2 + 3 + 1.5, took  # timeout + one round, not the 9 s lock
    assert sync_r.get(f"{prefix}:reaper:lock").decode().split(":")[1] == str(b.pid)
