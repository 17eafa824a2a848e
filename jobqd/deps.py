"""The one classifier of dependency errors.

A component that talks to Redis or PostgreSQL asks here whether an exception
means "the dependency is unreachable or refusing" (log, back off, retry: never
crash the daemon for it) or "a bug" (let it crash loudly). Nothing else in the
package decides this by itself.
"""

from __future__ import annotations

import sys

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import (
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

_NETWORK = (OSError, ConnectionError, TimeoutError)  # socket-level, from either client
# redis-py's connection code, where a torn-down transport shows as a None attribute
_REDIS_CONNECTION = ("redis/asyncio/connection.py", "redis/connection.py")


def is_redis_transport_race(e: BaseException) -> bool:
    """A write on a connection that was torn down under it (the peer reset it, or a
    Redis Cluster reinitialisation disconnected it mid-connect) escapes redis-py
    (through 8.1.0) as AttributeError or TypeError about a None transport part
    ("'NoneType' object has no attribute 'writelines'") instead of ConnectionError:
    redis/redis-py#4287 and #3546. Recognised by the error's type and text and by
    being raised in redis-py's connection code: a lost connection, not a bug of ours.
    Seen in `tests/test_cluster.py`'s master kill -9, where it crashed the pool."""
    if not isinstance(e, AttributeError | TypeError) or "NoneType" not in str(e):
        return False
    tb = e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.replace("\\", "/").endswith(_REDIS_CONNECTION):
            return True
        tb = tb.tb_next
    return False


def is_redis_error(e: BaseException) -> bool:
    """Redis unreachable, timing out or refusing (OOM, READONLY, LOADING...)."""
    return isinstance(e, (RedisError, *_NETWORK)) or is_redis_transport_race(e)


def is_postgres_error(e: BaseException) -> bool:
    """A connection-level failure of PostgreSQL (worth a reconnect and a retry)."""
    if isinstance(e, _NETWORK):
        return True
    asyncpg = sys.modules.get("asyncpg")  # never imported just to classify an error
    if asyncpg is None:
        return False
    ex = asyncpg.exceptions
    return isinstance(e, asyncpg.InterfaceError | asyncpg.PostgresConnectionError
                      | ex.OperatorInterventionError  # 57xxx: admin shutdown...
                      | ex.InsufficientResourcesError  # 53xxx: too many connections
                      | ex.InternalClientError)


def is_outage(e: BaseException) -> bool:
    """Redis or PostgreSQL unreachable: retry with backoff instead of crashing."""
    return is_redis_error(e) or is_postgres_error(e)


def is_oom(e: BaseException) -> bool:
    """Redis refused a write because it is at `maxmemory` with noeviction (also when the
    refusal comes from inside a Lua script)."""
    return isinstance(e, ResponseError) and (
        isinstance(e, OutOfMemoryError) or "OOM command not allowed" in str(e))


def is_redis_unreachable(e: BaseException) -> bool:
    """Redis unreachable, timing out, loading or read-only: a retry may succeed (HTTP
    503), unlike a refusal (a script error, OOM) that says something about the request."""
    return (isinstance(e, (RedisConnectionError, RedisTimeoutError, ReadOnlyError, *_NETWORK))
            or is_redis_transport_race(e))
