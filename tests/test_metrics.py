"""The per-job metrics (`jobqd.metrics._JobCollector`) are plain numbers read at scrape
time; what a scrape shows must be exactly what prometheus_client's own Counter and
Histogram would show for the same observations."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from jobqd.metrics import _LATENCY_BUCKETS, Metrics

# every bucket bound itself (le is inclusive), values between, 0, and past the last bound
OBSERVED = [0.0, *_LATENCY_BUCKETS, *(b * 1.5 for b in _LATENCY_BUCKETS), 7200.0, 1e-9]


def _lines(text: bytes, prefix: str) -> list[str]:
    """The samples and the # TYPE line of one metric (HELP texts differ here)."""
    return sorted(line for line in text.decode().splitlines()
                  if line.startswith((prefix, f"# TYPE {prefix}")) and "_created" not in line)


def test_job_metrics_expose_what_prometheus_client_would() -> None:
    m = Metrics()
    ref = CollectorRegistry()
    completed = Counter("jobqd_jobs_completed", "x", ["queue", "task", "outcome"], registry=ref)
    duration = Histogram("jobqd_job_duration_seconds", "x", ["queue", "task"],
                         buckets=_LATENCY_BUCKETS, registry=ref)
    wait = Histogram("jobqd_job_wait_seconds", "x", ["queue"], buckets=_LATENCY_BUCKETS,
                     registry=ref)
    for i, v in enumerate(OBSERVED):
        queue, task = ("a", "t1") if i % 3 else ("b", "t2")
        outcome = ("succeeded", "retried", "dead")[i % 3]
        m.job_done(queue, task, outcome, v)
        completed.labels(queue, task, outcome).inc()
        duration.labels(queue, task).observe(v)
        m.job_started(queue, v - 0.001)  # a clock step back counts as 0
        wait.labels(queue).observe(max(0.0, v - 0.001))
    ours, theirs = m.exposition(), generate_latest(ref)
    for name in ("jobqd_jobs_completed", "jobqd_job_duration_seconds", "jobqd_job_wait_seconds"):
        got, want = _lines(ours, name), _lines(theirs, name)
        assert len(want) > 2 and got == want, name


def test_no_series_before_a_job() -> None:
    text = Metrics().exposition().decode()
    assert "jobqd_jobs_completed_total{" not in text
    assert "jobqd_job_duration_seconds_bucket{" not in text
