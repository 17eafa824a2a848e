"""Instructions per job (valgrind's callgrind): what jobqd and the reference worker
execute per job in steady state. Unlike jobs/s or CPU time, the count does not depend
on what else the machine is doing, so a change of a few per cent shows (issue #17).

    .venv/bin/python bench/instructions.py    # jobqd, reference; no-op, empty body; consumers 100
    .venv/bin/python bench/instructions.py --consumers 16 --systems jobqd
    .venv/bin/python bench/instructions.py --systems jobqd --jobqd-src /tmp/jobqd-rev-X \\
        --jobqd-python /tmp/jobqd-rev-X/.venv/bin/python            # another revision, same drivers

Each run: its own redis-server on loopback, `--n` pre-filled jobs, the driver's worker
under `valgrind --tool=callgrind`; the counters are zeroed at 20 % of the jobs done and
dumped at 80 % (`callgrind_control`), so start-up and the tail are left out. A job under
valgrind runs ~50x slower, so the daemon's timers (its 50-ms deadline tick, heartbeats,
the memory guard) fire ~50x more often per job than in a real run. So each system is
also counted idle first (`idle_rate`: 10 s with no jobs), and the "without idle" column
subtracts that rate times the counted window's length, times how often the timers fired
under load compared with idle (its memory guard's INFO rate; a busy loop runs them
late): quote that column. Raw counts of the same code moved by 8 % with the window's
length (398k and 431k per job at consumers 16); without idle they agree within ~3 %. `--jobqd-src`
runs another checkout's `jobqd` under this checkout's `bench` (`run.pythonpath`, as
`run.py` does). jobqd runs with `prefetch` set to what its default picks for short jobs
(`jobqd.pool.PREFETCH_PER_CONSUMER` per consumer). Keep `--n` at its default or above:
with 2,000 jobs the window is not yet steady (the same code counted 97k instead of 132k
per empty-body job).
Needs valgrind. Prints a table and writes bench/results/<--name>.{md,json}.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.daemons import DEFAULT_PY, mini, wait_ready_line, write_results  # noqa: E402
from bench.run import MiniRedis, RedisServer, pythonpath  # noqa: E402
from jobqd.pool import PREFETCH_PER_CONSUMER  # noqa: E402

DRIVERS = {"jobqd": "bench.drivers.jobqd_driver", "reference": "bench.drivers.reference_driver"}
BODIES = {"noop": {}, "empty": {"BENCH_EMPTY_BODY": "1"}}
LO, HI = 0.2, 0.8  # the window counted, as fractions of the jobs done
IDLE_S = 10.0  # how long the idle rate is counted
IDLE_WARMUP_S = 3.0  # after the ready line, before the idle count starts
# jobqd's unset `prefetch` buffers PREFETCH_PER_CONSUMER jobs per consumer while runs
# average under 50 ms, as a no-op job's do in a real run; under valgrind a run that
# awaits Redis lasts ~50x longer, which would switch prefetch off and count a fetch
# pattern real runs never have. So jobqd is counted with that prefetch set outright.


def _callgrind(python: str, driver: str, *, url: str, consumers: int, src: str,
               penv: dict[str, str], out: str, stdout: int = subprocess.DEVNULL
               ) -> subprocess.Popen[bytes]:
    """The driver's worker under callgrind (stdout=PIPE: to wait for its ready line)."""
    with open(os.path.join(out, "stderr"), "w") as err:
        return subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/cg.%p",
             python, "-m", driver, "worker", "--redis-url", url, "--concurrency",
             str(consumers), "--workload", "noop"],
            cwd=src, env=penv, stdout=stdout, stderr=err, start_new_session=True)


def _dumped(out: str) -> int:
    """Instructions in the newest dump (counted since the last zeroing)."""
    dumps = sorted(Path(out).glob("cg.*.*"), key=os.path.getmtime)  # cg.<pid>.<dump no>
    if not dumps:
        raise RuntimeError(f"callgrind wrote no dump in {out}")
    m = re.search(r"^(?:summary|totals):\s*(\d+)", dumps[-1].read_text(errors="replace"), re.M)
    if m is None:
        raise RuntimeError(f"no instruction total in {dumps[-1]}")
    return int(m.group(1))


def _control(flag: str, pid: int) -> float:
    """Run a callgrind_control command (-z zero, -d dump); the time halfway through it."""
    t = time.monotonic()
    subprocess.run(["callgrind_control", flag, str(pid)], check=True, capture_output=True)
    return (t + time.monotonic()) / 2


def _env(src: str, env: dict[str, str]) -> dict[str, str]:
    penv = {**os.environ, "PYTHONPATH": src, **env}
    penv.pop("VIRTUAL_ENV", None)
    return penv


def _stop(p: subprocess.Popen[bytes], out: str) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)
    p.wait(30)
    shutil.rmtree(out, ignore_errors=True)


def _info_calls(r: MiniRedis) -> int:
    """INFO commands the server has run: jobqd's memory guard sends one every 0.2 s, so
    their rate says how often its sleep-after-work timers actually fired."""
    stat = r.info("commandstats").get("cmdstat_info", "calls=0")
    return int(stat.split(",")[0].split("=")[1])


def idle_rate(url: str, driver: str, *, consumers: int, python: str, src: str,
              env: dict[str, str], seconds: float = IDLE_S) -> tuple[float, float]:
    """Instructions per second the worker executes with nothing to do: its timers and
    polls (jobqd's deadline tick, heartbeats, memory guard, blocking fetches...), which
    run per second, not per job. Under valgrind a job takes ~50x longer, so per job
    they weigh ~50x what they do in a real run; `count` subtracts them. Also returns
    the INFO commands per second meanwhile (`_info_calls`)."""
    r = mini(url)
    r.cmd("FLUSHDB")
    out = tempfile.mkdtemp(prefix="bench-callgrind-")
    p = _callgrind(python, driver, url=url, consumers=consumers, src=src,
                   penv=_env(src, env), out=out, stdout=subprocess.PIPE)
    try:
        wait_ready_line(p, 300)
        time.sleep(IDLE_WARMUP_S)  # start-up's own tasks settle
        i0 = _info_calls(r)
        t0 = _control("-z", p.pid)
        time.sleep(seconds)
        t1 = _control("-d", p.pid)
        i1 = _info_calls(r)
        return _dumped(out) / (t1 - t0), (i1 - i0) / (t1 - t0)
    finally:
        _stop(p, out)


def count(url: str, driver: str, *, consumers: int, n: int, python: str, src: str,
          env: dict[str, str], idle: tuple[float, float] = (0.0, 0.0),
          timeout: float = 900.0) -> dict[str, Any]:
    """Instructions executed by one worker process between LO and HI of `n` jobs done.
    `per_job_busy` leaves out the idle rate (`idle_rate`) for the window's length,
    scaled by how often the timers fired meanwhile compared with idle (INFO commands
    per second; a loop busy with jobs runs its sleep-after-work timers late)."""
    r = mini(url)
    r.cmd("FLUSHDB")
    penv = _env(src, env)
    subprocess.run([python, "-m", driver, "enqueue", "--redis-url", url, "--mode", "batch",
                    "--n", str(n), "--workload", "noop"],
                   cwd=src, env=penv, check=True, capture_output=True, timeout=600)
    out = tempfile.mkdtemp(prefix="bench-callgrind-")
    p = _callgrind(python, driver, url=url, consumers=consumers, src=src, penv=penv,
                   out=out)
    try:
        deadline = time.monotonic() + timeout

        def wait_for(done: float) -> int:
            while (got := r.get_int("bench:done")) < done:
                if p.poll() is not None or time.monotonic() > deadline:
                    tail = Path(out, "stderr").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"worker died or too slow at {got}/{n} jobs\n{tail}")
                time.sleep(0.05)
            return got

        c0 = wait_for(n * LO)
        i0 = _info_calls(r)
        t0 = _control("-z", p.pid)
        c1 = r.get_int("bench:done")
        wait_for(n * HI)
        d1 = r.get_int("bench:done")
        t1 = _control("-d", p.pid)
        d2 = r.get_int("bench:done")
        i1 = _info_calls(r)
        total = _dumped(out)
    finally:
        _stop(p, out)
    # the jobs done between zero and dump: the reads before and after each control call
    # bracket it; their means are the estimate, their spreads say how good it is
    jobs = (d1 + d2) / 2 - (c0 + c1) / 2
    window_s = t1 - t0
    timers, busy = without_idle(total, jobs, window_s, idle=idle,
                                info_per_s=(i1 - i0) / window_s)
    return {"instructions": total, "jobs": jobs, "per_job": total / jobs,
            "jobs_uncertainty": (d2 - d1) / 2 + (c1 - c0) / 2, "window_s": window_s,
            "idle_per_s": idle[0], "timers_vs_idle": timers, "per_job_busy": busy}


def without_idle(total: float, jobs: float, window_s: float, *, idle: tuple[float, float],
                 info_per_s: float) -> tuple[float, float]:
    """(how often the timers fired vs idle, instructions per job without them): `idle`
    is (instructions, INFO commands) per second with no jobs; the timers are taken to
    have fired at the loaded INFO rate over the idle one, at most 1 (a loop busy with
    jobs runs its sleep-after-work timers late, never early). A worker that sends no
    INFO (the reference) counts as firing at the idle rate."""
    idle_per_s, idle_info_per_s = idle
    timers = min(1.0, info_per_s / idle_info_per_s) if idle_info_per_s > 0 else 1.0
    return timers, (total - idle_per_s * timers * window_s) / jobs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--consumers", type=int, default=100)
    ap.add_argument("--n", type=int, default=5000, help="jobs per run (noop; empty: 1.2x)")
    ap.add_argument("--systems", default="jobqd,reference")
    ap.add_argument("--bodies", default="noop,empty")
    ap.add_argument("--python", default=DEFAULT_PY, help="python with jobqd's dependencies")
    ap.add_argument("--jobqd-src", help="another checkout whose `jobqd` to count")
    ap.add_argument("--jobqd-python", help="its python (default: --python)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--name", default="instructions", help="<out>/<name>.{md,json}")
    ap.add_argument("--port", type=int, default=6393,
                    help="its own redis-server's port (two runs at once need two ports)")
    ap.add_argument("--no-idle", action="store_true",
                    help="skip the idle count and the 'without idle' column")
    a = ap.parse_args()
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    server = RedisServer(None, a.port)
    rows: dict[str, dict[str, Any]] = {}
    try:
        for system in a.systems.split(","):
            # with --jobqd-src: this checkout's bench, the other checkout's jobqd (run.py's)
            src = pythonpath(system, a.jobqd_src)
            python = (a.jobqd_python or a.python) if system == "jobqd" and a.jobqd_src \
                else a.python
            env = {"JOBQD_BENCH_PREFETCH": str(PREFETCH_PER_CONSUMER * a.consumers)} \
                if system == "jobqd" else {}
            idle = (0.0, 0.0)
            if not a.no_idle:
                idle = idle_rate(server.url, DRIVERS[system], consumers=a.consumers,
                                 python=python, src=src, env=env)
                print(f"{system} idle: {idle[0]:,.0f} instructions and {idle[1]:.1f} INFO "
                      "commands per second", flush=True)
            for body in a.bodies.split(","):
                n = int(a.n * (1.2 if body == "empty" else 1))
                res = count(server.url, DRIVERS[system], consumers=a.consumers, n=n,
                            python=python, src=src, env={**env, **BODIES[body]}, idle=idle)
                rows[f"{system}/{body}"] = res
                print(f"{system} {body}: {res['per_job']:,.0f} instructions per job, "
                      f"{res['per_job_busy']:,.0f} without the idle rate x "
                      f"{res['timers_vs_idle']:.2f} "
                      f"({res['jobs']:.0f} jobs ± {res['jobs_uncertainty']:.0f} in "
                      f"{res['window_s']:.1f} s)", flush=True)
    finally:
        server.kill()
    label = f" (jobqd from {a.jobqd_src})" if a.jobqd_src else ""
    lines = [f"# Instructions per job{label}, consumers {a.consumers} ({started})", "",
             "`bench/instructions.py`: callgrind, one worker process, counted from 20 % to "
             "80 % of the jobs done. Empty body: no Redis call in the job."]
    if not a.no_idle:
        lines[-1] += (
            " *Without idle*: less what the worker executes per second with no jobs (its "
            "timers and polls, counted for 10 s) times the window's length, times how "
            "often its timers fired meanwhile compared with idle (*timers*: the rate of "
            "its memory guard's INFO commands, loaded / idle, at most 1). Under valgrind "
            "a job lasts ~50x longer, so per job the timers weigh ~50x what they do in "
            "a real run.")
    lines += ["", "| system | body | instructions per job | without idle | idle per s | "
              "timers | window | jobs counted |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {k.split('/')[0]} | {k.split('/')[1]} | {v['per_job']:,.0f} | "
              + (f"{v['per_job_busy']:,.0f} | {v['idle_per_s']:,.0f} | "
                 f"{v['timers_vs_idle']:.2f} | " if not a.no_idle else "- | - | - | ")
              + f"{v['window_s']:.1f} s | {v['jobs']:.0f} ± {v['jobs_uncertainty']:.0f} |"
              for k, v in rows.items()]
    for body in a.bodies.split(","):
        j, ref = rows.get(f"jobqd/{body}"), rows.get(f"reference/{body}")
        if j and ref:
            busy = "" if a.no_idle else (
                f" ({j['per_job_busy'] / ref['per_job_busy']:.2f}x without idle)")
            lines.append(f"\n- {body}: jobqd executes {j['per_job'] / ref['per_job']:.2f}x "
                         f"the reference's instructions per job{busy}.")
    write_results(a.out, a.name, lines, started=started, args=vars(a), runs=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
