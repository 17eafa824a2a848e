"""Runtime weights: they live in Redis, `jobqd weights set` changes them for every
daemon (applied within weights.refresh_interval_s), and the YAML only overrides a
runtime value when the YAML weight itself changed."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aredis
import yaml

from jobqd import Client, config
from jobqd.channels import QueueWeights
from jobqd.cli import main
from jobqd.exitcodes import ExitCode
from jobqd.runtime import Runtime

from .conftest import InProcessDaemon, base_config


class Cfg:
    """One config file, rewritten in place (like an operator editing /etc/jobqd.yaml)."""

    def __init__(self, tmp_path: Path, prefix: str, queues: dict[str, int], **over: Any) -> None:
        self.path = tmp_path / f"jobqd-{uuid.uuid4().hex[:6]}.yaml"
        self.prefix = prefix
        self.over = over
        self.write(queues)

    def write(self, queues: dict[str, int], **over: Any) -> Path:
        first = next(iter(queues))
        cfg = base_config(self.prefix, queues={q: {"weight": w} for q, w in queues.items()},
                          **{**self.over, **over})
        cfg["tasks"] = {"record": {"handler": "tests.handlers:record", "queue": first}}
        self.path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return self.path


async def cli(capsys: pytest.CaptureFixture[str], path: Path, *args: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(main, ["-c", str(path), "weights", *args])
    out, err = capsys.readouterr()
    return code, out, err


async def start(path: Path, consumers: int | None = None) -> InProcessDaemon:
    cfg = config.load(path)
    if consumers is not None:
        cfg = dataclasses.replace(cfg, consumers=consumers)
    return await InProcessDaemon(cfg).start()


def rt_of(d: InProcessDaemon) -> Runtime:
    assert d.daemon.rt is not None
    return d.daemon.rt


async def stored(r: aredis.Redis, prefix: str) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in (await r.hgetall(f"{prefix}:weights")).items()}


def reloads(rt: Runtime, result: str) -> float:
    v = rt.metrics.registry.get_sample_value("jobqd_config_reloads_total", {"result": result})
    return v or 0.0


async def sighup(d: InProcessDaemon) -> None:
    """What SIGHUP does (Daemon.reload_requests.set), then wait for the reload to finish."""
    rt = rt_of(d)
    before = reloads(rt, "ok") + reloads(rt, "error")
    d.daemon.reload_requests.set()
    deadline = time.monotonic() + 10
    while reloads(rt, "ok") + reloads(rt, "error") == before:
        assert time.monotonic() < deadline, "reload did not happen"
        await asyncio.sleep(0.01)


async def wait_weights(view: QueueWeights, want: dict[str, int], timeout: float) -> float:
    t0 = time.monotonic()
    while view.weights != want:
        assert time.monotonic() - t0 < timeout, (view.weights, want)
        await asyncio.sleep(0.005)
    return time.monotonic() - t0


async def test_weights_set_reaches_a_running_daemon_within_refresh_interval(
        tmp_path: Path, prefix: str, client: Client, r: aredis.Redis,
        capsys: pytest.CaptureFixture[str]) -> None:
    refresh = 0.5
    cfg = Cfg(tmp_path, prefix, {"a": 1, "b": 1}, consumers=4,
              weights={"refresh_interval_s": refresh})
    publisher = await start(cfg.path, consumers=0)
    await publisher.stop()
    key = f"{prefix}:runs"
    for q in ("a", "b"):
        await client.enqueue_many("record", [{"key": key, "sleep_s": 0.002}] * 1200, queue=q)
    d = await start(cfg.path)
    try:
        view = d.daemon.weights
        assert view.weights == {"a": 1, "b": 1}
        while await r.llen(key + ":order") < 400:
            await asyncio.sleep(0.01)
        code, out, _ = await cli(capsys, cfg.path, "set", "a=9")
        assert code == ExitCode.OK and out.splitlines() == ["a=9", "b=1"]
        took = await wait_weights(view, {"a": 9, "b": 1}, refresh + 1.0)
        changed_at = await r.llen(key + ":order")
        print(f"\nweights set reached the daemon after {took:.2f}s (refresh {refresh}s)")
        assert took <= refresh + 0.4
        while await r.llen(key + ":order") < changed_at + 420:
            await asyncio.sleep(0.01)
    finally:
        await d.stop()
    order = [x.decode().split("|", 1)[0] for x in await r.lrange(key + ":order", 0, -1)]
    before = Counter(order[50:350])
    after = Counter(order[changed_at + 20:changed_at + 320])  # held jobs start first
    print(f"shares before: {dict(before)}, after a=9: {dict(after)}")
    assert abs(before["a"] / 300 - 0.5) <= 0.05, before
    assert abs(after["a"] / 300 - 0.9) <= 0.05, after


async def test_weights_set_errors_change_nothing(
        tmp_path: Path, prefix: str, r: aredis.Redis,
        capsys: pytest.CaptureFixture[str]) -> None:
    cfg = Cfg(tmp_path, prefix, {"a": 3, "b": 1})
    d = await start(cfg.path, consumers=0)
    await d.stop()
    assert await stored(r, prefix) == {"a": 3, "b": 1}
    code, out, _ = await cli(capsys, cfg.path, "get")
    assert code == ExitCode.OK and out.splitlines() == ["a=3", "b=1"]
    # unknown queue: a named exit code, and the valid assignment beside it is not applied
    code, _, err = await cli(capsys, cfg.path, "set", "a=5", "zzz=1")
    assert code == ExitCode.UNKNOWN_TASK and "zzz" in err, err
    assert await stored(r, prefix) == {"a": 3, "b": 1}
    for bad in (["a=x"], ["a"], ["a=-1"], ["a=1.5"], ["a="], ["b=2", "a=two"], []):
        code, _, err = await cli(capsys, cfg.path, "set", *bad)
        assert code == ExitCode.USAGE == 64, (bad, code, err)
        assert await stored(r, prefix) == {"a": 3, "b": 1}, bad
    code, _, _ = await cli(capsys, cfg.path, "frobnicate")
    assert code == ExitCode.USAGE


async def test_precedence_on_restart(tmp_path: Path, prefix: str, r: aredis.Redis,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    cfg = Cfg(tmp_path, prefix, {"a": 60, "b": 30, "c": 10})
    d = await start(cfg.path)
    assert d.daemon.weights.weights == {"a": 60, "b": 30, "c": 10}
    code, _, _ = await cli(capsys, cfg.path, "set", "a=5", "b=7")
    assert code == ExitCode.OK
    await wait_weights(d.daemon.weights, {"a": 5, "b": 7, "c": 10}, 2)
    await d.stop()
    # restart with the same YAML: the runtime values stay
    d = await start(cfg.path)
    assert d.daemon.weights.weights == {"a": 5, "b": 7, "c": 10}
    assert await stored(r, prefix) == {"a": 5, "b": 7, "c": 10}
    await d.stop()
    # the YAML weight of a changed: YAML wins for a; b and c keep their values
    cfg.write({"a": 70, "b": 30, "c": 10})
    d = await start(cfg.path)
    assert d.daemon.weights.weights == {"a": 70, "b": 7, "c": 10}
    assert await stored(r, prefix) == {"a": 70, "b": 7, "c": 10}
    await d.stop()
    # a runtime change after that survives the next restart too
    assert (await cli(capsys, cfg.path, "set", "a=1"))[0] == ExitCode.OK
    d = await start(cfg.path)
    assert d.daemon.weights.weights == {"a": 1, "b": 7, "c": 10}
    await d.stop()


async def test_precedence_on_reload(tmp_path: Path, prefix: str, r: aredis.Redis,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    cfg = Cfg(tmp_path, prefix, {"a": 60, "b": 30})
    d = await start(cfg.path)
    try:
        rt = rt_of(d)
        view = d.daemon.weights
        assert (await cli(capsys, cfg.path, "set", "a=5", "b=7"))[0] == ExitCode.OK
        await wait_weights(view, {"a": 5, "b": 7}, 2)
        # a reload whose YAML weights did not change leaves the runtime values alone
        cfg.write({"a": 60, "b": 30}, consumers=3)
        await sighup(d)
        assert reloads(rt, "ok") == 1 and rt.config.consumers == 3
        assert view.weights == {"a": 5, "b": 7}
        assert await stored(r, prefix) == {"a": 5, "b": 7}
        # b changed in the YAML: YAML wins for b only; a new queue gets its YAML weight
        cfg.write({"a": 60, "b": 40, "c": 2})
        await sighup(d)
        assert view.weights == {"a": 5, "b": 40, "c": 2}
        assert await stored(r, prefix) == {"a": 5, "b": 40, "c": 2}
        # back to the old YAML value is a change as well
        cfg.write({"a": 60, "b": 30, "c": 2})
        await sighup(d)
        assert view.weights == {"a": 5, "b": 30, "c": 2}
        assert reloads(rt, "error") == 0
    finally:
        await d.stop()


async def test_bad_runtime_weight_in_redis_does_not_stop_the_daemon(
        tmp_path: Path, prefix: str, client: Client, r: aredis.Redis) -> None:
    cfg = Cfg(tmp_path, prefix, {"a": 2, "b": 1}, weights={"refresh_interval_s": 0.1})
    d = await start(cfg.path)
    try:
        rt = rt_of(d)
        view = d.daemon.weights
        # someone writes garbage straight into the hash (redis-cli, a buggy tool)
        await r.hset(f"{prefix}:weights", mapping={"a": "lots", "b": "-3"})
        await asyncio.sleep(0.5)  # several refreshes
        assert not rt.stop_event.is_set(), rt.health.crashed
        assert rt.health.crashed is None
        assert view.weights == {"a": 2, "b": 1}  # unusable values fall back to the YAML
        job = await client.enqueue("record", {"key": f"{prefix}:runs"})
        deadline = time.monotonic() + 5
        while (await client.status(job.id)).status != "succeeded":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        await r.hset(f"{prefix}:weights", "a", 4)
        await wait_weights(view, {"a": 4, "b": 1}, 2)
    finally:
        await d.stop()
    # and a restart with garbage in the hash starts
    await r.hset(f"{prefix}:weights", "b", "x")
    d = await start(cfg.path)
    assert d.daemon.weights.weights == {"a": 4, "b": 1}
    await d.stop()


def test_stats_skip_runtime_weights_that_are_not_weights() -> None:
    """Garbage in the weights hash (redis-cli, a buggy tool) must not crash the gauges
    loop or `jobqd stats`: the weights loop reports it and falls back to the YAML."""
    from jobqd import ops

    assert ops._weights({b"a": b"lots", b"b": b"-3", b"c": b"2"}) == {"c": 2}
