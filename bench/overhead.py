"""What a queue costs per job beyond the job's own work: jobqd against the reference
Streams worker (bench/drivers/reference_driver.py), each in one worker process at
--consumers, with the usual no-op body (one INCR) and with an empty body (no Redis
call of its own; BENCH_EMPTY_BODY=1, see bench/drivers/common.py), interleaved,
medians of --repeats (issue #17).

    .venv/bin/python bench/overhead.py                     # consumers 100, 3 repeats
    .venv/bin/python bench/overhead.py --consumers 16 --repeats 5

Reported per system and body: jobs/s, worker CPU per job (utime + stime, /proc) and
Redis CPU per job (INFO cpu), between 10 % and 90 % of the jobs done
(`bench.daemons.measure`). The empty body's worker CPU per job is the queue's own
overhead; the difference between the two bodies is what the job's one INCR costs
inside that worker. CPU per job is steadier than jobs/s on a shared machine, and the
ratio jobqd / reference is what to quote. Writes bench/results/overhead.{md,json}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.daemons import DEFAULT_PY, measure, write_results  # noqa: E402
from bench.run import RedisServer  # noqa: E402

SYSTEMS = {"jobqd": "bench.drivers.jobqd_driver", "reference": "bench.drivers.reference_driver"}
BODIES = {"incr": {}, "empty": {"BENCH_EMPTY_BODY": "1"}}
KEYS = ("jobs_per_s", "daemon_us_per_job", "redis_us_per_job", "wakeups_per_job")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--consumers", type=int, default=100)
    ap.add_argument("--n", type=int, default=30_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--python", default=DEFAULT_PY, help="python with jobqd's dependencies")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    a = ap.parse_args()
    server = RedisServer(None, 6394)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    runs: dict[str, list[dict[str, Any]]] = {f"{s}/{b}": [] for s in SYSTEMS for b in BODIES}
    try:
        for rep in range(a.repeats):
            for body, env in BODIES.items():
                for system, driver in SYSTEMS.items():
                    n = a.n * (4 if body == "empty" else 1)  # empty jobs run ~4x faster
                    res = measure(server.url, 1, consumers=a.consumers, n=n, python=a.python,
                                  driver=driver, env=env)
                    runs[f"{system}/{body}"].append(res)
                    print(f"[{res['at']} load {res['loadavg']}] {rep + 1}/{a.repeats} "
                          f"{system} {body}: {res['jobs_per_s']:,.0f} jobs/s, worker "
                          f"{res['daemon_us_per_job']:.1f} µs/job (sys "
                          f"{res['daemon_sys_us_per_job']:.1f}), Redis "
                          f"{res['redis_us_per_job']:.1f} µs/job, {res['wakeups_per_job']:.3f} "
                          "wake-ups/job", flush=True)
    finally:
        server.kill()
    med = {k: {m: statistics.median(r[m] for r in rs) for m in KEYS} for k, rs in runs.items()}
    lines = [f"# Per-job overhead: jobqd vs the reference worker ({started})", "",
             f"One worker process, consumers {a.consumers}, medians of {a.repeats} "
             "(`bench/overhead.py`). Empty body: no Redis call in the job.", "",
             "| system | body | jobs/s | worker CPU µs/job | Redis CPU µs/job |",
             "|---|---|---|---|---|"]
    for k, m in med.items():
        system, body = k.split("/")
        lines.append(f"| {system} | {body} | {m['jobs_per_s']:,.0f} | "
                     f"{m['daemon_us_per_job']:.1f} | {m['redis_us_per_job']:.1f} |")
    lines.append("")
    for body in BODIES:
        j, r = med[f"jobqd/{body}"], med[f"reference/{body}"]
        pairs = [x["jobs_per_s"] / y["jobs_per_s"]
                 for x, y in zip(runs[f"jobqd/{body}"], runs[f"reference/{body}"], strict=True)]
        lines.append(f"- {body} body: jobqd runs at {j['jobs_per_s'] / r['jobs_per_s']:.0%} of "
                     f"the reference's jobs/s (per repeat: "
                     f"{', '.join(f'{x:.0%}' for x in pairs)}; their median "
                     f"{statistics.median(pairs):.0%}); its worker CPU per job is "
                     f"{j['daemon_us_per_job'] / r['daemon_us_per_job']:.2f}x the reference's.")
    j_incr = med["jobqd/incr"]["daemon_us_per_job"] - med["jobqd/empty"]["daemon_us_per_job"]
    r_incr = (med["reference/incr"]["daemon_us_per_job"]
              - med["reference/empty"]["daemon_us_per_job"])
    lines.append(f"- the job's one INCR costs {j_incr:.0f} µs of worker CPU in jobqd and "
                 f"{r_incr:.0f} µs in the reference.")
    write_results(a.out, "overhead", lines, started=started, args=vars(a), runs=runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
