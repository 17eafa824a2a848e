"""Pure logic: scheduling order, backoff bounds, ids, the job codec."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from jobqd.config import BackoffConfig, TaskConfig, mask_url
from jobqd.execute import backoff_delay
from jobqd.fetch import SmoothWRR
from jobqd.ids import new_job_id, new_ulid, queue_of
from jobqd.jobs import BadJob, decode_job, encode_args, encode_job


def test_swrr_exact_shares_in_every_window() -> None:
    w = {"critical": 60, "high": 30, "normal": 10}
    picks = SmoothWRR().picks(3000, w, list(w))
    for start in range(0, 3000 - 100 + 1):
        c = Counter(picks[start:start + 100])
        for q, weight in w.items():
            assert abs(c[q] - weight) <= 1, (start, c)


def test_swrr_is_smooth_not_bursty() -> None:
    picks = SmoothWRR().picks(10, {"a": 5, "b": 5}, ["a", "b"])
    assert picks in (["a", "b"] * 5, ["b", "a"] * 5)


def test_swrr_state_spans_calls() -> None:
    w = {"a": 3, "b": 1}
    s = SmoothWRR()
    many = [q for _ in range(100) for q in s.picks(1, w, ["a", "b"])]
    assert Counter(many) == {"a": 75, "b": 25}


def _swrr_by_the_book(cur: dict[str, int], n: int, weights: dict[str, int],
                      active: list[str]) -> list[str]:
    """SmoothWRR.picks without its one-queue shortcut: the plain algorithm."""
    live = [q for q in active if weights.get(q, 0) > 0]
    if not live or n <= 0:
        return []
    for q in list(cur):
        if q not in live:
            del cur[q]
    total = sum(weights[q] for q in live)
    out = []
    for _ in range(n):
        best, best_w = None, 0
        for q in live:
            cur[q] = cur.get(q, 0) + weights[q]
            if best is None or cur[q] > best_w:
                best, best_w = q, cur[q]
        assert best is not None
        cur[best] -= total
        out.append(best)
    return out


def test_swrr_one_queue_shortcut_keeps_the_order() -> None:
    # queues come and go (one live queue takes the shortcut); the picks and the saved
    # credits must be those of the plain algorithm at every step
    rnd = random.Random(7)
    w = {"a": 5, "b": 3, "c": 1, "z": 0}
    s, book = SmoothWRR(), dict[str, int]()
    for _ in range(2000):
        active = rnd.sample(list(w), rnd.randint(0, 3))
        n = rnd.randint(0, 7)
        assert s.picks(n, w, active) == _swrr_by_the_book(book, n, w, active)
        assert s.current == book


def test_swrr_work_conserving_and_paused() -> None:
    s = SmoothWRR()
    w = {"a": 60, "b": 30, "c": 10}
    assert set(s.picks(50, w, ["c"])) == {"c"}  # only c has work: c gets every slot
    assert s.picks(5, {"a": 0, "b": 1}, ["a", "b"]) == ["b"] * 5  # weight 0 = paused
    assert s.picks(5, {"a": 0}, ["a"]) == []


def test_swrr_no_saved_up_burst_after_idle() -> None:
    s = SmoothWRR()
    w = {"a": 1, "b": 1}
    s.picks(10, w, ["a"])  # b idle: it must not bank credit
    assert Counter(s.picks(10, w, ["a", "b"])) == {"a": 5, "b": 5}


def test_backoff_full_jitter_bounds() -> None:
    task = TaskConfig(name="t", handler="x:y", retry_backoff=BackoffConfig(base_s=1, max_s=30))
    random.seed(7)
    for attempt in range(12):
        cap = min(1 * 2**attempt, 30)
        samples = [backoff_delay(task, attempt) for _ in range(300)]
        assert all(0 <= s <= cap for s in samples)
        assert max(samples) > cap * 0.8  # full jitter spans the whole range
        assert min(samples) < cap * 0.2
    assert backoff_delay(task, 10_000) <= 30  # no overflow for huge attempt counts


def test_ulid_sortable_and_queue_suffix() -> None:
    a = new_ulid(1_000)
    b = new_ulid(2_000)
    assert len(a) == 26 and a < b
    jid = new_job_id("high-prio")
    assert queue_of(jid) == "high-prio"
    assert queue_of("short") is None
    assert queue_of("!" * 26 + "-q") is None
    assert queue_of(a + "x" + "q") is None


def test_codec_roundtrip_and_rejects() -> None:
    raw = encode_job("01HZZZZZZZZZZZZZZZZZZZZZZZ-q", "t", {"a": [1, 2]}, 123.0, idem="k")
    env = decode_job(raw, "q")
    assert (env.task, env.args, env.attempt, env.lost, env.queue) == ("t", {"a": [1, 2]}, 0, 0, "q")
    assert decode_job(env.next(attempt=2), "q").attempt == 2
    for bad in (b"not json", b"[1]", b'{"id": "x", "task": "t"}',
                b'{"id": "01HZZZZZZZZZZZZZZZZZZZZZZZ-q", "task": ""}',
                b'{"id": "01HZZZZZZZZZZZZZZZZZZZZZZZ-q", "task": "t", "args": [1]}',
                b'{"id": "01HZZZZZZZZZZZZZZZZZZZZZZZ-q", "task": "t", "attempt": "1"}'):
        with pytest.raises(BadJob):
            decode_job(bad, "default")
    # the compact form: the id is the ULID alone (the queue is where it was read), the
    # enqueue time its ULID's unless stored
    jid = new_job_id("q", now_ms=1_700_000_000_123)
    env = decode_job(encode_job(jid, "t", {}, None), "q")
    assert (env.id, env.enq_ms, env.queue) == (jid, 1_700_000_000_123.0, "q")
    assert decode_job(encode_job(jid, "t", {}, 5.0), "q").enq_ms == 5.0
    assert decode_job(b'{"i": "%s", "t": "t"}' % jid.encode(), "other").id == jid  # a full id
    for bad in (b'{"i": "01HZZZZZZZZZZZZZZZZZZZZZZU", "t": "t"}',  # U is not Crockford
                b'{"i": "01hzzzzzzzzzzzzzzzzzzzzzzz", "t": "t"}', b'{"i": 7, "t": "t"}',
                b'{"i": "01HZZZZZZZZZZZZZZZZZZZZZZZ", "t": "t", "n": "1"}'):
        with pytest.raises(BadJob):
            decode_job(bad, "q")
    with pytest.raises(TypeError, match="dict"):
        encode_args([1, 2])
    with pytest.raises(TypeError, match="keys must be strings"):
        encode_args({1: 2})
    with pytest.raises(TypeError, match="JSON-serialisable"):
        encode_job("i", "t", {"x": object()}, 0)
    assert encode_args(None) == {}


def test_mask_url() -> None:
    assert mask_url("redis://:pw@h:1/0") == "redis://:****@h:1/0"
    assert mask_url("redis://user:pw@h:1/0") == "redis://user:****@h:1/0"
    assert mask_url("redis://h:1/0") == "redis://h:1/0"
    assert mask_url("host=db password=pw user=u") == "host=db password=**** user=u"


async def test_wait_first_one_event_or_several() -> None:
    import asyncio

    from jobqd.aio import wait_first

    a, b = asyncio.Event(), asyncio.Event()
    for events in ((a,), (a, b)):
        assert await wait_first(*events, timeout_s=0.01) is None  # nothing set: the timeout
        asyncio.get_running_loop().call_later(0.01, a.set)
        assert await wait_first(*events, timeout_s=5) is a  # set while waiting
        assert await wait_first(*events, timeout_s=0) is a  # set already
        a.clear()
        assert not a._waiters  # nothing left waiting on the event
        # an outer cancellation is not a timeout: it propagates
        t = asyncio.ensure_future(wait_first(*events, timeout_s=5))
        await asyncio.sleep(0.01)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        assert not a._waiters


async def test_a_redis_py_write_on_a_torn_down_connection_is_a_redis_error() -> None:
    # redis-py 8.1.0 lets a write on a connection whose transport is gone escape as
    # AttributeError (redis/redis-py#4287, #3546); in a Redis Cluster failover it crashed
    # the pool's control loop. Raise it through redis-py's own code, as it happens.
    import redis.asyncio as aredis

    from jobqd.deps import is_redis_error, is_redis_transport_race, is_redis_unreachable

    conn = aredis.Connection(host="127.0.0.1", port=6379)
    assert conn._writer is None  # never connected, or disconnected under us
    try:
        await conn._send_packed_command([b"*1\r\n$4\r\nPING\r\n"])
    except AttributeError as e:
        race: BaseException = e
    else:
        raise AssertionError("redis-py no longer fails this way: revisit deps.py")
    assert is_redis_transport_race(race) and is_redis_error(race)
    assert is_redis_unreachable(race)
    # the same error from anywhere else is a bug, and crashes loudly
    try:
        None.writelines([])  # type: ignore[attr-defined]
    except AttributeError as e:
        ours: BaseException = e
    assert not is_redis_transport_race(ours) and not is_redis_error(ours)
    assert not is_redis_error(TypeError("'NoneType' object is not callable"))  # no traceback
