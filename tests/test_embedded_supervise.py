"""`redis.url: embedded`: the daemon supervises its redis-server. `kill -9` of the server
is followed by a restart (with the AOF, so queued jobs still run); when restarts keep
failing, the daemon exits UNAVAILABLE (69), which systemd restarts."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import yaml

from jobqd import SyncClient, config
from jobqd.embedded import RESTART_ATTEMPTS
from jobqd.exitcodes import ExitCode
from tests.conftest import DaemonProcess, base_config

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="needs a redis-server binary")


@pytest.fixture
def state_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="jq-", dir="/tmp"))  # unix socket paths must be short
    yield d
    _kill_server(d)  # a daemon killed by the spawn fixture leaves its server behind
    shutil.rmtree(d, ignore_errors=True)


def _kill_server(state_dir: Path) -> None:
    if not (state_dir / "redis.sock").exists():
        return
    try:
        pid = _server_pid(state_dir)
    except redis.RedisError:
        return
    os.kill(pid, signal.SIGKILL)


def _config(tmp_path: Path, state_dir: Path, prefix: str) -> Path:
    p = tmp_path / "embedded.yaml"
    p.write_text(yaml.safe_dump(base_config(
        prefix, redis={"url": "embedded", "prefix": prefix}, state_dir=str(state_dir),
        consumers=4)))
    return p


def _server_pid(state_dir: Path) -> int:
    r = redis.Redis(unix_socket_path=str(state_dir / "redis.sock"), socket_timeout=2)
    try:
        return int(r.info("server")["process_id"])
    finally:
        r.close()


def _aof_holds(state_dir: Path, job_ids: list[str], timeout: float = 10.0) -> None:
    """appendfsync everysec: wait until the AOF on disk names every job."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = b"".join(f.read_bytes() for f in state_dir.rglob("*.aof*") if f.is_file())
        if all(j.encode() in data for j in job_ids):
            return
        time.sleep(0.1)
    raise AssertionError("the jobs never reached the AOF")


def _wait_pid_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} still there")


def test_killed_embedded_redis_is_restarted_and_queued_jobs_run(
        tmp_path: Path, state_dir: Path, prefix: str,
        spawn: Callable[[Path], DaemonProcess]) -> None:
    path = _config(tmp_path, state_dir, prefix)
    d = spawn(path)
    d.wait_ready()
    first = _server_pid(state_dir)
    cfg = config.load(path, import_handlers=False)
    with SyncClient(cfg.redis_url, prefix) as c:
        delayed = [c.enqueue("noop", delay_s=4).id for _ in range(5)]
        queued = [c.enqueue("noop").id for _ in range(5)]
    _aof_holds(state_dir, delayed + queued)
    os.kill(first, signal.SIGKILL)
    _wait_pid_gone(first)

    deadline = time.monotonic() + 30
    while "restarted" not in d.log():
        assert d.proc is not None and d.proc.poll() is None, d.log()
        assert time.monotonic() < deadline, d.log()
        time.sleep(0.1)
    assert _server_pid(state_dir) != first
    with SyncClient(cfg.redis_url, prefix) as c:
        for job_id in delayed + queued:
            while (st := c.status(job_id).status) != "succeeded":
                assert time.monotonic() < deadline, (job_id, st, d.log())
                time.sleep(0.1)
    d.signal(signal.SIGTERM)
    assert d.wait(30) == ExitCode.OK, d.log()
    assert "Traceback" not in d.log()


def test_embedded_redis_that_cannot_be_restarted_exits_unavailable(
        tmp_path: Path, state_dir: Path, prefix: str, monkeypatch: pytest.MonkeyPatch,
        spawn: Callable[[Path], DaemonProcess]) -> None:
    real = shutil.which("redis-server")
    broken = tmp_path / "broken"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "redis-server"  # runs the real server until `broken` exists
    wrapper.write_text(f'#!/bin/sh\n[ -e "{broken}" ] && {{ echo broken >&2; exit 1; }}\n'
                       f'exec "{real}" "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    d = spawn(_config(tmp_path, state_dir, prefix))
    d.wait_ready()
    pid = _server_pid(state_dir)
    broken.write_text("")
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    code = d.wait(60)
    took = time.monotonic() - t0
    out = d.log_path.read_text()
    assert code == ExitCode.UNAVAILABLE, out
    assert out.count("restart attempt") == RESTART_ATTEMPTS, out
    assert "Traceback" not in out, out
    # the backoff between attempts (0.5, 1, 2, 4 s) and the attempts, no more: each
    # probe of the dead server's socket file is one try (redis-py's default retries
    # made it ~4 s a probe, ~35 s in all)
    assert took < 28, f"gave up {took:.1f}s after the kill\n{out}"


async def test_a_server_that_keeps_dying_is_given_up_on(
        tmp_path: Path, state_dir: Path, prefix: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Restarts that succeed but die again at once are bounded too (a crash loop)."""
    import asyncio

    from jobqd import embedded

    monkeypatch.setattr(embedded, "RESTART_ATTEMPTS", 2)
    server = embedded.EmbeddedRedis(config.load(_config(tmp_path, state_dir, prefix),
                                                import_handlers=False))
    await server.start()
    stop = asyncio.Event()
    watcher = asyncio.create_task(server.supervise(stop))
    try:
        for i in range(1, 3):  # two deaths: each one restarted
            assert server.proc is not None
            server.proc.kill()
            deadline = time.monotonic() + 20
            while sum("restarted" in r.getMessage() for r in caplog.records) < i:
                assert not watcher.done() and time.monotonic() < deadline
                await asyncio.sleep(0.05)
        assert server.proc is not None
        server.proc.kill()  # the third within the window: given up
        assert await asyncio.wait_for(watcher, 20) is False
    finally:
        stop.set()
        await server.stop()
        await asyncio.wait_for(watcher, 5)
