"""`bench.daemons.wait_ready_line`, which every harness that starts a worker waits with:
tiny `python -c` workers that print the ready line, exit before it, or never print it.
No Redis; each case takes well under a second."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from bench.daemons import wait_ready_line

READY = 'print(\'{"event": "ready", "pid": 1}\', flush=True)'


@contextmanager
def _worker(code: str) -> Iterator[subprocess.Popen[bytes]]:
    """The worker; afterwards killed, reaped, its stdout reader finished and the pipe
    closed (so nothing is left for filterwarnings=error to find)."""
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        yield p
    finally:
        p.kill()
        p.wait()
        for t in threading.enumerate():
            if t.name == f"ready-line-{p.pid}":
                t.join(5)  # EOF now that the worker is gone
        assert p.stdout is not None
        p.stdout.close()


def test_returns_once_the_worker_is_ready_and_keeps_draining_its_stdout() -> None:
    # after the ready line the worker writes more than a pipe holds (64 KiB): it only
    # finishes if wait_ready_line's reader keeps draining
    with _worker(f"import sys, time; {READY}; time.sleep(0.2); "
                 "sys.stdout.write('x' * 1_000_000); sys.stdout.flush()") as p:
        wait_ready_line(p, 10)
        assert p.wait(10) == 0


def test_a_worker_that_exits_first_is_an_error_not_a_hang() -> None:
    with _worker("import sys; print('starting'); sys.exit(3)") as p, \
            pytest.raises(RuntimeError, match=r"exited \(3\) before it was ready"):
        wait_ready_line(p, 10)


def test_a_worker_that_never_gets_ready_is_an_error_after_the_timeout() -> None:
    with _worker("import time; print('starting', flush=True); time.sleep(30)") as p:
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="not ready within 1 s"):
            wait_ready_line(p, 1.0)
        assert time.monotonic() - t0 < 5
