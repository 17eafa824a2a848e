"""Configuration: YAML file -> validated, frozen dataclasses.

The dataclasses below are the one schema. Each field carries its type, its
default and its rules (`opt`: bounds, unit, format check, secret, required);
one generic reader (`_Reader`) walks them, so adding a key is one edit: its
field. Constraints between keys live in each class's `_constraints`.

Every key is validated once, at load. An unknown key, a wrong type or a bad
value raises `ConfigError` naming the file, the dotted key path and the line.
Every handler is imported at load, so a typo in a handler path is a config
error, not a runtime surprise. Reload = `load()` again (off the event loop)
and swap one reference.

Parsing is bounded: a file over `MAX_FILE_BYTES`, more than `MAX_NODES` YAML
nodes (each alias expansion counted: an alias bomb) or nesting deeper than
`MAX_DEPTH` is refused with a clear error before anything is built from it.

Each default is documented once, beside its field below; `etc/jobqd.yaml`
repeats them for operators and a test keeps the two in step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect
import math
import os
import re
import sys
import types
import typing
import zoneinfo
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import cronsim
import orjson
import yaml

from jobqd import connect
from jobqd.errors import ConfigError

DEFAULT_CONFIG_PATH = "/etc/jobqd.yaml"
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")
QUEUE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,63}$")
PREFIX_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,63}$")
_ENV_RE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}

MAX_FILE_BYTES = 1024 * 1024  # a config file (or a *_file secret) larger than this is refused
MAX_NODES = 100_000  # YAML nodes visited, each alias expansion counted again
MAX_DEPTH = 64  # nesting levels of mappings and lists


# ---------------------------------------------------------------- the schema

# The rules a field may carry (its metadata); `_Reader` enforces them.
_RULES = frozenset({
    "ge", "gt", "le",  # numeric bounds: >=, >, <=
    "unit",  # "s", "days", "bytes", "1/s": a key with a unit needs a minimum (ge or gt)
    "check",  # fn(value) -> error message or None (formats: host:port, URL scheme...)
    "parse",  # fn(str) -> value, raising ValueError(message): a value written as a string
    "what",  # how a string value is described in "must be <what>" errors
    "items",  # how the items of a list are described in "must be a list of <items>"
    "secret",  # the key may instead be given as <key>_file (a file holding the value)
    "required",  # the error message when the key is missing (the field has no default)
    "internal",  # not a YAML key: filled by the loader (path, name, fn, is_async)
    "upper",  # the string is upper-cased before it is checked
    "relative_path",  # relative paths are resolved against the config file's directory
    "key_check",  # for a mapping: fn(name) -> error message or None, for each name
    "if_empty",  # for a mapping: fn() -> the value read when the file gives none
    "json_object",  # a free-form mapping that must be a JSON object (a job's args)
})


def opt(default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | None = None,
        compare: bool = True, show: bool = True, **rules: Any) -> Any:
    """A config field: its default and the rules the reader enforces (see `_RULES`)."""
    unknown = set(rules) - _RULES
    if unknown:
        raise TypeError(f"unknown config field rules: {sorted(unknown)}")
    if "unit" in rules and "ge" not in rules and "gt" not in rules:
        raise TypeError("a config key with a unit needs a documented minimum (ge or gt)")
    if factory is not None:
        return dataclasses.field(default_factory=factory, compare=compare, repr=show,
                                 metadata=rules)
    return dataclasses.field(default=default, compare=compare, repr=show, metadata=rules)


def _check_redis_url(url: str) -> str | None:
    return None if url == "embedded" else connect.check(url)


def _check_prefix(prefix: str) -> str | None:
    if not PREFIX_RE.match(prefix) or "{" in prefix:
        return f"must match {PREFIX_RE.pattern}, got {prefix!r}"
    return None


def _check_schema(schema: str) -> str | None:
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", schema):
        return f"must be a lowercase SQL identifier, got {schema!r}"
    return None


def _check_listen(listen: str) -> str | None:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        return f"must be host:port, got {listen!r}"
    return None


def _check_token_file(path: str) -> str | None:
    """The token file must exist and hold a token (what `http` reads at start)."""
    if not Path(path).is_file():
        return f"{path} does not exist"
    try:
        token = _read_small(path).strip()
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"cannot read {path}: {getattr(e, 'strerror', None) or e}"
    if not token:
        return f"{path} is empty (it must hold the bearer token)"
    return None


def _check_handler(spec: str) -> str | None:
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        return f"must be 'module:function', got {spec!r}"
    return None


def _check_queue_name(name: str) -> str | None:
    return None if QUEUE_RE.match(name) else f"queue names must match {QUEUE_RE.pattern}"


def _check_task_name(name: str) -> str | None:
    return None if NAME_RE.match(name) else f"task names must match {NAME_RE.pattern}"


def _check_schedule_name(name: str) -> str | None:
    return None if NAME_RE.match(name) else f"schedule names must match {NAME_RE.pattern}"


def _check_timezone(tz: str) -> str | None:
    try:
        zoneinfo.ZoneInfo(tz)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return f"unknown time zone {tz!r} (an IANA name, e.g. Europe/Berlin)"
    return None


def _cron_problem(expr: str, zone: zoneinfo.ZoneInfo) -> str | None:
    """Why a cron expression is unusable (None if it is fine): 5 or 6 fields, cronsim."""
    if len(expr.split()) not in (5, 6):
        return "must have 5 fields (minute hour day month weekday) or 6 (seconds first)"
    try:
        next(cronsim.CronSim(expr, datetime.now(zone)))
    except (cronsim.CronSimError, StopIteration) as e:
        return str(e) or "it never fires"
    return None


def _parse_rate(raw: str) -> RateLimit:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*([smh])\s*", raw)
    if not m or int(m.group(1)) <= 0:
        raise ValueError(f"must look like 100/s, 1000/m or 10/h, got {raw!r}")
    return RateLimit(count=int(m.group(1)), per_s=_RATE_UNITS[m.group(2)])


Problems = Iterator[tuple[str, str]]  # (key relative to the class, message)


@dataclass(frozen=True, slots=True)
class RedisConfig:
    # redis://, rediss://, unix://, redis+cluster://, redis+sentinel:// or "embedded";
    # required (or url_file); see jobqd/connect.py
    url: str = opt(secret=True, required="required (a redis:// URL, or embedded)",
                   check=_check_redis_url)
    # key namespace: deployments with other prefixes never meet
    prefix: str = opt("jobqd", check=_check_prefix)
    # run even if Redis may evict keys (maxmemory-policy other than noeviction)
    allow_eviction: bool = False
    # refuse enqueues (QueueFull, reason memory) once Redis's used_memory is above this
    # fraction of its maxmemory, so settles, acks and the DLQ keep the rest; 1: off
    # (off anyway while Redis has no maxmemory)
    max_memory_fraction: float = opt(0.9, gt=0, le=1)
    # WAIT for this many replicas to acknowledge each enqueue and settle (0: off); a
    # shortfall within wait_timeout_s fails an enqueue (NotReplicated), logs a settle
    wait_replicas: int = opt(0, ge=0, le=100)
    wait_timeout_s: float = opt(0.5, gt=0, unit="s")
    # the daemon's Redis connections: a command with no reply for this long fails and
    # its connection is replaced (a silently dropped connection is noticed, instead of
    # a fetcher hung for ever); above the fetcher's 2 s blocking XREADGROUP
    socket_timeout_s: float = opt(10.0, ge=3, unit="s")

    def _constraints(self) -> Problems:
        if self.wait_replicas and self.url.split("://", 1)[0] in connect.CLUSTER_SCHEMES:
            yield "wait_replicas", ("is not supported on a Redis Cluster (redis+cluster://): "
                                    "WAIT would reach one node, not the one holding the job")
        if self.wait_replicas and self.embedded:
            yield "wait_replicas", ("the embedded Redis has no replicas: every enqueue would "
                                    "fail; use 0")

    @property
    def embedded(self) -> bool:
        return self.url == "embedded"


@dataclass(frozen=True, slots=True)
class PostgresConfig:
    # postgresql://...; None: heartbeats live in Redis, no outbox/ledger
    dsn: str | None = opt(None, secret=True)
    # the PostgreSQL schema holding jobqd's tables (created if missing)
    schema: str = opt("jobqd", check=_check_schema)
    ledger: bool = False  # write every job's lifecycle to PostgreSQL (needs dsn)
    # ledger rows older than this are pruned
    ledger_retention_days: int = opt(30, gt=0, unit="days")

    def _constraints(self) -> Problems:
        if self.ledger and self.dsn is None:
            yield "ledger", "needs postgres.dsn"


@dataclass(frozen=True, slots=True)
class HttpConfig:
    # host:port of health, metrics and the job API
    listen: str = opt("127.0.0.1:8765", check=_check_listen)
    # if set, /v1 needs "Authorization: Bearer <file contents>"; must exist and not be empty
    token_file: str | None = opt(None, check=_check_token_file)
    # the web dashboard at /ui: on, read_only (no actions: pause, cancel, replay, weights
    # are hidden and refused), off (404); it asks for the token when token_file is set
    ui: Literal["on", "read_only", "off"] = "on"
    # show job args in the dashboard even when log.payloads is false (they may hold
    # personal data)
    ui_payloads: bool = False

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])


@dataclass(frozen=True, slots=True)
class QueueConfig:
    name: str = opt(internal=True)
    # share of this daemon's job starts while several queues have work
    weight: int = opt(1, ge=0)
    # refuse enqueues at this depth; None: unbounded
    high_watermark: int | None = opt(None, gt=0)
    # accept again at this depth; default high_watermark // 2
    low_watermark: int | None = opt(None, ge=0)

    def __post_init__(self) -> None:
        if self.high_watermark is not None and self.low_watermark is None:
            object.__setattr__(self, "low_watermark", self.high_watermark // 2)

    def _constraints(self) -> Problems:
        low, high = self.low_watermark, self.high_watermark
        if low is not None and high is None:
            yield "low_watermark", "needs high_watermark"
        elif low is not None and high is not None and low >= high:
            yield "low_watermark", f"must be below high_watermark ({high}), got {low}"


@dataclass(frozen=True, slots=True)
class BackoffConfig:
    # retry n waits min(base_s * 2**n, max_s) * random()  (full jitter)
    base_s: float = opt(1.0, ge=0, unit="s")
    max_s: float = opt(300.0, ge=0, unit="s")

    def _constraints(self) -> Problems:
        if self.max_s < self.base_s:
            yield "max_s", f"must be >= base_s ({self.base_s:g})"


@dataclass(frozen=True, slots=True)
class RateLimit:
    count: int
    per_s: float

    def __str__(self) -> str:
        unit = {1.0: "s", 60.0: "m", 3600.0: "h"}[self.per_s]
        return f"{self.count}/{unit}"


@dataclass(frozen=True, slots=True)
class TaskConfig:
    name: str = opt(internal=True)
    # "package.module:function", imported at load
    handler: str = opt(required="required (module:function)", check=_check_handler)
    queue: str = "default"  # must be declared under queues: (or be "default")
    # the handler is cancelled at this deadline; null: none
    timeout_s: float | None = opt(300.0, gt=0, unit="s")
    max_retries: int = opt(3, ge=0)  # exception retries before the job is dead-lettered
    retry_backoff: BackoffConfig = BackoffConfig()
    # max running at once across all daemons; None: unlimited
    concurrency: int | None = opt(None, gt=0)
    # "100/s", "1000/m", "10/h" across all daemons
    rate_limit: RateLimit | None = opt(None, parse=_parse_rate)  # noqa: RUF009 - a field()
    # a job not started this long after it was due ends dead, reason expired; None: never
    expires_s: float | None = opt(None, gt=0, unit="s")
    # where the handler runs: async (on the event loop; async def only), thread (a
    # plain def in a thread) or process (a plain def in a worker process:
    # process_pool); None: async for an async def, thread for a plain def
    executor: Literal["async", "thread", "process"] | None = None
    # what a succeeded job leaves in Redis for results.ttl_s: full (its result record:
    # status and wait return the result), status (only the final status: status and
    # wait say succeeded, no result), none (nothing: a wait already pending still
    # returns, via the done notification; status then finds no job); null: results.keep
    keep_result: Literal["none", "status", "full"] | None = None
    fn: Callable[..., Any] = opt(lambda: None, internal=True, compare=False,  # noqa: RUF009
                                 show=False)
    is_async: bool = opt(False, internal=True, compare=False)

    @property
    def kind(self) -> Literal["async", "thread", "process"]:
        """The executor this task's jobs run in (`executor`, or the handler's default)."""
        if self.executor is not None:
            return self.executor
        return "async" if self.is_async else "thread"


@dataclass(frozen=True, slots=True)
class ScheduleConfig:
    name: str = opt(internal=True)
    task: str = opt(required="required (a task declared under tasks:)")  # a declared task
    # the job's args (a JSON object)
    args: Mapping[str, Any] = opt(factory=lambda: MappingProxyType({}), json_object=True)
    cron: str | None = None  # 5 fields, or 6 with seconds first; exactly one of cron / every_s
    every_s: float | None = opt(None, ge=1, unit="s")  # a tick every N s, aligned to the epoch
    # the IANA time zone the cron fields are read in (DST handled by cronsim)
    timezone: str = opt("UTC", check=_check_timezone)
    queue: str | None = None  # null: the task's queue (filled in at load)
    jitter_s: float = opt(0.0, ge=0, unit="s")  # delay each tick's job by 0..jitter_s (same
    #                                               on every daemon)
    misfire: Literal["skip", "once"] = "skip"  # after downtime: skip missed ticks, or run one
    enabled: bool = True  # false: never fires (its state in Redis is kept)

    def _constraints(self) -> Problems:
        if (self.cron is None) == (self.every_s is None):
            yield "", "set exactly one of cron or every_s"
        if self.cron is not None:
            problem = _cron_problem(self.cron, zoneinfo.ZoneInfo(self.timezone))
            if problem:
                yield "cron", f"bad cron expression {self.cron!r}: {problem}"


@dataclass(frozen=True, slots=True)
class ProcessPoolConfig:
    size: int | None = opt(None, gt=0)  # worker processes for executor: process; None: CPUs
    # replace a child after this many jobs; None: never
    max_tasks_per_child: int | None = opt(None, gt=0)
    # replace a child whose RSS exceeds this (checked between jobs); None: never
    max_memory_mb: int | None = opt(None, gt=0)
    # a child past its job's timeout gets SIGTERM, then SIGKILL after this
    kill_grace_s: float = opt(2.0, ge=0, unit="s")


@dataclass(frozen=True, slots=True)
class ReaperConfig:
    # how often the (single, locked) reaper scans; its lock lives 3x this
    interval_s: float = opt(5.0, ge=0.01, unit="s")
    # backstop: reclaim an entry whose lease stopped renewing (>= 3x heartbeat.interval_s)
    visibility_timeout_s: float = opt(300.0, gt=0, unit="s")
    # a job whose worker died this many times is dead: worker_lost
    max_deliveries: int = opt(3, gt=0)


@dataclass(frozen=True, slots=True)
class HeartbeatConfig:
    interval_s: float = opt(2.0, ge=0.01, unit="s")  # each daemon beats this often
    # a consumer silent this long is dead and its jobs reclaimed (>= 2x interval_s)
    timeout_s: float = opt(10.0, gt=0, unit="s")

    def _constraints(self) -> Problems:
        if self.timeout_s < 2 * self.interval_s:
            yield "timeout_s", (f"must be at least twice heartbeat.interval_s "
                                f"({self.interval_s:g}), got {self.timeout_s:g}")


@dataclass(frozen=True, slots=True)
class ShutdownConfig:
    # running jobs get this long to finish after SIGTERM
    drain_timeout_s: float = opt(30.0, ge=0, unit="s")
    # then this long to hand the rest back and close
    handback_timeout_s: float = opt(5.0, gt=0, unit="s")


@dataclass(frozen=True, slots=True)
class ResultsConfig:
    # how long a finished job's status and result stay readable
    ttl_s: float = opt(3600.0, ge=0.001, unit="s")
    # what a succeeded job keeps for ttl_s unless its task says (tasks.X.keep_result):
    # full, status or none (see README "Memory": bytes per finished job)
    keep: Literal["none", "status", "full"] = "full"


@dataclass(frozen=True, slots=True)
class WeightsConfig:
    # how often runtime weights are re-read from Redis
    refresh_interval_s: float = opt(2.0, ge=0.01, unit="s")


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = opt(
        "INFO", upper=True)
    format: Literal["auto", "json", "text"] = "auto"  # auto: text on a TTY, JSON lines otherwise
    payloads: bool = False  # include job args in outcome logs (as job_args)
    # log each job's outcome at INFO: all of them, only failures, or none
    jobs: Literal["all", "failures", "none"] = "all"
    # at most this many success lines a second, and as many failure lines (two buckets,
    # so successes never crowd failures out); the lines over it are counted
    jobs_per_s: float = opt(100.0, gt=0, unit="1/s")


def _one_default_queue() -> dict[str, QueueConfig]:
    return {"default": QueueConfig(name="default")}


@dataclass(frozen=True, slots=True)
class Config:
    path: str = opt(internal=True)
    redis: RedisConfig = opt()  # noqa: RUF009 - opt() is a dataclasses.field()
    postgres: PostgresConfig = PostgresConfig()
    http: HttpConfig = HttpConfig()
    # how many jobs this daemon runs at once (0: route and reap only)
    consumers: int = opt(16, ge=0, le=10_000)
    # jobs fetched ahead of the consumers, so fetches (and the settles riding on them)
    # come in batches: null = 4 per consumer once runs average under 50 ms, none
    # for longer jobs, and buffered jobs no consumer could start for 1 s go back to
    # their queue for other daemons; a number N = always N ahead; 0 = never ahead
    prefetch: int | None = opt(None, ge=0, le=10_000)
    # without a queues: section there is one queue, "default"
    queues: Mapping[str, QueueConfig] = opt(factory=lambda: MappingProxyType({}),
                                            key_check=_check_queue_name,
                                            if_empty=_one_default_queue)
    tasks: Mapping[str, TaskConfig] = opt(factory=lambda: MappingProxyType({}),
                                          key_check=_check_task_name)
    # periodic jobs (cron or every_s): exactly one job per tick across daemons
    schedules: Mapping[str, ScheduleConfig] = opt(factory=lambda: MappingProxyType({}),
                                                  key_check=_check_schedule_name)
    reaper: ReaperConfig = ReaperConfig()
    heartbeat: HeartbeatConfig = HeartbeatConfig()
    shutdown: ShutdownConfig = ShutdownConfig()
    results: ResultsConfig = ResultsConfig()
    weights: WeightsConfig = WeightsConfig()
    log: LogConfig = LogConfig()
    process_pool: ProcessPoolConfig = ProcessPoolConfig()
    # largest encoded job accepted at enqueue
    max_payload_bytes: int = opt(1024 * 1024, gt=0, unit="bytes")
    # how long an idempotency key maps to its job
    idempotency_ttl_s: float = opt(86400.0, ge=0.001, unit="s")
    state_dir: str = "/var/lib/jobqd"  # embedded Redis socket and AOF live here
    # dirs prepended to sys.path before importing handlers (relative: to the config file)
    pythonpath: tuple[str, ...] = opt((), relative_path=True, what="a directory path",
                                      items="directories")

    def __post_init__(self) -> None:
        for name in ("queues", "tasks", "schedules"):
            value = getattr(self, name)
            if not isinstance(value, MappingProxyType):
                object.__setattr__(self, name, MappingProxyType(dict(value)))
        if any(s.queue is None and s.task in self.tasks for s in self.schedules.values()):
            object.__setattr__(self, "schedules", MappingProxyType({
                n: dataclasses.replace(s, queue=self.tasks[s.task].queue)
                if s.queue is None and s.task in self.tasks else s
                for n, s in self.schedules.items()}))

    def _constraints(self) -> Problems:
        for name, sched in self.schedules.items():
            if sched.task not in self.tasks:
                yield f"schedules.{name}.task", (f"task {sched.task!r} is not declared under "
                                                 "tasks:")
            elif sched.queue not in self.queues:
                yield f"schedules.{name}.queue", (f"queue {sched.queue!r} is not declared "
                                                  "under queues:")
        for name, task in self.tasks.items():
            if task.queue not in self.queues:
                declared = ", ".join(sorted(self.queues))
                yield f"tasks.{name}.queue", (f"queue {task.queue!r} is not declared under "
                                              f"queues: (declared: {declared})")
        hb = self.heartbeat.interval_s
        if self.reaper.visibility_timeout_s < 3 * hb:
            yield "reaper.visibility_timeout_s", (
                f"must be at least 3x heartbeat.interval_s ({hb:g}) (leases renew that often), "
                f"got {self.reaper.visibility_timeout_s:g}")

    @property
    def redis_url(self) -> str:
        """The URL to connect to (the embedded server's unix socket when embedded)."""
        if self.redis.embedded:
            return "unix://" + str(Path(self.state_dir) / "redis.sock")
        return self.redis.url

    def routing(self) -> dict[str, str]:
        return {name: t.queue for name, t in self.tasks.items()}

    def to_dict(self, *, mask_secrets: bool = True) -> dict[str, Any]:
        """The effective config as plain data (what `jobqd check-config` prints)."""
        out: dict[str, Any] = _plain(self)
        out.pop("path", None)
        if mask_secrets:
            out["redis"]["url"] = mask_url(out["redis"]["url"])
            if out["postgres"]["dsn"]:
                out["postgres"]["dsn"] = mask_url(out["postgres"]["dsn"])
        return out


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        if isinstance(obj, RateLimit):
            return str(obj)
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not f.metadata.get("internal")}
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return [_plain(v) for v in obj]
    return obj


def mask_url(url: str) -> str:
    """Hide the password of a URL/DSN (``redis://:****@host``)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "****"
    masked = re.sub(r"(password=)[^&\s]+", r"\1****", url)
    if parts.password is None:
        return masked
    parts = urlsplit(masked)
    netloc = parts.netloc.rsplit("@", 1)
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:****@{netloc[-1]}"))


# ---------------------------------------------------------------- loading


def default_path() -> str:
    return os.environ.get("JOBQD_CONFIG") or DEFAULT_CONFIG_PATH


def _read_small(path: str) -> str:
    """A whole small file as text; ValueError past MAX_FILE_BYTES (e.g. /dev/zero)."""
    with open(path, "rb") as fh:
        raw = fh.read(MAX_FILE_BYTES + 1)
    if len(raw) > MAX_FILE_BYTES:
        raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
    return raw.decode("utf-8")


def load(path: str | os.PathLike[str], *, import_handlers: bool = True) -> Config:
    """Read, parse, validate and (by default) import every handler of a config file.

    Blocking (file I/O, handler imports): on a running event loop, call it in a thread.
    """
    p = str(path)
    try:
        text = _read_small(p)
    except FileNotFoundError:
        raise ConfigError("file not found", path=p) from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"cannot read: {getattr(e, 'strerror', None) or e}",
                          path=p) from None
    return loads(text, path=p, import_handlers=import_handlers)


def loads(text: str, *, path: str = "<string>", import_handlers: bool = True) -> Config:
    if len(text) > MAX_FILE_BYTES:
        raise ConfigError(f"cannot read: larger than {MAX_FILE_BYTES} bytes", path=path)
    data, lines = _parse_yaml(text, path)
    reader = _Reader(path, lines)
    cfg = reader.config(data)
    if import_handlers:
        cfg = reader.import_handlers(cfg)
    return cfg


def _parse_yaml(text: str, path: str) -> tuple[Any, dict[str, int]]:
    """YAML -> (data, {dotted key path: line}); duplicate keys are errors.

    PyYAML's composer shares an aliased node, but building plain data (and the
    line of every dotted key) expands each alias again: that walk is bounded by
    MAX_NODES and MAX_DEPTH, so an alias bomb is refused in milliseconds.
    """
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        line = mark.line + 1 if mark is not None else None
        where = ""
        if e.context and e.context_mark is not None:  # where the broken construct began
            where = f" ({e.context} started at line {e.context_mark.line + 1})"
        raise ConfigError(f"YAML syntax error: {e.problem}{where}", path=path,
                          line=line) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"YAML error: {e}", path=path) from None
    except RecursionError:
        raise ConfigError(f"YAML nested too deeply (more than {MAX_DEPTH} levels)",
                          path=path) from None
    lines: dict[str, int] = {}
    if node is None:
        return {}, lines
    constructor = yaml.SafeLoader("")
    visited = 0

    def scalar(n: yaml.Node, dotted: str) -> Any:
        try:
            return constructor.construct_object(n, deep=True)
        except Exception as e:  # a YAML error, or e.g. an int over Python's digit limit
            raise ConfigError(f"bad value: {e}", path=path, key=dotted or None,
                              line=n.start_mark.line + 1) from None

    def walk(n: yaml.Node, dotted: str, depth: int) -> Any:
        nonlocal visited
        visited += 1
        line = n.start_mark.line + 1
        if visited > MAX_NODES:
            raise ConfigError(f"too many YAML nodes (over {MAX_NODES}, counting every "
                              "expansion of an alias): refusing a possible alias bomb",
                              path=path, line=line)
        if depth > MAX_DEPTH:
            raise ConfigError(f"YAML nested too deeply (more than {MAX_DEPTH} levels)",
                              path=path, key=dotted or None, line=line)
        lines.setdefault(dotted, line)
        if isinstance(n, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for k_node, v_node in n.value:
                key = scalar(k_node, dotted) if isinstance(k_node, yaml.ScalarNode) else None
                if not isinstance(key, str):
                    raise ConfigError(f"keys must be strings, got {key!r}", path=path,
                                      key=dotted or None, line=k_node.start_mark.line + 1)
                sub = f"{dotted}.{key}" if dotted else key
                if key in out:
                    raise ConfigError("duplicate key", path=path, key=sub,
                                      line=k_node.start_mark.line + 1)
                lines[sub] = k_node.start_mark.line + 1
                out[key] = walk(v_node, sub, depth + 1)
            return out
        if isinstance(n, yaml.SequenceNode):
            return [walk(item, f"{dotted}[{i}]", depth + 1) for i, item in enumerate(n.value)]
        return scalar(n, dotted)

    return walk(node, "", 0), lines


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"config fields support only X | None unions, got {tp}")
        return args[0], True
    return tp, False


def _or(choices: tuple[Any, ...]) -> str:
    names = [str(c) for c in choices]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


class _Reader:
    """Walks the dataclass schema over parsed YAML: types, defaults, rules, unknown keys."""

    def __init__(self, path: str, lines: dict[str, int]) -> None:
        self.path = path
        self.lines = lines

    def err(self, key: str, message: str) -> ConfigError:
        """An error at `key`, with the line of the key or of its nearest written parent."""
        k = key
        while k and k not in self.lines:
            parent = re.sub(r"(\.[^.\[\]]*|\[\d+\])$", "", k)
            if parent == k:
                break
            k = parent
        return ConfigError(message, path=self.path, key=key or None, line=self.lines.get(k))

    def interp(self, value: Any, key: str) -> Any:
        if not isinstance(value, str):
            return value

        def sub(m: re.Match[str]) -> str:
            if m.group(0) == "$$":
                return "$"
            name, default = m.group(1), m.group(2)
            got = os.environ.get(name)
            if got is None:
                if default is None:
                    raise self.err(key, f"environment variable {name} is not set")
                return default
            return got

        return _ENV_RE.sub(sub, value)

    # -- the walk --------------------------------------------------------------

    def config(self, data: Any) -> Config:
        if data is not None and not isinstance(data, dict):
            raise ConfigError("the file must be a YAML mapping", path=self.path)
        cfg: Config = self.dataclass(Config, data, "", {"path": self.path})
        return cfg

    def dataclass(self, cls: type, raw: Any, key: str, extra: dict[str, Any]) -> Any:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise self.err(key, f"must be a mapping, got {type(raw).__name__}")
        fields = [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]
        allowed = {f.name for f in fields}
        allowed |= {f.name + "_file" for f in fields if f.metadata.get("secret")}
        for k in raw:
            if k not in allowed:
                raise self.err(_join(key, k), "unknown key")
        hints = _hints(cls)
        values = dict(extra)
        for f in fields:
            full = _join(key, f.name)
            if f.metadata.get("secret"):
                got = self.secret(raw, key, f)
                if got is not None:
                    values[f.name] = got
                    continue
            elif f.name in raw:
                values[f.name] = self.value(hints[f.name], f.metadata, raw[f.name], full)
                continue
            if "required" in f.metadata:
                raise self.err(full, f.metadata["required"])
            no_default = (f.default is dataclasses.MISSING
                          and f.default_factory is dataclasses.MISSING)
            if no_default or "if_empty" in f.metadata:  # a required section; queues
                values[f.name] = self.value(hints[f.name], f.metadata, None, full)
        obj = cls(**values)
        constraints = getattr(obj, "_constraints", None)
        if constraints is not None:
            for sub, message in constraints():
                raise self.err(_join(key, sub), message)
        return obj

    def value(self, tp: Any, meta: Mapping[str, Any], raw: Any, key: str) -> Any:
        raw = self.interp(raw, key)
        tp, nullable = _unwrap_optional(tp)
        if raw is None and nullable:
            return None
        origin = typing.get_origin(tp)
        if "parse" in meta:
            text = self.string(raw, key, meta)
            try:
                return meta["parse"](text)
            except ValueError as e:
                raise self.err(key, str(e)) from None
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            return self.dataclass(tp, raw, key, {})
        if meta.get("json_object"):
            return self.json_object(raw, key)
        if origin is Mapping or origin is dict:
            return self.mapping(typing.get_args(tp)[1], raw, key, meta)
        if origin is tuple:
            return self.sequence(typing.get_args(tp)[0], raw, key, meta)
        if origin is Literal:
            return self.choice(typing.get_args(tp), raw, key, meta)
        if tp is bool:
            return self.boolean(raw, key)
        if tp is int or tp is float:
            return self.number(raw, key, meta, integer=tp is int)
        if tp is str:
            return self.checked(self.string(raw, key, meta), key, meta)
        raise TypeError(f"config field {key}: unsupported type {tp}")

    # -- kinds -----------------------------------------------------------------

    def checked(self, v: Any, key: str, meta: Mapping[str, Any]) -> Any:
        check = meta.get("check")
        problem = check(v) if check is not None else None
        if problem:
            raise self.err(key, problem)
        return v

    def string(self, v: Any, key: str, meta: Mapping[str, Any]) -> str:
        if not isinstance(v, str) or not v:
            raise self.err(key, f"must be {meta.get('what', 'a non-empty string')}, got {v!r}")
        if meta.get("relative_path") and not os.path.isabs(v):
            return str((Path(self.path).parent / v).resolve())
        return str(v)

    def number(self, v: Any, key: str, meta: Mapping[str, Any], *, integer: bool) -> Any:
        if v is None:
            raise self.err(key, "must not be null")
        if isinstance(v, str):
            with contextlib.suppress(ValueError):
                v = int(v) if integer else float(v)
        if isinstance(v, bool) or not isinstance(v, int | float):
            kind = "an integer" if integer else "a number"
            raise self.err(key, f"must be {kind}, got {type(v).__name__} {v!r}")
        if integer and not (isinstance(v, int) or float(v).is_integer()):
            raise self.err(key, f"must be an integer, got {v!r}")
        if not math.isfinite(v):
            raise self.err(key, f"must be finite, got {v!r}")
        ge, gt, le = meta.get("ge"), meta.get("gt"), meta.get("le")
        if gt is not None and v <= gt:
            raise self.err(key, f"must be > {gt:g}, got {v!r}")
        if ge is not None and v < ge:
            raise self.err(key, f"must be >= {ge:g}, got {v!r}")
        if le is not None and v > le:
            raise self.err(key, f"must be <= {le:g}, got {v!r}")
        return int(v) if integer else float(v)

    def boolean(self, v: Any, key: str) -> bool:
        if isinstance(v, str) and v.lower() in ("true", "false", "yes", "no", "1", "0"):
            return v.lower() in ("true", "yes", "1")
        if not isinstance(v, bool):
            raise self.err(key, f"must be true or false, got {v!r}")
        return v

    def choice(self, choices: tuple[Any, ...], v: Any, key: str,
               meta: Mapping[str, Any]) -> Any:
        if isinstance(v, str) and meta.get("upper"):
            v = v.upper()
        if isinstance(v, bool) and ("on" if v else "off") in choices:
            v = "on" if v else "off"  # YAML 1.1 reads a bare on/off as a boolean
        if v not in choices:
            raise self.err(key, f"must be {_or(choices)}, got {v!r}")
        return v

    def mapping(self, item: type, raw: Any, key: str,
                meta: Mapping[str, Any]) -> Mapping[str, Any]:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise self.err(key, f"must be a mapping, got {type(raw).__name__}")
        out: dict[str, Any] = {}
        for name, body in raw.items():
            full = f"{key}.{name}"
            key_check = meta.get("key_check")
            problem = key_check(name) if key_check is not None else None
            if problem:
                raise self.err(full, problem)
            out[name] = self.dataclass(item, body, full, {"name": name})
        if not out and "if_empty" in meta:
            out = meta["if_empty"]()
        return MappingProxyType(out)

    def json_object(self, raw: Any, key: str) -> Mapping[str, Any]:
        if raw is None:
            return MappingProxyType({})
        if not isinstance(raw, dict):
            raise self.err(key, f"must be a mapping (a JSON object), got {type(raw).__name__}")
        try:
            orjson.dumps(raw)
        except TypeError as e:
            raise self.err(key, f"must be JSON: {e}") from None
        return MappingProxyType(raw)

    def sequence(self, item: type, raw: Any, key: str,
                 meta: Mapping[str, Any]) -> tuple[Any, ...]:
        if raw is None:
            return ()
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list):
            raise self.err(key, f"must be a list of {meta.get('items', 'values')}")
        return tuple(self.value(item, meta, v, f"{key}[{i}]") for i, v in enumerate(raw))

    def secret(self, raw: dict[str, Any], key: str, f: dataclasses.Field[Any]) -> str | None:
        """`name` or `name_file` (a file whose stripped contents are the value)."""
        name, meta = f.name, f.metadata
        direct = raw.get(name)
        file_name = raw.get(name + "_file")
        if direct is not None:
            direct = self.string(self.interp(direct, _join(key, name)), _join(key, name), {})
        file_key = _join(key, name + "_file")
        if file_name is not None:
            file_name = self.string(self.interp(file_name, file_key), file_key, {})
        if direct is not None and file_name is not None:
            raise self.err(file_key, f"set either {name} or {name}_file, not both")
        if file_name is not None:
            try:
                value = _read_small(file_name).strip()
            except (OSError, UnicodeDecodeError, ValueError) as e:
                raise self.err(file_key, f"cannot read {file_name}: "
                                         f"{getattr(e, 'strerror', None) or e}") from None
            if not value:
                raise self.err(file_key, f"{file_name} is empty")
            return str(self.checked(value, _join(key, name), meta))
        if direct is not None:
            return str(self.checked(direct, _join(key, name), meta))
        return None

    # -- handlers --------------------------------------------------------------

    def import_handlers(self, cfg: Config) -> Config:
        tasks = {}
        for name, t in cfg.tasks.items():
            fn = self.import_handler(t.handler, f"tasks.{name}.handler", cfg.pythonpath)
            is_async = _is_async_callable(fn)
            if t.executor is not None and (t.executor == "async") != is_async:
                raise self.err(f"tasks.{name}.executor", (
                    f"{t.handler} is an async def: it runs on the event loop (executor: "
                    f"async), not in a {t.executor}" if is_async else
                    f"{t.handler} is a plain def: use executor thread or process"))
            tasks[name] = dataclasses.replace(t, fn=fn, is_async=is_async)
        return dataclasses.replace(cfg, tasks=MappingProxyType(tasks))

    def import_handler(self, spec: str, key: str,
                       pythonpath: tuple[str, ...]) -> Callable[..., Any]:
        mod_name, _, attr = spec.partition(":")
        for d in reversed(pythonpath):
            if d not in sys.path:
                sys.path.insert(0, d)
        try:
            obj: Any = importlib.import_module(mod_name)
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # any import-time failure is the config's fault
            # SystemExit (the module called sys.exit()) included. The import runs
            # synchronously (before the event loop, or in a reload's worker thread), so
            # even a CancelledError here was raised by the module, not by our cancel.
            hint = " (the module called sys.exit() at import)" if isinstance(e, SystemExit) else ""
            raise self.err(key, f"cannot import {mod_name!r}: {type(e).__name__}: {e}"
                                f"{hint}") from None
        for part in attr.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise self.err(key, f"module {mod_name!r} has no attribute {attr!r}") from None
            except Exception as e:  # a module __getattr__ that fails otherwise
                raise self.err(key, f"cannot get {attr!r} from {mod_name!r}: "
                                    f"{type(e).__name__}: {e}") from None
        if not callable(obj):
            raise self.err(key, f"{spec!r} is not callable")
        return obj  # type: ignore[no-any-return]


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key and name else key or name


def _is_async_callable(fn: Any) -> bool:
    while hasattr(fn, "func"):  # functools.partial
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None))  # noqa: B004
