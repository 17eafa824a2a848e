"""The daemon as systemd and a log collector see it: the notify protocol on a
socket the test owns, the watchdog, and JSON log lines."""

from __future__ import annotations

import gc
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from jobqd import SyncClient
from jobqd.daemon import GC_GEN0

from .conftest import REDIS_URL, ROOT, DaemonProcess


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    yield sock, path
    sock.close()


def start(config: Path, env_extra: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JOBQD_TEST_REDIS_URL": REDIS_URL,
           **env_extra}
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "jobqd", "-c", str(config), "run"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))


def messages(sock: socket.socket, until: Callable[[list[dict[str, str]]], bool],
             timeout: float) -> list[dict[str, str]]:
    got: list[dict[str, str]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not until(got):
        try:
            data = sock.recv(4096).decode()
        except TimeoutError:
            continue
        got.append(dict(line.split("=", 1) for line in data.splitlines() if "=" in line))
    return got


def test_notify_ready_reloading_stopping_and_watchdog(
        write_config: Callable[..., Path], notify_socket: tuple[socket.socket, str],
        tmp_path: Path) -> None:
    sock, path = notify_socket
    cfg = write_config(consumers=2)
    proc = start(cfg, {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}, tmp_path / "d.log")
    try:
        got = messages(sock, lambda m: any(x.get("READY") == "1" for x in m), 20)
        ready = [m for m in got if m.get("READY") == "1"]
        assert ready, (got, (tmp_path / "d.log").read_text())
        assert "running" in ready[0].get("STATUS", "")
        # watchdog pings every WATCHDOG_USEC/2, with live status
        pings = messages(sock, lambda m: sum("WATCHDOG" in x for x in m) >= 3, 5)
        assert sum(m.get("WATCHDOG") == "1" for m in pings) >= 3
        assert any("busy" in m.get("STATUS", "") for m in pings)
        # reload: RELOADING=1 with MONOTONIC_USEC, then READY=1 again
        proc.send_signal(signal.SIGHUP)
        got = messages(sock, lambda m: any(x.get("READY") == "1" for x in m), 10)
        reloading = [m for m in got if m.get("RELOADING") == "1"]
        assert reloading and int(reloading[0]["MONOTONIC_USEC"]) > 0
        proc.send_signal(signal.SIGTERM)
        got = messages(sock, lambda m: any(x.get("STOPPING") == "1" for x in m), 10)
        assert any(m.get("STOPPING") == "1" for m in got)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_json_log_lines_carry_the_failure_fields(write_config: Callable[..., Path],
                                                 tmp_path: Path, prefix: str) -> None:
    cfg = write_config(consumers=2)
    log = tmp_path / "d.log"
    proc = start(cfg, {}, log)
    r = redis.Redis.from_url(REDIS_URL)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not r.zcard(f"{prefix}:hb"):
            time.sleep(0.05)
        with SyncClient(REDIS_URL, prefix) as c:
            job = c.enqueue("fail_now", {"reason": "secret-free reason"})
            while time.monotonic() < deadline and c.status(job.id).status != "dead":
                time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        r.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert all({"ts", "level", "logger", "msg"} <= set(x) for x in lines)  # every line is JSON
    dead = [x for x in lines if x.get("job_id") == job.id]
    assert dead and dead[0]["task"] == "fail_now" and dead[0]["queue"] == "default"
    assert dead[0]["attempt"] == 1 and dead[0]["level"] == "error"
    assert "args" not in dead[0]  # payloads are not logged unless log.payloads is on
    assert any("ready" in x["msg"] for x in lines)
    assert any(x["msg"].startswith("drained") for x in lines)


def test_handler_import_error_refuses_to_start(write_config: Callable[..., Any],
                                               tmp_path: Path) -> None:
    cfg = write_config(tasks={"bad": {"handler": "tests.handlers:does_not_exist"}})
    proc = start(cfg, {}, tmp_path / "d.log")
    assert proc.wait(20) == 78
    out = (tmp_path / "d.log").read_text()
    assert "tasks.bad.handler" in out and "does_not_exist" in out


def test_own_process_freezes_gc_and_raises_the_young_threshold(
        write_config: Callable[..., Path], spawn: Callable[[Path], DaemonProcess]) -> None:
    """`jobqd run` (the process is the daemon's) freezes what start-up made and sets
    the young-generation threshold to GC_GEN0, and says so at INFO with the values read
    back from the interpreter."""
    d = spawn(write_config(consumers=1))
    d.wait_ready()
    d.signal(signal.SIGTERM)
    assert d.wait(20) == 0, d.log()
    lines = [json.loads(x) for x in d.log_path.read_text().splitlines() if x.strip()]
    gc_lines = [x for x in lines if x["msg"].startswith("gc: ")]
    assert len(gc_lines) == 1, d.log()
    m = re.fullmatch(r"gc: froze (\d+) start-up objects, young-generation threshold "
                     r"(\d+) \(was (\d+)\)", gc_lines[0]["msg"])
    assert m is not None, gc_lines
    frozen, gen0, was = map(int, m.groups())
    assert gen0 == GC_GEN0 == 20_000 and was < gen0 and frozen > 10_000, gc_lines
    assert gc_lines[0]["level"] == "info"


async def test_in_process_daemon_leaves_the_hosts_gc_alone(
        start_daemon: Callable[..., Any]) -> None:
    """A daemon inside someone else's process (a test, an app: install_signals=False)
    does not change that process's collector."""
    threshold, frozen = gc.get_threshold(), gc.get_freeze_count()
    await start_daemon()
    assert (gc.get_threshold(), gc.get_freeze_count()) == (threshold, frozen)
