"""The producer API: `Client` (asyncio) and `SyncClient` (blocking).

Both run the same operations from `jobqd.ops`; a producer needs only the
Redis URL and prefix, because daemons publish their routing table to Redis.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

import redis
import redis.asyncio as aredis

from jobqd import config as config_mod
from jobqd import ops
from jobqd.jobs import Job, JobInfo

DEFAULT_IDEM_TTL_S = 86400.0  # config: idempotency_ttl_s


class _Base:
    def __init__(self, redis_url: str, prefix: str = "jobqd", *,
                 idempotency_ttl_s: float = DEFAULT_IDEM_TTL_S) -> None:
        self.redis_url = redis_url
        self.prefix = prefix
        self.idem_ttl_ms = int(idempotency_ttl_s * 1000)
        self.routing = ops.Routing(prefix)

    def _enqueue_op(self, task: str, args_list: Sequence[Any], *, queue: str | None,
                    delay_s: float | None, idem: Sequence[str | None] | None, wait: bool,
                    timeout_s: float | None) -> ops.Op:
        return ops.waiting(
            lambda: ops.enqueue(self.prefix, self.routing, task, args_list, queue=queue,
                                delay_s=delay_s, idempotency_keys=idem,
                                idem_ttl_ms=self.idem_ttl_ms),
            wait, timeout_s)


class Client(_Base):
    """Async producer and admin client.

    >>> async with Client("redis://127.0.0.1:6379") as c:
    ...     job = await c.enqueue("send_email", {"to": "a@example.com"})
    """

    def __init__(self, redis_url: str, prefix: str = "jobqd", *,
                 idempotency_ttl_s: float = DEFAULT_IDEM_TTL_S,
                 redis_client: aredis.Redis | None = None) -> None:
        super().__init__(redis_url, prefix, idempotency_ttl_s=idempotency_ttl_s)
        self._owns = redis_client is None
        self.redis = redis_client or aredis.Redis.from_url(redis_url, decode_responses=False,
                                                           health_check_interval=30)
        self._run = ops.AsyncRunner(self.redis).run

    @classmethod
    def from_config(cls, path: str | None = None) -> Client:
        cfg = config_mod.load(path or config_mod.default_path(), import_handlers=False)
        return cls(cfg.redis_url, cfg.redis.prefix, idempotency_ttl_s=cfg.idempotency_ttl_s)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns:
            await self.redis.aclose()

    async def enqueue(self, task: str, args: dict[str, Any] | None = None, *,
                      queue: str | None = None, delay_s: float | None = None,
                      idempotency_key: str | None = None, wait: bool = False,
                      timeout_s: float | None = None) -> Job:
        """Enqueue one job. With ``wait=True`` a full queue is waited out (up to timeout_s)."""
        idem = None if idempotency_key is None else [idempotency_key]
        jobs = await self._run(self._enqueue_op(task, [args], queue=queue, delay_s=delay_s,
                                                idem=idem, wait=wait, timeout_s=timeout_s))
        return jobs[0]  # type: ignore[no-any-return]

    async def enqueue_many(self, task: str, args_list: Sequence[dict[str, Any] | None], *,
                           queue: str | None = None, delay_s: float | None = None,
                           idempotency_keys: Sequence[str | None] | None = None,
                           wait: bool = False, timeout_s: float | None = None) -> list[Job]:
        """Enqueue many jobs of one task in one round trip (500 jobs per atomic step)."""
        if not args_list:
            return []
        return await self._run(self._enqueue_op(  # type: ignore[no-any-return]
            task, args_list, queue=queue, delay_s=delay_s, idem=idempotency_keys, wait=wait,
            timeout_s=timeout_s))

    async def status(self, job_id: str) -> JobInfo:
        """The job's status; raises `JobNotFound` when no record of it is left."""
        return await self._run(ops.status(self.prefix, job_id))  # type: ignore[no-any-return]

    async def dlq_list(self, queue: str | None = None, limit: int = 1000) -> list[ops.DeadJob]:
        return await self._run(ops.dlq_list(self.prefix, queue, limit))  # type: ignore[no-any-return]

    async def dlq_show(self, ref: str) -> ops.DeadJob:
        return await self._run(ops.dlq_show(self.prefix, ref))  # type: ignore[no-any-return]

    async def dlq_replay(self, ref: str) -> str:
        return await self._run(ops.dlq_replay(self.prefix, ref))  # type: ignore[no-any-return]

    async def dlq_replay_all(self, queue: str | None = None) -> tuple[int, int]:
        return await self._run(ops.dlq_replay_all(self.prefix, queue))  # type: ignore[no-any-return]

    async def dlq_purge(self, queue: str | None = None) -> int:
        return await self._run(ops.dlq_purge(self.prefix, queue))  # type: ignore[no-any-return]

    async def dlq_delete(self, ref: str) -> int:
        return await self._run(ops.dlq_delete(self.prefix, ref))  # type: ignore[no-any-return]

    async def queues(self) -> list[ops.QueueStats]:
        return await self._run(ops.queue_stats(self.prefix))  # type: ignore[no-any-return]

    async def weights(self) -> dict[str, int]:
        return await self._run(ops.weights_get(self.prefix))  # type: ignore[no-any-return]

    async def set_weights(self, changes: dict[str, int]) -> dict[str, int]:
        return await self._run(ops.weights_set(self.prefix, changes))  # type: ignore[no-any-return]


class SyncClient(_Base):
    """Blocking producer and admin client with the same methods as `Client`."""

    def __init__(self, redis_url: str, prefix: str = "jobqd", *,
                 idempotency_ttl_s: float = DEFAULT_IDEM_TTL_S,
                 redis_client: redis.Redis | None = None) -> None:
        super().__init__(redis_url, prefix, idempotency_ttl_s=idempotency_ttl_s)
        self._owns = redis_client is None
        self.redis = redis_client or redis.Redis.from_url(redis_url, decode_responses=False,
                                                          health_check_interval=30)
        self._run = ops.SyncRunner(self.redis).run

    @classmethod
    def from_config(cls, path: str | None = None) -> SyncClient:
        cfg = config_mod.load(path or config_mod.default_path(), import_handlers=False)
        return cls(cfg.redis_url, cfg.redis.prefix, idempotency_ttl_s=cfg.idempotency_ttl_s)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._owns:
            self.redis.close()

    def enqueue(self, task: str, args: dict[str, Any] | None = None, *,
                queue: str | None = None, delay_s: float | None = None,
                idempotency_key: str | None = None, wait: bool = False,
                timeout_s: float | None = None) -> Job:
        idem = None if idempotency_key is None else [idempotency_key]
        jobs = self._run(self._enqueue_op(task, [args], queue=queue, delay_s=delay_s, idem=idem,
                                          wait=wait, timeout_s=timeout_s))
        return jobs[0]  # type: ignore[no-any-return]

    def enqueue_many(self, task: str, args_list: Sequence[dict[str, Any] | None], *,
                     queue: str | None = None, delay_s: float | None = None,
                     idempotency_keys: Sequence[str | None] | None = None,
                     wait: bool = False, timeout_s: float | None = None) -> list[Job]:
        if not args_list:
            return []
        return self._run(self._enqueue_op(  # type: ignore[no-any-return]
            task, args_list, queue=queue, delay_s=delay_s, idem=idempotency_keys, wait=wait,
            timeout_s=timeout_s))

    def status(self, job_id: str) -> JobInfo:
        return self._run(ops.status(self.prefix, job_id))  # type: ignore[no-any-return]

    def dlq_list(self, queue: str | None = None, limit: int = 1000) -> list[ops.DeadJob]:
        return self._run(ops.dlq_list(self.prefix, queue, limit))  # type: ignore[no-any-return]

    def dlq_show(self, ref: str) -> ops.DeadJob:
        return self._run(ops.dlq_show(self.prefix, ref))  # type: ignore[no-any-return]

    def dlq_replay(self, ref: str) -> str:
        return self._run(ops.dlq_replay(self.prefix, ref))  # type: ignore[no-any-return]

    def dlq_replay_all(self, queue: str | None = None) -> tuple[int, int]:
        return self._run(ops.dlq_replay_all(self.prefix, queue))  # type: ignore[no-any-return]

    def dlq_purge(self, queue: str | None = None) -> int:
        return self._run(ops.dlq_purge(self.prefix, queue))  # type: ignore[no-any-return]

    def dlq_delete(self, ref: str) -> int:
        return self._run(ops.dlq_delete(self.prefix, ref))  # type: ignore[no-any-return]

    def queues(self) -> list[ops.QueueStats]:
        return self._run(ops.queue_stats(self.prefix))  # type: ignore[no-any-return]

    def weights(self) -> dict[str, int]:
        return self._run(ops.weights_get(self.prefix))  # type: ignore[no-any-return]

    def set_weights(self, changes: dict[str, int]) -> dict[str, int]:
        return self._run(ops.weights_set(self.prefix, changes))  # type: ignore[no-any-return]
