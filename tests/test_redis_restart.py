"""Redis outages are tested by restarting Redis: a private redis-server with AOF
(appendfsync always) that the test owns, on its own port and directory, stopped
with SHUTDOWN or kill -9 and started again on the same port and dir while a
daemon subprocess runs jobs. Run counts go to the shared test Redis (never
restarted), so they survive the private one's restart."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from jobqd import SyncClient
from jobqd.keys import GROUP, QueueKeys

from .conftest import REDIS_URL, DaemonProcess, wait_until
from .proxies import BlackholeProxy

FAST = {"heartbeat": {"interval_s": 0.5, "timeout_s": 2},
        "reaper": {"interval_s": 0.5, "visibility_timeout_s": 30, "max_deliveries": 10}}
DOWN_S = 2.0  # how long Redis stays down

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="redis-server is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """A redis-server with AOF that the test starts, stops and restarts (same port, dir)."""

    def __init__(self, dir_: Path, port: int | None = None) -> None:
        self.dir = dir_
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout: float = 10.0) -> float:
        """Start and wait until it answers PING; returns the monotonic time it did."""
        assert self.proc is None or self.proc.poll() is not None
        self.starts += 1
        with open(self.dir / f"redis-{self.starts}.log", "wb") as out:
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                 "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.dir),
                 "--save", "", "--protected-mode", "no"],
                stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited {self.proc.returncode}: {self.log()}")
            c = redis.Redis(port=self.port, socket_connect_timeout=0.5, socket_timeout=1)
            try:
                if c.ping():
                    return time.monotonic()
            except redis.RedisError:  # refused, or LOADING the AOF
                pass
            finally:
                c.close()
            time.sleep(0.02)
        raise RuntimeError(f"redis-server not up in {timeout}s: {self.log()}")

    def shutdown(self) -> None:
        """SHUTDOWN: graceful, the AOF is flushed."""
        assert self.proc is not None
        c = redis.Redis(port=self.port, socket_timeout=5, retry=Retry(NoBackoff(), 0))
        try:
            with contextlib.suppress(redis.ConnectionError):
                c.shutdown()
        finally:
            c.close()
        self.proc.wait(10)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)

    def log(self) -> str:
        return (self.dir / f"redis-{self.starts}.log").read_text(errors="replace")[-3000:]

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    d = tmp_path / "redis"
    d.mkdir()
    pr = PrivateRedis(d)
    pr.start()
    yield pr
    pr.close()


def wait_ready_on(pr: PrivateRedis, d: DaemonProcess, prefix: str, timeout: float = 20) -> None:
    """DaemonProcess.wait_ready, but reading heartbeats from the private Redis."""
    r = pr.client()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            assert d.proc is not None
            if d.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {d.proc.returncode}:\n{d.log()}")
            names = [n.decode() for n in r.zrange(f"{prefix}:hb", 0, -1)]
            if any(f":{d.pid}:" in n for n in names):
                return
            time.sleep(0.05)
    finally:
        r.close()
    raise RuntimeError(f"daemon not ready in {timeout}s:\n{d.log()}")




def runs(r: redis.Redis, key: str) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in r.hgetall(key).items()}


class Producer(threading.Thread):
    """Enqueues a batch every `period` s until stopped; a batch that fails (Redis
    down) is retried with its own bounded loop. Accepted = enqueue_many returned."""

    def __init__(self, url: str, prefix: str, key: str, *, batch: int = 5,
                 period: float = 0.1, retry_for_s: float = 30.0) -> None:
        super().__init__(name="producer", daemon=True)
        self.url, self.prefix, self.key = url, prefix, key
        self.batch, self.period, self.retry_for_s = batch, period, retry_for_s
        self.accepted: list[tuple[float, str]] = []  # (monotonic time accepted, job id)
        self.failures = 0
        self.error: BaseException | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        c = SyncClient(self.url, self.prefix,
                       redis_client=redis.Redis.from_url(self.url, socket_timeout=2,
                                                         socket_connect_timeout=1))
        try:
            while not self.halt.is_set():
                deadline = time.monotonic() + self.retry_for_s
                while True:
                    try:
                        jobs = c.enqueue_many("record", [{"key": self.key, "sleep_s": 0.05}]
                                              * self.batch)
                        break
                    except redis.RedisError:
                        self.failures += 1
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.1)
                now = time.monotonic()
                self.accepted += [(now, j.id) for j in jobs]
                self.halt.wait(self.period)
        except BaseException as e:  # reported by the test
            self.error = e
        finally:
            c.redis.close()


def _restart_mid_run(how: str, pr: PrivateRedis, write_config: Callable[..., Path],
                     spawn: Callable[[Path], DaemonProcess], prefix: str,
                     sync_r: redis.Redis) -> dict[str, Any]:
    cfg = write_config(redis={"url": pr.url, "prefix": prefix}, consumers=16, **FAST)
    d = spawn(cfg)
    wait_ready_on(pr, d, prefix)
    key = f"{prefix}:runs"
    qk = QueueKeys(prefix, "default")
    with SyncClient(pr.url, prefix) as c:
        # before: 8 long jobs (3 s) certainly running when Redis goes away, and
        # 400 short ones (0.1 s) flowing through the other 8 consumers
        before = [j.id for j in c.enqueue_many("sleep", [{"seconds": 3, "key": key}] * 8)]
        before += [j.id for j in c.enqueue_many("record", [{"key": key, "sleep_s": 0.1}] * 400)]
    wait_until(lambda: sync_r.hlen(key + ":started") >= 8 and sync_r.hlen(key) >= 40, 15,
               "long jobs running and short ones flowing")
    producer = Producer(pr.url, prefix, key)
    producer.start()
    try:
        time.sleep(0.3)
        done_before = sync_r.hlen(key)
        down_at = time.monotonic()
        if how == "shutdown":
            pr.shutdown()
        else:
            pr.kill9()
        time.sleep(DOWN_S)
        assert d.proc is not None and d.proc.poll() is None, d.log()
        up_at = pr.start()
        print(f"\n[{how}] redis down {up_at - down_at:.2f}s; {done_before}/408 run before")
        rr = pr.client()
        try:
            # first job settled (COMPLETE.lua) after the restart: the done counter moves
            n0 = int(rr.get(qk.done) or 0)
            first_s = wait_until(lambda: int(rr.get(qk.done) or 0) > n0, 30,
                                 "a job settled after the restart")
            # after: jobs enqueued once Redis is back must run (still consuming)
            with SyncClient(pr.url, prefix) as c:
                after = [j.id for j in c.enqueue_many("record", [{"key": key}] * 50)]
                after_s = wait_until(
                    lambda: all(c.status(i).status == "succeeded" for i in after), 30,
                    "jobs enqueued after the restart")
        finally:
            rr.close()
        time.sleep(0.5)
    finally:
        producer.halt.set()
        producer.join(40)
    assert producer.error is None, repr(producer.error)
    accepted = [i for _, i in producer.accepted]
    during = [i for t, i in producer.accepted if down_at <= t <= up_at + 1]
    print(f"[{how}] producer: {len(accepted)} accepted, {producer.failures} failed tries, "
          f"{len(during)} accepted while down or just after")
    everything = before + after + accepted
    with SyncClient(pr.url, prefix) as c:
        wait_until(lambda: all(c.status(i).status == "succeeded" for i in everything), 60,
                   "every accepted job succeeded")
        assert c.dlq_list() == []
    counted = {**runs(sync_r, key), **runs(sync_r, key + ":started")}
    assert set(everything) <= set(counted)
    dup = {i: n for i, n in counted.items() if n > 1}
    rr = pr.client()
    try:
        assert rr.xpending(qk.stream, GROUP)["pending"] == 0
    finally:
        rr.close()
    # the daemon lived through it, said so, and did not crash
    assert d.proc is not None and d.proc.poll() is None, d.log()
    log_text = d.log_path.read_text(errors="replace")
    assert "crashed" not in log_text and "Traceback" not in log_text, log_text[-4000:]
    assert any(w in log_text for w in ("fetch failed", "ack flush failed",
                                       "cannot reach redis", "cannot write heartbeat")), log_text
    warnings = sum(1 for line in log_text.splitlines() if "WARNING" in line or "warning" in line)
    d.signal(signal.SIGTERM)
    assert d.wait(30) == 0, d.log()
    print(f"[{how}] first job settled {first_s:.2f}s after redis was back; jobs enqueued "
          f"after the restart all done {after_s:.2f}s later; {len(everything)} jobs, "
          f"{len(dup)} ran twice {sorted(dup.values())[:10]}; {warnings} warning lines")
    return {"first_s": first_s, "dup": dup, "log": log_text}


@pytest.mark.timeout(150)
def test_redis_shutdown_and_restart_mid_run_every_job_completes(
        private_redis: PrivateRedis, write_config: Callable[..., Path],
        spawn: Callable[[Path], DaemonProcess], prefix: str, sync_r: redis.Redis) -> None:
    out = _restart_mid_run("shutdown", private_redis, write_config, spawn, prefix, sync_r)
    # SHUTDOWN flushed the AOF and the only daemon kept its jobs: nothing runs twice
    assert out["dup"] == {}
    assert out["first_s"] < 10


@pytest.mark.timeout(150)
def test_redis_kill9_and_restart_mid_run_every_accepted_job_completes(
        private_redis: PrivateRedis, write_config: Callable[..., Path],
        spawn: Callable[[Path], DaemonProcess], prefix: str, sync_r: redis.Redis) -> None:
    out = _restart_mid_run("kill9", private_redis, write_config, spawn, prefix, sync_r)
    assert out["first_s"] < 10


@pytest.mark.timeout(120)
def test_outage_longer_than_heartbeat_timeout_does_not_reclaim_live_workers(
        private_redis: PrivateRedis, write_config: Callable[..., Path],
        spawn: Callable[[Path], DaemonProcess], prefix: str, sync_r: redis.Redis) -> None:
    """Two live daemons, Redis down 2.5 s (> heartbeat.timeout_s 2 s). A reconnects at
    once; B gets through 1 s after Redis is back (well within timeout_s: a slower
    backoff, a DNS lookup). B never died, so the reaper (A) must not take B's running
    jobs: they finish once, with lost == 0. Without the fix this reproduces every time."""
    pr = private_redis
    proxy = BlackholeProxy(pr.port)
    try:
        cfg_a = write_config(redis={"url": pr.url, "prefix": prefix}, consumers=8, **FAST)
        a = spawn(cfg_a)
        wait_ready_on(pr, a, prefix)  # A first: A holds the reaper lock
        key = f"{prefix}:runs"
        with SyncClient(pr.url, prefix) as c:
            ids = [j.id for j in c.enqueue_many("sleep", [{"seconds": 8, "key": key}] * 8)]
            wait_until(lambda: sync_r.hlen(key + ":started") >= 8, 15, "8 jobs on A")
            cfg_b = write_config(redis={"url": f"redis://127.0.0.1:{proxy.port}/0",
                                        "prefix": prefix}, consumers=8, **FAST)
            b = spawn(cfg_b)
            wait_ready_on(pr, b, prefix)
            ids += [j.id for j in c.enqueue_many("sleep", [{"seconds": 8, "key": key}] * 8)]
            wait_until(lambda: sync_r.hlen(key + ":started") >= 16, 15, "8 jobs on B")
        proxy.gated.set()
        pr.shutdown()
        time.sleep(2.5)
        pr.start()
        time.sleep(1.0)
        proxy.gated.clear()
        with SyncClient(pr.url, prefix) as c:
            wait_until(lambda: all(c.status(i).status == "succeeded" for i in ids), 40,
                       "the 16 jobs")
            lost = {i: c.status(i).lost for i in ids}
        started = runs(sync_r, key + ":started")
        twice = {i: n for i, n in started.items() if n > 1}
        print(f"\noutage 2.5s > heartbeat timeout: {len(twice)}/16 jobs of live daemons "
              f"started again; lost counts {sorted(lost.values())}")
        for d in (a, b):
            assert d.proc is not None and d.proc.poll() is None, d.log()
        assert twice == {} and set(lost.values()) == {0}, (twice, lost)
    finally:
        proxy.close()


def _blackhole_run(write_config: Callable[..., Path], spawn: Callable[[Path], DaemonProcess],
                   prefix: str, sync_r: redis.Redis, all_within: float = 45
                   ) -> tuple[float, float]:
    """Blackhole the daemon's connections while its fetcher blocks in XREADGROUP, then
    enqueue 20 jobs; returns (s until the first of them succeeded, s until all did)."""
    target = redis.Redis.from_url(REDIS_URL)
    port = int(target.connection_pool.connection_kwargs.get("port", 6379))
    target.close()
    proxy = BlackholeProxy(port)
    d: DaemonProcess | None = None
    try:
        cfg = write_config(redis={"url": f"redis://127.0.0.1:{proxy.port}/0",
                                  "prefix": prefix}, consumers=4, **FAST)
        d = spawn(cfg)
        d.wait_ready(prefix)
        key = f"{prefix}:runs"
        with SyncClient(REDIS_URL, prefix) as c:
            first = [j.id for j in c.enqueue_many("record", [{"key": key}] * 20)]
            wait_until(lambda: set(first) <= set(runs(sync_r, key)), 15, "jobs before")
            time.sleep(1.0)  # the fetcher now blocks in XREADGROUP on a pooled connection
            n = proxy.blackhole()
            t0 = time.monotonic()
            after = [j.id for j in c.enqueue_many("record", [{"key": key}] * 20)]
            one_s = wait_until(lambda: any(c.status(i).status == "succeeded" for i in after),
                               20, "consuming again after the blackhole")
            wait_until(lambda: all(c.status(i).status == "succeeded" for i in after),
                       all_within, "every job enqueued after the blackhole")
            all_s = time.monotonic() - t0
        print(f"\nblackholed {n} connections: consuming again after {one_s:.1f}s, all 20 "
              f"done after {all_s:.1f}s (visibility timeout 30 s)")
        assert d.proc is not None and d.proc.poll() is None, d.log()
        return one_s, all_s
    except BaseException:
        if d is not None:
            print(f"\ndaemon log tail:\n{d.log()[-1500:]}")
        raise
    finally:
        proxy.close()


@pytest.mark.timeout(120)
def test_network_blackhole_daemon_resumes_consuming_and_recovers_lost_xreadgroup_reply(
        write_config: Callable[..., Path], spawn: Callable[[Path], DaemonProcess],
        prefix: str, sync_r: redis.Redis) -> None:
    """The daemon's open connections go silent (no RST, no FIN): its commands must time
    out and reconnect, not hang for ever with the daemon looking alive (the first job
    enqueued after the blackhole succeeds within 15 s). And the entries an XREADGROUP
    delivered whose reply was lost are recovered promptly, not after the visibility
    timeout (every job done within 10 s of the first). One run checks both: it was two
    tests running the same scenario."""
    one_s, _ = _blackhole_run(write_config, spawn, prefix, sync_r, all_within=10)
    assert one_s < 15
