"""The job ledger: every job's lifecycle, kept in PostgreSQL (``postgres.ledger: true``).

The pool calls `Ledger.record` on the hot path (started, retried, succeeded,
dead; the reaper records worker_lost deaths). `record` only appends to an
in-memory buffer; `Ledger.run` flushes it every `FLUSH_INTERVAL_S` or every
`FLUSH_SIZE` events, whichever comes first, as one upsert per batch into
``<schema>.jobs`` (one row per job, its latest state).

Ordering: within a batch, events are folded per job in the order they were
recorded; across batches (and across daemons: a job may be retried on one and
finish on another) the row keeps the state of the event with the latest
timestamp (``event_ms``; hosts are expected to be NTP-synchronised). Rows are
monotonic (checked in SQL, so it holds whichever daemon writes): a finished row
(succeeded, dead) is never rewritten by a later or late event, such as the
outcome of a stalled worker resumed after its job finished elsewhere; the one
exception is a dead job that starts again after its death (a dead-letter
replay keeps the job id).

The buffer is bounded (`MAX_BUFFER` events). When PostgreSQL is down it fills
and the *oldest* events are dropped, counted in ``Ledger.dropped`` and the
metric ``jobqd_ledger_events_dropped_total`` and logged: the ledger never slows
or blocks job execution. On stop, `run` drains the buffer (bounded by
`DRAIN_TIMEOUT_S`). Rows not updated for ``postgres.ledger_retention_days``
are pruned.

When a job finishes, the ledger also marks the outbox row that produced it
finished (``finished_at``, ``final_status``), in the same transaction.

`lookup` reads a job back: the status fallback once its Redis record expired.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, cast

import asyncpg
import orjson
from prometheus_client import Counter, Gauge

from jobqd import pg
from jobqd.aio import Backoff, wait_first
from jobqd.config import Config
from jobqd.deps import is_postgres_error
from jobqd.jobs import STATUSES, JobInfo, Status
from jobqd.runtime import Runtime

log = logging.getLogger("jobqd.ledger")

FLUSH_INTERVAL_S = 0.2
FLUSH_SIZE = 1000
MAX_BUFFER = 100_000
DRAIN_TIMEOUT_S = 5.0
PRUNE_EVERY_S = 600.0
PRUNE_CHUNK = 10_000
MAX_RESULT_BYTES = 256 * 1024  # larger results are stored as null (they stay in Redis)
MAX_ERROR_CHARS = 4000

_STATUS_OF = {"started": "running", "retried": "scheduled", "succeeded": "succeeded",
              "dead": "dead"}
_TERMINAL = ("succeeded", "dead")

# Ledger rows are monotonic. A finished row (succeeded, dead, cancelled) is never
# rewritten by a later or late event (a stalled worker resumed after its job was
# reclaimed and finished elsewhere, say) -- except a dead row whose job ran again
# after it died: a dead-letter replay (same job id) starts a new life. A non-finished
# row takes an event by its timestamp, and takes a finished event unless its own run
# started after that event (the job was replayed since).
_FINAL = "('succeeded', 'dead', 'cancelled')"
_KEEP = (f"(j.status IN {_FINAL} AND NOT (j.status = 'dead' "
         "AND coalesce(EXCLUDED.started_at > j.finished_at, false)))")
_APPLY = (f"(CASE WHEN {_KEEP} THEN false "
          f"WHEN EXCLUDED.status IN {_FINAL} AND j.status NOT IN {_FINAL} "
          "THEN NOT coalesce(j.started_at > EXCLUDED.finished_at, false) "
          "ELSE EXCLUDED.event_ms >= j.event_ms END)")

_UPSERT = f"""
INSERT INTO jobs AS j (id, prefix, queue, task, status, attempts, lost, error, reason, result,
                       enqueued_at, started_at, finished_at, event_ms, updated_at)
SELECT u.id, $1, u.queue, u.task, u.status, u.attempts, u.lost, u.error, u.reason,
       u.result::jsonb, to_timestamp(u.enq / 1000.0), to_timestamp(u.started / 1000.0),
       to_timestamp(u.finished / 1000.0), u.event_ms, now()
  FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::int[], $7::int[],
              $8::text[], $9::text[], $10::text[], $11::float8[], $12::float8[],
              $13::float8[], $14::float8[])
       AS u(id, queue, task, status, attempts, lost, error, reason, result, enq, started,
            finished, event_ms)
ON CONFLICT (id) DO UPDATE SET
    status = CASE WHEN {_APPLY} THEN EXCLUDED.status ELSE j.status END,
    attempts = CASE WHEN {_APPLY} THEN EXCLUDED.attempts ELSE j.attempts END,
    lost = CASE WHEN {_APPLY} THEN EXCLUDED.lost ELSE j.lost END,
    error = CASE WHEN NOT {_APPLY} THEN j.error
                 WHEN EXCLUDED.status = 'succeeded' THEN NULL
                 ELSE coalesce(EXCLUDED.error, j.error) END,
    reason = CASE WHEN {_APPLY} THEN EXCLUDED.reason ELSE j.reason END,
    result = CASE WHEN {_APPLY} THEN EXCLUDED.result ELSE j.result END,
    finished_at = CASE WHEN {_APPLY} THEN EXCLUDED.finished_at ELSE j.finished_at END,
    event_ms = CASE WHEN {_KEEP} THEN j.event_ms ELSE greatest(j.event_ms, EXCLUDED.event_ms) END,
    enqueued_at = coalesce(j.enqueued_at, EXCLUDED.enqueued_at),
    started_at = CASE WHEN {_KEEP} THEN j.started_at
                      ELSE greatest(j.started_at, EXCLUDED.started_at) END,
    updated_at = CASE WHEN {_KEEP} THEN j.updated_at ELSE now() END
"""

_OUTBOX_DONE = """
UPDATE outbox o SET finished_at = to_timestamp(u.fin / 1000.0), final_status = u.st
  FROM unnest($1::text[], $2::text[], $3::float8[]) AS u(job_id, st, fin)
 WHERE o.job_id = u.job_id AND o.finished_at IS NULL
"""


@dataclass(slots=True)
class _Event:
    event: str
    job_id: str
    queue: str
    task: str
    attempt: int
    lost: int
    ts_ms: float
    enq_ms: float | None
    error: str | None
    reason: str | None
    result: Any


@dataclass(slots=True)
class _State:
    """A job's row as folded from one batch of events."""

    queue: str
    task: str
    status: str = "running"
    attempts: int = 0
    lost: int = 0
    error: str | None = None
    reason: str | None = None
    result: str | None = None
    enq: float | None = None
    started: float | None = None
    finished: float | None = None
    event_ms: float = -math.inf


def _clean(text: str | None, limit: int = MAX_ERROR_CHARS) -> str | None:
    if text is None:
        return None
    return text[:limit].replace("\x00", "\ufffd")  # PostgreSQL text cannot hold NUL


def _result_json(result: Any) -> str | None:
    try:
        raw = orjson.dumps(result)
    except TypeError:
        return None
    if len(raw) > MAX_RESULT_BYTES:
        return None
    return raw.replace(b"\\u0000", b"\\ufffd").decode()


def fold(events: list[_Event]) -> dict[str, _State]:
    """Apply a batch of events in order: one state per job."""
    out: dict[str, _State] = {}
    for ev in events:
        st = out.get(ev.job_id)
        if st is None:
            st = out[ev.job_id] = _State(queue=ev.queue, task=ev.task)
        elif st.status in _TERMINAL and not (st.status == "dead" and ev.event == "started"):
            continue  # monotonic: only a dead-letter replay's new start reopens a job
        if ev.enq_ms is not None and st.enq is None:
            st.enq = ev.enq_ms
        if ev.event == "started":
            st.started = ev.ts_ms if st.started is None else max(st.started, ev.ts_ms)
        st.status = _STATUS_OF.get(ev.event, "running")
        st.attempts = ev.attempt
        st.lost = ev.lost
        if st.status == "succeeded":
            st.error = None
        elif ev.error is not None:
            st.error = _clean(ev.error)
        st.reason = _clean(ev.reason) if st.status == "dead" else None
        st.result = _result_json(ev.result) if st.status == "succeeded" else None
        st.finished = ev.ts_ms if st.status in _TERMINAL else None
        st.event_ms = ev.ts_ms
    return out


class Ledger:
    """The JobEvents sink of `jobqd.runtime`, written to ``<schema>.jobs``."""

    def __init__(self, rt: Runtime, *, max_buffer: int = MAX_BUFFER,
                 flush_interval_s: float = FLUSH_INTERVAL_S,
                 flush_size: int = FLUSH_SIZE) -> None:
        self.rt = rt
        self.prefix = rt.config.redis.prefix
        self.max_buffer = max_buffer
        self.flush_interval_s = flush_interval_s
        self.flush_size = flush_size
        self.buffer: collections.deque[_Event] = collections.deque()
        self.dropped = 0
        self.written = 0
        self.db = pg.PgHandle(rt.config, min_size=1, max_size=2)
        self._kick = asyncio.Event()
        self._last_drop_log = 0.0
        m = rt.metrics
        self._m_dropped = m.component(Counter, "jobqd_ledger_events_dropped", "Ledger events "
                                      "dropped (buffer full while PostgreSQL was unreachable)")
        self._m_written = m.component(Counter, "jobqd_ledger_events_written",
                                      "Ledger events written to PostgreSQL")
        self._m_buffered = m.component(Gauge, "jobqd_ledger_events_buffered",
                                       "Ledger events waiting to be written")
        self._m_buffered.set_function(lambda: len(self.buffer))

    # ------------------------------------------------------------ hot path

    def record(self, event: str, job_id: str, queue: str, task: str, *, attempt: int,
               lost: int, ts_ms: float, enq_ms: float | None = None, error: str | None = None,
               reason: str | None = None, result: Any = None) -> None:
        if len(self.buffer) >= self.max_buffer:
            self.buffer.popleft()
            self._dropped(1)
        self.buffer.append(_Event(event, job_id, queue, task, attempt, lost, ts_ms, enq_ms,
                                  error, reason, result))
        if len(self.buffer) >= self.flush_size:
            self._kick.set()

    def _dropped(self, n: int) -> None:
        self.dropped += n
        self._m_dropped.inc(n)
        now = time.monotonic()
        if now - self._last_drop_log > 10.0:
            self._last_drop_log = now
            log.warning("ledger buffer full (%d events): dropped %d oldest event(s) so far",
                        self.max_buffer, self.dropped)

    # ------------------------------------------------------------ writing

    def _take(self) -> list[_Event]:
        n = min(len(self.buffer), self.flush_size)
        return [self.buffer.popleft() for _ in range(n)]

    def _give_back(self, batch: list[_Event]) -> None:
        self.buffer.extendleft(reversed(batch))
        over = len(self.buffer) - self.max_buffer
        if over > 0:
            for _ in range(over):
                self.buffer.popleft()
            self._dropped(over)

    async def write(self, pool: asyncpg.Pool, batch: list[_Event]) -> None:
        states = fold(batch)
        ids = list(states)
        cols: list[list[Any]] = [[] for _ in range(13)]
        done: list[tuple[str, str, float]] = []
        for jid in ids:
            s = states[jid]
            for col, v in zip(cols, (jid, s.queue, s.task, s.status, s.attempts, s.lost,
                                     s.error, s.reason, s.result, s.enq, s.started,
                                     s.finished, s.event_ms), strict=True):
                col.append(v)
            if s.status in _TERMINAL and s.finished is not None:
                done.append((jid, s.status, s.finished))
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(_UPSERT, self.prefix, *cols)
            if done:
                await conn.execute(_OUTBOX_DONE, [d[0] for d in done], [d[1] for d in done],
                                   [d[2] for d in done])
        self.written += len(batch)
        self._m_written.inc(len(batch))

    async def flush(self) -> int:
        """Write everything buffered now (raises on PostgreSQL errors, events kept)."""
        total = 0
        while self.buffer:
            pool = await self.db.get()
            batch = self._take()
            try:
                await self.write(pool, batch)
            except Exception as e:
                if is_postgres_error(e):
                    self._give_back(batch)
                    raise
                if isinstance(e, asyncpg.PostgresError):
                    # bad data, not an outage: retrying would block the ledger forever
                    log.error("ledger: dropping a batch of %d events PostgreSQL rejects: %s",
                              len(batch), e)
                    self._dropped(len(batch))
                    continue
                self._give_back(batch)
                raise
            total += len(batch)
        return total

    async def prune(self) -> int:
        pool = await self.db.get()
        days = self.rt.config.postgres.ledger_retention_days
        total = 0
        while True:
            n = await pool.fetchval(
                "WITH gone AS (DELETE FROM jobs WHERE id IN (SELECT id FROM jobs "
                "WHERE updated_at < now() - make_interval(days => $1) LIMIT $2) "
                "RETURNING 1) SELECT count(*) FROM gone", days, PRUNE_CHUNK)
            total += int(n)
            if n < PRUNE_CHUNK:
                break
        if total:
            log.info("ledger: pruned %d job(s) older than %d days", total, days)
        return total

    async def lookup(self, job_id: str) -> JobInfo | None:
        """`lookup` on this ledger's own pool (for the daemon's HTTP status fallback)."""
        return await lookup(await self.db.get(), job_id)

    async def run(self, stop: asyncio.Event) -> None:
        """Flush until `stop`, then drain what is left (bounded by DRAIN_TIMEOUT_S)."""
        backoff = Backoff(0.2, 10.0)
        next_prune = 0.0
        failing = False
        try:
            while not stop.is_set():
                try:
                    await self.flush()
                    if time.monotonic() >= next_prune:
                        next_prune = time.monotonic() + PRUNE_EVERY_S
                        await self.prune()
                    if failing:
                        log.info("ledger: postgres reachable again")
                    failing = False
                    backoff.reset()
                    self.rt.health.postgres_ok = True
                    delay = self.flush_interval_s
                except Exception as e:
                    if not is_postgres_error(e):
                        raise
                    self.rt.health.postgres_ok = False
                    delay = backoff.next()
                    if not failing:
                        log.warning("ledger: cannot write to postgres (%s); buffering "
                                    "(%d events)", e, len(self.buffer))
                    failing = True
                self._kick.clear()
                if self.buffer and len(self.buffer) >= self.flush_size and not failing:
                    continue
                await wait_first(stop, self._kick, timeout_s=delay)
            await self._drain()
        finally:
            await self.db.close()

    async def _drain(self) -> None:
        if not self.buffer:
            return
        n = len(self.buffer)
        try:
            await asyncio.wait_for(self.flush(), DRAIN_TIMEOUT_S)
        except Exception as e:
            if not (is_postgres_error(e) or isinstance(e, TimeoutError)):
                raise
            log.error("ledger: could not write %d of %d events at shutdown: %s",
                      len(self.buffer), n, e)
            self._dropped(len(self.buffer))
            self.buffer.clear()


def _ts(v: Any) -> float | None:
    return None if v is None else float(v.timestamp())


async def lookup(cfg_or_pool: Config | asyncpg.Pool | asyncpg.Connection,
                 job_id: str) -> JobInfo | None:
    """The ledger's record of a job, or None (status fallback once Redis forgot it)."""
    sql = ("SELECT id, queue, task, status, attempts, lost, error, reason, result, "
           "enqueued_at, started_at, finished_at FROM jobs WHERE id = $1")
    if isinstance(cfg_or_pool, Config):
        conn = await pg.connect(cfg_or_pool)
        try:
            row = await conn.fetchrow(sql, job_id)
        except asyncpg.UndefinedTableError:  # never migrated: no ledger yet
            row = None
        finally:
            await conn.close()
    else:
        row = await cfg_or_pool.fetchrow(sql, job_id)
    if row is None:
        return None
    status = row["status"] if row["status"] in STATUSES else "running"
    return JobInfo(id=row["id"], status=cast(Status, status), task=row["task"],
                   queue=row["queue"], attempts=row["attempts"], lost=row["lost"],
                   result=None if row["result"] is None else orjson.loads(row["result"]),
                   error=row["error"], reason=row["reason"],
                   enqueued_at=_ts(row["enqueued_at"]), started_at=_ts(row["started_at"]),
                   finished_at=_ts(row["finished_at"]))
