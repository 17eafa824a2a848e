"""Scaling out: throughput of 1, 2 and 4 daemons against one Redis and against a
3-master Redis Cluster (the queues spread over the masters), with Redis's and the
daemons' CPU per job, so the scaling on a bigger machine can be worked out
(bench/README.md, "Scaling out").

Each run: `jobqd publish`, N `noop` jobs enqueued over 3 queues (whose hash slots
sit on 3 different masters of the cluster), then K `jobqd run` subprocesses. The
rate is measured between 5 % and 95 % of the jobs settled (the sum of the queues'
settled counters), so daemon start-up is not in it; CPU is read over the same
window: the daemons' from /proc/<pid>/stat, Redis's from INFO cpu of every master.
Each (deployment, daemons) cell is the median of `--repeats` runs.

    .venv/bin/python bench/scale_out.py                 # N=20000, 3 repeats, ~4 min
    .venv/bin/python bench/scale_out.py --n 5000 --repeats 1   # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jobqd import SyncClient, connect  # noqa: E402
from jobqd.keys import QueueKeys  # noqa: E402
from tests.own_redis import OwnCluster, OwnRedis, own_cluster, own_redis  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    """user + system CPU seconds of one process (and its reaped children)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / TICK  # utime stime cutime cstime


def redis_cpu_s(ports: list[int]) -> float:
    total = 0.0
    for p in ports:
        c = redis.Redis(port=p)
        try:
            info: Any = c.info("cpu")
            total += float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
        finally:
            c.close()
    return total


def spread(url: str, prefix: str, n: int = 3) -> list[str]:
    """`n` queue names on `n` different hash-slot owners (any names on one server)."""
    r = connect.connect_sync(url)
    try:
        if not connect.is_cluster(r):
            return [f"q{i}" for i in range(n)]
        out, seen = [], set()
        for i in range(500):
            q = f"q{i}"
            node = r.get_node_from_key(QueueKeys(prefix, q).stream).name  # type: ignore[attr-defined]
            if node not in seen:
                seen.add(node)
                out.append(q)
                if len(out) == n:
                    return out
        raise SystemExit("cannot spread queues over the masters")
    finally:
        r.close()


@contextlib.contextmanager
def daemons(path: Path, k: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("NOTIFY_SOCKET", None)
    procs = [subprocess.Popen([sys.executable, "-m", "jobqd", "-c", str(path), "run"],
                              env=env, cwd=str(ROOT), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for _ in range(k)]
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


def one_run(url: str, ports: list[int], k: int, *, n: int, consumers: int,
            tmp: Path) -> dict[str, float]:
    prefix = "so" + uuid.uuid4().hex[:8]
    qs = spread(url, prefix)
    cfg = {"redis": {"url": url, "prefix": prefix}, "http": {"listen": "127.0.0.1:0"},
           "consumers": consumers, "log": {"level": "WARNING"},
           "queues": {q: {"weight": 1} for q in qs},
           "tasks": {"noop": {"handler": "tests.handlers:noop", "queue": qs[0]}}}
    path = tmp / f"{prefix}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    subprocess.run([sys.executable, "-m", "jobqd", "-c", str(path), "publish"], check=True,
                   cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)},
                   stdout=subprocess.DEVNULL)
    with SyncClient(url, prefix) as c:
        per = n // len(qs)
        for q in qs:
            for i in range(0, per, 1000):
                c.enqueue_many("noop", [{}] * min(1000, per - i), queue=q)
    total = per * len(qs)
    r = connect.connect_sync(url)
    counters = [QueueKeys(prefix, q).done for q in qs]

    def settled() -> int:
        return sum(int(r.get(key) or 0) for key in counters)

    lo, hi = int(total * 0.05), int(total * 0.95)
    marks: dict[str, tuple[float, float, float]] = {}
    try:
        with daemons(path, k) as procs:
            deadline = time.monotonic() + 600
            while "hi" not in marks:
                if time.monotonic() > deadline:
                    raise SystemExit("a run did not finish in 600 s")
                if any(p.poll() is not None for p in procs):
                    raise SystemExit("a daemon exited")
                done = settled()
                key = "lo" if "lo" not in marks and done >= lo else (
                    "hi" if "lo" in marks and done >= hi else None)
                if key:
                    marks[key] = (time.monotonic(), redis_cpu_s(ports),
                                  sum(proc_cpu_s(p.pid) for p in procs))
                    marks[key + "_n"] = (float(done), 0.0, 0.0)
                time.sleep(0.02)
    finally:
        for port in ports:
            c = redis.Redis(port=port)
            with contextlib.suppress(redis.RedisError):
                for key in c.scan_iter(match=f"*{prefix}*", count=1000):
                    with contextlib.suppress(redis.RedisError):
                        c.delete(key)
            c.close()
        r.close()
    jobs = marks["hi_n"][0] - marks["lo_n"][0]
    secs = marks["hi"][0] - marks["lo"][0]
    return {"jobs_per_s": jobs / secs,
            "redis_cpu_us_per_job": (marks["hi"][1] - marks["lo"][1]) / jobs * 1e6,
            "daemon_cpu_us_per_job": (marks["hi"][2] - marks["lo"][2]) / jobs * 1e6}


def cell(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="jobs per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--daemons", default="1,2,4")
    ap.add_argument("--consumers", type=int, default=50, help="consumers per daemon")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale_out.json")
    args = ap.parse_args()
    ks = [int(x) for x in args.daemons.split(",")]
    results: dict[str, Any] = {"n": args.n, "repeats": args.repeats,
                               "consumers": args.consumers, "cpus": os.cpu_count(),
                               "cells": {}}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        with own_redis(tmp / "single") as one, own_cluster(tmp / "cluster") as cl:
            deployments: list[tuple[str, str, list[int]]] = [
                ("one Redis", one.url, [one.port]),
                ("3-master cluster", cl.url, [m.port for m in _masters(cl)])]
            for name, url, ports in deployments:
                for k in ks:
                    runs = []
                    for _ in range(args.repeats):
                        runs.append(one_run(url, ports, k, n=args.n, consumers=args.consumers,
                                            tmp=tmp))
                        print(f"{name:18} {k} daemon(s): {runs[-1]['jobs_per_s']:7.0f} jobs/s",
                              flush=True)
                    results["cells"][f"{name} / {k}"] = {"runs": runs, "median": cell(runs)}
    print()
    print("| deployment | daemons | jobs/s | Redis CPU µs/job | daemon CPU µs/job |")
    print("|---|---:|---:|---:|---:|")
    for key, v in results["cells"].items():
        name, k = key.split(" / ")
        m = v["median"]
        print(f"| {name} | {k} | {m['jobs_per_s']:.0f} | {m['redis_cpu_us_per_job']:.0f} | "
              f"{m['daemon_cpu_us_per_job']:.0f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"\nraw numbers: {args.out}")


def _masters(cl: OwnCluster) -> list[OwnRedis]:
    out = []
    for n in cl.nodes:
        c = redis.Redis(port=n.port)
        try:
            role: Any = c.execute_command("ROLE")
            if role[0] in (b"master", "master"):
                out.append(n)
        finally:
            c.close()
    return out


if __name__ == "__main__":
    main()
