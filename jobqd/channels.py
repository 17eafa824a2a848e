"""Explicit channels between the daemon's components.

The supervisor (`jobqd.daemon`) makes each one and hands it to the component that
writes it and to those that read it, so who tells whom what is visible in one
place, instead of components writing fields of a shared object for others to
find.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jobqd.config import Config


@dataclass(slots=True)
class QueueWeights:
    """What the fetcher may start, queue by queue.

    Written by the weight-refresh loop (`weights`: runtime weights and paused
    queues, from Redis) and the Redis guard (`halted`: an evicting Redis); read by
    the pool and the gauges.
    """

    weights: dict[str, int] = field(default_factory=dict)  # runtime weights (YAML until read)
    paused: frozenset[str] = frozenset()  # queues paused with `jobqd pause`
    halted: bool = False  # Redis's maxmemory-policy may evict jobs: start nothing

    def for_fetch(self, cfg: Config) -> dict[str, int]:
        """Each configured queue's weight for the next fetch (0: start nothing from it)."""
        w = self.weights or {q.name: q.weight for q in cfg.queues.values()}
        if self.halted:
            return dict.fromkeys(w, 0)
        if self.paused:
            return {q: 0 if q in self.paused else n for q, n in w.items()}
        return w

    def starts(self, queue: str) -> bool:
        """May a job of `queue` that was fetched start now?"""
        return not self.halted and queue not in self.paused
