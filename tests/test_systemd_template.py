"""systemd/jobqd@.service: several daemons per host, one per instance (%i).

systemd reads it (``systemd-analyze verify`` on an instance), and its ExecStart=
line, run the way systemd would for ``jobqd@2`` (``%i`` = 2, the unit's
Environment= applied), starts a daemon that becomes ready on instance 2's port
(the config's ``${JOBQD_INSTANCE}``).
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from jobqd import config

from .conftest import REDIS_URL, ROOT, base_config
from .test_systemd_unit import (
    INSTALLED_EXEC,
    SYSTEMD_ANALYZE,
    _verify,
    last,
    needs_analyze,
    parse_unit,
    values,
)

TEMPLATE = ROOT / "systemd" / "jobqd@.service"
SINGLE = ROOT / "systemd" / "jobqd.service"
# the README's pattern, on a port base unlikely to be taken on a test machine
LISTEN = "127.0.0.1:5876${JOBQD_INSTANCE:-5}"


def _instance(text: str, i: str) -> dict[str, list[tuple[str, str]]]:
    return parse_unit(text.replace("%i", i))


def test_template_is_the_single_unit_plus_the_instance_lines() -> None:
    unit, single = parse_unit(TEMPLATE.read_text()), parse_unit(SINGLE.read_text())
    assert values(unit, "Service", "Environment") == [
        *values(single, "Service", "Environment"), "JOBQD_INSTANCE=%i"]
    # the daemon stops its own worker processes (both units)
    assert last(unit, "Service", "KillMode") == last(single, "Service", "KillMode") == "mixed"
    assert last(unit, "Service", "RuntimeDirectory") == "jobqd-%i"
    instance_keys = {"Environment", "RuntimeDirectory", "Description"}
    for section in ("Unit", "Service", "Install"):
        assert [kv for kv in unit[section] if kv[0] not in instance_keys] == \
            [kv for kv in single[section] if kv[0] not in instance_keys], section


@needs_analyze
def test_systemd_analyze_verify_an_instance(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    fake = tmp_path / "jobqd"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    (tmp_path / "units").mkdir()
    text = TEMPLATE.read_text()
    assert INSTALLED_EXEC in text
    (tmp_path / "units" / "jobqd@.service").write_text(text.replace(INSTALLED_EXEC, str(fake)))
    rc, unexpected = _verify(tmp_path / "units" / "jobqd@2.service")
    assert rc == 0 and not unexpected, "\n".join(unexpected)
    # the harness reads the template: a misspelt key in it is reported
    (tmp_path / "units" / "jobqd@.service").write_text(
        text.replace(INSTALLED_EXEC, str(fake)).replace("KillMode=", "KillMood="))
    _rc, unexpected = _verify(tmp_path / "units" / "jobqd@2.service")
    assert any("KillMood" in ln for ln in unexpected), unexpected


def test_instance_interpolation_gives_each_instance_its_port(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(base_config("x", http={"listen": LISTEN})))
    monkeypatch.delenv("JOBQD_INSTANCE", raising=False)
    assert config.load(p).http.port == 58765  # plain `jobqd run`
    for i in "1234":
        monkeypatch.setenv("JOBQD_INSTANCE", i)
        assert config.load(p).http.port == int(f"5876{i}")


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def test_exec_start_of_instance_2_starts_a_ready_daemon_on_its_port(
        tmp_path: Path, prefix: str) -> None:
    # instance i listens on 5876i: take one whose port is free (other suites, or a
    # Redis Cluster's bus port, port + 10000, may hold 58762 on a shared machine)
    inst = next(i for i in "23456789" if _port_free(int(f"5876{i}")))
    unit = _instance(TEMPLATE.read_text(), inst)
    cfg = tmp_path / "jobqd.yaml"
    cfg.write_text(yaml.safe_dump(base_config(prefix, http={"listen": LISTEN})))
    jobqd = Path(sys.executable).parent / "jobqd"
    assert jobqd.exists(), f"{jobqd}: run pip install -e . in this venv"

    def local(word: str) -> str:
        return word.replace(INSTALLED_EXEC, str(jobqd)).replace("/etc/jobqd.yaml", str(cfg))

    (exec_start,) = values(unit, "Service", "ExecStart")
    argv = [local(w) for w in shlex.split(exec_start)]
    assert argv[0] == str(jobqd) and str(cfg) in argv
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JOBQD_TEST_REDIS_URL": REDIS_URL}
    env.pop("NOTIFY_SOCKET", None)
    env.pop("JOBQD_INSTANCE", None)
    for assignment in values(unit, "Service", "Environment"):
        k, _, v = local(assignment).partition("=")
        env[k] = v
    assert env["JOBQD_INSTANCE"] == inst
    log = open(tmp_path / "daemon.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(argv, env=env, cwd=str(ROOT), stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while _get(f"http://127.0.0.1:5876{inst}/readyz") != 200:
            assert proc.poll() is None, (tmp_path / "daemon.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "daemon.log").read_text()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, (tmp_path / "daemon.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
