"""A small, dependency-free client for the systemd notify protocol.

See sd_notify(3) and sd_watchdog_enabled(3).  The service manager passes the
address of a unix datagram socket in ``NOTIFY_SOCKET``; the daemon sends
newline-separated ``KEY=VALUE`` assignments to it, one datagram per message:

* ``READY=1`` once startup is complete (``Type=notify`` waits for it),
* ``RELOADING=1`` + ``MONOTONIC_USEC=...`` when a reload starts, and ``READY=1``
  again when it is done,
* ``STOPPING=1`` when shutdown (drain) begins,
* ``STATUS=...`` free-form text shown by ``systemctl status``,
* ``WATCHDOG=1`` keep-alive pings when ``WatchdogSec=`` is set.

Everything here is a no-op when ``NOTIFY_SOCKET`` is unset (not started by
systemd, or started by a test), and sending never raises into the caller: a
daemon must not crash because its supervisor went away.  The first failure is
logged as a warning, later ones at debug level.

Like libsystemd, a fresh socket is used for each message: there is nothing to
close, nothing to leak, and nothing that breaks across ``fork()``.  The socket
is non-blocking, so a full notification queue in PID 1 costs a dropped
message (logged), never a stalled event loop.

The watchdog pinger, :func:`run_watchdog`, runs *on the event loop* on
purpose: if the loop is wedged (a blocking call, a busy loop), the pings stop
and systemd restarts the daemon, which is exactly what the watchdog is for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

__all__ = ["Notifier", "run_watchdog"]

log = logging.getLogger(__name__)


def _parse_address(raw: str | None) -> str | bytes | None:
    """Turn ``NOTIFY_SOCKET`` into a ``sendto`` address, or None if unusable.

    ``/path`` is a filesystem socket; ``@name`` is a socket in the Linux
    abstract namespace (the ``@`` stands for a leading NUL byte).  Anything
    else (empty, relative, or a transport we do not speak such as ``vsock:``)
    disables notification.
    """
    if not raw:
        return None
    if raw.startswith("@"):
        if len(raw) < 2:
            return None
        return b"\0" + raw[1:].encode("utf-8", "surrogateescape")
    if raw.startswith("/"):
        return raw
    log.warning("NOTIFY_SOCKET=%r is not an absolute path or @abstract name; ignoring it", raw)
    return None


def _parse_watchdog(environ: Mapping[str, str]) -> int | None:
    """Return the watchdog timeout in microseconds if it applies to this process."""
    raw_usec = environ.get("WATCHDOG_USEC")
    if not raw_usec:
        return None
    try:
        usec = int(raw_usec)
    except ValueError:
        log.warning("ignoring unparsable WATCHDOG_USEC=%r", raw_usec)
        return None
    if usec <= 0:
        return None
    raw_pid = environ.get("WATCHDOG_PID")
    if raw_pid:
        try:
            pid = int(raw_pid)
        except ValueError:
            log.warning("ignoring watchdog: unparsable WATCHDOG_PID=%r", raw_pid)
            return None
        if pid != os.getpid():
            # The watchdog is meant for another process (e.g. we were forked
            # or exec'd by the real main process): do not ping on its behalf.
            return None
    return usec


def _one_line(text: str) -> str:
    # A newline would end the assignment and start a new one: STATUS text
    # must never be able to inject e.g. "READY=1" or "WATCHDOG=trigger".
    return " ".join(text.splitlines())


class Notifier:
    """Sends sd_notify messages to the socket named by ``NOTIFY_SOCKET``.

    ``Notifier()`` reads ``os.environ``; pass a mapping to read another
    environment (tests).  The environment is read once, at construction.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env: Mapping[str, str] = os.environ if environ is None else environ
        self._address = _parse_address(env.get("NOTIFY_SOCKET"))
        self._watchdog_usec = _parse_watchdog(env) if self._address is not None else None
        self._warned = False

    @property
    def enabled(self) -> bool:
        """True when there is a notify socket to talk to."""
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """Seconds between watchdog pings: half of ``WATCHDOG_USEC``.

        None when the watchdog is not enabled for this process: no
        ``WATCHDOG_USEC`` (or not a positive integer), ``WATCHDOG_PID`` naming
        another process, or no ``NOTIFY_SOCKET`` to send pings to.
        """
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments in one datagram.

        Returns True if the datagram was handed to the kernel, False if
        notification is disabled or sending failed.  Never raises.
        """
        if self._address is None or not assignments:
            return False
        payload = "\n".join(assignments).encode("utf-8", "surrogateescape")
        try:
            with socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            ) as sock:
                sock.sendto(payload, self._address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning(
                    "cannot send notification to NOTIFY_SOCKET (%s); "
                    "further failures are logged at debug level",
                    exc,
                )
            else:
                log.debug("cannot send notification to NOTIFY_SOCKET: %s", exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Startup (or a reload) is complete."""
        if status is None:
            return self.notify("READY=1")
        return self.notify("READY=1", f"STATUS={_one_line(status)}")

    def reloading(self) -> bool:
        """A configuration reload has started; call :meth:`ready` when done.

        ``MONOTONIC_USEC`` (CLOCK_MONOTONIC in microseconds) is what systemd
        >= 253 requires with ``Type=notify-reload``; older versions ignore it.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        """Shutdown has begun."""
        return self.notify("STOPPING=1")

    def status(self, text: str) -> bool:
        """Free-form status line for ``systemctl status``."""
        return self.notify(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        """Watchdog keep-alive ping."""
        return self.notify("WATCHDOG=1")


async def run_watchdog(
    notifier: Notifier,
    stop: asyncio.Event,
    status_fn: Callable[[], str] | None = None,
) -> None:
    """Ping the watchdog every ``notifier.watchdog_interval_s`` until *stop* is set.

    The first ping is sent at once.  When *status_fn* is given, each ping also
    carries ``STATUS=<status_fn()>`` (in the same datagram); an exception in
    *status_fn* is logged and the ping is sent without a status, so a bug in a
    status line can never get the daemon killed by its watchdog.

    Returns at once when the watchdog is not enabled (including when
    ``NOTIFY_SOCKET`` is unset).
    """
    interval = notifier.watchdog_interval_s
    if interval is None:
        return
    loop = asyncio.get_running_loop()
    status_failed = False
    deadline = loop.time()
    while not stop.is_set():
        assignments = ["WATCHDOG=1"]
        if status_fn is not None:
            try:
                assignments.append(f"STATUS={_one_line(status_fn())}")
            except Exception:
                if not status_failed:
                    status_failed = True
                    log.exception("watchdog status function failed; pinging without status")
        notifier.notify(*assignments)

        # Schedule on a fixed grid so pings do not drift; if the loop was
        # stalled past a whole period, restart the grid from now rather than
        # sending a burst of catch-up pings.
        now = loop.time()
        deadline += interval
        if deadline <= now:
            deadline = now + interval
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=deadline - now)
