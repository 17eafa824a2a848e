"""Shared fixtures: every test gets its own Redis key prefix (and PostgreSQL
schema), so tests cannot see each other; daemons run in-process or as real
subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aredis
import yaml

from jobqd import Client, config
from jobqd.daemon import Daemon
from jobqd.exitcodes import ExitCode
from jobqd.runtime import Runtime

REDIS_URL = os.environ.get("JOBQD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PG_DSN = os.environ.get("JOBQD_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
ROOT = Path(__file__).resolve().parent.parent


def _cleanup(prefix: str) -> None:
    r = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(r.scan_iter(match=f"*{prefix}*", count=1000))
        for i in range(0, len(keys), 500):
            r.delete(*keys[i:i + 500])
    finally:
        r.close()


@pytest.fixture
def prefix() -> Iterator[str]:
    p = "t" + uuid.uuid4().hex[:12]
    yield p
    _cleanup(p)


@pytest.fixture
def redis_url() -> str:
    return REDIS_URL


@pytest.fixture
async def r() -> AsyncIterator[aredis.Redis]:
    conn = aredis.Redis.from_url(REDIS_URL)
    yield conn
    await conn.aclose()


@pytest.fixture
def sync_r() -> Iterator[redis.Redis]:
    conn = redis.Redis.from_url(REDIS_URL)
    yield conn
    conn.close()


def base_config(prefix: str, **over: Any) -> dict[str, Any]:
    """A config dict for tests: fast timings, the test handlers."""
    cfg: dict[str, Any] = {
        "redis": {"url": REDIS_URL, "prefix": prefix},
        "http": {"listen": "127.0.0.1:0"},
        "consumers": 8,
        "queues": {"default": {"weight": 1}},
        "tasks": {
            "record": {"handler": "tests.handlers:record"},
            "record_sync": {"handler": "tests.handlers:record_sync"},
            "fail_times": {"handler": "tests.handlers:fail_times", "max_retries": 3,
                           "retry_backoff": {"base_s": 0.01, "max_s": 0.05}},
            "always_fail": {"handler": "tests.handlers:always_fail", "max_retries": 2,
                            "retry_backoff": {"base_s": 0.01, "max_s": 0.05}},
            "fail_now": {"handler": "tests.handlers:fail_now"},
            "retry_once": {"handler": "tests.handlers:retry_once"},
            "sleep": {"handler": "tests.handlers:sleep"},
            "sleep_sync": {"handler": "tests.handlers:sleep_sync"},
            "noop": {"handler": "tests.handlers:noop"},
            "crash": {"handler": "tests.handlers:crash"},
            "unserialisable": {"handler": "tests.handlers:unserialisable", "max_retries": 0},
        },
        "reaper": {"interval_s": 0.5, "visibility_timeout_s": 30},
        "heartbeat": {"interval_s": 0.5, "timeout_s": 2},
        "shutdown": {"drain_timeout_s": 5, "handback_timeout_s": 3},
        "results": {"ttl_s": 600},
        "weights": {"refresh_interval_s": 0.2},
        "log": {"level": "INFO"},
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict) and k not in ("queues",):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return cfg


@pytest.fixture
def write_config(tmp_path: Path, prefix: str) -> Callable[..., Path]:
    """write_config(**overrides) -> path of a YAML config under this test's prefix."""

    def write(**over: Any) -> Path:
        path = tmp_path / f"jobqd-{uuid.uuid4().hex[:6]}.yaml"
        path.write_text(yaml.safe_dump(base_config(prefix, **over), sort_keys=False))
        return path

    return write


class InProcessDaemon:
    def __init__(self, cfg: config.Config) -> None:
        self.cfg = cfg
        self.daemon = Daemon(cfg, install_signals=False, watch_config=False)
        self.ready = asyncio.Event()
        self.daemon.on_ready = self._ready
        self.task: asyncio.Task[ExitCode] | None = None

    async def _ready(self, _rt: Any) -> None:
        self.ready.set()

    async def start(self) -> InProcessDaemon:
        self.task = asyncio.create_task(self.daemon.run())
        waiter = asyncio.ensure_future(self.ready.wait())
        done, _ = await asyncio.wait({waiter, self.task}, timeout=15,
                                     return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:
            waiter.cancel()
            raise RuntimeError(f"daemon did not become ready: {self.task}")
        return self

    async def stop(self) -> ExitCode:
        assert self.task is not None
        self.daemon.stop("test")
        return await asyncio.wait_for(self.task, 30)


@contextlib.asynccontextmanager
async def in_process_daemons() -> AsyncIterator[list[InProcessDaemon]]:
    """The daemons a test appends here are stopped when it ends (unless stopped)."""
    started: list[InProcessDaemon] = []
    try:
        yield started
    finally:
        for d in started:
            if d.task is not None and not d.task.done():
                await d.stop()


@pytest.fixture
async def start_daemon(write_config: Callable[..., Path]) -> AsyncIterator[Callable[..., Any]]:
    """await start_daemon(**overrides) -> a running in-process daemon (stopped after)."""
    async with in_process_daemons() as started:
        async def start(**over: Any) -> InProcessDaemon:
            d = await InProcessDaemon(config.load(write_config(**over))).start()
            started.append(d)
            return d

        yield start


@pytest.fixture
async def make_rt(write_config: Callable[..., Path]) -> AsyncIterator[Callable[..., Runtime]]:
    """make_rt(**overrides) -> a Runtime on this test's prefix (no daemon running)."""
    made: list[Runtime] = []

    def make(**over: Any) -> Runtime:
        rt = Runtime(config=config.load(write_config(**over)),
                     redis=aredis.Redis.from_url(REDIS_URL))
        made.append(rt)
        return rt

    yield make
    for rt in made:
        await rt.redis.aclose()


def wait_until(pred: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll a blocking predicate every 50 ms; seconds it took, or an AssertionError
    naming `what` after `timeout` (for tests that drive subprocesses)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def wait_for(pred: Callable[[], Awaitable[bool]], timeout: float = 30.0,
                   what: str = "condition") -> None:
    """Poll an async predicate until it holds (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def wait_status(c: Client, job_id: str, want: str, timeout: float = 15.0) -> Any:
    """Poll a job's status until it is `want` (bounded); returns its JobInfo."""
    deadline = time.monotonic() + timeout
    info = None
    while time.monotonic() < deadline:
        info = await c.status(job_id)
        if info.status == want:
            return info
        await asyncio.sleep(0.02)
    raise AssertionError(f"{job_id} is {info}, wanted {want} within {timeout}s")


@pytest.fixture
async def client(prefix: str) -> AsyncIterator[Client]:
    async with Client(REDIS_URL, prefix) as c:
        yield c


class DaemonProcess:
    """`jobqd run` as a real subprocess (for kill -9 and signal tests)."""

    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonProcess:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "JOBQD_TEST_REDIS_URL": REDIS_URL}
        env.pop("NOTIFY_SOCKET", None)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jobqd", "-c", str(self.config_path), "run"],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait_ready(self, prefix: str | None = None, timeout: float = 20.0) -> None:
        """Ready = with `prefix`: its consumer's heartbeat is in Redis; without (e.g.
        PostgreSQL heartbeats): the daemon logged "ready" (needs log.level INFO)."""
        r = redis.Redis.from_url(REDIS_URL)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
                if prefix is None:
                    if '"msg":"ready' in self.log():
                        return
                elif any(f":{self.pid}:" in n.decode() for n in r.zrange(f"{prefix}:hb", 0, -1)):
                    return
                time.sleep(0.05)
        finally:
            r.close()
        raise RuntimeError(f"daemon not ready in {timeout}s:\n{self.log()}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait(10)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        finally:
            with contextlib.suppress(Exception):
                self._log.close()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        with contextlib.suppress(Exception):
            self._log.close()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[[Path], DaemonProcess]]:
    """spawn(config_path) -> a started daemon subprocess (killed after the test)."""
    procs: list[DaemonProcess] = []

    def start(config_path: Path) -> DaemonProcess:
        p = DaemonProcess(config_path, tmp_path / f"daemon-{len(procs)}.log").start()
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.stop()


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A fresh PostgreSQL schema for this test, dropped afterwards."""
    import asyncpg

    schema = "t_" + uuid.uuid4().hex[:12]

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(PG_DSN)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run(f'CREATE SCHEMA "{schema}"'))
    yield schema
    asyncio.run(run(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


@pytest.fixture
async def db(pg_schema: str) -> AsyncIterator[Any]:
    """An asyncpg connection on this test's schema, migrated."""
    import asyncpg

    from jobqd import pg

    conn = await asyncpg.connect(PG_DSN, server_settings={"search_path": pg_schema})
    await pg.migrate(conn, pg_schema)
    yield conn
    await conn.close()


def dedent(s: str) -> str:
    return textwrap.dedent(s).lstrip()


def pool_parked(pool: Any) -> bool:
    """An idle pool's deadline tick and progress writer both wait for work
    (`Pool.work`; asyncio.Event keeps its waiters' futures in `_waiters`: there is no
    public way to ask)."""
    return len(pool.work._waiters) == 2
