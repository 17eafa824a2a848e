"""A redis-server the test owns: its own loopback port and directory, no persistence,
started with whatever settings the test needs (maxmemory, an evicting policy) and
killed by pid. Only such a server may be FLUSHALLed or restarted empty."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

needs_redis_server = pytest.mark.skipif(shutil.which("redis-server") is None,
                                        reason="redis-server is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OwnRedis:
    def __init__(self, dir_: Path, *args: str) -> None:
        self.dir = dir_
        self.args = list(args)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout: float = 10.0) -> None:
        assert self.proc is None or self.proc.poll() is not None
        self.starts += 1
        with open(self.dir / f"redis-{self.starts}.log", "wb") as out:
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                 "--dir", str(self.dir), "--save", "", "--appendonly", "no",
                 "--protected-mode", "no", *self.args],
                stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited {self.proc.returncode}")
            c = redis.Redis(port=self.port, socket_connect_timeout=0.5, socket_timeout=1)
            try:
                if c.ping():
                    return
            except redis.RedisError:
                pass
            finally:
                c.close()
            time.sleep(0.02)
        raise RuntimeError(f"redis-server not up in {timeout}s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


@contextlib.contextmanager
def own_redis(dir_: Path, *args: str) -> Iterator[OwnRedis]:
    dir_.mkdir(parents=True, exist_ok=True)
    srv = OwnRedis(dir_, *args)
    srv.start()
    try:
        yield srv
    finally:
        srv.kill()
