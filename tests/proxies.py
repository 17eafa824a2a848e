"""TCP proxies in front of Redis: `BlackholeProxy` cuts a daemon off from it,
`RewriteProxy` changes the commands a client sends (to make Redis itself answer as a
differently built server would)."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from typing import Any


class _Proxy:
    """A TCP proxy to Redis on a free loopback port: the listening socket, the accept
    loop, and close(). `_pumps(cs, ss)` gives the two forwarding loops of a new
    connection (client -> server, server -> client); None refuses it."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(64)
        self.lsock.settimeout(0.1)
        self.port = int(self.lsock.getsockname()[1])
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.closed = threading.Event()
        self.lock = threading.Lock()
        self.socks: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _pumps(self, cs: socket.socket, ss: socket.socket
               ) -> tuple[Callable[[], None], Callable[[], None]] | None:
        raise NotImplementedError

    def _refuse(self) -> bool:
        """Close new connections at once (the client cannot get through yet)."""
        return False

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                cs, _ = self.lsock.accept()
            except OSError:
                continue
            if self._refuse():
                cs.close()
                continue
            try:
                ss = socket.create_connection(("127.0.0.1", self.target_port), timeout=1)
            except OSError:  # the target is down: so is this connection
                cs.close()
                continue
            with self.lock:
                self.socks += [cs, ss]
            for pump in self._pumps(cs, ss) or ():
                t = threading.Thread(target=pump, daemon=True)
                t.start()
                self.threads.append(t)

    def close(self) -> None:
        self.closed.set()
        for t in self.threads:
            t.join(2)
        self.lsock.close()
        with self.lock:
            for sock in self.socks:
                sock.close()


class BlackholeProxy(_Proxy):
    """A TCP proxy to Redis. `blackhole()`: every connection open at that moment stops
    forwarding for good but is never closed (a dropped NAT/conntrack entry, a failed
    over address); connections opened afterwards work normally. While `gated` is set,
    new connections are closed at once (the client cannot get through yet)."""

    def __init__(self, target_port: int) -> None:
        self.gated = threading.Event()
        self.conns: list[list[Any]] = []  # [client sock, server sock, blackholed]
        super().__init__(target_port)

    def _refuse(self) -> bool:
        return self.gated.is_set()

    def _pumps(self, cs: socket.socket, ss: socket.socket
               ) -> tuple[Callable[[], None], Callable[[], None]]:
        conn = [cs, ss, False]
        with self.lock:
            self.conns.append(conn)
        return (lambda: self._pump(conn, cs, ss)), (lambda: self._pump(conn, ss, cs))

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


def _resp_command(buf: bytes) -> tuple[list[bytes], int] | None:
    """One RESP command (an array of bulk strings, as redis-py sends) from the start
    of `buf`, and its length in bytes; None until `buf` holds all of it."""
    end = buf.find(b"\r\n")
    if end < 0:
        return None
    if buf[:1] != b"*":
        raise ValueError(f"not a RESP array: {buf[:40]!r}")
    n, pos, args = int(buf[1:end]), end + 2, []
    for _ in range(n):
        end = buf.find(b"\r\n", pos)
        if end < 0:
            return None
        size = int(buf[pos + 1:end])
        start = end + 2
        if len(buf) < start + size + 2:
            return None
        args.append(buf[start:start + size])
        pos = start + size + 2
    return args, pos


def _resp_encode(args: list[bytes]) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


class RewriteProxy(_Proxy):
    """A TCP proxy to Redis that passes every command the client sends through
    `rewrite(args) -> args` (replies are forwarded untouched). Redis answers the
    rewritten command, so its reply keeps its place among pipelined ones."""

    def __init__(self, target_port: int, rewrite: Callable[[list[bytes]], list[bytes]]) -> None:
        self.rewrite = rewrite
        self.rewritten = 0  # commands that `rewrite` changed
        super().__init__(target_port)

    def _pumps(self, cs: socket.socket, ss: socket.socket
               ) -> tuple[Callable[[], None], Callable[[], None]]:
        return (lambda: self._commands(cs, ss)), (lambda: self._replies(ss, cs))

    def _recv(self, src: socket.socket) -> bytes | None:
        """Bytes from `src`; b"" on a timeout, None once it is closed."""
        try:
            return src.recv(65536) or None
        except TimeoutError:
            return b""
        except OSError:
            return None

    def _commands(self, src: socket.socket, dst: socket.socket) -> None:
        src.settimeout(0.1)
        buf = b""
        while not self.closed.is_set():
            data = self._recv(src)
            if data is None:
                break
            buf += data
            out = []
            while (got := _resp_command(buf)) is not None:
                args, size = got
                buf = buf[size:]
                new = self.rewrite(args)
                if new != args:
                    with self.lock:
                        self.rewritten += 1
                out.append(_resp_encode(new))
            try:
                dst.sendall(b"".join(out))
            except OSError:
                break
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def _replies(self, src: socket.socket, dst: socket.socket) -> None:
        src.settimeout(0.1)
        while not self.closed.is_set():
            data = self._recv(src)
            if data is None:
                break
            try:
                dst.sendall(data)
            except OSError:
                break
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
