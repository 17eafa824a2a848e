"""What PostgreSQL costs jobqd: processing throughput with heartbeats in Redis (the
default), heartbeats in PostgreSQL, and PostgreSQL heartbeats plus the job ledger;
and the transactional outbox's relay latency (COMMIT -> handler start).

    .venv/bin/python bench/jobqd_variants.py [--n 20000] [--repeats 3]

Runs the same jobqd driver as bench/run.py (the real daemon, one worker process,
`noop` jobs that INCR a counter) against a private redis-server, and a fresh
PostgreSQL schema per variant (JOBQD_BENCH_PG_DSN, default the local `test`
database). Writes bench/results/jobqd_variants.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.daemons import wait_ready_line  # noqa: E402

PY = sys.executable
PG_DSN = os.environ.get("JOBQD_BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def driver(args: list[str], env: dict[str, str], **kw: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen([PY, "-m", "bench.drivers.jobqd_driver", *args], cwd=ROOT,
                            env={**os.environ, **env, "PYTHONPATH": str(ROOT)}, **kw)


def redis_client(port: int) -> Any:
    import redis

    return redis.Redis(port=port)


def processing_rate(port: int, n: int, env: dict[str, str]) -> float:
    """Fill n noop jobs, start one worker, time from the first to the n-th finished job."""
    url = f"redis://127.0.0.1:{port}/0"
    r = redis_client(port)
    r.flushdb()
    fill = driver(["enqueue", "--redis-url", url, "--mode", "batch", "--n", str(n),
                   "--workload", "noop"], env, stdout=subprocess.DEVNULL)
    assert fill.wait(120) == 0
    w = driver(["worker", "--redis-url", url, "--concurrency", "16", "--workload", "noop"], env,
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while int(r.get("bench:done") or 0) == 0:
            assert time.monotonic() < deadline, "worker never started"
            time.sleep(0.001)
        t0, d0 = time.monotonic(), int(r.get("bench:done") or 0)
        while int(r.get("bench:done") or 0) < n:
            assert time.monotonic() < deadline, "worker too slow"
            time.sleep(0.002)
        return (n - d0) / (time.monotonic() - t0)
    finally:
        w.send_signal(signal.SIGTERM)
        w.wait(30)
        r.close()


async def _relay_latency(port: int, env: dict[str, str], n: int, rate: float) -> list[float]:
    import asyncpg

    from jobqd import outbox

    url = f"redis://127.0.0.1:{port}/0"
    r = redis_client(port)
    r.flushdb()
    w = driver(["worker", "--redis-url", url, "--concurrency", "16", "--workload", "latency"],
               env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        wait_ready_line(w, 120)
        conn = await asyncpg.connect(PG_DSN)
        try:
            start = time.monotonic()
            for i in range(n):
                await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
                async with conn.transaction():  # one business transaction per job
                    await outbox.enqueue(conn, "latency", {"ts": time.time()},
                                         prefix="jqbench", schema=env["JOBQD_BENCH_PG_SCHEMA"])
        finally:
            await conn.close()
        deadline = time.monotonic() + 30
        # the handler runs in another process: poll its counter (bounded)
        while r.llen("bench:lat") < n and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        return sorted(float(x) for x in r.lrange("bench:lat", 0, -1))
    finally:
        w.send_signal(signal.SIGTERM)
        w.wait(30)
        r.close()


def pg_schema_env(ledger: bool) -> dict[str, str]:
    schema = "bench_" + uuid.uuid4().hex[:10]
    return {"JOBQD_BENCH_PG_DSN": PG_DSN, "JOBQD_BENCH_PG_SCHEMA": schema,
            "JOBQD_BENCH_LEDGER": "1" if ledger else "0"}


def drop_schemas(schemas: list[str]) -> None:
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(PG_DSN)
        try:
            for s in schemas:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{s}" CASCADE')
        finally:
            await conn.close()

    asyncio.run(run())


def pct(xs: list[float], p: float) -> float:
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--relay-n", type=int, default=1000)
    ap.add_argument("--relay-rate", type=float, default=200.0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    a = ap.parse_args()

    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                               "--save", "", "--appendonly", "no"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    schemas: list[str] = []
    try:
        time.sleep(0.3)
        variants = {"heartbeats in Redis (default)": (lambda: {}),
                    "heartbeats in PostgreSQL": (lambda: pg_schema_env(False)),
                    "PostgreSQL heartbeats + ledger": (lambda: pg_schema_env(True))}
        rates: dict[str, list[float]] = {name: [] for name in variants}
        for rep in range(a.repeats):  # interleaved, so drift hits every variant alike
            for name, make_env in variants.items():
                env = make_env()
                if "JOBQD_BENCH_PG_SCHEMA" in env:
                    schemas.append(env["JOBQD_BENCH_PG_SCHEMA"])
                rate = processing_rate(port, a.n, env)
                rates[name].append(rate)
                print(f"[{rep + 1}/{a.repeats}] {name}: {rate:,.0f} jobs/s", flush=True)
        env = pg_schema_env(False)
        schemas.append(env["JOBQD_BENCH_PG_SCHEMA"])
        lat = asyncio.run(_relay_latency(port, env, a.relay_n, a.relay_rate))
        relay = {"n": len(lat), "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99),
                 "max_ms": lat[-1] if lat else None}
        print(f"relay latency (commit -> start) at {a.relay_rate:g} commits/s: "
              f"p50 {relay['p50_ms']:.2f} ms, p99 {relay['p99_ms']:.2f} ms", flush=True)
    finally:
        server.terminate()
        server.wait(10)
        if schemas:
            drop_schemas(schemas)

    base = statistics.median(rates["heartbeats in Redis (default)"])
    lines = ["# jobqd with and without PostgreSQL", "",
             f"{a.n:,} no-op jobs (each INCRs a counter), one worker process, 16 consumers, "
             f"median of {a.repeats} interleaved runs; `bench/jobqd_variants.py`.", "",
             "| variant | processing jobs/s (median) | vs default |", "|---|---|---|"]
    for name, xs in rates.items():
        med = statistics.median(xs)
        lines.append(f"| {name} | {med:,.0f} | {med / base:.2f}x |")
    lines += ["", f"Outbox relay latency, COMMIT → handler start, {relay['n']} jobs at "
                  f"{a.relay_rate:g} commits/s (one transaction each): p50 "
                  f"{relay['p50_ms']:.2f} ms, p99 {relay['p99_ms']:.2f} ms, max "
                  f"{relay['max_ms']:.2f} ms.", ""]
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "jobqd_variants.md").write_text("\n".join(lines))
    (a.out / "jobqd_variants.json").write_text(json.dumps(
        {"n": a.n, "repeats": a.repeats, "rates": rates, "relay": relay}, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
