"""jobqd against jobqd: the same bench (`bench/run.py`, core phases, optionally
recovery) for two revisions, interleaved in one run, medians of N. For "no regression"
claims (issue #12: before = 9303fe1, after = main).

    .venv/bin/python bench/compare_revisions.py --before-rev 9303fe1 --after-rev main

`--before-rev`/`--after-rev` take any git revision of this repository: each is
exported (`git archive`, no worktree is registered) to /tmp/jobqd-rev-<sha>/ with its
own .venv (`pip install -e .`, that revision's dependencies), made once and reused.
`--before`/`--after` take existing checkouts with a .venv instead.

Both sides run under THIS checkout's harness and drivers (`bench/run.py --systems jobqd
--jobqd-src <checkout> --jobqd-python <checkout>/.venv/bin/python`): only `jobqd` is
imported from the other tree, so a change to the bench cannot pass for a change to
jobqd. Each repeat runs before, then after (alternating, so drift of the machine hits
both alike). Writes <name>.md and <name>.json to --out: the median of each metric, the
after/before ratio, the per-repeat ratios, and when and under which load each ran.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
METRICS = ("proc_default", "proc_100", "io_100", "enqueue_single", "enqueue_batch",
           "lat_p50", "lat_p99", "recovery_s")
LOWER_IS_BETTER = {"lat_p50", "lat_p99", "recovery_s"}
UNITS = {"lat_p50": " ms", "lat_p99": " ms", "recovery_s": " s"}


def checkout(rev: str) -> Path:
    """/tmp/jobqd-rev-<sha>: `rev` exported with its own venv (made once)."""
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"],
                         check=True, capture_output=True, text=True).stdout.strip()
    d = Path(tempfile.gettempdir()) / f"jobqd-rev-{sha[:12]}"
    done = d / ".bench-ready"
    if done.exists():
        return d
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    print(f"exporting {rev} ({sha[:12]}) to {d} and installing its venv", flush=True)
    archive = subprocess.Popen(["git", "-C", str(ROOT), "archive", sha], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(d)], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise SystemExit(f"git archive {sha} failed")
    base = getattr(sys, "_base_executable", None) or sys.executable
    subprocess.run([base, "-m", "venv", str(d / ".venv")], check=True)
    subprocess.run([str(d / ".venv" / "bin" / "python"), "-m", "pip", "install", "-q",
                    "--disable-pip-version-check", "-e", str(d)], check=True, timeout=1200)
    done.write_text(sha + "\n")
    return d


def one(checkout: Path, a: argparse.Namespace, out: Path) -> dict[str, float]:
    python = str(checkout / ".venv" / "bin" / "python")
    subprocess.run([sys.executable, str(HERE / "run.py"), "--systems", "jobqd",
                    "--phases", a.phases, "--repeats", "1", "--n", str(a.n),
                    "--jobqd-python", python, "--jobqd-src", str(checkout),
                    "--no-install", "--out", str(out)],
                   check=True, timeout=3600, cwd=ROOT)
    data = json.loads((out / "results.json").read_text())
    metrics = data["systems"]["jobqd"]["metrics"]
    res = {m: float(metrics[m]["runs"][0]) for m in METRICS
           if metrics.get(m, {}).get("runs") and metrics[m]["runs"][0] is not None}
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", help="the old checkout (with its .venv)")
    p.add_argument("--after", help="the new checkout (with its .venv)")
    p.add_argument("--before-rev", help="git revision for the old side (exported to /tmp)")
    p.add_argument("--after-rev", help="git revision for the new side (exported to /tmp)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--phases", default="core,recovery", help="bench/run.py --phases")
    p.add_argument("--name", default="compare", help="output file name (without .md/.json)")
    p.add_argument("--out", default=str(HERE / "results"))
    a = p.parse_args()
    sides = {"before": (a.before, a.before_rev), "after": (a.after, a.after_rev)}
    trees: dict[str, Path] = {}
    for label, (path, rev) in sides.items():
        if bool(path) == bool(rev):
            p.error(f"give exactly one of --{label} and --{label}-rev")
        trees[label] = checkout(rev) if rev else Path(path).resolve()
    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    when: dict[str, list[str]] = {"before": [], "after": []}
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.repeats):
            for label in ("before", "after"):
                t = time.strftime("%H:%M", time.gmtime())
                load = " ".join(f"{x:.2f}" for x in os.getloadavg())
                runs[label].append(one(trees[label], a, Path(tmp) / f"{label}-{i}"))
                when[label].append(f"{t} (load {load})")
    rows = []
    for m in METRICS:
        b = [r.get(m) for r in runs["before"]]
        f = [r.get(m) for r in runs["after"]]
        bv, fv = [x for x in b if x is not None], [x for x in f if x is not None]
        if not bv or not fv:
            continue
        mb, mf = statistics.median(bv), statistics.median(fv)
        pairs = [y / x for x, y in zip(b, f, strict=True) if x and y]
        rows.append((m, mb, mf, mf / mb if mb else float("nan"), pairs))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    revs = {k: (trees[k] / ".bench-ready").read_text().strip()[:12]
            if (trees[k] / ".bench-ready").exists() else str(trees[k]) for k in trees}
    (out / f"{a.name}.json").write_text(json.dumps(
        {"started": started, "args": vars(a), "trees": {k: str(v) for k, v in trees.items()},
         "revs": revs, "runs": runs, "when": when}, indent=1))
    lines = [f"# jobqd {revs['before']} (before) vs {revs['after']} (after), {started}", "",
             f"`bench/compare_revisions.py`: bench/run.py --phases {a.phases}, N = {a.n:,}, "
             f"medians of {a.repeats}, alternating before/after; same harness for both.", "",
             "| metric | before (median) | after (median) | after / before | per repeat |",
             "|---|---|---|---|---|"]
    for m, mb, mf, ratio, pairs in rows:
        unit = UNITS.get(m, " /s")
        lines.append(f"| {m} | {mb:,.2f}{unit} | {mf:,.2f}{unit} | {ratio:.2f}"
                     f"{' (lower is better)' if m in LOWER_IS_BETTER else ''} | "
                     + ", ".join(f"{x:.2f}" for x in pairs) + " |")
    lines += ["", "Runs started (UTC, 1-min load average): "
              + "; ".join(f"{k}: " + ", ".join(v) for k, v in when.items()), ""]
    (out / f"{a.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
