"""Several jobqd daemons on one Redis: jobs/s, Redis CPU per job and daemon CPU per
job for 1, 2 and 4 daemon processes (issue #17), and from those what one Redis core
carries and how many daemons it takes to saturate it.

    .venv/bin/python bench/daemons.py                      # 1,2,4 daemons, consumers 100, 3 repeats
    .venv/bin/python bench/daemons.py --daemons 1,2 --repeats 1 --redis-url redis://127.0.0.1:6379/15

Each run: FLUSHDB, fill `n-per-daemon x daemons` no-op jobs (each INCRs a counter)
with jobqd's batch enqueue, start the daemons (bench/drivers/jobqd_driver.py `worker`:
the real `Daemon`, one process each, all on the same queue), and measure between
10 % and 90 % of the jobs done (start-up and tail left out):

- jobs/s;
- Redis CPU per job: `INFO cpu` (used_cpu_sys + used_cpu_user) delta / jobs; it
  includes the job body's own INCR, one of the ~2 commands per job;
- daemon CPU per job: the daemons' utime + stime (/proc/<pid>/stat, all threads) delta
  / jobs.

`measure()` is the reusable part (a redis URL in, a dict out); the cluster variant
passes its own driver module, counter and CPU probe. Without --redis-url it starts its
own redis-server on loopback (no persistence). Writes bench/results/daemons.{md,json}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import MiniRedis, RedisServer  # noqa: E402

DEFAULT_PY = str(ROOT / ".venv" / "bin" / "python") if (
    ROOT / ".venv" / "bin" / "python").exists() else sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")


def wait_ready_line(p: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait, bounded, for a driver's ready line on its stdout (a pipe): a worker that
    exits or hangs before it is ready raises RuntimeError instead of blocking a
    readline() forever. Its stdout is drained in the background from then on, so the
    pipe never fills."""
    out = p.stdout
    assert out is not None
    ready = threading.Event()

    def drain() -> None:
        for line in out:
            if b'"event": "ready"' in line:
                ready.set()

    threading.Thread(target=drain, name=f"ready-line-{p.pid}", daemon=True).start()
    deadline = time.monotonic() + timeout
    while not ready.wait(0.1):
        if p.poll() is not None and not ready.is_set():  # (ready, then exited: ready)
            raise RuntimeError(f"the worker exited ({p.returncode}) before it was ready")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the worker was not ready within {timeout:.0f} s")


def mini(url: str) -> MiniRedis:
    u = urlparse(url)
    return MiniRedis(u.hostname or "127.0.0.1", u.port or 6379, int((u.path or "/0")[1:] or 0))


def redis_cpu_s(r: MiniRedis) -> float:
    """CPU seconds the Redis server has used (all its threads)."""
    info = r.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    return sum(proc_cpu_split(pid))


def proc_cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def proc_wakeups(pid: int) -> int:
    """Voluntary context switches of a process's main thread: how often its event loop
    went to sleep waiting for I/O (each costs a wake-up, which on a VM is not free)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    return 0


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def measure(
    redis_url: str,
    daemons: int,
    *,
    consumers: int = 100,
    n: int | None = None,
    python: str = DEFAULT_PY,
    driver: str = "bench.drivers.jobqd_driver",
    timeout: float = 180.0,
    counter: Callable[[], int] | None = None,
    cpu_probe: Callable[[], float] | None = None,
    flush: Callable[[], None] | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run `daemons` worker processes of `driver` on `redis_url` over `n` pre-filled
    no-op jobs; return jobs/s and CPU per job between 10 % and 90 % done.

    counter / cpu_probe / flush default to `GET bench:done`, `INFO cpu` and FLUSHDB on
    redis_url (a cluster passes its own: the counter's node, every node's CPU)."""
    n = n or 25_000 * daemons
    r = mini(redis_url) if not (counter and cpu_probe and flush) else None
    counter = counter or (lambda: r.get_int("bench:done"))  # type: ignore[union-attr]
    cpu_probe = cpu_probe or (lambda: redis_cpu_s(r))  # type: ignore[arg-type]
    (flush or (lambda: r.cmd("FLUSHDB")))()  # type: ignore[union-attr]
    penv = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}
    penv.pop("VIRTUAL_ENV", None)
    fill = subprocess.run(
        [python, "-m", driver, "enqueue", "--redis-url", redis_url, "--mode", "batch",
         "--n", str(n), "--workload", "noop"],
        cwd=ROOT, env=penv, capture_output=True, text=True, timeout=600, check=True)
    filled = json.loads(fill.stdout.strip().splitlines()[-1])["n"]
    lo, hi = int(filled * 0.1), int(filled * 0.9)
    logs = tempfile.TemporaryFile()  # noqa: SIM115 - closed below
    procs = [subprocess.Popen(
        [python, "-m", driver, "worker", "--redis-url", redis_url, "--concurrency",
         str(consumers), "--workload", "noop"],
        cwd=ROOT, env=penv, stdout=subprocess.DEVNULL, stderr=logs, start_new_session=True)
        for _ in range(daemons)]
    t0 = t1 = d0 = d1 = 0.0
    rc0 = rc1 = 0.0
    pc0: list[float] = []
    pc1: list[float] = []
    wk0: list[int] = []
    sy0: list[float] = []
    sy1: list[float] = []
    wk1: list[int] = []
    try:
        deadline = time.monotonic() + timeout
        while True:
            done = counter()
            now = time.monotonic()
            if not t0 and done >= lo:
                t0, d0, rc0, pc0 = now, done, cpu_probe(), [proc_cpu_s(p.pid) for p in procs]
                wk0 = [proc_wakeups(p.pid) for p in procs]
                sy0 = [proc_cpu_split(p.pid)[1] for p in procs]
            if t0 and done >= hi:
                t1, d1, rc1, pc1 = now, done, cpu_probe(), [proc_cpu_s(p.pid) for p in procs]
                wk1 = [proc_wakeups(p.pid) for p in procs]
                sy1 = [proc_cpu_split(p.pid)[1] for p in procs]
                break
            if now > deadline or any(p.poll() is not None for p in procs):
                logs.seek(0)
                tail = logs.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"{done}/{filled} jobs done after {now - deadline + timeout:.0f}"
                                   f" s (a daemon exited or too slow)\n{tail}")
            time.sleep(0.005)
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        logs.close()
    jobs = d1 - d0
    secs = t1 - t0
    daemon_cpu = sum(b - a for a, b in zip(pc0, pc1, strict=True))
    return {
        "daemons": daemons, "consumers": consumers, "n": filled, "window_jobs": jobs,
        "window_s": secs, "jobs_per_s": jobs / secs,
        "redis_us_per_job": (rc1 - rc0) / jobs * 1e6,
        "daemon_us_per_job": daemon_cpu / jobs * 1e6,
        "daemon_sys_us_per_job": sum(b - a for a, b in zip(sy0, sy1, strict=True)) / jobs * 1e6,
        "wakeups_per_job": sum(b - a for a, b in zip(wk0, wk1, strict=True)) / jobs,
        "redis_cpu_pct": (rc1 - rc0) / secs * 100,
        "daemon_cpu_pct": daemon_cpu / secs * 100,
        "at": time.strftime("%H:%M:%S", time.gmtime()), "loadavg": loadavg(),
    }


def write_results(out: Path, name: str, lines: list[str], *, started: str,
                  args: dict[str, Any], runs: Any) -> None:
    """`<out>/<name>.md` (the report's lines) and `<out>/<name>.json` (when it started,
    the arguments, every run), then the report on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    (out / f"{name}.json").write_text(json.dumps(
        {"started": started, "args": {k: str(v) for k, v in args.items()}, "runs": runs},
        indent=1))
    print("\n".join(lines))


def capacity(redis_us: float, daemon_us: float, host_cores: int = 16) -> dict[str, float]:
    """What one Redis core carries and how many one-core daemons it takes to fill it."""
    redis_core = 1e6 / redis_us  # jobs/s when Redis's one main thread is 100 % busy
    daemon_core = 1e6 / daemon_us  # jobs/s of one daemon at 100 % of a core
    need = redis_core / daemon_core  # == daemon_us / redis_us
    return {"redis_core_jobs_per_s": redis_core, "daemon_core_jobs_per_s": daemon_core,
            "daemons_to_saturate": need, "daemons_whole": math.ceil(need),
            "fits_on_host": math.ceil(need) + 1 <= host_cores}


def report(runs: dict[int, list[dict[str, Any]]], consumers: int, n_per_daemon: int,
           repeats: int, started: str) -> tuple[list[str], dict[str, float]]:
    counts = list(runs)

    def med(k: int, f: str) -> float:
        return statistics.median(x[f] for x in runs[k])

    lines = [f"# Several jobqd daemons on one Redis ({started})", "",
             f"`bench/daemons.py`: consumers {consumers} per daemon, "
             f"{n_per_daemon:,} no-op jobs per daemon, medians of {repeats} interleaved "
             f"runs, measured from 10 % to 90 % done; {os.cpu_count()} CPUs shared with "
             "Redis and everything else on the machine. R = Redis CPU µs/job, D = daemon "
             "CPU µs/job; 1e6 / R = jobs/s one Redis core carries, D / R = one-core daemons "
             "it takes to saturate it.", "",
             "| daemons | jobs/s | R: Redis CPU µs/job | Redis CPU % | D: daemon CPU µs/job "
             "| daemons' CPU % | 1e6 / R | D / R | last run (UTC), load avg |",
             "|---|---|---|---|---|---|---|---|---|"]
    for k in counts:
        last = runs[k][-1]
        r, d = med(k, "redis_us_per_job"), med(k, "daemon_us_per_job")
        lines.append(f"| {k} | {med(k, 'jobs_per_s'):,.0f} | {r:.1f} | "
                     f"{med(k, 'redis_cpu_pct'):.0f} | {d:.1f} | "
                     f"{med(k, 'daemon_cpu_pct'):.0f} | {1e6 / r:,.0f} | {d / r:.1f} | "
                     f"{last['at']}, {last['loadavg']} |")
    cap = capacity(med(counts[0], "redis_us_per_job"), med(counts[0], "daemon_us_per_job"))
    lines += ["", f"With {counts[0]} daemon(s): one Redis core carries 1e6 / "
              f"{med(counts[0], 'redis_us_per_job'):.1f} µs = "
              f"**{cap['redis_core_jobs_per_s']:,.0f} jobs/s**; one daemon at a full core does "
              f"1e6 / {med(counts[0], 'daemon_us_per_job'):.1f} µs = "
              f"{cap['daemon_core_jobs_per_s']:,.0f} jobs/s; so "
              f"{cap['daemons_to_saturate']:.1f} → **{cap['daemons_whole']} daemons** "
              f"(one core each, plus one for Redis) saturate one Redis.", ""]
    return lines, cap


def render(path: Path) -> int:
    data = json.loads(path.read_text())
    runs = {int(k): v for k, v in data["runs"].items()}
    args = data["args"]
    lines, _ = report(runs, int(args["consumers"]), int(args["n_per_daemon"]),
                      int(args["repeats"]), data["started"])
    (path.parent / "daemons.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--daemons", default="1,2,4")
    ap.add_argument("--consumers", type=int, default=100)
    ap.add_argument("--n-per-daemon", type=int, default=25_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--redis-url", help="a loopback Redis DB to FLUSHDB and use (default: own)")
    ap.add_argument("--python", default=DEFAULT_PY, help="python with jobqd's dependencies")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--render", type=Path, help="only rewrite daemons.md from this daemons.json")
    a = ap.parse_args()
    if a.render:
        return render(a.render)
    counts = [int(x) for x in a.daemons.split(",")]
    server = RedisServer(None, 6392) if not a.redis_url else None
    url = a.redis_url or (server.url if server else "")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    runs: dict[int, list[dict[str, Any]]] = {k: [] for k in counts}
    try:
        for rep in range(a.repeats):  # interleaved: drift of the machine hits all alike
            for k in counts:
                res = measure(url, k, consumers=a.consumers, n=a.n_per_daemon * k,
                              python=a.python)
                runs[k].append(res)
                print(f"[{res['at']} load {res['loadavg']}] {rep + 1}/{a.repeats} {k} daemon(s):"
                      f" {res['jobs_per_s']:,.0f} jobs/s, Redis {res['redis_us_per_job']:.1f}"
                      f" µs/job ({res['redis_cpu_pct']:.0f} % CPU), daemons"
                      f" {res['daemon_us_per_job']:.1f} µs/job ({res['daemon_cpu_pct']:.0f} %"
                      " CPU)", flush=True)
    finally:
        if server:
            server.kill()

    lines, cap = report(runs, a.consumers, a.n_per_daemon, a.repeats, started)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "daemons.md").write_text("\n".join(lines))
    (a.out / "daemons.json").write_text(json.dumps(
        {"started": started, "args": {k: str(v) for k, v in vars(a).items()},
         "runs": {str(k): v for k, v in runs.items()}, "capacity": cap}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
