"""Redis bytes per queued job, and per finished job, for jobqd alone.

    .venv/bin/python bench/memory.py [--sizes 1000,10000,100000,1000000]
        [--finished-n 100000] [--keep none,status,full] [--redis-url URL]

Starts its own ``redis-server`` on a free loopback port (``--save ""
--appendonly no``; or ``--redis-url`` of a server that is **FLUSHALL'd**: the
figures are deltas of the whole server's ``used_memory``), then:

* **queued**: for each size N, FLUSHALL, publish the routing of one task
  (``noop``, queue ``default``), measure ``INFO memory`` ``used_memory``, enqueue
  N no-op jobs (``Client.enqueue_many``, 10,000 per call), measure again, and
  print the delta ÷ N beside ``MEMORY USAGE`` (``SAMPLES 0``: every element) of
  the stream ``{p:q}:s``, the state hash ``{p:q}:st`` and the ``{p:q}:in``
  counters, each ÷ N, plus one job's JSON as stored;
* **finished**: for each ``results.keep`` mode, FLUSHALL, start one ``jobqd run``
  subprocess (``consumers: 100``), enqueue ``--finished-n`` no-op jobs, wait
  until all are settled, and print (``used_memory`` after - before) ÷ N: what
  each finished job holds until ``results.ttl_s`` expires it.

Prints markdown tables; nothing is asserted. Peak memory is a few hundred MB of
Redis at 1M queued.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.daemon import daemon  # noqa: E402
from jobqd import Client  # noqa: E402
from jobqd import config as config_mod  # noqa: E402
from jobqd.publish import publish_config  # noqa: E402

PREFIX = "jobqd"
CHUNK = 10_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def used_memory(r: redis.Redis) -> int:
    return int(r.info("memory")["used_memory"])


def settle_memory(r: redis.Redis) -> int:
    """used_memory once it stopped moving (client buffers drained), bounded."""
    last = used_memory(r)
    for _ in range(20):
        time.sleep(0.1)
        now = used_memory(r)
        if abs(now - last) < 1024:
            return now
        last = now
    return last


def mem_usage(r: redis.Redis, key: str) -> int:
    return int(r.execute_command("MEMORY", "USAGE", key, "SAMPLES", "0") or 0)


async def fill(url: str, r: redis.Redis, n: int, idem: bool = False
               ) -> tuple[int, int, float]:
    """Enqueue n jobs after one warm-up job (scripts loaded, connection open: fixed
    costs stay out of the delta); returns used_memory before and after, and seconds."""
    async with Client(url, PREFIX) as c:
        await c.enqueue("noop")
        gc.collect()
        m0 = settle_memory(r)
        t0 = time.perf_counter()
        for i in range(0, n, CHUNK):
            k = min(CHUNK, n - i)
            keys = [f"order-{i + j:09d}" for j in range(k)] if idem else None
            await c.enqueue_many("noop", [{}] * k, idempotency_keys=keys)
        took = time.perf_counter() - t0
        m1 = settle_memory(r)
    return m0, m1, took


def publish(url: str) -> None:
    cfg = config_mod.loads(
        f"redis: {{url: '{url}', prefix: {PREFIX}}}\n"
        "tasks: {noop: {handler: 'tests.handlers:noop'}}\n", import_handlers=False)
    asyncio.run(publish_config(cfg))


def queued(url: str, r: redis.Redis, sizes: list[int], idem_n: int) -> None:
    tag = "{" + PREFIX + ":default}"
    print("\n## Queued jobs\n")
    print("| jobs queued | used_memory Δ / job (B) | stream / job | state hash / job "
          "| `in` / job | fill (s) |")
    print("|---|---|---|---|---|---|")
    sample = b""
    for n in sizes:
        r.flushall()
        publish(url)
        m0, m1, took = asyncio.run(fill(url, r, n))
        assert r.xlen(tag + ":s") == n + 1, "not every job was queued"
        s_b = mem_usage(r, tag + ":s")
        st_b = mem_usage(r, tag + ":st")
        in_b = mem_usage(r, tag + ":in")
        print(f"| {n:,} | {(m1 - m0) / n:.1f} | {s_b / (n + 1):.1f} | {st_b / (n + 1):.1f} "
              f"| {in_b / (n + 1):.2f} | {took:.1f} |", flush=True)
        sample = r.xrange(tag + ":s", count=1)[0][1][b"j"]
    print(f"\nOne job as stored ({len(sample)} bytes): `{sample.decode()}`")
    if idem_n:
        r.flushall()
        publish(url)
        m0, m1, _ = asyncio.run(fill(url, r, idem_n, idem=True))
        print(f"\nWith an idempotency key each (`order-000000001`...), {idem_n:,} jobs: "
              f"{(m1 - m0) / idem_n:.1f} bytes per queued job (the key lives "
              "idempotency_ttl_s, also after the job finished)")


async def _drain(url: str, r: redis.Redis, prefix: str, n: int, timeout_s: float) -> None:
    counter = "{" + prefix + ":default}:n"
    async with Client(url, prefix) as c:
        for i in range(0, n, CHUNK):
            await c.enqueue_many("noop", [{}] * min(CHUNK, n - i))
    deadline = time.monotonic() + timeout_s
    while int(r.get(counter) or 0) < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {r.get(counter)} of {n} jobs settled in {timeout_s}s")
        await asyncio.sleep(0.1)


def finished(url: str, r: redis.Redis, n: int, modes: list[str]) -> None:
    print(f"\n## Finished jobs ({n:,} no-op jobs run, then held until results.ttl_s)\n")
    print("| results.keep | used_memory Δ / finished job (B) | result keys |")
    print("|---|---|---|")
    for mode in modes:
        r.flushall()
        cfg: dict[str, Any] = {"consumers": 100, "log": {"level": "WARNING", "jobs": "none"},
                               "tasks": {"noop": {"handler": "tests.handlers:noop"}}}
        if mode != "default":
            cfg["results"] = {"keep": mode}
        with daemon(url, cfg) as prefix:
            time.sleep(0.5)
            m0 = settle_memory(r)
            asyncio.run(_drain(url, r, prefix, n, 600))
            time.sleep(0.5)
            m1 = settle_memory(r)
            keys = sum(1 for _ in r.scan_iter(match="{" + prefix + ":default}:r:*", count=10000))
        print(f"| {mode} | {(m1 - m0) / n:.1f} | {keys:,} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--redis-url", help="a Redis to FLUSHALL and measure (default: start one)")
    ap.add_argument("--sizes", default="1000,10000,100000,1000000")
    ap.add_argument("--finished-n", type=int, default=100_000, help="0: skip")
    ap.add_argument("--idem-n", type=int, default=100_000,
                    help="jobs with idempotency keys for one more row (0: skip)")
    ap.add_argument("--keep", default="none,status,full",
                    help="results.keep modes to measure ('default': leave it unset)")
    a = ap.parse_args()
    sizes = [int(x) for x in a.sizes.split(",") if x]
    with tempfile.TemporaryDirectory() as tmp:
        proc = None
        url = a.redis_url
        if url is None:
            if shutil.which("redis-server") is None:
                raise SystemExit("redis-server is not installed (or pass --redis-url)")
            port = _free_port()
            proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                                     "--dir", tmp, "--save", "", "--appendonly", "no"],
                                    stdout=subprocess.DEVNULL)
            url = f"redis://127.0.0.1:{port}/0"
        try:
            r = redis.Redis.from_url(url, socket_timeout=600)
            deadline = time.monotonic() + 10
            while True:
                try:
                    r.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            info = r.info("server")
            print(f"Redis {info['redis_version']}; stream-node-max-bytes "
                  f"{r.config_get('stream-node-max-bytes')['stream-node-max-bytes']}, "
                  f"hash-max-listpack-entries "
                  f"{r.config_get('hash-max-*-entries').get('hash-max-listpack-entries')}")
            if sizes:
                queued(url, r, sizes, a.idem_n)
            if a.finished_n:
                finished(url, r, a.finished_n, [m for m in a.keep.split(",") if m])
            r.close()
        finally:
            if proc is not None:
                proc.kill()
                proc.wait(10)


if __name__ == "__main__":
    main()
