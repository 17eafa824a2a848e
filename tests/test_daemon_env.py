"""The daemon's start-up faults that are the environment's, not a bug: a clear line
and a named exit code (see README's exit code table and systemd/jobqd.service)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

from jobqd.exitcodes import ExitCode
from tests.conftest import DaemonProcess


def test_http_port_in_use_is_one_line_and_exit_unavailable(
        write_config: Callable[..., Path], spawn: Callable[[Path], DaemonProcess]) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        d = spawn(write_config(http={"listen": f"127.0.0.1:{port}"}))
        code = d.wait(30)
        out = d.log()
    assert code == ExitCode.UNAVAILABLE, out
    assert "Traceback" not in out, out
    lines = [ln for ln in out.splitlines() if f"127.0.0.1:{port}" in ln]
    assert len(lines) == 1, out
    assert "in use" in lines[0], lines


