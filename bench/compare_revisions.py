"""jobqd against jobqd: the same bench (`bench/run.py`, core phases) for two builds,
interleaved in one run, medians of N. For "no regression" claims of a refactor.

    python bench/compare_revisions.py --before /path/to/old/venv/bin/python \
        --after .venv/bin/python --repeats 3 --n 10000

Each repeat runs `bench/run.py --systems jobqd --phases core --repeats 1` once for
each build, alternating (before, after, before, after...) so drift of the machine
hits both alike, and writes `bench/results/compare.md` (and `.json`): the median of
each metric, and the after/before ratio. The same bench drivers run both builds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
METRICS = ("proc_default", "proc_100", "io_100", "enqueue_single", "enqueue_batch",
           "lat_p50", "lat_p99")
LOWER_IS_BETTER = {"lat_p50", "lat_p99"}


def one(python: str, n: int, out: Path) -> dict[str, float]:
    subprocess.run([sys.executable, str(HERE / "run.py"), "--systems", "jobqd", "--phases",
                    "core", "--repeats", "1", "--n", str(n), "--jobqd-python", python,
                    "--no-install", "--out", str(out)], check=True, timeout=1800)
    data = json.loads((out / "results.json").read_text())
    metrics = data["systems"]["jobqd"]["metrics"]
    return {m: float(metrics[m]["runs"][0]) for m in METRICS if metrics.get(m, {}).get("runs")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="python of the old build's venv")
    p.add_argument("--after", required=True, help="python of the new build's venv")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--out", default=str(HERE / "results"))
    a = p.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.repeats):
            for label in ("before", "after"):
                python = a.before if label == "before" else a.after
                runs[label].append(one(python, a.n, Path(tmp) / f"{label}-{i}"))
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
