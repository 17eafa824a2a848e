"""State shared by the daemon's components: one per daemon process.

`config` is the single reference a reload swaps; a component reads it once per
unit of work (a job keeps the config it started with).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field

import redis.asyncio as aredis

from jobqd.config import Config
from jobqd.events import JobEvents, NoEvents
from jobqd.metrics import Metrics

log = logging.getLogger("jobqd")


@dataclass(slots=True)
class Health:
    redis_ok: bool = True
    postgres_ok: bool | None = None  # None: not configured
    draining: bool = False
    consumers_running: bool = False
    last_reload_error: str | None = None
    crashed: str | None = None  # the component that crashed, if any
    # jobqd.redisguard: Redis's maxmemory-policy as last read, whether it is acceptable
    # (noeviction, or redis.allow_eviction), whether this daemon's last write was
    # refused for lack of memory, and how often Redis was found to have lost its data
    redis_policy: str | None = None
    redis_eviction_ok: bool = True
    redis_oom: bool = False
    redis_data_losses: int = 0
    # Redis's used_memory over redis.max_memory_fraction of maxmemory: enqueues refused
    redis_memory_full: bool = False


@dataclass(eq=False)
class Runtime:
    config: Config
    redis: aredis.Redis
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)
    force_event: asyncio.Event = field(default_factory=asyncio.Event)
    metrics: Metrics = field(default_factory=Metrics)
    health: Health = field(default_factory=Health)
    name: str = field(default_factory=lambda: (
        f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"))
    started_at: float = field(default_factory=time.time)
    events: JobEvents = field(default_factory=NoEvents)  # job lifecycle sink (the ledger)

    @property
    def reaper_name(self) -> str:
        """The consumer the reaper claims into (never the pool's own consumer)."""
        return self.name + ":reaper"

    def stop(self, reason: str = "requested") -> None:
        """The one stop path (SIGTERM, SIGINT, a crashed component, tests). Idempotent."""
        if not self.stop_event.is_set():
            log.info("stopping: %s", reason)
            self.health.draining = True
            self.stop_event.set()

    def swap_config(self, new: Config) -> None:
        """The one reference a reload swaps (components read it once per unit of work)."""
        self.config = new



__all__ = ["Health", "JobEvents", "Runtime"]
