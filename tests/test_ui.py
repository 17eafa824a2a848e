"""The dashboard (jobqd.ui) at the HTTP level, against the real Redis: auth, CSRF,
read_only/off, escaping of job data, and paging a big queue a page at a time."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aredis
from yarl import URL

from jobqd import Client, config, ops, publish, ui
from jobqd.errors import ConfigError
from jobqd.ids import new_job_id
from jobqd.keys import QueueKeys
from jobqd.runtime import Runtime

from .conftest import REDIS_URL, base_config, wait_status
from .test_http import serve

TOKEN = "ui-s3cret"
XSS_ARG = "<script>window.__xss = 1</script>"
XSS_ERR = '<img src=x onerror="document.title=\'pwned\'">'


@pytest.fixture
async def make_runtime(write_config: Callable[..., Path]) -> AsyncIterator[Callable[..., Any]]:
    made: list[Runtime] = []

    async def make(**over: Any) -> Runtime:
        rt = Runtime(config=config.load(write_config(**over)),
                     redis=aredis.Redis.from_url(REDIS_URL))
        made.append(rt)
        await publish.publish(rt.redis, rt.config)
        return rt

    yield make
    for rt in made:
        await rt.redis.aclose()


def _session(url: str, **kw: Any) -> aiohttp.ClientSession:
    """A client session that keeps cookies of 127.0.0.1 (aiohttp's jar drops IP hosts')."""
    return aiohttp.ClientSession(url, cookie_jar=aiohttp.CookieJar(unsafe=True), **kw)


def _csrf(page: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', page)
    assert m, "no CSRF field on the page"
    return m.group(1)


async def test_pages_render_and_carry_a_strict_csp(make_runtime: Any, prefix: str) -> None:
    rt = await make_runtime()
    async with Client(REDIS_URL, prefix) as c:
        job = await c.enqueue("noop", {})
    async with serve(rt) as url, _session(url) as s:
        for path in ("/ui/", "/ui/queues/default", "/ui/queues/default?where=scheduled",
                     "/ui/queues/default?where=running", f"/ui/jobs/{job.id}", "/ui/workers",
                     "/ui/schedules", "/ui/weights", "/ui/dlq"):
            async with s.get(path) as resp:
                text = await resp.text()
                assert resp.status == 200, (path, text)
                csp = resp.headers["Content-Security-Policy"]
                assert "script-src 'self'" in csp and "unsafe-inline" not in csp
                assert "<script>" not in text  # only <script src=...>
        async with s.get("/ui/api/overview") as resp:
            data = await resp.json()
        [q] = [q for q in data["queues"] if q["name"] == "default"]
        stats = await ops.AsyncRunner(rt.redis).run(ops.queue_stats(prefix, ["default"]))
        assert q["waiting"] == stats[0].waiting == 1  # the same numbers as `jobqd stats`
        async with s.get("/ui/static/ui.js") as resp:
            assert resp.status == 200 and "poll" in await resp.text()
        async with s.get(f"/ui/job?id={job.id}", allow_redirects=False) as resp:
            assert resp.status == 303 and resp.headers["Location"].endswith(job.id)


async def test_job_data_comes_back_escaped(make_runtime: Any, prefix: str) -> None:
    rt = await make_runtime(http={"listen": "127.0.0.1:0", "ui_payloads": True})
    async with Client(REDIS_URL, prefix) as c:
        job = await c.enqueue("noop", {"x": XSS_ARG, "y": XSS_ERR})
    # a dead-letter entry whose error, traceback and task name are attacker-controlled
    qk = QueueKeys(prefix, "default")
    env = {"id": new_job_id("default"), "task": "t<script>x</script>",
           "args": {"a": XSS_ARG}, "enq": 1, "attempt": 1}
    death = {"reason": "failed", "error": XSS_ERR, "traceback": "Traceback\n" + XSS_ARG,
             "died": 2}
    eid = await rt.redis.xadd(qk.dlq, {"j": orjson.dumps(env), "e": orjson.dumps(death)})
    await rt.redis.hset(qk.state, env["id"], "x" + eid.decode())  # as a dead job's state
    async with serve(rt) as url, _session(url) as s:
        pages = [f"/ui/jobs/{job.id}", f"/ui/jobs/{env['id']}", "/ui/dlq",
                 "/ui/dlq?queue=default"]
        async with s.get("/ui/dlq") as resp:
            m = re.search(r'href="(/ui/dlq/show\?ref=[^"]+)"', await resp.text())
            assert m
            pages.append(m.group(1).replace("&amp;", "&"))
        for path in pages:
            async with s.get(path) as resp:
                text = await resp.text()
                assert resp.status == 200, path
            assert "<script>window" not in text and "<img" not in text
            assert "t<script>x" not in text
        assert "&lt;script&gt;window.__xss = 1&lt;/script&gt;" in text  # the traceback
        assert "&lt;img src=x onerror=&quot;document.title=" in text


async def test_args_hidden_unless_allowed(make_runtime: Any, prefix: str) -> None:
    rt = await make_runtime()
    async with Client(REDIS_URL, prefix) as c:
        job = await c.enqueue("noop", {"secret": "personal-data-123"})
    async with serve(rt) as url, _session(url) as s, s.get(f"/ui/jobs/{job.id}") as resp:
        text = await resp.text()
    assert "personal-data-123" not in text and "Args hidden" in text


async def test_token_login_cookie_and_bearer(make_runtime: Any, prefix: str,
                                             tmp_path: Path) -> None:
    tf = tmp_path / "token"
    tf.write_text(TOKEN + "\n")
    rt = await make_runtime(http={"listen": "127.0.0.1:0", "token_file": str(tf)})
    async with serve(rt) as url:
        async with _session(url) as s:
            async with s.get("/ui/", allow_redirects=False) as resp:
                assert resp.status == 303 and resp.headers["Location"].startswith("/ui/login")
            async with s.get("/ui/api/overview") as resp:
                assert resp.status == 401
            async with s.get("/ui/login") as resp:
                csrf = _csrf(await resp.text())
            async with s.post("/ui/login", data={"token": "wrong", "csrf": csrf},
                              allow_redirects=False) as resp:
                assert "bad=1" in resp.headers["Location"]
                assert "jobqd_session" not in resp.cookies
            async with s.post("/ui/login", data={"token": TOKEN, "csrf": csrf},
                              allow_redirects=False) as resp:
                assert resp.status == 303
                cookie = resp.cookies["jobqd_session"]
                assert cookie["httponly"] and cookie["samesite"] == "Strict"
                assert TOKEN not in cookie.value
            async with s.get("/ui/") as resp:
                text = await resp.text()
                assert resp.status == 200 and "Overview" in text
            async with s.post("/ui/logout", data={"csrf": _csrf(text)},
                              allow_redirects=False) as resp:
                assert resp.status == 303
            async with s.get("/ui/", allow_redirects=False) as resp:
                assert resp.status == 303  # signed out: the login form again
        async with _session(
                url, headers={"Authorization": f"Bearer {TOKEN}"}) as s:
            async with s.get("/ui/api/overview") as resp:
                assert resp.status == 200
            # a bearer client needs no CSRF token (a browser never sends the header itself)
            async with s.post("/ui/queues/default/pause", allow_redirects=False) as resp:
                assert resp.status == 303
        async with _session(url) as s, s.get("/v1/queues") as resp:
            assert resp.status == 401  # /v1 still needs the bearer token


async def test_actions_need_the_csrf_token(make_runtime: Any, prefix: str) -> None:
    rt = await make_runtime()
    run = ops.AsyncRunner(rt.redis).run
    async with serve(rt) as url, _session(url) as s:
        async with s.post("/ui/queues/default/pause") as resp:
            assert resp.status == 403
        async with s.post("/ui/queues/default/pause", data={"csrf": "forged"}) as resp:
            assert resp.status == 403
        assert await run(ops.paused_queues(prefix)) == []
        async with s.get("/ui/") as resp:
            csrf = _csrf(await resp.text())
        async with s.post("/ui/queues/default/pause", data={"csrf": csrf},
                          allow_redirects=False) as resp:
            assert resp.status == 303
        assert await run(ops.paused_queues(prefix)) == ["default"]
        async with s.post("/ui/weights", data={"csrf": csrf, "w:default": "7"},
                          allow_redirects=False) as resp:
            assert resp.status == 303
        assert (await run(ops.weights_get(prefix)))["default"] == 7


async def test_read_only_hides_and_refuses_actions(make_runtime: Any, prefix: str) -> None:
    rt = await make_runtime(http={"listen": "127.0.0.1:0", "ui": "read_only"})
    async with serve(rt) as url, _session(url) as s:
        async with s.get("/ui/") as resp:
            text = await resp.text()
        assert resp.status == 200 and "read-only" in text
        assert 'action="/ui/queues/default/pause"' not in text
        async with s.get("/ui/weights") as resp:
            assert "<input type=\"number\"" not in await resp.text()
        csrf = s.cookie_jar.filter_cookies(URL(url + "/ui/")).get("jobqd_csrf")
        assert csrf is not None
        async with s.post("/ui/queues/default/pause", data={"csrf": csrf.value}) as resp:
            assert resp.status == 403
    assert await ops.AsyncRunner(rt.redis).run(ops.paused_queues(prefix)) == []


async def test_off_is_404(make_runtime: Any) -> None:
    rt = await make_runtime(http={"listen": "127.0.0.1:0", "ui": "off"})
    async with serve(rt) as url, _session(url) as s:
        for path in ("/ui/", "/ui/api/overview", "/ui/static/ui.js", "/ui/login"):
            async with s.get(path) as resp:
                assert resp.status == 404, path


def test_yaml_on_off_read_as_booleans_are_accepted() -> None:
    for raw, want in (("on", "on"), ("off", "off"), ("read_only", "read_only")):
        cfg = config.loads(f"redis: {{url: 'redis://127.0.0.1:1'}}\nhttp: {{ui: {raw}}}",
                           import_handlers=False)
        assert cfg.http.ui == want
    with pytest.raises(ConfigError, match=r"http\.ui.*on, read_only or off"):
        config.loads("redis: {url: 'redis://127.0.0.1:1'}\nhttp: {ui: maybe}",
                     import_handlers=False)


async def test_a_page_of_a_big_queue_reads_only_a_page(make_runtime: Any,
                                                       prefix: str) -> None:
    rt = await make_runtime()
    async with Client(REDIS_URL, prefix) as c:
        await c.enqueue_many("noop", [{"i": i} for i in range(50_000)])
        await c.enqueue_many("record", [{"key": "k"}] * 3)
    run = ops.AsyncRunner(rt.redis).run
    page = await run(ops.queue_jobs(prefix, "default", "stream", count=50))
    assert len(page.rows) == 50 and page.scanned == 50 and page.next is not None
    newest = await run(ops.queue_jobs(prefix, "default", "stream", newest_first=True,
                                      count=50))
    assert [r.task for r in newest.rows[:3]] == ["record"] * 3 and newest.scanned == 50
    nxt = await run(ops.queue_jobs(prefix, "default", "stream", after=page.next, count=50))
    assert not {r.id for r in nxt.rows} & {r.id for r in page.rows}
    # a filter that matches nothing stops after BROWSE_SCAN entries, not 50,000
    none = await run(ops.queue_jobs(prefix, "default", "stream", task="record", count=50))
    assert none.rows == [] and none.scanned <= ops.BROWSE_SCAN
    async with serve(rt) as url, _session(url) as s:
        async with s.get("/ui/queues/default") as resp:
            text = await resp.text()
        assert resp.status == 200
        assert text.count('href="/ui/jobs/') == 50
        assert "read 50 entries" in text and "Next page" in text
        async with s.get("/ui/queues/default?order=newest&task=record") as resp:
            text = await resp.text()
        assert text.count('href="/ui/jobs/') == 3


async def test_history_is_sampled_only_when_polled(make_runtime: Any, prefix: str) -> None:
    rt = await make_runtime()
    st = ui.UiState(rt=rt, token=None, runner=ops.AsyncRunner(rt.redis))
    assert not st.history  # no sampler runs on its own: nothing until the UI polls
    first = await ui._overview_data(st)
    second = await ui._overview_data(st)  # within SAMPLE_EVERY_S: nothing new stored
    assert len(st.history) == 1 and len(first["history"]["depth"]) == 1
    assert len(second["history"]["depth"]) == 2  # the stored sample + the live reading
    assert st.history.maxlen == int(ui.HISTORY_S / ui.SAMPLE_EVERY_S) + 1  # bounded
    async with Client(REDIS_URL, prefix) as c:
        await c.enqueue_many("noop", [{}] * 5)
    st.history[0].t -= ui.SAMPLE_EVERY_S  # as if polled a while ago
    third = await ui._overview_data(st)
    assert len(st.history) == 2 and third["history"]["depth"][-1]["depth"]["default"] == 5


async def test_with_a_daemon_running_workers_schedules_progress(
        start_daemon: Any, prefix: str, r: aredis.Redis) -> None:
    d = await start_daemon(
        tasks={**base_config(prefix)["tasks"], "progress_then_wait": {
            "handler": "tests.handlers:progress_then_wait"}},
        schedules={"hourly-tick": {"task": "noop", "every_s": 3600}})
    key = prefix + ":go"
    async with Client(REDIS_URL, prefix) as c:
        job = await c.enqueue("progress_then_wait", {"key": key})
        await wait_status(c, job.id, "running")
        for _ in range(300):  # progress is written by the daemon shortly after
            if (await c.status(job.id)).progress:
                break
            await asyncio.sleep(0.02)
        rt2 = Runtime(config=d.cfg, redis=aredis.Redis.from_url(REDIS_URL))
        try:
            async with serve(rt2) as url, _session(url) as s:
                async with s.get("/ui/queues/default?where=running") as resp:
                    text = await resp.text()
                assert job.id in text and "Running (1)" in text
                async with s.get(f"/ui/jobs/{job.id}") as resp:
                    text = await resp.text()
                assert "running" in text and "half way" in text and "<progress" in text, text
                async with s.get("/ui/workers") as resp:
                    text = await resp.text()
                assert socket.gethostname() in text and "STALE" not in text
                async with s.get("/ui/schedules") as resp:
                    text = await resp.text()
                assert "hourly-tick" in text and "<time data-ts" in text
        finally:
            await rt2.redis.aclose()
        await r.set(key, "1")
        await wait_status(c, job.id, "succeeded")


async def test_dead_letter_bulk_actions(start_daemon: Any, prefix: str) -> None:
    d = await start_daemon()
    rt = Runtime(config=d.cfg, redis=aredis.Redis.from_url(REDIS_URL))
    run = ops.AsyncRunner(rt.redis).run
    try:
        async with Client(REDIS_URL, prefix) as c:
            jobs = [await c.enqueue("fail_now", {"reason": f"r{i}"}) for i in range(4)]
            for j in jobs:
                await wait_status(c, j.id, "dead")
            async with serve(rt) as url, _session(url) as s:
                async with s.get("/ui/dlq?queue=default") as resp:
                    text = await resp.text()
                assert all(j.id in text for j in jobs) and "data-confirm" in text
                csrf = _csrf(text)
                form = aiohttp.FormData([("csrf", csrf), ("do", "purge"),
                                         ("ref", jobs[0].id), ("ref", jobs[1].id)])
                async with s.post("/ui/dlq/bulk", data=form) as resp:
                    assert "purged 2" in await resp.text()
                dead = await run(ops.dlq_list(prefix, "default"))
                assert {x.ref for x in dead} == {jobs[2].id, jobs[3].id}
                form = aiohttp.FormData([("csrf", csrf), ("do", "replay"),
                                         ("ref", jobs[2].id)])
                async with s.post("/ui/dlq/bulk", data=form) as resp:
                    assert "replayed 1" in await resp.text()
                await wait_status(c, jobs[2].id, "dead")  # it fails again, by design
                async with s.post("/ui/dlq/replay-all",
                                  data={"csrf": csrf, "queue": "default"}) as resp:
                    assert "replayed 2" in await resp.text()
    finally:
        await rt.redis.aclose()


async def test_workers_page_marks_stale_heartbeats(make_runtime: Any, prefix: str,
                                                  r: aredis.Redis) -> None:
    rt = await make_runtime()  # no daemon (and no reaper to forget the stale one)
    now_ms = int((await r.time())[0]) * 1000
    for name, host, beat in (("ghost:1:x", "gone-host", now_ms - 60_000),
                             ("live:2:y", "live-host", now_ms)):
        await r.hset(prefix + ":workers", name, orjson.dumps(
            {"host": host, "pid": 1, "version": "0.1", "started": 0, "running": 3,
             "capacity": 8}))
        await r.zadd(prefix + ":hb", {name: beat})
    async with serve(rt) as url, _session(url) as s, s.get("/ui/workers") as resp:
        text = await resp.text()
    rows = {h: row for row in text.split("<tr") for h in ("gone-host", "live-host")
            if h in row}
    assert "STALE" in rows["gone-host"] and "STALE" not in rows["live-host"]
    assert "3 / 8" in rows["live-host"]


async def test_scheduled_jobs_page_by_due_time(make_runtime: Any, prefix: str) -> None:
    rt = await make_runtime()
    run = ops.AsyncRunner(rt.redis).run
    async with Client(REDIS_URL, prefix) as c:
        late = await c.enqueue("noop", {}, delay_s=900)
        soon = await c.enqueue("noop", {}, delay_s=60)
        mid = await c.enqueue("record", {"key": "k"}, delay_s=300)
    first = await run(ops.queue_jobs(prefix, "default", "scheduled", count=2))
    assert [x.id for x in first.rows] == [soon.id, mid.id] and first.next == "2"
    rest = await run(ops.queue_jobs(prefix, "default", "scheduled", after=first.next,
                                    count=2))
    assert [x.id for x in rest.rows] == [late.id] and rest.next is None
    newest = await run(ops.queue_jobs(prefix, "default", "scheduled", newest_first=True,
                                      count=5))
    assert [x.id for x in newest.rows] == [late.id, mid.id, soon.id]
    only = await run(ops.queue_jobs(prefix, "default", "scheduled", task="record", count=5))
    assert [x.id for x in only.rows] == [mid.id]
    running = await run(ops.queue_jobs(prefix, "default", "running", count=5))
    assert running.rows == [] and running.next is None  # no group yet: nothing running
