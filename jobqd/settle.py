"""The single place an outcome becomes a settle record, a metric, a ledger event
and a log line — shared by the pool and the reaper.

1. `Settler.build(outcome, delivery, env, ...)` turns an outcome value into a
   `Settle` for ``complete.lua`` (S succeeded, R retry/defer, D dead, B hand
   back). Every encode is guarded: a job, result or error that cannot be encoded
   never raises out of here; the job ends dead (``malformed`` / ``bad_result``)
   with its raw bytes kept in the dead-letter entry.
2. `Settler.settle(redis, cfg, batch)` runs ``complete.lua`` for every queue in
   one pipelined round trip (NOSCRIPT-safe). Each entry is gated on its XACK.
3. Only for the entries Redis applied (flag ``1``) are the metric counted, the
   ledger event written and the outcome logged. An outcome Redis refused (the
   entry was no longer pending: reclaimed from a stalled daemon and finished
   elsewhere) leaves no trace that could contradict the real one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aredis

from jobqd import scripts
from jobqd.config import Config
from jobqd.events import JobEvents
from jobqd.jobs import BadJob, Envelope, decode_job
from jobqd.keys import GROUP, QueueKeys
from jobqd.metrics import Metrics
from jobqd.outcomes import (
    MAX_ERROR_CHARS,
    MAX_TRACEBACK_CHARS,
    Dead,
    Deferred,
    Delivery,
    HandedBack,
    Outcome,
    Retried,
    Succeeded,
    safe_text,
)

log = logging.getLogger("jobqd.jobs")

ACK_CHUNK = 500  # entries per COMPLETE call


@dataclass(slots=True)
class Report:
    """What to count, write and log once Redis has applied a settle record."""

    queue: str
    task: str
    job_id: str
    outcome: str  # succeeded, retried, dead, handback, deferred
    duration_s: float
    attempt: int
    lost: int
    error: str | None = None
    reason: str | None = None
    result: Any = None
    kind: str | None = None  # retried: error, retry or timeout
    args: Any = None  # only with log.payloads


@dataclass(slots=True)
class Settle:
    op: str  # S succeeded, R retry/defer, D dead, B hand back
    eid: bytes
    job_id: str
    payload: bytes
    extra: Any  # S: unused (the result key is added by `settle`); R: delay ms; D: death json
    report: Report | None = None


def now_ms() -> float:
    return time.time() * 1000.0


def death_record(env: Envelope | None, queue: str, worker: str, reason: str, error: str, *,
                 tb: str | None = None, attempts: int = 0, started: float | None = None,
                 lost: int | None = None) -> bytes:
    """The ``e`` field of a dead-letter entry (never fails to encode)."""
    if lost is None:
        lost = env.lost if env else 0
    rec = {"reason": reason, "error": safe_text(error, MAX_ERROR_CHARS),
           "traceback": safe_text(tb)[-MAX_TRACEBACK_CHARS:] if tb else None,
           "attempts": attempts, "lost": lost, "died": now_ms(), "started": started,
           "task": env.task if env else None, "queue": queue, "worker": worker}
    try:
        return orjson.dumps(rec)
    except TypeError:  # a task name that cannot be encoded
        rec["task"] = safe_text(str(rec["task"]))
        return orjson.dumps(rec, default=str)


def _reencode(env: Envelope, **changes: Any) -> bytes | None:
    try:
        return env.next(**changes)
    except TypeError:  # orjson: too deep, lone surrogates, ints past 64 bits...
        return None


def try_decode(d: Delivery) -> Envelope | None:
    raw = d.fields.get(b"j")
    if raw is None:
        return None
    try:
        return decode_job(raw)
    except BadJob:
        return None


def raw_fields(d: Delivery) -> bytes:
    """A stream entry's fields as JSON, for a dead letter of something not a job."""
    return orjson.dumps({k.decode("utf-8", "replace"): v.decode("utf-8", "replace")
                         for k, v in d.fields.items()})


class OutcomeLog:
    """One log line per settled job: `log.jobs` all | failures | none, at most
    `log.jobs_per_s` lines a second (a token bucket with a one-second burst).
    Lines over the rate are counted, and the count is logged with the next line
    that is let through, so journald is never drowned and nothing is hidden."""

    def __init__(self, config: Callable[[], Config]) -> None:
        self.config = config
        self.tokens: float | None = None  # full at start
        self.last = time.monotonic()
        self.suppressed = 0

    def allow(self, failure: bool) -> bool:
        cfg = self.config().log
        if cfg.jobs == "none" or (cfg.jobs == "failures" and not failure):
            return False
        burst = max(1.0, cfg.jobs_per_s)
        now = time.monotonic()
        tokens = burst if self.tokens is None else self.tokens
        self.tokens = min(burst, tokens + (now - self.last) * cfg.jobs_per_s)
        self.last = now
        if self.tokens < 1.0:
            self.suppressed += 1
            return False
        self.tokens -= 1.0
        if self.suppressed:
            log.info("%d job outcome lines over log.jobs_per_s were not logged",
                     self.suppressed)
            self.suppressed = 0
        return True

    def write(self, rep: Report) -> None:
        failure = rep.outcome in ("retried", "dead")
        if not self.allow(failure):
            return
        extra: dict[str, Any] = {"job_id": rep.job_id, "task": rep.task, "queue": rep.queue,
                                 "attempt": rep.attempt, "duration_ms":
                                 round(rep.duration_s * 1000, 3)}
        if rep.args is not None:  # `args` is a name LogRecord reserves
            extra["job_args"] = rep.args
        if rep.outcome == "succeeded":
            log.info("job succeeded", extra=extra)
        elif rep.outcome == "retried":
            log.warning("job failed: %s", rep.error, extra={**extra, "kind": rep.kind})
        elif rep.outcome == "dead":
            log.error("job dead (%s): %s", rep.reason, rep.error, extra=extra)
        else:
            log.info("job %s", rep.outcome, extra=extra)


class Settler:
    """Builds settle records from outcomes and reports the ones Redis applied."""

    def __init__(self, metrics: Metrics, events: JobEvents, worker: str,
                 config: Callable[[], Config]) -> None:
        self.metrics = metrics
        self.events = events
        self.worker = worker
        self.config = config
        self.outcome_log = OutcomeLog(config)

    # ------------------------------------------------------------ building

    def build(self, outcome: Outcome, d: Delivery, env: Envelope | None, *,
              started_ms: float | None = None, duration_s: float = 0.0) -> Settle | None:
        """The settle record of an outcome (None for `Abandoned`: nothing to settle)."""
        q = d.queue
        if env is None and not isinstance(outcome, Dead):  # e.g. handed back unstarted
            env = try_decode(d)
        if env is None:
            if not isinstance(outcome, Dead):  # not a job: only a dead letter can hold it
                outcome = Dead("malformed", "entry is not a job")
            death = death_record(None, q, self.worker, outcome.reason, outcome.error,
                                 started=started_ms)
            return Settle("D", d.eid, "", raw_fields(d), death,
                          Report(q, "", "", "dead", 0.0, 0, 0, outcome.error, outcome.reason))
        raw = d.fields.get(b"j", b"")
        attempt = env.attempt + 1
        args = env.args if self.config().log.payloads else None
        if isinstance(outcome, Succeeded):
            try:
                record = orjson.dumps({"status": "succeeded", "task": env.task,
                                       "result": outcome.result, "attempts": attempt,
                                       "lost": env.lost, "enq": env.enq_ms,
                                       "started": started_ms, "finished": now_ms(),
                                       "worker": self.worker})
            except TypeError as e:  # the handler did its work: running it again repeats it
                return self.build(Dead("bad_result", f"result is not JSON-serialisable: {e}",
                                       attempts=attempt), d, env, started_ms=started_ms,
                                  duration_s=duration_s)
            return Settle("S", d.eid, env.id, record, None, Report(
                q, env.task, env.id, "succeeded", duration_s, attempt, env.lost,
                result=outcome.result, args=args))
        if isinstance(outcome, Retried):
            error = safe_text(outcome.error, MAX_ERROR_CHARS)
            nxt = _reencode(env, attempt=attempt, err=error)
            if nxt is None:
                return self._unencodable(d, env, started_ms, duration_s)
            return Settle("R", d.eid, env.id, nxt, round(outcome.delay_s * 1000), Report(
                q, env.task, env.id, "retried", duration_s, attempt, env.lost, error,
                kind=outcome.kind, args=args))
        if isinstance(outcome, Dead):
            attempts = env.attempt if outcome.attempts is None else outcome.attempts
            lost = env.lost if outcome.lost is None else outcome.lost
            payload = raw
            if outcome.lost is not None and outcome.lost != env.lost:
                payload = _reencode(env, lost=lost) or raw
            death = death_record(env, q, self.worker, outcome.reason, outcome.error,
                                 tb=outcome.tb, attempts=attempts, started=started_ms,
                                 lost=lost)
            return Settle("D", d.eid, env.id, payload, death, Report(
                q, env.task, env.id, "dead", duration_s, attempts, lost,
                safe_text(outcome.error, MAX_ERROR_CHARS), outcome.reason, args=args))
        if isinstance(outcome, HandedBack):
            payload = raw
            if outcome.lost is not None and outcome.lost != env.lost:
                nxt = _reencode(env, lost=outcome.lost)
                if nxt is None:
                    return self._unencodable(d, env, started_ms, duration_s)
                payload = nxt
            rep = Report(q, env.task, env.id, "handback", duration_s, env.attempt,
                         env.lost if outcome.lost is None else outcome.lost)
            if outcome.delay_s > 0:
                return Settle("R", d.eid, env.id, payload, round(outcome.delay_s * 1000), rep)
            return Settle("B", d.eid, env.id, payload, 0, rep)
        if isinstance(outcome, Deferred):
            return Settle("R", d.eid, env.id, raw, max(1, round(outcome.delay_s * 1000)),
                          None)
        return None  # Abandoned: it stays ours in the PEL; the reaper recovers it

    def _unencodable(self, d: Delivery, env: Envelope, started_ms: float | None,
                     duration_s: float) -> Settle:
        return self.build(Dead("malformed", "the job cannot be re-encoded as JSON (too deeply "
                               "nested, or text that is not valid UTF-8); its raw bytes are "
                               "kept in this dead letter", attempts=env.attempt + 1),
                          d, env, started_ms=started_ms, duration_s=duration_s) or Settle(
            "D", d.eid, env.id, d.fields.get(b"j", b""), b"{}")

    # ------------------------------------------------------------ settling

    async def settle(self, r: aredis.Redis, cfg: Config, batch: dict[str, list[Settle]]
                     ) -> list[tuple[str, list[Settle], str]]:
        """Run COMPLETE.lua for every queue's records in one round trip, then report
        what Redis applied. Returns (queue, chunk, flags): '1' settled, '0' not
        pending any more. Safe to repeat after a lost reply (each entry is gated on
        its XACK, so nothing is reported twice)."""
        done = await complete(r, cfg, batch)
        for _q, chunk, flags in done:
            for s, flag in zip(chunk, flags, strict=True):
                if flag == "1" and s.report is not None:
                    self.report(s.report)
        return done

    def report(self, rep: Report) -> None:
        if rep.outcome == "handback":
            self.metrics.reclaimed.labels("handback").inc()
            return
        self.metrics.job_done(rep.queue, rep.task, rep.outcome, rep.duration_s)
        if rep.job_id:
            self.events.record(rep.outcome, rep.job_id, rep.queue, rep.task,
                               attempt=rep.attempt, lost=rep.lost, ts_ms=now_ms(),
                               error=rep.error, reason=rep.reason, result=rep.result)
        self.outcome_log.write(rep)


async def complete(r: aredis.Redis, cfg: Config, batch: dict[str, list[Settle]]
                   ) -> list[tuple[str, list[Settle], str]]:
    """COMPLETE.lua for every queue's records, chunked, in one pipelined round trip."""
    prefix = cfg.redis.prefix
    ttl_ms = int(cfg.results.ttl_s * 1000)
    calls: list[scripts.Call] = []
    groups: list[tuple[str, list[Settle]]] = []
    for q, items in batch.items():
        qk = QueueKeys(prefix, q)
        for i in range(0, len(items), ACK_CHUNK):
            chunk = items[i:i + ACK_CHUNK]
            keys: list[Any] = [qk.stream, qk.delayed, qk.state, qk.dlq, qk.conf, qk.full,
                               qk.done]
            argv: list[Any] = [GROUP, ttl_ms, len(chunk)]
            for s in chunk:
                extra = s.extra
                if s.op == "S":
                    keys.append(qk.result(s.job_id))
                    extra = len(keys) - 7
                argv += [s.op, s.eid, s.job_id, s.payload, extra]
            calls.append((scripts.COMPLETE, keys, argv))
            groups.append((q, chunk))
    replies = await scripts.pipelined(r, calls)
    for x in replies:
        if isinstance(x, Exception):
            raise x
    return [(q, chunk, flags.decode() if isinstance(flags, bytes) else str(flags))
            for (q, chunk), flags in zip(groups, replies, strict=True)]
