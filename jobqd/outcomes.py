"""What happened to one delivery of a job, as a value.

`execute.run_job` returns one of these for every job it runs; the reaper makes
them for the jobs of dead consumers. `settle.Settler` is the single place an
outcome becomes a settle record for ``complete.lua``, a metric, a ledger event
and a log line. Nothing here does I/O, so every decision can be tested alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

MAX_ERROR_CHARS = 2000
MAX_TRACEBACK_CHARS = 8000
MAX_RETRY_DELAY_S = 365 * 86400.0  # a Retry(delay_s=...) beyond a year is refused

FailureKind = Literal["error", "retry", "timeout"]


@dataclass(slots=True, eq=False)
class Delivery:
    """One stream entry fetched by this daemon (held until its outcome is settled)."""

    queue: str
    eid: bytes
    fields: dict[bytes, bytes]


@dataclass(frozen=True, slots=True)
class Succeeded:
    result: Any


@dataclass(frozen=True, slots=True)
class Retried:
    """The attempt failed and the job runs again after `delay_s` (one attempt used)."""

    kind: FailureKind
    error: str
    delay_s: float
    tb: str | None = None


@dataclass(frozen=True, slots=True)
class Dead:
    """The job ends in its queue's dead-letter queue."""

    reason: str  # failed, max_retries, timeout, bad_args, bad_result, malformed, ...
    error: str
    tb: str | None = None
    attempts: int | None = None  # None: the attempts of the envelope (nothing ran)
    lost: int | None = None  # None: the envelope's


@dataclass(frozen=True, slots=True)
class HandedBack:
    """Back to the queue with no attempt used (drain; or a reclaim, which counts `lost`).

    `delay_s` > 0 puts it through the delayed set (the reaper spreads a dead
    consumer's jobs over a second).
    """

    lost: int | None = None  # None: unchanged
    delay_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Deferred:
    """Over a concurrency or rate limit: runs later, same attempt."""

    delay_s: float


@dataclass(frozen=True, slots=True)
class Cancelled:
    """Cancelled while it ran: it ends `cancelled` and is never retried."""


@dataclass(frozen=True, slots=True)
class Abandoned:
    """Cannot be settled now (a thread still runs it): left in our PEL for the reaper."""

    why: str


Outcome = Succeeded | Retried | Dead | HandedBack | Deferred | Cancelled | Abandoned


def safe_text(s: str, limit: int | None = None) -> str:
    """Text that can always be encoded (UTF-8, JSON, PostgreSQL, logs).

    Lone surrogates (``os.fsdecode`` of a non-UTF-8 file name) become ``\\udcxx``
    escapes; the result is cut to `limit` characters (the tail for tracebacks is
    the caller's choice).
    """
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        s = s.encode("utf-8", "backslashreplace").decode("utf-8")
    return s if limit is None else s[:limit]


def error_text(e: BaseException) -> str:
    """``Type: message`` for any exception, even one whose ``__str__`` raises."""
    try:
        msg = str(e)
    except Exception as inner:  # a broken __str__ must not take the daemon down
        msg = f"<str() of the exception failed: {type(inner).__name__}>"
    return safe_text(f"{type(e).__name__}: {msg}" if msg else type(e).__name__,
                     MAX_ERROR_CHARS)


def traceback_text(e: BaseException) -> str:
    import traceback  # noqa: PLC0415 - only on failures

    try:
        tb = "".join(traceback.format_exception(e))
    except Exception as inner:
        tb = f"<the traceback could not be formatted: {type(inner).__name__}>"
    return safe_text(tb)[-MAX_TRACEBACK_CHARS:]


def retry_delay(requested: Any) -> float | None:
    """A handler's `Retry(delay_s=...)`, validated: None when it is not a usable delay."""
    if requested is None:
        return None
    try:
        d = float(requested)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(d) or d < 0 or d > MAX_RETRY_DELAY_S:
        return None
    return d


def after_failure(kind: FailureKind, error: str, tb: str | None, *, attempts: int,
                  max_retries: int, backoff_s: float, requested_delay: float | None
                  ) -> Retried | Dead:
    """Retry or dead-letter a failed attempt (`attempts` includes this one)."""
    if attempts > max_retries:
        return Dead("timeout" if kind == "timeout" else "max_retries", error, tb,
                    attempts=attempts)
    return Retried(kind, error, backoff_s if requested_delay is None else requested_delay, tb)


def after_cancel(*, own: Literal["timeout", "cancel"] | None, thread_running: bool
                 ) -> Literal["timeout", "cancelled", "abandon", "hand_back"]:
    """Why a running job's consumer was cancelled, and so what happens to the job.

    `own`: the pool's own reason when it cancelled the consumer and no other
    cancellation is pending — the job's deadline, or a `cancel` of the job.

    * our own deadline: a timeout failure (retried or dead by the task's policy);
    * a cancel of the job: it ends `cancelled`;
    * otherwise (drain, forced stop): hand it back for immediate redelivery,
      unless a thread still runs the handler: another worker would run it
      alongside that thread, so the job is abandoned to the reaper.

    A process job (``executor: process``) is never abandoned: its worker
    process is killed before the cancellation gets here (`process_pool`), so
    `thread_running` is False for it.
    """
    if own == "timeout":
        return "timeout"
    if own == "cancel":
        return "cancelled"
    return "abandon" if thread_running else "hand_back"
