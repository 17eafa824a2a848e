"""Nothing about a job may crash, freeze or fool a daemon (issue #10): a job
that cannot be re-encoded, error text that is not UTF-8, an exception whose
__str__ raises, Retry(delay_s=inf), misspelt arguments, `log.payloads` — each
ends the job with a reason while the daemon keeps running; and an outcome Redis
refused leaves no ledger trace."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aredis

from jobqd import Client
from jobqd.events import NoEvents
from jobqd.ids import new_job_id
from jobqd.jobs import decode_job
from jobqd.keys import GROUP, QueueKeys
from jobqd.metrics import Metrics
from jobqd.outcomes import Delivery, Succeeded
from jobqd.runtime import Runtime
from jobqd.settle import Settler
from tests.conftest import wait_for, wait_status

FAST = {"max_retries": 1, "retry_backoff": {"base_s": 0.01, "max_s": 0.02}}


def _tasks(**extra: dict[str, Any]) -> dict[str, Any]:
    from tests.conftest import base_config

    tasks = base_config("x")["tasks"]
    for name in ("fail_any", "fail_fs_name", "fail_broken_str", "retry_bad_delay", "needs_a"):
        tasks[name] = {"handler": f"tests.handlers:{name}", **FAST}
    tasks.update(extra)
    return tasks


def _deep_job(task: str, levels: int, **args: Any) -> tuple[str, bytes]:
    """A job orjson can read (1,024 levels) but not write back (254)."""
    jid = new_job_id("default")
    inner = b"[" * levels + b"]" * levels
    extra = b"".join(b',"%s":%s' % (k.encode(), orjson.dumps(v)) for k, v in args.items())
    return jid, (b'{"id":"%s","task":"%s","args":{"deep":%s%s},"attempt":0,"lost":0,"enq":1}'
                 % (jid.encode(), task.encode(), inner, extra))


async def _put(r: aredis.Redis, prefix: str, jid: str, raw: bytes) -> None:
    qk = QueueKeys(prefix, "default")
    eid = await r.xadd(qk.stream, {"j": raw})
    await r.hset(qk.state, jid, eid)


async def test_unencodable_job_ends_dead_in_a_subprocess_daemon_that_keeps_running(
        spawn: Callable[[Path], Any], write_config: Callable[..., Path], prefix: str,
        client: Client, r: aredis.Redis) -> None:
    d = spawn(write_config(tasks=_tasks()))
    d.wait_ready(prefix)
    jid, raw = _deep_job("fail_any", 300)  # fails, so its retry must re-encode it
    await _put(r, prefix, jid, raw)
    info = await wait_status(client, jid, "dead")
    assert info.reason == "malformed" and "re-encoded" in (info.error or "")
    shown = await client.dlq_show(jid)
    assert shown.raw.encode() == raw  # the raw bytes are kept
    ok = await client.enqueue("noop")
    await wait_status(client, ok.id, "succeeded")  # the daemon still runs jobs
    assert d.proc.poll() is None
    d.signal(signal.SIGTERM)
    assert d.wait(30) == 0


@pytest.mark.redis62
async def test_unencodable_job_reclaimed_from_a_dead_consumer_is_dead_not_a_reaper_crash(
        start_daemon: Callable[..., Any], client: Client, prefix: str,
        r: aredis.Redis) -> None:
    qk = QueueKeys(prefix, "default")
    await r.xgroup_create(qk.stream, GROUP, id="0", mkstream=True)
    jid, raw = _deep_job("fail_any", 300)
    await _put(r, prefix, jid, raw)
    await r.xreadgroup(GROUP, "ghost:1:x", {qk.stream: ">"})  # held by a consumer that died
    d = await start_daemon(tasks=_tasks(), heartbeat={"interval_s": 0.2, "timeout_s": 0.6},
                           reaper={"interval_s": 0.2, "visibility_timeout_s": 30})
    info = await wait_status(client, jid, "dead")
    assert info.reason == "malformed"
    assert d.task is not None and not d.task.done()
    assert d.daemon.rt is not None and d.daemon.rt.health.crashed is None


async def test_unencodable_result_is_bad_result(start_daemon: Callable[..., Any],
                                               client: Client, prefix: str,
                                               r: aredis.Redis) -> None:
    await start_daemon(tasks=_tasks())
    jid, raw = _deep_job("record", 300, key=f"{prefix}:runs")
    raw = raw.replace(b'"deep":', b'"value":')  # record(key, value) returns `value`
    await _put(r, prefix, jid, raw)
    info = await wait_status(client, jid, "dead")
    assert info.reason == "bad_result" and info.attempts == 1
    assert await r.hget(f"{prefix}:runs", jid) == b"1"  # ran once, never again


@pytest.mark.parametrize(("task", "args", "reason", "text"), [
    ("fail_fs_name", {}, "max_retries", "\\udce9"),
    ("fail_broken_str", {}, "max_retries", "<str() of the exception failed"),
    ("retry_bad_delay", {"delay": "inf"}, "max_retries", "delay_s must be a finite"),
    ("retry_bad_delay", {"delay": "nan"}, "max_retries", "delay_s must be a finite"),
    ("needs_a", {"b": 1}, "bad_args", "unexpected 'b'; missing 'a'"),
])
async def test_bad_error_text_and_bad_retries_end_the_job_not_the_daemon(
        start_daemon: Callable[..., Any], client: Client, task: str, args: dict[str, Any],
        reason: str, text: str) -> None:
    d = await start_daemon(tasks=_tasks())
    job = await client.enqueue(task, args)
    info = await wait_status(client, job.id, "dead")
    assert info.reason == reason and text in (info.error or "")
    if reason == "bad_args":
        assert info.attempts == 1  # not worth three retries
    assert info.started_at is not None and info.worker  # recorded for dead jobs too
    assert d.task is not None and not d.task.done()


async def test_log_payloads_with_retried_failures(start_daemon: Callable[..., Any],
                                                 client: Client,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "jobqd")
    d = await start_daemon(tasks=_tasks(), log={"payloads": True})
    job = await client.enqueue("fail_any", {"secret": "s3"})
    await wait_status(client, job.id, "dead")
    assert d.task is not None and not d.task.done()
    failed = [rec for rec in caplog.records if rec.getMessage().startswith("job failed")]
    assert failed and failed[0].job_args == {"secret": "s3"}  # type: ignore[attr-defined]


@pytest.mark.parametrize(("mode", "want"), [("all", {"succeeded", "dead"}),
                                            ("failures", {"dead"}), ("none", set())])
async def test_log_jobs_modes(start_daemon: Callable[..., Any], client: Client,
                              caplog: pytest.LogCaptureFixture, mode: str,
                              want: set[str]) -> None:
    caplog.set_level(logging.INFO, "jobqd")
    await start_daemon(tasks=_tasks(), log={"jobs": mode})
    ok = await client.enqueue("noop")
    bad = await client.enqueue("fail_now")
    await wait_status(client, ok.id, "succeeded")
    await wait_status(client, bad.id, "dead")

    def seen() -> set[str]:
        out = set()
        for rec in caplog.records:
            if rec.name == "jobqd.jobs" and getattr(rec, "job_id", None) in (ok.id, bad.id):
                out.add("succeeded" if rec.getMessage() == "job succeeded" else "dead")
        return out

    async def settled() -> bool:
        return seen() >= want

    await wait_for(settled, 5, "outcome log lines")
    assert seen() == want


class _Events(NoEvents):
    def __init__(self) -> None:
        self.seen: list[str] = []

    def record(self, event: str, job_id: str, queue: str, task: str, **kw: Any) -> None:
        self.seen.append(event)


async def test_an_outcome_redis_refused_writes_no_ledger_event(make_rt: Callable[..., Runtime],
                                                              prefix: str,
                                                              r: aredis.Redis) -> None:
    """A stalled daemon's late outcome, after the reaper gave its job to another."""
    rt = make_rt()
    qk = QueueKeys(prefix, "default")
    await r.xgroup_create(qk.stream, GROUP, id="0", mkstream=True)
    jid = new_job_id("default")
    raw = orjson.dumps({"id": jid, "task": "noop", "args": {}, "attempt": 0, "lost": 0,
                        "enq": 1})
    eid = await r.xadd(qk.stream, {"j": raw})
    await r.xreadgroup(GROUP, "stalled", {qk.stream: ">"})
    await r.xack(qk.stream, GROUP, eid)  # settled elsewhere meanwhile
    events = _Events()
    settler = Settler(Metrics(), events, "stalled", lambda: rt.config)
    s = settler.build(Succeeded(1), Delivery("default", eid, {b"j": raw}),
                      decode_job(raw, "default"))
    assert s is not None
    [(_, _, flags)] = await settler.settle(r, rt.config, {"default": [s]})
    assert flags == "0" and events.seen == []
    assert await r.exists(qk.result(jid)) == 0
    # and the same record applied while pending is reported
    eid2 = await r.xadd(qk.stream, {"j": raw})
    await r.xreadgroup(GROUP, "live", {qk.stream: ">"})
    s2 = settler.build(Succeeded(1), Delivery("default", eid2, {b"j": raw}),
                       decode_job(raw, "default"))
    assert s2 is not None
    [(_, _, flags)] = await settler.settle(r, rt.config, {"default": [s2]})
    assert flags == "1" and events.seen == ["succeeded"]
    await asyncio.sleep(0)
