"""The single place an outcome becomes a settle record, a metric, a ledger event
and a log line — shared by the pool and the reaper.

1. `Settler.build(outcome, delivery, env, ...)` turns an outcome value into a
   `Settle` for ``complete.lua`` (S succeeded, R retry/defer, D dead, B hand
   back). Every encode is guarded: a job, result or error that cannot be encoded
   never raises out of here; the job ends dead (``malformed`` / ``bad_result``)
   with its raw bytes kept in the dead-letter entry.
2. `Completion(cfg, batch)` holds the ``complete.lua`` calls for every queue;
   `Settler.settle` runs them in one pipelined round trip (NOSCRIPT-safe), or the
   pool sends them in its next fetch's round trip. Each entry is gated on its XACK.
3. Only for the entries Redis applied (flag ``1``) are the metric counted, the
   ledger event written and the outcome logged. An outcome Redis refused (the
   entry was no longer pending: reclaimed from a stalled daemon and finished
   elsewhere) leaves no trace that could contradict the real one.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aredis

from jobqd import scripts
from jobqd.config import Config
from jobqd.events import JobEvents, NoEvents
from jobqd.jobs import BadJob, Envelope, decode_job
from jobqd.keys import GROUP, GlobalKeys, QueueKeys
from jobqd.metrics import Metrics
from jobqd.outcomes import (
    MAX_ERROR_CHARS,
    MAX_TRACEBACK_CHARS,
    Cancelled,
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

ACK_CHUNK = 500  # entries per COMPLETE call (complete.lua unpack()s up to this many ids at once:
# keep it well under Lua's C-stack limit of ~8000)


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
    op: str  # S succeeded, R retry/defer, D dead, B hand back, C cancelled
    eid: bytes
    job_id: str
    payload: bytes
    extra: Any = None  # S: unused (`complete` adds the result key); R: delay ms; D: death json
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
        return decode_job(raw, d.queue)
    except BadJob:
        return None


def raw_fields(d: Delivery) -> bytes:
    """A stream entry's fields as JSON, for a dead letter of something not a job."""
    return orjson.dumps({k.decode("utf-8", "replace"): v.decode("utf-8", "replace")
                         for k, v in d.fields.items()})


class _Bucket:
    """A token bucket with a one-second burst."""

    def __init__(self) -> None:
        self.tokens: float | None = None  # full at start
        self.last = time.monotonic()

    def take(self, rate: float) -> bool:
        burst = max(1.0, rate)
        now = time.monotonic()
        tokens = burst if self.tokens is None else self.tokens
        self.tokens = min(burst, tokens + (now - self.last) * rate)
        self.last = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class OutcomeLog:
    """One log line per settled job: `log.jobs` all | failures | none. Successes and
    failures each get `log.jobs_per_s` lines a second (two buckets, so a flood of
    successes never hides a failure). Lines over the rate are counted, and the count
    is logged with the next line let through: journald is never drowned, and what
    was left out is said."""

    def __init__(self, config: Callable[[], Config]) -> None:
        self.config = config
        self.buckets = {False: _Bucket(), True: _Bucket()}
        self.suppressed = 0

    def allow(self, failure: bool) -> bool:
        cfg = self.config().log
        if cfg.jobs == "none" or (cfg.jobs == "failures" and not failure):
            return False
        if not self.buckets[failure].take(cfg.jobs_per_s):
            self.suppressed += 1
            return False
        if self.suppressed:
            log.info("%d job outcome lines over log.jobs_per_s were not logged",
                     self.suppressed)
            self.suppressed = 0
        return True

    def write(self, rep: Report) -> None:
        failure = rep.outcome in ("retried", "dead")
        level = (logging.ERROR if rep.outcome == "dead" else
                 logging.WARNING if failure else logging.INFO)
        if not log.isEnabledFor(level) or not self.allow(failure):
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


@dataclass(slots=True)
class _Ctx:
    """The delivery an outcome is about, while its settle record is built."""

    d: Delivery
    env: Envelope
    started_ms: float | None
    duration_s: float
    args: Any  # only with log.payloads

    @property
    def raw(self) -> bytes:
        return self.d.fields.get(b"j", b"")

    def report(self, outcome: str, attempt: int, lost: int, **kw: Any) -> Report:
        return Report(self.d.queue, self.env.task, self.env.id, outcome, self.duration_s,
                      attempt, lost, args=self.args, **kw)


class Settler:
    """Builds settle records from outcomes and reports the ones Redis applied."""

    def __init__(self, metrics: Metrics, events: JobEvents, worker: str,
                 config: Callable[[], Config], *,
                 scheduled: asyncio.Event | None = None) -> None:
        # set once Redis applied a retry, deferral or spread hand-back (op R: into the
        # delayed set): the daemon's scheduler re-plans its sleep and promotes each job
        # at its own due time, whoever settled it (the pool or the reaper)
        self.scheduled = scheduled
        self.metrics = metrics
        self.events = events
        self.worker = worker
        self.config = config
        self.outcome_log = OutcomeLog(config)
        self._warned_at = -1e9  # the last not-replicated warning (monotonic s)

    # ------------------------------------------------------------ building

    def build(self, outcome: Outcome, d: Delivery, env: Envelope | None, *,
              started_ms: float | None = None, duration_s: float = 0.0) -> Settle | None:
        """The settle record of an outcome (None for `Abandoned`: nothing to settle)."""
        if env is None and not isinstance(outcome, Dead):  # e.g. handed back unstarted
            env = try_decode(d)
        if env is None:  # not a job: only a dead letter can hold it
            dead = outcome if isinstance(outcome, Dead) else Dead("malformed", "entry is not a job")
            death = death_record(None, d.queue, self.worker, dead.reason, dead.error,
                                 started=started_ms)
            return Settle("D", d.eid, "", raw_fields(d), death, Report(
                d.queue, "", "", "dead", 0.0, 0, 0, dead.error, dead.reason))
        cfg = self.config()
        if type(outcome) is Succeeded:  # the hot path: no _Ctx unless it goes wrong
            return self._succeeded(outcome, d, env, started_ms=started_ms,
                                   duration_s=duration_s, cfg=cfg)
        c = _Ctx(d, env, started_ms, duration_s, env.args if cfg.log.payloads else None)
        if isinstance(outcome, Retried):
            return self._retried(outcome, c)
        if isinstance(outcome, Dead):
            return self._dead(outcome, c)
        if isinstance(outcome, HandedBack):
            return self._handed_back(outcome, c)
        if isinstance(outcome, Deferred):  # same attempt, unchanged bytes
            return Settle("R", d.eid, env.id, c.raw, max(1, round(outcome.delay_s * 1000)))
        if isinstance(outcome, Cancelled):
            return Settle("C", d.eid, env.id, c.raw, env.attempt + 1,
                          c.report("cancelled", env.attempt + 1, env.lost))
        return None  # Abandoned: it stays ours in the PEL; the reaper recovers it

    def _succeeded(self, o: Succeeded, d: Delivery, env: Envelope, *, started_ms: float | None,
                   duration_s: float, cfg: Config) -> Settle:
        task = cfg.tasks.get(env.task)
        keep = (task.keep_result if task is not None else None) or cfg.results.keep
        attempts = env.attempt + 1
        args = env.args if cfg.log.payloads else None
        try:
            if keep == "full":
                payload = orjson.dumps({"status": "succeeded", "task": env.task,
                                        "result": o.result, "attempts": attempts,
                                        "lost": env.lost, "enq": env.enq_ms,
                                        "started": started_ms, "finished": now_ms(),
                                        "worker": self.worker})
            else:  # a non-JSON result is dead-lettered whatever is kept (the ledger has it)
                orjson.dumps(o.result)
                # none: complete.lua writes no record for an empty payload; status: one
                # embedded string of at most 44 bytes
                payload = (b"" if keep == "none" else
                           b'{"status":"succeeded","attempts":%d}' % attempts)
        except TypeError as e:  # the handler did its work: running it again repeats it
            return self._dead(Dead("bad_result", f"result is not JSON-serialisable: {e}",
                                   attempts=attempts),
                              _Ctx(d, env, started_ms, duration_s, args))
        return Settle("S", d.eid, env.id, payload, None, Report(
            d.queue, env.task, env.id, "succeeded", duration_s, attempts, env.lost,
            result=o.result, args=args))

    def _retried(self, o: Retried, c: _Ctx) -> Settle:
        env = c.env
        error = safe_text(o.error, MAX_ERROR_CHARS)
        nxt = _reencode(env, attempt=env.attempt + 1, err=error)
        if nxt is None:
            return self._unencodable(c)
        return Settle("R", c.d.eid, env.id, nxt, round(o.delay_s * 1000), c.report(
            "retried", env.attempt + 1, env.lost, error=error, kind=o.kind))

    def _dead(self, o: Dead, c: _Ctx) -> Settle:
        env = c.env
        attempts = env.attempt if o.attempts is None else o.attempts
        lost = env.lost if o.lost is None else o.lost
        payload = c.raw if lost == env.lost else (_reencode(env, lost=lost) or c.raw)
        death = death_record(env, c.d.queue, self.worker, o.reason, o.error, tb=o.tb,
                             attempts=attempts, started=c.started_ms, lost=lost)
        return Settle("D", c.d.eid, env.id, payload, death, c.report(
            "dead", attempts, lost, error=safe_text(o.error, MAX_ERROR_CHARS), reason=o.reason))

    def _handed_back(self, o: HandedBack, c: _Ctx) -> Settle:
        env = c.env
        lost = env.lost if o.lost is None else o.lost
        payload = c.raw if lost == env.lost else _reencode(env, lost=lost)
        if payload is None:
            return self._unencodable(c)
        rep = c.report("handback", env.attempt, lost)
        if o.delay_s > 0:  # through the delayed set (the reaper spreads a dead consumer's)
            return Settle("R", c.d.eid, env.id, payload, round(o.delay_s * 1000), rep)
        return Settle("B", c.d.eid, env.id, payload, 0, rep)

    def _unencodable(self, c: _Ctx) -> Settle:
        return self._dead(Dead("malformed", "the job cannot be re-encoded as JSON (too deeply "
                               "nested, or text that is not valid UTF-8); its raw bytes are "
                               "kept in this dead letter", attempts=c.env.attempt + 1), c)

    # ------------------------------------------------------------ settling

    async def settle(self, r: aredis.Redis, cfg: Config, batch: dict[str, list[Settle]]
                     ) -> list[tuple[str, list[Settle], str]]:
        """Run COMPLETE.lua for every queue's records in one round trip, then report
        what Redis applied. Returns (queue, chunk, flags): '1' settled, 'c' settled as
        cancelled (it was cancelled meanwhile), '0' not pending any more. Safe to
        repeat after a lost reply (each entry is gated on its XACK, so nothing is
        reported twice)."""
        calls = Completion(cfg, batch)
        replies = await scripts.pipelined(r, calls.calls)
        done, failed, acked = calls.applied(replies)
        if failed:
            raise failed[0][1]
        self.report_applied(done, acked, cfg)
        return done

    def report_applied(self, done: list[tuple[str, list[Settle], str]], acked: int | None,
                       cfg: Config) -> None:
        """Count, write and log what Redis applied (see `settle`); `acked`: how many
        replicas WAIT saw (None: no WAIT)."""
        if acked is not None and acked < cfg.redis.wait_replicas:
            self._not_replicated(acked, cfg)
        scheduled = False
        for _q, chunk, flags in done:
            for s, flag in zip(chunk, flags, strict=True):
                if flag == "1" and s.op == "R":
                    scheduled = True
                if s.report is None or flag == "0":
                    continue
                if flag == "c":  # a retry or hand-back of a job cancelled meanwhile
                    s.report.outcome = "cancelled"
                self.report(s.report)
        if scheduled and self.scheduled is not None:
            self.scheduled.set()

    def _not_replicated(self, acked: int, cfg: Config) -> None:
        """A settle that fewer than redis.wait_replicas replicas acknowledged: the outcome
        stands on the master (a failover now may run those jobs once more)."""
        self.metrics.not_replicated.labels("settle").inc()
        now = time.monotonic()
        if now - self._warned_at >= 10.0:
            self._warned_at = now
            log.warning("settled jobs reached %d of %d replica(s) within %gs "
                        "(redis.wait_replicas): a failover now may run them again", acked,
                        cfg.redis.wait_replicas, cfg.redis.wait_timeout_s)

    def report(self, rep: Report) -> None:
        if rep.outcome == "handback":
            self.metrics.reclaimed.labels("handback").inc()
            return
        self.metrics.job_done(rep.queue, rep.task, rep.outcome, rep.duration_s)
        if rep.job_id and type(self.events) is not NoEvents:  # skip the no-op sink
            self.events.record(rep.outcome, rep.job_id, rep.queue, rep.task,
                               attempt=rep.attempt, lost=rep.lost, ts_ms=now_ms(),
                               error=rep.error, reason=rep.reason, result=rep.result)
        self.outcome_log.write(rep)


_HEAD = struct.Struct(">cHHII")  # complete.lua's '>c1I2I2I4I4'
_OPS = {op: op.encode() for op in "SRDBC"}


def pack_entries(chunk: list[Settle]) -> bytes:
    """complete.lua's ARGV[5]: per record a header (op and the lengths of the four
    fields) and the fields: entry id, job id, payload, extra (None: empty; a number:
    its decimal digits)."""
    parts: list[bytes] = []
    for s in chunk:
        jid = s.job_id.encode()
        x = s.extra
        extra = b"" if x is None else x if isinstance(x, bytes) else str(x).encode()
        parts += (_HEAD.pack(_OPS[s.op], len(s.eid), len(jid), len(s.payload), len(extra)),
                  s.eid, jid, s.payload, extra)
    return b"".join(parts)


class Completion:
    """COMPLETE.lua calls for every queue's records, chunked, to run in one pipelined
    round trip: alone (`Settler.settle`) or riding on the pool's next fetch."""

    def __init__(self, cfg: Config, batch: dict[str, list[Settle]]) -> None:
        prefix = cfg.redis.prefix
        ttl_ms = int(cfg.results.ttl_s * 1000)
        done_channel = GlobalKeys(prefix).done
        self.calls: list[scripts.PipeCall] = []
        self.groups: list[tuple[str, list[Settle]]] = []
        for q, items in batch.items():
            qk = QueueKeys(prefix, q)
            keys: list[Any] = [qk.stream, qk.delayed, qk.state, qk.dlq, qk.conf, qk.full,
                               qk.done, qk.cancel, qk.waiters, qk.progress]
            for i in range(0, len(items), ACK_CHUNK):
                chunk = items[i:i + ACK_CHUNK]
                argv = [GROUP, ttl_ms, len(chunk), done_channel, pack_entries(chunk)]
                self.calls.append(scripts.ScriptCall(scripts.COMPLETE, keys, argv))
                self.groups.append((q, chunk))
        # redis.wait_replicas: a WAIT right after them covers every settle before it
        self.wait = cfg.redis.wait_replicas if self.calls else 0
        if self.wait:
            self.calls.append(scripts.wait_call(self.wait,
                                                round(cfg.redis.wait_timeout_s * 1000)))

    def applied(self, replies: list[Any]
                ) -> tuple[list[tuple[str, list[Settle], str]],
                           list[tuple[tuple[str, list[Settle]], Exception]], int | None]:
        """Split the calls' replies: (queue, chunk, flags) for the chunks Redis ran,
        (chunk, error) for those it refused (to be settled again: each entry is gated
        on its XACK, so a second run applies nothing twice), and how many replicas
        acknowledged them (None: no WAIT)."""
        acked = None
        if self.wait:
            replies = list(replies)
            w = replies.pop()  # WAIT's reply: replicas that have every write before it
            acked = w if isinstance(w, int) else 0
        done: list[tuple[str, list[Settle], str]] = []
        failed: list[tuple[tuple[str, list[Settle]], Exception]] = []
        for (q, chunk), flags in zip(self.groups, replies, strict=True):
            if isinstance(flags, Exception):
                failed.append(((q, chunk), flags))
            else:
                done.append((q, chunk, flags.decode() if isinstance(flags, bytes)
                             else str(flags)))
        return done, failed, acked
