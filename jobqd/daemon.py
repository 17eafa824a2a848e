"""The supervisor: one TaskGroup owns every long-running component.

Start: (embedded Redis) -> connect -> load scripts -> check that Redis's Lua has
the struct library (exit 69 if not) -> check Redis's maxmemory-policy (exit 78 if
it may evict jobs) and the data epoch -> publish
routing and weights -> heartbeat store -> components -> READY.

Stop (SIGTERM, SIGINT, a crashed component or a test: one idempotent path,
`Runtime.stop`), in order:
1. the pool stops fetching, hands back unstarted jobs, gives running jobs
   ``shutdown.drain_timeout_s``, hands back the rest, flushes its acks;
2. background loops stop (heartbeat last deregisters, the reaper releases
   its lock);
3. the HTTP port closes last (``/readyz`` says "draining" meanwhile).
A second SIGTERM/SIGINT cancels everything at once (exit code FORCED); the
reaper of another daemon, or of the next start, recovers every held job.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import redis.asyncio as aredis

from jobqd import (
    connect,
    cron,
    gauges,
    heartbeat,
    http,
    publish,
    reaper,
    redisguard,
    reload,
    scheduler,
    scripts,
    sdnotify,
    weights,
)
from jobqd.aio import Backoff, wait_first
from jobqd.channels import QueueWeights
from jobqd.config import Config
from jobqd.deps import is_redis_error
from jobqd.embedded import EmbeddedError, EmbeddedRedis
from jobqd.exitcodes import ExitCode
from jobqd.pool import Pool
from jobqd.runtime import Runtime

log = logging.getLogger("jobqd.daemon")

# How long start-up waits for Redis before exiting UNAVAILABLE (69); systemd then
# restarts the daemon. $JOBQD_CONNECT_TIMEOUT_S overrides it.
CONNECT_TIMEOUT_S = float(os.environ.get("JOBQD_CONNECT_TIMEOUT_S", "15"))
GC_GEN0 = 20_000  # allocations between young-generation collections (Python: 700)


class _Forced(Exception):
    pass


class Daemon:
    """One daemon. `run()` returns an exit code; `stop()` is safe from any task."""

    def __init__(self, cfg: Config, *, install_signals: bool = True, watch_config: bool = True,
                 on_ready: Callable[[Runtime], Awaitable[None]] | None = None) -> None:
        self.cfg = cfg
        self.install_signals = install_signals
        self.watch_config = watch_config
        self.on_ready = on_ready
        self.rt: Runtime | None = None
        self.pool: Pool | None = None
        self.reload_requests = asyncio.Event()
        self.embedded: EmbeddedRedis | None = None
        self._pending_stop: str | None = None
        self.notifier = sdnotify.Notifier()
        self.http_address: tuple[str, int] | None = None
        self.http_bound = asyncio.Event()
        # channels between components, made here so who tells whom what is in one place
        self.weights = QueueWeights()  # weights loop, Redis guard -> pool, gauges
        self.schedules_changed = asyncio.Event()  # an applied reload -> the schedule loop
        self._http_socks: list[socket.socket] = []
        self._exit_code: ExitCode | None = None  # a fault that decides the exit code

    def stop(self, reason: str = "requested") -> None:
        if self.rt is not None:
            self.rt.stop(reason)
        else:
            self._pending_stop = reason

    def _on_stop_signal(self, name: str) -> None:
        if self.rt is not None and self.rt.stop_event.is_set():
            log.warning("%s again: exiting now without finishing the drain", name)
            self.rt.force_event.set()
        else:
            self.stop(name)

    async def run(self) -> ExitCode:
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        if self.install_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._on_stop_signal, sig.name)
                installed.append(sig)
            loop.add_signal_handler(signal.SIGHUP, self.reload_requests.set)
            installed.append(signal.SIGHUP)
        try:
            return await self._run()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    async def _connect(self) -> aredis.Redis | None:
        cfg = self.cfg
        if cfg.redis.embedded:
            self.embedded = EmbeddedRedis(cfg)
            try:
                await self.embedded.start()
            except EmbeddedError as e:
                log.error("%s", e)
                return None
        # socket_timeout (redis.socket_timeout_s, above the 2 s blocking read) turns a
        # silently dropped connection into an error we recover from, instead of a
        # fetcher hung forever
        options: dict[str, Any] = {"decode_responses": False, "health_check_interval": 15,
                                   "socket_connect_timeout": 5,
                                   "socket_timeout": cfg.redis.socket_timeout_s}
        if not cfg.redis_url.startswith("unix://"):
            options["socket_keepalive"] = True
        r = connect.connect(cfg.redis_url, **options)
        backoff = Backoff(0.2, 2.0)
        deadline = asyncio.get_running_loop().time() + CONNECT_TIMEOUT_S
        while True:
            try:
                await r.ping()
                await scripts.preload(r)
                return r
            except Exception as e:
                if not is_redis_error(e):
                    raise
                if asyncio.get_running_loop().time() > deadline:
                    log.error("cannot connect to redis at %s: %s", _safe_url(cfg), e)
                    await r.aclose()
                    return None
                log.warning("waiting for redis at %s: %s", _safe_url(cfg), e)
                await asyncio.sleep(backoff.next())

    async def _run(self) -> ExitCode:
        # the HTTP port first: one taken by another program stops us before anything starts
        http_cfg = self.cfg.http
        try:
            self._http_socks = http.bind(http_cfg.listen, http_cfg.host, http_cfg.port)
        except http.BindError as e:
            log.error("%s", e)
            return ExitCode.UNAVAILABLE
        try:
            return await self._run_bound()
        finally:
            for sock in self._http_socks:
                sock.close()

    async def _run_bound(self) -> ExitCode:
        try:
            r = await self._connect()
        except BaseException:
            await self._stop_embedded()
            raise
        if r is None:
            await self._stop_embedded()
            return ExitCode.UNAVAILABLE
        rt = self.rt = Runtime(config=self.cfg, redis=r)
        if self._pending_stop:
            rt.stop(self._pending_stop)
        store = heartbeat.make_store(rt)
        guard = redisguard.Guard(rt, self.weights)
        try:
            problem = await scripts.check_lua(r)
            if problem is not None:  # the environment lacks what jobqd needs: see exitcodes
                log.error("refusing to run: %s", problem)
                return ExitCode.UNAVAILABLE
            problem = await guard.start()
            if problem is not None:
                log.error("refusing to run: %s", problem)
                return ExitCode.CONFIG
            await publish.publish(r, rt.config)
            await publish.publish_weights(r, rt.config)
            await weights.refresh(r, rt.config, self.weights)
            if self.cfg.postgres.ledger:
                from jobqd.ledger import Ledger  # noqa: PLC0415 - only with PostgreSQL

                rt.events = Ledger(rt)
            if self.cfg.postgres.dsn:
                from jobqd.pg import PgSetupError  # noqa: PLC0415 - only with PostgreSQL

                try:
                    await store.start()
                except PgSetupError as e:  # a database or role that does not exist
                    log.error("%s", e)
                    return e.exit_code
            else:
                await store.start()
            return await self._supervise(rt, store, guard)
        finally:
            with contextlib.suppress(Exception):
                await store.close()
            await r.aclose()
            await self._stop_embedded()

    async def _stop_embedded(self) -> None:
        if self.embedded is not None:
            await self.embedded.stop()

    async def _supervise(self, rt: Runtime, store: heartbeat.HeartbeatStore,
                         guard: redisguard.Guard) -> ExitCode:
        # the channels between components (jobqd.channels): who tells whom what
        scheduler_wakeup = asyncio.Event()  # the pool scheduled a retry: re-plan the sleep
        pool = self.pool = Pool(rt, self.weights, scheduler_wakeup)
        bg_stop = asyncio.Event()
        last_stop = asyncio.Event()

        async def guarded(name: str, coro: Awaitable[Any]) -> None:
            try:
                await coro
            except Exception:
                log.exception("component %s crashed; stopping", name)
                rt.health.crashed = rt.health.crashed or name
                rt.stop(f"{name} crashed")

        async def forced() -> None:
            await rt.force_event.wait()
            raise _Forced

        try:
            async with asyncio.TaskGroup() as tg:
                last = [tg.create_task(c)
                        for c in self._last_components(rt, guarded, last_stop)]
                bg = [
                    tg.create_task(guarded("heartbeat", heartbeat.run(rt, store, bg_stop,
                                                                      stats=pool.snapshot))),
                    tg.create_task(guarded("reaper", reaper.run(rt, store, bg_stop,
                                                             scheduler_wakeup))),
                    tg.create_task(guarded("scheduler", scheduler.run(rt, scheduler_wakeup,
                                                                      bg_stop))),
                    tg.create_task(guarded("cron", cron.run(rt, bg_stop,
                                                            changed=self.schedules_changed))),
                    tg.create_task(guarded("weights", weights.run(rt, self.weights, bg_stop))),
                    tg.create_task(guarded("redisguard", redisguard.run(guard, bg_stop))),
                    tg.create_task(guarded("gauges", gauges.run(rt, pool.snapshot, self.weights,
                                                                bg_stop))),
                    tg.create_task(guarded("reload", reload.run(
                        rt, pool.resize, self.reload_requests, bg_stop,
                        watch=self.watch_config, before=self._reload_started,
                        after=self._reload_done, applied=self._reload_applied))),
                    tg.create_task(self._announce(rt)),
                ]
                if self.embedded is not None:
                    bg.append(tg.create_task(guarded("embedded", self._watch_embedded(
                        rt, self.embedded, bg_stop))))
                if rt.config.postgres.dsn:
                    from jobqd import relay  # noqa: PLC0415 - only with PostgreSQL

                    bg.append(tg.create_task(guarded("outbox", relay.run(rt, bg_stop))))
                force_task = tg.create_task(forced())
                pool_task = tg.create_task(guarded("pool", pool.run(rt.stop_event)))
                await pool_task
                bg_stop.set()
                await asyncio.wait(bg, timeout=rt.config.shutdown.handback_timeout_s)
                last_stop.set()
                if last:  # the ledger writes out the drain's last events here
                    await asyncio.wait(last, timeout=rt.config.shutdown.handback_timeout_s + 6)
                force_task.cancel()
                for t in (*bg, *last):
                    t.cancel()
        except* _Forced:
            was_forced = True
        else:
            was_forced = False
        if was_forced:
            return ExitCode.FORCED
        if self._exit_code is not None:
            return self._exit_code
        return ExitCode.SOFTWARE if rt.health.crashed else ExitCode.OK

    async def _watch_embedded(self, rt: Runtime, embedded: EmbeddedRedis,
                              stop: asyncio.Event) -> None:
        """Restart the embedded redis-server when it dies; when it cannot be restarted,
        stop and exit UNAVAILABLE (69), so systemd restarts the whole daemon."""
        if not await embedded.supervise(stop):
            self._exit_code = ExitCode.UNAVAILABLE
            rt.stop("the embedded redis-server could not be restarted")

    def _last_components(self, rt: Runtime, guarded: Callable[[str, Awaitable[Any]],
                         Coroutine[Any, Any, None]],
                         stop: asyncio.Event) -> list[Coroutine[Any, Any, None]]:
        """Components that close after everything else: the HTTP port, the watchdog."""
        handback = rt.config.shutdown.handback_timeout_s
        return [
            # the ledger (if any): flushed after the pool's final events
            guarded("events", rt.events.run(stop)),
            guarded("http", http.run(rt, stop, on_bound=self._http_on_bound,
                                     shutdown_timeout_s=min(2.0, handback / 2),
                                     socks=self._http_socks)),
            guarded("watchdog", sdnotify.run_watchdog(self.notifier, stop,
                                                      lambda: self._status_line(rt))),
        ]

    def _http_on_bound(self, host: str, port: int) -> None:
        self.http_address = (host, port)
        self.http_bound.set()
        log.info("http listening on %s:%d", host, port)

    def _status_line(self, rt: Runtime) -> str:
        pool = self.pool
        busy = f"{pool.running}/{pool.capacity} busy" if pool else "starting"
        state = "draining" if rt.health.draining else "running"
        redis_state = "ok" if rt.health.redis_ok else "UNREACHABLE"
        return f"{state}: {busy}, redis {redis_state}"

    async def _announce(self, rt: Runtime) -> None:
        """READY=1 once the consumers run; STOPPING=1 when the drain begins."""
        async def up() -> None:
            assert self.pool is not None
            await self.pool.started.wait()
            await self.http_bound.wait()

        started = asyncio.Event()
        waiter = asyncio.ensure_future(up())
        waiter.add_done_callback(lambda _t: started.set())
        try:
            await wait_first(started, rt.stop_event)
        finally:
            waiter.cancel()
        if not rt.stop_event.is_set():
            if self.install_signals:  # the process is ours (not a test's, nor an app's)
                # what start-up made (modules, handlers, config) lives as long as the
                # daemon: moved out of the collector's generations, a collection walks
                # only what jobs allocate. Then collect young objects less often: a
                # job's objects die by reference count long before GC_GEN0 more are
                # allocated, so a collection no longer walks (and promotes) the
                # in-flight jobs every few jobs (measured in bench/README.md)
                gc.collect()
                gc.freeze()
                was = gc.get_threshold()
                gc.set_threshold(GC_GEN0, *was[1:])
                # read back: what this process now runs with, for whoever compares memory
                # or latency with another Python program
                log.info("gc: froze %d start-up objects, young-generation threshold %d "
                         "(was %d)", gc.get_freeze_count(), gc.get_threshold()[0], was[0])
            self.notifier.ready(self._status_line(rt))
            log.info("ready: %s", self._status_line(rt))
            if self.on_ready is not None:
                await self.on_ready(rt)
        await rt.stop_event.wait()
        self.notifier.stopping()

    async def _reload_started(self) -> None:
        self.notifier.reloading()

    async def _reload_applied(self, new: Config) -> None:
        """A reload swapped the config: the weights the pool reads and the schedule loop
        follow at once (not at their next turn)."""
        self.schedules_changed.set()
        if self.rt is not None:
            await weights.refresh(self.rt.redis, new, self.weights)

    async def _reload_done(self, ok: bool) -> None:
        if self.rt is not None:
            self.notifier.ready(self._status_line(self.rt) + ("" if ok else
                                                              ", last reload REJECTED"))


def _safe_url(cfg: Config) -> str:
    from jobqd.config import mask_url  # noqa: PLC0415

    return mask_url(cfg.redis_url)


def run_daemon(cfg: Config) -> ExitCode:
    """Run a daemon on uvloop until it stops; returns the exit code.

    A sync handler still running in a thread cannot be stopped, and Python would
    wait for it at exit: then the process ends at once (its job is left to the
    reaper, like a dead worker's).
    """
    import uvloop  # noqa: PLC0415

    daemon = Daemon(cfg)
    code = uvloop.run(daemon.run())
    busy = daemon.pool.threads_busy if daemon.pool is not None else 0
    if busy:
        log.warning("%d handler threads are still running: exiting without them", busy)
        logging.shutdown()
        os._exit(int(code))
    return code
