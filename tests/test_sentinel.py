"""Sentinel, on a real group the test starts (1 master, 1 replica, 3 sentinels): a
daemon subprocess and a producer thread both reach the master through
``redis+sentinel://``; a failover (``SENTINEL FAILOVER``, or ``kill -9`` of the master)
happens under load; the daemon must keep running and carry on on the new master.

Lost = a job whose enqueue returned (acknowledged to the producer) and that never
ran. Run counts go to the shared test Redis (not part of the group). With
``redis.wait_replicas: 1`` an acknowledged job is on the one replica, which is the
one promoted, so none may be lost; without it the count is reported."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from jobqd import NotReplicated, SyncClient
from jobqd.connect import connect_sync
from jobqd.keys import QueueKeys

from .conftest import REDIS_URL, ROOT, DaemonProcess, wait_until
from .own_redis import SentinelGroup, needs_redis_server, sentinel_group

pytestmark = [pytest.mark.sentinel, needs_redis_server]

# every client has noticed the new master this long after all sentinels name it
# (connect.RECHECK_S, with a margin for a loaded machine)
SETTLE_S = 2.5
FAST = {"heartbeat": {"interval_s": 0.5, "timeout_s": 2},
        "reaper": {"interval_s": 0.5, "visibility_timeout_s": 2, "max_deliveries": 10}}


@pytest.fixture
def group(tmp_path: Path) -> Iterator[SentinelGroup]:
    with sentinel_group(tmp_path / "sentinel") as g:
        yield g


class Producer(threading.Thread):
    """Enqueues batches of `record` jobs with idempotency keys through the sentinels;
    a batch that fails (no master, NotReplicated) is retried with the same keys, so a
    retry never doubles a job. `accepted`: (monotonic time, job id) of returned jobs."""

    def __init__(self, url: str, prefix: str, key: str, wait_replicas: int,
                 batch: int = 20, period: float = 0.01) -> None:
        super().__init__(name="producer", daemon=True)
        self.url, self.prefix, self.key = url, prefix, key
        self.wait_replicas, self.batch, self.period = wait_replicas, batch, period
        self.accepted: list[tuple[float, str]] = []
        self.refused = 0
        self.error: BaseException | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        c = SyncClient(self.url, self.prefix, wait_replicas=self.wait_replicas,
                       wait_timeout_s=0.2,
                       redis_client=connect_sync(self.url, socket_timeout=2,
                                                 socket_connect_timeout=1))
        n = 0
        try:
            while not self.halt.is_set():
                keys = [f"k{n + i}" for i in range(self.batch)]
                try:
                    jobs = c.enqueue_many("record", [{"key": self.key}] * self.batch,
                                          idempotency_keys=keys)
                except (redis.RedisError, NotReplicated):
                    self.refused += 1
                    self.halt.wait(0.05)
                    continue
                now = time.monotonic()
                self.accepted += [(now, j.id) for j in jobs]
                n += self.batch
                self.halt.wait(self.period)
        except BaseException as e:  # reported by the test
            self.error = e
        finally:
            c.redis.close()




def _failover_under_load(how: str, wait_replicas: int, g: SentinelGroup,
                         write_config: Callable[..., Path],
                         spawn: Callable[[Path], DaemonProcess], prefix: str,
                         sync_r: redis.Redis) -> dict[str, Any]:
    cfg = write_config(redis={"url": g.url, "prefix": prefix, "wait_replicas": wait_replicas,
                              "wait_timeout_s": 0.2}, consumers=16, **FAST)
    d = spawn(cfg)
    d.wait_ready()
    key = f"{prefix}:runs"
    ran = lambda: sync_r.hlen(key)  # noqa: E731
    old = g.master_port()
    # an empty script cache on the replica: the new master must load the scripts again
    g.server(g.replica.port).client().script_flush()
    # at most ~400 jobs/s: the daemon keeps up on a loaded 2-core box, so the backlog
    # left to drain after the failover stays small
    prod = Producer(g.url, prefix, key, wait_replicas, batch=20, period=0.05)
    prod.start()
    try:
        wait_until(lambda: ran() >= 200, 30, "200 jobs run before the failover")
        t_fail = time.monotonic()
        if how == "sentinel-failover":
            g.failover()
            new = g.wait_master_not(old)
        else:
            g.server(old).kill()  # kill -9
            new = g.wait_master_not(old)
            g.server(old).start()  # back as an empty server: Sentinel makes it a replica
        t_new = time.monotonic()
        wait_until(lambda: sum(t > t_new + SETTLE_S for t, _ in prod.accepted) >= 100, 30,
                   "100 jobs accepted on the new master")
    finally:
        prod.halt.set()
        prod.join(10)
    assert prod.error is None, prod.error
    accepted = {j for _, j in prod.accepted}
    after = {j for t, j in prod.accepted if t > t_new + SETTLE_S}

    def runs() -> set[str]:
        return {k.decode() for k in sync_r.hkeys(key)}

    # the daemon drains what the new master holds: every job accepted on it, and the
    # rest that survived (reclaimed after the visibility timeout when its delivery
    # was on the old master only)
    qk = QueueKeys(prefix, "default")

    def drained() -> bool:  # acked entries are deleted: XLEN counts queued and pending
        with connect_sync(g.url, socket_timeout=2) as r:
            return not r.xlen(qk.stream) and not r.zcard(qk.delayed)

    try:
        wait_until(drained, 45, "the new master's queue to drain")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{d.log()}") from None
    assert after <= runs(), "jobs accepted on the new master never ran"
    lost = accepted - runs()
    when = sorted(round(t - t_fail, 2) for t, j in prod.accepted if j in lost)
    assert d.proc is not None and d.proc.poll() is None, d.log()
    with connect_sync(g.url) as r:
        assert r.info("replication")["role"] == "master"
        assert int(g.master_port()) == new
    if how == "sentinel-failover" and wait_replicas:
        # the CLI finds the new master through the sentinels too (enqueue with WAIT)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "JOBQD_TEST_REDIS_URL": REDIS_URL}
        cli = [sys.executable, "-m", "jobqd", "-c", str(cfg)]
        res = subprocess.run([*cli, "enqueue", "record", orjson.dumps({"key": key}).decode()],
                             check=False, capture_output=True, text=True, env=env, cwd=ROOT,
                             timeout=30)
        assert res.returncode == 0, res.stderr
        job_id = res.stdout.strip()
        wait_until(lambda: job_id in runs(), 15, "the CLI's job to run")
        stats = subprocess.run([*cli, "stats"], check=False, capture_output=True, text=True,
                               env=env, cwd=ROOT, timeout=30)
        assert stats.returncode == 0 and "default" in stats.stdout, stats.stderr
    out = {"how": how, "wait_replicas": wait_replicas, "accepted": len(accepted),
           "lost": len(lost), "refused_batches": prod.refused,
           "failover_s": round(t_new - t_fail, 2),
           "lost_accepted_at_s": (when[0], when[-1]) if when else None}
    print(f"\nsentinel failover: {out}")
    return out


@pytest.mark.parametrize("how", ["sentinel-failover", "kill-9"])
def test_failover_under_load_without_wait(how: str, group: SentinelGroup,
                                          write_config: Callable[..., Path],
                                          spawn: Callable[[Path], DaemonProcess], prefix: str,
                                          sync_r: redis.Redis) -> None:
    """wait_replicas 0: the daemon follows the failover; jobs lost are reported."""
    # asserted inside: the daemon runs on, and every job accepted once all clients
    # followed (SETTLE_S after the sentinels agreed) ran; losses are only reported
    _failover_under_load(how, 0, group, write_config, spawn, prefix, sync_r)


@pytest.mark.parametrize("how", ["sentinel-failover", "kill-9"])
def test_failover_under_load_with_wait_replicas_loses_nothing(
        how: str, group: SentinelGroup, write_config: Callable[..., Path],
        spawn: Callable[[Path], DaemonProcess], prefix: str, sync_r: redis.Redis) -> None:
    out = _failover_under_load(how, 1, group, write_config, spawn, prefix, sync_r)
    assert out["lost"] == 0, out


def test_failover_errors_are_transient_faults() -> None:
    """What a client sees during a failover: no master named yet, the demoted master's
    READONLY (redis-py turns it into a connection error on a sentinel connection), a
    blocked read cut short: each is a Redis outage to back off from, never a crash."""
    from redis.asyncio.sentinel import MasterNotFoundError as AsyncMasterNotFound
    from redis.exceptions import ReadOnlyError, ResponseError
    from redis.sentinel import MasterNotFoundError

    from jobqd import deps

    for e in (MasterNotFoundError("No master found for 'm'"), AsyncMasterNotFound("x"),
              ReadOnlyError("You can't write against a read only replica."),
              redis.ConnectionError("The previous master is now a slave")):
        assert deps.is_redis_error(e) and deps.is_redis_unreachable(e), e
    assert deps.is_redis_error(ResponseError("UNBLOCKED force unblock from blocking "
                                             "operation, instance state changed"))
