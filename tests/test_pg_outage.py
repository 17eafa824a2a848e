"""PostgreSQL (the heartbeat store) stopped for 8 s (4 x heartbeat.timeout_s) under two
live daemons: the blip rule says nothing is reclaimed from a live daemon, and nothing
crashes.

The test owns its PostgreSQL (initdb into tmp_path, a free port), so stopping
it disturbs no one else.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from jobqd import SyncClient

from .conftest import REDIS_URL, DaemonProcess

PG_BIN = Path("/usr/lib/postgresql")
OUTAGE_S = 8  # 4 x heartbeat.timeout_s: every beat is stale long before PostgreSQL is back


def _pg_bin() -> Path | None:
    if not PG_BIN.exists() or shutil.which("runuser") is None or os.geteuid() != 0:
        return None
    versions = sorted(PG_BIN.iterdir())
    return versions[-1] / "bin" if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivatePostgres:
    def __init__(self, bindir: Path, datadir: Path, port: int) -> None:
        self.bindir, self.datadir, self.port = bindir, datadir, port

    def _as_postgres(self, *args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *args], check=True,
                       capture_output=True, timeout=60)

    def init(self) -> None:
        self.datadir.mkdir(parents=True)
        shutil.chown(self.datadir, "postgres", "postgres")
        self._as_postgres(str(self.bindir / "initdb"), "-D", str(self.datadir), "-A", "trust",
                          "-U", "postgres")

    def start(self) -> None:
        self._as_postgres(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-w", "-t", "30",
                          "-o", f"-p {self.port} -k {self.datadir} -c listen_addresses=127.0.0.1",
                          "-l", str(self.datadir / "log"), "start")

    def stop(self) -> None:
        self._as_postgres(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "fast",
                          "-w", "stop")

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"


def _readyz(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=3) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def private_pg(tmp_path: Path) -> Iterator[PrivatePostgres]:
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("needs root, runuser and a PostgreSQL server installation")
    base = Path("/tmp") / f"jobqd-pg-{tmp_path.name}-{os.getpid()}"  # postgres must reach it
    pg = PrivatePostgres(bindir, base / "data", _free_port())
    pg.init()
    pg.start()
    yield pg
    with contextlib.suppress(Exception):
        pg.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.timeout(150)
def test_postgres_stopped_8s_nothing_reclaimed_nothing_crashes(
        private_pg: PrivatePostgres, write_config: Callable[..., Path],
        spawn: Callable[[Path], DaemonProcess], prefix: str) -> None:
    def cfg(port: int) -> Path:
        return write_config(consumers=4, postgres={"dsn": private_pg.dsn},
                            heartbeat={"interval_s": 0.5, "timeout_s": 2},
                            reaper={"interval_s": 0.5, "visibility_timeout_s": 60},
                            http={"listen": f"127.0.0.1:{port}"})

    port_a = _free_port()
    a, b = spawn(cfg(port_a)), spawn(cfg(_free_port()))
    a.wait_ready()
    b.wait_ready()
    key = f"{prefix}:runs"
    r = redis.Redis.from_url(REDIS_URL)
    try:
        with SyncClient(REDIS_URL, prefix) as c:
            # still running when PostgreSQL is back: they outlast the outage by ~6 s
            long = [j.id for j in c.enqueue_many(
                "sleep", [{"seconds": OUTAGE_S + 6, "key": key}] * 6)]
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and r.hlen(key + ":started") < 6:
                time.sleep(0.05)
            assert r.hlen(key + ":started") == 6
            assert _readyz(port_a)[0] == 200
            private_pg.stop()
            t0 = time.monotonic()
            short: list[str] = []
            while time.monotonic() - t0 < OUTAGE_S:  # work keeps flowing through Redis
                short += [j.id for j in c.enqueue_many("record", [{"key": key}] * 5)]
                time.sleep(1)
                assert a.proc is not None and a.proc.poll() is None, a.log()
                assert b.proc is not None and b.proc.poll() is None, b.log()
            status, body = _readyz(port_a)  # the operator is told the truth meanwhile
            assert status == 503 and "postgres" in body["problems"], body
            private_pg.start()
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and _readyz(port_a)[0] != 200:
                time.sleep(0.2)
            assert _readyz(port_a)[0] == 200
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not all(
                    c.status(j).status == "succeeded" for j in long + short):
                time.sleep(0.2)
            assert all(c.status(j).status == "succeeded" for j in long + short)
            assert all(c.status(j).lost == 0 for j in long)  # never reclaimed
        started = {k.decode(): int(v) for k, v in r.hgetall(key + ":started").items()}
        assert set(started.values()) == {1} and len(started) == 6  # each long job ran once
        assert "unreachable" in a.log() + b.log()  # the blip rule was what held
    finally:
        r.close()
