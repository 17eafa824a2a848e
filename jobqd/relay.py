"""The outbox relay, its sweeper, and recovery after Redis data loss (daemon side).

The producer half and the table are described in `jobqd.outbox`.

The relay (`run`, one per daemon with ``postgres.dsn``; several relays share
the work through ``FOR UPDATE SKIP LOCKED``) LISTENs on the channel and also
polls every second as a backstop. Per batch, in one transaction: lock up to 500
unpublished rows, enqueue them into Redis (batched per task), set
``published_at``/``job_id``, commit. Each row is enqueued with idempotency key
``idempotency_key`` or ``outbox:<id>``, so a relay dying between the Redis write
and the commit makes no second job: the next try gets the same job back.

Errors never block the outbox: an unknown task (no daemon routes it yet) is
noted in ``error`` and its rows are retried every `HOLD_S` while other tasks
flow; a full queue (backpressure) leaves its rows unpublished until it drains;
a payload over ``max_payload_bytes`` or args that are not a JSON object mark
the row failed (``failed_at``, ``error``): it is never published.

Finished: the relay sweeps published, unfinished rows (`SWEEP_S`) and sets
``finished_at``/``final_status`` from the job's Redis status once it succeeded
or died; with ``postgres.ledger`` on, the ledger also sets them as the events
arrive. Finished and failed rows are deleted after
``postgres.ledger_retention_days``.

Recovery after Redis data loss (`recover`, ``jobqd recover``): every
published, unfinished row whose job Redis no longer knows (and the ledger does
not know as finished) is reset to unpublished, and published again right away
if the routing is in Redis (else by the relay of the next daemon to start).
Running it twice is harmless: a reset row is not "published" any more, and a
re-published one's new job is present in Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aredis

from jobqd import connect, ops, pg, scripts
from jobqd.aio import Backoff, sleep_or_stop, wait_first
from jobqd.config import Config
from jobqd.deps import is_outage, is_postgres_error
from jobqd.errors import (
    ConfigError,
    JobNotFound,
    NotReplicated,
    PayloadTooDeep,
    PayloadTooLarge,
    QueueFull,
    RedisOutOfMemory,
    UnknownTask,
)
from jobqd.ids import queue_of
from jobqd.jobs import JobInfo, check_depth, validate_delay_s
from jobqd.keys import GlobalKeys, QueueKeys
from jobqd.metrics import Metrics
from jobqd.outbox import CHANNEL
from jobqd.runtime import Health, Runtime

log = logging.getLogger("jobqd.relay")

BATCH = 500  # rows per relay transaction
POLL_S = 1.0  # backstop poll when no NOTIFY arrives
HOLD_S = 10.0  # an unknown task's rows are retried this often
OOM_HOLD_S = 1.0  # rows refused by a Redis out of memory are retried this often
SWEEP_S = 5.0  # how often published rows are checked for completion
SWEEP_BATCH = 1000
PRUNE_EVERY_S = 600.0
MAX_ERROR = 2000


# ---------------------------------------------------------------- publishing


@dataclass(frozen=True, slots=True)
class _Row:
    id: int
    task: str
    args: Any
    queue: str | None
    delay_ms: int
    idem: str


@dataclass(slots=True)
class _Outcome:
    published: list[tuple[int, str]]  # (row id, job id)
    failed: list[tuple[int, str]]  # (row id, error): never publishable
    noted: list[tuple[int, str]]  # (row id, error): retried later
    created: dict[tuple[str, str], int]  # (queue, task) -> new jobs


_SELECT_PENDING = """
SELECT id, task, args, queue, idempotency_key, delay_s,
       CASE WHEN delay_s IS NULL OR delay_s = 'NaN' OR delay_s < 0 THEN 0
            ELSE greatest(0, least(delay_s, 1e12) - extract(epoch FROM now() - created_at))
       END::float8 AS due
  FROM outbox
 WHERE prefix = $1 AND published_at IS NULL AND failed_at IS NULL AND task <> ALL($2::text[])
 ORDER BY id
 LIMIT $3
   FOR UPDATE SKIP LOCKED
"""


def _row_args(r: Any) -> tuple[Any, str | None]:
    """A pending row's args, or why the row can never be published: the same checks
    as the producer side (`_validate`), for rows written by plain SQL."""
    try:
        args = orjson.loads(r["args"])
    except orjson.JSONDecodeError as e:  # jsonb nested deeper than orjson reads
        return None, f"args cannot be decoded: {e}"
    if not isinstance(args, dict):
        return None, ("args must be a JSON object (handler kwargs), got "
                      f"{type(args).__name__}")
    try:
        check_depth(args)
        if r["delay_s"] is not None:
            validate_delay_s(r["delay_s"])
    except PayloadTooDeep as e:
        return None, f"PayloadTooDeep: {e}"
    except ValueError as e:
        return None, f"ValueError: {e}"
    return args, None


async def _mark_published(conn: asyncpg.Connection, published: Sequence[tuple[int, str]]) -> None:
    """Record the Redis job ids (the step a crash may skip: see the module docstring)."""
    if not published:
        return
    await conn.execute(
        "UPDATE outbox o SET published_at = now(), job_id = u.job_id, error = NULL "
        "FROM unnest($1::bigint[], $2::text[]) AS u(id, job_id) WHERE o.id = u.id",
        [p[0] for p in published], [p[1] for p in published])


async def _mark_errors(conn: asyncpg.Connection, out: _Outcome) -> None:
    if out.failed:
        await conn.execute(
            "UPDATE outbox o SET failed_at = now(), error = u.err, "
            "publish_attempts = publish_attempts + 1 "
            "FROM unnest($1::bigint[], $2::text[]) AS u(id, err) WHERE o.id = u.id",
            [f[0] for f in out.failed], [f[1][:MAX_ERROR] for f in out.failed])
    if out.noted:
        await conn.execute(
            "UPDATE outbox o SET error = u.err, publish_attempts = publish_attempts + 1 "
            "FROM unnest($1::bigint[], $2::text[]) AS u(id, err) WHERE o.id = u.id",
            [f[0] for f in out.noted], [f[1][:MAX_ERROR] for f in out.noted])


class Publisher:
    """Moves committed outbox rows of one prefix into Redis (used by the relay and recover)."""

    def __init__(self, cfg: Config, redis: aredis.Redis, metrics: Metrics | None = None,
                 health: Health | None = None) -> None:
        self.cfg = cfg
        self.health = health
        self.prefix = cfg.redis.prefix
        self.runner = ops.AsyncRunner(redis)
        self.routing = ops.Routing(self.prefix)
        self.metrics = metrics
        self.held: dict[str, float] = {}  # task -> monotonic time its rows are tried again
        self._held_logged: set[str] = set()

    def _held_now(self) -> list[str]:
        now = time.monotonic()
        for t in [t for t, until in self.held.items() if until <= now]:
            del self.held[t]
        return list(self.held)

    async def publish_batch(self, pool: asyncpg.Pool) -> int:
        """One transaction: lock, publish and mark up to BATCH rows; returns rows locked."""
        async with pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(_SELECT_PENDING, self.prefix, self._held_now(), BATCH)
            if not rows:
                return 0
            out = _Outcome([], [], [], {})
            groups: dict[tuple[str, str | None, int], list[_Row]] = {}
            for r in rows:
                args, problem = _row_args(r)
                if problem is not None:
                    log.error("outbox row %d can never be published: %s", r["id"], problem)
                    out.failed.append((r["id"], problem))
                    continue
                row = _Row(id=r["id"], task=r["task"], args=args, queue=r["queue"],
                           delay_ms=round(r["due"] * 1000),
                           idem=r["idempotency_key"] or f"outbox:{r['id']}")
                groups.setdefault((row.task, row.queue, row.delay_ms), []).append(row)
            for (task, queue, delay_ms), grp in groups.items():
                if task in self.held:
                    continue
                await self._publish_group(task, queue, delay_ms, grp, out)
            await _mark_published(conn, out.published)
            await _mark_errors(conn, out)
        if self.metrics is not None:
            for (q, t), n in out.created.items():
                self.metrics.enqueued.labels(q, t).inc(n)
        return len(rows)

    async def _enqueue(self, task: str, queue: str | None, delay_ms: int,
                       rows: Sequence[_Row]) -> list[Any]:
        return await self.runner.run(ops.enqueue(
            self.prefix, self.routing, task, [r.args for r in rows], queue=queue,
            delay_s=delay_ms / 1000.0 if delay_ms > 0 else None,
            idempotency_keys=[r.idem for r in rows],
            idem_ttl_ms=int(self.cfg.idempotency_ttl_s * 1000),
            wait_replicas=self.cfg.redis.wait_replicas,
            wait_timeout_ms=round(self.cfg.redis.wait_timeout_s * 1000)))

    async def _publish_group(self, task: str, queue: str | None, delay_ms: int,
                             rows: list[_Row], out: _Outcome) -> None:
        try:
            jobs = await self._enqueue(task, queue, delay_ms, rows)
        except QueueFull as e:
            # backpressure: the rows stay unpublished and are tried again shortly
            self.held[task] = time.monotonic() + max(0.2, e.retry_after_s)
            log.debug("outbox: %s", e)
            return
        except RedisOutOfMemory as e:
            # Redis is full: the rows stay unpublished (jobs of chunks that went through
            # are found again by their idempotency keys on the next try)
            self.held[task] = time.monotonic() + OOM_HOLD_S
            if self.health is not None:
                self.health.redis_oom = True
            log.warning("outbox: %s; %d row(s) of task %r wait (retried in %gs)", e,
                        len(rows), task, OOM_HOLD_S)
            return
        except NotReplicated as e:
            # on the master but not yet on enough replicas: the rows stay unpublished
            # and are tried again (their idempotency keys find the jobs, nothing doubles)
            self.held[task] = time.monotonic() + OOM_HOLD_S
            if self.metrics is not None:
                self.metrics.not_replicated.labels("enqueue").inc()
            log.warning("outbox: %s; %d row(s) of task %r wait (retried in %gs)", e,
                        len(rows), task, OOM_HOLD_S)
            return
        except UnknownTask as e:
            self.held[task] = time.monotonic() + HOLD_S
            if task not in self._held_logged:
                log.warning("outbox: %s; %d row(s) wait (retried every %gs)", e, len(rows),
                            HOLD_S)
                self._held_logged.add(task)
            out.noted += [(r.id, str(e)) for r in rows]
            return
        except (PayloadTooLarge, TypeError, ValueError) as e:
            if len(rows) > 1:  # find the bad row(s); the others go through
                for r in rows:
                    await self._publish_group(task, queue, delay_ms, [r], out)
                return
            log.error("outbox row %d can never be published: %s", rows[0].id, e)
            out.failed.append((rows[0].id, f"{type(e).__name__}: {e}"))
            return
        self._held_logged.discard(task)
        for r, job in zip(rows, jobs, strict=True):
            out.published.append((r.id, job.id))
            if job.created:
                key = (job.queue, task)
                out.created[key] = out.created.get(key, 0) + 1

    async def publish_all(self, pool: asyncpg.Pool, stop: asyncio.Event | None = None) -> int:
        """Publish batches until no unheld row is left; returns rows handled."""
        total = 0
        while stop is None or not stop.is_set():
            n = await self.publish_batch(pool)
            total += n
            if n < BATCH:
                break
        return total


# ---------------------------------------------------------------- completion


def statuses(prefix: str, job_ids: Sequence[str]) -> ops.Op[dict[str, JobInfo | None]]:
    """Pipelined status of many jobs: {job id: JobInfo, or None when Redis does not know it}."""
    calls: list[ops.Cmd | ops.Eval] = []
    known: list[tuple[str, str]] = []
    out: dict[str, JobInfo | None] = {}
    for jid in job_ids:
        q = queue_of(jid)
        if q is None:
            out[jid] = None
            continue
        calls.append(ops.status_call(prefix, q, jid))
        known.append((jid, q))
    replies = (yield ops.Pipe(calls)) if calls else []
    for (jid, q), reply in zip(known, replies, strict=True):
        try:
            out[jid] = ops.parse_status(jid, q, reply)
        except JobNotFound:
            out[jid] = None
    return out


async def _mark_finished(conn: asyncpg.Connection | asyncpg.Pool,
                         done: Sequence[tuple[int, str, float | None]]) -> None:
    if done:
        await conn.execute(
            "UPDATE outbox o SET finished_at = coalesce(to_timestamp(u.fin), now()), "
            "final_status = u.st "
            "FROM unnest($1::bigint[], $2::text[], $3::float8[]) AS u(id, st, fin) "
            "WHERE o.id = u.id AND o.finished_at IS NULL",
            [d[0] for d in done], [d[1] for d in done], [d[2] for d in done])


class Sweeper:
    """Marks published rows finished from Redis status; prunes old finished rows."""

    def __init__(self, cfg: Config, runner: ops.AsyncRunner) -> None:
        self.cfg = cfg
        self.runner = runner
        self.cursor = 0
        self.last_prune = 0.0

    async def sweep(self, pool: asyncpg.Pool) -> int:
        prefix = self.cfg.redis.prefix
        rows = await pool.fetch(
            "SELECT id, job_id FROM outbox WHERE prefix = $1 AND published_at IS NOT NULL "
            "AND finished_at IS NULL AND id > $2 ORDER BY id LIMIT $3",
            prefix, self.cursor, SWEEP_BATCH)
        self.cursor = rows[-1]["id"] if len(rows) == SWEEP_BATCH else 0
        infos: dict[str, JobInfo | None] = {}
        if rows:
            infos = await self.runner.run(statuses(prefix, [r["job_id"] for r in rows]))
        done = []
        for r in rows:
            info = infos.get(r["job_id"])
            if info is not None and info.status in ("succeeded", "dead"):
                done.append((r["id"], info.status, info.finished_at))
        await _mark_finished(pool, done)
        if time.monotonic() - self.last_prune > PRUNE_EVERY_S:
            self.last_prune = time.monotonic()
            await self.prune(pool)
        return len(done)

    async def prune(self, pool: asyncpg.Pool) -> int:
        total = 0
        while True:
            n = await pool.fetchval(
                "WITH gone AS (DELETE FROM outbox WHERE id IN ("
                "  SELECT id FROM outbox WHERE prefix = $1 "
                "  AND (finished_at IS NOT NULL OR failed_at IS NOT NULL) "
                "  AND coalesce(finished_at, failed_at) < now() - make_interval(days => $2) "
                "  LIMIT 10000) RETURNING 1) SELECT count(*) FROM gone",
                self.cfg.redis.prefix, self.cfg.postgres.ledger_retention_days)
            total += int(n)
            if n < 10000:
                return total


# ---------------------------------------------------------------- the relay




class _Relay:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.pool: asyncpg.Pool | None = None
        self.listener: asyncpg.Connection | None = None
        self.wake = asyncio.Event()

    async def serve(self, stop: asyncio.Event, backoff: Backoff) -> None:
        rt = self.rt
        cfg = rt.config
        me = f"{cfg.postgres.schema}:{cfg.redis.prefix}"
        self.pool = await pg.connect_pool(cfg, min_size=1, max_size=2)
        await pg.migrate(self.pool, cfg.postgres.schema)
        self.listener = await pg.connect(cfg)

        def on_notify(_c: object, _pid: int, _channel: str, payload: str) -> None:
            if payload == me:
                self.wake.set()

        await self.listener.add_listener(CHANNEL, on_notify)
        self.listener.add_termination_listener(lambda _c: self.wake.set())
        publisher = Publisher(cfg, rt.redis, rt.metrics, rt.health)
        sweeper = Sweeper(cfg, publisher.runner)
        next_sweep = 0.0
        log.info("outbox relay listening (schema %s, prefix %s)", cfg.postgres.schema,
                 cfg.redis.prefix)
        while not stop.is_set():
            if self.listener.is_closed():
                raise ConnectionError("outbox LISTEN connection lost")
            self.wake.clear()  # before the pass: a NOTIFY during it triggers the next one
            n = await publisher.publish_batch(self.pool)
            backoff.reset()
            rt.health.postgres_ok = True
            if time.monotonic() >= next_sweep:
                await sweeper.sweep(self.pool)
                next_sweep = time.monotonic() + SWEEP_S
            if n >= BATCH:
                await asyncio.sleep(0)  # more rows waiting: go on (yielding to others)
                continue
            await wait_first(self.wake, stop, timeout_s=POLL_S)

    async def close(self) -> None:
        listener, self.listener = self.listener, None
        if listener is not None:
            try:
                await asyncio.wait_for(listener.close(), 2.0)
            except (TimeoutError, OSError, asyncpg.InterfaceError):
                listener.terminate()
        pool, self.pool = self.pool, None
        await pg.close_pool(pool)


async def run(rt: Runtime, stop: asyncio.Event) -> None:
    """The outbox relay component: publish committed outbox rows until `stop`."""
    backoff = Backoff(0.2, 10.0)
    while not stop.is_set():
        relay = _Relay(rt)
        try:
            await relay.serve(stop, backoff)
        except Exception as e:
            if not is_outage(e):
                raise
            if is_postgres_error(e):
                rt.health.postgres_ok = False
            delay = backoff.next()
            log.warning("outbox relay: %s: %s; retrying in %.1fs", type(e).__name__, e, delay)
            await relay.close()
            await sleep_or_stop(delay, stop)
        finally:
            await relay.close()


# ---------------------------------------------------------------- recovery


async def recover(cfg: Config) -> dict[str, int]:
    """Re-publish outbox jobs lost by Redis (``jobqd recover``); idempotent.

    Returns counts: ``checked`` published-unfinished rows examined, ``present`` jobs
    Redis still holds, ``finished`` rows newly marked finished, ``requeued`` rows
    whose job was lost and are reset to unpublished, ``published`` rows put in
    Redis by this run, ``pending`` rows left for a relay (e.g. no daemon has
    published the routing yet).
    """
    counts = dict.fromkeys(("checked", "present", "finished", "requeued", "published",
                            "pending"), 0)
    pool = await pg.connect_pool(cfg, min_size=1, max_size=2)
    r = connect.connect(cfg.redis_url, decode_responses=False, socket_connect_timeout=5)
    try:
        await pg.migrate(pool, cfg.postgres.schema)
        if not await r.exists(GlobalKeys(cfg.redis.prefix).routing):
            # Redis lost the routing with its data: publish it (and the queue settings,
            # weights, consumer groups) first, so the jobs re-published below can be
            # enqueued and run at once, without waiting for a daemon to notice
            from jobqd.publish import publish_config  # noqa: PLC0415

            log.warning("recover: the routing is missing from redis: publishing it")
            await publish_config(cfg)
        await _ensure_groups(r, cfg)
        runner = ops.AsyncRunner(r)
        prefix = cfg.redis.prefix
        cursor = 0
        while True:
            async with pool.acquire() as conn, conn.transaction():
                rows = await conn.fetch(
                    "SELECT id, job_id FROM outbox WHERE prefix = $1 "
                    "AND published_at IS NOT NULL AND finished_at IS NULL AND id > $2 "
                    "ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED", prefix, cursor, BATCH)
                if not rows:
                    break
                cursor = rows[-1]["id"]
                counts["checked"] += len(rows)
                infos = await runner.run(statuses(prefix, [x["job_id"] for x in rows]))
                lost = [x for x in rows if infos.get(x["job_id"]) is None]
                ledger = {}
                if lost:  # the ledger may know a finished job whose Redis record expired
                    ledger = {x["id"]: x for x in await conn.fetch(
                        "SELECT id, status, extract(epoch FROM finished_at)::float8 AS fin "
                        "FROM jobs WHERE id = ANY($1::text[]) AND status IN "
                        "('succeeded', 'dead')", [x["job_id"] for x in lost])}
                done: list[tuple[int, str, float | None]] = []
                requeue: list[int] = []
                for x in rows:
                    info = infos.get(x["job_id"])
                    if info is None:
                        known = ledger.get(x["job_id"])
                        if known is not None:
                            done.append((x["id"], known["status"], known["fin"]))
                        else:
                            requeue.append(x["id"])
                    elif info.status in ("succeeded", "dead"):
                        done.append((x["id"], info.status, info.finished_at))
                    else:
                        counts["present"] += 1
                await _mark_finished(conn, done)
                counts["finished"] += len(done)
                if requeue:
                    # the lost job ids will never run: their ledger rows (if any) end
                    # dead with reason redis_lost, pointing at the re-published row
                    await conn.execute(
                        "UPDATE jobs j SET status = 'dead', reason = 'redis_lost', "
                        "error = 'lost with redis data; jobqd recover re-published outbox "
                        "row ' || o.id || ' as a new job', finished_at = now(), "
                        "event_ms = extract(epoch FROM now()) * 1000, updated_at = now() "
                        "FROM outbox o WHERE o.id = ANY($1::bigint[]) AND j.id = o.job_id "
                        "AND j.status NOT IN ('succeeded', 'dead', 'cancelled')", requeue)
                    await conn.execute(
                        "UPDATE outbox SET error = 'job ' || job_id || ' lost by redis; "
                        "re-published by jobqd recover', published_at = NULL, job_id = NULL, "
                        "recovered = recovered + 1 WHERE id = ANY($1::bigint[])", requeue)
                    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL,
                                       f"{cfg.postgres.schema}:{prefix}")
                    counts["requeued"] += len(requeue)
                    log.warning("recover: %d outbox job(s) lost by redis are re-published",
                                len(requeue))
        publisher = Publisher(cfg, r)
        before = await _pending_count(pool, prefix)
        with contextlib.suppress(UnknownTask):
            await publisher.publish_all(pool)
        after = await _pending_count(pool, prefix)
        counts["published"] = max(0, before - after)
        counts["pending"] = after
    finally:
        await r.aclose()
        await pg.close_pool(pool)
    return counts


async def report(cfg: Config) -> dict[str, Any]:
    """The jobs the ledger saw accepted and never finish that Redis no longer holds
    (``jobqd recover --report``; changes nothing).

    The ledger knows a job from its first start on (and outbox rows from their
    commit): a job enqueued straight to Redis and lost before any daemon started it
    cannot be listed by anything. Each entry has the ledger's last state, and
    ``outbox_id`` when an unfinished outbox row holds the job (`recover` re-publishes
    those; the others are lost for good: their producers must enqueue them again).
    """
    if not cfg.postgres.ledger:
        raise ConfigError("jobqd recover --report needs postgres.ledger: true (the ledger "
                          "is what remembers accepted jobs)", path=cfg.path,
                          key="postgres.ledger")
    pool = await pg.connect_pool(cfg, min_size=1, max_size=2)
    r = connect.connect(cfg.redis_url, decode_responses=False, socket_connect_timeout=5)
    lost: list[dict[str, Any]] = []
    checked = 0
    try:
        await pg.migrate(pool, cfg.postgres.schema)
        runner = ops.AsyncRunner(r)
        prefix = cfg.redis.prefix
        after = ""
        while True:
            rows = await pool.fetch(
                "SELECT j.id, j.queue, j.task, j.status, j.attempts, j.lost, "
                "extract(epoch FROM j.enqueued_at)::float8 AS enq, "
                "extract(epoch FROM j.started_at)::float8 AS started, "
                "extract(epoch FROM j.updated_at)::float8 AS updated, "
                "(SELECT o.id FROM outbox o WHERE o.prefix = $1 AND o.job_id = j.id "
                " AND o.finished_at IS NULL LIMIT 1) AS outbox_id "
                "FROM jobs j WHERE j.prefix = $1 AND j.id > $2 "
                "AND j.status NOT IN ('succeeded', 'dead', 'cancelled') "
                "ORDER BY j.id LIMIT $3", prefix, after, BATCH)
            if not rows:
                break
            after = rows[-1]["id"]
            checked += len(rows)
            infos = await runner.run(statuses(prefix, [x["id"] for x in rows]))
            for x in rows:
                if infos.get(x["id"]) is None:
                    lost.append({"id": x["id"], "task": x["task"], "queue": x["queue"],
                                 "last_status": x["status"], "attempts": x["attempts"],
                                 "lost": x["lost"], "enqueued_at": x["enq"],
                                 "started_at": x["started"], "last_event_at": x["updated"],
                                 "outbox_id": x["outbox_id"]})
    finally:
        await r.aclose()
        await pg.close_pool(pool)
    return {"checked": checked, "missing": len(lost),
            "recoverable": sum(1 for x in lost if x["outbox_id"] is not None), "jobs": lost}


async def _ensure_groups(r: aredis.Redis, cfg: Config) -> None:
    """Every configured queue's consumer group (as a daemon's start does): a stream
    re-created by a re-publish must be readable by `status` and the consumers."""
    for q in cfg.queues:
        await scripts.ensure_group(r, QueueKeys(cfg.redis.prefix, q).stream)


async def _pending_count(pool: asyncpg.Pool, prefix: str) -> int:
    n = await pool.fetchval("SELECT count(*) FROM outbox WHERE prefix = $1 "
                            "AND published_at IS NULL AND failed_at IS NULL", prefix)
    return int(n)
