#!/usr/bin/env bash
# Issues #17 and #12, the whole measurement in one command (from the checkout to measure,
# normally main after the merge; it needs that checkout's .venv):
#
#     bench/final_run.sh                 # every step below, in this order (~45 min on 2 cores)
#     bench/final_run.sh peers daemons   # only some steps
#
# steps:
#   peers     bench/run.py: jobqd, jobqd on redis-py 5.3.1, the reference Streams worker,
#             streaq and taskiq (the best peer), core phases + recovery, medians of 3
#             -> bench/results/perf/results.md (the "jobqd vs reference" table is in it)
#   daemons   bench/daemons.py: 1, 2, 4 daemons on one Redis, medians of 3
#             -> bench/results/perf/daemons.md
#   profile   bench/profile_daemon.py at consumers 100: this checkout ("after") and
#             $BEFORE17 ("before") -> bench/results/perf/profile-{after,before}.md
#   compare12 bench/compare_revisions.py $BEFORE12 vs $AFTER, medians of 3, core + recovery
#             -> bench/results/compare-restructure.md (issue #12's done-criterion)
#   compare17 the same for $BEFORE17 vs $AFTER -> bench/results/compare-perf.md (#17's
#             "no regression elsewhere": enqueue, latency p50/p99 at 500 jobs/s, recovery)
#
# BEFORE12 (default 9303fe1, the base of the restructure), BEFORE17 (default dbd1c7e,
# main before the Performance II work) and AFTER (default main) are git revisions;
# each is exported once to /tmp/jobqd-rev-<sha> with its own venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=bench/results/perf
BEFORE12=${BEFORE12:-9303fe1929c4dfb7914e992d5cb95588c79effe9}
BEFORE17=${BEFORE17:-dbd1c7e326bd7f0ebb2c3b2ca5a377a715e55594}
AFTER=${AFTER:-main}
STEPS=("$@")
[ ${#STEPS[@]} -gt 0 ] || STEPS=(peers daemons profile compare12 compare17)

"$PY" -c "import matplotlib" 2>/dev/null || "$PY" -m pip install -q matplotlib
[ -x .venv/bin/py-spy ] || "$PY" -m pip install -q py-spy
mkdir -p "$OUT"
stamp() { echo "=== $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg): $*"; }

for step in "${STEPS[@]}"; do
  stamp "$step"
  case "$step" in
    peers)
      "$PY" bench/run.py --systems jobqd,jobqd_redis5,reference,streaq,taskiq,pgqueuer \
        --phases core,recovery --repeats 3 --n 20000 --out "$OUT" ;;
    daemons)
      "$PY" bench/daemons.py --daemons 1,2,4 --repeats 3 --out "$OUT" ;;
    profile)
      "$PY" bench/profile_daemon.py --label after --out "$OUT"
      "$PY" bench/profile_daemon.py --label before --rev "$BEFORE17" --out "$OUT" ;;
    compare12)
      "$PY" bench/compare_revisions.py --before-rev "$BEFORE12" --after-rev "$AFTER" \
        --repeats 3 --name compare-restructure ;;
    compare17)
      "$PY" bench/compare_revisions.py --before-rev "$BEFORE17" --after-rev "$AFTER" \
        --repeats 3 --name compare-perf ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
stamp done
