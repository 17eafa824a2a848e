"""Connecting to Redis: one server, a Redis Cluster, or a master found through
Sentinel. This is the one place a ``redis.url`` becomes a client (the daemon,
`Client`/`SyncClient`, the CLI, `publish`, the outbox relay and `recover`).

URL forms (``rediss`` instead of ``redis`` turns TLS on, for every connection):

* ``redis://[user:password@]host:port[/db]``, ``unix:///path/redis.sock`` — one server.
* ``redis+cluster://[user:password@]host:port[,host:port...]`` — a Redis Cluster;
  the nodes listed are where discovery starts (one is enough, more survive one
  being down). Cluster has no databases: a ``/db`` other than 0 is an error.
* ``redis+sentinel://[user:password@]host:port[,host:port...]/master_name[/db]`` —
  the master that the sentinels at those addresses name. The user and password
  are the master's; a password for the sentinels themselves goes in the query:
  ``?sentinel_password=...``.

redis-py's own cluster and sentinel clients do the routing and follow failovers
(`MOVED`/`ASK` redirects, a promoted replica); nothing here routes. One addition
for Sentinel: redis-py asks the sentinels for the master only when it opens a
connection, and drops an open one only when the old master answers READONLY,
which a master demoted by ``SENTINEL FAILOVER`` does only once Sentinel has
reconfigured it as a replica, seconds later; until then writes on open
connections land on the old master and are lost with its data. So a sentinel
client's pool asks the sentinels again at most every `RECHECK_S` when it hands
out a connection, and when the master moved it closes every connection, in use
or not (their commands fail with a connection error: a transient fault). A cluster
client is handed out typed as ``redis.asyncio.Redis``: both implement the same
command methods, and the few places that must behave differently on a cluster
(multi-key reads across queues, pipelines, pub/sub) ask `is_cluster`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Literal, cast
from urllib.parse import parse_qs, unquote

import redis
import redis.asyncio as aredis
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.asyncio.sentinel import SentinelConnectionPool as AsyncSentinelConnectionPool
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisError
from redis.sentinel import Sentinel, SentinelConnectionPool

log = logging.getLogger("jobqd.connect")

Kind = Literal["single", "cluster", "sentinel"]

SINGLE_SCHEMES = ("redis", "rediss", "unix")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379
SENTINEL_TIMEOUT_S = 2.0  # per sentinel asked, unless the caller's timeouts say otherwise
RECHECK_S = 0.5  # a sentinel client asks the sentinels for the master this often (at most)


class TargetError(ValueError):
    """A redis URL that names no usable deployment (the message says why)."""


@dataclass(frozen=True, slots=True)
class Target:
    """What a redis URL names."""

    kind: Kind
    url: str  # as given (for one server, handed to redis-py as is)
    nodes: tuple[tuple[str, int], ...] = ()  # cluster seed nodes or sentinels
    master: str = ""  # sentinel: the monitored master's name
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None
    ssl: bool = False


def _nodes(netloc: str, default_port: int) -> tuple[tuple[str, int], ...]:
    hosts = netloc.rsplit("@", 1)[-1]
    out = []
    for raw in hosts.split(","):
        part = raw.strip()
        if not part:
            raise TargetError("an empty host in the node list")
        if part.startswith("["):  # [ipv6]:port
            host, _, rest = part[1:].partition("]")
            port_s = rest[1:] if rest.startswith(":") else ""
        else:
            host, _, port_s = part.rpartition(":") if ":" in part else (part, "", "")
        try:
            port = int(port_s) if port_s else default_port
        except ValueError:
            raise TargetError(f"port must be a number, got {port_s!r} in {part!r}") from None
        if not host or not 0 < port < 65536:
            raise TargetError(f"not a host:port: {part!r}")
        out.append((host, port))
    return tuple(out)


def _credentials(netloc: str) -> tuple[str | None, str | None]:
    if "@" not in netloc:
        return None, None
    cred = netloc.rsplit("@", 1)[0]
    user, sep, pw = cred.partition(":")
    if not sep:  # redis://secret@host: redis-py reads a lone credential as the password
        return None, unquote(user) or None
    return unquote(user) or None, unquote(pw) or None


def parse(url: str) -> Target:
    """The deployment `url` names; `TargetError` says what is wrong with it."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in SINGLE_SCHEMES:
        return Target("single", url, ssl=scheme == "rediss")
    if scheme not in CLUSTER_SCHEMES + SENTINEL_SCHEMES:
        raise TargetError(f"scheme must be redis://, rediss://, unix://, redis+cluster://, "
                          f"redis+sentinel:// (or rediss+...) or the word embedded, got {url!r}")
    # urlsplit cannot take several hosts; split by hand
    rest = url.split("://", 1)[1]
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    username, password = _credentials(netloc)
    params = {k: v[-1] for k, v in parse_qs(query).items()}
    ssl = scheme.startswith("rediss")
    parts = [p for p in path.split("/") if p]
    if scheme in CLUSTER_SCHEMES:
        nodes = _nodes(netloc, DEFAULT_PORT)
        if parts and parts != ["0"]:
            raise TargetError(f"a Redis Cluster has only database 0, got /{'/'.join(parts)}")
        if params:
            raise TargetError(f"unknown option(s) for redis+cluster://: {', '.join(params)}")
        return Target("cluster", url, nodes, username=username, password=password, ssl=ssl)
    nodes = _nodes(netloc, DEFAULT_SENTINEL_PORT)
    if not parts:
        raise TargetError("redis+sentinel:// needs the master's name: "
                          "redis+sentinel://host:26379[,host:port...]/master_name[/db]")
    master = unquote(parts[0])
    db = 0
    if len(parts) > 1:
        if len(parts) > 2 or not parts[1].isdigit():
            raise TargetError(f"after the master's name only a database number may follow, "
                              f"got /{'/'.join(parts[1:])}")
        db = int(parts[1])
    sentinel_password = params.pop("sentinel_password", None)
    if params:
        raise TargetError(f"unknown option(s) for redis+sentinel://: {', '.join(params)}")
    return Target("sentinel", url, nodes, master=master, db=db, username=username,
                  password=password, sentinel_password=sentinel_password, ssl=ssl)


def check(url: str) -> str | None:
    """None if `url` parses, else why not (the config reader's check)."""
    try:
        parse(url)
    except TargetError as e:
        return str(e)
    return None


def _auth(t: Target) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if t.username is not None:
        out["username"] = t.username
    if t.password is not None:
        out["password"] = t.password
    if t.ssl:
        out["ssl"] = True
    return out


def _sentinel_kwargs(t: Target, options: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {k: v for k, v in options.items()
                           if k in ("socket_connect_timeout", "socket_timeout",
                                    "socket_keepalive")}
    # a sentinel that does not answer must not hold up a command (the next one is asked)
    for k in ("socket_connect_timeout", "socket_timeout"):
        if out.get(k) is None:
            out[k] = SENTINEL_TIMEOUT_S
    if t.sentinel_password is not None:
        out["password"] = t.sentinel_password
    if t.ssl:
        out["ssl"] = True
    return out


def _moved(pool: Any, old: Any, new: Any) -> bool:
    if new == old or old is None:
        return False
    log.warning("redis master %r moved from %s:%s to %s:%s (a sentinel failover): "
                "reconnecting", pool.service_name, *old, *new)
    return True


class _FollowingPool(AsyncSentinelConnectionPool):
    """A sentinel pool that notices a moved master on its own (see the module doc)."""

    _checked_at = 0.0

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        now = time.monotonic()
        if now - self._checked_at >= RECHECK_S:
            self._checked_at = now  # before the await: one check at a time
            await self._recheck()
        return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]

    async def _recheck(self) -> None:
        old = self.master_address
        if old is None:  # not connected yet: the first connection asks anyway
            return
        try:
            new = await self.sentinel_manager.discover_master(self.service_name)
        except (RedisError, OSError):  # no sentinel answers: keep the connections we have
            return
        if _moved(self, old, new):
            self.master_address = new
            await self.disconnect(inuse_connections=True)


class _FollowingSyncPool(SentinelConnectionPool):
    """`_FollowingPool` for the blocking client."""

    _checked_at = 0.0

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        now = time.monotonic()
        if now - self._checked_at >= RECHECK_S:
            self._checked_at = now
            self._recheck()
        return super().get_connection(*args, **kwargs)

    def _recheck(self) -> None:
        old = self.master_address
        if old is None:
            return
        try:
            new = self.sentinel_manager.discover_master(self.service_name)
        except (RedisError, OSError):
            return
        if _moved(self, old, new):
            self.proxy.master_address = new
            self.disconnect(inuse_connections=True)


def connect(url: str, **options: Any) -> aredis.Redis:
    """An asyncio client for `url` (see the module docstring); `options` go to
    every connection (timeouts, keepalive, decode_responses...)."""
    t = parse(url)
    if t.kind == "single":
        return aredis.Redis.from_url(url, **options)
    if t.kind == "cluster":
        options.pop("health_check_interval", None)  # cluster nodes check on use
        _fix_asking()
        # reinitialize_steps=0: a MOVED reply (slot migration, failover) patches the
        # slot map instead of, every 5th time, closing every connection of the client
        # -- blocking reads, the pub/sub channel and commands of other tasks mid-flight
        cluster = AsyncRedisCluster(startup_nodes=[AsyncClusterNode(h, p) for h, p in t.nodes],
                                    reinitialize_steps=0, **_auth(t), **options)
        return cast(aredis.Redis, cluster)
    sentinel = AsyncSentinel(list(t.nodes),  # type: ignore[no-untyped-call]
                             sentinel_kwargs=_sentinel_kwargs(t, options))
    master: aredis.Redis = sentinel.master_for(t.master, redis_class=aredis.Redis,
                                               connection_pool_class=_FollowingPool,
                                               db=t.db, **_auth(t), **options)
    return master


def _fix_asking() -> None:
    """redis-py's asyncio cluster node (8.1) follows an ASK redirect by sending ASKING
    and then the command as two separate commands, each on a connection taken from
    the front of the node's free list and put back at its end: with more than one
    idle connection the command goes out on a different connection than ASKING, the
    importing node answers MOVED back to the old owner, which answers ASK again...
    until "TTL exhausted". Every command on a key already moved fails for the whole
    slot migration. Taking the most recently released connection instead (LIFO)
    puts the command on ASKING's connection: nothing runs between the two. Applied
    once, when the first cluster client is made."""
    original = AsyncClusterNode.acquire_connection
    if getattr(original, "jobqd_lifo", False):
        return

    def acquire_last_released(self: AsyncClusterNode) -> Any:
        free = self._free
        if free:
            return free.pop()
        return original(self)

    acquire_last_released.jobqd_lifo = True  # type: ignore[attr-defined]
    AsyncClusterNode.acquire_connection = acquire_last_released  # type: ignore[method-assign]


def connect_sync(url: str, **options: Any) -> redis.Redis:
    """A blocking client for `url` (`SyncClient`, the CLI)."""
    t = parse(url)
    if t.kind == "single":
        return redis.Redis.from_url(url, **options)
    if t.kind == "cluster":
        options.pop("health_check_interval", None)
        seeds = [ClusterNode(h, p) for h, p in t.nodes]  # type: ignore[no-untyped-call]
        # as for the asyncio client: a MOVED reply patches the slot map (see connect)
        cluster = RedisCluster(startup_nodes=seeds, reinitialize_steps=0, **_auth(t),
                               **options)
        return cast(redis.Redis, cluster)
    sentinel = Sentinel(list(t.nodes),  # type: ignore[no-untyped-call]
                        sentinel_kwargs=_sentinel_kwargs(t, options))
    master: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        t.master, redis_class=redis.Redis, connection_pool_class=_FollowingSyncPool, db=t.db,
        **_auth(t), **options)
    return master


def is_cluster(r: object) -> bool:
    """Whether `r` is a Redis Cluster client (async or blocking)."""
    return isinstance(r, AsyncRedisCluster | RedisCluster)


async def primaries(r: aredis.Redis | AsyncRedisCluster) -> list[AsyncClusterNode]:
    """Every master of a Redis Cluster client (the slot map is loaded first if need
    be), for a command each must answer itself: pass one as ``target_nodes=``."""
    if not isinstance(r, AsyncRedisCluster):
        raise TypeError(f"not a Redis Cluster client: {type(r).__name__}")
    await r.initialize()
    return r.get_primaries()
