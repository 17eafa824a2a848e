"""The transactional outbox: enqueue a job in the same PostgreSQL transaction as
the business write that causes it. Rollback: no job. Commit: exactly one job.

The table (created by `jobqd.pg.migrate`), ``<schema>.outbox``::

    id               bigserial PRIMARY KEY     -- the outbox row id
    prefix           text NOT NULL DEFAULT 'jobqd'  -- redis.prefix of the target deployment
    task             text NOT NULL              -- task name
    args             jsonb NOT NULL DEFAULT '{}'  -- handler kwargs: a JSON object
    queue            text NULL                  -- NULL: the task's routed queue
    delay_s          float8 NULL                -- run no earlier than created_at + delay_s
    idempotency_key  text NULL                  -- NULL: "outbox:<id>" is used
    created_at       timestamptz DEFAULT now()
    published_at     timestamptz NULL           -- set once the job is in Redis
    job_id           text NULL                  -- the jobqd job id, once published
    publish_attempts int DEFAULT 0              -- failed publish tries (unknown task...)
    error            text NULL                  -- the last publish error
    failed_at        timestamptz NULL           -- set when the row can never be published
    finished_at      timestamptz NULL           -- set once the job succeeded or died
    final_status     text NULL                  -- 'succeeded' | 'dead'
    recovered        int DEFAULT 0              -- times `recover` re-published it

Any PostgreSQL client may enqueue with a plain
``INSERT INTO jobqd.outbox (prefix, task, args) VALUES ('jobqd', 'send_email', '{"to": "x"}')``;
a statement trigger NOTIFYs channel ``jobqd_outbox`` (payload
``<schema>:<prefix>``) at commit. `enqueue` below is that INSERT, validated.

The relay that moves committed rows to Redis, sweeps finished ones and
recovers after Redis data loss is daemon code: `jobqd.relay`. This module is
the producer half only, imported into web applications: it needs asyncpg and
orjson, never the daemon's runtime or metrics.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import asyncpg
import orjson

from jobqd.jobs import check_depth, validate_delay_s

CHANNEL = "jobqd_outbox"  # NOTIFY channel of the outbox trigger (payload <schema>:<prefix>)
SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def check_schema(schema: str) -> str:
    """A schema name safe to put in SQL (a lowercase identifier), else ValueError."""
    if not SCHEMA_RE.match(schema):
        raise ValueError(f"schema must be a lowercase SQL identifier, got {schema!r}")
    return schema


# ---------------------------------------------------------------- producer side


def _validate(task: str, args: Any, delay_s: float | None,
              idempotency_key: str | None) -> str:
    if not isinstance(task, str) or not task:
        raise TypeError("task must be a non-empty string")
    if args is None:
        args = {}
    if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
        raise TypeError("args must be a dict with string keys")
    check_depth(args)
    if delay_s is not None:
        validate_delay_s(delay_s)
    if idempotency_key is not None and (not isinstance(idempotency_key, str)
                                        or not idempotency_key):
        raise TypeError("idempotency_key must be a non-empty string")
    try:
        raw = orjson.dumps(args)
    except TypeError as e:
        raise TypeError(f"job args are not JSON-serialisable: {e}") from None
    if b"\\u0000" in raw:
        raise ValueError("job args contain NUL characters, which PostgreSQL jsonb cannot store")
    return raw.decode()


async def enqueue(conn: asyncpg.Connection, task: str, args: dict[str, Any] | None = None, *,
                  queue: str | None = None, delay_s: float | None = None,
                  idempotency_key: str | None = None, prefix: str = "jobqd",
                  schema: str = "jobqd") -> int:
    """Add a job to the outbox in `conn`'s current transaction; returns the row id.

    The job reaches Redis only if (and once) the transaction commits. Validation
    errors raise before anything is written, so they never abort the caller's
    transaction.
    """
    raw = _validate(task, args, delay_s, idempotency_key)
    check_schema(schema)
    row_id = await conn.fetchval(
        f'INSERT INTO "{schema}".outbox (prefix, task, args, queue, delay_s, idempotency_key) '
        "VALUES ($1, $2, $3::jsonb, $4, $5, $6) RETURNING id",
        prefix, task, raw, queue, delay_s, idempotency_key)
    return int(row_id)


async def enqueue_many(conn: asyncpg.Connection, task: str,
                       args_list: Sequence[dict[str, Any] | None], *,
                       queue: str | None = None, delay_s: float | None = None,
                       prefix: str = "jobqd", schema: str = "jobqd") -> list[int]:
    """`enqueue` for many jobs of one task in one statement; returns the row ids in order."""
    raws = [_validate(task, a, delay_s, None) for a in args_list]
    check_schema(schema)
    if not raws:
        return []
    rows = await conn.fetch(
        f'INSERT INTO "{schema}".outbox (prefix, task, args, queue, delay_s) '
        "SELECT $1, $2, a::jsonb, $4, $5 FROM unnest($3::text[]) WITH ORDINALITY AS u(a, n) "
        "ORDER BY n RETURNING id", prefix, task, raws, queue, delay_s)
    return sorted(int(r["id"]) for r in rows)
