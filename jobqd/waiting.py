"""Waiting for jobs to finish, pushed rather than polled.

A waiter adds the job id to its queue's waiters set (``{p:q}:w``) and reads the
job's status once (a job that finished before the wait began returns at once).
When a waited-for job ends, ``complete.lua`` (or ``cancel.lua``) removes it from
the set and PUBLISHes ``"<job id> <status>"`` on ``<p>:done``. The hot path pays
one EXISTS per settle batch while nobody waits.

`Waiter` serves any number of concurrent waits of one asyncio client over ONE
pub/sub connection, registering them in pipelined batches on one more: 10,000
waits cost two connections and about twenty round trips. After a lost pub/sub
connection it re-reads the status of every job still waited for, so no
notification sent meanwhile is missed; and after `QUIET_S` without any notification
while waits are pending it re-reads them too, so even a connection that died
silently (a dropped NAT entry) delays a result by seconds, never for ever.
`wait_sync` is the blocking version for one job.

A job whose task keeps nothing (``keep_result: none``) leaves no record to re-read:
a wait registered before it ended returns the status the notification announced
(a `JobInfo` with only id, queue and status); one that starts afterwards, or whose
notification was lost with its connection, gets `JobNotFound`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, cast

import redis
import redis.asyncio as aredis

from jobqd import ops
from jobqd.aio import Backoff
from jobqd.deps import is_redis_error
from jobqd.errors import JobCancelled, JobFailed, JobNotFound
from jobqd.ids import queue_of
from jobqd.jobs import FINAL, JobInfo, Status
from jobqd.keys import GlobalKeys, QueueKeys

log = logging.getLogger("jobqd.waiting")

BATCH = 500  # registrations per round trip
CLOSE_S = 2.0  # close() waits this long for its tasks
QUIET_S = 5.0  # no notification for this long while waits are pending: re-read them


def outcome(info: JobInfo) -> Any:
    """A finished job's result, or the exception that says how it ended."""
    if info.status == "succeeded":
        return info.result
    if info.status == "cancelled":
        raise JobCancelled(info.id)
    raise JobFailed(info.id, info.reason, info.error, info.attempts)


def _register_calls(prefix: str, job_ids: list[str]) -> list[ops.Cmd | ops.Eval]:
    calls: list[ops.Cmd | ops.Eval] = []
    for jid in job_ids:
        q = queue_of(jid)
        assert q is not None
        calls.append(ops.cmd("SADD", QueueKeys(prefix, q).waiters, jid))
        calls.append(ops.status_call(prefix, q, jid))
    return calls


class Waiter:
    def __init__(self, r: aredis.Redis, prefix: str) -> None:
        self.r = r
        self.prefix = prefix
        self.run = ops.AsyncRunner(r).run
        self.waiting: dict[str, list[asyncio.Future[JobInfo]]] = {}
        self.todo: list[str] = []  # job ids to (re-)register and read
        self.kick = asyncio.Event()
        self.subscribed = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        # job id -> the final status announced on the done channel, for a job that
        # keeps no record (keep_result: none): the re-read then finds nothing
        self.announced: dict[str, str] = {}

    def _start(self) -> None:
        if not self.tasks or any(t.done() for t in self.tasks):
            for t in self.tasks:
                t.cancel()
            self.tasks = [asyncio.get_running_loop().create_task(self._listen()),
                          asyncio.get_running_loop().create_task(self._register())]

    async def wait(self, job_id: str, timeout_s: float | None = None) -> JobInfo:
        """The job's final status (succeeded, dead or cancelled); TimeoutError after
        `timeout_s`; JobNotFound when no record of it is left."""
        if queue_of(job_id) is None:
            raise JobNotFound(job_id)
        fut: asyncio.Future[JobInfo] = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(job_id, []).append(fut)
        self._start()
        try:
            async with asyncio.timeout(timeout_s):
                await self.subscribed.wait()  # registered only once notifications flow
                self.todo.append(job_id)
                self.kick.set()
                return await fut
        finally:
            futs = self.waiting.get(job_id)
            if futs is not None:
                with contextlib.suppress(ValueError):
                    futs.remove(fut)
                if not futs:
                    del self.waiting[job_id]
                    self.announced.pop(job_id, None)

    async def close(self) -> None:
        """Stop listening (bounded: a task cancelled in the middle of a Redis call may
        take the client's own time to unwind; it is not waited for past CLOSE_S)."""
        for t in self.tasks:
            t.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=CLOSE_S)
        self.tasks = []

    def _resolve(self, job_id: str, info: JobInfo | None, exc: BaseException | None) -> None:
        for fut in self.waiting.get(job_id, []):
            if fut.done():
                continue
            if exc is not None:
                fut.set_exception(exc)
            elif info is not None:
                fut.set_result(info)

    async def _listen(self) -> None:
        channel = GlobalKeys(self.prefix).done
        backoff = Backoff()
        while True:
            pubsub = self.r.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(channel)
                if self.subscribed.is_set():  # reconnected: anything may have finished
                    self.todo.extend(self.waiting)
                    self.kick.set()
                self.subscribed.set()
                backoff.reset()
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True,
                                                   timeout=QUIET_S)
                    if msg is None:
                        if self.waiting:  # a silent channel may be a dead one: re-read
                            self.todo.extend(self.waiting)
                            self.kick.set()
                        continue
                    job_id, _, final = bytes(msg["data"]).decode("utf-8", "replace").partition(" ")
                    if job_id in self.waiting:
                        if final in FINAL:
                            self.announced[job_id] = final
                        self.todo.append(job_id)
                        self.kick.set()
            except Exception as e:
                if not is_redis_error(e):
                    raise
                log.warning("waiting: pub/sub connection lost (%s); reconnecting", e)
                await asyncio.sleep(backoff.next())
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.shield(pubsub.reset())

    async def _register(self) -> None:
        backoff = Backoff()
        while True:
            await self.kick.wait()
            self.kick.clear()
            while self.todo:
                batch = list(dict.fromkeys(self.todo[:BATCH]))
                del self.todo[:BATCH]
                batch = [j for j in batch if j in self.waiting]
                if not batch:
                    continue
                try:
                    replies = await self.run(self._batch(batch))
                except Exception as e:
                    if not is_redis_error(e):
                        raise
                    self.todo.extend(batch)
                    await asyncio.sleep(backoff.next())
                    continue
                backoff.reset()
                for job_id, (info, exc) in zip(batch, replies, strict=True):
                    if isinstance(exc, JobNotFound) and job_id in self.announced:
                        self._resolve(job_id, announced(job_id, self.announced[job_id]), None)
                    elif exc is not None or (info is not None and info.status in FINAL):
                        self._resolve(job_id, info, exc)

    def _batch(self, job_ids: list[str]
               ) -> ops.Op[list[tuple[JobInfo | None, BaseException | None]]]:
        replies = yield ops.Pipe(_register_calls(self.prefix, job_ids))
        out: list[tuple[JobInfo | None, BaseException | None]] = []
        for i, job_id in enumerate(job_ids):
            q = queue_of(job_id)
            assert q is not None
            try:
                out.append((ops.parse_status(job_id, q, replies[2 * i + 1]), None))
            except JobNotFound as e:
                out.append((None, e))
        return out


def wait_sync(r: redis.Redis, prefix: str, job_id: str, timeout_s: float | None) -> JobInfo:
    """`Waiter.wait` for a blocking client and one job."""
    q = queue_of(job_id)
    if q is None:
        raise JobNotFound(job_id)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    run = ops.SyncRunner(r).run
    pubsub = r.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
    final = ""  # the status the done channel announced for it
    try:
        pubsub.subscribe(GlobalKeys(prefix).done)
        while True:
            try:
                info = run(_read_one(prefix, job_id))
            except JobNotFound:
                if final not in FINAL:
                    raise
                return announced(job_id, final)  # it keeps no record (keep_result: none)
            if info.status in FINAL:
                return info
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"job {job_id} did not finish within {timeout_s}s")
                msg = pubsub.get_message(ignore_subscribe_messages=True,
                                         timeout=min(5.0, left) if left is not None else 5.0)
                if msg is None:
                    if left is None or left > 5.0:
                        break  # re-read now and then: a reconnect may have lost a message
                    continue
                jid, _, said = bytes(msg["data"]).decode("utf-8", "replace").partition(" ")
                if jid == job_id:
                    final = said
                    break
    finally:
        pubsub.close()


def announced(job_id: str, status: str) -> JobInfo:
    """What a wait returns for a job that finished without leaving a record
    (`keep_result: none`): the status the done channel announced, nothing else."""
    return JobInfo(id=job_id, status=cast(Status, status), queue=queue_of(job_id))


def _read_one(prefix: str, job_id: str) -> ops.Op[JobInfo]:
    calls = _register_calls(prefix, [job_id])
    replies = yield ops.Pipe(calls)
    q = queue_of(job_id)
    assert q is not None
    return ops.parse_status(job_id, q, replies[1])
