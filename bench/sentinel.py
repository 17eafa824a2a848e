"""Sentinel: what ``redis.wait_replicas: 1`` costs, and what it saves in a failover.

    .venv/bin/python bench/sentinel.py [--jobs 20000] [--single 2000] [--repeats 3]
        [--failovers 3]

Starts its own sentinel group on loopback (tests/own_redis.py: a master, one
replica, three sentinels; nothing else is touched) and a `jobqd run` subprocess
reaching it through ``redis+sentinel://`` (``consumers: 100``), then, alternating
``wait_replicas`` 0 and 1 in the same run, medians of ``--repeats``:

* enqueue one by one: ``--single`` jobs, one `SyncClient.enqueue` each (a WAIT
  rides in each enqueue's round trip when wait_replicas is 1);
* processing: ``--jobs`` no-op jobs in one `enqueue_many`, from the batch to the
  last one settled (a WAIT rides in every settle pipeline);
* a ``SENTINEL FAILOVER`` under load (``--failovers`` times each, a fresh group
  each time): a producer thread enqueues batches of 20 with idempotency keys as
  fast as it can; lost = enqueues that returned but whose job never ran.

Prints a small table. Numbers depend on the machine; nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.daemon import daemon  # noqa: E402
from jobqd import SyncClient  # noqa: E402
from jobqd.connect import connect_sync  # noqa: E402
from jobqd.keys import QueueKeys  # noqa: E402
from tests.own_redis import SentinelGroup, own_redis, sentinel_group  # noqa: E402
from tests.test_sentinel import Producer  # noqa: E402

TASKS = {"noop": {"handler": "tests.handlers:noop"},
         "record": {"handler": "tests.handlers:record"}}


def _cfg(wait: int) -> dict[str, Any]:
    return {"consumers": 100, "log": {"level": "WARNING", "jobs": "none"},
            "redis": {"wait_replicas": wait, "wait_timeout_s": 1.0}, "tasks": TASKS,
            "heartbeat": {"interval_s": 0.5, "timeout_s": 2},
            "reaper": {"interval_s": 0.5, "visibility_timeout_s": 2, "max_deliveries": 10}}


def _until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.005)


def _drained(url: str, prefix: str) -> Callable[[], bool]:
    r = connect_sync(url, socket_timeout=2)
    qk = QueueKeys(prefix, "default")

    def check() -> bool:  # acked entries are deleted: XLEN counts queued and pending
        return not r.xlen(qk.stream) and not r.zcard(qk.delayed)
    return check


def throughput(g: SentinelGroup, wait: int, jobs: int, single: int) -> tuple[float, float]:
    # tests.handlers (noop) needs a plain URL at import; noop itself touches nothing
    plain = {"JOBQD_TEST_REDIS_URL": g.master.url}
    with daemon(g.url, _cfg(wait), env=plain) as prefix, \
            SyncClient(g.url, prefix, wait_replicas=wait, wait_timeout_s=1.0) as c:
        drained = _drained(g.url, prefix)
        c.enqueue_many("noop", [{}] * 500)  # warm-up
        _until(drained, 60, "warm-up")
        t0 = time.perf_counter()
        for _ in range(single):
            c.enqueue("noop")
        one_by_one = single / (time.perf_counter() - t0)
        _until(drained, 60, "single jobs")
        t0 = time.perf_counter()
        c.enqueue_many("noop", [{}] * jobs)
        _until(drained, 300, "processing")
        processing = jobs / (time.perf_counter() - t0)
    return one_by_one, processing


def failover(tmp: Path, runs_url: str, wait: int) -> tuple[int, int]:
    """One SENTINEL FAILOVER under load on a fresh group: (accepted, lost)."""
    import redis

    with sentinel_group(tmp) as g, \
            daemon(g.url, _cfg(wait), env={"JOBQD_TEST_REDIS_URL": runs_url}) as prefix:
        runs = redis.Redis.from_url(runs_url)
        key = f"{prefix}:runs"
        prod = Producer(g.url, prefix, key, wait)
        prod.start()
        try:
            _until(lambda: runs.hlen(key) >= 500, 60, "jobs before the failover")
            old = g.master_port()
            g.failover()
            g.wait_master_not(old)
            t_new = time.monotonic()
            _until(lambda: sum(t > t_new + 1 for t, _ in prod.accepted) >= 500, 60,
                   "jobs on the new master")
        finally:
            prod.halt.set()
            prod.join(10)
        _until(_drained(g.url, prefix), 60, "the new master's queue to drain")
        accepted = {j for _, j in prod.accepted}
        ran = {k.decode() for k in runs.hkeys(key)}
        runs.delete(key, key + ":order")
        runs.close()
        return len(accepted), len(accepted - ran)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=20000)
    ap.add_argument("--single", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--failovers", type=int, default=3)
    a = ap.parse_args()
    single: dict[int, list[float]] = {0: [], 1: []}
    proc: dict[int, list[float]] = {0: [], 1: []}
    lost: dict[int, list[tuple[int, int]]] = {0: [], 1: []}
    with tempfile.TemporaryDirectory() as tmp:
        with sentinel_group(Path(tmp) / "group") as g:
            for _ in range(a.repeats):
                for wait in (0, 1):
                    s, p = throughput(g, wait, a.jobs, a.single)
                    single[wait].append(s)
                    proc[wait].append(p)
                    print(f"wait_replicas {wait}: one by one {s:,.0f}/s, processing {p:,.0f}/s",
                          flush=True)
        with own_redis(Path(tmp) / "runs") as runs_srv:
            for i in range(a.failovers):
                for wait in (0, 1):
                    got = failover(Path(tmp) / f"f{i}-{wait}", runs_srv.url, wait)
                    lost[wait].append(got)
                    print(f"failover, wait_replicas {wait}: accepted {got[0]}, lost {got[1]}",
                          flush=True)
    med = statistics.median
    print("\n| | wait_replicas: 0 | wait_replicas: 1 | ratio |\n|---|---|---|---|")
    for name, d in (("enqueue one by one (jobs/s)", single), ("processing (jobs/s)", proc)):
        print(f"| {name} | {med(d[0]):,.0f} | {med(d[1]):,.0f} | {med(d[1]) / med(d[0]):.2f} |")
    print(f"| jobs lost in a SENTINEL FAILOVER under load (runs) | "
          f"{', '.join(f'{l_} of {n}' for n, l_ in lost[0])} | "
          f"{', '.join(f'{l_} of {n}' for n, l_ in lost[1])} | |")
    print(f"raw: single {single}, processing {proc}")


if __name__ == "__main__":
    main()
