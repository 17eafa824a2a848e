"""Prometheus metrics of one daemon (its own registry, so tests can run several).

The per-job metrics (jobs completed, run time, wait time) are plain integers and
lists in `_JobCollector`, read at scrape time: a job costs a dictionary lookup and a
bisect each, no lock, no label formatting. They are only ever updated from the
event loop's thread (`job_started`, `job_done`). Other counters are bound to their
label values once and cached.
"""

from __future__ import annotations

import platform
from bisect import bisect_left
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client import Info as PromInfo
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from jobqd import __version__

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = reg = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=reg)
        # per daemon: what its own HTTP API and outbox relay enqueued
        self.enqueued = Counter("jobqd_jobs_accepted", "Jobs enqueued through this daemon's "
                                "HTTP API or outbox relay (every producer: "
                                "jobqd_jobs_enqueued_total)", ["queue", "task"], registry=reg)
        # every producer (clients, CLI, HTTP, outbox): counted in Redis by enqueue.lua,
        # read by the gauge loop (`set_enqueued`)
        self.enqueued_total: dict[tuple[str, str], int] = {}
        reg.register(_EnqueuedCollector(self.enqueued_total))
        # completed, duration and wait: `_JobCollector` (the hot path)
        self.jobs = _JobCollector()
        reg.register(self.jobs)
        self.queue_depth = Gauge("jobqd_queue_depth", "Jobs not yet acked (waiting, in flight, "
                                 "scheduled), read from Redis", ["queue"], registry=reg)
        self.queue_lag = Gauge("jobqd_queue_lag_seconds", "Age of the oldest waiting job",
                               ["queue"], registry=reg)
        self.dlq_depth = Gauge("jobqd_dlq_depth", "Dead-letter entries", ["queue"], registry=reg)
        self.accepting = Gauge("jobqd_queue_accepting", "1 while the queue accepts enqueues, 0 "
                               "while backpressure refuses them", ["queue"], registry=reg)
        self.weight = Gauge("jobqd_queue_weight", "Runtime scheduling weight", ["queue"],
                            registry=reg)
        self.reclaimed = Counter("jobqd_jobs_reclaimed", "Deliveries taken back from a consumer "
                                 "(worker_lost, stalled, handback)", ["reason"], registry=reg)
        self.consumers = Gauge("jobqd_consumers", "Consumer slots of this daemon by state",
                               ["state"], registry=reg)
        self.process_workers = Gauge("jobqd_process_workers", "Worker processes of "
                                     "executor: process, by state (idle, busy)", ["state"],
                                     registry=reg)
        self.process_replaced = Counter("jobqd_process_workers_replaced", "Worker processes "
                                        "ended and replaced, by reason (killed: a timeout or "
                                        "the drain; died; max_tasks; max_memory)", ["reason"],
                                        registry=reg)
        self.reloads = Counter("jobqd_config_reloads", "Config reloads by result", ["result"],
                               registry=reg)
        for result in ("ok", "error"):  # both series exist from the start (alerts use rate)
            self.reloads.labels(result)
        self.schedule_runs = Counter("jobqd_schedule_runs", "Schedule ticks whose job this "
                                     "daemon created (a tick another daemon made is not "
                                     "counted here)", ["schedule"], registry=reg)
        self.schedule_last_run = Gauge("jobqd_schedule_last_run_timestamp_seconds", "Time of the "
                                       "last tick that got a job (by any daemon), read from "
                                       "Redis", ["schedule"], registry=reg)
        self.schedule_due = Gauge("jobqd_schedule_due_timestamp_seconds", "Time of the latest "
                                  "tick at or before now: its job should exist", ["schedule"],
                                  registry=reg)
        self.not_replicated = Counter(
            "jobqd_not_replicated", "Writes fewer than redis.wait_replicas replicas "
            "acknowledged within redis.wait_timeout_s, by op (enqueue: refused to the "
            "producer with NotReplicated; settle: the outcome stands, logged)", ["op"],
            registry=reg)
        for op in ("enqueue", "settle"):
            self.not_replicated.labels(op)
        self.build = PromInfo("jobqd_build", "Version information", registry=reg)
        self.build.info({"version": __version__, "python": platform.python_version()})

    def set_enqueued(self, queue: str, counts: dict[str, int]) -> None:
        """The Redis-side enqueue counters of one queue (task -> jobs ever enqueued)."""
        for task, n in counts.items():
            self.enqueued_total[(queue, task)] = n

    def job_done(self, queue: str, task: str, outcome: str, duration_s: float) -> None:
        jobs = self.jobs
        key = (queue, task, outcome)
        jobs.completed[key] = jobs.completed.get(key, 0) + 1
        h = jobs.duration.get((queue, task))
        if h is None:
            h = jobs.duration[(queue, task)] = _Histogram()
        h.observe(duration_s)

    def job_started(self, queue: str, wait_s: float) -> None:
        h = self.jobs.wait.get(queue)
        if h is None:
            h = self.jobs.wait[queue] = _Histogram()
        h.observe(wait_s if wait_s > 0.0 else 0.0)

    def component(self, kind: type[Counter] | type[Gauge], name: str, doc: str,
                  labels: tuple[str, ...] = ()) -> Any:
        """A metric a component registers on this daemon's registry. A second instance
        of the component on the same registry (tests) gets a working, unexported one."""
        try:
            return kind(name, doc, list(labels), registry=self.registry)
        except ValueError:  # already registered here
            return kind(name, doc, list(labels), registry=None)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _EnqueuedCollector(Collector):
    """``jobqd_jobs_enqueued_total{queue,task}``: jobs enqueued by any producer, as counted
    in Redis (``{p:q}:in``, by jobqd/lua/enqueue.lua). A counter (monotonic; a Redis that
    loses its data is a reset, which rate() handles). Every daemon exports the same
    value: aggregate across daemons with max, not sum."""

    def __init__(self, values: dict[tuple[str, str], int]) -> None:
        self.values = values

    def describe(self) -> list[Metric]:
        return [self._family()]

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(
            "jobqd_jobs_enqueued", "Jobs enqueued by every producer (clients, CLI, HTTP, "
            "outbox), counted in Redis; the same in every daemon (aggregate with max)",
            labels=["queue", "task"])

    def collect(self) -> list[Metric]:
        family = self._family()
        for (queue, task), n in sorted(self.values.items()):
            family.add_metric([queue, task], float(n))
        return [family]


class _Histogram:
    """Observations per bucket (`counts[i]`: at most `_LATENCY_BUCKETS[i]` and above the
    bucket before; the last: above every bound) and their sum."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(_LATENCY_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(_LATENCY_BUCKETS, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative, as Prometheus wants them (``le``), ending with +Inf."""
        out: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip((*map(floatToGoString, _LATENCY_BUCKETS), "+Inf"), list(self.counts),
                            strict=True):
            total += n
            out.append((bound, float(total)))
        return out


class _JobCollector(Collector):
    """``jobqd_jobs_completed_total{queue,task,outcome}``,
    ``jobqd_job_duration_seconds{queue,task}`` and ``jobqd_job_wait_seconds{queue}``: kept
    as plain numbers by `Metrics.job_done` / `job_started`, turned into metric families
    only when scraped."""

    def __init__(self) -> None:
        self.completed: dict[tuple[str, str, str], int] = {}
        self.duration: dict[tuple[str, str], _Histogram] = {}
        self.wait: dict[str, _Histogram] = {}

    def describe(self) -> list[Metric]:
        return [*self._families()]

    def _families(self) -> tuple[CounterMetricFamily, HistogramMetricFamily,
                                 HistogramMetricFamily]:
        return (CounterMetricFamily("jobqd_jobs_completed", "Job attempts finished, by outcome "
                                    "(succeeded, retried, dead)",
                                    labels=["queue", "task", "outcome"]),
                HistogramMetricFamily("jobqd_job_duration_seconds", "Handler run time",
                                      labels=["queue", "task"]),
                HistogramMetricFamily("jobqd_job_wait_seconds", "Time from enqueue (or due "
                                      "time) to handler start", labels=["queue"]))

    def collect(self) -> list[Metric]:
        completed, duration, wait = self._families()
        for key, n in sorted(self.completed.copy().items()):
            completed.add_metric(list(key), float(n))
        for dkey, h in sorted(self.duration.copy().items()):
            duration.add_metric(list(dkey), h.buckets(), h.sum)
        for queue, h in sorted(self.wait.copy().items()):
            wait.add_metric([queue], h.buckets(), h.sum)
        return [completed, duration, wait]
