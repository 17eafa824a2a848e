"""Waiting for results (`Client.wait`): what it costs the hot path, and how fast a
result comes back.

    .venv/bin/python bench/waiting.py [--redis-url URL] [--jobs 10000] [--repeats 3]
        [--rate 500] [--latency-jobs 2000]

Starts one `jobqd run` subprocess (its own random key prefix on the given Redis;
nothing else is touched; its keys are deleted at the end; ``consumers: 100``),
then, in the same run and alternating, medians of ``--repeats``:

* processing throughput of ``--jobs`` no-op jobs enqueued in one batch, from the
  batch to the last one settled, with nobody waiting;
* the same while one client waits on every one of those jobs (``Client.wait``,
  all at once, over its one pub/sub connection);
* latency from enqueue to `wait` returning, p50 and p99, for ``--latency-jobs``
  jobs enqueued one by one at ``--rate`` jobs/s, each awaited by its own
  concurrent `wait`.

Prints a small table. Numbers depend on the machine; nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.daemon import daemon  # noqa: E402
from jobqd import Client  # noqa: E402


def _done(r: redis.Redis, prefix: str) -> int:
    """The queue's counter of settled jobs."""
    return int(r.get("{" + prefix + ":default}:n") or 0)


async def _settled(r: redis.Redis, prefix: str, base: int, n: int) -> None:
    """Until the settled counter grew by `n` from `base` (bounded)."""
    deadline = time.monotonic() + 120
    while _done(r, prefix) - base < n:
        if time.monotonic() > deadline:
            raise TimeoutError("jobs did not settle in time")
        await asyncio.sleep(0.005)


async def throughput(c: Client, r: redis.Redis, prefix: str, n: int, wait: bool) -> float:
    base = _done(r, prefix)
    t0 = time.perf_counter()
    jobs = await c.enqueue_many("noop", [{}] * n)
    if wait:
        await asyncio.wait_for(asyncio.gather(*(c.wait(j.id, timeout_s=120) for j in jobs)),
                               180)
    else:
        await _settled(r, prefix, base, n)
    return n / (time.perf_counter() - t0)


async def latency(c: Client, n: int, rate: float) -> tuple[float, float]:
    lat: list[float] = []

    async def one() -> None:
        t0 = time.perf_counter()
        job = await c.enqueue("noop")
        await c.wait(job.id, timeout_s=60)
        lat.append((time.perf_counter() - t0) * 1000)

    tasks = []
    start = time.perf_counter()
    for i in range(n):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one()))
    await asyncio.wait_for(asyncio.gather(*tasks), 120)
    lat.sort()
    return statistics.median(lat), lat[min(len(lat) - 1, int(len(lat) * 0.99))]


async def run(a: argparse.Namespace, prefix: str) -> None:
    r = redis.Redis.from_url(a.redis_url)
    no_wait, with_wait, p50s, p99s = [], [], [], []
    async with Client(a.redis_url, prefix) as c:
        await throughput(c, r, prefix, 1000, False)  # warm-up
        for _ in range(a.repeats):
            no_wait.append(await throughput(c, r, prefix, a.jobs, False))
            with_wait.append(await throughput(c, r, prefix, a.jobs, True))
            p50, p99 = await latency(c, a.latency_jobs, a.rate)
            p50s.append(p50)
            p99s.append(p99)
    r.close()
    nw, ww = statistics.median(no_wait), statistics.median(with_wait)
    print(f"| processing, nobody waiting (jobs/s) | {nw:,.0f} |")
    print(f"| processing, one client waiting on every job (jobs/s) | {ww:,.0f} ({ww / nw:.2f}x) |")
    print(f"| enqueue -> wait() returns at {a.rate:g} jobs/s, p50 / p99 (ms) | "
          f"{statistics.median(p50s):.2f} / {statistics.median(p99s):.2f} |")
    print(f"raw: no wait {[round(x) for x in no_wait]}, with wait {[round(x) for x in with_wait]}"
          f", p50 {[round(x, 2) for x in p50s]}, p99 {[round(x, 2) for x in p99s]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--jobs", type=int, default=10000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--latency-jobs", type=int, default=2000)
    a = ap.parse_args()
    cfg = {"consumers": 100, "log": {"level": "WARNING", "jobs": "none"},
           "tasks": {"noop": {"handler": "tests.handlers:noop"}}}
    with daemon(a.redis_url, cfg) as prefix:
        asyncio.run(run(a, prefix))

if __name__ == "__main__":
    main()
