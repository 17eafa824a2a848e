"""Hot reload: SIGHUP or an edit of the config file (watchfiles, debounced).

Reload = read, parse, validate and import every handler (in a worker thread, so
the event loop, heartbeats and lease renewal never wait on it) -> swap one
reference (on the loop). A reload that removes a queue still holding jobs is
refused until the queue is empty (a restart with the new file forces it).
A bad file changes nothing: the old config keeps running, the error is logged
with file, key and line, counted in ``jobqd_config_reloads_total{result="error"}``
and shown by ``/readyz``. In-flight jobs finish under the config they started
with. Applied without restart: tasks, queues, weights, watermarks, consumers,
log level, and the routing published to Redis. Settings that need a restart
(`RESTART_KEYS`) are logged as "restart required" and otherwise left alone.
Handler *code* is not re-imported (Python cannot unload modules safely):
deploy new code with a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import watchfiles

from jobqd import config as config_mod
from jobqd import logs, publish
from jobqd.aio import wait_first
from jobqd.deps import is_redis_error
from jobqd.errors import ConfigError
from jobqd.runtime import Runtime

log = logging.getLogger("jobqd.reload")

RESTART_KEYS = ("redis", "http", "postgres", "state_dir", "process_pool")
DEBOUNCE_MS = 300
# A load (read, parse, validate, import handlers) taking longer is refused: a handler
# module that hangs at import must not hold every later reload up.
LOAD_TIMEOUT_S = 60.0


async def _load_off_loop(path: str) -> config_mod.Config:
    """`config.load(path)` in its own daemon thread, awaited for up to LOAD_TIMEOUT_S.

    Not the default executor: a thread stuck in a handler's import would hold up the
    process's exit (executor threads are joined at exit); a daemon thread is not."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[config_mod.Config] = loop.create_future()

    def settle(result: config_mod.Config | None, error: BaseException | None) -> None:
        if done.done():  # timed out (or the reload was cancelled) meanwhile
            return
        if error is not None:
            done.set_exception(error)
        else:
            assert result is not None
            done.set_result(result)

    def work() -> None:
        try:
            result = config_mod.load(path)
        except BaseException as e:  # handed to the awaiting task, which raises it
            outcome: tuple[config_mod.Config | None, BaseException | None] = (None, e)
        else:
            outcome = (result, None)
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=work, name="jobqd-reload", daemon=True).start()
    try:
        return await asyncio.wait_for(done, LOAD_TIMEOUT_S)
    except TimeoutError:
        raise ConfigError(f"loading took longer than {LOAD_TIMEOUT_S:g}s (a handler module "
                          "that hangs at import?)", path=path) from None


async def reload(rt: Runtime, resize: Callable[[int], None],
                 applied: Callable[[config_mod.Config], Awaitable[None]] | None = None) -> bool:
    """Reload the config file; True when the new config was applied.

    Reading, parsing, validating and importing handlers run in a worker thread
    (`_load_off_loop`): a huge file or a handler module that takes seconds to
    import never stalls the event loop, so heartbeats and lease renewal go on.
    Only the swap of `rt.config` (and what follows from it) happens on the loop.
    `applied(new)` is awaited once the new config is published (the supervisor
    refreshes the weights the pool reads and wakes the schedule loop).
    """
    old = rt.config
    try:
        new = await _load_off_loop(old.path)
        await _refuse_stranding(rt, old, new)
    except ConfigError as e:
        rt.metrics.reloads.labels("error").inc()
        rt.health.last_reload_error = str(e)
        log.error("config reload rejected, the running config stays: %s", e,
                  extra={"file": e.path, "key": e.key, "line": e.line})
        return False
    kept = {}
    for key in RESTART_KEYS:
        if getattr(new, key) != getattr(old, key):
            log.warning("config reload: %s changed; restart required (keeping the running value)",
                        key)
            kept[key] = getattr(old, key)
    if kept:
        new = dataclasses.replace(new, **kept)
    rt.swap_config(new)
    try:
        await publish.publish(rt.redis, new)
        await publish.publish_weights(rt.redis, new)
        if applied is not None:
            await applied(new)
    except Exception as e:
        if not is_redis_error(e):
            raise
        log.warning("config applied, but publishing it to redis failed (%s); retried on the "
                    "next reload or restart", e)
    if new.consumers != old.consumers and rt.stop_event.is_set():
        # a stop arrived while we published: the pool is draining (or gone); a resize now
        # would add consumers the drain never stops, or hit its finished TaskGroup
        log.info("consumers: %d -> %d not applied: stopping", old.consumers, new.consumers)
    elif new.consumers != old.consumers:
        resize(new.consumers)
        log.info("consumers: %d -> %d", old.consumers, new.consumers)
    if new.log.level != old.log.level:
        logs.set_level(new.log.level)
    rt.health.last_reload_error = None
    rt.metrics.reloads.labels("ok").inc()
    log.info("config reloaded from %s", old.path)
    return True


async def _refuse_stranding(rt: Runtime, old: config_mod.Config,
                            new: config_mod.Config) -> None:
    """Refuse a reload that removes a queue still holding jobs (they would be stranded:
    nobody fetches a queue that is not configured). Restart with the new file to force it."""
    removed = set(old.queues) - set(new.queues)
    if not removed:
        return
    try:
        held = await publish.held_jobs(rt.redis, old.redis.prefix, removed)
    except Exception as e:
        if not is_redis_error(e):
            raise
        raise ConfigError(f"cannot check that the removed queues ({', '.join(sorted(removed))}) "
                          f"are empty: redis: {e}", path=old.path, key="queues") from None
    if held:
        what = "; ".join(f"{q!r} holds {publish.describe_held(*n)}"
                         for q, n in sorted(held.items()))
        raise ConfigError(f"removes queues that still hold jobs ({what}): refused until they "
                          "are empty, so no job is stranded (a restart with the new file "
                          "forces it)", path=old.path, key="queues")


async def run(rt: Runtime, resize: Callable[[int], None], requests: asyncio.Event,
              stop: asyncio.Event, *, watch: bool = True,
              before: Callable[[], Awaitable[None]] | None = None,
              after: Callable[[bool], Awaitable[None]] | None = None,
              applied: Callable[[config_mod.Config], Awaitable[None]] | None = None) -> None:
    """Reload on each `requests` (SIGHUP) and on each change of the config file.

    `before` and `after(ok)` bracket every reload (systemd RELOADING=1 / READY=1).
    """

    serial = asyncio.Lock()  # a SIGHUP and a file change: one reload at a time, in order

    async def apply() -> None:
        async with serial:
            if before is not None:
                await before()
            ok = await reload(rt, resize, applied)
            if after is not None:
                await after(ok)

    async def on_signal() -> None:
        while not stop.is_set():
            await wait_first(requests, stop)
            if requests.is_set():
                requests.clear()
                log.info("SIGHUP: reloading %s", rt.config.path)
                await apply()

    async def on_file() -> None:
        # The config path may be a symlink (deploy by `ln -sfn v2.yaml jobqd.yaml`): watch
        # the link's directory as well as its target's, and match a change against the
        # link itself or what the link points to *now*, not at start.
        link = os.path.abspath(rt.config.path)  # noqa: ASYNC240 - no I/O
        dirs = {os.path.dirname(link),
                os.fspath(Path(link).resolve().parent)}  # noqa: ASYNC240 - once at start

        def only_config(_change: watchfiles.Change, changed: str) -> bool:
            return changed == link or os.path.realpath(changed) == os.path.realpath(link)

        async for _ in watchfiles.awatch(*sorted(dirs), watch_filter=only_config,
                                         stop_event=stop, debounce=DEBOUNCE_MS,
                                         recursive=False, rust_timeout=1000):
            # mid-replace by an editor: the next event brings the new file
            if not os.path.exists(link):  # noqa: ASYNC240 - one stat per change
                continue
            log.info("config file changed: reloading %s", link)
            await apply()

    async with asyncio.TaskGroup() as tg:
        tg.create_task(on_signal())
        if watch:
            tg.create_task(on_file())
