"""The job lifecycle sink: what the pool and the reaper tell about jobs.

The PostgreSQL ledger (`jobqd.ledger.Ledger`) implements `JobEvents`; a daemon
without one uses `NoEvents`, so no caller ever asks whether a sink exists.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from jobqd.jobs import JobInfo


class JobEvents(Protocol):
    def record(self, event: str, job_id: str, queue: str, task: str, *, attempt: int,
               lost: int, ts_ms: float, enq_ms: float | None = None, error: str | None = None,
               reason: str | None = None, result: Any = None) -> None:
        """One event (started, succeeded, retried, dead...). Called on the hot path: it
        must not block or do I/O itself (buffer, and flush from `run`)."""

    async def run(self, stop: asyncio.Event) -> None:
        """Write events out until `stop`, then what is left (bounded)."""

    async def lookup(self, job_id: str) -> JobInfo | None:
        """A job the sink remembers (after its Redis record expired), or None."""


class NoEvents:
    """The `JobEvents` of a daemon without a ledger: remembers nothing."""

    def record(self, event: str, job_id: str, queue: str, task: str, *, attempt: int,
               lost: int, ts_ms: float, enq_ms: float | None = None, error: str | None = None,
               reason: str | None = None, result: Any = None) -> None:
        return None

    async def run(self, stop: asyncio.Event) -> None:
        return None

    async def lookup(self, job_id: str) -> JobInfo | None:
        return None
