"""Weighted fair scheduling across queues, measured on the order of job starts.

The `record` handler RPUSHes "queue|job_id" to ``<key>:order`` when a job
starts, so the order list is the daemon's real start order (four consumers,
batched fetches, the real Redis), not the SWRR algorithm in isolation
(tests/test_logic.py covers that).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import redis.asyncio as aredis
import yaml

from jobqd import Client, config

from .conftest import InProcessDaemon, base_config

THREE = {"critical": {"weight": 60}, "high": {"weight": 30}, "normal": {"weight": 10}}
WINDOW = 300
TOLERANCE = 0.05


def write_cfg(tmp_path: Path, prefix: str, queues: dict[str, Any], task_queue: str,
              **over: Any) -> Path:
    """A config whose only tasks (`record`, `noop`) are routed to `task_queue`."""
    cfg = base_config(prefix, queues=queues, **over)
    cfg["tasks"] = {"record": {"handler": "tests.handlers:record", "queue": task_queue},
                    "noop": {"handler": "tests.handlers:noop", "queue": task_queue}}
    path = tmp_path / f"jobqd-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


async def publish_only(path: Path) -> None:
    """Publish routing and queue conf (a daemon with no consumers), then stop it: jobs can
    be enqueued while nothing consumes them."""
    d = await InProcessDaemon(dataclasses.replace(config.load(path), consumers=0)).start()
    assert await d.stop() == 0


async def start(path: Path) -> InProcessDaemon:
    return await InProcessDaemon(config.load(path)).start()


async def wait_count(r: aredis.Redis, key: str, n: int, timeout: float) -> float:
    """Wait until hash `key` has `n` fields; return the seconds it took."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if await r.hlen(key) >= n:
            return time.monotonic() - t0
        await asyncio.sleep(0.01)
    raise AssertionError(f"{key}: {await r.hlen(key)} of {n} after {timeout}s")


async def start_order(r: aredis.Redis, key: str) -> list[str]:
    return [x.decode().split("|", 1)[0] for x in await r.lrange(key + ":order", 0, -1)]


async def test_shares_in_every_window_of_300_starts(tmp_path: Path, prefix: str,
                                                    client: Client, r: aredis.Redis) -> None:
    path = write_cfg(tmp_path, prefix, THREE, "normal", consumers=4)
    await publish_only(path)
    key = f"{prefix}:runs"
    for q in THREE:
        jobs = await client.enqueue_many("record", [{"key": key}] * 1500, queue=q)
        assert len(jobs) == 1500 and all(j.queue == q for j in jobs)
    d = await start(path)
    try:
        await wait_count(r, key, 4500, 90)
    finally:
        assert await d.stop() == 0
    order = await start_order(r, key)
    assert len(order) == 4500 and Counter(order) == dict.fromkeys(THREE, 1500)
    assert set((await r.hgetall(key)).values()) == {b"1"}  # each job ran once
    # windows count while all three queues still have work: up to the first queue's last start
    last = min(max(i for i, q in enumerate(order) if q == name) for name in THREE)
    assert 2300 <= last <= 2700, last  # critical (60 %) runs out after ~2,500 starts
    worst = dict.fromkeys(THREE, 0.0)
    lo = dict.fromkeys(THREE, 1.0)
    hi = dict.fromkeys(THREE, 0.0)
    windows = 0
    counts = Counter(order[:WINDOW])
    for start_i in range(last + 1 - WINDOW + 1):
        if start_i:
            counts[order[start_i - 1]] -= 1
            counts[order[start_i + WINDOW - 1]] += 1
        windows += 1
        for q, spec in THREE.items():
            share = counts[q] / WINDOW
            lo[q], hi[q] = min(lo[q], share), max(hi[q], share)
            worst[q] = max(worst[q], abs(share - spec["weight"] / 100))
    print(f"\n{windows} windows of {WINDOW} starts (critical's last start at #{last}); "
          "share min..max per queue: "
          + ", ".join(f"{q} {lo[q]:.3f}..{hi[q]:.3f}" for q in THREE))
    assert windows > 1900
    for q, spec in THREE.items():
        assert worst[q] <= TOLERANCE, (q, spec["weight"], lo[q], hi[q])
    # after critical ran out, high and normal share its slots 3:1 (work-conserving)
    tail = Counter(order[last + 50:last + 50 + 400])
    assert set(tail) == {"high", "normal"}
    assert 0.70 <= tail["high"] / 400 <= 0.80, tail


async def run_n(path: Path, client: Client, r: aredis.Redis, key: str, n: int,
                queue: str) -> float:
    """Jobs/s for `n` record jobs put in `queue` while a daemon with `path` runs."""
    d = await start(path)
    try:
        await client.enqueue("record", {"key": key + ":warmup"}, queue=queue)
        await wait_count(r, key + ":warmup", 1, 10)
        t0 = time.monotonic()
        await client.enqueue_many("record", [{"key": key}] * n, queue=queue)
        await wait_count(r, key, n, 60)
        return n / (time.monotonic() - t0)
    finally:
        assert await d.stop() == 0


async def test_only_lowest_queue_filled_runs_at_single_queue_throughput(
        tmp_path: Path, prefix: str, client: Client, r: aredis.Redis) -> None:
    n = 1500
    three = write_cfg(tmp_path, prefix, THREE, "normal", consumers=8)
    single = write_cfg(tmp_path, prefix, {"normal": {"weight": 10}}, "normal", consumers=8)
    rates: dict[str, list[float]] = {"three": [], "single": []}
    for rnd in range(2):  # interleaved, so a noisy neighbour hurts both alike
        for name, path in (("single", single), ("three", three)):
            rates[name].append(await run_n(path, client, r, f"{prefix}:{name}{rnd}", n,
                                           "normal"))
    # each round's pair ran back to back, so a noisy neighbour hurts both alike: the best
    # pair's ratio (comparing the best of each could set a lucky single-queue run
    # against an unlucky three-queue one: 0.70 in a CI run whose pairs were 0.67, 0.99)
    ratios = [t / s1 for t, s1 in zip(rates["three"], rates["single"], strict=True)]
    ratio = max(ratios)
    print(f"\nonly `normal` filled (60/30/10) vs a single queue, per round: "
          f"{', '.join(f'{x:.2f}' for x in ratios)} (runs: {rates})")
    assert ratio >= 0.7, rates


async def test_weight_zero_pauses_and_weight_one_is_not_starved(
        tmp_path: Path, prefix: str, client: Client, r: aredis.Redis) -> None:
    queues = {"bulk": {"weight": 100}, "trickle": {"weight": 1}, "paused": {"weight": 0}}
    path = write_cfg(tmp_path, prefix, queues, "bulk", consumers=4)
    await publish_only(path)
    key = f"{prefix}:runs"
    await client.enqueue_many("record", [{"key": key}] * 900, queue="bulk")
    await client.enqueue_many("record", [{"key": key}] * 30, queue="trickle")
    paused = await client.enqueue_many("record", [{"key": key}] * 20, queue="paused")
    d = await start(path)
    try:
        await wait_count(r, key, 930, 60)
        await asyncio.sleep(1.0)  # a paused queue's jobs wait, even with every slot free
        order = await start_order(r, key)
        assert "paused" not in order
        assert len(order) == 930
        for j in paused:
            assert (await client.status(j.id)).status == "queued"
        first = Counter(order[:WINDOW])
        print(f"\nfirst {WINDOW} starts with weights 100/1 both full: {dict(first)}")
        assert first["trickle"] >= 2, first  # 1 in 101: two or three in 300, never zero
        assert first["trickle"] <= 6, first  # and no burst either
    finally:
        assert await d.stop() == 0
