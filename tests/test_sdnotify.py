"""Tests for jobqd.sdnotify against real unix datagram sockets owned by the test."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobqd.sdnotify import Notifier, run_watchdog

_ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The test runner itself may run under systemd (NOTIFY_SOCKET inherited
    # from a unit): never let a test talk to the real service manager.
    for name in _ENV_VARS:
        monkeypatch.delenv(name, raising=False)


def _bind(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    sock.bind(address)
    sock.settimeout(2.0)
    return sock


@pytest.fixture
def receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket bound in tmp_path, advertised through NOTIFY_SOCKET."""
    path = tmp_path / "notify.sock"
    short_dir: str | None = None
    if len(os.fsencode(path)) > 100:  # sun_path is 108 bytes including the NUL
        short_dir = tempfile.mkdtemp(prefix="sdn-", dir="/tmp")
        path = Path(short_dir) / "n.sock"
    sock = _bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    try:
        yield sock
    finally:
        sock.close()
        if short_dir is not None:
            path.unlink(missing_ok=True)
            os.rmdir(short_dir)


def _fields(datagram: bytes) -> dict[str, str]:
    text = datagram.decode()
    out: dict[str, str] = {}
    for line in text.split("\n"):
        key, sep, value = line.partition("=")
        assert sep == "=", f"malformed assignment {line!r} in {text!r}"
        assert key not in out, f"duplicate {key} in {text!r}"
        out[key] = value
    return out


def _assert_nothing_pending(sock: socket.socket) -> None:
    sock.setblocking(False)
    try:
        with pytest.raises(BlockingIOError):
            sock.recv(4096)
    finally:
        sock.settimeout(2.0)


# --- one-shot messages ------------------------------------------------------


def test_ready_without_status(receiver: socket.socket) -> None:
    n = Notifier()
    assert n.enabled
    assert n.ready() is True
    assert receiver.recv(4096) == b"READY=1"


def test_ready_with_status_is_one_datagram(receiver: socket.socket) -> None:
    assert Notifier().ready("serving 3 queues") is True
    assert _fields(receiver.recv(4096)) == {"READY": "1", "STATUS": "serving 3 queues"}
    _assert_nothing_pending(receiver)


def test_stopping_status_watchdog(receiver: socket.socket) -> None:
    n = Notifier()
    assert n.stopping()
    assert n.status("draining: 4 jobs in flight")
    assert n.watchdog()
    assert receiver.recv(4096) == b"STOPPING=1"
    assert receiver.recv(4096) == b"STATUS=draining: 4 jobs in flight"
    assert receiver.recv(4096) == b"WATCHDOG=1"


def test_status_newlines_cannot_inject_assignments(receiver: socket.socket) -> None:
    Notifier().status("ok\nREADY=1\r\nWATCHDOG=trigger")
    got = _fields(receiver.recv(4096))
    assert list(got) == ["STATUS"]
    assert "\n" not in got["STATUS"]


def test_status_utf8(receiver: socket.socket) -> None:
    Notifier().status("file d'attente: 3 tâches")
    assert receiver.recv(4096).decode("utf-8") == "STATUS=file d'attente: 3 tâches"


def test_reloading_sends_monotonic_usec(receiver: socket.socket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert Notifier().reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    raw = receiver.recv(4096)
    fields = _fields(raw)
    assert list(fields) == ["RELOADING", "MONOTONIC_USEC"]
    assert fields["RELOADING"] == "1"
    usec = fields["MONOTONIC_USEC"]
    # A plain decimal integer in microseconds of CLOCK_MONOTONIC (not
    # realtime, not seconds, not a float).
    assert usec.isdigit(), raw
    assert before <= int(usec) <= after


def test_abstract_namespace_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"jobqd-test-{uuid.uuid4().hex}"
    sock = _bind(b"\0" + name.encode())
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert Notifier().ready("abstract") is True
        assert _fields(sock.recv(4096)) == {"READY": "1", "STATUS": "abstract"}
    finally:
        sock.close()


def test_environment_read_at_construction(
    receiver: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = Notifier()
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert n.watchdog()
    assert receiver.recv(4096) == b"WATCHDOG=1"


def test_explicit_environ_mapping(receiver: socket.socket) -> None:
    addr = os.environ["NOTIFY_SOCKET"]
    n = Notifier({"NOTIFY_SOCKET": addr, "WATCHDOG_USEC": "3000000"})
    assert n.watchdog_interval_s == pytest.approx(1.5)
    assert n.stopping()
    assert receiver.recv(4096) == b"STOPPING=1"


# --- disabled / failing -----------------------------------------------------


def test_unset_notify_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_socket(*args: object, **kwargs: object) -> socket.socket:
        raise AssertionError("a socket was created with NOTIFY_SOCKET unset")

    monkeypatch.setattr(socket, "socket", no_socket)  # the module sdnotify uses
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    n = Notifier()
    assert not n.enabled
    assert n.watchdog_interval_s is None
    assert n.ready("x") is False
    assert n.reloading() is False
    assert n.stopping() is False
    assert n.status("x") is False
    assert n.watchdog() is False


@pytest.mark.parametrize("value", ["", "relative/path.sock", "@", "vsock:2:1234"])
def test_unusable_notify_socket_disables(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    n = Notifier()
    assert not n.enabled
    assert n.ready() is False


def test_send_failure_never_raises_and_warns_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    n = Notifier()
    assert n.enabled
    with caplog.at_level(logging.DEBUG, logger="jobqd.sdnotify"):
        assert n.ready() is False
        assert n.watchdog() is False
        assert n.status("still fine") is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, caplog.text
    assert "NOTIFY_SOCKET" in warnings[0].getMessage()
    assert sum(r.levelno == logging.DEBUG for r in caplog.records) == 2


def test_full_receiver_queue_does_not_block(
    receiver: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    # Nobody reads the receiver: the sender must get EAGAIN, not block.
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
    n = Notifier()
    t0 = time.monotonic()
    results = [n.status("x" * 512) for _ in range(2000)]
    assert time.monotonic() - t0 < 5
    assert results[0] is True
    assert False in results
    assert sum(r.levelno == logging.WARNING for r in caplog.records) == 1


# --- watchdog configuration -------------------------------------------------


def test_watchdog_interval_is_half_of_usec(
    receiver: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert Notifier().watchdog_interval_s == pytest.approx(15.0)


def test_watchdog_pid_matching_enables(
    receiver: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert Notifier().watchdog_interval_s == pytest.approx(0.1)


def test_watchdog_pid_mismatch_disables(
    receiver: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    n = Notifier()
    assert n.watchdog_interval_s is None
    # Only the watchdog is meant for another process; other messages still go.
    assert n.ready()
    assert receiver.recv(4096) == b"READY=1"


@pytest.mark.parametrize("usec", [None, "", "0", "-5", "soon", "1.5e6"])
def test_watchdog_usec_unset_or_invalid(
    usec: str | None, receiver: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    assert Notifier().watchdog_interval_s is None


# --- watchdog loop ----------------------------------------------------------


async def _collect(
    sock: socket.socket, out: list[tuple[float, dict[str, str]]], stop: asyncio.Event
) -> None:
    """Every datagram until `stop`, timestamped. Polled: a sock_recv cancelled by a
    timeout can take a datagram with it (seen on Python 3.12: one ping missing)."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    while not stop.is_set():
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            await asyncio.sleep(0.002)
            continue
        out.append((loop.time(), _fields(data)))


@pytest.mark.asyncio
async def test_watchdog_loop_pings_every_half_period_and_stops(
    receiver: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # 200 ms -> ping every 100 ms
    n = Notifier()
    assert n.watchdog_interval_s == pytest.approx(0.1)

    got: list[tuple[float, dict[str, str]]] = []
    stop = asyncio.Event()
    collector_stop = asyncio.Event()
    collector = asyncio.create_task(_collect(receiver, got, collector_stop))
    loop = asyncio.get_running_loop()
    started = loop.time()
    pinger = asyncio.create_task(run_watchdog(n, stop))
    await asyncio.sleep(0.55)
    stop.set()
    stopped_at = loop.time()
    await asyncio.wait_for(pinger, timeout=1.0)
    assert loop.time() - stopped_at < 0.05, "run_watchdog did not return promptly"
    await asyncio.sleep(0.25)  # anything sent after stop would arrive by now
    collector_stop.set()
    await collector

    assert all(f == {"WATCHDOG": "1"} for _, f in got), got
    times = [t for t, _ in got]
    # Pings at ~0, 100, ..., 500 ms: 6 expected; allow scheduling slack.
    assert 5 <= len(times) <= 7, times
    assert times[0] - started < 0.05, "first ping should be immediate"
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(0.05 < g < 0.2 for g in gaps), gaps
    assert sum(gaps) / len(gaps) == pytest.approx(0.1, abs=0.02)
    assert times[-1] <= stopped_at + 0.02, "pinged after stop was set"


@pytest.mark.asyncio
async def test_watchdog_loop_sends_status_each_ping(
    receiver: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # ping every 50 ms
    calls = 0

    def status() -> str:
        nonlocal calls
        calls += 1
        return f"tick {calls}\nsecond line"

    got: list[tuple[float, dict[str, str]]] = []
    stop, collector_stop = asyncio.Event(), asyncio.Event()
    collector = asyncio.create_task(_collect(receiver, got, collector_stop))
    pinger = asyncio.create_task(run_watchdog(Notifier(), stop, status))
    await asyncio.sleep(0.22)
    stop.set()
    await asyncio.wait_for(pinger, timeout=1.0)
    await asyncio.sleep(0.1)
    collector_stop.set()
    await collector

    assert len(got) == calls >= 3
    for i, (_, fields) in enumerate(got, start=1):
        assert fields == {"WATCHDOG": "1", "STATUS": f"tick {i} second line"}


@pytest.mark.asyncio
async def test_watchdog_loop_survives_failing_status_fn(
    receiver: socket.socket, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "100000")

    def broken() -> str:
        raise RuntimeError("boom")

    got: list[tuple[float, dict[str, str]]] = []
    stop, collector_stop = asyncio.Event(), asyncio.Event()
    collector = asyncio.create_task(_collect(receiver, got, collector_stop))
    pinger = asyncio.create_task(run_watchdog(Notifier(), stop, broken))
    await asyncio.sleep(0.17)
    stop.set()
    await asyncio.wait_for(pinger, timeout=1.0)
    await asyncio.sleep(0.1)
    collector_stop.set()
    await collector

    assert len(got) >= 3
    assert all(f == {"WATCHDOG": "1"} for _, f in got)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, "status failure should be logged once, not every ping"


@pytest.mark.asyncio
async def test_blocked_event_loop_stops_pings(
    receiver: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The point of pinging from the event loop: a wedged loop means no pings,
    # so systemd's watchdog fires.  Also: no burst of catch-up pings after.
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # every 50 ms
    got: list[tuple[float, dict[str, str]]] = []
    stop, collector_stop = asyncio.Event(), asyncio.Event()
    pinger = asyncio.create_task(run_watchdog(Notifier(), stop))
    await asyncio.sleep(0.12)
    time.sleep(0.4)  # block the loop
    collector = asyncio.create_task(_collect(receiver, got, collector_stop))
    await asyncio.sleep(0.12)
    stop.set()
    await asyncio.wait_for(pinger, timeout=1.0)
    await asyncio.sleep(0.1)
    collector_stop.set()
    await collector

    # Datagrams arrive in send order; the receive timestamps are meaningless
    # for the ones queued while blocked, so count instead: ~3 before the
    # block (0, 50, 100 ms), then one on wake-up, then ~2 more in 120 ms.
    # A catch-up burst would add ~8.
    assert 4 <= len(got) <= 8, len(got)


@pytest.mark.asyncio
async def test_watchdog_loop_returns_at_once_when_disabled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # but no NOTIFY_SOCKET
    stop = asyncio.Event()
    await asyncio.wait_for(run_watchdog(Notifier(), stop), timeout=0.5)
    assert not stop.is_set()


@pytest.mark.asyncio
async def test_watchdog_loop_returns_at_once_on_pid_mismatch(
    receiver: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", "1" if os.getpid() != 1 else "2")
    await asyncio.wait_for(run_watchdog(Notifier(), asyncio.Event()), timeout=0.5)
    _assert_nothing_pending(receiver)
