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
from jobqd import connect, ops
from jobqd.jobs import Job, JobInfo
from jobqd.waiting import Waiter, outcome, wait_sync

DEFAULT_IDEM_TTL_S = 86400.0  # config: idempotency_ttl_s
DEFAULT_RESULTS_TTL_S = 3600.0  # config: results.ttl_s (how long a cancelled job's record stays)


class _Base:
    def __init__(self, redis_url: str, prefix: str = "jobqd", *,
                 idempotency_ttl_s: float = DEFAULT_IDEM_TTL_S,
                 results_ttl_s: float = DEFAULT_RESULTS_TTL_S,
                 wait_replicas: int = 0, wait_timeout_s: float = 0.5) -> None:
        self.redis_url = redis_url
        self.prefix = prefix
        self.idem_ttl_ms = int(idempotency_ttl_s * 1000)
        self.results_ttl_ms = int(results_ttl_s * 1000)
        # redis.wait_replicas: an enqueue returns once this many replicas have it
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = round(wait_timeout_s * 1000)
        self.routing = ops.Routing(prefix)

    @staticmethod
    def _config_kwargs(cfg: config_mod.Config) -> dict[str, Any]:
        return {"idempotency_ttl_s": cfg.idempotency_ttl_s, "results_ttl_s": cfg.results.ttl_s,
                "wait_replicas": cfg.redis.wait_replicas,
                "wait_timeout_s": cfg.redis.wait_timeout_s}

    def _enqueue_op(self, task: str, args_list: Sequence[Any], *, queue: str | None,
                    delay_s: float | None, idem: Sequence[str | None] | None, wait: bool,
                    timeout_s: float | None, expires_s: float | None = None
                    ) -> ops.Op[list[Job]]:
        return ops.waiting(
            lambda: ops.enqueue(self.prefix, self.routing, task, args_list, queue=queue,
                                delay_s=delay_s, idempotency_keys=idem,
                                idem_ttl_ms=self.idem_ttl_ms, expires_s=expires_s,
                                wait_replicas=self.wait_replicas,
                                wait_timeout_ms=self.wait_timeout_ms),
            wait, timeout_s)


class Client(_Base):
    """Async producer and admin client.

    >>> async with Client("redis://127.0.0.1:6379") as c:
    ...     job = await c.enqueue("send_email", {"to": "a@example.com"})
    """

    def __init__(self, redis_url: str, prefix: str = "jobqd", *,
                 idempotency_ttl_s: float = DEFAULT_IDEM_TTL_S,
                 results_ttl_s: float = DEFAULT_RESULTS_TTL_S,
                 redis_client: aredis.Redis | None = None, wait_replicas: int = 0,
                 wait_timeout_s: float = 0.5) -> None:
        super().__init__(redis_url, prefix, idempotency_ttl_s=idempotency_ttl_s,
                         results_ttl_s=results_ttl_s, wait_replicas=wait_replicas,
                         wait_timeout_s=wait_timeout_s)
        self._owns = redis_client is None
        self.redis = redis_client or connect.connect(redis_url, decode_responses=False,
                                                           health_check_interval=30)
        self._run = ops.AsyncRunner(self.redis).run
        self._waiter: Waiter | None = None

    @classmethod
    def from_config(cls, path: str | None = None) -> Client:
        cfg = config_mod.load(path or config_mod.default_path(), import_handlers=False)
        return cls(cfg.redis_url, cfg.redis.prefix, **cls._config_kwargs(cfg))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        if self._waiter is not None:
            await self._waiter.close()
        if self._owns:
            await self.redis.aclose()

    async def enqueue(self, task: str, args: dict[str, Any] | None = None, *,
                      queue: str | None = None, delay_s: float | None = None,
                      idempotency_key: str | None = None, wait: bool = False,
                      timeout_s: float | None = None, expires_s: float | None = None) -> Job:
        """Enqueue one job. With ``wait=True`` a full queue is waited out (up to timeout_s);
        that is not waiting for the job's result (see `wait`). A job not started within
        ``expires_s`` of being due is never run: it ends dead, reason ``expired``."""
        idem = None if idempotency_key is None else [idempotency_key]
        jobs = await self._run(self._enqueue_op(task, [args], queue=queue, delay_s=delay_s,
                                                idem=idem, wait=wait, timeout_s=timeout_s,
                                                expires_s=expires_s))
        return jobs[0]

    async def enqueue_many(self, task: str, args_list: Sequence[dict[str, Any] | None], *,
                           queue: str | None = None, delay_s: float | None = None,
                           idempotency_keys: Sequence[str | None] | None = None,
                           wait: bool = False, timeout_s: float | None = None) -> list[Job]:
        """Enqueue many jobs of one task in one round trip (500 jobs per atomic step)."""
        if not args_list:
            return []
        return await self._run(self._enqueue_op(
            task, args_list, queue=queue, delay_s=delay_s, idem=idempotency_keys, wait=wait,
            timeout_s=timeout_s))

    async def status(self, job_id: str) -> JobInfo:
        """The job's status; raises `JobNotFound` when no record of it is left."""
        return await self._run(ops.status(self.prefix, job_id))

    async def wait(self, job_id: str, timeout_s: float | None = None) -> Any:
        """Wait until the job ends; return its result. Raises `JobFailed` (dead: its
        reason, error and attempts), `JobCancelled`, `TimeoutError` at `timeout_s`.
        Completion is pushed, not polled: any number of concurrent waits of one
        client share one pub/sub connection."""
        if self._waiter is None:
            self._waiter = Waiter(self.redis, self.prefix)
        return outcome(await self._waiter.wait(job_id, timeout_s))

    async def cancel(self, job_id: str) -> ops.CancelResult:
        """Cancel a job: a queued or scheduled one is removed and never runs; a running
        one is stopped wherever it runs and ends `cancelled` (never retried). A job that
        had already finished is left as it is (`.outcome == "finished"`)."""
        res = await self._run(ops.cancel(self.prefix, [job_id], self.results_ttl_ms))
        return res[0]

    async def cancel_many(self, queue: str, *, task: str | None = None,
                          scheduled_only: bool = False) -> dict[str, int]:
        """Cancel every unfinished job of a queue (or of one task in it)."""
        return await self._run(ops.cancel_many(
            self.prefix, queue, self.results_ttl_ms, task=task, scheduled_only=scheduled_only))

    async def pause(self, queue: str) -> None:
        """No daemon starts the queue's jobs (within weights.refresh_interval_s); enqueues
        are still accepted."""
        await self._run(ops.set_paused(self.prefix, queue, True))

    async def resume(self, queue: str) -> None:
        await self._run(ops.set_paused(self.prefix, queue, False))

    async def dlq_list(self, queue: str | None = None, limit: int = 1000) -> list[ops.DeadJob]:
        return await self._run(ops.dlq_list(self.prefix, queue, limit))

    async def dlq_show(self, ref: str) -> ops.DeadJob:
        return await self._run(ops.dlq_show(self.prefix, ref))

    async def dlq_replay(self, ref: str) -> str:
        return await self._run(ops.dlq_replay(self.prefix, ref))

    async def dlq_replay_all(self, queue: str | None = None) -> tuple[int, int]:
        return await self._run(ops.dlq_replay_all(self.prefix, queue))

    async def dlq_purge(self, queue: str | None = None) -> int:
        return await self._run(ops.dlq_purge(self.prefix, queue))

    async def dlq_delete(self, ref: str) -> int:
        return await self._run(ops.dlq_delete(self.prefix, ref))

    async def queues(self) -> list[ops.QueueStats]:
        return await self._run(ops.queue_stats(self.prefix))

    async def weights(self) -> dict[str, int]:
        return await self._run(ops.weights_get(self.prefix))

    async def set_weights(self, changes: dict[str, int]) -> dict[str, int]:
        return await self._run(ops.weights_set(self.prefix, changes))


class SyncClient(_Base):
    """Blocking producer and admin client with the same methods as `Client`."""

    def __init__(self, redis_url: str, prefix: str = "jobqd", *,
                 idempotency_ttl_s: float = DEFAULT_IDEM_TTL_S,
                 results_ttl_s: float = DEFAULT_RESULTS_TTL_S,
                 redis_client: redis.Redis | None = None, wait_replicas: int = 0,
                 wait_timeout_s: float = 0.5) -> None:
        super().__init__(redis_url, prefix, idempotency_ttl_s=idempotency_ttl_s,
                         results_ttl_s=results_ttl_s, wait_replicas=wait_replicas,
                         wait_timeout_s=wait_timeout_s)
        self._owns = redis_client is None
        self.redis = redis_client or connect.connect_sync(redis_url, decode_responses=False,
                                                          health_check_interval=30)
        self._run = ops.SyncRunner(self.redis).run

    @classmethod
    def from_config(cls, path: str | None = None) -> SyncClient:
        cfg = config_mod.load(path or config_mod.default_path(), import_handlers=False)
        return cls(cfg.redis_url, cfg.redis.prefix, **cls._config_kwargs(cfg))

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
                timeout_s: float | None = None, expires_s: float | None = None) -> Job:
        idem = None if idempotency_key is None else [idempotency_key]
        jobs = self._run(self._enqueue_op(task, [args], queue=queue, delay_s=delay_s, idem=idem,
                                          wait=wait, timeout_s=timeout_s, expires_s=expires_s))
        return jobs[0]

    def enqueue_many(self, task: str, args_list: Sequence[dict[str, Any] | None], *,
                     queue: str | None = None, delay_s: float | None = None,
                     idempotency_keys: Sequence[str | None] | None = None,
                     wait: bool = False, timeout_s: float | None = None) -> list[Job]:
        if not args_list:
            return []
        return self._run(self._enqueue_op(
            task, args_list, queue=queue, delay_s=delay_s, idem=idempotency_keys, wait=wait,
            timeout_s=timeout_s))

    def status(self, job_id: str) -> JobInfo:
        return self._run(ops.status(self.prefix, job_id))

    def wait(self, job_id: str, timeout_s: float | None = None) -> Any:
        return outcome(wait_sync(self.redis, self.prefix, job_id, timeout_s))

    def cancel(self, job_id: str) -> ops.CancelResult:
        res = self._run(ops.cancel(self.prefix, [job_id], self.results_ttl_ms))
        return res[0]

    def cancel_many(self, queue: str, *, task: str | None = None,
                    scheduled_only: bool = False) -> dict[str, int]:
        return self._run(ops.cancel_many(
            self.prefix, queue, self.results_ttl_ms, task=task, scheduled_only=scheduled_only))

    def pause(self, queue: str) -> None:
        self._run(ops.set_paused(self.prefix, queue, True))

    def resume(self, queue: str) -> None:
        self._run(ops.set_paused(self.prefix, queue, False))

    def dlq_list(self, queue: str | None = None, limit: int = 1000) -> list[ops.DeadJob]:
        return self._run(ops.dlq_list(self.prefix, queue, limit))

    def dlq_show(self, ref: str) -> ops.DeadJob:
        return self._run(ops.dlq_show(self.prefix, ref))

    def dlq_replay(self, ref: str) -> str:
        return self._run(ops.dlq_replay(self.prefix, ref))

    def dlq_replay_all(self, queue: str | None = None) -> tuple[int, int]:
        return self._run(ops.dlq_replay_all(self.prefix, queue))

    def dlq_purge(self, queue: str | None = None) -> int:
        return self._run(ops.dlq_purge(self.prefix, queue))

    def dlq_delete(self, ref: str) -> int:
        return self._run(ops.dlq_delete(self.prefix, ref))

    def queues(self) -> list[ops.QueueStats]:
        return self._run(ops.queue_stats(self.prefix))

    def weights(self) -> dict[str, int]:
        return self._run(ops.weights_get(self.prefix))

    def set_weights(self, changes: dict[str, int]) -> dict[str, int]:
        return self._run(ops.weights_set(self.prefix, changes))
