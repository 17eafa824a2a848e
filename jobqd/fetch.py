"""Batched fetching for the pool: SWRR-ordered reads, the blocking read when
every queue is empty, and the PEL scan that finds orphaned entries.

`Fetcher.fetch` returns the deliveries in the order their jobs should start;
it never hands them to anyone itself (the pool does).

* It asks for `free` entries in one pipelined round trip, one XREADGROUP per
  queue, the counts following smooth weighted round-robin over the queues that
  have work; empty queues are probed with COUNT 1 in the same pipeline.
* When every queue is empty, one blocking XREADGROUP covers all streams
  (`BLOCK_MS`): it never busy-polls. On a Redis Cluster, one per hash slot, all
  in flight at once (`slot_groups`).
* `orphans`: entries in this consumer's PEL that the pool does not hold (an
  XREADGROUP whose reply was lost delivered them). Entries deleted from the
  stream meanwhile are acked away.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from typing import Any

import redis.asyncio as aredis
from redis.exceptions import ResponseError

from jobqd import scripts
from jobqd.connect import is_cluster
from jobqd.keys import GROUP, QueueKeys
from jobqd.outcomes import Delivery

BLOCK_MS = 2000  # longest blocking XREADGROUP when every queue is empty
ORPHAN_SCAN_COUNT = 500


class SmoothWRR:
    """nginx's smooth weighted round-robin: deterministic, and over any window of W
    picks (W = sum of weights) each queue gets exactly its weight, interleaved rather
    than in bursts. The fetcher asks for one pick per free consumer slot, so the
    order of job starts follows the weights while fetching stays batched. Only
    queues that currently have work take part (work-conserving)."""

    def __init__(self) -> None:
        self.current: dict[str, int] = {}

    def picks(self, n: int, weights: Mapping[str, int], active: Iterable[str]) -> list[str]:
        """The next `n` queues to start a job from, among `active` ones with weight > 0."""
        live = [q for q in active if weights.get(q, 0) > 0]
        if not live or n <= 0:
            return []
        cur = self.current
        if len(live) == 1:  # the loop below, for one queue: always it, its credit kept
            credit = cur.get(live[0], 0)
            cur.clear()
            cur[live[0]] = credit
            return live * n
        for q in list(cur):  # forget queues that left the active set: no saved-up burst
            if q not in live:
                del cur[q]
        total = sum(weights[q] for q in live)
        out = []
        for _ in range(n):
            best = None
            best_w = 0
            for q in live:
                w = cur.get(q, 0) + weights[q]
                cur[q] = w
                if best is None or w > best_w:
                    best, best_w = q, w
            assert best is not None
            cur[best] -= total
            out.append(best)
        return out


def slot_groups(r: aredis.Redis, items: Iterable[str], key: Callable[[str], str]
                ) -> list[list[str]]:
    """`items` grouped so each group's keys share one hash slot: one group on a single
    server, one per slot on a Redis Cluster (where a multi-key command may not span
    slots). Groups and their items keep the order of `items`."""
    items = list(items)
    if not is_cluster(r):
        return [items] if items else []
    by_slot: dict[int, list[str]] = {}
    for it in items:
        by_slot.setdefault(r.keyslot(key(it)), []).append(it)  # type: ignore[attr-defined]
    return list(by_slot.values())


def _seen(t: asyncio.Task[Any]) -> None:
    """Mark a task's exception retrieved (`_harvest` still raises it)."""
    if not t.cancelled():
        t.exception()


def _nogroup(e: BaseException) -> bool:
    return isinstance(e, ResponseError) and "NOGROUP" in str(e)


class Fetcher:
    def __init__(self, r: aredis.Redis, consumer: str) -> None:
        self.r = r
        self.consumer = consumer
        self.wrr = SmoothWRR()
        self.empty: set[str] = set()  # queues the last read found empty
        self.groups: set[str] = set()  # queues whose group we made sure of
        # Redis Cluster: the per-slot blocking reads in flight, by their queues
        self.reads: dict[tuple[str, ...], asyncio.Task[list[Delivery]]] = {}

    def blocks(self, queues: Iterable[str], weights: Mapping[str, int]) -> bool:
        """Whether the next `fetch` is the blocking read (every live queue was empty)."""
        return all(q in self.empty for q in queues if weights.get(q, 0) > 0)

    async def fetch(self, prefix: str, queues: Iterable[str], weights: Mapping[str, int],
                    free: int, before: Sequence[scripts.PipeCall] = ()
                    ) -> tuple[list[Delivery], list[Any]]:
        """Up to `free` deliveries from the queues with weight > 0, in start order (on a
        Redis Cluster a few more: see `_blocking_per_slot`), and the replies of the
        calls `before`, sent first in the same round trip (the pool's settle records:
        acks ride on the fetch). Only a non-blocking read carries them: the caller
        checks `blocks` first."""
        try:
            early = self._harvest() if self.reads else []
            if early:  # a per-slot blocking read returned meanwhile
                return early, (await scripts.pipelined(self.r, before) if before else [])
            return await self._fetch(prefix, queues, weights, free, before)
        except asyncio.CancelledError:
            self.cancel_reads()
            raise

    async def _fetch(self, prefix: str, queues: Iterable[str], weights: Mapping[str, int],
                     free: int, before: Sequence[scripts.PipeCall]
                     ) -> tuple[list[Delivery], list[Any]]:
        live = [q for q in queues if weights.get(q, 0) > 0]
        if not live:  # every queue paused
            await asyncio.sleep(BLOCK_MS / 1000)
            return [], []
        for q in live:
            if q not in self.groups:
                await scripts.ensure_group(self.r, QueueKeys(prefix, q).stream)
                self.groups.add(q)
        active = [q for q in live if q not in self.empty]
        if not active:
            assert not before, "the blocking read carries no other calls"
            return await self._blocking(prefix, live, free), []
        picks = self.wrr.picks(free, weights, active)
        counts = Counter(picks)
        probes = [q for q in live if q in self.empty]
        order = list(counts) + probes
        calls = list(before)
        for q in order:
            calls.append(scripts.Command(("XREADGROUP", "GROUP", GROUP, self.consumer, "COUNT",
                                          counts.get(q, 1), "STREAMS",
                                          QueueKeys(prefix, q).stream, ">")))
        replies = await scripts.pipelined(self.r, calls)
        got = self._sort_replies(order, counts, replies[len(before):])
        out: list[Delivery] = []
        for q in picks:  # job starts follow the SWRR order
            lst = got.get(q)
            if lst:
                eid, fields = lst.pop()
                out.append(Delivery(q, eid, fields))
        for q in order:  # probes, and anything left over
            out.extend(Delivery(q, eid, fields) for eid, fields in reversed(got.get(q, [])))
        return out, replies[:len(before)]

    def _sort_replies(self, order: list[str], counts: Counter[str], replies: list[Any]
                      ) -> dict[str, list[tuple[bytes, dict[bytes, bytes]]]]:
        """Each queue's entries (last first, to pop() in stream order); notes which
        queues ran dry and which groups went missing (a stream Redis lost)."""
        got: dict[str, list[tuple[bytes, dict[bytes, bytes]]]] = {}
        for q, reply in zip(order, replies, strict=True):
            if isinstance(reply, Exception):
                if _nogroup(reply):  # the stream went away (Redis lost it): recreate
                    self.groups.discard(q)
                    continue
                raise reply
            entries = reply[0][1] if reply else []
            got[q] = list(reversed(entries))
            if q in counts and len(entries) < counts[q]:
                self.empty.add(q)
            elif q not in counts and entries:
                self.empty.discard(q)
        return got

    async def _blocking(self, prefix: str, queues: list[str], free: int) -> list[Delivery]:
        groups = slot_groups(self.r, queues, lambda q: QueueKeys(prefix, q).stream)
        if len(groups) == 1:  # one server (or every queue on one slot): one read
            return await self._read_blocking(prefix, groups[0], free)
        return await self._blocking_per_slot(prefix, groups, free)

    async def _read_blocking(self, prefix: str, queues: list[str], free: int
                             ) -> list[Delivery]:
        streams: dict[Any, Any] = {QueueKeys(prefix, q).stream: ">" for q in queues}
        try:
            reply = await self.r.xreadgroup(GROUP, self.consumer, streams, count=free,
                                            block=BLOCK_MS)
        except ResponseError as e:
            if not _nogroup(e):
                raise
            self.groups.difference_update(queues)
            return []
        raw: Any = reply or []  # RESP2: [[stream, entries], ...]; RESP3: {stream: entries}
        by_stream: dict[bytes, Any] = raw if isinstance(raw, dict) else dict(raw)
        out: list[Delivery] = []
        for q in queues:
            entries = by_stream.get(QueueKeys(prefix, q).stream.encode())
            if entries:
                self.empty.discard(q)
                out.extend(Delivery(q, eid, fields) for eid, fields in entries)
        return out

    async def _blocking_per_slot(self, prefix: str, groups: list[list[str]], free: int
                                 ) -> list[Delivery]:
        """Redis Cluster: a multi-stream XREADGROUP must stay on one slot, so one
        blocking read per slot, all at once; the first to return wakes the fetcher.
        The others are not cancelled (a cancelled read's reply is lost while Redis has
        delivered its entries to us): they stay in flight, and whatever they bring is
        handed out by a later `fetch`. Each asks for a share of `free`, so together
        they take at most `free` + one per slot."""
        share = max(1, -(-free // len(groups)))
        for g in groups:
            key = tuple(g)
            if key not in self.reads:
                t = asyncio.create_task(self._read_blocking(prefix, g, share),
                                        name="jobqd-fetch-blocking")
                t.add_done_callback(_seen)  # a read cancelled at drain may have failed
                self.reads[key] = t
        await asyncio.wait(list(self.reads.values()), timeout=BLOCK_MS / 1000 + 5,
                           return_when=asyncio.FIRST_COMPLETED)
        return self._harvest()

    def _harvest(self) -> list[Delivery]:
        """The deliveries of the per-slot blocking reads that have returned."""
        out: list[Delivery] = []
        for key, t in list(self.reads.items()):
            if t.done():
                del self.reads[key]
                out.extend(t.result())  # a Redis error is raised to the pool's loop
        return out

    def cancel_reads(self) -> list[asyncio.Task[list[Delivery]]]:
        """Stop the per-slot blocking reads still in flight; returns them."""
        tasks = list(self.reads.values())
        for t in tasks:
            t.cancel()
        self.reads.clear()
        return tasks

    async def stop_reads(self) -> None:
        """At drain, before the orphan scan: the per-slot blocking reads stopped and
        finished (what Redis delivered to them is in our PEL, where the scan finds it)."""
        tasks = self.cancel_reads()
        if tasks:
            await asyncio.wait(tasks, timeout=BLOCK_MS / 1000 + 1)

    async def orphans(self, prefix: str, queues: Iterable[str],
                      held: Mapping[str, Container[bytes]]) -> list[Delivery]:
        """Entries in our PEL that we do not hold (see the module docstring)."""
        out: list[Delivery] = []
        for q in sorted(self.groups | set(queues)):
            stream = QueueKeys(prefix, q).stream
            start: Any = "0"
            mine = held.get(q, ())
            while True:
                try:
                    reply: Any = await self.r.xreadgroup(GROUP, self.consumer, {stream: start},
                                                         count=ORPHAN_SCAN_COUNT)
                except ResponseError as e:  # no stream or group (yet): nothing of ours
                    if not _nogroup(e):
                        raise
                    break
                raw = reply if isinstance(reply, dict) else dict(reply or [])
                entries = raw.get(stream.encode()) or []
                if not entries:
                    break
                gone = []
                for eid, fields in entries:
                    if eid in mine:
                        continue
                    if not fields:
                        gone.append(eid)
                    else:
                        out.append(Delivery(q, eid, fields))
                if gone:
                    await self.r.xack(stream, GROUP, *gone)
                start = entries[-1][0]
        return out
