"""A redis-server the test owns: its own loopback port and directory, no persistence,
started with whatever settings the test needs (maxmemory, an evicting policy) and
killed by pid. Only such a server may be FLUSHALLed or restarted empty."""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

needs_redis_server = pytest.mark.skipif(shutil.which("redis-server") is None,
                                        reason="redis-server is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_cluster_port() -> int:
    """A free port P whose cluster bus port P + 10000 is free too."""
    for _ in range(200):
        p = random.randrange(20000, 45000)
        try:
            for q in (p, p + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", q))
        except OSError:
            continue
        return p
    raise RuntimeError("no free port pair")


class OwnRedis:
    def __init__(self, dir_: Path, *args: str, port: int | None = None) -> None:
        self.dir = dir_
        self.args = list(args)
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout: float = 10.0) -> None:
        assert self.proc is None or self.proc.poll() is not None
        self.starts += 1
        with open(self.dir / f"redis-{self.starts}.log", "wb") as out:
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                 "--dir", str(self.dir), "--save", "", "--appendonly", "no",
                 "--protected-mode", "no", *self.args],
                stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited {self.proc.returncode}")
            c = redis.Redis(port=self.port, socket_connect_timeout=0.5, socket_timeout=1)
            try:
                if c.ping():
                    return
            except redis.RedisError:
                pass
            finally:
                c.close()
            time.sleep(0.02)
        raise RuntimeError(f"redis-server not up in {timeout}s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


@contextlib.contextmanager
def own_redis(dir_: Path, *args: str) -> Iterator[OwnRedis]:
    dir_.mkdir(parents=True, exist_ok=True)
    srv = OwnRedis(dir_, *args)
    srv.start()
    try:
        yield srv
    finally:
        srv.kill()


class SentinelGroup:
    """A real sentinel deployment the test owns: a master, one replica (``--replicaof``)
    and three sentinels (``redis-server <conf> --sentinel``, quorum 2) monitoring it as
    `MASTER`, each on a free loopback port with its own directory, killed by pid.
    `url` is the ``redis+sentinel://`` URL of the group."""

    MASTER = "m"

    def __init__(self, dir_: Path, *, down_after_ms: int = 1000,
                 failover_timeout_ms: int = 4000) -> None:
        self.dir = dir_
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        master_dir = dir_ / "master"
        master_dir.mkdir(parents=True, exist_ok=True)
        fast = ("--repl-diskless-sync-delay", "0")  # a replica syncs at once
        self.master = OwnRedis(master_dir, *fast)
        replica_dir = dir_ / "replica"
        replica_dir.mkdir(parents=True, exist_ok=True)
        self.replica = OwnRedis(replica_dir, *fast, "--replicaof", "127.0.0.1",
                                str(self.master.port))
        self.servers = [self.master, self.replica]
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        self.url = f"redis+sentinel://{hosts}/{self.MASTER}"

    # a sentinel refreshes a replica's link status from INFO every 10 s: a first look
    # taken while the replica was still syncing stands for up to 10 s more, after the
    # up-to-10 s it takes to discover the replica from the master's INFO
    SETTLE_S = 40.0

    def start(self, timeout: float = SETTLE_S) -> None:
        self.master.start()
        self.replica.start()
        for i, port in enumerate(self.sentinel_ports):
            d = self.dir / f"sentinel-{i}"
            d.mkdir(parents=True, exist_ok=True)
            conf = d / "sentinel.conf"  # sentinel rewrites its config: one file each
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {d}\n"
                f"sentinel monitor {self.MASTER} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {self.MASTER} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.MASTER} {self.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {self.MASTER} 1\n")
            with open(d / "sentinel.log", "wb") as out:
                self.sentinels.append(subprocess.Popen(
                    ["redis-server", str(conf), "--sentinel"],
                    stdout=out, stderr=subprocess.STDOUT))
        self.wait_settled(timeout)

    def sentinel_client(self, i: int = 0) -> redis.Redis:
        return redis.Redis(port=self.sentinel_ports[i], socket_timeout=2,
                           socket_connect_timeout=1, decode_responses=True)

    def master_port(self, i: int = 0) -> int:
        """The master's port as sentinel `i` names it."""
        c = self.sentinel_client(i)
        try:
            addr = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.MASTER)
            return int(addr[1])
        finally:
            c.close()

    def server(self, port: int) -> OwnRedis:
        return next(s for s in self.servers if s.port == port)

    def wait_settled(self, timeout: float = SETTLE_S) -> None:
        """Until every sentinel names the same master, knows the two other sentinels
        and one replica that is up and linked to it (a failover can then be run)."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            for p in self.sentinels:
                if p.poll() is not None:
                    raise RuntimeError(f"a sentinel exited {p.returncode}")
            try:
                last = [self._state(i) for i in range(3)]
            except redis.RedisError as e:
                last = e
            else:
                masters = {m for m, _, _ in last}  # type: ignore[attr-defined]
                if len(masters) == 1 and all(o == 2 and ok for _, o, ok in last):  # type: ignore[attr-defined]
                    return
            time.sleep(0.05)
        raise RuntimeError(f"sentinel group not settled in {timeout}s: {last}")

    def _state(self, i: int) -> tuple[int, int, bool]:
        c = self.sentinel_client(i)
        try:
            m = c.execute_command("SENTINEL", "MASTER", self.MASTER)
            info = dict(zip(m[::2], m[1::2], strict=False)) if isinstance(m, list) else m
            replicas = c.execute_command("SENTINEL", "REPLICAS", self.MASTER)
        finally:
            c.close()
        ok = False
        for r in replicas:
            ri = dict(zip(r[::2], r[1::2], strict=False)) if isinstance(r, list) else r
            flags = str(ri.get("flags", ""))
            if ("s_down" not in flags and "disconnected" not in flags
                    and ri.get("master-link-status") == "ok"):
                ok = True
        flags = str(info.get("flags", ""))
        if "s_down" in flags or "o_down" in flags or "failover" in flags:
            ok = False
        return int(info["port"]), int(info["num-other-sentinels"]), ok

    def wait_master_not(self, port: int, timeout: float = 20.0) -> int:
        """Until every sentinel names a master other than `port`; returns the new one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ports = {self.master_port(i) for i in range(3)}
            except redis.RedisError:
                ports = set()
            if len(ports) == 1 and port not in ports:
                return ports.pop()
            time.sleep(0.05)
        raise RuntimeError(f"no failover away from {port} in {timeout}s")

    def failover(self) -> None:
        """SENTINEL FAILOVER (a coordinated one: the master is demoted, not killed)."""
        c = self.sentinel_client()
        try:
            c.execute_command("SENTINEL", "FAILOVER", self.MASTER)
        finally:
            c.close()

    def stop(self) -> None:
        for p in self.sentinels:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        for s in self.servers:
            s.kill()


@contextlib.contextmanager
def sentinel_group(dir_: Path, **kw: int) -> Iterator[SentinelGroup]:
    dir_.mkdir(parents=True, exist_ok=True)
    g = SentinelGroup(dir_, **kw)
    try:
        g.start()
        yield g
    finally:
        g.stop()
needs_redis_cluster = pytest.mark.skipif(
    shutil.which("redis-server") is None or shutil.which("redis-cli") is None,
    reason="redis-server / redis-cli is not installed")


class OwnCluster:
    """A Redis Cluster of `masters` masters (and `replicas` replicas each) on free
    loopback ports, one `OwnRedis` per node in its own directory; stopped by pid.

    `node_timeout_ms` is cluster-node-timeout: how long a master may be silent
    before its replica is promoted (small, so a failover test is quick)."""

    def __init__(self, dir_: Path, masters: int = 3, replicas: int = 0,
                 node_timeout_ms: int = 1000) -> None:
        self.dir = dir_
        self.nodes: list[OwnRedis] = []
        for i in range(masters * (1 + replicas)):
            d = dir_ / f"n{i}"
            d.mkdir(parents=True, exist_ok=True)
            self.nodes.append(OwnRedis(
                d, "--cluster-enabled", "yes", "--cluster-config-file", str(d / "nodes.conf"),
                "--cluster-node-timeout", str(node_timeout_ms),
                "--cluster-require-full-coverage", "no", port=free_cluster_port()))
        self.masters = masters
        self.replicas = replicas
        self.want_replicas = replicas  # wait_ok waits for this many per master

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:3])

    def by_port(self, port: int) -> OwnRedis:
        return next(n for n in self.nodes if n.port == port)

    def start(self, timeout: float = 30.0) -> None:
        for n in self.nodes:
            for attempt in range(3):  # a port found free may be taken before it binds
                try:
                    n.start()
                    break
                except RuntimeError:
                    if attempt == 2:
                        raise
                    n.port = free_cluster_port()
                    n.url = f"redis://127.0.0.1:{n.port}/0"
        addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
        subprocess.run(["redis-cli", "--cluster", "create", *addrs,
                        "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                       check=True, capture_output=True, timeout=timeout)
        self.wait_ok(timeout)

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every live node says cluster_state:ok and agrees on the masters."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self._ok(n) for n in self.nodes if n.proc and n.proc.poll() is None):
                return
            time.sleep(0.05)
        raise RuntimeError(f"cluster not ok within {timeout}s")

    def _ok(self, n: OwnRedis) -> bool:
        c = redis.Redis(port=n.port, socket_timeout=1)
        try:
            info = c.execute_command("CLUSTER", "INFO")
            text = info.decode() if isinstance(info, bytes) else str(info)
            if "cluster_state:ok" not in text:
                return False
            slots = c.execute_command("CLUSTER", "SLOTS")
            # each range: lo, hi, master, replicas...; right after create, replicas join late
            return (sum(int(s[1]) - int(s[0]) + 1 for s in slots) == 16384
                    and all(len(s) - 3 >= self.want_replicas for s in slots))
        except redis.RedisError:
            return False
        finally:
            c.close()

    def master_of(self, key: str) -> OwnRedis:
        """The node serving `key`'s slot now (asked of any live node)."""
        for n in self.nodes:
            if n.proc is None or n.proc.poll() is not None:
                continue
            c = redis.Redis(port=n.port, socket_timeout=1)
            try:
                slot = int(c.execute_command("CLUSTER", "KEYSLOT", key))
                for lo, hi, master, *_ in c.execute_command("CLUSTER", "SLOTS"):
                    if int(lo) <= slot <= int(hi):
                        return self.by_port(int(master[1]))
            except redis.RedisError:
                continue
            finally:
                c.close()
        raise RuntimeError("no live node answers")

    def node_id(self, n: OwnRedis) -> str:
        c = redis.Redis(port=n.port, socket_timeout=2)
        try:
            return str(c.execute_command("CLUSTER", "MYID").decode())
        finally:
            c.close()

    def migrate_slot(self, key: str, dst: OwnRedis, batch: int = 10,
                     pause_s: float = 0.0) -> int:
        """Move `key`'s slot to `dst` the way redis-cli --cluster reshard moves each
        slot: IMPORTING/MIGRATING, MIGRATE the keys `batch` at a time (sleeping
        `pause_s` between batches, so a busy queue runs across it), then SETSLOT NODE
        on every master. Returns how many keys moved."""
        src = self.master_of(key)
        assert src is not dst
        s = redis.Redis(port=src.port, socket_timeout=10)
        d = redis.Redis(port=dst.port, socket_timeout=10)
        try:
            slot = int(s.execute_command("CLUSTER", "KEYSLOT", key))
            src_id, dst_id = self.node_id(src), self.node_id(dst)
            d.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
            s.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
            moved = 0
            while True:
                keys = s.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch)
                if not keys:
                    break
                s.execute_command("MIGRATE", "127.0.0.1", dst.port, "", 0, 5000,
                                  "KEYS", *keys)
                moved += len(keys)
                if pause_s:
                    time.sleep(pause_s)
            for n in self.nodes:
                if n.proc is None or n.proc.poll() is not None:
                    continue
                c = redis.Redis(port=n.port, socket_timeout=2)
                try:
                    c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
                except redis.ResponseError:
                    pass  # a replica
                finally:
                    c.close()
            return moved
        finally:
            s.close()
            d.close()

    def stop(self) -> None:
        for n in self.nodes:
            n.kill()


@contextlib.contextmanager
def own_cluster(dir_: Path, masters: int = 3, replicas: int = 0) -> Iterator[OwnCluster]:
    dir_.mkdir(parents=True, exist_ok=True)
    c = OwnCluster(dir_, masters, replicas)
    try:
        c.start()
        yield c
    finally:
        c.stop()
