"""The pool's decisions, driven without Redis and without sleeping: what
`execute` returns for each way a job can end, how a cancellation is told apart
(our deadline, a drain, a thread that cannot be stopped), and how `settle`
turns each outcome into a settle record, guarding every encode."""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from types import MappingProxyType
from typing import Any, ClassVar

import orjson
import pytest

from jobqd.config import LogConfig, ResultsConfig, TaskConfig
from jobqd.errors import Fail, Retry
from jobqd.events import NoEvents
from jobqd.execute import Executor, Running, bad_args
from jobqd.ids import new_job_id
from jobqd.jobs import decode_job, encode_job, view
from jobqd.metrics import Metrics
from jobqd.outcomes import (
    Abandoned,
    Cancelled,
    Dead,
    Deferred,
    Delivery,
    HandedBack,
    Retried,
    Succeeded,
    after_cancel,
    after_failure,
    error_text,
    retry_delay,
    safe_text,
)
from jobqd.settle import OutcomeLog, Settle, Settler

# ---------------------------------------------------------------- pure decisions


def test_after_cancel_tells_timeout_cancel_drain_and_thread_apart() -> None:
    assert after_cancel(own="timeout", thread_running=False) == "timeout"
    assert after_cancel(own="timeout", thread_running=True) == "timeout"
    assert after_cancel(own="cancel", thread_running=False) == "cancelled"
    assert after_cancel(own=None, thread_running=False) == "hand_back"
    assert after_cancel(own=None, thread_running=True) == "abandon"


def test_after_failure_retries_until_the_budget_then_dead() -> None:
    kw: dict[str, Any] = {"max_retries": 2, "backoff_s": 1.5, "requested_delay": None}
    assert after_failure("error", "e", "tb", attempts=1, **kw) == Retried("error", "e", 1.5, "tb")
    assert after_failure("error", "e", None, attempts=3, **kw) == Dead(
        "max_retries", "e", None, attempts=3)
    assert after_failure("timeout", "t", None, attempts=3, **kw).reason == "timeout"  # type: ignore[union-attr]
    kw["requested_delay"] = 7.0
    assert after_failure("retry", "r", None, attempts=1, **kw) == Retried("retry", "r", 7.0)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), -1.0, 1e300, "x", [1]])
def test_retry_delay_refuses_unusable_values(value: Any) -> None:
    assert retry_delay(value) is None


def test_retry_delay_accepts_finite_ones() -> None:
    assert retry_delay(None) is None
    assert retry_delay(0) == 0.0
    assert retry_delay(2.5) == 2.5


def test_error_text_survives_surrogates_and_a_broken_str() -> None:
    import os

    name = os.fsdecode(b"/tmp/\xff.txt")
    text = error_text(FileNotFoundError(2, "No such file", name))
    text.encode("utf-8")  # encodable
    assert "\\udcff" in text

    class Broken(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert error_text(Broken()).startswith("Broken: <str() of the exception failed")
    assert len(safe_text("x" * 10_000, 2000)) == 2000


def test_bad_args_names_the_argument() -> None:
    def f(a: int, *, b: int = 0) -> None: ...

    assert bad_args(f, {"a": 1}) is None
    assert bad_args(f, {"a": 1, "c": 2}) == "unexpected 'c'"
    assert bad_args(f, {"c": 2, "d": 3}) == "unexpected 'c', 'd'; missing 'a'"

    def g(a: int, **kw: Any) -> None: ...

    assert bad_args(g, {"z": 1}) == "missing 'a'"


# ---------------------------------------------------------------- settle records

CFG_LOG = LogConfig()


class _Cfg:
    log = CFG_LOG
    tasks: MappingProxyType[str, Any] = MappingProxyType({})
    results = ResultsConfig()


def _settler() -> Settler:
    return Settler(Metrics(), NoEvents(), "w1", _Cfg)  # type: ignore[arg-type]


def _delivery(args: Any = None, raw: bytes | None = None) -> Delivery:
    jid = new_job_id("default")
    j = raw if raw is not None else encode_job(jid, "t", args or {}, 1.0)
    return Delivery("default", b"1-0", {b"j": j})


def test_the_scheduler_is_woken_once_redis_applied_something_into_the_delayed_set() -> None:
    """`Settler.scheduled` (the daemon's scheduler wake-up, for the pool's and the
    reaper's settles alike) is set when Redis applied an R settle (a retry, a deferral,
    a spread hand-back), not for other outcomes or an R that was not applied."""
    def woken(op: str, flag: str) -> bool:
        ev = asyncio.Event()
        settler = Settler(Metrics(), NoEvents(), "w1", _Cfg,  # type: ignore[arg-type]
                          scheduled=ev)
        settler.report_applied([("default", [Settle(op, b"1-0", "j", b"")], flag)], None,
                               _Cfg)  # type: ignore[arg-type]
        return ev.is_set()

    assert woken("R", "1")
    assert not woken("R", "0")  # already settled elsewhere: nothing was scheduled
    assert not woken("R", "c")  # cancelled meanwhile: settled as cancelled instead
    assert not woken("S", "1") and not woken("D", "1") and not woken("B", "1")


def test_succeeded_is_a_result_record() -> None:
    d = _delivery()
    env = decode_job(d.fields[b"j"], "default")
    s = _settler().build(Succeeded({"x": 1}), d, env, started_ms=5.0)
    assert s is not None and s.op == "S"
    rec = orjson.loads(s.payload)
    assert rec["result"] == {"x": 1} and rec["worker"] == "w1" and rec["started"] == 5.0


def test_unencodable_result_is_dead_bad_result() -> None:
    d = _delivery()
    env = decode_job(d.fields[b"j"], "default")
    s = _settler().build(Succeeded(object()), d, env)
    assert s is not None and s.op == "D"
    assert orjson.loads(s.extra)["reason"] == "bad_result"


def _deep(levels: int) -> bytes:
    return b'{"id":"%s","task":"t","args":{"a":' % new_job_id("default").encode() \
        + b"[" * levels + b"]" * levels + b'},"attempt":0,"lost":0,"enq":1}'


def test_a_retry_of_a_job_that_cannot_be_re_encoded_is_dead_malformed_raw_kept() -> None:
    raw = _deep(300)  # orjson reads 1024 levels, writes 254
    d = _delivery(raw=raw)
    env = decode_job(raw, "default")
    s = _settler().build(Retried("error", "boom", 1.0), d, env)
    assert s is not None and s.op == "D" and s.payload == raw
    death = orjson.loads(s.extra)
    assert death["reason"] == "malformed" and "re-encoded" in death["error"]


def test_a_reclaim_of_such_a_job_is_dead_too() -> None:
    raw = _deep(300)
    s = _settler().build(HandedBack(lost=1), _delivery(raw=raw), decode_job(raw, "default"))
    assert s is not None and s.op == "D" and s.payload == raw


def test_hand_back_defer_and_abandon() -> None:
    d = _delivery()
    env = decode_job(d.fields[b"j"], "default")
    st = _settler()
    b = st.build(HandedBack(), d, env)
    assert b is not None and b.op == "B" and b.payload == d.fields[b"j"]
    r = st.build(HandedBack(lost=1, delay_s=0.5), d, env)
    assert r is not None and r.op == "R" and r.extra == 500
    assert decode_job(r.payload, "default").lost == 1
    f = st.build(Deferred(0.0001), d, env)
    assert f is not None and f.op == "R" and f.extra == 1 and f.report is None
    assert st.build(Abandoned("thread"), d, env) is None


def test_garbage_is_dead_malformed_with_its_fields() -> None:
    d = Delivery("default", b"1-0", {b"x": b"\xff"})
    s = _settler().build(HandedBack(), d, None)
    assert s is not None and s.op == "D" and s.job_id == ""
    assert orjson.loads(s.payload) == {"x": "\ufffd"}


def test_error_text_with_surrogates_encodes_everywhere() -> None:
    import os

    d = _delivery()
    env = decode_job(d.fields[b"j"], "default")
    err = os.fsdecode(b"\xff")
    s = _settler().build(Dead("failed", err, tb=err), d, env)
    assert s is not None
    assert orjson.loads(s.extra)["error"] == "\\udcff"
    r = _settler().build(Retried("error", err, 1.0), d, env)
    assert r is not None and view(orjson.loads(r.payload), "default")["err"] == "\\udcff"


def test_outcome_log_modes_rate_and_reserved_names(caplog: pytest.LogCaptureFixture) -> None:
    from jobqd.settle import Report

    cfg = LogConfig(jobs="failures", jobs_per_s=3)

    class C:
        log = cfg

    ol = OutcomeLog(C)  # type: ignore[arg-type]
    assert not ol.allow(failure=False)
    allowed = sum(ol.allow(failure=True) for _ in range(10))
    assert allowed == 3 and ol.suppressed == 7
    cfg_all = LogConfig(jobs="all", jobs_per_s=3)

    class A:
        log = cfg_all

    both = OutcomeLog(A)  # type: ignore[arg-type]
    assert sum(both.allow(failure=False) for _ in range(10)) == 3
    assert both.allow(failure=True)  # successes over their rate do not crowd failures out
    caplog.set_level(logging.INFO, "jobqd.jobs")
    cfg2 = LogConfig(jobs="all", jobs_per_s=100, payloads=True)

    class C2:
        log = cfg2

    ol2 = OutcomeLog(C2)  # type: ignore[arg-type]
    ol2.write(Report("q", "t", "id1", "retried", 0.1, 1, 0, "boom", kind="error",
                     args={"k": "v"}))  # `args` is reserved by LogRecord: sent as job_args
    rec = [r for r in caplog.records if r.name == "jobqd.jobs"][-1]
    assert rec.job_args == {"k": "v"} and rec.job_id == "id1"  # type: ignore[attr-defined]


# ---------------------------------------------------------------- execute


class _NoLimits:
    def applies(self, task: TaskConfig) -> bool:
        return False

    async def acquire(self, task: TaskConfig, job_id: str) -> float | None:
        return None

    def release(self, task: TaskConfig, job_id: str) -> None:
        return None


class _StartSink:
    def __init__(self) -> None:
        self.event = asyncio.Event()

    def started(self, run: Running) -> None:
        self.event.set()


def _cfg(fn: Any, **task: Any) -> Any:
    t = TaskConfig(name="t", handler="tests:fn", fn=fn,
                   is_async=asyncio.iscoroutinefunction(fn), **task)

    class C:
        tasks: ClassVar[dict[str, TaskConfig]] = {"t": t}
        log = CFG_LOG

    return C()


async def _execute(fn: Any, args: dict[str, Any] | None = None, *,
                   cancel: str | None = None, **task: Any) -> tuple[Any, asyncio.Task[Any]]:
    """Run one job through an Executor in its own task (the consumer). `cancel`:
    None, "timeout" (our deadline), "job" (a cancel of the job) or "drain", applied
    once the handler started."""
    sink = _StartSink()
    pool = ThreadPoolExecutor(2)
    ex = Executor(_NoLimits(), sink, pool)
    d = _delivery(args)
    box: dict[str, Any] = {}

    async def consumer() -> None:
        me = asyncio.current_task()
        assert me is not None
        run = box["run"] = Running(d, me)
        box["outcome"] = await ex.run(run, _cfg(fn, **task))

    t = asyncio.create_task(consumer())
    if cancel:
        await sink.event.wait()
        await asyncio.sleep(0)  # let the handler reach its await
        if cancel == "job":
            box["run"].cancel()
        else:
            if cancel == "timeout":
                box["run"].stop_reason = "timeout"
            t.cancel()
    await asyncio.wait({t})
    pool.shutdown(wait=False)
    return box.get("outcome"), t


async def test_execute_success_and_each_failure_kind() -> None:
    async def ok(x: int) -> int:
        return x * 2

    out, _ = await _execute(ok, {"x": 21})
    assert out == Succeeded(42)

    async def fails() -> None:
        raise ValueError("boom")

    out, _ = await _execute(fails, max_retries=1)
    assert isinstance(out, Retried) and out.kind == "error" and "ValueError: boom" in out.error
    assert out.tb is not None and "Traceback" in out.tb

    async def fail() -> None:
        raise Fail("nope")

    out, _ = await _execute(fail)
    assert out == Dead("failed", "nope", attempts=1)

    async def retry() -> None:
        raise Retry(delay_s=3)

    out, _ = await _execute(retry)
    assert isinstance(out, Retried) and out.kind == "retry" and out.delay_s == 3


@pytest.mark.parametrize("delay", [float("inf"), float("nan"), 1e300])
async def test_execute_retry_with_an_unusable_delay_is_an_error_with_backoff(delay: float) -> None:
    async def retry() -> None:
        raise Retry(delay_s=delay)

    out, _ = await _execute(retry)
    assert isinstance(out, Retried) and out.kind == "error" and "delay_s" in out.error
    assert 0 <= out.delay_s <= 60


async def test_execute_bad_args_is_dead_at_once_but_an_inner_type_error_retries() -> None:
    async def needs_a(a: int) -> None:
        return None

    out, _ = await _execute(needs_a, {"b": 1})
    assert isinstance(out, Dead) and out.reason == "bad_args" and "b" in out.error

    async def inner(a: int) -> None:
        raise TypeError("unsupported operand")

    out, _ = await _execute(inner, {"a": 1})
    assert isinstance(out, Retried)


async def test_execute_our_deadline_is_a_timeout_and_the_consumer_goes_on() -> None:
    async def hang() -> None:
        await asyncio.Event().wait()

    out, t = await _execute(hang, cancel="timeout", timeout_s=1.0, max_retries=0)
    assert isinstance(out, Dead) and out.reason == "timeout"
    assert not t.cancelled() and t.cancelling() == 0  # the cancellation was ours: swallowed


async def test_execute_drain_is_a_hand_back_and_the_cancellation_stays_pending() -> None:
    async def hang() -> None:
        await asyncio.Event().wait()

    out, t = await _execute(hang, cancel="drain")
    assert out == HandedBack()
    assert t.cancelling() == 1  # the consumer re-raises it after settling


async def test_execute_cancel_of_a_running_async_job_runs_its_finally() -> None:
    cleaned = asyncio.Event()

    async def hang() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.set()

    out, t = await _execute(hang, cancel="job")
    assert isinstance(out, Cancelled) and cleaned.is_set()
    assert t.cancelling() == 0  # our own: the consumer goes on


async def test_execute_cancel_of_a_plain_def_sets_its_flag() -> None:
    from jobqd import current_job

    seen: list[bool] = []

    def polls() -> None:
        for _ in range(1000):
            if current_job().cancelled:
                seen.append(True)
                current_job().check_cancelled()
            threading.Event().wait(0.005)

    out, _ = await _execute(polls, cancel="job")
    assert isinstance(out, Cancelled) and seen == [True]


async def test_current_job_is_made_on_first_use_and_sees_an_earlier_cancel() -> None:
    from jobqd import current_job

    async def asks(x: int) -> tuple[str, int, bool]:
        before = box_run[0].current
        job = current_job()
        assert current_job() is job  # made once, then the same one
        return ("none" if before is None else "made", job.attempt, job.cancelled)

    box_run: list[Running] = []
    sink = _StartSink()
    ex = Executor(_NoLimits(), sink, ThreadPoolExecutor(1))

    async def consumer(cancel_first: bool) -> Any:
        me = asyncio.current_task()
        assert me is not None
        run = Running(_delivery({"x": 1}), me)
        box_run[:] = [run]
        if cancel_first:  # as if cancel() came in between the start and the handler's ask
            run.cancelled = True
        return await ex.run(run, _cfg(asks))

    assert await asyncio.create_task(consumer(False)) == Succeeded(("none", 1, False))
    assert await asyncio.create_task(consumer(True)) == Succeeded(("none", 1, True))
    with pytest.raises(LookupError):
        current_job()  # outside a handler


async def test_current_job_is_made_once_when_handler_threads_ask_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A handler's own threads (asyncio.to_thread copies its context) may ask for
    current_job() at the same time, while a cancel comes in: they all get the one
    view, and it is cancelled."""
    import time

    from jobqd import current_job, execute
    from jobqd.jobs import _current

    made: list[int] = []
    gate = threading.Event()
    real = execute.CurrentJob

    def slow(**kw: Any) -> Any:
        made.append(1)
        gate.wait(10)  # held inside the making until the test has cancelled
        return real(**kw)

    monkeypatch.setattr(execute, "CurrentJob", slow)
    consumer = asyncio.create_task(asyncio.sleep(10))
    d = _delivery({"x": 1})
    run = Running(d, consumer, env=decode_job(d.fields[b"j"], "default"))
    token = _current.set(run)  # what Executor.run does around the handler
    try:
        asks = [asyncio.create_task(asyncio.to_thread(current_job)) for _ in range(3)]
    finally:
        _current.reset(token)
    deadline = time.monotonic() + 0.5  # without the lock all three get in at once
    while len(made) < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert made, "no thread asked"
    run.cancel()  # while the view is being made
    gate.set()
    views = await asyncio.gather(*asks)
    assert len(made) == 1 and all(v is views[0] for v in views) and run.current is views[0]
    assert views[0].cancelled
    assert consumer.cancelled() or consumer.cancelling()


async def test_execute_drain_while_a_thread_runs_abandons_the_job() -> None:
    release = threading.Event()

    def blocking() -> None:
        release.wait(10)

    try:
        out, _ = await _execute(blocking, cancel="drain")
        assert isinstance(out, Abandoned)
    finally:
        release.set()


async def test_execute_malformed_and_unknown_task() -> None:
    ex = Executor(_NoLimits(), _StartSink(), ThreadPoolExecutor(1))
    me = asyncio.current_task()
    assert me is not None
    bad = Delivery("default", b"1-0", {b"j": b"not json"})
    out = await ex.run(Running(bad, me), _cfg(lambda: None))
    assert isinstance(out, Dead) and out.reason == "malformed"
    other = Delivery("default", b"1-0", {b"j": encode_job(new_job_id("default"), "zz", {}, 1)})
    out = await ex.run(Running(other, me), _cfg(lambda: None))
    assert isinstance(out, Dead) and out.reason == "unknown_task"


async def test_execute_expired_job_never_runs() -> None:
    ran: list[int] = []

    async def work() -> None:
        ran.append(1)

    ex = Executor(_NoLimits(), _StartSink(), ThreadPoolExecutor(1))
    me = asyncio.current_task()
    assert me is not None
    jid = new_job_id("default")
    stale = Delivery("default", b"1-0", {b"j": encode_job(jid, "t", {}, 1.0, exp_ms=2.0)})
    out = await ex.run(Running(stale, me), _cfg(work))
    assert isinstance(out, Dead) and out.reason == "expired" and not ran
    # the task's own default: enqueued at 1 ms since the epoch, expires_s 60
    old = Delivery("default", b"1-0", {b"j": encode_job(jid, "t", {}, 1.0)})
    out = await ex.run(Running(old, me), _cfg(work, expires_s=60.0))
    assert isinstance(out, Dead) and out.reason == "expired" and not ran


async def test_execute_cancelled_before_start_never_runs() -> None:
    ran: list[int] = []

    async def work() -> None:
        ran.append(1)

    d = _delivery()
    jid = decode_job(d.fields[b"j"], "default").id
    ex = Executor(_NoLimits(), _StartSink(), ThreadPoolExecutor(1), cancelled={jid})
    me = asyncio.current_task()
    assert me is not None
    assert isinstance(await ex.run(Running(d, me), _cfg(work)), Cancelled) and not ran


def test_cancelled_outcome_is_a_c_record() -> None:
    d = _delivery()
    s = _settler().build(Cancelled(), d, decode_job(d.fields[b"j"], "default"))
    assert s is not None and s.op == "C" and s.payload == d.fields[b"j"]


# ---------------------------------------------------------------- batching


def test_fetch_size_refills_at_half_the_prefetch_buffer() -> None:
    from jobqd.pool import fetch_size

    # 16 consumers, prefetch unset, short runs: up to 16 running + 4 x 16 buffered
    assert fetch_size(16, None, 0.001, running=0, buffered=0, pending=0) == 80
    assert fetch_size(16, None, 0.001, running=16, buffered=33, pending=0) == 0  # > half
    assert fetch_size(16, None, 0.001, running=16, buffered=32, pending=5) == 32
    assert fetch_size(16, None, 0.001, running=10, buffered=0, pending=0) == 70
    # an explicit prefetch: that many ahead
    assert fetch_size(16, 16, 0.001, running=16, buffered=8, pending=5) == 8
    assert fetch_size(16, 16, 0.001, running=16, buffered=9, pending=0) == 0
    # settles awaiting their ride do not hold fetching back, unless they pile up
    assert fetch_size(16, None, 0.001, running=16, buffered=0, pending=80) == 64
    assert fetch_size(16, None, 0.001, running=16, buffered=0, pending=81) == 0


def test_fetch_size_fetches_no_further_ahead_for_long_jobs() -> None:
    from jobqd.pool import PREFETCH_MAX_RUN_S, fetch_size

    long = PREFETCH_MAX_RUN_S * 2
    assert fetch_size(16, None, long, running=15, buffered=0, pending=0) == 1
    assert fetch_size(16, None, long, running=16, buffered=0, pending=0) == 0
    # an explicit prefetch is kept whatever the run times; 0 never fetches ahead
    assert fetch_size(16, 4, long, running=16, buffered=2, pending=0) == 2
    assert fetch_size(16, 4, long, running=16, buffered=3, pending=0) == 0
    assert fetch_size(16, 0, 0.0, running=16, buffered=0, pending=0) == 0
    assert fetch_size(16, 0, 0.0, running=12, buffered=0, pending=0) == 4


def test_completion_splits_applied_chunks_from_refused_ones() -> None:
    from jobqd.config import Config, RedisConfig
    from jobqd.settle import Completion

    s = _settler()
    d = _delivery()
    one = s.build(Succeeded(1), d, decode_job(d.fields[b"j"], "default"),
                  started_ms=1, duration_s=0.0)
    assert one is not None
    cfg = Config(path="t.yaml", redis=RedisConfig(url="redis://localhost"))
    c = Completion(cfg, {"a": [one], "b": [one, one]})
    assert [q for q, _ in c.groups] == ["a", "b"] and len(c.calls) == 2
    err = RuntimeError("OOM")
    done, failed, acked = c.applied([b"1", err])
    assert acked is None  # no WAIT (redis.wait_replicas: 0)
    assert done == [("a", [one], "1")]
    assert failed == [(("b", [one, one]), err)]
