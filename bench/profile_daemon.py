"""Profile one jobqd daemon under load with py-spy and print the top frames in µs of
CPU per job (issue #17: "profile with py-spy before and after").

    .venv/bin/pip install py-spy            # once (bench venv)
    .venv/bin/python bench/profile_daemon.py --label after          # consumers 100, 10 s
    .venv/bin/python bench/profile_daemon.py --label before --rev 9303fe1

It starts its own redis-server (or uses --redis-url, FLUSHDB'd), pre-fills --n no-op
jobs, starts the daemon (bench/drivers/jobqd_driver.py `worker`: the real `Daemon`) at
--consumers, lets it warm up, then samples it with `py-spy record --format raw
--nonblocking --gil` (only the thread holding the GIL, so idle waits are not
counted) for --seconds while counting the jobs finished in that window and the
daemon's CPU time (/proc/<pid>/stat). A frame's µs/job = its share of the samples x
the daemon's CPU per job in that window. `Runner.run` as a self frame is time in
uvloop's C code (callbacks, parsing, the poll itself when it holds the GIL).
Writes bench/results/profile-<label>.md; the raw stacks (for flamegraph.pl or
speedscope) go to bench/.logs/profile-<label>.raw.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.daemons import DEFAULT_PY, loadavg, mini, proc_cpu_s  # noqa: E402
from bench.run import RedisServer  # noqa: E402

LINE_NO = re.compile(r":\d+\)$")


def frame_key(frame: str) -> str:
    """'Pool._consumer (jobqd/pool.py:408)' -> 'Pool._consumer (jobqd/pool.py)'."""
    return LINE_NO.sub(")", frame)


def aggregate(raw: str) -> tuple[int, collections.Counter[str], collections.Counter[str]]:
    """Total samples, self samples per function, inclusive samples per function."""
    total = 0
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        frames = [frame_key(f) for f in stack.split(";")]
        total += k
        own[frames[-1]] += k
        for f in set(frames):
            incl[f] += k
    return total, own, incl


def pyspy() -> str:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        raise SystemExit("py-spy not found: .venv/bin/pip install py-spy")
    return exe


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", default="main")
    ap.add_argument("--consumers", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--n", type=int, default=300_000, help="jobs pre-filled (enough for "
                    "warm-up + --seconds at the expected rate)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--redis-url")
    ap.add_argument("--python", default=DEFAULT_PY)
    ap.add_argument("--jobqd-src", help="import jobqd from this checkout (harness from this one)")
    ap.add_argument("--rev", help="profile this git revision of jobqd (exported to /tmp with "
                    "its venv, as bench/compare_revisions.py does)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    a = ap.parse_args()
    exe = pyspy()
    if a.rev:
        from bench.compare_revisions import checkout

        tree = checkout(a.rev)
        a.jobqd_src, a.python = str(tree), str(tree / ".venv" / "bin" / "python")
    server = RedisServer(None, 6394) if not a.redis_url else None
    url = a.redis_url or (server.url if server else "")
    r = mini(url)
    r.cmd("FLUSHDB")
    path = str(ROOT)
    tmp = tempfile.mkdtemp(prefix="bench-prof-")
    if a.jobqd_src:
        os.symlink(ROOT / "bench", Path(tmp) / "bench")
        os.symlink(Path(a.jobqd_src).resolve() / "jobqd", Path(tmp) / "jobqd")
        path = tmp
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
    env.pop("VIRTUAL_ENV", None)
    logdir = ROOT / "bench" / ".logs"
    logdir.mkdir(exist_ok=True)
    raw_path = logdir / f"profile-{a.label}.raw"
    worker = None
    try:
        subprocess.run([a.python, "-m", "bench.drivers.jobqd_driver", "enqueue", "--redis-url",
                        url, "--mode", "batch", "--n", str(a.n), "--workload", "noop"],
                       cwd=path, env=env, check=True, timeout=900, stdout=subprocess.DEVNULL)
        worker = subprocess.Popen(
            [a.python, "-m", "bench.drivers.jobqd_driver", "worker", "--redis-url", url,
             "--concurrency", str(a.consumers), "--workload", "noop"],
            cwd=path, env=env, stdout=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while r.get_int("bench:done") < min(5000, a.n // 10):  # warm-up
            if time.monotonic() > deadline or worker.poll() is not None:
                raise SystemExit("the daemon did not start working")
            time.sleep(0.01)
        d0, c0, t0 = r.get_int("bench:done"), proc_cpu_s(worker.pid), time.monotonic()
        subprocess.run([exe, "record", "--pid", str(worker.pid), "--duration",
                        str(int(a.seconds)), "--rate", str(a.rate), "--format", "raw",
                        "--nonblocking", "--gil", "-o", str(raw_path)], check=True,
                       timeout=a.seconds + 60, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        d1, c1, t1 = r.get_int("bench:done"), proc_cpu_s(worker.pid), time.monotonic()
    finally:
        if worker:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
        r.close()
        if server:
            server.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    jobs = d1 - d0
    drained = d1 >= a.n
    total, own, incl = aggregate(raw_path.read_text())

    proc_us = (c1 - c0) / jobs * 1e6
    sampled_us = total / a.rate / jobs * 1e6

    def us(samples: int) -> float:
        """A frame's share of the samples times the daemon's /proc CPU per job."""
        return samples / total * proc_us

    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    src = f"jobqd from {a.rev or a.jobqd_src or 'this checkout'}"
    lines = [f"# py-spy profile of one jobqd daemon: {a.label} ({when}, load {loadavg()})", "",
             f"{src}; `bench/profile_daemon.py`.", "",
             f"consumers {a.consumers}, {jobs:,} no-op jobs in {t1 - t0:.1f} s = "
             f"{jobs / (t1 - t0):,.0f} jobs/s while sampled at {a.rate}/s"
             + (" (**the queue ran dry in the window**: raise --n)" if drained else "") + ".",
             f"CPU per job: **{proc_us:.1f} µs** by /proc (utime + stime, all threads); "
             f"py-spy's GIL-holding samples add up to {sampled_us:.1f} µs/job of wall time "
             "(more when the process is descheduled while holding the GIL). Each row is the "
             "frame's share of the samples times the /proc CPU per job.", "",
             "## Self time (the frame on top of the stack)", "",
             "| µs/job | % | function |", "|---|---|---|"]
    lines += [f"| {us(k):.2f} | {k / total:.1%} | `{f}` |" for f, k in own.most_common(a.top)]
    lines += ["", "## Inclusive time (the frame anywhere on the stack)", "",
              "| µs/job | % | function |", "|---|---|---|"]
    lines += [f"| {us(k):.2f} | {k / total:.1%} | `{f}` |" for f, k in incl.most_common(a.top)]
    lines += ["", f"Raw stacks: `{raw_path.relative_to(ROOT)}` (flamegraph.pl / speedscope)."]
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"profile-{a.label}.md").write_text("\n".join(lines) + "\n")
    (a.out / f"profile-{a.label}.json").write_text(json.dumps(
        {"label": a.label, "jobs": jobs, "seconds": t1 - t0, "rate": a.rate,
         "samples": total, "proc_cpu_us_per_job": proc_us, "sampled_us_per_job": sampled_us,
         "self": own.most_common(60), "inclusive": incl.most_common(60)}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
