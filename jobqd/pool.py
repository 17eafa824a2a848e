"""The consumer pool: fetcher, consumers, acker, lease renewal and drain.

Data flow (one daemon)::

    streams --XREADGROUP (batched, SWRR-ordered)--> buffer --> N consumers
       ^                                                          |
       +---------- COMPLETE.lua (one EVALSHA per queue per flush) <-- acker

* The fetcher asks for as many entries as there are free slots (``consumers``
  minus entries held: buffered, running or awaiting their ack), in one
  pipeline, ordered by smooth weighted round-robin over the queues that have
  work. When every queue is empty it blocks in one XREADGROUP on all streams.
* Consumers are long-lived tasks (no task per job). A job keeps the config it
  started with. Its outcome goes to the acker, which settles everything that
  accumulated while its previous flush was in flight: ack, delete, status and
  retry/dead-letter, atomically per entry.
* Held entries have their lease renewed (XCLAIM ... JUSTID resets the idle
  time), so the reaper's visibility timeout only catches an owner that stopped
  renewing.
* Drain (``stop`` set): stop fetching; hand back buffered jobs at once (no
  attempt used); give running jobs ``shutdown.drain_timeout_s``; cancel the
  rest and hand them back for immediate redelivery; flush every ack.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import logging
import random
import threading
import time
import traceback
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aredis
from redis.exceptions import NoScriptError, ResponseError

from jobqd import scripts
from jobqd.config import Config, TaskConfig
from jobqd.errors import Fail, Retry
from jobqd.jobs import BadJob, CurrentJob, Envelope, _current, decode_job
from jobqd.keys import GROUP, QueueKeys
from jobqd.limits import Limiter, limited
from jobqd.runtime import Backoff, Runtime
from jobqd.weights import SmoothWRR

log = logging.getLogger("jobqd.pool")

BLOCK_MS = 2000  # longest blocking XREADGROUP when every queue is empty
DEADLINE_TICK_S = 0.05  # job timeouts are enforced to within this
ACK_CHUNK = 500  # entries per COMPLETE call
MAX_ERROR_CHARS = 2000
MAX_TRACEBACK_CHARS = 8000


@dataclass(slots=True, eq=False)
class Delivery:
    queue: str
    eid: bytes
    fields: dict[bytes, bytes]
    thread: concurrent.futures.Future[Any] | None = None  # a sync handler's run, once started


@dataclass(slots=True)
class Settle:
    op: str  # S succeeded, R retry/defer, D dead, B hand back
    eid: bytes
    job_id: str
    payload: bytes
    extra: Any  # S: result key; R: delay ms; D: death json; B: unused


async def settle(r: aredis.Redis, cfg: Config,
                 batch: dict[str, list[Settle]]) -> list[tuple[str, list[Settle], str]]:
    """Run COMPLETE.lua for every queue's outcomes in one pipeline (one round trip).

    Returns (queue, chunk, flags) with flag '1' settled, '0' not pending any more.
    Safe to repeat after a lost reply: each entry is gated on its XACK.
    """
    prefix = cfg.redis.prefix
    ttl_ms = int(cfg.results.ttl_s * 1000)
    calls: list[tuple[list[Any], list[Any]]] = []
    groups: list[tuple[str, list[Settle]]] = []
    for q, items in batch.items():
        qk = QueueKeys(prefix, q)
        for i in range(0, len(items), ACK_CHUNK):
            chunk = items[i:i + ACK_CHUNK]
            keys: list[Any] = [qk.stream, qk.delayed, qk.state, qk.dlq, qk.conf, qk.full,
                               qk.done]
            argv: list[Any] = [GROUP, ttl_ms, len(chunk)]
            for s in chunk:
                extra = s.extra
                if s.op == "S":
                    keys.append(qk.result(s.job_id))
                    extra = len(keys) - 7
                argv += [s.op, s.eid, s.job_id, s.payload, extra]
            calls.append((keys, argv))
            groups.append((q, chunk))
    replies: list[Any] = []
    for attempt in range(2):
        async with r.pipeline(transaction=False) as p:
            for keys, argv in calls:
                p.evalsha(scripts.COMPLETE.sha, len(keys), *keys, *argv)
            replies = await p.execute(raise_on_error=False)
        if attempt == 0 and any(isinstance(x, NoScriptError) for x in replies):
            await scripts.preload(r)  # Redis restarted: its script cache is empty
            continue
        break
    for x in replies:
        if isinstance(x, Exception):
            raise x
    return [(q, chunk, flags.decode() if isinstance(flags, bytes) else str(flags))
            for (q, chunk), flags in zip(groups, replies, strict=True)]


def death_record(env: Envelope | None, queue: str, worker: str, reason: str, error: str, *,
                 tb: str | None = None, attempts: int = 0,
                 started: float | None = None, lost: int | None = None) -> bytes:
    """The ``e`` field of a dead-letter entry."""
    if lost is None:
        lost = env.lost if env else 0
    return orjson.dumps({
        "reason": reason, "error": error[:MAX_ERROR_CHARS],
        "traceback": tb[-MAX_TRACEBACK_CHARS:] if tb else None, "attempts": attempts,
        "lost": lost, "died": _ms(), "started": started,
        "task": env.task if env else None, "queue": queue, "worker": worker})


class Handoff:
    """The FIFO between the fetcher and the consumers.

    Cheaper than asyncio.Queue on the hot path: a waiting consumer is handed the
    delivery directly. A consumer cancelled after being handed one puts it back.
    """

    def __init__(self) -> None:
        self.items: deque[Delivery | None] = deque()
        self.waiters: deque[asyncio.Future[Delivery | None]] = deque()

    def put(self, d: Delivery | None) -> None:
        while self.waiters:
            w = self.waiters.popleft()
            if not w.done():
                w.set_result(d)
                return
        self.items.append(d)

    async def get(self) -> Delivery | None:
        if self.items:
            return self.items.popleft()
        fut: asyncio.Future[Delivery | None] = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.items.appendleft(fut.result())
            raise

    def take_all(self) -> list[Delivery | None]:
        items = list(self.items)
        self.items.clear()
        return items

    def __len__(self) -> int:
        return len(self.items)


def backoff_delay(task: TaskConfig, failed_attempts: int) -> float:
    """Exponential backoff with full jitter: min(base * 2**n, max) * random()."""
    b = task.retry_backoff
    return min(b.base_s * 2.0 ** min(failed_attempts, 62), b.max_s) * random.random()


def _ms() -> float:
    return time.time() * 1000.0


def _eid_ms(eid: bytes) -> float:
    return float(eid.split(b"-", 1)[0])


class Pool:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.wrr = SmoothWRR()
        self.buffer = Handoff()
        self.held: dict[str, dict[bytes, Delivery]] = {}
        self.n_held = 0
        self.running = 0
        self.capacity = rt.config.consumers
        self.slot_freed = asyncio.Event()
        self.pending: dict[str, list[Settle]] = {}
        self.n_pending = 0
        self.ack_wakeup = asyncio.Event()
        self.acks_flushed = asyncio.Event()
        self.idle = asyncio.Event()
        self.empty: set[str] = set()
        self.groups: set[str] = set()
        self.consumers: dict[asyncio.Task[None], Delivery | None] = {}
        self.deadlines: dict[asyncio.Task[None], float] = {}  # consumer -> job deadline
        self.threads_busy = 0  # sync handlers running in threads (they cannot be stopped)
        self._threads_lock = threading.Lock()
        self.timed_out: set[asyncio.Task[None]] = set()
        self.retiring = 0
        # Threads for plain-def handlers are made on demand; at most `consumers` are busy
        # with live jobs. The generous cap means a timed-out handler that keeps its
        # thread busy never shrinks the pool: the next job gets a fresh thread.
        self.executor = ThreadPoolExecutor(max_workers=10_000, thread_name_prefix="jobqd-sync")
        self.limiter = Limiter(rt)  # per-task concurrency and rate limits (all daemons)
        self.tg: asyncio.TaskGroup | None = None
        self.fetch_task: asyncio.Task[None] | None = None
        self._stale_logged = 0

    # ------------------------------------------------------------ lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        rt = self.rt
        try:
            async with asyncio.TaskGroup() as tg:
                self.tg = tg
                acker = tg.create_task(self._ack_loop(), name="jobqd-acker")
                renewer = tg.create_task(self._renew_loop(), name="jobqd-lease-renewal")
                deadlines = tg.create_task(self._deadline_loop(), name="jobqd-timeouts")
                self.resize(self.capacity)
                self.fetch_task = tg.create_task(self._fetch_loop(stop), name="jobqd-fetcher")
                rt.health.consumers_running = True
                rt.consumers_started.set()
                await stop.wait()
                await self._drain()
                acker.cancel()
                renewer.cancel()
                deadlines.cancel()
        finally:
            rt.health.consumers_running = False
            self.executor.shutdown(wait=False, cancel_futures=True)

    def resize(self, n: int) -> None:
        """Grow or shrink the pool without cancelling running jobs (not while draining)."""
        if self.tg is None or self.rt.stop_event.is_set():
            log.info("not resizing the pool to %d: it is stopping", n)
            return
        live = len(self.consumers) - self.retiring
        self.capacity = n
        for _ in range(n - live):
            # not in the task group: a handler that ignores cancellation must not be able
            # to hold the drain for ever (the drain abandons such a consumer, bounded)
            t = asyncio.get_running_loop().create_task(self._consumer(), name="jobqd-consumer")
            self.consumers[t] = None
            t.add_done_callback(self._consumer_done)
        for _ in range(live - n):
            self.retiring += 1
            self.buffer.put(None)
        self.slot_freed.set()

    def _consumer_done(self, t: asyncio.Task[None]) -> None:
        self.consumers.pop(t, None)
        if t.cancelled():
            return
        exc = t.exception()
        if exc is not None:  # a bug in the pool itself: stop the daemon the usual way
            log.error("a consumer crashed", exc_info=exc)
            self.rt.health.crashed = self.rt.health.crashed or "pool"
            self.rt.stop("a consumer crashed")

    async def _drain(self) -> None:
        rt = self.rt
        cfg = rt.config
        t0 = time.monotonic()
        # 1. stop intake
        if self.fetch_task is not None:
            self.fetch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.fetch_task
        # 2. fetched but not started: back at once, no attempt used; also entries a
        #    cancelled fetch delivered to us whose reply we never read
        handed = 0
        for d in self.buffer.take_all():
            if d is not None:
                self._handback(d)
                handed += 1
        try:
            orphans = await asyncio.wait_for(self._orphans(), cfg.shutdown.handback_timeout_s)
        except Exception as e:  # the reaper recovers them (visibility timeout)
            if not (rt.is_redis_error(e) or isinstance(e, TimeoutError)):
                raise
            orphans = []
        for q, eid, fields in orphans:
            self._handback(Delivery(q, eid, fields))
            handed += 1
        for _ in range(len(self.consumers)):
            self.buffer.put(None)  # idle consumers exit
        # 3. running jobs get drain_timeout_s
        log.info("draining: %d running, %d not started handed back", self.running, handed)
        if self.running:
            self.idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.idle.wait(), cfg.shutdown.drain_timeout_s)
        # 4. the rest are cancelled and handed back for immediate redelivery
        self.deadlines.clear()  # from here on a cancellation means: hand back
        busy = [t for t, d in self.consumers.items() if d is not None]
        if busy:
            log.warning("drain timeout (%gs): cancelling %d running jobs and handing them back",
                        cfg.shutdown.drain_timeout_s, len(busy))
            for t in busy:
                t.cancel()
        if self.consumers:
            await asyncio.wait(list(self.consumers), timeout=cfg.shutdown.handback_timeout_s)
        for t, d in list(self.consumers.items()):
            if d is not None and not t.done():
                log.error("a handler ignored cancellation; abandoning its consumer (job entry "
                          "%s of %s is left to the reaper)", d.eid.decode(), d.queue)
                self._abandon(d)
        # 5. every outcome acked (bounded)
        try:
            await asyncio.wait_for(self._wait_acks(), cfg.shutdown.handback_timeout_s)
        except TimeoutError:
            log.error("could not settle %d outcomes within %gs; the reaper will recover them",
                      self.n_pending + self.n_held, cfg.shutdown.handback_timeout_s)
        else:
            await self._forget_consumer()
        # 6. the concurrency slots of every finished or handed-back job released (bounded)
        await self.limiter.close(cfg.shutdown.handback_timeout_s)
        log.info("drained in %.2fs", time.monotonic() - t0)

    async def _wait_acks(self) -> None:
        while self.n_pending or self.n_held:
            if not self.n_pending:  # held but nothing to flush yet: wait, do not spin
                await asyncio.sleep(0.01)
                continue
            self.ack_wakeup.set()
            self.acks_flushed.clear()
            await self.acks_flushed.wait()

    def _abandon(self, d: Delivery) -> None:
        """Stop counting an entry we cannot settle; it stays in our PEL for the reaper."""
        if self.held.get(d.queue, {}).pop(d.eid, None) is not None:
            self.n_held -= 1

    async def _forget_consumer(self) -> None:
        """Remove this daemon's consumer from every group in which it owns nothing.

        Only then: XGROUP DELCONSUMER would drop owned entries from the PEL while they
        stay in the stream, where no one would ever see them again.
        """
        rt = self.rt
        prefix = rt.config.redis.prefix
        for q in sorted(self.groups | set(rt.config.queues)):
            try:
                gone = await scripts.FORGET_CONSUMER(rt.redis, [QueueKeys(prefix, q).stream],
                                                     [GROUP, rt.name])
            except Exception as e:
                if not rt.is_redis_error(e):
                    raise
                continue
            if not gone:
                log.warning("this daemon still owns entries in %s: the reaper recovers them", q)

    async def _orphans(self) -> list[tuple[str, bytes, dict[bytes, bytes]]]:
        """Entries in this consumer's PEL that it does not hold: an XREADGROUP whose
        reply was lost (a dropped connection, a cancelled fetch) delivered them.
        Entries deleted from the stream meanwhile are acked away."""
        rt = self.rt
        prefix = rt.config.redis.prefix
        out = []
        for q in sorted(self.groups | set(rt.config.queues)):
            stream = QueueKeys(prefix, q).stream
            start: Any = "0"
            while True:
                try:
                    reply: Any = await rt.redis.xreadgroup(GROUP, rt.name, {stream: start},
                                                           count=500)
                except ResponseError as e:  # no stream or group (yet): nothing of ours
                    if "NOGROUP" not in str(e):
                        raise
                    break
                raw = reply if isinstance(reply, dict) else dict(reply or [])
                entries = raw.get(stream.encode()) or []
                if not entries:
                    break
                held = self.held.get(q, {})
                gone = []
                for eid, fields in entries:
                    if eid in held:
                        continue
                    if not fields:
                        gone.append(eid)
                    else:
                        out.append((q, eid, fields))
                if gone:
                    await rt.redis.xack(stream, GROUP, *gone)
                start = entries[-1][0]
        return out

    # ------------------------------------------------------------ fetching

    async def _fetch_loop(self, stop: asyncio.Event) -> None:
        backoff = Backoff()
        rt = self.rt
        orphans = False
        while not stop.is_set():
            if orphans:
                try:
                    await self._adopt_orphans()
                    orphans = False
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    if not rt.is_redis_error(e):
                        raise
                    await asyncio.sleep(backoff.next())
                    continue
            if self.capacity - self.n_held <= 0:
                self.slot_freed.clear()
                if self.capacity - self.n_held <= 0:
                    await self.slot_freed.wait()
                continue
            try:
                await self._fetch(self.capacity - self.n_held)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if not rt.is_redis_error(e):
                    raise
                rt.health.redis_ok = False
                orphans = True  # its reply may be lost with entries delivered to us
                delay = backoff.next()
                log.warning("fetch failed (%s: %s); retrying in %.1fs", type(e).__name__, e, delay)
                await asyncio.sleep(delay)
            else:
                if not rt.health.redis_ok:
                    log.info("redis is back")
                rt.health.redis_ok = True
                backoff.reset()

    async def _adopt_orphans(self) -> None:
        """After a failed fetch: run the entries its lost reply delivered to us now,
        instead of leaving them to the visibility timeout."""
        for q, eid, fields in await self._orphans():
            log.warning("taking back entry %s of %s delivered by a lost fetch reply",
                        eid.decode(), q)
            self._take(q, eid, fields)

    async def _ensure_group(self, q: str) -> None:
        stream = QueueKeys(self.rt.config.redis.prefix, q).stream
        try:
            await self.rt.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self.groups.add(q)

    async def _fetch(self, free: int) -> None:
        rt = self.rt
        cfg = rt.config
        prefix = cfg.redis.prefix
        weights = rt.weights or {q.name: q.weight for q in cfg.queues.values()}
        queues = [q for q in cfg.queues if weights.get(q, 0) > 0]
        if not queues:  # every queue paused
            await asyncio.sleep(BLOCK_MS / 1000)
            return
        for q in queues:
            if q not in self.groups:
                await self._ensure_group(q)
        active = [q for q in queues if q not in self.empty]
        r = rt.redis
        if not active:
            streams = {QueueKeys(prefix, q).stream: ">" for q in queues}
            try:
                reply = await r.xreadgroup(GROUP, rt.name, streams,  # type: ignore[arg-type]
                                           count=free, block=BLOCK_MS)
            except ResponseError as e:
                if "NOGROUP" not in str(e):
                    raise
                self.groups.clear()
                return
            raw: Any = reply or []  # RESP2: [[stream, entries], ...]; RESP3: {stream: entries}
            by_stream: dict[bytes, Any] = raw if isinstance(raw, dict) else dict(raw)
            for q in queues:
                entries = by_stream.get(QueueKeys(prefix, q).stream.encode())
                if entries:
                    self.empty.discard(q)
                    for eid, fields in entries:
                        self._take(q, eid, fields)
            return
        picks = self.wrr.picks(free, weights, active)
        counts = Counter(picks)
        probes = [q for q in queues if q in self.empty]
        order = list(counts) + probes
        async with r.pipeline(transaction=False) as p:
            for q in order:
                p.xreadgroup(GROUP, rt.name, {QueueKeys(prefix, q).stream: ">"},
                             count=counts.get(q, 1))
            replies = await p.execute(raise_on_error=False)
        got: dict[str, list[tuple[bytes, dict[bytes, bytes]]]] = {}
        for q, reply in zip(order, replies, strict=True):
            if isinstance(reply, Exception):
                if isinstance(reply, ResponseError) and "NOGROUP" in str(reply):
                    self.groups.discard(q)
                    continue
                raise reply
            entries = reply[0][1] if reply else []
            got[q] = list(reversed(entries))  # pop() from the end in stream order
            if q in counts and len(entries) < counts[q]:
                self.empty.add(q)
            elif q not in counts and entries:
                self.empty.discard(q)
        for q in picks:  # job starts follow the SWRR order
            lst = got.get(q)
            if lst:
                eid, fields = lst.pop()
                self._take(q, eid, fields)
        for q in order:  # probes, and anything left over
            for eid, fields in reversed(got.get(q, [])):
                self._take(q, eid, fields)

    def _take(self, q: str, eid: bytes, fields: dict[bytes, bytes]) -> None:
        d = Delivery(q, eid, fields)
        self.held.setdefault(q, {})[eid] = d
        self.n_held += 1
        self.buffer.put(d)

    # ------------------------------------------------------------ running

    async def _consumer(self) -> None:
        me = asyncio.current_task()
        assert me is not None
        while True:
            d = await self.buffer.get()
            if d is None:
                if self.retiring:
                    self.retiring -= 1
                return
            self.consumers[me] = d
            self.running += 1
            try:
                await self._execute(d, me)
            finally:
                self.running -= 1
                self.consumers[me] = None
                if not self.running:
                    self.idle.set()

    async def _execute(self, d: Delivery, me: asyncio.Task[None]) -> None:
        rt = self.rt
        cfg = rt.config  # this job runs under the config it started with
        raw = d.fields.get(b"j")
        if raw is None:
            self._garbage(d, "entry has no 'j' field")
            return
        try:
            env = decode_job(raw)
        except BadJob as e:
            self._garbage(d, str(e))
            return
        task = cfg.tasks.get(env.task)
        if task is None:
            self._dead(d, env, "unknown_task", f"no handler for task {env.task!r} in this "
                       "daemon's config", tb=None, attempts=env.attempt)
            return
        if limited(task):
            try:
                wait = await self.limiter.acquire(task, env.id)
            except asyncio.CancelledError:  # drain: not started, back with no attempt used
                self._handback(d, env)
                raise
            if wait is not None:  # over its limit: back through the delayed set, same attempt
                self._settle(d.queue, Settle("R", d.eid, env.id, env.next(),
                                             max(1, round(wait * 1000))))
                return
        started = _ms()
        rt.metrics.job_started(d.queue, (started - _eid_ms(d.eid)) / 1000.0)
        events = rt.events
        if events is not None:
            events.record("started", env.id, d.queue, env.task, attempt=env.attempt + 1,
                          lost=env.lost, ts_ms=started, enq_ms=env.enq_ms)
        token = _current.set(CurrentJob(id=env.id, task=env.task, queue=d.queue,
                                        attempt=env.attempt + 1, enqueued_at=env.enq_ms / 1000))
        t0 = time.perf_counter()
        if task.timeout_s is not None:
            self.deadlines[me] = time.monotonic() + task.timeout_s
        try:
            result = await self._call(task, env, d)
            try:
                payload = orjson.dumps({"status": "succeeded", "task": env.task,
                                        "result": result, "attempts": env.attempt + 1,
                                        "lost": env.lost, "enq": env.enq_ms,
                                        "started": started, "finished": _ms()})
            except TypeError as e:
                # the handler did its work; running it again would repeat its effects
                self._dead(d, env, "bad_result", f"result is not JSON-serialisable: {e}",
                           tb=None, attempts=env.attempt + 1, started=started)
                rt.metrics.job_done(d.queue, env.task, "dead", time.perf_counter() - t0)
                return
        except asyncio.CancelledError:
            if not self._timed_out(me):
                if d.thread is not None and not d.thread.done():
                    # a thread cannot be stopped: handing the job back would let another
                    # worker run it while this thread still does. It stays ours in the
                    # PEL; when this process exits, the reaper recovers it.
                    log.warning("job %s is still running in a thread: left to the reaper",
                                env.id)
                    self._abandon(d)
                    raise
                # drain timeout or forced stop: back for immediate redelivery, no attempt used
                self._handback(d, env)
                raise
            assert task.timeout_s is not None
            self._failed(d, env, task, "timeout", f"timed out after {task.timeout_s:g}s",
                         tb=None, started=started, t0=t0)
        except Retry as e:
            self._failed(d, env, task, "retry", e.reason, tb=None, started=started, t0=t0,
                         delay_s=e.delay_s)
        except Fail as e:
            self._dead(d, env, "failed", e.reason, tb=None, attempts=env.attempt + 1,
                       started=started)
            rt.metrics.job_done(d.queue, env.task, "dead", time.perf_counter() - t0)
        except Exception as e:
            self._failed(d, env, task, "error", _error_text(e), tb=_tb(e), started=started,
                         t0=t0)
        else:
            self._settle(d.queue, Settle("S", d.eid, env.id, payload, None))
            rt.metrics.job_done(d.queue, env.task, "succeeded", time.perf_counter() - t0)
            if events is not None:
                events.record("succeeded", env.id, d.queue, env.task, attempt=env.attempt + 1,
                              lost=env.lost, ts_ms=_ms(), result=result)
        finally:
            self.deadlines.pop(me, None)
            if me in self.timed_out:  # the handler swallowed our deadline's cancellation
                self.timed_out.discard(me)
                me.uncancel()
            _current.reset(token)
            self.limiter.release(task, env.id)  # no-op unless it holds a slot; never blocks

    async def _call(self, task: TaskConfig, env: Envelope, d: Delivery) -> Any:
        if task.is_async:
            return await task.fn(**env.args)
        # A plain def runs in a thread. A thread cannot be killed: at the deadline we
        # stop waiting and count a timeout; the thread finishes on its own (documented).
        ctx = contextvars.copy_context()
        d.thread = self.executor.submit(self._in_thread, ctx, task.fn, env.args)
        return await asyncio.wrap_future(d.thread)

    def _in_thread(self, ctx: contextvars.Context, fn: Any, args: dict[str, Any]) -> Any:
        with self._threads_lock:
            self.threads_busy += 1
        try:
            return ctx.run(fn, **args)
        finally:
            with self._threads_lock:
                self.threads_busy -= 1

    def _timed_out(self, me: asyncio.Task[None]) -> bool:
        """Was this cancellation our deadline (and nothing else)? Then swallow it."""
        if me not in self.timed_out:
            return False
        self.timed_out.discard(me)
        return me.uncancel() == 0

    async def _deadline_loop(self) -> None:
        """Job timeouts: one coarse timer for the pool instead of one per job.

        A consumer past its deadline is cancelled; `_execute` recognises the
        cancellation as a timeout (a failure: retried or dead-lettered).
        """
        while True:
            await asyncio.sleep(DEADLINE_TICK_S)
            if not self.deadlines:
                continue
            now = time.monotonic()
            for t, deadline in list(self.deadlines.items()):
                if deadline <= now and t not in self.timed_out:
                    del self.deadlines[t]
                    self.timed_out.add(t)
                    t.cancel()

    # ------------------------------------------------------------ outcomes

    def _failed(self, d: Delivery, env: Envelope, task: TaskConfig, kind: str, error: str, *,
                tb: str | None, started: float, t0: float, delay_s: float | None = None) -> None:
        rt = self.rt
        attempts = env.attempt + 1
        log.warning("job failed: %s", error, extra={
            "job_id": env.id, "task": env.task, "queue": d.queue, "attempt": attempts,
            "kind": kind, **({"args": env.args} if rt.config.log.payloads else {})})
        if attempts > task.max_retries:
            reason = "timeout" if kind == "timeout" else "max_retries"
            self._dead(d, env, reason, error, tb=tb, attempts=attempts, started=started)
            rt.metrics.job_done(d.queue, env.task, "dead", time.perf_counter() - t0)
            return
        delay = backoff_delay(task, env.attempt) if delay_s is None else delay_s
        if rt.events is not None:
            rt.events.record("retried", env.id, d.queue, env.task, attempt=attempts,
                             lost=env.lost, ts_ms=_ms(), error=error)
        nxt = env.next(attempt=attempts, err=error[:MAX_ERROR_CHARS])
        self._settle(d.queue, Settle("R", d.eid, env.id, nxt, round(delay * 1000)))
        rt.metrics.job_done(d.queue, env.task, "retried", time.perf_counter() - t0)

    def _dead(self, d: Delivery, env: Envelope, reason: str, error: str, *, tb: str | None,
              attempts: int, started: float | None = None) -> None:
        death = death_record(env, d.queue, self.rt.name, reason, error, tb=tb,
                             attempts=attempts, started=started)
        if self.rt.events is not None:
            self.rt.events.record("dead", env.id, d.queue, env.task, attempt=attempts,
                                  lost=env.lost, ts_ms=_ms(), error=error, reason=reason)
        log.error("job dead (%s): %s", reason, error, extra={
            "job_id": env.id, "task": env.task, "queue": d.queue, "attempt": attempts})
        self._settle(d.queue, Settle("D", d.eid, env.id, env.next(), death))

    def _garbage(self, d: Delivery, why: str) -> None:
        raw = {k.decode("utf-8", "replace"): v.decode("utf-8", "replace")
               for k, v in d.fields.items()}
        log.error("malformed stream entry %s in queue %s: %s", d.eid.decode(), d.queue, why)
        death = death_record(None, d.queue, self.rt.name, "malformed", why)
        self._settle(d.queue, Settle("D", d.eid, "", orjson.dumps(raw), death))
        self.rt.metrics.job_done(d.queue, "", "dead", 0.0)

    def _handback(self, d: Delivery, env: Envelope | None = None) -> None:
        raw = d.fields.get(b"j")
        if env is None and raw is not None:
            try:
                env = decode_job(raw)
            except BadJob:
                env = None
        if env is None:  # garbage never started: let _garbage judge it on the next fetch
            self._garbage(d, "malformed entry handed back at shutdown")
            return
        self.rt.metrics.reclaimed.labels("handback").inc()
        self._settle(d.queue, Settle("B", d.eid, env.id, env.next(), 0))

    def _settle(self, q: str, s: Settle) -> None:
        self.pending.setdefault(q, []).append(s)
        self.n_pending += 1
        self.ack_wakeup.set()

    # ------------------------------------------------------------ acking

    async def _ack_loop(self) -> None:
        backoff = Backoff()
        rt = self.rt
        while True:
            await self.ack_wakeup.wait()
            self.ack_wakeup.clear()
            if not self.pending:
                self.acks_flushed.set()
                continue
            batch, self.pending = self.pending, {}
            n = self.n_pending
            self.n_pending = 0
            while True:
                try:
                    await self._flush(batch, rt.config)
                    backoff.reset()
                    break
                except asyncio.CancelledError:
                    self._requeue_unflushed(batch, n)
                    raise
                except Exception as e:
                    if not rt.is_redis_error(e):
                        raise
                    rt.health.redis_ok = False
                    delay = backoff.next()
                    log.warning("ack flush failed (%s: %s); retrying in %.1fs",
                                type(e).__name__, e, delay)
                    await asyncio.sleep(delay)
            self.acks_flushed.set()

    def _requeue_unflushed(self, batch: dict[str, list[Settle]], n: int) -> None:
        for q, items in batch.items():
            self.pending.setdefault(q, [])[:0] = items
        self.n_pending += n

    async def _flush(self, batch: dict[str, list[Settle]], cfg: Config) -> None:
        released = 0
        scheduled = False
        for q, chunk, flags in await settle(self.rt.redis, cfg, batch):
            scheduled = scheduled or any(s.op == "R" for s in chunk)
            held = self.held.get(q, {})
            for s, flag in zip(chunk, flags, strict=True):
                if flag == "0":
                    self._stale(q, s)
                if held.pop(s.eid, None) is not None:
                    released += 1
        self.n_held -= released
        if released:
            self.slot_freed.set()
        if scheduled:
            self.rt.scheduler_wakeup.set()

    def _stale(self, q: str, s: Settle) -> None:
        """The entry was no longer ours (the reaper took it back): outcome discarded."""
        self._stale_logged += 1
        log.warning("job %s in %s was already settled (a retried flush whose first reply was "
                    "lost), or reclaimed while this daemon held it (then it runs again); "
                    "outcome %s not applied", s.job_id, q, s.op)

    # ------------------------------------------------------------ leases

    async def _renew_loop(self) -> None:
        rt = self.rt
        while True:
            cfg = rt.config
            interval = min(cfg.reaper.visibility_timeout_s / 3, cfg.heartbeat.interval_s)
            await asyncio.sleep(interval)
            await self.limiter.renew()  # concurrency slot leases; logs Redis errors itself
            held = {q: list(entries) for q, entries in self.held.items() if entries}
            if not held:
                continue
            try:
                async with rt.redis.pipeline(transaction=False) as p:
                    for q, eids in held.items():
                        for i in range(0, len(eids), 1000):
                            p.xclaim(QueueKeys(cfg.redis.prefix, q).stream, GROUP, rt.name, 0,
                                     list[Any](eids[i:i + 1000]), justid=True)
                    await p.execute()
            except Exception as e:
                if not rt.is_redis_error(e):
                    raise
                log.warning("lease renewal failed: %s", e)

    def snapshot(self) -> dict[str, int]:
        return {"capacity": self.capacity, "running": self.running,
                "buffered": len(self.buffer), "held": self.n_held,
                "pending_acks": self.n_pending}


def _error_text(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    return text[:MAX_ERROR_CHARS]


def _tb(e: BaseException) -> str:
    return "".join(traceback.format_exception(e))[-MAX_TRACEBACK_CHARS:]
