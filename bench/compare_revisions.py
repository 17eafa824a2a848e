"""jobqd against jobqd: the same bench (`bench/run.py`, core phases) for two
checkouts, interleaved in one run, medians of N. For "no regression" claims.

    git worktree add --detach /tmp/jobqd-before <commit>
    (cd /tmp/jobqd-before && python3 -m venv .venv && .venv/bin/pip install -e .)
    python bench/compare_revisions.py --before /tmp/jobqd-before --after . --repeats 3

Each repeat runs every checkout's own `bench/run.py --systems jobqd --phases core
--repeats 1` with its own `.venv` (the driver imports jobqd from the checkout it
runs in), alternating (before, after, before, after...) so drift of the machine
hits both alike, and writes `compare.md` (and `.json`) to --out: the median of each
metric, and the after/before ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
METRICS = ("proc_default", "proc_100", "io_100", "enqueue_single", "enqueue_batch",
           "lat_p50", "lat_p99")
LOWER_IS_BETTER = {"lat_p50", "lat_p99"}


def one(checkout: Path, n: int, out: Path) -> dict[str, float]:
    python = str(checkout / ".venv" / "bin" / "python")
    subprocess.run([python, str(checkout / "bench" / "run.py"), "--systems", "jobqd",
                    "--phases", "core", "--repeats", "1", "--n", str(n), "--jobqd-python",
                    python, "--no-install", "--out", str(out)], check=True, timeout=1800,
                   cwd=checkout)
    data = json.loads((out / "results.json").read_text())
    metrics = data["systems"]["jobqd"]["metrics"]
    return {m: float(metrics[m]["runs"][0]) for m in METRICS if metrics.get(m, {}).get("runs")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="the old checkout (with its .venv)")
    p.add_argument("--after", required=True, help="the new checkout (with its .venv)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--out", default=str(HERE / "results"))
    a = p.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.repeats):
            for label in ("before", "after"):
                checkout = Path(a.before if label == "before" else a.after).resolve()
                runs[label].append(one(checkout, a.n, Path(tmp) / f"{label}-{i}"))
    rows = []
    for m in METRICS:
        b = [r[m] for r in runs["before"] if m in r]
        f = [r[m] for r in runs["after"] if m in r]
        if not b or not f:
            continue
        mb, mf = statistics.median(b), statistics.median(f)
        rows.append((m, mb, mf, mf / mb if mb else float("nan")))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps({"args": vars(a), "runs": runs}, indent=1))
    lines = ["| metric | before (median) | after (median) | after / before |",
             "|---|---|---|---|"]
    for m, mb, mf, ratio in rows:
        unit = " ms" if m in LOWER_IS_BETTER else " /s"
        lines.append(f"| {m} | {mb:,.2f}{unit} | {mf:,.2f}{unit} | {ratio:.2f}"
                     f"{' (lower is better)' if m in LOWER_IS_BETTER else ''} |")
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
