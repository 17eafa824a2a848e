"""Configuration: YAML file -> validated, frozen dataclasses.

Every key is validated once, at load. An unknown key, a wrong type or a bad
value raises `ConfigError` naming the file, the dotted key path and the line.
Every handler is imported at load, so a typo in a handler path is a config
error, not a runtime surprise. Reload = `load()` again and swap one reference.

Each default is documented once, beside its field below; `etc/jobqd.yaml`
repeats them for operators and a test keeps the two in step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import yaml

from jobqd.errors import ConfigError

DEFAULT_CONFIG_PATH = "/etc/jobqd.yaml"
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")
QUEUE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,63}$")
PREFIX_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,63}$")
_ENV_RE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True, slots=True)
class RedisConfig:
    url: str  # redis://, rediss://, unix:// or "embedded"; required (or url_file)
    prefix: str = "jobqd"  # key namespace: deployments with other prefixes never meet

    @property
    def embedded(self) -> bool:
        return self.url == "embedded"


@dataclass(frozen=True, slots=True)
class PostgresConfig:
    dsn: str | None = None  # postgresql://...; None: heartbeats live in Redis, no outbox/ledger
    schema: str = "jobqd"  # the PostgreSQL schema holding jobqd's tables (created if missing)
    ledger: bool = False  # write every job's lifecycle to PostgreSQL (needs dsn)
    ledger_retention_days: int = 30  # ledger rows older than this are pruned


@dataclass(frozen=True, slots=True)
class HttpConfig:
    listen: str = "127.0.0.1:8765"  # host:port of health, metrics and the job API
    token_file: str | None = None  # if set, /v1 needs "Authorization: Bearer <file contents>"

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])


@dataclass(frozen=True, slots=True)
class QueueConfig:
    name: str
    weight: int = 1  # share of this daemon's job starts while several queues have work
    high_watermark: int | None = None  # refuse enqueues at this depth; None: unbounded
    low_watermark: int | None = None  # accept again at this depth; default high_watermark // 2


@dataclass(frozen=True, slots=True)
class BackoffConfig:
    base_s: float = 1.0  # retry n waits min(base_s * 2**n, max_s) * random()  (full jitter)
    max_s: float = 300.0


@dataclass(frozen=True, slots=True)
class RateLimit:
    count: int
    per_s: float

    def __str__(self) -> str:
        unit = {1.0: "s", 60.0: "m", 3600.0: "h"}[self.per_s]
        return f"{self.count}/{unit}"


@dataclass(frozen=True, slots=True)
class TaskConfig:
    name: str
    handler: str  # "package.module:function", imported at load
    queue: str = "default"  # must be declared under queues: (or be "default")
    timeout_s: float | None = 300.0  # the handler is cancelled at this deadline; null: none
    max_retries: int = 3  # exception retries before the job is dead-lettered
    retry_backoff: BackoffConfig = BackoffConfig()
    concurrency: int | None = None  # max running at once across all daemons; None: unlimited
    rate_limit: RateLimit | None = None  # "100/s", "1000/m", "10/h" across all daemons
    # where the handler runs: async (on the event loop; async def only), thread (a
    # plain def in a thread) or process (a plain def in a worker process:
    # process_pool); None: async for an async def, thread for a plain def
    executor: Literal["async", "thread", "process"] | None = None
    fn: Callable[..., Any] = field(default=lambda: None, compare=False, repr=False)
    is_async: bool = field(default=False, compare=False)

    @property
    def kind(self) -> Literal["async", "thread", "process"]:
        """The executor this task's jobs run in (`executor`, or the handler's default)."""
        if self.executor is not None:
            return self.executor
        return "async" if self.is_async else "thread"


@dataclass(frozen=True, slots=True)
class ProcessPoolConfig:
    size: int | None = None  # worker processes for executor: process; None: the CPU count
    max_tasks_per_child: int | None = None  # replace a child after this many jobs; None: never
    max_memory_mb: int | None = None  # replace a child whose RSS exceeds this (between jobs)
    kill_grace_s: float = 2.0  # a child past its job's timeout: SIGTERM, SIGKILL after this


@dataclass(frozen=True, slots=True)
class ReaperConfig:
    interval_s: float = 5.0  # how often the (single, locked) reaper scans
    visibility_timeout_s: float = 300.0  # backstop: reclaim an entry whose lease stopped renewing
    max_deliveries: int = 3  # a job whose worker died this many times is dead: worker_lost


@dataclass(frozen=True, slots=True)
class HeartbeatConfig:
    interval_s: float = 2.0  # each daemon beats this often
    timeout_s: float = 10.0  # a consumer silent this long is dead and its jobs reclaimed


@dataclass(frozen=True, slots=True)
class ShutdownConfig:
    drain_timeout_s: float = 30.0  # running jobs get this long to finish after SIGTERM
    handback_timeout_s: float = 5.0  # then this long to hand the rest back and close


@dataclass(frozen=True, slots=True)
class ResultsConfig:
    ttl_s: float = 3600.0  # how long a finished job's status and result stay readable


@dataclass(frozen=True, slots=True)
class WeightsConfig:
    refresh_interval_s: float = 2.0  # how often runtime weights are re-read from Redis


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "INFO"  # DEBUG, INFO, WARNING, ERROR
    format: Literal["auto", "json", "text"] = "auto"  # auto: text on a TTY, JSON lines otherwise
    payloads: bool = False  # include job args in failure logs
    jobs: Literal["all", "failures", "none"] = "all"  # log each job's outcome (INFO)
    jobs_per_s: float = 100.0  # at most this many outcome lines a second; the rest counted


@dataclass(frozen=True, slots=True)
class Config:
    path: str
    redis: RedisConfig
    postgres: PostgresConfig = PostgresConfig()
    http: HttpConfig = HttpConfig()
    consumers: int = 16  # how many jobs this daemon runs at once (0: route and reap only)
    queues: Mapping[str, QueueConfig] = field(default_factory=lambda: MappingProxyType({}))
    tasks: Mapping[str, TaskConfig] = field(default_factory=lambda: MappingProxyType({}))
    reaper: ReaperConfig = ReaperConfig()
    heartbeat: HeartbeatConfig = HeartbeatConfig()
    shutdown: ShutdownConfig = ShutdownConfig()
    results: ResultsConfig = ResultsConfig()
    weights: WeightsConfig = WeightsConfig()
    log: LogConfig = LogConfig()
    process_pool: ProcessPoolConfig = ProcessPoolConfig()
    max_payload_bytes: int = 1024 * 1024  # largest encoded job accepted at enqueue
    idempotency_ttl_s: float = 86400.0  # how long an idempotency key maps to its job
    state_dir: str = "/var/lib/jobqd"  # embedded Redis socket and AOF live here
    pythonpath: tuple[str, ...] = ()  # dirs prepended to sys.path before importing handlers

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
                if f.name not in ("fn", "is_async", "name")}
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
    if parts.password is None:
        masked = re.sub(r"(password=)[^&\s]+", r"\1****", url)
        return masked
    netloc = parts.netloc.rsplit("@", 1)
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:****@{netloc[-1]}"))


# ---------------------------------------------------------------- loading


def _d(cls: type, name: str) -> Any:
    """The documented default of a config field (slotted classes hide it)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
    raise KeyError(name)


def default_path() -> str:
    return os.environ.get("JOBQD_CONFIG") or DEFAULT_CONFIG_PATH


def load(path: str | os.PathLike[str], *, import_handlers: bool = True) -> Config:
    """Read, parse, validate and (by default) import every handler of a config file."""
    p = str(path)
    try:
        text = Path(p).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("file not found", path=p) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read: {e}", path=p) from None
    return loads(text, path=p, import_handlers=import_handlers)


def loads(text: str, *, path: str = "<string>", import_handlers: bool = True) -> Config:
    data, lines = _parse_yaml(text, path)
    return _Validator(path, lines, import_handlers).config(data)


def _parse_yaml(text: str, path: str) -> tuple[Any, dict[str, int]]:
    """YAML -> (data, {dotted key path: line}); duplicate keys are errors."""
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
    lines: dict[str, int] = {}
    if node is None:
        return {}, lines
    constructor = yaml.SafeLoader("")

    def walk(n: yaml.Node, dotted: str) -> Any:
        lines.setdefault(dotted, n.start_mark.line + 1)
        if isinstance(n, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for k_node, v_node in n.value:
                key = constructor.construct_object(k_node, deep=True)
                if not isinstance(key, str):
                    raise ConfigError(f"keys must be strings, got {key!r}", path=path,
                                      key=dotted or None, line=k_node.start_mark.line + 1)
                sub = f"{dotted}.{key}" if dotted else key
                if key in out:
                    raise ConfigError("duplicate key", path=path, key=sub,
                                      line=k_node.start_mark.line + 1)
                lines[sub] = k_node.start_mark.line + 1
                out[key] = walk(v_node, sub)
            return out
        if isinstance(n, yaml.SequenceNode):
            return [walk(item, f"{dotted}[{i}]") for i, item in enumerate(n.value)]
        try:
            return constructor.construct_object(n, deep=True)
        except yaml.YAMLError as e:
            raise ConfigError(f"bad value: {e}", path=path, key=dotted or None,
                              line=n.start_mark.line + 1) from None

    return walk(node, ""), lines


class _Validator:
    def __init__(self, path: str, lines: dict[str, int], import_handlers: bool) -> None:
        self.path = path
        self.lines = lines
        self.import_handlers = import_handlers

    def err(self, key: str, message: str) -> ConfigError:
        line = self.lines.get(key)
        if line is None and "." in key:
            line = self.lines.get(key.rsplit(".", 1)[0])
        return ConfigError(message, path=self.path, key=key, line=line)

    # -- primitive readers -------------------------------------------------

    def section(self, data: Any, key: str) -> dict[str, Any]:
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise self.err(key, f"must be a mapping, got {type(data).__name__}")
        return dict(data)

    def done(self, sec: dict[str, Any], key: str) -> None:
        for k in sec:
            raise self.err(f"{key}.{k}" if key else k, "unknown key")

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

    def num(self, sec: dict[str, Any], key: str, name: str, default: Any, *,
            integer: bool = False, minimum: float | None = None, exclusive: bool = True,
            nullable: bool = False) -> Any:
        """A number; `default` is a value or a config class (use its field's default)."""
        full = f"{key}.{name}" if key else name
        if isinstance(default, type):  # a config class: its field's documented default
            default = _d(default, name)
        if name not in sec:
            return default
        v = self.interp(sec.pop(name), full)
        if v is None:
            if nullable:
                return v
            raise self.err(full, "must not be null")
        if isinstance(v, str):
            with contextlib.suppress(ValueError):
                v = int(v) if integer else float(v)
        if isinstance(v, bool) or not isinstance(v, int | float):
            kind = "an integer" if integer else "a number"
            raise self.err(full, f"must be {kind}, got {type(v).__name__} {v!r}")
        if integer and not (isinstance(v, int) or float(v).is_integer()):
            raise self.err(full, f"must be an integer, got {v!r}")
        if not math.isfinite(v):
            raise self.err(full, f"must be finite, got {v!r}")
        if minimum is not None and (v <= minimum if exclusive else v < minimum):
            raise self.err(full, f"must be {'>' if exclusive else '>='} {minimum:g}, got {v!r}")
        return int(v) if integer else float(v)

    def string(self, sec: dict[str, Any], key: str, name: str, default: Any,
               nullable: bool = False) -> Any:
        full = f"{key}.{name}" if key else name
        if isinstance(default, type):
            default = _d(default, name)
        if name not in sec:
            return default
        v = self.interp(sec.pop(name), full)
        if v is None and nullable:
            return default
        if not isinstance(v, str) or not v:
            raise self.err(full, f"must be a non-empty string, got {v!r}")
        return v

    def boolean(self, sec: dict[str, Any], key: str, name: str, default: bool) -> bool:
        full = f"{key}.{name}"
        if name not in sec:
            return default
        v = self.interp(sec.pop(name), full)
        if isinstance(v, str) and v.lower() in ("true", "false", "yes", "no", "1", "0"):
            return v.lower() in ("true", "yes", "1")
        if not isinstance(v, bool):
            raise self.err(full, f"must be true or false, got {v!r}")
        return v

    def secret(self, sec: dict[str, Any], key: str, name: str) -> str | None:
        """`name` or `name_file` (a file whose stripped contents are the value)."""
        direct = self.string(sec, key, name, None, nullable=True)
        file_name = self.string(sec, key, name + "_file", None, nullable=True)
        if direct is not None and file_name is not None:
            raise self.err(f"{key}.{name}_file", f"set either {name} or {name}_file, not both")
        if file_name is not None:
            try:
                value = Path(file_name).read_text(encoding="utf-8").strip()
            except OSError as e:
                raise self.err(f"{key}.{name}_file", f"cannot read {file_name}: "
                                                     f"{e.strerror or e}") from None
            if not value:
                raise self.err(f"{key}.{name}_file", f"{file_name} is empty")
            return value
        return str(direct) if direct is not None else None

    # -- sections ------------------------------------------------------------

    def config(self, data: Any) -> Config:
        top = self.section(data, "")
        if not top and data is not None and not isinstance(data, dict):
            raise ConfigError("the file must be a YAML mapping", path=self.path)

        rsec = self.section(top.pop("redis", None), "redis")
        url = self.secret(rsec, "redis", "url")
        if url is None:
            raise self.err("redis.url", "required (a redis:// URL, or embedded)")
        if url != "embedded":
            scheme = urlsplit(url).scheme
            if scheme not in ("redis", "rediss", "unix"):
                raise self.err("redis.url", f"scheme must be redis://, rediss://, unix:// or the "
                                            f"word embedded, got {url!r}")
        prefix = str(self.string(rsec, "redis", "prefix", "jobqd"))
        if not PREFIX_RE.match(prefix) or "{" in prefix:
            raise self.err("redis.prefix", f"must match {PREFIX_RE.pattern}, got {prefix!r}")
        self.done(rsec, "redis")
        redis_cfg = RedisConfig(url=url, prefix=prefix)

        psec = self.section(top.pop("postgres", None), "postgres")
        dsn = self.secret(psec, "postgres", "dsn")
        schema = str(self.string(psec, "postgres", "schema", PostgresConfig))
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", schema):
            raise self.err("postgres.schema", f"must be a lowercase SQL identifier, got {schema!r}")
        ledger = self.boolean(psec, "postgres", "ledger", False)
        if ledger and dsn is None:
            raise self.err("postgres.ledger", "needs postgres.dsn")
        retention = self.num(psec, "postgres", "ledger_retention_days",
                             _d(PostgresConfig, "ledger_retention_days"), integer=True, minimum=0)
        self.done(psec, "postgres")
        pg_cfg = PostgresConfig(dsn=dsn, schema=schema, ledger=ledger,
                                ledger_retention_days=retention)

        hsec = self.section(top.pop("http", None), "http")
        listen = str(self.string(hsec, "http", "listen", HttpConfig))
        host, sep, port = listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise self.err("http.listen", f"must be host:port, got {listen!r}")
        token_file = self.string(hsec, "http", "token_file", None, nullable=True)
        if token_file is not None and not Path(token_file).is_file():
            raise self.err("http.token_file", f"{token_file} does not exist")
        self.done(hsec, "http")
        http_cfg = HttpConfig(listen=listen, token_file=token_file)

        consumers = self.num(top, "", "consumers", Config, integer=True,
                             minimum=0, exclusive=False)
        if consumers > 10_000:
            raise self.err("consumers", "must be <= 10000")
        max_payload = self.num(top, "", "max_payload_bytes", Config,
                               integer=True, minimum=0)
        idem_ttl = self.num(top, "", "idempotency_ttl_s", Config, minimum=0.001,
                            exclusive=False)
        state_dir = str(self.string(top, "", "state_dir", Config))
        pythonpath = self.pythonpath(top.pop("pythonpath", None))

        queues = self.queues(top.pop("queues", None))
        tasks = self.tasks(top.pop("tasks", None), queues, pythonpath)

        sec = self.section(top.pop("reaper", None), "reaper")
        reaper = ReaperConfig(
            interval_s=self.num(sec, "reaper", "interval_s", ReaperConfig, minimum=0),
            visibility_timeout_s=self.num(sec, "reaper", "visibility_timeout_s",
                                          _d(ReaperConfig, "visibility_timeout_s"), minimum=0),
            max_deliveries=self.num(sec, "reaper", "max_deliveries", ReaperConfig,
                                    integer=True, minimum=0),
        )
        self.done(sec, "reaper")

        sec = self.section(top.pop("heartbeat", None), "heartbeat")
        heartbeat = HeartbeatConfig(
            interval_s=self.num(sec, "heartbeat", "interval_s", HeartbeatConfig,
                                minimum=0),
            timeout_s=self.num(sec, "heartbeat", "timeout_s", HeartbeatConfig,
                               minimum=0),
        )
        self.done(sec, "heartbeat")
        if heartbeat.timeout_s < 2 * heartbeat.interval_s:
            raise self.err("heartbeat.timeout_s", f"must be at least twice heartbeat.interval_s "
                                                  f"({heartbeat.interval_s:g}), got "
                                                  f"{heartbeat.timeout_s:g}")
        if reaper.visibility_timeout_s < 3 * heartbeat.interval_s:
            raise self.err("reaper.visibility_timeout_s",
                           "must be at least 3x heartbeat.interval_s (leases renew that often)")

        sec = self.section(top.pop("shutdown", None), "shutdown")
        shutdown = ShutdownConfig(
            drain_timeout_s=self.num(sec, "shutdown", "drain_timeout_s", ShutdownConfig,
                                     minimum=0, exclusive=False),
            handback_timeout_s=self.num(sec, "shutdown", "handback_timeout_s", ShutdownConfig,
                                        minimum=0),
        )
        self.done(sec, "shutdown")

        sec = self.section(top.pop("results", None), "results")
        results = ResultsConfig(ttl_s=self.num(sec, "results", "ttl_s", ResultsConfig,
                                               minimum=0.001, exclusive=False))
        self.done(sec, "results")

        sec = self.section(top.pop("weights", None), "weights")
        weights = WeightsConfig(refresh_interval_s=self.num(
            sec, "weights", "refresh_interval_s", WeightsConfig, minimum=0))
        self.done(sec, "weights")

        sec = self.section(top.pop("log", None), "log")
        level = str(self.string(sec, "log", "level", LogConfig)).upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise self.err("log.level", f"must be DEBUG, INFO, WARNING or ERROR, got {level!r}")
        fmt = self.string(sec, "log", "format", LogConfig)
        if fmt not in ("auto", "json", "text"):
            raise self.err("log.format", f"must be auto, json or text, got {fmt!r}")
        jobs = self.string(sec, "log", "jobs", LogConfig)
        if jobs not in ("all", "failures", "none"):
            raise self.err("log.jobs", f"must be all, failures or none, got {jobs!r}")
        log = LogConfig(level=level, format=fmt,
                        payloads=self.boolean(sec, "log", "payloads", False), jobs=jobs,
                        jobs_per_s=self.num(sec, "log", "jobs_per_s", LogConfig, minimum=0,
                                            exclusive=False))
        self.done(sec, "log")

        sec = self.section(top.pop("process_pool", None), "process_pool")
        process_pool = ProcessPoolConfig(
            size=self.num(sec, "process_pool", "size", None, integer=True, minimum=0,
                          nullable=True),
            max_tasks_per_child=self.num(sec, "process_pool", "max_tasks_per_child", None,
                                         integer=True, minimum=0, nullable=True),
            max_memory_mb=self.num(sec, "process_pool", "max_memory_mb", None, integer=True,
                                   minimum=0, nullable=True),
            kill_grace_s=self.num(sec, "process_pool", "kill_grace_s", ProcessPoolConfig,
                                  minimum=0, exclusive=False))
        self.done(sec, "process_pool")

        self.done(top, "")
        return Config(path=self.path, redis=redis_cfg, postgres=pg_cfg, http=http_cfg,
                      consumers=consumers, queues=queues, tasks=tasks, reaper=reaper,
                      heartbeat=heartbeat, shutdown=shutdown, results=results, weights=weights,
                      log=log, max_payload_bytes=max_payload, idempotency_ttl_s=idem_ttl,
                      state_dir=state_dir, pythonpath=pythonpath, process_pool=process_pool)

    def pythonpath(self, raw: Any) -> tuple[str, ...]:
        if raw is None:
            return ()
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list):
            raise self.err("pythonpath", "must be a list of directories")
        out = []
        for i, item in enumerate(raw):
            v = self.interp(item, f"pythonpath[{i}]")
            if not isinstance(v, str) or not v:
                raise self.err(f"pythonpath[{i}]", f"must be a directory path, got {v!r}")
            if not os.path.isabs(v):  # relative to the config file's directory
                v = str((Path(self.path).parent / v).resolve())
            out.append(v)
        return tuple(out)

    def queues(self, raw: Any) -> Mapping[str, QueueConfig]:
        sec = self.section(raw, "queues")
        out: dict[str, QueueConfig] = {}
        for name in list(sec):
            key = f"queues.{name}"
            if not QUEUE_RE.match(name):
                raise self.err(key, f"queue names must match {QUEUE_RE.pattern}")
            q = self.section(sec.pop(name), key)
            weight = self.num(q, key, "weight", QueueConfig, integer=True, minimum=0,
                              exclusive=False)
            high = self.num(q, key, "high_watermark", None, integer=True, minimum=0,
                            nullable=True)
            low = self.num(q, key, "low_watermark", None, integer=True, minimum=0,
                           exclusive=False, nullable=True)
            self.done(q, key)
            if low is not None and high is None:
                raise self.err(f"{key}.low_watermark", "needs high_watermark")
            if high is not None:
                if low is None:
                    low = high // 2
                elif low >= high:
                    raise self.err(f"{key}.low_watermark",
                                   f"must be below high_watermark ({high}), got {low}")
            out[name] = QueueConfig(name=name, weight=weight, high_watermark=high,
                                    low_watermark=low)
        if not out:
            out["default"] = QueueConfig(name="default")
        return MappingProxyType(out)

    def tasks(self, raw: Any, queues: Mapping[str, QueueConfig],
              pythonpath: tuple[str, ...]) -> Mapping[str, TaskConfig]:
        sec = self.section(raw, "tasks")
        out: dict[str, TaskConfig] = {}
        for name in list(sec):
            key = f"tasks.{name}"
            if not NAME_RE.match(name):
                raise self.err(key, f"task names must match {NAME_RE.pattern}")
            t = self.section(sec.pop(name), key)
            handler = self.string(t, key, "handler", None)
            if handler is None:
                raise self.err(f"{key}.handler", "required (module:function)")
            queue = str(self.string(t, key, "queue", TaskConfig))
            if queue not in queues:
                raise self.err(f"{key}.queue", f"queue {queue!r} is not declared under queues: "
                                               f"(declared: {', '.join(sorted(queues))})")
            timeout = self.num(t, key, "timeout_s", TaskConfig, minimum=0,
                               nullable=True)
            retries = self.num(t, key, "max_retries", TaskConfig, integer=True,
                               minimum=0, exclusive=False)
            bkey = f"{key}.retry_backoff"
            b = self.section(t.pop("retry_backoff", None), bkey)
            backoff = BackoffConfig(
                base_s=self.num(b, bkey, "base_s", BackoffConfig, minimum=0,
                                exclusive=False),
                max_s=self.num(b, bkey, "max_s", BackoffConfig, minimum=0,
                               exclusive=False))
            self.done(b, bkey)
            if backoff.max_s < backoff.base_s:
                raise self.err(f"{bkey}.max_s", f"must be >= base_s ({backoff.base_s:g})")
            concurrency = self.num(t, key, "concurrency", None, integer=True, minimum=0,
                                   nullable=True)
            rate = self.rate_limit(t, key)
            executor = self.string(t, key, "executor", None, nullable=True)
            if executor not in (None, "async", "thread", "process"):
                raise self.err(f"{key}.executor", f"must be async, thread or process, "
                                                  f"got {executor!r}")
            self.done(t, key)
            fn: Callable[..., Any] = _d(TaskConfig, "fn")
            is_async = False
            if self.import_handlers:
                fn = self.import_handler(str(handler), f"{key}.handler", pythonpath)
                is_async = _is_async_callable(fn)
                if executor is not None and (executor == "async") != is_async:
                    raise self.err(f"{key}.executor", (
                        f"{handler} is an async def: it runs on the event loop (executor: "
                        f"async), not in a {executor}" if is_async else
                        f"{handler} is a plain def: use executor thread or process"))
            out[name] = TaskConfig(name=name, handler=str(handler), queue=queue,
                                   timeout_s=timeout, max_retries=retries, retry_backoff=backoff,
                                   concurrency=concurrency, rate_limit=rate,
                                   executor=executor, fn=fn, is_async=is_async)
        return MappingProxyType(out)

    def rate_limit(self, t: dict[str, Any], key: str) -> RateLimit | None:
        raw = self.string(t, key, "rate_limit", None, nullable=True)
        if raw is None:
            return None
        m = re.fullmatch(r"\s*(\d+)\s*/\s*([smh])\s*", str(raw))
        if not m or int(m.group(1)) <= 0:
            raise self.err(f"{key}.rate_limit", f"must look like 100/s, 1000/m or 10/h, "
                                                f"got {raw!r}")
        return RateLimit(count=int(m.group(1)), per_s=_RATE_UNITS[m.group(2)])

    def import_handler(self, spec: str, key: str,
                       pythonpath: tuple[str, ...]) -> Callable[..., Any]:
        mod_name, sep, attr = spec.partition(":")
        if not sep or not mod_name or not attr:
            raise self.err(key, f"must be 'module:function', got {spec!r}")
        for d in reversed(pythonpath):
            if d not in sys.path:
                sys.path.insert(0, d)
        try:
            obj: Any = importlib.import_module(mod_name)
        except Exception as e:  # any import-time failure is the config's fault
            raise self.err(key, f"cannot import {mod_name!r}: {type(e).__name__}: {e}") from None
        for part in attr.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise self.err(key, f"module {mod_name!r} has no attribute {attr!r}") from None
        if not callable(obj):
            raise self.err(key, f"{spec!r} is not callable")
        return obj  # type: ignore[no-any-return]


def _is_async_callable(fn: Any) -> bool:
    while hasattr(fn, "func"):  # functools.partial
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None))  # noqa: B004
