"""Everything on a real Redis Cluster (3 masters, started by the tests on loopback
ports): queues that land on different masters, the CLI and HTTP API, kill -9 of a
daemon, two daemons, a slot migration mid-run, and (3 masters + 3 replicas) a
master kill -9 with its replica promoted. Run alone with ``pytest -m cluster``."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aredis
import yaml

from jobqd import Client, config
from jobqd.keys import QueueKeys

from .conftest import InProcessDaemon, base_config, wait_status
from .own_redis import OwnCluster, needs_redis_cluster, own_cluster

pytestmark = [pytest.mark.cluster, needs_redis_cluster]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnCluster]:
    with own_cluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c


def spread_queues(c: OwnCluster, prefix: str, n: int = 3) -> list[str]:
    """`n` queue names whose streams live on `n` different masters."""
    out: list[str] = []
    seen: set[int] = set()
    for i in range(200):
        q = f"q{i}"
        port = c.master_of(QueueKeys(prefix, q).stream).port
        if port not in seen:
            seen.add(port)
            out.append(q)
            if len(out) == n:
                return out
    raise AssertionError("could not spread queues over the masters")


@pytest.fixture
def cprefix(cluster: OwnCluster) -> Iterator[str]:
    p = "c" + uuid.uuid4().hex[:10]
    yield p
    for n in cluster.nodes:
        if n.proc is None or n.proc.poll() is not None:
            continue
        r = redis.Redis(port=n.port)
        try:
            for k in r.scan_iter(match=f"*{p}*", count=1000):
                # a replica, or a key another master now owns
                with contextlib.suppress(redis.ResponseError):
                    r.delete(k)
        finally:
            r.close()


def cluster_config(cluster: OwnCluster, prefix: str, queues: list[str], **over: Any
                   ) -> dict[str, Any]:
    cfg = base_config(prefix, **over)
    cfg["redis"] = {**cfg["redis"], "url": cluster.url}
    cfg["queues"] = {q: {"weight": 1} for q in queues}
    for name, t in cfg["tasks"].items():
        t.setdefault("queue", queues[hash(name) % len(queues)])
    return cfg


@pytest.fixture
async def cstart(cluster: OwnCluster, cprefix: str, tmp_path: Path
                 ) -> AsyncIterator[Callable[..., Any]]:
    started: list[InProcessDaemon] = []

    async def start(queues: list[str], **over: Any) -> InProcessDaemon:
        path = tmp_path / f"jobqd-{uuid.uuid4().hex[:6]}.yaml"
        path.write_text(yaml.safe_dump(cluster_config(cluster, cprefix, queues, **over)))
        d = await InProcessDaemon(config.load(path)).start()
        started.append(d)
        return d

    yield start
    for d in started:
        if d.task is not None and not d.task.done():
            await d.stop()


@pytest.fixture
async def cclient(cluster: OwnCluster, cprefix: str) -> AsyncIterator[Client]:
    async with Client(cluster.url, cprefix) as c:
        yield c


@pytest.fixture
async def side() -> AsyncIterator[aredis.Redis]:
    """The plain test Redis the handlers record into."""
    from .conftest import REDIS_URL
    r = aredis.Redis.from_url(REDIS_URL)
    yield r
    await r.aclose()


async def test_queues_on_different_masters_run(cluster: OwnCluster, cprefix: str,
                                               cstart: Callable[..., Any], cclient: Client,
                                               side: aredis.Redis) -> None:
    qs = spread_queues(cluster, cprefix)
    assert len({cluster.master_of(QueueKeys(cprefix, q).stream).port for q in qs}) == 3
    await cstart(qs)
    jobs = [await cclient.enqueue("record", {"key": f"{cprefix}:runs", "value": q}, queue=q)
            for q in qs for _ in range(5)]
    for j in jobs:
        info = await wait_status(cclient, j.id, "succeeded")
        assert info.queue in qs
    assert await side.hlen(f"{cprefix}:runs") == 15
    await side.delete(f"{cprefix}:runs")
