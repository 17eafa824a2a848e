"""The consumer pool: holdings, hand-off, consumers, acker, leases, resize, drain.

Data flow (one daemon)::

    streams --Fetcher (batched, SWRR-ordered)--> Handoff (prefetch) --> N consumers
       ^   ^                                                      | Executor.run -> outcome
       |   +-- complete.lua calls ride on the next fetch <---- pending <-- Settler.build
       +------ or the acker sends them alone (fetcher idle, or after ACK_LINGER_S)

The pool decides nothing about a job: `jobqd.execute` runs it and returns an
outcome value, `jobqd.settle` turns the outcome into a settle record (and,
once Redis applied it, a metric, a ledger event and a log line). The pool
owns what is held:

* Fetching is batched by design: at most ``consumers`` running plus ``prefetch``
  buffered, refilled once the buffer is down to half (`_to_fetch`).
* Consumers are long-lived tasks (no task per job). A job keeps the config it
  started with.
* Settles ride on the next fetch's round trip (its pipeline starts with the
  complete.lua calls); the acker sends them alone when the fetcher is idle (at
  once) or after ACK_LINGER_S, so at low load a settle stays one round trip.
* Held entries have their lease renewed (XCLAIM ... JUSTID resets the idle
  time), so the reaper's visibility timeout only catches an owner that stopped.
* Job deadlines: one coarse tick marks a run as timed out, then cancels its
  consumer (`execute` tells that apart from a drain's cancellation).
* Drain (``stop`` set): stop fetching; hand back buffered jobs at once (no
  attempt used); give running jobs ``shutdown.drain_timeout_s``; cancel the
  rest and hand them back for immediate redelivery; flush every outcome, all
  bounded by ``shutdown.handback_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson

from jobqd.aio import Backoff, wait_first
from jobqd.channels import QueueWeights
from jobqd.config import Config
from jobqd.deps import is_redis_error
from jobqd.events import NoEvents
from jobqd.execute import Executor, Running
from jobqd.fetch import Fetcher
from jobqd.keys import GROUP, GlobalKeys, QueueKeys
from jobqd.limits import Limiter
from jobqd.outcomes import Abandoned, Delivery, HandedBack, Outcome
from jobqd.process_pool import ProcessPool
from jobqd.runtime import Runtime
from jobqd.scripts import FORGET_CONSUMER
from jobqd.settle import Completion, Settle, Settler, try_decode

log = logging.getLogger("jobqd.pool")

DEADLINE_TICK_S = 0.05  # job timeouts are enforced to within this
ACK_LINGER_S = 0.01  # under load, a settle waits at most this long for a fetch to carry it
PREFETCH_MAX_RUN_S = 0.05  # unset `prefetch`: fetch ahead only while runs average less
PREFETCH_PER_CONSUMER = 4  # unset `prefetch`, short runs: this many per consumer ahead
RUN_EWMA = 0.05  # weight of the latest run in that average
BUFFER_STALE_S = 1.0  # buffered jobs nobody could start for this long are handed back
PROGRESS_FLUSH_S = 0.5  # progress reports are written at most this often per job


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


class _Starts:
    """Metrics and the ledger's `started` event when a handler starts."""

    def __init__(self, rt: Runtime) -> None:
        self.metrics = rt.metrics
        self.events = None if type(rt.events) is NoEvents else rt.events  # hot path

    def started(self, run: Running) -> None:
        d, env = run.delivery, run.env
        assert env is not None and run.started_ms is not None
        eid = d.eid  # <ms>-<seq>: the time Redis added the entry
        self.metrics.job_started(d.queue, (run.started_ms - int(eid[:eid.index(b"-")])) / 1000.0)
        if self.events is not None:
            self.events.record("started", env.id, d.queue, env.task, attempt=env.attempt + 1,
                               lost=env.lost, ts_ms=run.started_ms, enq_ms=env.enq_ms)


def fetch_size(capacity: int, prefetch: int | None, avg_run_s: float, *, running: int,
               buffered: int, pending: int) -> int:
    """How many entries the next fetch asks for; 0: not now.

    The consumers plus `ahead` jobs are the most a daemon has started or buffered.
    Refill only once the buffer is down to half of `ahead`, so fetches (and the
    settles riding on them) come in batches of about `ahead` / 2 or more — by
    design, not by the timing of round trips. Jobs awaiting their settle do not
    count (they ride on this very fetch), unless settles keep failing: then
    fetching stops too. Unset `prefetch`: PREFETCH_PER_CONSUMER per consumer while
    runs average under PREFETCH_MAX_RUN_S (Celery's worker_prefetch_multiplier is 4
    too; under 0.2 s of work at that run time), none for longer jobs (a job buffered
    behind a long one would wait while another daemon is idle)."""
    ahead = prefetch
    if ahead is None:
        ahead = PREFETCH_PER_CONSUMER * capacity if avg_run_s < PREFETCH_MAX_RUN_S else 0
    if buffered > ahead // 2 or pending > capacity + ahead:
        return 0
    return max(0, capacity + ahead - running - buffered)


class Pool:
    def __init__(self, rt: Runtime, weights: QueueWeights | None = None,
                 scheduler_wakeup: asyncio.Event | None = None) -> None:
        self.rt = rt
        self.weights = weights if weights is not None else QueueWeights()  # what may start
        # set when this pool schedules a retry or deferral: the scheduler re-plans its sleep
        self.scheduler_wakeup = scheduler_wakeup or asyncio.Event()
        self.started = asyncio.Event()  # the consumers run (the daemon then says READY)
        self.buffer = Handoff()
        self.held: dict[str, dict[bytes, Delivery]] = {}
        self.n_held = 0
        self.capacity = rt.config.consumers
        self.slot_freed = asyncio.Event()
        self.pending: dict[str, list[Settle]] = {}
        self.n_pending = 0
        self.ack_wakeup = asyncio.Event()
        # set while the fetcher will not send a fetch soon (blocking read, paused, backing
        # off, stopped): the acker then flushes at once instead of lingering
        self.fetch_idle = asyncio.Event()
        self.fetch_idle.set()
        # moving average of run times (decides unset `prefetch`): unknown at start, so
        # taken as long: a first fetch of long jobs must not buffer what others could run
        self.avg_run_s = PREFETCH_MAX_RUN_S
        self.starts = 0  # jobs started (the deadline tick notices a buffer standing still)
        # set when a job starts on an idle pool (the one way work begins: a fetched job
        # is either taken by a consumer at once or buffered, and a buffer keeps the tick
        # going); cleared by the deadline tick once nothing runs or is buffered. The
        # tick and the progress writer wait for it then: an idle daemon does not wake
        # for them
        self.work = asyncio.Event()
        self.acks_flushed = asyncio.Event()
        self.idle = asyncio.Event()
        self.consumers: dict[asyncio.Task[None], Running | None] = {}
        self.retiring = 0
        self.running = 0  # jobs being run now
        # Threads for plain-def handlers are made on demand; at most `consumers` are busy
        # with live jobs. The generous cap means a timed-out handler that keeps its
        # thread busy never shrinks the pool: the next job gets a fresh thread.
        self.threads = ThreadPoolExecutor(max_workers=10_000, thread_name_prefix="jobqd-sync")
        self.limiter = Limiter(rt)  # per-task concurrency and rate limits (all daemons)
        self.fetcher = Fetcher(rt.redis, rt.name)
        self.cancelled: set[str] = set()  # held job ids cancelled before they started
        self.progress_latest: dict[str, tuple[str, bytes]] = {}  # job id -> (queue, json)
        self.progress_lock = threading.Lock()  # handlers in threads report progress too
        # worker processes for tasks with executor: process (started only if one exists)
        self.procs = ProcessPool(lambda: rt.config, rt.metrics)
        self.executor = Executor(self.limiter, _Starts(rt), self.threads, self.procs,
                                 cancelled=self.cancelled, progress=self)
        self.settler = Settler(rt.metrics, rt.events, rt.name, lambda: rt.config,
                               scheduled=self.scheduler_wakeup)
        self.tg: asyncio.TaskGroup | None = None
        self.fetch_task: asyncio.Task[None] | None = None

    @property
    def threads_busy(self) -> int:
        """Sync handlers whose thread still runs (they cannot be stopped)."""
        return sum(1 for r in self.consumers.values() if r is not None and r.thread_running())

    # ------------------------------------------------------------ lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        rt = self.rt
        try:
            async with asyncio.TaskGroup() as tg:
                self.tg = tg
                loops = [tg.create_task(self._ack_loop(), name="jobqd-acker"),
                         tg.create_task(self._renew_loop(), name="jobqd-lease-renewal"),
                         tg.create_task(self._deadline_loop(), name="jobqd-timeouts"),
                         tg.create_task(self._control_loop(), name="jobqd-control"),
                         tg.create_task(self._progress_loop(), name="jobqd-progress")]
                self.resize(self.capacity)
                if any(t.kind == "process" for t in rt.config.tasks.values()):
                    self.procs.start()  # else lazily, by the first process job (a reload)
                self.fetch_task = tg.create_task(self._fetch_loop(stop), name="jobqd-fetcher")
                rt.health.consumers_running = True
                self.started.set()
                await stop.wait()
                await self._drain()
                await self.procs.close()  # running process jobs were killed by the drain
                for t in loops:
                    t.cancel()
        finally:
            rt.health.consumers_running = False
            self.procs.kill_all()  # a forced stop; a no-op after close
            self.threads.shutdown(wait=False, cancel_futures=True)

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
        cfg = self.rt.config
        t0 = time.monotonic()
        # 1. stop intake
        if self.fetch_task is not None:
            self.fetch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.fetch_task
        await self.fetcher.stop_reads()  # Redis Cluster: the per-slot blocking reads
        # 2. fetched but not started: back at once, no attempt used; also entries a
        #    cancelled fetch delivered to us whose reply we never read
        handed = 0
        for d in self.buffer.take_all():
            if d is not None:
                self._outcome(d, None, HandedBack())
                handed += 1
        try:
            orphans = await asyncio.wait_for(self._orphans(), cfg.shutdown.handback_timeout_s)
        except Exception as e:  # the reaper recovers them (visibility timeout)
            if not (is_redis_error(e) or isinstance(e, TimeoutError)):
                raise
            orphans = []
        for d in orphans:
            self._hold(d)
            self._outcome(d, None, HandedBack())
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
        busy = [(t, r) for t, r in self.consumers.items() if r is not None]
        if busy:
            log.warning("drain timeout (%gs): cancelling %d running jobs and handing them back",
                        cfg.shutdown.drain_timeout_s, len(busy))
            for t, r in busy:
                r.deadline = None  # from here on a cancellation means: hand back
                t.cancel()
        if self.consumers:
            await asyncio.wait(list(self.consumers), timeout=cfg.shutdown.handback_timeout_s)
        for t, left in list(self.consumers.items()):
            if left is not None and not t.done():
                d = left.delivery
                log.error("a handler ignored cancellation; abandoning its consumer (job entry "
                          "%s of %s is left to the reaper)", d.eid.decode(), d.queue)
                self._release(d)
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

    async def _forget_consumer(self) -> None:
        """Remove this daemon's consumer from every group in which it owns nothing.

        Only then: XGROUP DELCONSUMER would drop owned entries from the PEL while they
        stay in the stream, where no one would ever see them again.
        """
        rt = self.rt
        prefix = rt.config.redis.prefix
        for q in sorted(self.fetcher.groups | set(rt.config.queues)):
            try:
                gone = await FORGET_CONSUMER(rt.redis, [QueueKeys(prefix, q).stream],
                                             [GROUP, rt.name])
            except Exception as e:
                if not is_redis_error(e):
                    raise
                continue
            if not gone:
                log.warning("this daemon still owns entries in %s: the reaper recovers them", q)

    async def _orphans(self) -> list[Delivery]:
        cfg = self.rt.config
        return await self.fetcher.orphans(cfg.redis.prefix, cfg.queues, self.held)

    # ------------------------------------------------------------ fetching

    def _to_fetch(self, cfg: Config) -> int:
        return fetch_size(self.capacity, cfg.prefetch, self.avg_run_s, running=self.running,
                          buffered=len(self.buffer), pending=self.n_pending)

    async def _fetch_loop(self, stop: asyncio.Event) -> None:
        try:
            await self._fetching(stop)
        finally:
            self._idle()

    async def _fetching(self, stop: asyncio.Event) -> None:
        backoff = Backoff()
        rt = self.rt
        orphans = False
        while not stop.is_set():
            if orphans:
                try:
                    await self._adopt_orphans()
                    orphans = False
                except Exception as e:
                    if not is_redis_error(e):
                        raise
                    self._idle()
                    await asyncio.sleep(backoff.next())
                    continue
            cfg = rt.config
            n = self._to_fetch(cfg)
            if n <= 0:
                self.slot_freed.clear()
                if self._to_fetch(cfg) <= 0:
                    self.fetch_idle.clear()  # a consumer frees a slot soon: acks linger
                    await self.slot_freed.wait()
                continue
            weights = self.weights.for_fetch(cfg)  # paused queues start nothing
            completion = None
            if self.fetcher.blocks(cfg.queues, weights):
                self._idle()  # the acker flushes settles while the read blocks
            else:
                self.fetch_idle.clear()
                if self.pending:
                    completion = Completion(cfg, self._take_pending())
            try:
                got, replies = await self.fetcher.fetch(
                    cfg.redis.prefix, cfg.queues, weights, n,
                    before=completion.calls if completion is not None else ())
            except BaseException as e:
                if completion is not None:
                    self._requeue(completion.groups)
                if not is_redis_error(e):
                    raise
                rt.health.redis_ok = False
                orphans = True  # its reply may be lost with entries delivered to us
                delay = backoff.next()
                log.warning("fetch failed (%s: %s); retrying in %.1fs", type(e).__name__, e, delay)
                self._idle()
                await asyncio.sleep(delay)
            else:
                for d in got:
                    self._take(d)
                if completion is not None:
                    self._settled(completion, replies)
                if not rt.health.redis_ok:
                    log.info("redis is back")
                rt.health.redis_ok = True
                backoff.reset()

    def _idle(self) -> None:
        """No fetch is coming soon: the acker must not wait for one."""
        self.fetch_idle.set()
        if self.pending:
            self.ack_wakeup.set()

    async def _adopt_orphans(self) -> None:
        """After a failed fetch: run the entries its lost reply delivered to us now,
        instead of leaving them to the visibility timeout."""
        for d in await self._orphans():
            log.warning("taking back entry %s of %s delivered by a lost fetch reply",
                        d.eid.decode(), d.queue)
            self._take(d)

    def _hold(self, d: Delivery) -> None:
        self.held.setdefault(d.queue, {})[d.eid] = d
        self.n_held += 1

    def _take(self, d: Delivery) -> None:
        self._hold(d)
        self.buffer.put(d)

    def _release(self, d: Delivery) -> None:
        """Stop holding an entry (settled, or abandoned to the reaper)."""
        if self.held.get(d.queue, {}).pop(d.eid, None) is not None:
            self.n_held -= 1
            self.slot_freed.set()

    # ------------------------------------------------------------ running

    async def _consumer(self) -> None:
        me = asyncio.current_task()
        assert me is not None
        items = self.buffer.items
        while True:
            if items:  # under load: the next job is buffered already (no coroutine)
                d = items.popleft()
            else:
                try:
                    d = await self.buffer.get()
                except asyncio.CancelledError:
                    if me.cancelling():
                        raise
                    # a deadline's cancellation that arrived after its job had already
                    # finished (and was uncancelled): ours, and stale
                    continue
            if d is None:
                if self.retiring:
                    self.retiring -= 1
                return
            if not self.weights.starts(d.queue):
                # fetched just before the pause was seen (a blocking read in flight):
                # back to the queue unstarted, no attempt used
                self._outcome(d, None, HandedBack())
                continue
            run = Running(d, me)
            self.consumers[me] = run
            self.running += 1
            if self.running == 1:  # the pool was idle: the deadline tick may be waiting
                self.work.set()
            self.starts += 1
            self.slot_freed.set()  # the buffer shrank: maybe time to refill
            outcome: Outcome = HandedBack()  # if a bug escapes `run`, the job is not lost
            try:
                outcome = await self.executor.run(run, self.rt.config)
            finally:
                self.consumers[me] = None
                self.running -= 1
                self._outcome(d, run, outcome)
                self.slot_freed.set()
                if not self.running:
                    self.idle.set()
            if me.cancelling():  # drain or forced stop: the outcome is a hand-back
                raise asyncio.CancelledError

    def _outcome(self, d: Delivery, run: Running | None, outcome: Outcome) -> None:
        duration_s = 0.0
        if run is not None:
            duration_s = run.duration_s
            self.avg_run_s += (duration_s - self.avg_run_s) * RUN_EWMA
            if run.env is not None and self.cancelled:
                self.cancelled.discard(run.env.id)
        if isinstance(outcome, Abandoned):
            log.warning("job entry %s of %s is %s: left to the reaper", d.eid.decode(),
                        d.queue, outcome.why)
            self._release(d)
            return
        s = self.settler.build(outcome, d, run.env if run else None,
                               started_ms=run.started_ms if run else None,
                               duration_s=duration_s)
        if s is None:
            self._release(d)
            return
        self.pending.setdefault(d.queue, []).append(s)
        self.n_pending += 1
        self.ack_wakeup.set()

    async def _deadline_loop(self) -> None:
        """Job timeouts: one coarse timer for the pool instead of one per job. The same
        tick hands back a buffer that stood still for BUFFER_STALE_S. With nothing
        running or buffered it waits for a job to start instead of ticking."""
        still = 0  # ticks the buffer had jobs and none started
        starts = self.starts
        while True:
            if not self.running and not len(self.buffer):
                self.work.clear()
                await self.work.wait()
            await asyncio.sleep(DEADLINE_TICK_S)
            now = time.monotonic()
            for t, run in list(self.consumers.items()):
                if run is not None and run.deadline is not None and run.deadline <= now:
                    run.deadline = None
                    if run.stop_reason is None:
                        run.stop_reason = "timeout"
                        t.cancel()
            still = still + 1 if len(self.buffer) and self.starts == starts else 0
            starts = self.starts
            if still * DEADLINE_TICK_S >= BUFFER_STALE_S and self.rt.config.prefetch is None:
                still = 0
                self._hand_back_buffer()

    def _hand_back_buffer(self) -> None:
        """Every consumer is busy with jobs longer than the prefetch expected: the
        buffered jobs go back to their queues (no attempt used), where an idle
        daemon takes them instead of them waiting here."""
        items = self.buffer.take_all()
        jobs = [d for d in items if d is not None]
        for d in items:
            if d is None:  # a retiring consumer's signal stays
                self.buffer.put(None)
        for d in jobs:
            self._outcome(d, None, HandedBack())
        if jobs:
            # the runs are long after all: fetch no further ahead until they are not
            self.avg_run_s = max(self.avg_run_s, PREFETCH_MAX_RUN_S)
            log.info("handed back %d buffered jobs: no consumer was free for %gs",
                     len(jobs), BUFFER_STALE_S)

    # ------------------------------------------------------------ cancel, progress

    def cancel_job(self, job_id: str) -> bool:
        """Stop a job this daemon holds because it was cancelled (see `Running.cancel`);
        a fetched job that has not started yet never starts. False: not held here."""
        for run in self.consumers.values():
            if run is not None and run.env is not None and run.env.id == job_id:
                log.info("cancelling running job %s", job_id)
                run.cancel()
                return True
        for d in self.buffer.items:
            env = try_decode(d) if d is not None else None  # rare: a cancel arrived
            if env is not None and env.id == job_id:
                self.cancelled.add(job_id)
                return True
        return False

    async def _control_loop(self) -> None:
        """Cancels, pushed on the control channel (within milliseconds). The cancel
        set in Redis is the state: after every (re)subscribe, and on every lease
        renewal, the held jobs are checked against it, so a daemon that was cut off
        when the cancel was sent still honours it."""
        rt = self.rt
        backoff = Backoff()
        channel = GlobalKeys(rt.config.redis.prefix).control
        while True:
            pubsub = rt.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(channel)
                await self._poll_cancels()
                backoff.reset()
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is None:
                        continue
                    word, _, arg = bytes(msg["data"]).decode("utf-8", "replace").partition(" ")
                    if word == "cancel":
                        self.cancel_job(arg)
            except Exception as e:
                if not is_redis_error(e):
                    raise
                delay = backoff.next()
                log.warning("control channel lost (%s: %s); again in %.1fs",
                            type(e).__name__, e, delay)
                await asyncio.sleep(delay)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.shield(pubsub.reset())

    async def _poll_cancels(self) -> None:
        """The held jobs that are in their queue's cancel set: stop them."""
        queues = [q for q, entries in self.held.items() if entries]
        if not queues:
            return
        async with self.rt.redis.pipeline(transaction=False) as p:
            self._ask_cancels(p, queues)
            self._stop_cancelled(await p.execute())

    def _ask_cancels(self, p: Any, queues: list[str]) -> None:
        prefix = self.rt.config.redis.prefix
        for q in queues:
            p.smembers(QueueKeys(prefix, q).cancel)

    def _stop_cancelled(self, replies: list[Any]) -> None:
        """Stop the held jobs named in these cancel sets (replies of `_ask_cancels`)."""
        for ids in replies:
            for raw in ids:
                self.cancel_job(raw.decode())

    def progress(self, job_id: str, queue: str, fraction: float, message: str | None) -> None:
        """`current_job().progress(...)`: keep the latest; `_progress_loop` writes it."""
        rec = orjson.dumps({"fraction": fraction, "message": message, "at": time.time()})
        with self.progress_lock:
            self.progress_latest[job_id] = (queue, rec)

    async def _progress_loop(self) -> None:
        """Write the latest progress of running jobs, coalesced: at most one write per
        job every PROGRESS_FLUSH_S, one round trip for all of them."""
        rt = self.rt
        while True:
            if not self.running and not self.progress_latest:
                await self.work.wait()  # no job runs, so none reports progress
            await asyncio.sleep(PROGRESS_FLUSH_S)
            if not self.progress_latest:
                continue
            with self.progress_lock:
                latest, self.progress_latest = self.progress_latest, {}
            live = {r.env.id for r in self.consumers.values() if r is not None and r.env}
            prefix = rt.config.redis.prefix
            try:
                async with rt.redis.pipeline(transaction=False) as p:
                    for job_id, (q, rec) in latest.items():
                        if job_id in live:  # finished meanwhile: complete.lua cleared it
                            p.hset(QueueKeys(prefix, q).progress, job_id, rec)
                    await p.execute()
            except Exception as e:
                if not is_redis_error(e):
                    raise
                log.warning("progress not written: %s", e)

    # ------------------------------------------------------------ acking

    async def _ack_loop(self) -> None:
        """Settle what the fetcher does not carry: while it is idle at once, else
        after ACK_LINGER_S (so a settle waits at most that long for a fetch)."""
        backoff = Backoff()
        rt = self.rt
        while True:
            await self.ack_wakeup.wait()
            self.ack_wakeup.clear()
            if self.pending and not self.fetch_idle.is_set():
                # the next fetch may carry them; if the fetcher goes idle first, flush
                await wait_first(self.fetch_idle, timeout_s=ACK_LINGER_S)
            if not self.pending:
                self.acks_flushed.set()
                continue
            batch = self._take_pending()
            while True:
                try:
                    await self._flush(batch, rt.config)
                    backoff.reset()
                    break
                except asyncio.CancelledError:
                    self._requeue(list(batch.items()))
                    raise
                except Exception as e:
                    if not is_redis_error(e):
                        raise
                    rt.health.redis_ok = False
                    delay = backoff.next()
                    log.warning("ack flush failed (%s: %s); retrying in %.1fs",
                                type(e).__name__, e, delay)
                    await asyncio.sleep(delay)
            self.acks_flushed.set()

    def _take_pending(self) -> dict[str, list[Settle]]:
        batch, self.pending = self.pending, {}
        self.n_pending = 0
        return batch

    def _requeue(self, chunks: list[tuple[str, list[Settle]]]) -> None:
        """Settle records back in front of the pending ones (their flush failed)."""
        for q, items in reversed(chunks):
            self.pending.setdefault(q, [])[:0] = items
            self.n_pending += len(items)
        self.ack_wakeup.set()

    async def _flush(self, batch: dict[str, list[Settle]], cfg: Config) -> None:
        self._applied(await self.settler.settle(self.rt.redis, cfg, batch))

    def _settled(self, completion: Completion, replies: list[Any]) -> None:
        """The settles that rode on a fetch: report and release what Redis applied;
        put back what it refused (the acker retries them, with its backoff)."""
        done, failed, acked = completion.applied(replies)
        self.settler.report_applied(done, acked, self.rt.config)
        self._applied(done)
        if failed:
            log.warning("settle refused (%s: %s); retrying", type(failed[0][1]).__name__,
                        failed[0][1])
            self._requeue([chunk for chunk, _ in failed])

    def _applied(self, done: list[tuple[str, list[Settle], str]]) -> None:
        released = 0
        for q, chunk, flags in done:
            held = self.held.get(q, {})
            for s, flag in zip(chunk, flags, strict=True):
                if flag == "0":
                    log.warning("job %s in %s was already settled (a retried flush whose "
                                "first reply was lost), or reclaimed while this daemon held "
                                "it (then it runs again); outcome %s not applied",
                                s.job_id, q, s.op)
                if held.pop(s.eid, None) is not None:
                    released += 1
        self.n_held -= released
        if released:
            self.slot_freed.set()

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
                    # the cancel sets first: the backstop of the control channel, in the
                    # same round trip as the renewal
                    self._ask_cancels(p, list(held))
                    for q, eids in held.items():
                        for i in range(0, len(eids), 1000):
                            p.xclaim(QueueKeys(cfg.redis.prefix, q).stream, GROUP, rt.name, 0,
                                     list[Any](eids[i:i + 1000]), justid=True)
                    replies = await p.execute()
                self._stop_cancelled(replies[:len(held)])
            except Exception as e:
                if not is_redis_error(e):
                    raise
                log.warning("lease renewal failed: %s", e)

    def snapshot(self) -> dict[str, int]:
        return {"capacity": self.capacity, "running": self.running,
                "buffered": len(self.buffer), "held": self.n_held,
                "pending_acks": self.n_pending}
