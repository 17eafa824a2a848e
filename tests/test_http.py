"""The HTTP port (jobqd.http) against the real Redis: every status code is sent for real."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aredis

from jobqd import config, http, openapi, publish, ui
from jobqd.errors import ConfigError
from jobqd.keys import QueueKeys
from jobqd.runtime import Runtime

from .conftest import REDIS_URL

TOKEN = "s3cret-token"


@contextlib.asynccontextmanager
async def serve(rt: Runtime) -> AsyncIterator[str]:
    """Run jobqd.http.run(rt) on 127.0.0.1:<free port>; yields the base URL."""
    stop = asyncio.Event()
    bound: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()

    def on_bound(host: str, port: int) -> None:
        bound.set_result((host, port))

    task = asyncio.create_task(http.run(rt, stop, on_bound=on_bound))
    waiting: set[asyncio.Future[Any]] = {bound, task}
    done, _ = await asyncio.wait(waiting, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if bound not in done:
        stop.set()
        await task  # raises what made the server fail to start
        raise AssertionError("http.run did not report its port")
    host, port = bound.result()
    try:
        yield f"http://{host}:{port}"
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


@contextlib.asynccontextmanager
async def api(rt: Runtime, token: str | None = None) -> AsyncIterator[aiohttp.ClientSession]:
    """A client session on a server for rt (with the bearer token, if given)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with serve(rt) as url, aiohttp.ClientSession(url, headers=headers) as s:
        yield s


@pytest.fixture
async def make_runtime(write_config: Callable[..., Path]) -> AsyncIterator[Callable[..., Any]]:
    """make_runtime(redis_url=..., publish=True, **config overrides) -> a Runtime without a
    daemon: routing published, nothing consumes."""
    made: list[Runtime] = []

    async def make(*, redis_url: str = REDIS_URL, publish_routing: bool = True,
                   **over: Any) -> Runtime:
        rt = Runtime(config=config.load(write_config(**over)),
                     redis=aredis.Redis.from_url(redis_url, socket_connect_timeout=1))
        made.append(rt)
        if publish_routing:
            await publish.publish(rt.redis, rt.config)
        return rt

    yield make
    for rt in made:
        await rt.redis.aclose()


async def post_job(s: aiohttp.ClientSession, body: Any) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with s.post("/v1/jobs", data=data,
                      headers={"Content-Type": "application/json"}) as resp:
        return resp.status, await resp.json()


async def wait_status(s: aiohttp.ClientSession, job_id: str, want: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    got: Any = None
    while time.monotonic() < deadline:
        async with s.get(f"/v1/jobs/{job_id}") as resp:
            assert resp.status == 200, await resp.text()
            got = await resp.json()
        if got["status"] == want:
            return got  # type: ignore[no-any-return]
        await asyncio.sleep(0.02)
    raise AssertionError(f"{job_id} is {got}, wanted {want}")


async def metrics_text(s: aiohttp.ClientSession) -> str:
    async with s.get("/metrics") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        return await resp.text()


# ---------------------------------------------------------------- with a daemon


async def test_job_roundtrip_health_readiness_metrics(start_daemon: Callable[..., Any]) -> None:
    d = await start_daemon()
    rt = d.daemon.rt
    async with api(rt) as s:
        async with s.get("/healthz") as resp:
            assert resp.status == 200 and await resp.json() == {"status": "ok"}
        async with s.get("/readyz") as resp:
            body = await resp.json()
            assert resp.status == 200, body
            assert body["ready"] is True and body["problems"] == []
            assert body["redis"]["ok"] is True and body["consumers_running"] is True
            assert body["postgres"] == {"configured": False, "ok": None}

        status, body = await post_job(s, {"task": "record", "args": {"key": "k", "value": 7}})
        assert status == 202, body
        assert body["created"] is True and body["queue"] == "default"
        info = await wait_status(s, body["id"], "succeeded")
        assert info["result"] == 7 and info["task"] == "record" and info["attempts"] == 1

        text = await metrics_text(s)
        assert "jobqd_build_info{" in text
        assert 'jobqd_jobs_accepted_total{queue="default",task="record"} 1.0' in text
        # the per-job metrics (counted after Redis applied the settle, so poll)
        deadline = time.monotonic() + 10
        done = 'jobqd_jobs_completed_total{outcome="succeeded",queue="default",task="record"} 1.0'
        while done not in text:
            assert time.monotonic() < deadline, text
            await asyncio.sleep(0.05)
            text = await metrics_text(s)
        assert 'jobqd_job_duration_seconds_count{queue="default",task="record"} 1.0' in text
        assert 'jobqd_job_duration_seconds_bucket{le="+Inf",queue="default",task="record"} 1.0' \
            in text
        assert 'jobqd_job_wait_seconds_count{queue="default"} 1.0' in text
        deadline = time.monotonic() + 10  # gauges are refreshed on a timer, not per scrape
        while 'jobqd_queue_depth{queue="default"}' not in text:
            assert time.monotonic() < deadline, text
            await asyncio.sleep(0.2)
            text = await metrics_text(s)


async def test_queue_over_watermark_is_503_with_retry_after(
        start_daemon: Callable[..., Any]) -> None:
    d = await start_daemon(consumers=0,
                           queues={"default": {"weight": 1, "high_watermark": 3,
                                               "low_watermark": 1}})
    async with api(d.daemon.rt) as s:
        for i in range(3):
            status, body = await post_job(s, {"task": "noop", "args": {"i": i}})
            assert status == 202, body
        async with s.post("/v1/jobs", json={"task": "noop", "args": {}}) as resp:
            body = await resp.json()
            assert resp.status == 503, body
            retry_after = resp.headers["Retry-After"]
            assert retry_after.isdigit() and int(retry_after) >= 1
        assert body["queue"] == "default" and body["depth"] == 3
        assert body["high"] == 3 and body["low"] == 1 and "full" in body["error"]

        async with s.get("/v1/queues") as resp:
            assert resp.status == 200
            (q,) = [q for q in (await resp.json())["queues"] if q["name"] == "default"]
        assert q["depth"] == 3 and q["accepting"] is False and q["in_flight"] == 0
        assert q["weight"] == 1 and q["high_watermark"] == 3 and q["low_watermark"] == 1
        # a refused job is not counted as enqueued
        assert 'jobqd_jobs_accepted_total{queue="default",task="noop"} 3.0' in \
            await metrics_text(s)


async def test_readyz_503_draining_after_stop(start_daemon: Callable[..., Any]) -> None:
    d = await start_daemon()
    rt = d.daemon.rt
    async with api(rt) as s:
        async with s.get("/readyz") as resp:
            assert resp.status == 200
        rt.stop("test")
        async with s.get("/readyz") as resp:
            body = await resp.json()
        assert resp.status == 503
        assert "draining" in body["problems"] and body["draining"] is True
        assert "draining" in body["error"]
        async with s.get("/healthz") as resp:  # alive while draining
            assert resp.status == 200
    await d.stop()


async def test_dlq_list_and_replay(start_daemon: Callable[..., Any], prefix: str,
                                   r: aredis.Redis) -> None:
    d = await start_daemon()
    key = f"{prefix}:runs"
    async with api(d.daemon.rt) as s:
        status, body = await post_job(s, {"task": "always_fail", "args": {"key": key}})
        assert status == 202
        job_id = body["id"]
        dead = await wait_status(s, job_id, "dead")
        assert dead["reason"] == "max_retries" and "boom" in dead["error"]
        assert await r.hget(key, job_id) == b"3"  # max_retries: 2

        for query in ("", "?queue=default", "?queue=default&limit=5"):
            async with s.get("/v1/dlq" + query) as resp:
                assert resp.status == 200
                entries = (await resp.json())["entries"]
            assert [e["id"] for e in entries] == [job_id]
            assert entries[0]["task"] == "always_fail" and entries[0]["args"] == {"key": key}
        async with s.get("/v1/dlq?queue=nope") as resp:
            assert resp.status == 404 and (await resp.json())["field"] == "queue"
        for bad in ("limit=0", "limit=x", "limit=1001"):
            async with s.get("/v1/dlq?" + bad) as resp:
                assert resp.status == 400 and (await resp.json())["field"] == "limit"
        async with s.get("/v1/dlq?queue=a%20b") as resp:
            assert resp.status == 400 and (await resp.json())["field"] == "queue"

        async with s.post(f"/v1/dlq/{job_id}/replay") as resp:
            assert resp.status == 202 and await resp.json() == {"id": job_id}
        deadline = time.monotonic() + 10  # replayed with attempts reset: 3 more runs
        while await r.hget(key, job_id) != b"6":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        await wait_status(s, job_id, "dead")

        for ref in ("01ARZ3NDEKTSV4RRFFQ69G5FAV-default", "nonsense", "default%2F1-1",
                    "default%2Fabc", "default%2F99999999999999999999-0"):
            async with s.post(f"/v1/dlq/{ref}/replay") as resp:
                assert resp.status == 404, (ref, await resp.text())

        # an entry that was never a valid job is listed as <queue>/<entry id>, not replayable
        raw_eid = await r.xadd(QueueKeys(prefix, "default").dlq, {"j": "not json", "e": "{}"})
        eid = raw_eid.decode() if isinstance(raw_eid, bytes) else raw_eid
        async with s.get("/v1/dlq?queue=default") as resp:
            garbage = [e for e in (await resp.json())["entries"] if e["id"] != job_id]
        assert garbage[0]["id"] == f"default/{eid}" and garbage[0]["raw"] == "not json"
        async with s.post(f"/v1/dlq/default%2F{eid}/replay") as resp:
            assert resp.status == 422, await resp.text()
            assert "never a valid job" in (await resp.json())["error"]


# ---------------------------------------------------------------- without a daemon


async def test_enqueue_validation_names_the_field(make_runtime: Callable[..., Any]) -> None:
    rt = await make_runtime()
    async with api(rt) as s:
        status, body = await post_job(s, b'{"task": "noop", "args": {')
        assert (status, body["field"]) == (400, "body")
        assert body["error"].startswith("malformed JSON")
        status, body = await post_job(s, b"")
        assert (status, body["field"]) == (400, "body")
        status, body = await post_job(s, b"[1, 2]")
        assert (status, body["field"]) == (400, "body")
        cases: list[tuple[dict[str, Any], str]] = [
            ({"args": {}}, "task"),
            ({"task": 5, "args": {}}, "task"),
            ({"task": "", "args": {}}, "task"),
            ({"task": "noop"}, "args"),
            ({"task": "noop", "args": [1]}, "args"),
            ({"task": "noop", "args": "x"}, "args"),
            ({"task": "noop", "args": {}, "delay_s": -1}, "delay_s"),
            ({"task": "noop", "args": {}, "delay_s": "5"}, "delay_s"),
            ({"task": "noop", "args": {}, "delay_s": True}, "delay_s"),
            ({"task": "noop", "args": {}, "delay_s": 1e300}, "delay_s"),
            ({"task": "noop", "args": {}, "idempotency_key": ""}, "idempotency_key"),
            ({"task": "noop", "args": {}, "idempotency_key": 3}, "idempotency_key"),
            ({"task": "noop", "args": {}, "idempotency_key": "k" * 2000}, "idempotency_key"),
            ({"task": "noop", "args": {}, "queue": 1}, "queue"),
            ({"task": "noop", "args": {}, "queue": "no spaces"}, "queue"),
            ({"task": "noop", "args": {}, "delay": 5}, "delay"),
        ]
        for payload, field in cases:
            status, body = await post_job(s, payload)
            assert (status, body.get("field")) == (400, field), (payload, body)
            assert field in body["error"], body

        status, body = await post_job(s, {"task": "no_such_task", "args": {}})
        assert (status, body["field"]) == (422, "task") and "no_such_task" in body["error"]
        status, body = await post_job(s, {"task": "noop", "args": {}, "queue": "nope"})
        assert (status, body["field"]) == (422, "queue") and "nope" in body["error"]

        # null optional fields are the defaults; a delayed job is scheduled
        status, body = await post_job(s, {"task": "noop", "args": {}, "queue": None,
                                          "delay_s": None, "idempotency_key": None})
        assert status == 202, body
        status, body = await post_job(s, {"task": "noop", "args": {}, "delay_s": 60})
        assert status == 202
        async with s.get(f"/v1/jobs/{body['id']}") as resp:
            info = await resp.json()
        assert resp.status == 200 and info["status"] == "scheduled"

        # an idempotency key maps a second enqueue to the first job (counted once)
        first = await post_job(s, {"task": "noop", "args": {}, "idempotency_key": "abc"})
        second = await post_job(s, {"task": "noop", "args": {"other": 1},
                                    "idempotency_key": "abc"})
        assert first[0] == second[0] == 202
        assert first[1]["id"] == second[1]["id"]
        assert first[1]["created"] is True and second[1]["created"] is False
        assert 'jobqd_jobs_accepted_total{queue="default",task="noop"} 3.0' in \
            await metrics_text(s)


async def test_payload_limits_are_413(make_runtime: Callable[..., Any]) -> None:
    rt = await make_runtime()  # max_payload_bytes: 1 MiB (default)
    async with api(rt) as s:
        big = {"task": "noop", "args": {"blob": "x" * (2 * 1024 * 1024)}}
        async with s.post("/v1/jobs", data=io.BytesIO(orjson.dumps(big)),
                          headers={"Content-Type": "application/json"}) as resp:
            assert resp.request_info.headers["Content-Length"] == str(len(orjson.dumps(big)))
            assert resp.status == 413
            assert "limit" in (await resp.json())["error"]

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it streams
            data = orjson.dumps(big)
            for i in range(0, len(data), 256 * 1024):
                yield data[i:i + 256 * 1024]

        async with s.post("/v1/jobs", data=chunks()) as resp:
            assert resp.status == 413
            assert "limit" in (await resp.json())["error"]
        # the session still works afterwards
        status, body = await post_job(s, {"task": "noop", "args": {}})
        assert status == 202

    rt = await make_runtime(max_payload_bytes=1000)
    async with api(rt) as s:  # under the body limit, over max_payload_bytes once encoded
        status, body = await post_job(s, {"task": "noop", "args": {"blob": "x" * 5000}})
        assert status == 413 and body["field"] == "args" and body["limit"] == 1000


async def test_token_auth(make_runtime: Callable[..., Any], tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    rt = await make_runtime(http={"token_file": str(token_file)})
    async with serve(rt) as url, aiohttp.ClientSession(url) as s:
        for headers in ({}, {"Authorization": "Bearer wrong"},
                        {"Authorization": f"Basic {TOKEN}"}, {"Authorization": "Bearer"},
                        {"Authorization": f"Bearer {TOKEN}x"}):
            for method, path in (("GET", "/v1/queues"), ("GET", "/v1/openapi.json"),
                                 ("POST", "/v1/jobs"), ("GET", "/v1/jobs/x"),
                                 ("GET", "/v1/nothing-here")):
                async with s.request(method, path, headers=headers) as resp:
                    assert resp.status == 401, (headers, path)
                    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
                    assert (await resp.json())["error"] == "missing or wrong bearer token"
        ok = {"Authorization": f"Bearer {TOKEN}"}
        async with s.get("/v1/queues", headers=ok) as resp:
            assert resp.status == 200
        async with s.get("/v1/queues", headers={"Authorization": f"bearer   {TOKEN} "}) as resp:
            assert resp.status == 200
        async with s.get("/v1/openapi.json", headers=ok) as resp:
            doc = await resp.json()
        assert doc["paths"]["/v1/queues"]["get"]["security"] == [{"bearerAuth": []}]
        status, _ = await post_job_with(s, ok, {"task": "noop", "args": {}})
        assert status == 202
        for path in ("/healthz", "/metrics"):  # open, with or without a token
            async with s.get(path) as resp:
                assert resp.status == 200
        async with s.get("/readyz") as resp:  # open (503 here: no consumers run)
            assert resp.status == 503
            assert (await resp.json())["problems"] == ["consumers"]

    token_file.write_text(" \n")
    with pytest.raises(ConfigError, match="token_file"):
        http.make_app(rt)


async def post_job_with(s: aiohttp.ClientSession, headers: dict[str, str],
                        body: Any) -> tuple[int, Any]:
    async with s.post("/v1/jobs", json=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def test_redis_unreachable(make_runtime: Callable[..., Any]) -> None:
    rt = await make_runtime(redis_url="redis://127.0.0.1:1", publish_routing=False)
    rt.health.consumers_running = True
    async with api(rt) as s:
        started = time.monotonic()
        async with s.get("/readyz") as resp:
            body = await resp.json()
        assert time.monotonic() - started < 3
        assert resp.status == 503 and body["problems"] == ["redis"]
        assert body["redis"]["ok"] is False and body["redis"]["error"]
        assert body["error"] == "not ready: redis"
        async with s.get("/healthz") as resp:
            assert resp.status == 200
        for method, path, payload in (("POST", "/v1/jobs", {"task": "noop", "args": {}}),
                                      ("GET", "/v1/queues", None),
                                      ("GET", "/v1/jobs/01ARZ3NDEKTSV4RRFFQ69G5FAV-default",
                                       None)):
            async with s.request(method, path, json=payload) as resp:
                assert resp.status == 503
                assert resp.headers["Retry-After"] == "1"
                assert await resp.json() == {"error": "redis unavailable"}


async def test_readyz_names_every_problem(make_runtime: Callable[..., Any]) -> None:
    rt = await make_runtime()
    h = rt.health
    h.consumers_running = True
    async with api(rt) as s:
        async with s.get("/readyz") as resp:
            assert resp.status == 200
        h.postgres_ok = False
        h.last_reload_error = "tasks.x.handler (line 3): cannot import"
        h.crashed = "reaper"
        h.redis_ok = False
        async with s.get("/readyz") as resp:
            body = await resp.json()
        assert resp.status == 503
        assert body["problems"] == ["redis", "postgres", "reload", "crashed"]
        assert body["last_reload_error"] == h.last_reload_error and body["crashed"] == "reaper"
        assert body["postgres"] == {"configured": True, "ok": False}
        h.postgres_ok = True
        h.last_reload_error = h.crashed = None
        h.redis_ok = True
        async with s.get("/readyz") as resp:
            assert resp.status == 200
            assert (await resp.json())["postgres"] == {"configured": True, "ok": True}

    # with postgres.dsn configured, "not checked yet" is not ready
    rt = await make_runtime(postgres={"dsn": "postgresql://jobqd@127.0.0.1:1/none"})
    rt.health.consumers_running = True
    async with api(rt) as s, s.get("/readyz") as resp:
        body = await resp.json()
        assert resp.status == 503 and body["problems"] == ["postgres"]
        assert body["postgres"] == {"configured": True, "ok": None}


async def test_unknown_ids_paths_and_methods(make_runtime: Callable[..., Any]) -> None:
    rt = await make_runtime()
    async with api(rt) as s:
        for job_id in ("01ARZ3NDEKTSV4RRFFQ69G5FAV-default", "bogus", "a%2Fb"):
            async with s.get(f"/v1/jobs/{job_id}") as resp:
                assert resp.status == 404
                assert "no job" in (await resp.json())["error"]
        async with s.get("/nothing") as resp:
            assert resp.status == 404 and await resp.json() == {"error": "not found"}
        async with s.get("/v1/jobs") as resp:
            assert resp.status == 405 and "POST" in resp.headers["Allow"]
            assert resp.content_type == "application/json"


async def test_unexpected_error_is_500_without_details(
        make_runtime: Callable[..., Any], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    rt = await make_runtime()

    def broken(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr("jobqd.ops.queue_stats", broken)
    async with api(rt) as s:
        with caplog.at_level(logging.ERROR, logger="jobqd.http"):
            async with s.get("/v1/queues") as resp:
                text = await resp.text()
        assert resp.status == 500 and resp.content_type == "application/json"
        assert orjson.loads(text) == {"error": "internal error"}
        assert "secret" not in text and "Traceback" not in text
    (record,) = [r for r in caplog.records if r.name == "jobqd.http"]
    assert record.exc_info is not None and "GET /v1/queues" in record.getMessage()


async def test_run_reports_port_and_closes(make_runtime: Callable[..., Any]) -> None:
    assert config.HttpConfig().host == "127.0.0.1"  # the default binds loopback only
    rt = await make_runtime()
    async with serve(rt) as url, aiohttp.ClientSession() as s, s.get(url + "/healthz") as resp:
        assert resp.status == 200
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.ClientConnectionError):
            await s.get(url + "/healthz")


async def test_bind_failure_raises(make_runtime: Callable[..., Any]) -> None:
    rt = await make_runtime()
    async with serve(rt) as url:
        port = int(url.rsplit(":", 1)[1])
        rt2 = await make_runtime(http={"listen": f"127.0.0.1:{port}"})
        with pytest.raises(http.BindError, match=rf"127\.0\.0\.1:{port} .*already in use"):
            await asyncio.wait_for(http.run(rt2, asyncio.Event()), 5)


def test_openapi_matches_the_routes() -> None:
    rt = Runtime(config=config.loads("redis: {url: 'redis://127.0.0.1:1'}",
                                     import_handlers=False),
                 redis=aredis.Redis.from_url("redis://127.0.0.1:1"))
    app = http.make_app(rt)
    routes = {(r.method.lower(), r.resource.canonical) for r in app.router.routes()
              if r.method != "HEAD" and r.resource is not None
              and not ui.owns(r.resource.canonical)}  # the dashboard is HTML, not the API
    for auth in (False, True):
        doc = openapi.build(auth=auth)
        documented = {(m, p) for p, ops_ in doc["paths"].items() for m in ops_}
        assert documented == routes
        for path, ops_ in doc["paths"].items():
            for op in ops_.values():
                assert ("401" in op["responses"]) == (auth and path.startswith("/v1/"))
                assert bool(op["security"]) == (auth and path.startswith("/v1/"))
    assert "securitySchemes" not in openapi.build()["components"]
