"""PostgreSQL: connection pools, versioned schema migrations, heartbeats.

Every jobqd table lives in one schema (``postgres.schema``, default
``jobqd``), created on first use. Migrations are a list of ``(version, sql)``
applied in order, each recorded in ``<schema>.schema_migrations``, all inside
one transaction under a transaction-scoped advisory lock: any number of
daemons (or ``jobqd migrate`` runs) may start at once; one applies the
missing versions, the others wait on the lock and then find nothing to do.
The heartbeat store, the outbox (`jobqd.outbox`) and the ledger
(`jobqd.ledger`) share these migrations.

`PgHeartbeats` is the PostgreSQL heartbeat store (used when ``postgres.dsn``
is set): one row per consumer in ``<schema>.workers``, stamped with
PostgreSQL's own ``now()`` so clock skew between hosts cannot fake a death.
It follows the blip rule of `jobqd.heartbeat`: `alive()` returns None, never
raises, when PostgreSQL cannot be read. PostgreSQL being down at start does
not stop the daemon: the store reconnects (with capped backoff) on use.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any

import asyncpg
import orjson

from jobqd.aio import Backoff
from jobqd.config import Config
from jobqd.deps import is_postgres_error
from jobqd.exitcodes import ExitCode
from jobqd.outbox import check_schema
from jobqd.runtime import Runtime

log = logging.getLogger("jobqd.pg")

# pg_advisory_xact_lock(MIGRATION_LOCK, hashtext(schema)): one migrator per schema at a time
MIGRATION_LOCK = 0x6A6F6271  # "jobq"
COMMAND_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0
WORKER_FORGET_S = 3600.0  # heartbeat rows silent this long are deleted
PRUNE_EVERY_S = 60.0

# (version, sql). Append only: never edit a released migration, add a new one.
# The SQL runs with search_path set to the target schema.
MIGRATIONS: list[tuple[int, str]] = [
    (1, """
CREATE TABLE workers (
    prefix     text        NOT NULL,
    name       text        NOT NULL,
    info       jsonb       NOT NULL DEFAULT '{}',
    started_at timestamptz NOT NULL DEFAULT now(),
    last_beat  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (prefix, name)
);
CREATE INDEX workers_last_beat ON workers (prefix, last_beat);
"""),
    (2, """
CREATE TABLE outbox (
    id               bigserial   PRIMARY KEY,
    prefix           text        NOT NULL DEFAULT 'jobqd',
    task             text        NOT NULL CHECK (task <> ''),
    args             jsonb       NOT NULL DEFAULT '{}',
    queue            text,
    delay_s          double precision CHECK (delay_s IS NULL OR delay_s >= 0),
    idempotency_key  text        CHECK (idempotency_key IS NULL OR idempotency_key <> ''),
    created_at       timestamptz NOT NULL DEFAULT now(),
    published_at     timestamptz,
    job_id           text,
    publish_attempts integer     NOT NULL DEFAULT 0,
    error            text,
    failed_at        timestamptz,
    finished_at      timestamptz,
    final_status     text,
    recovered        integer     NOT NULL DEFAULT 0
);
CREATE INDEX outbox_pending ON outbox (prefix, id)
    WHERE published_at IS NULL AND failed_at IS NULL;
CREATE INDEX outbox_unfinished ON outbox (prefix, id)
    WHERE published_at IS NOT NULL AND finished_at IS NULL;
CREATE INDEX outbox_job_id ON outbox (job_id) WHERE job_id IS NOT NULL;
CREATE INDEX outbox_done ON outbox (prefix, coalesce(finished_at, failed_at))
    WHERE finished_at IS NOT NULL OR failed_at IS NOT NULL;

-- Any client's INSERT wakes the relays at commit (NOTIFY is transactional).
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('jobqd_outbox', TG_TABLE_SCHEMA || ':' || s.prefix)
       FROM (SELECT DISTINCT prefix FROM new_rows) AS s;
    RETURN NULL;
END
$$;
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();
"""),
    (3, """
CREATE TABLE jobs (
    id          text        PRIMARY KEY,
    prefix      text        NOT NULL,
    queue       text        NOT NULL,
    task        text        NOT NULL,
    status      text        NOT NULL,
    attempts    integer     NOT NULL DEFAULT 0,
    lost        integer     NOT NULL DEFAULT 0,
    error       text,
    reason      text,
    result      jsonb,
    enqueued_at timestamptz,
    started_at  timestamptz,
    finished_at timestamptz,
    event_ms    double precision NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX jobs_updated ON jobs (updated_at);
CREATE INDEX jobs_task ON jobs (prefix, task, updated_at);
"""),
]

LATEST_VERSION = MIGRATIONS[-1][0]


class PgSetupError(Exception):
    """PostgreSQL cannot be used as ``postgres.dsn`` says: a one-line explanation for
    the operator (what is missing and how to create it; never the password) and the exit
    code: CONFIG (78) for a database or role that does not exist or credentials that
    are refused (an operator must act), UNAVAILABLE (69) for a server that does not
    answer (worth a retry). Raised by `jobqd migrate` and at daemon start."""

    def __init__(self, message: str, exit_code: ExitCode) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _where(cfg: Config) -> str:
    """host:port of postgres.dsn, for messages (no credentials)."""
    try:
        u = urllib.parse.urlsplit(cfg.postgres.dsn or "")
        host = u.hostname or urllib.parse.parse_qs(u.query).get("host", ["localhost"])[0]
        return f"{host}:{u.port or 5432}"
    except ValueError:
        return "the server in postgres.dsn"


def _quoted(pattern: str, text: str) -> str | None:
    m = re.search(pattern, text)
    return m.group(1) if m else None


def explain(e: BaseException, cfg: Config) -> PgSetupError | None:
    """Classify a failure to connect to ``postgres.dsn``: a `PgSetupError` with a clear
    message and exit code, or None when it is none of the known set-up faults."""
    where = _where(cfg)
    text = str(e)
    if isinstance(e, asyncpg.InvalidCatalogNameError):
        db = _quoted(r'database "([^"]+)"', text) or "?"
        return PgSetupError(
            f'postgres.dsn names database "{db}", which does not exist on {where}: '
            f"create it (e.g. `createdb {db}`, as a PostgreSQL superuser) or fix "
            "postgres.dsn", ExitCode.CONFIG)
    if isinstance(e, asyncpg.InvalidPasswordError):
        user = _quoted(r'user "([^"]+)"', text) or "?"
        return PgSetupError(
            f'PostgreSQL on {where} refused the password of role "{user}": fix the '
            "password in postgres.dsn (or dsn_file)", ExitCode.CONFIG)
    if isinstance(e, asyncpg.InvalidAuthorizationSpecificationError):
        role = _quoted(r'role "([^"]+)" does not exist', text)
        if role is not None:
            return PgSetupError(
                f'postgres.dsn names role "{role}", which does not exist on {where}: create '
                f"it (e.g. `createuser {role}`, as a PostgreSQL superuser) or fix "
                "postgres.dsn", ExitCode.CONFIG)
        return PgSetupError(f"PostgreSQL on {where} refused the connection: "
                            f"{text.splitlines()[0] if text else type(e).__name__}",
                            ExitCode.CONFIG)
    if is_postgres_error(e):
        detail = text.splitlines()[0] if text else type(e).__name__
        return PgSetupError(f"cannot reach PostgreSQL at {where} (postgres.dsn): {detail}",
                            ExitCode.UNAVAILABLE)
    return None


def _dsn(cfg: Config) -> str:
    if not cfg.postgres.dsn:
        raise ValueError("postgres.dsn is not configured")
    return cfg.postgres.dsn


async def connect_pool(cfg: Config, *, min_size: int = 1, max_size: int = 4) -> asyncpg.Pool:
    """A small pool on ``postgres.dsn`` with search_path set to ``postgres.schema``."""
    schema = check_schema(cfg.postgres.schema)
    return await asyncpg.create_pool(
        _dsn(cfg), min_size=min_size, max_size=max_size, command_timeout=COMMAND_TIMEOUT_S,
        timeout=CONNECT_TIMEOUT_S, max_inactive_connection_lifetime=300.0,
        server_settings={"search_path": schema, "application_name": "jobqd"})


async def connect(cfg: Config) -> asyncpg.Connection:
    """One connection (LISTEN, CLI commands), search_path set like `connect_pool`."""
    schema = check_schema(cfg.postgres.schema)
    return await asyncpg.connect(
        _dsn(cfg), command_timeout=COMMAND_TIMEOUT_S, timeout=CONNECT_TIMEOUT_S,
        server_settings={"search_path": schema, "application_name": "jobqd"})


async def migrate(pool_or_conn: asyncpg.Pool | asyncpg.Connection, schema: str) -> list[int]:
    """Create `schema` if missing and apply the missing migrations; returns versions applied.

    Safe to run from many processes at once (advisory lock), and idempotent.
    """
    check_schema(schema)
    if isinstance(pool_or_conn, asyncpg.Pool):
        async with pool_or_conn.acquire() as conn:
            return await _migrate(conn, schema)
    return await _migrate(pool_or_conn, schema)


async def _migrate(conn: asyncpg.Connection, schema: str) -> list[int]:
    applied: list[int] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", MIGRATION_LOCK,
                           schema)
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await conn.execute(f'SET LOCAL search_path TO "{schema}"')
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations ("
                           "version integer PRIMARY KEY, "
                           "applied_at timestamptz NOT NULL DEFAULT now())")
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, sql in MIGRATIONS:
            if version in done:
                continue
            await conn.execute(sql)
            await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
            applied.append(version)
    if applied:
        log.info("postgres schema %s migrated to version %d (applied %s)", schema,
                 LATEST_VERSION, applied)
    return applied


async def close_pool(pool: asyncpg.Pool | None, timeout_s: float = 5.0) -> None:
    if pool is None:
        return
    try:
        await asyncio.wait_for(pool.close(), timeout_s)
    except (TimeoutError, OSError, asyncpg.InterfaceError):
        pool.terminate()


class PgHandle:
    """A lazily (re)connected, migrated pool; reconnects are rate-limited by a backoff."""

    def __init__(self, cfg: Config, *, min_size: int = 1, max_size: int = 2) -> None:
        self.cfg = cfg
        self.min_size = min_size
        self.max_size = max_size
        self.pool: asyncpg.Pool | None = None
        self._backoff = Backoff(0.5, 30.0)
        self._next_try = 0.0
        self._lock = asyncio.Lock()

    async def get(self) -> asyncpg.Pool:
        if self.pool is not None:
            return self.pool
        async with self._lock:
            if self.pool is not None:
                return self.pool
            now = time.monotonic()
            if now < self._next_try:
                raise ConnectionError("postgres unreachable (reconnect pending)")
            pool = None
            try:
                pool = await connect_pool(self.cfg, min_size=self.min_size,
                                          max_size=self.max_size)
                await migrate(pool, self.cfg.postgres.schema)
            except BaseException:
                self._next_try = time.monotonic() + self._backoff.next()
                if pool is not None:
                    pool.terminate()
                raise
            self._backoff.reset()
            self.pool = pool
            return pool

    async def close(self) -> None:
        pool, self.pool = self.pool, None
        await close_pool(pool)


def _jsonb(value: Any) -> str:
    return orjson.dumps(value, default=str).decode()


class PgHeartbeats:
    """The HeartbeatStore protocol of `jobqd.heartbeat`, on ``<schema>.workers``."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.prefix = rt.config.redis.prefix
        self.db = PgHandle(rt.config, min_size=1, max_size=2)
        self._last_prune = 0.0
        self._warned = False

    async def start(self) -> None:
        """Connect and migrate; PostgreSQL being down is logged, not fatal."""
        try:
            await self.db.get()
            self.rt.health.postgres_ok = True
        except Exception as e:
            setup = explain(e, self.rt.config)
            if setup is not None and setup.exit_code == ExitCode.CONFIG:
                raise setup from None  # a missing database or role: the operator must act
            if not is_postgres_error(e):
                raise
            self.rt.health.postgres_ok = False
            log.warning("postgres unreachable at start (%s): heartbeats retry in the "
                        "background, and no job is reclaimed by liveness until it is back", e)

    async def close(self) -> None:
        await self.db.close()

    def _failed(self, e: BaseException) -> None:
        self.rt.health.postgres_ok = False
        if not self._warned:
            log.warning("postgres heartbeat store unreachable: %s", e)
        self._warned = True

    def _ok(self) -> None:
        self.rt.health.postgres_ok = True
        if self._warned:
            log.info("postgres heartbeat store reachable again")
        self._warned = False

    async def beat(self, name: str, info: dict[str, object]) -> None:
        try:
            pool = await self.db.get()
            await pool.execute(
                "INSERT INTO workers AS w (prefix, name, info) VALUES ($1, $2, $3::jsonb) "
                "ON CONFLICT (prefix, name) DO UPDATE "
                "SET info = EXCLUDED.info, last_beat = now()",
                self.prefix, name, _jsonb(info), timeout=CONNECT_TIMEOUT_S)
        except Exception as e:
            if is_postgres_error(e) or isinstance(e, asyncpg.PostgresError):
                self._failed(e)
                # a type heartbeat.run tolerates (it keeps beating and jobs keep running)
                raise ConnectionError(f"postgres heartbeat failed: {e}") from e
            raise
        self._ok()

    async def alive(self, timeout_s: float) -> set[str] | None:
        try:
            pool = await self.db.get()
            rows = await pool.fetch(
                "SELECT name FROM workers WHERE prefix = $1 "
                "AND last_beat > now() - make_interval(secs => $2)",
                self.prefix, float(timeout_s), timeout=CONNECT_TIMEOUT_S)
            if time.monotonic() - self._last_prune > PRUNE_EVERY_S:
                await pool.execute(
                    "DELETE FROM workers WHERE prefix = $1 "
                    "AND last_beat < now() - make_interval(secs => $2)",
                    self.prefix, WORKER_FORGET_S, timeout=CONNECT_TIMEOUT_S)
                self._last_prune = time.monotonic()
        except Exception as e:
            # The blip rule: an unreadable store means "unknown", never "everyone is dead".
            if is_postgres_error(e) or isinstance(e, asyncpg.PostgresError):
                self._failed(e)
                return None
            raise
        self._ok()
        return {r["name"] for r in rows}

    async def remove(self, name: str) -> None:
        pool = await self.db.get()
        await pool.execute("DELETE FROM workers WHERE prefix = $1 AND name = $2",
                           self.prefix, name, timeout=CONNECT_TIMEOUT_S)

    async def workers(self) -> list[dict[str, object]]:
        pool = await self.db.get()
        rows = await pool.fetch(
            "SELECT name, info, extract(epoch FROM now() - last_beat)::float8 AS age "
            "FROM workers WHERE prefix = $1 ORDER BY name", self.prefix,
            timeout=CONNECT_TIMEOUT_S)
        out: list[dict[str, object]] = []
        for r in rows:
            info = orjson.loads(r["info"])
            if not isinstance(info, dict):
                info = {}
            info["name"] = r["name"]
            info["heartbeat_age_s"] = float(r["age"])
            out.append(info)
        return out


async def list_workers(cfg: Config) -> list[dict[str, object]]:
    """The workers of ``cfg``'s prefix from PostgreSQL heartbeats (for ``jobqd stats``);
    same shape as `PgHeartbeats.workers`, sorted by name."""
    conn = await connect(cfg)
    try:
        rows = await conn.fetch(
            "SELECT name, info, extract(epoch FROM now() - last_beat)::float8 AS age "
            "FROM workers WHERE prefix = $1 ORDER BY name", cfg.redis.prefix)
    except asyncpg.UndefinedTableError:  # never migrated: no daemon ever beat here
        return []
    finally:
        await conn.close()
    out: list[dict[str, object]] = []
    for r in rows:
        info = orjson.loads(r["info"])
        info = info if isinstance(info, dict) else {}
        info["name"] = r["name"]
        info["heartbeat_age_s"] = float(r["age"])
        out.append(info)
    return out


async def migrate_cli(cfg: Config, *, schema: str | None = None) -> list[int]:
    """`jobqd migrate`: apply the missing migrations; returns the versions applied.
    Cannot connect: `PgSetupError` (a missing database or role, or the server down)."""
    try:
        conn = await connect(cfg)
    except Exception as e:
        setup = explain(e, cfg)
        if setup is None:
            raise
        raise setup from None
    try:
        return await migrate(conn, schema or cfg.postgres.schema)
    finally:
        await conn.close()


async def applied_versions(conn: asyncpg.Connection, schema: str) -> Sequence[int]:
    check_schema(schema)
    exists = await conn.fetchval("SELECT to_regclass($1)", f'"{schema}".schema_migrations')
    if exists is None:
        return []
    rows = await conn.fetch(f'SELECT version FROM "{schema}".schema_migrations ORDER BY version')
    return [r["version"] for r in rows]
