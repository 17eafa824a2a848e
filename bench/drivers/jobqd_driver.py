"""jobqd driver: the real daemon (`jobqd.daemon.Daemon`, uvloop) in this process.

The worker writes a YAML config naming the job bodies in `common` (what the
reference worker calls, with no wrapper of our own) and runs the same
`Daemon` class `jobqd run` runs, with `consumers` = the requested concurrency
and the log level at WARNING; every other setting is jobqd's default (heartbeat
timeout 10 s, reaper every 5 s: what the recovery phase measures). Full status
tracking stays on (every job's
result record is written, `results.ttl_s` 3600). Producers use `jobqd.Client`;
the routing is published first with `jobqd.publish.publish_config` (what
`jobqd publish` does at deploy time).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any

from bench.drivers import common as c


def _results_section() -> str:
    """JOBQD_BENCH_KEEP=full|status|none: what a succeeded job keeps (`results.keep`;
    jobqd's default, full, when unset); JOBQD_BENCH_PREFETCH=N: `prefetch`."""
    keep = os.environ.get("JOBQD_BENCH_KEEP")
    prefetch = os.environ.get("JOBQD_BENCH_PREFETCH")  # jobqd's default when unset
    return ((f"results: {{keep: {keep}}}\n" if keep else "")
            + (f"prefetch: {int(prefetch)}\n" if prefetch else ""))


def _postgres_section() -> str:
    """bench/jobqd_variants.py sets these to measure PostgreSQL heartbeats / the ledger."""
    dsn = os.environ.get("JOBQD_BENCH_PG_DSN")
    if not dsn:
        return ""
    schema = os.environ.get("JOBQD_BENCH_PG_SCHEMA", "jobqd_bench")
    ledger = "true" if os.environ.get("JOBQD_BENCH_LEDGER") == "1" else "false"
    return f'postgres: {{dsn: "{dsn}", schema: {schema}, ledger: {ledger}}}\n'


def _config(url: str, concurrency: int) -> Any:
    from jobqd import config

    text = (
        f"""
redis: {{url: "{url}", prefix: jqbench}}
http: {{listen: "127.0.0.1:0"}}
consumers: {concurrency}
queues: {{{c.QUEUE}: {{weight: 1}}}}
tasks:
"""
        + "".join(
            # the job bodies themselves, as the reference worker calls them: no wrapper
            f"  {w}: {{handler: 'bench.drivers.common:async_{w}', queue: {c.QUEUE}}}\n"
            for w in c.WORKLOADS
        )
        + """
log: {level: WARNING}
""" + _postgres_section() + _results_section()
    )
    fd, path = tempfile.mkstemp(suffix=".yaml", prefix="jobqd-bench-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return config.load(path)


class JobqdProducer(c.AsyncProducer):
    def __init__(self, url: str) -> None:
        self.url = url

    async def open(self) -> None:
        from jobqd import Client
        from jobqd.publish import publish_config

        await publish_config(_config(self.url, 1))
        self.client = Client(self.url, "jqbench")

    async def one(self, workload: str, kwargs: dict[str, Any]) -> None:
        await self.client.enqueue(workload, kwargs)

    async def many(self, workload: str, kwargs_list: list[dict[str, Any]]) -> None:
        await self.client.enqueue_many(workload, kwargs_list)

    async def close(self) -> None:
        await self.client.close()


class JobqdDriver(c.Driver):
    name = "jobqd"
    dist = "jobqd"
    default_concurrency = 16  # consumers: 16 (etc/jobqd.yaml default)
    max_concurrency = None
    batch_api = "Client.enqueue_many()"
    notes = (
        "full status tracking on (result record per job); heartbeats in Redis; "
        "routing published once with `jobqd publish`"
    )

    def info(self) -> dict[str, Any]:
        from importlib.metadata import version

        import jobqd

        # where jobqd came from (bench/compare_revisions.py runs other checkouts)
        src = os.path.dirname(os.path.realpath(jobqd.__file__))
        return {**super().info(), "redis_py": version("redis"), "jobqd_src": src}

    def worker(self, a: argparse.Namespace) -> None:
        import uvloop

        from jobqd.daemon import Daemon

        cfg = _config(a.redis_url, a.concurrency)

        async def ready(_rt: Any) -> None:
            c.announce_ready()

        c.quiet_logging()
        uvloop.run(Daemon(cfg, watch_config=False, on_ready=ready).run())

    def enqueue(self, a: argparse.Namespace) -> dict[str, Any]:
        import uvloop

        return uvloop.run(c.run_async_enqueue(JobqdProducer(a.redis_url), a, True))


if __name__ == "__main__":
    c.run_main(JobqdDriver)
