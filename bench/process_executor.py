"""executor: process vs thread vs async, same daemon, same run.

    .venv/bin/python bench/process_executor.py [--redis-url URL] [--children 2]
        [--cpu-jobs 40] [--cpu-n 300000] [--noop-jobs 2000]

Starts one `jobqd run` subprocess (its own random key prefix on the given Redis;
nothing else is touched, its keys are deleted at the end) with ``consumers``
and ``process_pool.size`` both ``--children``, and measures, one phase at a
time, the wall time from enqueue to the last job settled:

* CPU-bound throughput: ``--cpu-jobs`` jobs of ``tests.handlers:cpu_work``
  (pure-Python loop), as ``executor: thread`` and as ``executor: process``;
* per-job overhead: ``--noop-jobs`` no-op jobs (``tests.handlers:proc_info``
  with no key: it only reads current_job()) as ``process``, as ``thread``,
  and an ``async`` no-op (``tests.handlers:noop``).

Prints a small table. Numbers depend on the machine; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.daemon import daemon  # noqa: E402
from jobqd import SyncClient  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--children", type=int, default=2)
    ap.add_argument("--cpu-jobs", type=int, default=40)
    ap.add_argument("--cpu-n", type=int, default=300_000)
    ap.add_argument("--noop-jobs", type=int, default=2000)
    a = ap.parse_args()
    h = "tests.handlers:"
    cfg = {
        "consumers": a.children,
        "process_pool": {"size": a.children},
        "log": {"level": "WARNING", "jobs": "none"},
        "tasks": {
            "cpu_thread": {"handler": h + "cpu_work", "executor": "thread"},
            "cpu_process": {"handler": h + "cpu_work", "executor": "process"},
            "noop_process": {"handler": h + "proc_info", "executor": "process"},
            "noop_thread": {"handler": h + "proc_info", "executor": "thread"},
            "noop_async": {"handler": h + "noop"},
        },
    }
    r = redis.Redis.from_url(a.redis_url)
    rows = []
    with daemon(a.redis_url, cfg) as prefix, SyncClient(a.redis_url, prefix) as c:
        phases = [("cpu_thread", a.cpu_jobs, {"n": a.cpu_n}),
                  ("cpu_process", a.cpu_jobs, {"n": a.cpu_n}),
                  ("noop_async", a.noop_jobs, {}),
                  ("noop_thread", a.noop_jobs, {}),
                  ("noop_process", a.noop_jobs, {})]
        run(c, r, prefix, "cpu_process", a.children * 2, args={"n": 1000})  # warm children
        for task, n, args in phases:
            secs = run(c, r, prefix, task, n, args=args)
            rows.append((task, n, secs))
    print(f"\n{a.children} consumers, process_pool.size {a.children}, {os.cpu_count()} CPUs")
    print(f"{'task':<14}{'jobs':>7}{'seconds':>10}{'jobs/s':>10}{'ms/job':>9}")
    for task, n, secs in rows:
        print(f"{task:<14}{n:>7}{secs:>10.2f}{n / secs:>10.1f}{secs * 1000 / n:>9.2f}")


def run(c: SyncClient, r: redis.Redis, prefix: str, task: str, n: int, *,
        args: dict[str, object]) -> float:
    stream = f"{{{prefix}:default}}:s"
    t0 = time.monotonic()
    for i in range(0, n, 500):
        c.enqueue_many(task, [args] * min(500, n - i))
    deadline = t0 + 600
    while r.xlen(stream):  # settled entries are deleted from the stream
        if time.monotonic() > deadline:
            raise SystemExit(f"{task}: not done in 600 s")
        time.sleep(0.01)
    return time.monotonic() - t0


if __name__ == "__main__":
    main()
