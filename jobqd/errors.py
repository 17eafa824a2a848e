"""Every exception jobqd raises on purpose, in one place.

Producer-side errors (`QueueFull`, `UnknownTask`, `PayloadTooLarge`) are what a
caller of `Client.enqueue` must be ready for; handler-side signals (`Retry`,
`Fail`) are raised *by* task handlers to steer their own job.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class JobqdError(Exception):
    """Base class of every error jobqd raises deliberately."""

    # For errors of enqueue_many: the jobs that batches before (or beside) the
    # failing one accepted, so a caller can retry only the rest.
    accepted: Sequence[Any] = ()


class ConfigError(JobqdError):
    """The configuration file is unreadable, malformed or invalid.

    The message names the file, the dotted key path and the line, e.g.
    ``/etc/jobqd.yaml: tasks.send_email.timeout_s (line 12): must be > 0``.
    """

    def __init__(self, message: str, *, path: str | None = None, key: str | None = None,
                 line: int | None = None) -> None:
        self.path = path
        self.key = key
        self.line = line
        self.reason = message
        where = []
        if path:
            where.append(path)
        if key:
            where.append(key + (f" (line {line})" if line else ""))
        elif line:
            where.append(f"line {line}")
        super().__init__(": ".join([*where, message]))


class UnknownTask(JobqdError):
    """No running daemon routes this task name (the routing table in Redis lacks it)."""

    def __init__(self, task: str) -> None:
        self.task = task
        super().__init__(f"unknown task {task!r}: no daemon routes it (check tasks: in the config "
                         "and that a daemon has published its routing)")


class QueueFull(JobqdError):
    """The queue is above its high watermark and refuses new jobs until it drains
    (``reason`` "watermark"), or Redis's memory is above ``redis.max_memory_fraction``
    of its maxmemory (`RedisMemoryFull`, ``reason`` "memory")."""

    reason = "watermark"

    def __init__(self, queue: str, depth: int, high_watermark: int, low_watermark: int,
                 retry_after_s: float) -> None:
        self.queue = queue
        self.depth = depth
        self.high_watermark = high_watermark
        self.low_watermark = low_watermark
        self.retry_after_s = retry_after_s
        super().__init__(f"queue {queue!r} is full: depth {depth} reached high watermark "
                         f"{high_watermark}; accepting again at {low_watermark} "
                         f"(retry after ~{retry_after_s:g}s)")


class RedisMemoryFull(QueueFull):
    """Redis's used memory is above ``redis.max_memory_fraction`` of its maxmemory:
    enqueues are refused (before Redis itself would refuse writes) so that running
    jobs can still settle. A `QueueFull`: producers that wait out a full queue wait
    this out too. ``used_bytes`` and ``max_bytes`` are what a daemon last read."""

    reason = "memory"

    def __init__(self, queue: str, used_bytes: int, max_bytes: int, fraction: float,
                 retry_after_s: float = 1.0) -> None:
        self.queue = queue
        self.depth = -1  # not about depth
        self.high_watermark = self.low_watermark = -1
        self.retry_after_s = retry_after_s
        self.used_bytes = used_bytes
        self.max_bytes = max_bytes
        self.fraction = fraction
        JobqdError.__init__(
            self, f"queue {queue!r} refuses jobs: redis memory is full (used_memory "
            f"{used_bytes} bytes is over redis.max_memory_fraction {fraction:g} of maxmemory "
            f"{max_bytes}); accepting again once running jobs have drained it "
            f"(retry after ~{retry_after_s:g}s)")


class PayloadTooLarge(JobqdError):
    """The encoded job is larger than ``max_payload_bytes``."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"job payload is {size} bytes, over max_payload_bytes={limit}")


class FieldError(Exception):
    """A producer-side validation error, naming the request field it is about (the HTTP
    API answers 400 with that `field`)."""

    field: str = "args"


class InvalidArgument(FieldError, TypeError):
    """A field of an enqueue has the wrong type (task, args, idempotency_key...)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


class InvalidValue(FieldError, ValueError):
    """A field of an enqueue has a value out of range (delay_s, expires_s...)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


class PayloadTooDeep(FieldError, JobqdError, ValueError):
    """The job's args nest deeper than ``MAX_JSON_DEPTH`` (`jobqd.jobs`) levels.

    The daemon re-encodes a job when it retries or dead-letters it; orjson writes
    at most 254 levels, so a deeper job could be accepted but never handled. The
    limit is far below that, and checked wherever a job enters: client, HTTP,
    outbox (producer and relay).
    """

    def __init__(self, limit: int, field: str = "args") -> None:
        self.limit = limit
        self.field = field
        super().__init__(f"{field} are nested more than {limit} levels deep (the limit, "
                         "MAX_JSON_DEPTH, keeps every job re-encodable by the daemon)")


class NotReplicated(JobqdError):
    """``redis.wait_replicas`` is set and fewer replicas than that acknowledged the
    enqueue within ``redis.wait_timeout_s`` (WAIT): the master accepted the jobs
    (``.accepted``), but a failover now could lose them. Retrying with the same
    idempotency key is safe (it finds the job instead of enqueueing it twice)."""

    def __init__(self, acked: int, wanted: int, accepted: Sequence[Any] = ()) -> None:
        self.acked = acked
        self.wanted = wanted
        self.accepted = accepted
        super().__init__(f"the master accepted {len(accepted)} job(s) but only {acked} of "
                         f"{wanted} replica(s) acknowledged them in time (redis.wait_replicas):"
                         " a failover now could lose them; retry with an idempotency key")


class RedisOutOfMemory(JobqdError):
    """Redis refused a write: it is at ``maxmemory`` with ``maxmemory-policy noeviction``.

    Nothing of the refused write was applied (for `enqueue_many`, ``.accepted``
    lists the jobs of the batches that went through before). Retry later, once
    consumers have drained jobs, or give Redis more memory.
    """

    def __init__(self, detail: str = "") -> None:
        self.detail = detail
        super().__init__("redis is out of memory (used memory is over maxmemory and "
                         "maxmemory-policy is noeviction): the write was refused"
                         + (f" ({detail})" if detail else ""))


class JobNotFound(JobqdError):
    """No job (or dead-letter entry) with this id is known."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"no job {job_id!r}")


class Retry(Exception):
    """Raise from a handler to retry the job after ``delay_s`` (or the backoff).

    A retry counts as an attempt: after ``max_retries`` the job is dead-lettered.
    """

    def __init__(self, delay_s: float | None = None, reason: str = "retry requested") -> None:
        if delay_s is not None and delay_s < 0:
            raise ValueError("delay_s must be >= 0")
        self.delay_s = delay_s
        self.reason = reason
        super().__init__(reason)


class Fail(Exception):
    """Raise from a handler to send the job straight to the dead-letter queue."""

    def __init__(self, reason: str = "failed") -> None:
        self.reason = reason
        super().__init__(reason)


class JobCancelled(JobqdError):
    """The job was cancelled (`Client.cancel`, `jobqd cancel`, `DELETE /v1/jobs/{id}`).

    Raised by `Client.wait` for a cancelled job, and by
    `current_job().check_cancelled()` inside a handler whose job was cancelled
    while it ran (raise it, or let it propagate: the job ends `cancelled`).
    """

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"job {job_id} was cancelled")


class JobFailed(JobqdError):
    """`Client.wait`: the job ended dead (`reason`, `error`, `attempts` say why)."""

    def __init__(self, job_id: str, reason: str | None, error: str | None,
                 attempts: int) -> None:
        self.job_id = job_id
        self.reason = reason
        self.error = error
        self.attempts = attempts
        super().__init__(f"job {job_id} is dead ({reason}): {error}")
