"""redis.wait_replicas on a Redis with no replicas (the shared test server): WAIT
can never be satisfied, so every enqueue is refused with NotReplicated (the job is
on the master, found again by its idempotency key) and every settle is counted as
not replicated while the job's outcome stands."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from jobqd import Client, NotReplicated, config
from jobqd.errors import ConfigError

from .conftest import REDIS_URL, base_config, wait_for, wait_status


async def test_enqueue_refused_with_not_replicated_and_settle_counted(
        start_daemon: Callable[..., Any], prefix: str) -> None:
    d = await start_daemon(redis={"url": REDIS_URL, "prefix": prefix, "wait_replicas": 1,
                                  "wait_timeout_s": 0.05})
    async with Client(REDIS_URL, prefix, wait_replicas=1, wait_timeout_s=0.05) as c:
        with pytest.raises(NotReplicated) as ei:
            await c.enqueue("record", {"key": f"{prefix}:runs"}, idempotency_key="a")
        e = ei.value
        assert (e.acked, e.wanted, len(e.accepted)) == (0, 1, 1)
        job = e.accepted[0]
        assert job.created
        # the job is on the master and runs; a retry with the key finds it, not a twin
        await wait_status(c, job.id, "succeeded")
        with pytest.raises(NotReplicated) as again:
            await c.enqueue("record", {"key": f"{prefix}:runs"}, idempotency_key="a")
        assert [(j.id, j.created) for j in again.value.accepted] == [(job.id, False)]
    async with Client(REDIS_URL, prefix) as plain:  # wait_replicas 0: no WAIT
        other = await plain.enqueue("record", {"key": f"{prefix}:runs"})
        await wait_status(plain, other.id, "succeeded")
    rt = d.daemon.rt
    assert rt is not None
    settle = rt.metrics.not_replicated.labels("settle")

    async def counted() -> bool:
        return bool(settle._value.get() >= 2)  # both jobs' settles fell short

    await wait_for(counted, 5, "settles counted as not replicated")


async def test_http_enqueue_not_replicated_is_503_naming_the_job(
        write_config: Callable[..., Path], prefix: str) -> None:
    import redis.asyncio as aredis

    from jobqd import publish
    from jobqd.runtime import Runtime

    from .test_http import api, post_job

    rt = Runtime(config=config.load(write_config(
        redis={"url": REDIS_URL, "prefix": prefix, "wait_replicas": 1,
               "wait_timeout_s": 0.05})), redis=aredis.Redis.from_url(REDIS_URL))
    try:
        await publish.publish(rt.redis, rt.config)
        async with api(rt) as s:
            body = {"task": "noop", "args": {}, "idempotency_key": "h"}
            status, got = await post_job(s, body)
            assert status == 503, got
            assert (got["acked"], got["wanted"]) == (0, 1)
            assert "idempotency key" in got["error"]
            again, got2 = await post_job(s, body)  # the retry finds the same job
            assert (again, got2["id"]) == (503, got["id"])
        assert rt.metrics.not_replicated.labels("enqueue")._value.get() == 2
    finally:
        await rt.redis.aclose()


def test_wait_replicas_rejected_on_a_cluster(tmp_path: Path, prefix: str) -> None:
    cfg = base_config(prefix, redis={"url": "redis+cluster://127.0.0.1:7000", "prefix": prefix,
                                     "wait_replicas": 1})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"wait_replicas.*not supported on a Redis Cluster"):
        config.load(path, import_handlers=False)
    cfg["redis"]["url"] = "embedded"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="embedded Redis has no replicas"):
        config.load(path, import_handlers=False)
    cfg["redis"]["wait_replicas"] = 0
    path.write_text(yaml.safe_dump(cfg))
    config.load(path, import_handlers=False)


def test_a_noscript_retry_runs_the_wait_again() -> None:
    """The WAIT after script calls that found no script must run again after them
    (its first run preceded their writes); a WAIT before them, and calls that ran,
    are not repeated."""
    from redis.exceptions import NoScriptError

    from jobqd import scripts

    ev = scripts.ScriptCall(scripts.ENQUEUE, [], [])
    wait = scripts.Command(("WAIT", 1, 100))
    calls = [wait, ev, ev, wait]
    got = [0, "OK", NoScriptError("NOSCRIPT"), 0]
    assert scripts._again(calls, [0, 1, 2, 3], got) == [2, 3]
    assert scripts._again(calls, [0, 1, 2, 3], [0, "OK", "OK", 1]) == []
