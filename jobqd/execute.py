"""Run one job and say what happened, as a value (`jobqd.outcomes`).

`Executor.run` decodes the entry, finds the handler, takes the task's limit slot,
runs the handler under the config the job started with, and returns an outcome:
succeeded, retried (after a delay), dead (with a reason), handed back, deferred
or abandoned. It never settles, counts or logs an outcome itself (that is
`jobqd.settle`) and never calls back into the pool, so a decision here can be
tested without Redis and without sleeping.

Cancellation: the consumer running a job can be cancelled by the pool's
deadline tick (the job's `timeout_s`) or by the drain (or a forced stop). The
canceller marks the run first (`Running.timed_out`), so the reason is decided
in exactly one place (`outcomes.after_cancel`). `run` turns the CancelledError
into an outcome; the consumer re-raises it afterwards whenever a cancellation
other than our own deadline is pending (`Task.cancelling()`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import inspect
import random
import threading
import time
from collections.abc import Container
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from jobqd.config import Config, TaskConfig
from jobqd.errors import Fail, JobCancelled, Retry
from jobqd.jobs import BadJob, CurrentJob, Envelope, ProgressSink, _current, decode_job
from jobqd.outcomes import (
    MAX_ERROR_CHARS,
    Abandoned,
    Cancelled,
    Dead,
    Deferred,
    Delivery,
    FailureKind,
    HandedBack,
    Outcome,
    Succeeded,
    after_cancel,
    after_failure,
    error_text,
    retry_delay,
    safe_text,
    traceback_text,
)
from jobqd.process_pool import HandlerError, ProcessPool, WorkerLost


class Limits(Protocol):
    """Per-task concurrency and rate limits (`jobqd.limits.Limiter`)."""

    def applies(self, task: TaskConfig) -> bool: ...

    async def acquire(self, task: TaskConfig, job_id: str) -> float | None: ...

    def release(self, task: TaskConfig, job_id: str) -> None: ...


class StartSink(Protocol):
    """Told when a job's handler starts (metrics and the ledger)."""

    def started(self, run: Running) -> None: ...


# made once per job at most, and only for handlers that call current_job()
_VIEW_LOCK = threading.Lock()


@dataclass(slots=True, eq=False)
class Running:
    """One delivery between hand-off and outcome: what the pool needs to stop it."""

    delivery: Delivery
    consumer: asyncio.Task[Any]
    env: Envelope | None = None
    task: TaskConfig | None = None
    started_ms: float | None = None
    t0: float = field(default_factory=time.perf_counter)
    deadline: float | None = None  # monotonic; the pool's deadline tick cancels after it
    # set by the pool just before it cancels `consumer` for a reason of its own
    stop_reason: Literal["timeout", "cancel"] | None = None
    thread: concurrent.futures.Future[Any] | None = None  # a sync handler's run
    # what the handler sees (its cancel flag, progress): made when it first calls
    # current_job() (`jobs.CurrentJobSource`), up front for a plain def in a thread
    current: CurrentJob | None = None
    progress: ProgressSink | None = None
    cancelled: bool = False  # cancel() was called (a CurrentJob made later sees it)

    def current_job(self) -> CurrentJob:
        """This job as its handler sees it, made on first use: one view per job, even
        when threads the handler started ask at once (a plain def in a thread gets it
        made before the thread starts). Publishing the view before reading
        `cancelled`, while `cancel()` sets `cancelled` before reading the view, means
        a cancel racing the first call is seen by one side or the other."""
        cur = self.current
        if cur is None:
            with _VIEW_LOCK:  # made at most once per job, so never contended on the hot path
                cur = self.current
                if cur is None:
                    env = self.env
                    assert env is not None, "current_job() before the job was decoded"
                    cur = CurrentJob(
                        id=env.id, task=env.task, queue=self.delivery.queue,
                        attempt=env.attempt + 1, enqueued_at=env.enq_ms / 1000,
                        _progress=self.progress)
                    cur._cancel.is_set = self.cancelled  # an earlier cancel, before anyone sees it
                    self.current = cur
                    if self.cancelled:  # one that came in meanwhile
                        cur._cancel.is_set = True
        return cur

    def cancel(self) -> None:
        """Stop this job because it was cancelled: an async handler gets CancelledError
        at its next await; a process job's worker process is killed; a plain def in a
        thread sees `current_job().cancelled` turn true (a thread cannot be stopped)."""
        self.cancelled = True  # before reading the view: see current_job()
        cur = self.current
        if cur is not None:
            cur._cancel.is_set = True
        if self.stop_reason is None and (self.task is None or self.task.kind != "thread"):
            self.stop_reason = "cancel"
            self.consumer.cancel()

    def thread_running(self) -> bool:
        return self.thread is not None and not self.thread.done()

    @property
    def duration_s(self) -> float:
        return time.perf_counter() - self.t0


def now_ms() -> float:
    return time.time() * 1000.0


def backoff_delay(task: TaskConfig, failed_attempts: int) -> float:
    """Exponential backoff with full jitter: min(base * 2**n, max) * random()."""
    b = task.retry_backoff
    return min(b.base_s * 2.0 ** min(failed_attempts, 62), b.max_s) * random.random()


def bad_args(fn: Any, args: dict[str, Any]) -> str | None:
    """Why `fn(**args)` cannot bind — naming every unexpected and missing
    argument — or None when it can."""
    try:
        sig = inspect.signature(fn)
        sig.bind(**args)
    except (TypeError, ValueError):
        pass
    else:
        return None
    params = sig.parameters
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unexpected = [] if takes_any else [
        k for k in args if k not in params or params[k].kind not in named]
    missing = [n for n, p in params.items()
               if p.kind in named and p.default is inspect.Parameter.empty and n not in args]
    parts = []
    if unexpected:
        parts.append("unexpected " + ", ".join(repr(k) for k in unexpected))
    if missing:
        parts.append("missing " + ", ".join(repr(k) for k in missing))
    return safe_text("; ".join(parts) or "the arguments do not bind", MAX_ERROR_CHARS)


class Executor:
    def __init__(self, limits: Limits, starts: StartSink,
                 threads: concurrent.futures.ThreadPoolExecutor,
                 procs: ProcessPool | None = None, *,
                 cancelled: Container[str] = frozenset(),
                 progress: ProgressSink | None = None) -> None:
        self.limits = limits
        self.starts = starts
        self.threads = threads
        self.procs = procs  # for tasks with executor: process
        self.cancelled = cancelled  # job ids cancelled before they started here
        self.progress = progress

    def _prepare(self, run: Running, cfg: Config) -> TaskConfig | Outcome:
        """Decode the job and decide whether it may start: its task's config, or the
        outcome it ends with unstarted (malformed, unknown task, cancelled, expired)."""
        d = run.delivery
        raw = d.fields.get(b"j")
        if raw is None:
            return Dead("malformed", "entry has no 'j' field")
        try:
            env = run.env = decode_job(raw, d.queue)
        except BadJob as e:
            return Dead("malformed", safe_text(str(e), MAX_ERROR_CHARS))
        task = cfg.tasks.get(env.task)
        if task is None:
            return Dead("unknown_task", safe_text(
                f"no handler for task {env.task!r} in this daemon's config", MAX_ERROR_CHARS))
        run.task = task
        if env.id in self.cancelled:
            return Cancelled()
        exp = env.exp_ms
        if exp is None and task.expires_s is not None:
            exp = env.enq_ms + task.expires_s * 1000.0
        if exp is not None and now_ms() > exp:  # stale work is not done
            return Dead("expired", f"not started before it expired ({(now_ms() - exp) / 1000:.1f}s "
                        "ago)")
        return task

    async def run(self, run: Running, cfg: Config) -> Outcome:
        """Run `run.delivery` under `cfg` (the config it starts with); never raises
        except for a bug. See the module docstring for cancellation. One coroutine
        from decode to outcome: every await of the handler resumes through it."""
        task = self._prepare(run, cfg)
        if not isinstance(task, TaskConfig):
            return task
        env = run.env
        assert env is not None
        limited = self.limits.applies(task)
        if limited:
            try:
                wait = await self.limits.acquire(task, env.id)
            except asyncio.CancelledError:  # drain: not started, back with no attempt used
                return HandedBack()
            if wait is not None:  # over its limit: back through the delayed set
                return Deferred(wait)
        me = run.consumer
        run.started_ms = now_ms()
        self.starts.started(run)
        run.progress = self.progress
        token = _current.set(run)  # current_job() makes the handler's view on first use
        if task.timeout_s is not None:
            run.deadline = time.monotonic() + task.timeout_s
        cancel_seen = False
        try:
            if task.is_async and task.executor is None:  # the hot path: no extra frame
                result = await task.fn(**env.args)
            else:
                result = await self._call(task, env, run)
        except asyncio.CancelledError:
            cancel_seen = True
            own = run.stop_reason if run.stop_reason and me.uncancel() == 0 else None
            decision = after_cancel(own=own, thread_running=run.thread_running())
            if decision == "hand_back":
                return HandedBack()
            if decision == "abandon":
                return Abandoned("still running in a thread")
            if decision == "cancelled":
                return Cancelled()
            return self._failure(task, env, "timeout",
                                 f"timed out after {task.timeout_s:g}s", None)
        except Exception as e:
            return self._raised(e, task, env, cfg)
        else:
            return Succeeded(result)
        finally:
            run.deadline = None
            if run.stop_reason and not cancel_seen:  # (set only when the pool cancelled us)
                me.uncancel()  # the handler swallowed our own cancellation
            _current.reset(token)
            if limited:
                self.limits.release(task, env.id)  # never blocks

    def _raised(self, e: Exception, task: TaskConfig, env: Envelope, cfg: Config) -> Outcome:
        """What the handler's exception means for the job."""
        attempts = env.attempt + 1
        if isinstance(e, Retry):
            requested = retry_delay(e.delay_s)
            if requested is None and e.delay_s is not None:
                return self._failure(task, env, "error", safe_text(
                    f"Retry(delay_s={e.delay_s!r}): delay_s must be a finite number of seconds "
                    f"from 0 to a year; retried with the task's backoff", MAX_ERROR_CHARS), None)
            return self._failure(task, env, "retry", safe_text(str(e.reason), MAX_ERROR_CHARS),
                                 None, requested=requested)
        if isinstance(e, Fail):
            return Dead("failed", safe_text(str(e.reason), MAX_ERROR_CHARS), attempts=attempts)
        if isinstance(e, JobCancelled):  # check_cancelled() in the handler
            return Cancelled()
        if isinstance(e, HandlerError):  # raised in a worker process (executor: process)
            if e.dead == "bad_args":
                return Dead("bad_args", f"the job's args do not fit {task.handler}: {e.error}",
                            attempts=attempts)
            if e.dead is not None:
                return Dead(e.dead, e.error, attempts=attempts)
            return self._failure(task, env, "error", e.error, e.tb)
        if isinstance(e, WorkerLost):  # its worker process died: a lost delivery
            lost = env.lost + 1
            if lost >= cfg.reaper.max_deliveries:
                return Dead("worker_lost", safe_text(f"worker lost {lost} times ({e})",
                                                     MAX_ERROR_CHARS), lost=lost)
            return HandedBack(lost=lost)
        if isinstance(e, TypeError):
            why = bad_args(task.fn, env.args)
            if why is not None:  # a misspelt argument never gets better by retrying
                return Dead("bad_args", f"the job's args do not fit {task.handler}: {why}",
                            attempts=attempts)
        return self._failure(task, env, "error", error_text(e), traceback_text(e))

    def _failure(self, task: TaskConfig, env: Envelope, kind: FailureKind, error: str,
                 tb: str | None, *, requested: float | None = None) -> Outcome:
        return after_failure(kind, error, tb, attempts=env.attempt + 1,
                             max_retries=task.max_retries,
                             backoff_s=backoff_delay(task, env.attempt),
                             requested_delay=requested)

    async def _call(self, task: TaskConfig, env: Envelope, run: Running) -> Any:
        kind = task.kind
        if kind == "process" and self.procs is not None:
            # A worker process can be killed: cancelling us (deadline, drain) kills it.
            # The deadline counts from when a child takes the job, not while it waits.
            run.deadline = None

            def started() -> None:
                if task.timeout_s is not None:
                    run.deadline = time.monotonic() + task.timeout_s

            return await self.procs.run(task, env, run.delivery.queue, started, self.progress)
        if kind == "async":
            return await task.fn(**env.args)
        # A plain def runs in a thread. A thread cannot be killed: at the deadline we
        # stop waiting and count a timeout; the thread finishes on its own (documented).
        run.current_job()  # made here, so the thread never races cancel() to make it
        ctx = contextvars.copy_context()
        fn = task.fn
        run.thread = self.threads.submit(lambda: ctx.run(fn, **env.args))
        return await asyncio.wrap_future(run.thread)
