"""Everything on a real Redis Cluster (3 masters, started by the tests on loopback
ports): queues that land on different masters, the CLI and HTTP API, kill -9 of a
daemon, two daemons, a slot migration mid-run, and (3 masters + 3 replicas) a
master kill -9 with its replica promoted. Run alone with ``pytest -m cluster``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
import redis.asyncio as aredis
import yaml

from jobqd import Client, JobNotFound, QueueFull, SyncClient, config, connect, scripts
from jobqd.cli import main
from jobqd.daemon import Daemon
from jobqd.errors import RedisMemoryFull
from jobqd.exitcodes import ExitCode
from jobqd.keys import QueueKeys

from .conftest import (
    DaemonProcess,
    InProcessDaemon,
    _cleanup,
    base_config,
    in_process_daemons,
    wait_for,
    wait_status,
    wait_until,
)
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
    """This test's key prefix; its keys are deleted from the cluster and from the
    plain test Redis (where the handlers record) afterwards."""
    p = "c" + uuid.uuid4().hex[:10]
    yield p
    _cleanup(p)
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


def cluster_config(cluster: OwnCluster, prefix: str, qs: list[str], **over: Any
                   ) -> dict[str, Any]:
    """The test config on the cluster, with `queues` (weight 1 unless over["queues"]);
    each test task is routed to one of them."""
    cfg = base_config(prefix, **over)
    cfg["redis"] = {**cfg["redis"], "url": cluster.url}
    cfg["queues"] = over.get("queues") or {q: {"weight": 1} for q in qs}
    for name, t in cfg["tasks"].items():
        t.setdefault("queue", qs[len(name) % len(qs)])
    return cfg


@pytest.fixture
async def cstart(cluster: OwnCluster, cprefix: str, tmp_path: Path
                 ) -> AsyncIterator[Callable[..., Any]]:
    async with in_process_daemons() as started:
        async def start(qs: list[str], **over: Any) -> InProcessDaemon:
            path = tmp_path / f"jobqd-{uuid.uuid4().hex[:6]}.yaml"
            path.write_text(yaml.safe_dump(cluster_config(cluster, cprefix, qs, **over)))
            d = await InProcessDaemon(config.load(path)).start()
            started.append(d)
            return d

        yield start


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


async def test_retries_delays_dlq_wait_cancel(cluster: OwnCluster, cprefix: str,
                                              cstart: Callable[..., Any], cclient: Client,
                                              side: aredis.Redis) -> None:
    qs = spread_queues(cluster, cprefix)
    await cstart(qs)
    for q in qs:
        flaky = await cclient.enqueue("fail_times", {"key": f"{cprefix}:f:{q}", "times": 2},
                                      queue=q)
        info = await wait_status(cclient, flaky.id, "succeeded")
        assert info.attempts == 3
        dead = await cclient.enqueue("always_fail", queue=q)
        info = await wait_status(cclient, dead.id, "dead")
        assert info.reason == "max_retries"
        assert await cclient.dlq_replay(dead.id)
        await wait_status(cclient, dead.id, "dead")
        later = await cclient.enqueue("record", {"key": f"{cprefix}:runs"}, queue=q,
                                      delay_s=0.5)
        assert (await cclient.status(later.id)).status == "scheduled"
        await wait_status(cclient, later.id, "succeeded")
        # a waited-for job: complete.lua PUBLISHes on the done channel (pub/sub on a cluster)
        waited = await cclient.enqueue("record", {"key": f"{cprefix}:runs", "value": q},
                                       queue=q)
        t0 = time.monotonic()
        assert await asyncio.wait_for(cclient.wait(waited.id, timeout_s=10), 15) == q
        assert time.monotonic() - t0 < 4  # told, not found by the 5 s re-read
        # cancel of a running job: the control channel reaches the daemon
        long = await cclient.enqueue("sleep", {"seconds": 30}, queue=q)
        await wait_status(cclient, long.id, "running")
        await cclient.cancel(long.id)
        await wait_status(cclient, long.id, "cancelled")
    await side.delete(f"{cprefix}:runs", *(f"{cprefix}:f:{q}" for q in qs))


async def test_weighted_fairness_across_masters(cluster: OwnCluster, cprefix: str,
                                               tmp_path: Path, cclient: Client,
                                               side: aredis.Redis) -> None:
    qs = spread_queues(cluster, cprefix)
    weights = dict(zip(qs, (6, 3, 1), strict=True))
    cfg = cluster_config(cluster, cprefix, qs, consumers=4,
                         queues={q: {"weight": w} for q, w in weights.items()})
    path = tmp_path / "fair.yaml"
    path.write_text(yaml.safe_dump(cfg))
    idle = dict(cfg, consumers=0)
    (tmp_path / "idle.yaml").write_text(yaml.safe_dump(idle))
    d0 = await InProcessDaemon(config.load(tmp_path / "idle.yaml")).start()
    await d0.stop()
    key = f"{cprefix}:fair"
    for q in qs:
        await cclient.enqueue_many("record", [{"key": key}] * 300, queue=q)
    d = await InProcessDaemon(config.load(path)).start()
    try:
        await wait_for(lambda: _hlen_at_least(side, key, 500), 60, "500 starts")
    finally:
        await d.stop()
    order = [x.decode().split("|", 1)[0] for x in await side.lrange(key + ":order", 0, 499)]
    got = Counter(order)
    # while all three have work, starts follow 6:3:1 (within 5 %)
    for q, w in weights.items():
        assert abs(got[q] / 500 - w / 10) < 0.05, got
    await side.delete(key, key + ":order")


async def _hlen_at_least(r: aredis.Redis, key: str, n: int) -> bool:
    return await r.hlen(key) >= n


async def test_backpressure_http_api_and_metrics(cluster: OwnCluster, cprefix: str,
                                                  cstart: Callable[..., Any],
                                                  cclient: Client) -> None:
    qs = spread_queues(cluster, cprefix)
    d = await cstart(qs, consumers=0)
    for q in qs:
        for i in range(3):
            await cclient.enqueue("noop", {"i": i}, queue=q)
    # per-queue numbers come from whichever master holds the queue
    host, port = d.daemon._http_socks[0].getsockname()[:2]
    async with aiohttp.ClientSession(f"http://{host}:{port}") as s:
        async with s.post("/v1/jobs", json={"task": "noop", "args": {}, "queue": qs[1]}) as resp:
            body = await resp.json()
            assert resp.status == 202, body
        async with s.get("/v1/queues") as resp:
            assert resp.status == 200
            depth = {q["name"]: q["depth"] for q in (await resp.json())["queues"]}
        assert depth == {qs[0]: 3, qs[1]: 4, qs[2]: 3}
        async with s.get(f"/v1/jobs/{body['id']}") as resp:
            assert (await resp.json())["status"] == "queued"
        async with s.get("/readyz") as resp:
            assert resp.status == 200, await resp.text()
        # the dashboard's pages read every queue on its own master
        for path in ("/ui/", "/ui/api/overview", f"/ui/queues/{qs[2]}", "/ui/workers",
                     "/ui/dlq", f"/ui/jobs/{body['id']}"):
            async with s.get(path) as resp:
                assert resp.status == 200, (path, await resp.text())
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            async with s.get("/metrics") as resp:
                text = await resp.text()
            if f'jobqd_queue_depth{{queue="{qs[1]}"}} 4.0' in text:
                break
            assert asyncio.get_running_loop().time() < deadline, text
            await asyncio.sleep(0.2)
    # cancel every queued job of one queue (ZSCAN/XRANGE on that queue's master)
    res = await cclient.cancel_many(qs[0])
    assert res == {"cancelled": 3, "cancelling": 0}, res


async def test_backpressure(cluster: OwnCluster, cprefix: str, cstart: Callable[..., Any],
                            cclient: Client) -> None:
    qs = spread_queues(cluster, cprefix)
    over = {"queues": {q: {"weight": 1, "high_watermark": 3, "low_watermark": 1} for q in qs}}
    d = await cstart(qs, consumers=0, **over)
    for q in qs:
        for i in range(3):
            await cclient.enqueue("noop", {"i": i}, queue=q)
        with pytest.raises(QueueFull):
            await cclient.enqueue("noop", queue=q)
    await d.stop()
    await cstart(qs, consumers=4, **over)  # drained below low: accepting again
    for q in qs:
        await wait_for(lambda q=q: _accepts(cclient, q), 20, f"{q} accepting")


async def _accepts(c: Client, q: str) -> bool:
    try:
        await c.enqueue("noop", queue=q)
    except QueueFull:
        return False
    return True


def wait_ready_on(cluster: OwnCluster, prefix: str, d: DaemonProcess,
                  timeout: float = 20.0) -> None:
    """A daemon subprocess is ready once its heartbeat is on the cluster."""
    r = connect.connect_sync(cluster.url)
    try:
        def beating() -> bool:
            assert d.proc is not None
            if d.proc.poll() is not None:
                raise AssertionError(f"daemon exited {d.proc.returncode}:\n{d.log()}")
            return any(f":{d.pid}:" in n.decode() for n in r.zrange(f"{prefix}:hb", 0, -1))
        wait_until(beating, timeout, "the daemon's heartbeat")
    finally:
        r.close()




FAST = {"heartbeat": {"interval_s": 0.5, "timeout_s": 2},
        "reaper": {"interval_s": 0.5, "visibility_timeout_s": 30, "max_deliveries": 3}}


def test_two_daemons_kill9_one_other_finishes_everything(
        cluster: OwnCluster, cprefix: str, tmp_path: Path,
        spawn: Callable[[Path], DaemonProcess], sync_r: redis.Redis) -> None:
    qs = spread_queues(cluster, cprefix)
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(cluster_config(cluster, cprefix, qs, consumers=30, **FAST)))
    a = spawn(path)
    wait_ready_on(cluster, cprefix, a)
    b = spawn(path)
    wait_ready_on(cluster, cprefix, b)
    key = f"{cprefix}:runs"
    with SyncClient(cluster.url, cprefix) as c:
        ids = [j.id for q in qs
               for j in c.enqueue_many("sleep", [{"seconds": 0.3, "key": key}] * 60, queue=q)]
        wait_until(lambda: sync_r.hlen(key + ":started") >= 40, 20, "jobs running")
        a.kill()
        wait_until(lambda: sync_r.hlen(key) >= len(ids), 60, "every job run")
        wait_until(lambda: {c.status(i).status for i in ids} == {"succeeded"}, 30,
                   "every job succeeded")
    done = {k.decode() for k in sync_r.hkeys(key)}
    assert done == set(ids)
    starts = [int(v) for v in sync_r.hvals(key + ":started")]
    again = sum(1 for n in starts if n > 1)
    print(f"kill -9 of one of two daemons: {len(ids)} jobs, {again} run again, 0 lost")
    assert 0 < again <= 30  # A's running jobs (at most its 30 consumers) ran again on B
    sync_r.delete(key, key + ":started")


async def test_cli_on_the_cluster(cluster: OwnCluster, cprefix: str, tmp_path: Path,
                                  cstart: Callable[..., Any], cclient: Client,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    qs = spread_queues(cluster, cprefix)
    d = await cstart(qs)
    path = tmp_path / "cli.yaml"
    path.write_text(yaml.safe_dump(cluster_config(cluster, cprefix, qs)))
    cfg = str(path)

    async def cli(*args: str) -> tuple[int, str, str]:
        code = await asyncio.to_thread(main, ["-c", cfg, *args])
        out, err = capsys.readouterr()
        return code, out, err

    ids = []
    for q in qs:
        code, out, err = await cli("enqueue", "fail_now", "--queue", q)
        assert code == 0, err
        ids.append(out.strip())
    for i in ids:
        await wait_status(cclient, i, "dead")
    code, out, _ = await cli("dlq", "list", "--json")
    assert code == 0 and sorted(json.loads(x)["id"] for x in out.splitlines()) == sorted(ids)
    code, out, _ = await cli("weights", "set", f"{qs[2]}=5")
    assert code == 0 and f"{qs[2]}=5" in out
    code, out, _ = await cli("stats", "--json", "--interval-s", "0.1")
    data = json.loads(out)
    assert {q["name"] for q in data["queues"]} == set(qs)
    assert [w["name"] for w in data["workers"]] == [d.daemon.rt.name]
    code, out, _ = await cli("dlq", "purge", "--all", "--yes")
    assert code == 0 and "purged 3" in out
    code, out, _ = await cli("status", ids[0], "--json")
    assert code != 0 or json.loads(out)["status"] != "dead"

    def sync_wait() -> tuple[Any, float]:  # the blocking client's pub/sub on the cluster
        with SyncClient(cluster.url, cprefix) as c:
            job = c.enqueue("record", {"key": f"{cprefix}:sync", "value": 3}, queue=qs[1])
            t0 = time.monotonic()
            return c.wait(job.id, timeout_s=10), time.monotonic() - t0

    result, took = await asyncio.to_thread(sync_wait)
    assert result == 3 and took < 4  # told, not found by the 5 s re-read


async def test_slot_migration_of_a_busy_queue_loses_nothing(
        cluster: OwnCluster, cprefix: str, cstart: Callable[..., Any], cclient: Client,
        side: aredis.Redis) -> None:
    qs = spread_queues(cluster, cprefix)
    busy = qs[0]
    stream = QueueKeys(cprefix, busy).stream
    src = cluster.master_of(stream)
    dst = cluster.master_of(QueueKeys(cprefix, qs[1]).stream)
    await cstart(qs, consumers=8)
    key = f"{cprefix}:runs"
    ids: list[str] = []
    stop = asyncio.Event()

    refused = 0

    async def produce() -> None:  # keeps enqueueing (some delayed) all through the move
        nonlocal refused
        i = 0
        while not stop.is_set():
            try:
                jobs = await cclient.enqueue_many(
                    "sleep", [{"seconds": 0.01, "key": key}] * 5, queue=busy,
                    delay_s=0.3 if i % 3 == 0 else None)
            except redis.RedisError:  # mid-migration (TRYAGAIN until the slot has moved):
                refused += 1  # not accepted, so the producer retries
            else:
                ids.extend(j.id for j in jobs)
            i += 1
            await asyncio.sleep(0.05)

    producer = asyncio.create_task(produce())
    try:
        await wait_for(lambda: _hlen_at_least(side, key, 50), 20, "the queue busy")
        t0 = time.monotonic()
        moved = await asyncio.to_thread(cluster.migrate_slot, stream, dst, 10, 0.05)
        took = time.monotonic() - t0
        assert moved >= 3  # stream, state, delayed ... moved one by one
        assert cluster.master_of(stream) is dst and dst is not src
        ran = await side.hlen(key)
        await wait_for(lambda: _hlen_at_least(side, key, ran + 100), 30,
                       "jobs run after the move")
    finally:
        stop.set()
        await producer
    async def all_done() -> bool:
        st = [(await cclient.status(i)).status for i in ids]
        return set(st) == {"succeeded"}
    await wait_for(all_done, 60, "every job succeeded")
    assert await side.hlen(key) == len(ids)
    started = [int(v) for v in await side.hvals(key + ":started")]
    print(f"slot migration mid-run: {len(ids)} jobs, {moved} keys moved in {took:.2f}s, "
          f"{refused} enqueue calls refused meanwhile, "
          f"{sum(1 for n in started if n > 1)} run twice, 0 lost")
    await side.delete(key, key + ":started")


async def test_ask_redirect_with_a_busy_connection_pool(cluster: OwnCluster,
                                                        cprefix: str) -> None:
    """Mid-migration, a key already moved is reached by ASK: ASKING and the command
    must go out on one connection even when the node has several idle ones (redis-py
    8.1 sends them on two; connect._fix_asking)."""
    key = "{" + cprefix + ":ask}:k"
    src = cluster.master_of(key)
    dst = next(n for n in cluster.nodes[:3] if n is not src)
    s, d = redis.Redis(port=src.port), redis.Redis(port=dst.port)
    slot = int(s.execute_command("CLUSTER", "KEYSLOT", key))
    r = connect.connect(cluster.url)
    try:
        await r.set(key, "v")
        other = [f"{{{cprefix}:o{i}}}" for i in range(200)]
        on_dst = [k for k in other if cluster.master_of(k) is dst][:20]
        await asyncio.gather(*(r.get(k) for k in on_dst))  # several idle connections to dst
        d.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", cluster.node_id(src))
        s.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", cluster.node_id(dst))
        s.execute_command("MIGRATE", "127.0.0.1", dst.port, key, 0, 5000)
        try:
            assert await r.get(key) == b"v"  # ASK -> dst
        finally:
            for n in cluster.nodes:
                c = redis.Redis(port=n.port)
                with contextlib.suppress(redis.ResponseError):
                    c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", cluster.node_id(dst))
                c.close()
        await r.delete(key)
    finally:
        await r.aclose()
        s.close()
        d.close()


async def test_master_kill9_replica_promoted_daemon_recovers(
        tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, side: aredis.Redis) -> None:
    """3 masters + 3 replicas; kill -9 the master of a busy queue. Its replica takes
    over after cluster-node-timeout (1 s); the daemon keeps running and the queue
    runs again. Redis replicates asynchronously, so jobs acknowledged by the old
    master in its last moments may be gone: the test counts and prints them."""
    with own_cluster(tmp_path_factory.mktemp("ha"), masters=3, replicas=1) as ha:
        prefix = "f" + uuid.uuid4().hex[:10]
        qs = spread_queues(ha, prefix)
        busy = qs[0]
        stream = QueueKeys(prefix, busy).stream
        victim = ha.master_of(stream)
        cfg = cluster_config(ha, prefix, qs, consumers=16, **FAST)
        cfg["redis"]["url"] = "redis+cluster://" + ",".join(
            f"127.0.0.1:{n.port}" for n in ha.nodes)  # every node a seed
        path = tmp_path / "ha.yaml"
        path.write_text(yaml.safe_dump(cfg))
        d = await InProcessDaemon(config.load(path)).start()
        key = f"{prefix}:runs"
        ids: list[str] = []
        refused = 0
        stop = asyncio.Event()
        async with Client(cfg["redis"]["url"], prefix) as c:
            async def produce() -> None:
                nonlocal refused
                while not stop.is_set():
                    try:
                        jobs = await c.enqueue_many(
                            "sleep", [{"seconds": 0.01, "key": key}] * 5, queue=busy)
                    except redis.RedisError:
                        refused += 1  # not accepted: a producer retries these
                        await asyncio.sleep(0.1)
                    else:
                        ids.extend(j.id for j in jobs)
                    await asyncio.sleep(0.05)

            producer = asyncio.create_task(produce())
            try:
                await wait_for(lambda: _hlen_at_least(side, key, 100), 20, "the queue busy")
                t0 = time.monotonic()
                victim.kill()
                ha.want_replicas = 0
                await wait_for(lambda: _promoted(ha, stream, victim), 30, "a replica promoted")
                await asyncio.to_thread(ha.wait_ok, 30)
                failover_s = time.monotonic() - t0
                ran = await side.hlen(key)
                await wait_for(lambda: _hlen_at_least(side, key, ran + 100), 30,
                               "the queue running on the promoted replica")
                recovered_s = time.monotonic() - t0
            finally:
                stop.set()
                await producer
            assert d.task is not None and not d.task.done(), "the daemon stopped"

            async def statuses() -> Counter[str]:
                out: Counter[str] = Counter()
                for i in ids:
                    try:
                        out[(await c.status(i)).status] += 1
                    except JobNotFound:
                        out["lost"] += 1
                return out

            async def settled() -> bool:
                st = await statuses()
                return st["queued"] + st["running"] + st["scheduled"] == 0

            await wait_for(settled, 60, "every surviving job settled")
            st = await statuses()
        await d.stop()
        started = [int(v) for v in await side.hvals(key + ":started")]
        print(f"master kill -9: promoted in {failover_s:.1f}s, queue running again after "
              f"{recovered_s:.1f}s; {len(ids)} jobs accepted, {dict(st)}, "
              f"{refused} enqueue calls refused, {sum(1 for n in started if n > 1)} run twice")
        assert st["succeeded"] + st["lost"] + st["dead"] == len(ids)
        # loopback replication is near-instant: a handful at most
        assert st["lost"] <= 50, st
        await side.delete(key, key + ":started")


async def _promoted(c: OwnCluster, key: str, victim: Any) -> bool:
    return await asyncio.to_thread(c.master_of, key) is not victim


async def _all_published(db: Any, schema: str) -> bool:
    return bool(await db.fetchval(f'SELECT bool_and(job_id IS NOT NULL) FROM "{schema}".outbox'))


async def test_schedules_outbox_relay_and_ledger_with_postgres(
        cluster: OwnCluster, cprefix: str, pg_schema: str, db: Any,
        cstart: Callable[..., Any], cclient: Client, side: aredis.Redis,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # pg_schema before cstart: fixtures tear down in reverse, so the daemons (ledger,
    # relay) stop before the schema is dropped; the other way round, DROP SCHEMA
    # waited for the relay's locks until the test timed out
    from jobqd import outbox
    from jobqd import relay as relay_mod

    from .conftest import PG_DSN
    monkeypatch.setattr(relay_mod, "SWEEP_S", 0.2)
    qs = spread_queues(cluster, cprefix)
    await cstart(qs, postgres={"dsn": PG_DSN, "schema": pg_schema, "ledger": True},
                 schedules={"beat": {"task": "record", "every_s": 1, "queue": qs[2],
                                     "args": {"key": f"{cprefix}:beat"}}})
    key = f"{cprefix}:outbox"
    async with db.transaction():
        row_ids = await outbox.enqueue_many(db, "record", [{"key": key, "value": i}
                                                            for i in range(10)],
                                            prefix=cprefix, schema=pg_schema)
    assert len(row_ids) == 10
    await wait_for(lambda: _hlen_at_least(side, key, 10), 20, "10 relayed jobs run")
    await wait_for(lambda: _hlen_at_least(side, f"{cprefix}:beat", 2), 10, "2 schedule ticks")
    # the relay records a row's job id after it enqueued the job, so a fast job can run
    # before its row says which job it is
    await wait_for(lambda: _all_published(db, pg_schema), 10, "every outbox row's job id")
    job_ids = [r["job_id"] for r in await db.fetch(f'SELECT job_id FROM "{pg_schema}".outbox')]
    for j in job_ids:
        await wait_status(cclient, j, "succeeded")
    await side.delete(key, f"{cprefix}:beat", f"{cprefix}:beat:started")


async def test_every_master_policy_is_checked(cluster: OwnCluster, cprefix: str,
                                              tmp_path: Path) -> None:
    """One master of three may evict, each in turn: the daemon refuses to start (exit
    78) every time, whichever node its client happens to ask first."""
    qs = spread_queues(cluster, cprefix)
    path = tmp_path / "evict.yaml"
    path.write_text(yaml.safe_dump(cluster_config(cluster, cprefix, qs)))
    for q in qs:
        c = redis.Redis(port=cluster.master_of(QueueKeys(cprefix, q).stream).port)
        c.config_set("maxmemory-policy", "allkeys-lru")
        try:
            d = Daemon(config.load(path), install_signals=False, watch_config=False)
            assert await asyncio.wait_for(d.run(), 20) == ExitCode.CONFIG
        finally:
            c.config_set("maxmemory-policy", "noeviction")
            c.close()


async def test_lua_check_runs_on_every_master(cluster: OwnCluster) -> None:
    """The start-up struct probe (scripts.check_lua) runs on each master, not on
    whichever one a keyless EVALSHA happens to reach: each counts one more call."""
    def calls() -> dict[int, int]:
        """EVALSHA calls so far, per live master."""
        out = {}
        for n in cluster.nodes:
            if n.proc is None or n.proc.poll() is not None:
                continue
            c = n.client()
            try:
                if c.info("replication")["role"] == "master":
                    stats = c.info("commandstats").get("cmdstat_evalsha", {"calls": 0})
                    out[n.port] = int(stats["calls"])
            finally:
                c.close()
        return out

    r = connect.connect(cluster.url)
    try:
        before = calls()
        assert await scripts.check_lua(r) is None
        after = calls()
    finally:
        await r.aclose()
    assert all(after[p] > before[p] for p in before), (before, after)


async def test_memory_fraction_watches_every_master(cluster: OwnCluster, cprefix: str,
                                                    cstart: Callable[..., Any],
                                                    cclient: Client) -> None:
    """redis.max_memory_fraction on a cluster: any master over it refuses enqueues,
    whichever node the daemon's client asks by default (each master in turn)."""
    qs = spread_queues(cluster, cprefix)
    d = await cstart(qs, consumers=0, redis={"max_memory_fraction": 0.5})
    for q in qs:
        node = redis.Redis(port=cluster.master_of(QueueKeys(cprefix, q).stream).port)
        used = int(node.info("memory")["used_memory"])
        node.config_set("maxmemory", int(used * 1.3))  # used is ~77 % of it
        try:
            await wait_for(lambda q=q: _refused_for_memory(cclient, q), 10, "refused")
        finally:
            node.config_set("maxmemory", 0)
            node.close()
        await wait_for(lambda q=q: _accepts(cclient, q), 10, "accepted again")
    assert d.task is not None and not d.task.done()


async def _refused_for_memory(c: Client, q: str) -> bool:
    try:
        await c.enqueue("noop", queue=q)
    except RedisMemoryFull:
        return True
    return False
