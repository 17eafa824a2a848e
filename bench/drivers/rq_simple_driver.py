"""RQ with rq.SimpleWorker: runs jobs in the worker process (no fork per job).

Not RQ's default; reported as a separate system "rq_simple" so the cost of
the default fork-per-job model is visible.  Same environment as rq.
"""

from __future__ import annotations

from bench.drivers import common as c
from bench.drivers.rq_driver import RqDriver


class RqSimpleDriver(RqDriver):
    name = "rq_simple"
    notes = "rq.SimpleWorker: no fork, one job at a time"
    worker_class = "SimpleWorker"


if __name__ == "__main__":
    c.run_main(RqSimpleDriver)
