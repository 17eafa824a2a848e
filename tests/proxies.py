"""A TCP proxy in front of Redis, for tests that cut a daemon off from it."""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Any


class BlackholeProxy:
    """A TCP proxy to Redis. `blackhole()`: every connection open at that moment stops
    forwarding for good but is never closed (a dropped NAT/conntrack entry, a failed
    over address); connections opened afterwards work normally. While `gated` is set,
    new connections are closed at once (the client cannot get through yet)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(64)
        self.lsock.settimeout(0.1)
        self.port = int(self.lsock.getsockname()[1])
        self.closed = threading.Event()
        self.gated = threading.Event()
        self.lock = threading.Lock()
        self.conns: list[list[Any]] = []  # [client sock, server sock, blackholed]
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                cs, _ = self.lsock.accept()
            except OSError:
                continue
            if self.gated.is_set():
                cs.close()
                continue
            try:
                ss = socket.create_connection(("127.0.0.1", self.target_port), timeout=1)
            except OSError:  # the target is down: so is this connection
                cs.close()
                continue
            conn = [cs, ss, False]
            with self.lock:
                self.conns.append(conn)
            for src, dst in ((cs, ss), (ss, cs)):
                t = threading.Thread(target=self._pump, args=(conn, src, dst), daemon=True)
                t.start()
                self.threads.append(t)

    def _pump(self, conn: list[Any], src: socket.socket, dst: socket.socket) -> None:
        src.settimeout(0.1)
        while not self.closed.is_set():
            try:
                data = src.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                if not conn[2]:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                break
            if not conn[2]:  # blackholed: swallowed, no reply ever comes back
                try:
                    dst.sendall(data)
                except OSError:
                    break

    def blackhole(self) -> int:
        with self.lock:
            for conn in self.conns:
                conn[2] = True
            return len(self.conns)

    def close(self) -> None:
        self.closed.set()
        for t in self.threads:
            t.join(2)
        self.lsock.close()
        with self.lock:
            for cs, ss, _ in self.conns:
                cs.close()
                ss.close()
