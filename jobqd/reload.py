"""Hot reload: SIGHUP or an edit of the config file (watchfiles, debounced).

Reload = parse -> validate -> import every handler -> swap one reference.
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
import dataclasses
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import watchfiles

from jobqd import config as config_mod
from jobqd import logs, publish, weights
from jobqd.errors import ConfigError
from jobqd.runtime import Runtime

log = logging.getLogger("jobqd.reload")

RESTART_KEYS = ("redis", "http", "postgres", "state_dir", "process_pool")
DEBOUNCE_MS = 300


async def reload(rt: Runtime, resize: Callable[[int], None]) -> bool:
    """Reload the config file; True when the new config was applied."""
    old = rt.config
    try:
        new = config_mod.load(old.path)
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
        await publish.publish(rt)
        await weights.publish(rt)
    except Exception as e:
        if not rt.is_redis_error(e):
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


async def run(rt: Runtime, resize: Callable[[int], None], requests: asyncio.Event,
              stop: asyncio.Event, *, watch: bool = True,
              before: Callable[[], Awaitable[None]] | None = None,
              after: Callable[[bool], Awaitable[None]] | None = None) -> None:
    """Reload on each `requests` (SIGHUP) and on each change of the config file.

    `before` and `after(ok)` bracket every reload (systemd RELOADING=1 / READY=1).
    """

    async def apply() -> None:
        if before is not None:
            await before()
        ok = await reload(rt, resize)
        if after is not None:
            await after(ok)

    async def on_signal() -> None:
        while not stop.is_set():
            waiter = asyncio.ensure_future(requests.wait())
            stopper = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                stopper.cancel()
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
