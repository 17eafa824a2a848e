"""Worker processes for CPU-bound handlers (tasks with ``executor: process``).

The daemon owns ``process_pool.size`` children (default: the CPUs it may use).
Each child is a fresh interpreter (`jobqd.process_child`, exec'd like
multiprocessing's spawn method; the daemon's event loop is never forked) that
imports the process tasks' handlers once, by their ``module:function`` names
from the config. Per job it receives only JSON (handler name, args, job id,
attempt, queue, enqueue time) and sends back JSON: the result, or the error
with its traceback. Nothing is pickled. concurrent.futures' process pool is not
used because it cannot kill one child; here every child is its own
`asyncio.subprocess.Process`, so the event loop never blocks on one.

Lifecycle:

* started by the pool when some task uses ``executor: process`` (children are
  spawned in the background), or lazily by the first process job (a reload
  that adds such a task);
* a job waits for a free child; its ``timeout_s`` counts from when a child
  takes it;
* cancellation (the job's deadline, the drain, a forced stop) kills the child:
  SIGTERM, then SIGKILL after ``kill_grace_s``; it is replaced;
* a child that dies under a job (crash, ``os._exit``, SIGKILL from outside,
  the OOM killer) raises `WorkerLost` for that job alone; it is replaced;
* between jobs a child is replaced after ``max_tasks_per_child`` jobs, or when
  its RSS (``/proc/<pid>/status`` VmRSS) is above ``max_memory_mb``;
* `close` (after the drain) ends the idle children: stdin closed, then killed
  if they do not exit within ``kill_grace_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import orjson

from jobqd.config import Config, ProcessPoolConfig, TaskConfig
from jobqd.errors import Fail, Retry
from jobqd.jobs import Envelope, ProgressSink
from jobqd.metrics import Metrics
from jobqd.outcomes import MAX_ERROR_CHARS, MAX_TRACEBACK_CHARS, safe_text
from jobqd.process_child import HEADER

log = logging.getLogger("jobqd.process_pool")

START_TIMEOUT_S = 60.0  # a child that has not imported its handlers by then is killed


class HandlerError(Exception):
    """The handler failed in its child: the error text and traceback it reported.

    `dead` names a dead reason that is not retried (``bad_args``, ``bad_result``).
    """

    def __init__(self, error: str, tb: str | None = None, dead: str | None = None) -> None:
        super().__init__(error)
        self.error = safe_text(error, MAX_ERROR_CHARS)
        self.tb = None if tb is None else safe_text(tb)[-MAX_TRACEBACK_CHARS:]
        self.dead = dead


class WorkerLost(Exception):
    """The child running the job died under it: a lost delivery, not a failed attempt."""


def pool_size(settings: ProcessPoolConfig) -> int:
    if settings.size is not None:
        return settings.size
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def rss_mb(pid: int) -> float | None:
    """A process's resident set size in MiB (Linux /proc), None when unknown."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        return None
    return None


def _child_env() -> dict[str, str]:
    """The daemon's environment, less what systemd meant for the daemon alone."""
    private = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
               "LISTEN_FDNAMES")
    return {k: v for k, v in os.environ.items() if k not in private}


def exit_text(rc: int | None) -> str:
    if rc is None:
        return "did not exit"
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exited with code {rc}"


class Child:
    """One worker process and its two pipes."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.jobs = 0
        self.counted = True  # in ProcessPool.live until `_gone`

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def send(self, obj: Any) -> None:
        assert self.proc.stdin is not None
        body = orjson.dumps(obj)
        try:
            self.proc.stdin.write(HEADER.pack(len(body)) + body)
            await self.proc.stdin.drain()
        except (ConnectionError, RuntimeError) as e:  # RuntimeError: the transport closed
            raise WorkerLost(await self.gone(e)) from None

    async def receive(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        try:
            head = await self.proc.stdout.readexactly(HEADER.size)
            (n,) = HEADER.unpack(head)
            reply: dict[str, Any] = orjson.loads(await self.proc.stdout.readexactly(n))
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            raise WorkerLost(await self.gone(e)) from None
        return reply

    async def gone(self, e: BaseException) -> str:
        """Why the pipe broke: the child's exit (waited for, bounded)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.proc.wait()), 2.0)
        rc = self.proc.returncode
        return f"worker process {self.pid} {exit_text(rc)}" if rc is not None else \
            f"worker process {self.pid}: {type(e).__name__}"

    def signal(self, sig: int) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    async def stop(self, grace_s: float, *, terminate: bool) -> None:
        """End the child: SIGTERM (or, when idle, EOF on stdin), SIGKILL after `grace_s`.

        Bounded; interrupted by a cancellation it still sends SIGKILL on the way out.
        """
        try:
            if terminate:
                self.signal(signal.SIGTERM)
            elif self.proc.stdin is not None:
                self.proc.stdin.close()
            if self.alive:
                try:
                    await asyncio.wait_for(asyncio.shield(self.proc.wait()), grace_s)
                except TimeoutError:
                    self.signal(signal.SIGKILL)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(self.proc.wait()), 5.0)
        finally:
            self.signal(signal.SIGKILL)  # no-op once it exited


class ProcessPool:
    """The daemon's worker processes. `run` runs one job in one of them."""

    def __init__(self, get_config: Callable[[], Config], metrics: Metrics | None = None) -> None:
        self.get_config = get_config
        self.metrics = metrics
        self.settings: ProcessPoolConfig | None = None  # fixed at start (a restart key)
        self.size = 0
        self.idle: list[Child] = []
        self.busy: set[Child] = set()
        self.live = 0  # children started or starting
        self.slots: asyncio.Semaphore | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.closed = False
        self.changed = asyncio.Event()  # a child became idle, or one fewer is live
        self.spawned = 0  # children started since the daemon started (a replacement counts)

    @property
    def started(self) -> bool:
        return self.settings is not None

    def pids(self) -> list[int]:
        return sorted(c.pid for c in (*self.idle, *self.busy))

    def start(self) -> None:
        """Start the pool (idempotent): spawn its children in the background."""
        if self.settings is not None or self.closed:
            return
        self.settings = self.get_config().process_pool
        self.size = max(1, pool_size(self.settings))
        self.slots = asyncio.Semaphore(self.size)
        log.info("process pool: %d worker processes", self.size)
        self._top_up()

    def _background(self, coro: Any, name: str) -> None:
        t = asyncio.get_running_loop().create_task(coro, name=name)
        self.tasks.add(t)
        t.add_done_callback(self._task_done)

    def _task_done(self, t: asyncio.Task[None]) -> None:
        self.tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            log.error("process pool: %s failed", t.get_name(), exc_info=t.exception())

    def _top_up(self) -> None:
        """Start children in the background until there are `size`."""
        for _ in range(self.size - self.live):
            if self.closed:
                return
            self.live += 1
            self._background(self._warm(), "jobqd-process-spawn")

    async def _warm(self) -> None:
        try:
            child = await self._spawn()
        except HandlerError as e:
            log.error("process pool: a worker process did not start: %s", e.error)
            return
        if self.closed:
            await child.stop(self._grace(), terminate=False)
            self._gone(child)
            return
        self._idle(child)

    def _idle(self, child: Child) -> None:
        self.idle.append(child)
        self.changed.set()
        self._gauge()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.process_workers.labels("idle").set(len(self.idle))
            self.metrics.process_workers.labels("busy").set(len(self.busy))

    def _replaced(self, reason: str) -> None:
        if self.metrics is not None and not self.closed:
            self.metrics.process_replaced.labels(reason).inc()

    def _grace(self) -> float:
        return self.settings.kill_grace_s if self.settings is not None else 2.0

    async def _spawn(self) -> Child:
        """A new child, ready (its handlers imported). `live` already counts it."""
        cfg = self.get_config()
        handlers = sorted({t.handler for t in cfg.tasks.values() if t.kind == "process"})
        proc: asyncio.subprocess.Process | None = None
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "jobqd.process_child",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                env=_child_env(),
                start_new_session=True)  # a terminal's Ctrl-C is for the daemon only
            child = Child(proc)
            self.spawned += 1
            await child.send({"path": sys.path, "handlers": handlers})
            hello = await asyncio.wait_for(child.receive(), START_TIMEOUT_S)
        except BaseException as e:
            self.live -= 1
            self.changed.set()
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            if isinstance(e, WorkerLost | TimeoutError | OSError):
                raise HandlerError(f"the worker process did not start: {e}") from None
            raise
        if "ready" not in hello:
            self._gone(child)
            await child.stop(self._grace(), terminate=True)
            raise HandlerError(f"the worker process did not start: {hello.get('error')}")
        log.debug("worker process %d started", child.pid)
        return child

    def _gone(self, child: Child) -> None:
        if not child.counted:  # already gone (a busy child retired by close)
            return
        child.counted = False
        self.live -= 1
        self.busy.discard(child)
        self.changed.set()
        self._gauge()

    def _retire(self, child: Child, *, terminate: bool) -> None:
        """Stop a child in the background and start its replacement."""
        async def stop() -> None:
            try:
                await child.stop(self._grace(), terminate=terminate)
            finally:
                self._gone(child)
                if not self.closed:
                    self._top_up()

        self._background(stop(), "jobqd-process-stop")

    async def run(self, task: TaskConfig, env: Envelope, queue: str,
                  on_start: Callable[[], None], progress: ProgressSink | None = None) -> Any:
        """Run one job in a child; its result, or the handler's exception (Retry, Fail,
        `HandlerError`), or `WorkerLost`. A cancellation kills the child (bounded)."""
        self.start()
        assert self.slots is not None
        async with self.slots:  # cancelled while waiting: nothing ran
            child = await self._acquire()
            self.busy.add(child)
            self._gauge()
            on_start()
            done = False
            try:
                await child.send({"handler": task.handler, "task": env.task, "id": env.id,
                                  "queue": queue, "attempt": env.attempt + 1,
                                  "enq": env.enq_ms, "args": env.args})
                reply = await child.receive()
                while "progress" in reply:  # current_job().progress() in the child
                    if progress is not None:
                        fraction, message = reply["progress"]
                        progress.progress(env.id, queue, float(fraction), message)
                    reply = await child.receive()
                done = True
            except asyncio.CancelledError:
                # our deadline, the drain or a forced stop: the job must not run on
                try:
                    await child.stop(self._grace(), terminate=True)
                finally:  # even if a second cancellation cut the grace short (SIGKILL)
                    log.info("worker process %d killed (%s)", child.pid, exit_text(
                        child.proc.returncode))
                    self._replaced("killed")
                    self._gone(child)
                    self._top_up()
                raise
            except WorkerLost:
                self._replaced("died")
                self._gone(child)
                self._top_up()
                raise
            finally:
                if done:
                    self._release(child)
        return _outcome(reply)

    async def _acquire(self) -> Child:
        """An idle child; or a new one when fewer than `size` live; else wait for one
        that is starting (a replacement) to be ready."""
        while True:
            if self.idle:
                child = self.idle.pop()
                assert child.proc.stdout is not None
                if child.alive and not child.proc.stdout.at_eof():
                    return child
                # it died while idle (killed from outside): no job was lost with it
                log.warning("worker process %d %s while idle; replacing it", child.pid,
                            exit_text(child.proc.returncode))
                self._replaced("died")
                self._retire(child, terminate=True)
                continue
            if self.live < self.size:
                self.live += 1
                return await self._spawn()
            self.changed.clear()
            await self.changed.wait()

    def _release(self, child: Child) -> None:
        """A child finished a job: back to idle, or replaced (max_tasks_per_child,
        max_memory_mb)."""
        self.busy.discard(child)
        child.jobs += 1
        s = self.settings
        assert s is not None
        why = None
        if s.max_tasks_per_child is not None and child.jobs >= s.max_tasks_per_child:
            why = f"it ran {child.jobs} jobs (max_tasks_per_child)"
            self._replaced("max_tasks")
        elif s.max_memory_mb is not None:
            rss = rss_mb(child.pid)
            if rss is not None and rss > s.max_memory_mb:
                why = f"its RSS is {rss:.0f} MiB (max_memory_mb {s.max_memory_mb})"
                self._replaced("max_memory")
        if why is None and (self.closed or not child.alive or self.live > self.size):
            why = "the pool is closing" if self.closed else \
                "it exited" if not child.alive else "the pool has more than its size"
        if why is None:
            self._idle(child)
            return
        log.info("replacing worker process %d: %s", child.pid, why)
        self._retire(child, terminate=False)

    async def close(self) -> None:
        """End every child (after the drain): idle ones exit on EOF, bounded by
        kill_grace_s, then SIGKILL; background spawns are waited for."""
        self.closed = True
        idle, self.idle = self.idle, []
        for child in idle:
            self._retire(child, terminate=False)
        for child in list(self.busy):  # only an abandoned consumer leaves one busy
            self._retire(child, terminate=True)
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=self._grace() + 10.0)

    def kill_all(self) -> None:
        """SIGKILL every child now (a forced stop; no-op after `close`)."""
        self.closed = True
        for child in (*self.idle, *self.busy):
            child.signal(signal.SIGKILL)
        for t in list(self.tasks):
            t.cancel()


def _outcome(reply: dict[str, Any]) -> Any:
    """A child's reply as the handler's result, or the exception it stands for."""
    if "ok" in reply:
        return reply["ok"]
    if "retry" in reply:
        delay: Any = reply["retry"]
        if delay is not None:
            with contextlib.suppress(ValueError):
                delay = float(delay)
        raise Retry(delay_s=delay, reason=str(reply.get("reason", "retry requested")))
    if "fail" in reply:
        raise Fail(str(reply["fail"]))
    if "bad_result" in reply:
        raise HandlerError(str(reply["bad_result"]), dead="bad_result")
    if reply.get("bad_args"):
        raise HandlerError(str(reply["bad_args"]), dead="bad_args")
    raise HandlerError(str(reply.get("error", "the worker process sent no result")),
                       reply.get("tb"))
