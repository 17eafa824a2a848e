"""jobqd on redis-py 5.3.1 (still allowed by `redis>=5.0`): the very same driver and
daemon as `jobqd_driver.py`, run from bench/.venv-peers/jobqd_redis5 (jobqd's own
dependencies with `redis==5.3.1`; jobqd itself is imported from this checkout through
PYTHONPATH). bench/run.py runs only its processing phases, next to jobqd's, so one run
shows what the redis-py version costs."""

from __future__ import annotations

from bench.drivers import common as c
from bench.drivers.jobqd_driver import JobqdDriver


class JobqdRedis5Driver(JobqdDriver):
    name = "jobqd_redis5"
    notes = "jobqd's daemon, as `jobqd`, on redis-py 5.3.1 (the oldest the pin allows)"


if __name__ == "__main__":
    c.run_main(JobqdRedis5Driver)
