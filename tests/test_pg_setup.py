"""A PostgreSQL DSN naming a database or role that does not exist: `jobqd run` and
`jobqd migrate` say which, and what to create, in one line, and exit CONFIG (78);
a PostgreSQL that does not answer is UNAVAILABLE (69) for `migrate`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from jobqd.exitcodes import ExitCode
from tests.conftest import PG_DSN, ROOT, DaemonProcess

BASE = PG_DSN.rsplit("/", 1)[0]  # postgresql://postgres@127.0.0.1:5432


def _missing_db() -> tuple[str, str]:
    name = f"jobqd_missing_{uuid.uuid4().hex[:8]}"
    return f"{BASE}/{name}", f"createdb {name}"


def _missing_role() -> tuple[str, str]:
    role = f"jobqd_norole_{uuid.uuid4().hex[:8]}"
    rest = PG_DSN.split("@", 1)[1]
    return f"postgresql://{role}@{rest}", f"createuser {role}"


CASES = {"database": _missing_db, "role": _missing_role}


def _migrate(config_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "jobqd", "-c", str(config_path), "migrate"],
                          capture_output=True, text=True, env=env, timeout=60, check=False)


@pytest.mark.parametrize("what", sorted(CASES))
def test_migrate_names_what_to_create(what: str, write_config: Callable[..., Path]) -> None:
    dsn, fix = CASES[what]()
    proc = _migrate(write_config(postgres={"dsn": dsn}))
    assert proc.returncode == ExitCode.CONFIG, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert what in lines[0] and fix in lines[0], lines[0]
    assert proc.stdout == ""


@pytest.mark.parametrize("what", sorted(CASES))
def test_run_names_what_to_create(what: str, write_config: Callable[..., Path],
                                  spawn: Callable[[Path], DaemonProcess]) -> None:
    dsn, fix = CASES[what]()
    d = spawn(write_config(postgres={"dsn": dsn}))
    code = d.wait(60)
    out = d.log()
    assert code == ExitCode.CONFIG, out
    assert "Traceback" not in out, out
    lines = [ln for ln in out.splitlines() if fix in ln]
    assert len(lines) == 1 and what in lines[0], out


def test_migrate_with_postgres_down_is_unavailable(write_config: Callable[..., Path]) -> None:
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _migrate(write_config(postgres={"dsn": f"postgresql://postgres@127.0.0.1:{port}/x"}))
    assert proc.returncode == ExitCode.UNAVAILABLE, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0], proc.stderr
