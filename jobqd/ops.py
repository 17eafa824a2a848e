"""Every Redis-side operation of jobqd, written once, sans-I/O.

An operation is a generator that yields `Call`s (a command, a Lua script or a
pipeline of either) and receives their replies; `AsyncRunner` and `SyncRunner`
drive it. `Client` and `SyncClient` therefore share one implementation of
enqueue, status, dead-letter and admin logic and cannot drift apart.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias, TypeVar

import orjson
import redis
import redis.asyncio as aredis
from redis.exceptions import ResponseError

from jobqd import deps, scripts
from jobqd.errors import (
    InvalidArgument,
    JobNotFound,
    JobqdError,
    NotReplicated,
    PayloadTooDeep,
    PayloadTooLarge,
    QueueFull,
    RedisMemoryFull,
    RedisOutOfMemory,
    UnknownTask,
)
from jobqd.ids import new_job_id, queue_of
from jobqd.jobs import (
    BadJob,
    Job,
    JobInfo,
    check_depth,
    decode_job,
    encode_args,
    encode_fields,
    encode_job,
    validate_delay_s,
    validate_expires_s,
    view,
)
from jobqd.keys import GROUP, GlobalKeys, QueueKeys

Cmd = scripts.Command  # a plain command
Eval = scripts.ScriptCall  # a Lua script call (NOSCRIPT-safe)


@dataclass(frozen=True, slots=True)
class Pipe:
    calls: list[Cmd | Eval]
    # True: a call's error comes back in its place in the reply list (so an op can
    # tell which calls went through); False: the first error is raised
    errors_inline: bool = False


@dataclass(frozen=True, slots=True)
class Sleep:
    seconds: float


Call: TypeAlias = Cmd | Eval | Pipe | Sleep
T = TypeVar("T")
Op: TypeAlias = Generator[Call, Any, T]  # an operation whose result is a T


def cmd(*args: Any) -> Cmd:
    return Cmd(args)


def translate(e: BaseException) -> BaseException:
    """A Redis error as the jobqd error a caller should see (OOM -> RedisOutOfMemory)."""
    if deps.is_oom(e):
        err = RedisOutOfMemory(str(e).split("\n")[0][:200])
        err.__cause__ = e
        return err
    return e


class UnknownQueue(UnknownTask):
    """The queue was never published by a daemon (not in any daemon's config)."""

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.task = ""
        Exception.__init__(self, f"unknown queue {queue!r}: no daemon serves it")


# ---------------------------------------------------------------- runners


class AsyncRunner:
    def __init__(self, r: aredis.Redis) -> None:
        self.r = r

    async def run(self, op: Op[T]) -> T:
        try:
            call = next(op)
            while True:
                try:
                    reply = await self._exec(call)
                except Exception as e:
                    call = op.throw(translate(e))
                else:
                    call = op.send(reply)
        except StopIteration as stop:
            result: T = stop.value  # what the operation returned
            return result

    async def _exec(self, call: Call) -> Any:
        if isinstance(call, Sleep):
            await asyncio.sleep(call.seconds)
            return None
        if isinstance(call, Cmd):
            return await self.r.execute_command(*call.args)  # type: ignore[no-untyped-call]
        if isinstance(call, Eval):
            return await call.script(self.r, call.keys, call.args)
        replies = await scripts.pipelined(self.r, call.calls)
        return _pipe_replies(call, replies)


class SyncRunner:
    def __init__(self, r: redis.Redis) -> None:
        self.r = r

    def run(self, op: Op[T]) -> T:
        try:
            call = next(op)
            while True:
                try:
                    reply = self._exec(call)
                except Exception as e:
                    call = op.throw(translate(e))
                else:
                    call = op.send(reply)
        except StopIteration as stop:
            result: T = stop.value  # what the operation returned
            return result

    def _exec(self, call: Call) -> Any:
        if isinstance(call, Sleep):
            time.sleep(call.seconds)
            return None
        if isinstance(call, Cmd):
            return self.r.execute_command(*call.args)  # type: ignore[no-untyped-call]
        if isinstance(call, Eval):
            return call.script.call_sync(self.r, call.keys, call.args)
        replies = scripts.pipelined_sync(self.r, call.calls)
        return _pipe_replies(call, replies)


def _pipe_replies(call: Pipe, replies: list[Any]) -> list[Any]:
    """A pipeline's replies: errors translated, then raised or (errors_inline) kept."""
    out = [translate(x) if isinstance(x, Exception) else x for x in replies]
    if not call.errors_inline:
        for x in out:
            if isinstance(x, Exception):
                raise x
    return out


# ---------------------------------------------------------------- helpers


def s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def fields_dict(flat: Sequence[Any] | dict[Any, Any]) -> dict[str, Any]:
    """Stream fields as a dict, from a flat [k, v, ...] reply or redis-py's parsed dict."""
    if isinstance(flat, dict):
        return {s(k): v for k, v in flat.items()}
    it = iter(flat)
    return {s(k): v for k, v in zip(it, it, strict=False)}


def now_ms() -> float:
    return time.time() * 1000.0


class Routing:
    """The producer's cached copy of the routing table (task -> queue) in Redis."""

    def __init__(self, prefix: str) -> None:
        self.g = GlobalKeys(prefix)
        self.table: dict[str, str] = {}
        self.loaded_at = 0.0

    def refresh(self) -> Op[dict[str, str]]:
        raw = yield cmd("HGETALL", self.g.routing)
        if isinstance(raw, dict):
            self.table = {s(k): s(v) for k, v in raw.items()}
        else:
            self.table = fields_dict_str(raw)
        self.loaded_at = time.monotonic()
        return self.table

    def queue_for(self, task: str) -> Op[str | None]:
        if task not in self.table or time.monotonic() - self.loaded_at > 30:
            yield from self.refresh()
        return self.table.get(task)


def fields_dict_str(flat: Sequence[Any]) -> dict[str, str]:
    return {k: s(v) for k, v in fields_dict(flat).items()}


# ---------------------------------------------------------------- enqueue

BATCH = 500  # jobs per enqueue script call (bounds one script's run time)


def enqueue(prefix: str, routing: Routing, task: str, args_list: Sequence[Any], *,
            queue: str | None, delay_s: float | None,
            idempotency_keys: Sequence[str | None] | None, idem_ttl_ms: int,
            expires_s: float | None = None, wait_replicas: int = 0,
            wait_timeout_ms: int = 500) -> Op[list[Job]]:
    """Enqueue jobs of one task; returns list[Job]. Raises QueueFull / UnknownTask / ...

    With `wait_replicas` > 0 a ``WAIT wait_replicas wait_timeout_ms`` rides in the same
    pipelined round trip; fewer replicas acknowledging raises `NotReplicated` (the jobs
    are on the master: ``.accepted``)."""
    if not isinstance(task, str) or not task:
        raise InvalidArgument("task", "task must be a non-empty string")
    if delay_s is not None:
        delay_s = validate_delay_s(delay_s)
    if idempotency_keys is not None and len(idempotency_keys) != len(args_list):
        raise ValueError("idempotency_keys must have one entry per job")
    if expires_s is not None:
        expires_s = validate_expires_s(expires_s)
    delay_ms = max(0, round((delay_s or 0) * 1000))
    for refresh in (False, True):
        if refresh:
            yield from routing.refresh()
        q = queue
        if q is None:
            q = yield from routing.queue_for(task)
            if q is None:
                if refresh:
                    raise UnknownTask(task)
                continue
        qk = QueueKeys(prefix, q)
        ts = int(time.time() * 1000)  # the ids' ULID time too: the job JSON leaves it out
        exp_ms = None if expires_s is None else ts + delay_ms + expires_s * 1000.0
        calls: list[Cmd | Eval] = []
        jobs_meta: list[list[str]] = []
        for start in range(0, len(args_list), BATCH):
            chunk = args_list[start:start + BATCH]
            keys = [qk.stream, qk.delayed, qk.state, qk.conf, qk.full, qk.enqueued,
                    qk.memfull]
            argv: list[Any] = [task, len(chunk), idem_ttl_ms]
            ids = []
            for i, args in enumerate(chunk):
                job_id = new_job_id(q, ts)
                ids.append(job_id)
                idem = idempotency_keys[start + i] if idempotency_keys is not None else None
                ki = 0
                if idem is not None:
                    if not isinstance(idem, str) or not idem:
                        raise InvalidArgument("idempotency_key",
                                              "idempotency_key must be a non-empty string")
                    keys.append(qk.idem(idem))
                    ki = len(keys) - 7
                argv += [job_id, encode_job(job_id, task, encode_args(args), None, idem=idem,
                                            exp_ms=exp_ms),
                         delay_ms, ki]
            jobs_meta.append(ids)
            calls.append(Eval(scripts.ENQUEUE, keys, argv))
        acked: Any = None
        if wait_replicas > 0:  # WAIT covers every write of the calls before it
            replies = yield Pipe([*calls, scripts.wait_call(wait_replicas, wait_timeout_ms)],
                                 errors_inline=True)
            acked = replies.pop()
        elif len(calls) == 1:
            call: Call = calls[0]
            replies = [(yield call)]
        else:
            replies = yield Pipe(calls, errors_inline=True)
        # Every chunk ran (one pipeline; each chunk is one atomic script: all of its
        # jobs or none): collect all accepted jobs first, so an error in one chunk
        # never hides jobs another chunk created (a caller's retry would duplicate
        # them). Errors carry `.accepted`.
        out: list[Job] = []
        errors = []
        for reply in replies:
            if isinstance(reply, Exception):
                errors.append(reply)
            elif s(reply[0]) == "OK":
                flags = s(reply[1])
                out += [Job(id=s(jid), task=task, queue=q, created=flag == "1")
                        for jid, flag in zip(reply[2:], flags, strict=True)]
            else:
                errors.append(reply)
        if not errors:
            if acked is not None and (isinstance(acked, Exception) or acked < wait_replicas):
                n = 0 if isinstance(acked, Exception) else int(acked)
                raise NotReplicated(n, wait_replicas, out)
            return out
        reply = errors[0]
        if isinstance(reply, Exception):  # OOM, or another Redis error of that chunk
            reply.accepted = out  # type: ignore[attr-defined]
            raise reply
        tag = s(reply[0])
        err: JobqdError
        if tag == "UNKNOWN":
            if queue is not None:
                exists = yield cmd("EXISTS", qk.conf)
                if not exists:
                    raise UnknownQueue(q)
            if not refresh and queue is None and not out:
                continue  # a stale routing cache: refresh once and try again
            err = UnknownTask(task)
        elif tag == "FULL":
            err = QueueFull(q, int(reply[1]), int(reply[2]), int(reply[3]), retry_after_s=1.0)
        elif tag == "MEMFULL":
            used, mx, frac = [*s(reply[1]).split(), "0", "0", "0"][:3]
            err = RedisMemoryFull(q, int(used), int(mx), float(frac))
        elif tag == "TOOBIG":
            err = PayloadTooLarge(int(reply[2]), int(reply[3]))
        else:  # pragma: no cover - the script returns nothing else
            err = JobqdError(f"unexpected enqueue reply {reply!r}")
        err.accepted = out
        raise err
    raise UnknownTask(task)  # pragma: no cover - loop always returns or raises


def waiting(make: Callable[[], Op[T]], wait: bool, timeout_s: float | None) -> Op[T]:
    """Run the op `make()` builds; with `wait`, retry it while the queue is full.

    Backoff 50 ms doubling to 1 s; gives up (re-raising QueueFull) after timeout_s.
    A batch that was partly accepted is never retried (it would duplicate jobs).
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    attempt = 0
    while True:
        try:
            return (yield from make())
        except QueueFull as e:
            if not wait or e.accepted:
                raise
            pause = min(1.0, 0.05 * 2**attempt)
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                pause = min(pause, left)
            attempt += 1
            yield Sleep(pause)


# ---------------------------------------------------------------- status


def _ms_to_s(v: Any) -> float | None:
    return None if v in (None, "", b"") else float(v) / 1000.0


def status(prefix: str, job_id: str) -> Op[JobInfo]:
    q = queue_of(job_id)
    if q is None:
        raise JobNotFound(job_id)
    reply = yield status_call(prefix, q, job_id)
    return parse_status(job_id, q, reply)


def status_call(prefix: str, q: str, job_id: str) -> Eval:
    """The STATUS.lua call for one job (pipelined by `status`, `outbox`, waiting)."""
    qk = QueueKeys(prefix, q)
    return Eval(scripts.STATUS, [qk.state, qk.stream, qk.delayed, qk.dlq, qk.result(job_id),
                                 qk.progress, qk.cancel], [job_id, GROUP])


def parse_status(job_id: str, q: str, reply: Any) -> JobInfo:
    tag = s(reply[0])
    if tag == "N":
        raise JobNotFound(job_id)
    if tag == "R":
        rec = orjson.loads(reply[1])
        if rec.get("status") == "cancelled":
            job = view(rec["job"], q) if isinstance(rec.get("job"), dict) else {}
            return JobInfo(id=job_id, status="cancelled", task=job.get("task"), queue=q,
                           attempts=rec.get("attempts", job.get("attempt", 0)),
                           lost=job.get("lost", 0),
                           error=job.get("err"), enqueued_at=_ms_to_s(job.get("enq")),
                           finished_at=_ms_to_s(rec.get("finished")), args=job.get("args"))
        return JobInfo(id=job_id, status=rec["status"], task=rec.get("task"), queue=q,
                       attempts=rec.get("attempts", 0), lost=rec.get("lost", 0),
                       result=rec.get("result"), error=rec.get("error"),
                       enqueued_at=_ms_to_s(rec.get("enq")),
                       started_at=_ms_to_s(rec.get("started")),
                       finished_at=_ms_to_s(rec.get("finished")), worker=rec.get("worker"))
    if tag == "D":
        env = view(orjson.loads(reply[1]), q)
        return JobInfo(id=job_id, status="scheduled", task=env.get("task"), queue=q,
                       attempts=env.get("attempt", 0), lost=env.get("lost", 0),
                       error=env.get("err"), enqueued_at=_ms_to_s(env.get("enq")),
                       scheduled_for=_ms_to_s(reply[2]), args=env.get("args"))
    if tag == "X":
        dead = dead_entry(q, reply[1], reply[2])
        return dead.info()
    fields = fields_dict(reply[2])
    env = view(orjson.loads(fields["j"]), q)
    owner = reply[3]
    running = bool(owner)
    progress = orjson.loads(reply[4]) if running and len(reply) > 4 and reply[4] else None
    return JobInfo(id=job_id, status="running" if running else "queued", task=env.get("task"),
                   queue=q, attempts=env.get("attempt", 0) + (1 if running else 0),
                   lost=env.get("lost", 0), error=env.get("err"),
                   enqueued_at=_ms_to_s(env.get("enq")),
                   worker=s(owner[0]) if running else None, args=env.get("args"),
                   progress=progress,
                   cancel_requested=running and len(reply) > 5 and bool(int(reply[5])))


# ---------------------------------------------------------------- dead letters


@dataclass(frozen=True, slots=True)
class DeadJob:
    """One dead-letter entry."""

    ref: str  # the job id, or "<queue>/<entry id>" for an entry that was never a valid job
    queue: str
    entry_id: str
    job: dict[str, Any] | None  # the job envelope, None for garbage
    raw: str  # the job field as stored (for garbage: a JSON dump of the fields)
    death: dict[str, Any]

    @property
    def job_id(self) -> str | None:
        return self.job["id"] if self.job else None

    def to_dict(self) -> dict[str, Any]:
        d = self.death
        return {"id": self.ref, "task": (self.job or {}).get("task"), "queue": self.queue,
                "reason": d.get("reason"), "error": d.get("error"),
                "attempts": d.get("attempts", 0), "lost": d.get("lost", 0),
                "enqueued_at": _ms_to_s((self.job or {}).get("enq")),
                "died_at": _ms_to_s(d.get("died")), "traceback": d.get("traceback"),
                "args": (self.job or {}).get("args"), "entry_id": self.entry_id,
                **({} if self.job else {"raw": self.raw})}

    def info(self) -> JobInfo:
        d = self.to_dict()
        return JobInfo(id=self.ref, status="dead", task=d["task"], queue=self.queue,
                       attempts=d["attempts"], lost=d["lost"], error=d["error"],
                       reason=d["reason"], traceback=d["traceback"],
                       enqueued_at=d["enqueued_at"], finished_at=d["died_at"], args=d["args"],
                       started_at=_ms_to_s(self.death.get("started")),
                       worker=self.death.get("worker"))


def dead_entry(q: str, entry_id: Any, flat: Sequence[Any]) -> DeadJob:
    f = fields_dict(flat)
    raw = s(f.get("j", b""))
    try:
        death = orjson.loads(f.get("e", b"{}"))
    except orjson.JSONDecodeError:
        death = {"reason": "unknown"}
    job: dict[str, Any] | None
    try:
        job = decode_job(raw, q).fields()
    except BadJob:
        job = None
    eid = s(entry_id)
    return DeadJob(ref=job["id"] if job else f"{q}/{eid}", queue=q, entry_id=eid, job=job,
                   raw=raw, death=death if isinstance(death, dict) else {})


def known_queues(prefix: str) -> Op[list[str]]:
    raw = yield cmd("SMEMBERS", GlobalKeys(prefix).queues)
    return sorted(s(x) for x in raw)


def dlq_list(prefix: str, queue: str | None = None, limit: int = 1000) -> Op[list[DeadJob]]:
    queues = [queue] if queue else (yield from known_queues(prefix))
    out: list[DeadJob] = []
    for q in queues:
        entries = yield cmd("XRANGE", QueueKeys(prefix, q).dlq, "-", "+", "COUNT", limit)
        out += [dead_entry(q, eid, flat) for eid, flat in entries]
    return out


def dlq_totals(prefix: str, queues: Sequence[str]) -> Op[dict[str, int]]:
    """queue -> number of dead-letter entries (XLEN), in one round trip."""
    if not queues:
        return {}
    lens = yield Pipe([cmd("XLEN", QueueKeys(prefix, q).dlq) for q in queues])
    return {q: int(n) for q, n in zip(queues, lens, strict=True)}


def dlq_page(prefix: str, queue: str, after: str | None, count: int) -> Op[list[DeadJob]]:
    """Up to ``count`` dead-letter entries of one queue, after entry id ``after``."""
    start = "-" if after is None else "(" + after
    entries = yield cmd("XRANGE", QueueKeys(prefix, queue).dlq, start, "+", "COUNT", count)
    return [dead_entry(queue, eid, flat) for eid, flat in entries]


def _dlq_locate(prefix: str, ref: str) -> Op[tuple[str, str]]:
    """ref -> (queue, dlq entry id)."""
    if "/" in ref:
        q, _, eid = ref.partition("/")
        return q, eid
    queue = queue_of(ref)
    if queue is None:
        raise JobNotFound(ref)
    q = queue
    v = yield cmd("HGET", QueueKeys(prefix, q).state, ref)
    v = s(v) if v is not None else ""
    if not v.startswith("x"):
        raise JobNotFound(ref)
    return q, v[1:]


def dlq_show(prefix: str, ref: str) -> Op[DeadJob]:
    q, eid = yield from _dlq_locate(prefix, ref)
    entries = yield cmd("XRANGE", QueueKeys(prefix, q).dlq, eid, eid)
    if not entries:
        raise JobNotFound(ref)
    return dead_entry(q, entries[0][0], entries[0][1])


def _replay(prefix: str, dead: DeadJob) -> Op[bool]:
    if dead.job is None:
        raise BadJob(f"{dead.ref} was never a valid job and cannot be replayed "
                     f"(raw: {dead.raw[:200]!r})")
    try:
        check_depth(dead.job.get("args"))
    except PayloadTooDeep as e:  # written straight to Redis, past every producer check
        raise BadJob(f"{dead.ref} cannot be replayed: {e}") from None
    env = dict(dead.job)
    env.update(attempt=0, lost=0)
    env.pop("err", None)
    qk = QueueKeys(prefix, dead.queue)
    new_eid = yield Eval(scripts.DLQ_REPLAY, [qk.dlq, qk.stream, qk.state, qk.result(env["id"])],
                         [dead.entry_id, env["id"], encode_fields(env)])
    return new_eid is not None


def dlq_replay(prefix: str, ref: str) -> Op[str]:
    """Replay one dead job (attempts reset). Never refused by backpressure."""
    dead = yield from dlq_show(prefix, ref)
    ok = yield from _replay(prefix, dead)
    if not ok or dead.job_id is None:
        raise JobNotFound(ref)
    return dead.job_id


def dlq_replay_all(prefix: str, queue: str | None = None) -> Op[tuple[int, int]]:
    """Replay every valid dead job present when called; returns (replayed, skipped garbage).

    Works on a snapshot (entries up to each DLQ's last id at the start), so a
    replayed job that dies again is not replayed a second time by this call.
    """
    queues = [queue] if queue else (yield from known_queues(prefix))
    replayed = skipped = 0
    for q in queues:
        dlq = QueueKeys(prefix, q).dlq
        last = yield cmd("XREVRANGE", dlq, "+", "-", "COUNT", 1)
        if not last:
            continue
        end = s(last[0][0])
        start = "-"
        while True:
            entries = yield cmd("XRANGE", dlq, start, end, "COUNT", 500)
            if not entries:
                break
            for eid, flat in entries:
                d = dead_entry(q, eid, flat)
                if d.job is None:
                    skipped += 1
                elif (yield from _replay(prefix, d)):
                    replayed += 1
            start = "(" + s(entries[-1][0])
    return replayed, skipped


def dlq_purge(prefix: str, queue: str | None = None) -> Op[int]:
    queues = [queue] if queue else (yield from known_queues(prefix))
    removed = 0
    for q in queues:
        qk = QueueKeys(prefix, q)
        while True:
            entries = yield cmd("XRANGE", qk.dlq, "-", "+", "COUNT", 500)
            if not entries:
                break
            argv: list[Any] = []
            for eid, flat in entries:
                d = dead_entry(q, eid, flat)
                argv += [d.entry_id, d.job_id or ""]
            removed += yield Eval(scripts.DLQ_REMOVE, [qk.dlq, qk.state], argv)
    return removed


def dlq_delete(prefix: str, ref: str) -> Op[int]:
    q, eid = yield from _dlq_locate(prefix, ref)
    qk = QueueKeys(prefix, q)
    job_id = "" if "/" in ref else ref
    removed = yield Eval(scripts.DLQ_REMOVE, [qk.dlq, qk.state], [eid, job_id])
    if not removed:
        raise JobNotFound(ref)
    return int(removed)


# ---------------------------------------------------------------- weights & queue stats


def weights_get(prefix: str) -> Op[dict[str, int]]:
    return _weights((yield cmd("HGETALL", GlobalKeys(prefix).weights)))


def _weights(raw: Any) -> dict[str, int]:
    table = {s(k): s(v) for k, v in raw.items()} if isinstance(raw, dict) else \
        fields_dict_str(raw)
    out: dict[str, int] = {}
    for k, v in table.items():
        try:
            n = int(v)
        except ValueError:  # written by hand into Redis: the weights loop reports it
            continue
        if n >= 0:
            out[k] = n
    return out


def weights_set(prefix: str, changes: dict[str, int],
                declared: Collection[str] = ()) -> Op[dict[str, int]]:
    """Set queue weights; a queue must be published by a daemon or in ``declared``
    (the queues of the config file the caller was given)."""
    queues = yield from known_queues(prefix)
    for q, w in changes.items():
        if q not in queues and q not in declared:
            raise UnknownQueue(q)
        if not isinstance(w, int) or isinstance(w, bool) or w < 0:
            raise ValueError(f"weight of {q!r} must be an integer >= 0, got {w!r}")
    if changes:
        yield cmd("HSET", GlobalKeys(prefix).weights, *[x for kv in changes.items() for x in kv])
    return (yield from weights_get(prefix))


@dataclass(frozen=True, slots=True)
class QueueStats:
    name: str
    depth: int  # jobs not yet acked: waiting + in flight + scheduled
    waiting: int  # in the stream, not yet fetched
    in_flight: int  # fetched by a consumer, not yet acked
    scheduled: int  # delayed or waiting for a retry
    dead: int  # dead-letter entries
    done: int  # attempts settled so far (a counter: rate = its growth per second)
    lag_s: float  # age of the oldest waiting job
    accepting: bool
    weight: int | None
    high_watermark: int | None
    low_watermark: int | None
    paused: bool = False
    # task -> jobs ever enqueued by any producer (a counter; for /metrics, not in to_dict)
    enqueued: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__ if k != "enqueued"}


def queue_stats(prefix: str, queues: Sequence[str] | None = None) -> Op[list[QueueStats]]:
    """Every queue's numbers in a constant number of round trips (pipelined stages)."""
    if queues is None:
        queues = yield from known_queues(prefix)
    g = GlobalKeys(prefix)
    calls: list[Cmd | Eval] = [cmd("HGETALL", g.weights), cmd("SMEMBERS", g.paused)]
    for q in queues:
        qk = QueueKeys(prefix, q)
        calls += [cmd("XLEN", qk.stream), cmd("ZCARD", qk.delayed), cmd("XLEN", qk.dlq),
                  cmd("EXISTS", qk.full), cmd("HMGET", qk.conf, "high", "low"),
                  cmd("EXISTS", qk.stream), cmd("GET", qk.done), cmd("HGETALL", qk.enqueued)]
    weights_raw, paused_raw, *replies = yield Pipe(calls)  # one round trip for all queues
    weights = _weights(weights_raw)
    paused = {s(x) for x in paused_raw}
    rows = [replies[i * 8:(i + 1) * 8] for i in range(len(queues))]
    with_stream = [q for q, row in zip(queues, rows, strict=True) if row[5]]
    pending_lag = yield from _pending_and_lag(prefix, with_stream)
    out = []
    for q, (xlen, zcard, dead, full, (high, low), _, done, enq) in zip(queues, rows,
                                                                       strict=True):
        pending, lag = pending_lag.get(q, (0, 0.0))
        out.append(QueueStats(
            name=q, depth=int(xlen) + int(zcard), waiting=max(0, int(xlen) - pending),
            in_flight=pending, scheduled=int(zcard), dead=int(dead), done=int(done or 0),
            lag_s=lag,
            accepting=not full, weight=weights.get(q),
            high_watermark=int(high) if high else None, low_watermark=int(low) if low else None,
            paused=q in paused,
            enqueued={k: int(v) for k, v in fields_dict(enq).items()}))
    return out


def _pending_and_lag(prefix: str, queues: Sequence[str]) -> Op[dict[str, tuple[int, float]]]:
    """queue -> (entries in flight, age of the oldest waiting job), in two round trips."""
    if not queues:
        return {}
    streams = [QueueKeys(prefix, q).stream for q in queues]
    groups_per_queue = yield Pipe([cmd("XINFO", "GROUPS", st) for st in streams])
    pending: dict[str, int] = {}
    last: dict[str, str] = {}
    for q, groups in zip(queues, groups_per_queue, strict=True):
        for g in groups:
            info = {s(k): v for k, v in (g if isinstance(g, dict) else fields_dict(g)).items()}
            if s(info.get("name")) == GROUP:
                pending[q] = int(info.get("pending", 0))
                last[q] = s(info.get("last-delivered-id", "0-0"))
    nexts = yield Pipe([cmd("XRANGE", st, "(" + last.get(q, "0-0"), "+", "COUNT", 1)
                        for q, st in zip(queues, streams, strict=True)])
    now = time.time()
    out = {}
    for q, nxt in zip(queues, nexts, strict=True):
        lag = max(0.0, now - int(s(nxt[0][0]).split("-")[0]) / 1000.0) if nxt else 0.0
        out[q] = (pending.get(q, 0), lag)
    return out


# ---------------------------------------------------------------- job control


@dataclass(frozen=True, slots=True)
class CancelResult:
    """What `cancel` did: `cancelled` (removed: it never runs), `cancelling` (running:
    the daemon holding it stops it, and it ends `cancelled`), or `finished` (it had
    already ended: `status` says how; nothing changed)."""

    job_id: str
    outcome: str  # cancelled, cancelling, finished
    status: str  # queued/scheduled (removed), running, or the final status

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.job_id, "outcome": self.outcome, "status": self.status}


def cancel(prefix: str, job_ids: Sequence[str], result_ttl_ms: int) -> Op[list[CancelResult]]:
    """Cancel jobs (one pipelined round trip); returns list[CancelResult] in order.
    Raises JobNotFound for an id no queue knows (after the others are done)."""
    g = GlobalKeys(prefix)
    calls: list[Cmd | Eval] = []
    for jid in job_ids:
        q = queue_of(jid)
        if q is None:
            raise JobNotFound(jid)
        qk = QueueKeys(prefix, q)
        calls.append(Eval(scripts.CANCEL, [qk.state, qk.stream, qk.delayed, qk.result(jid),
                                           qk.cancel, qk.waiters],
                          [jid, GROUP, result_ttl_ms, g.control, g.done]))
    replies = (yield Pipe(calls)) if calls else []
    out: list[CancelResult] = []
    missing = []
    for jid, reply in zip(job_ids, replies, strict=True):
        tag = s(reply[0])
        if tag == "N":
            missing.append(jid)
        elif tag == "CANCELLED":
            out.append(CancelResult(jid, "cancelled", s(reply[1])))
        elif tag == "CANCELLING":
            out.append(CancelResult(jid, "cancelling", "running"))
        else:
            out.append(CancelResult(jid, "finished", s(reply[1])))
    if missing:
        err = JobNotFound(missing[0])
        err.accepted = out  # what was done before the unknown id was found
        raise err
    return out


CANCEL_SCAN = 500


def cancel_many(prefix: str, queue: str, result_ttl_ms: int, *, task: str | None = None,
                scheduled_only: bool = False) -> Op[dict[str, int]]:
    """Cancel every job of a queue (or of one task in it) that has not finished:
    scheduled ones, and unless `scheduled_only` queued and running ones. Pages
    through the queue (never loads it whole); returns {outcome: count}."""
    known = yield from known_queues(prefix)
    if queue not in known:
        raise UnknownQueue(queue)
    qk = QueueKeys(prefix, queue)
    counts = {"cancelled": 0, "cancelling": 0}

    def matches(job_json: Any) -> str | None:
        try:
            env = decode_job(job_json, queue)
        except BadJob:
            return None
        return env.id if task is None or env.task == task else None

    # scheduled: the state hash holds each one's job json
    cursor = 0
    while True:
        cursor_raw, items = yield cmd("ZSCAN", qk.delayed, cursor, "COUNT", CANCEL_SCAN)
        cursor = int(cursor_raw)
        if items and not isinstance(items[0], list | tuple):  # RESP2 without the callback
            items = list(zip(items[0::2], items[1::2], strict=True))
        flat_ids = [s(member) for member, _score in items]
        if flat_ids:
            states = yield cmd("HMGET", qk.state, *flat_ids)
            pick = [jid for jid, v in zip(flat_ids, states, strict=True)
                    if v and s(v).startswith("d") and matches(s(v)[1:])]
            for res in (yield from cancel(prefix, pick, result_ttl_ms)) if pick else []:
                if res.outcome in counts:
                    counts[res.outcome] += 1
        if cursor == 0:
            break
    if scheduled_only:
        return counts
    start = "-"
    while True:
        entries = yield cmd("XRANGE", qk.stream, start, "+", "COUNT", CANCEL_SCAN)
        if not entries:
            break
        pick = []
        for _eid, flat in entries:
            jid = matches(fields_dict(flat).get("j", b""))
            if jid is not None:
                pick.append(jid)
        if pick:
            try:
                done = yield from cancel(prefix, pick, result_ttl_ms)
            except JobNotFound as e:  # finished and gone meanwhile: count the rest
                done = list(e.accepted)
            for res in done:
                if res.outcome in counts:
                    counts[res.outcome] += 1
        start = "(" + s(entries[-1][0])
    return counts


def set_paused(prefix: str, queue: str, paused: bool) -> Op[bool]:
    """Pause (no daemon starts the queue's jobs; enqueues are still accepted) or resume."""
    known = yield from known_queues(prefix)
    if queue not in known:
        raise UnknownQueue(queue)
    yield cmd("SADD" if paused else "SREM", GlobalKeys(prefix).paused, queue)
    return paused


def paused_queues(prefix: str) -> Op[list[str]]:
    raw = yield cmd("SMEMBERS", GlobalKeys(prefix).paused)
    return sorted(s(x) for x in raw)


# ---------------------------------------------------------------- browsing a queue (dashboard)

BROWSE_SCAN = 2000  # at most this many entries are read to fill one filtered page


@dataclass(frozen=True, slots=True)
class JobRow:
    """One job as a queue listing shows it (no args: the job page has them)."""

    id: str
    task: str | None
    enqueued_at: float | None
    attempts: int
    position: str  # stream entry id, or due time (ms) of a scheduled job
    worker: str | None = None  # running: the consumer holding it
    idle_s: float | None = None  # running: since it was delivered (or last claimed)


@dataclass(frozen=True, slots=True)
class JobPage:
    rows: list[JobRow]
    next: str | None  # the cursor of the next page, None at the end
    scanned: int  # entries read from Redis for this page


def _row(queue: str, raw: Any, position: str, **extra: Any) -> JobRow | None:
    try:
        env = decode_job(s(raw), queue).fields()
    except BadJob:
        return None
    return JobRow(id=str(env.get("id")), task=env.get("task"),
                  enqueued_at=_ms_to_s(env.get("enq")), attempts=int(env.get("attempt", 0)),
                  position=position, **extra)


def queue_jobs(prefix: str, queue: str, where: str, *, newest_first: bool = False,
               after: str | None = None, count: int = 50,
               task: str | None = None) -> Op[JobPage]:
    """One page of a queue's jobs: ``where`` is ``stream`` (queued and running, by
    XRANGE/XREVRANGE), ``scheduled`` (the delayed ZSET by index) or ``running`` (the
    consumer group's pending entries, oldest delivery first). Reads with COUNT limits
    only (never the whole queue); with ``task``, keeps reading pages until ``count``
    matches or BROWSE_SCAN entries were read. ``after``: the cursor a page returned."""
    if where not in ("stream", "scheduled", "running"):
        raise ValueError(f"where must be stream, scheduled or running, got {where!r}")
    qk = QueueKeys(prefix, queue)
    rows: list[JobRow] = []
    scanned = 0
    chunk = max(count, 100) if task else count
    cursor = after
    while len(rows) < count and scanned < BROWSE_SCAN:
        if where == "scheduled":
            start = int(cursor or 0)
            args: list[Any] = ["ZRANGE", qk.delayed, start, start + chunk - 1]
            got = yield cmd(*args, *(["REV"] if newest_first else []), "WITHSCORES")
            if got and not isinstance(got[0], list | tuple):  # RESP2 flat reply
                got = list(zip(got[0::2], got[1::2], strict=True))
            members = [(s(m), float(sc)) for m, sc in got]
            states = (yield cmd("HMGET", qk.state, *[m for m, _ in members])) if members else []
            batch: list[tuple[str, JobRow | None]] = []
            for i, ((_m, score), v) in enumerate(zip(members, states, strict=True)):
                row = None
                if v and s(v).startswith("d"):
                    row = _row(queue, s(v)[1:], str(int(score)))
                batch.append((str(start + i + 1), row))
        elif where == "stream":
            if newest_first:
                entries = yield cmd("XREVRANGE", qk.stream,
                                    "+" if cursor is None else "(" + cursor, "-", "COUNT", chunk)
            else:
                entries = yield cmd("XRANGE", qk.stream,
                                    "-" if cursor is None else "(" + cursor, "+", "COUNT", chunk)
            batch = [(s(eid), _row(queue, fields_dict(flat).get("j", b""), s(eid)))
                     for eid, flat in entries]
        else:
            try:
                # the name as bytes: redis-py's XPENDING reply parser expects the
                # summary form; the extended form's raw reply is what is wanted here
                pend = yield cmd(b"XPENDING", qk.stream, GROUP,
                                 "-" if cursor is None else "(" + cursor, "+", chunk)
            except ResponseError as e:  # no stream or no group yet: nothing running
                if "NOGROUP" not in str(e):
                    raise
                pend = []
            found = (yield Pipe([cmd("XRANGE", qk.stream, p[0], p[0]) for p in pend])
                     ) if pend else []
            batch = []
            for p, got_entry in zip(pend, found, strict=True):
                eid = s(p[0])
                row = _row(queue, fields_dict(got_entry[0][1]).get("j", b""), eid, worker=s(p[1]),
                           idle_s=int(p[2]) / 1000.0) if got_entry else None
                batch.append((eid, row))
        scanned += len(batch)
        consumed_all = True
        for i, (pos, row) in enumerate(batch):
            cursor = pos
            if row is not None and (task is None or row.task == task):
                rows.append(row)
                if len(rows) == count:
                    consumed_all = i == len(batch) - 1
                    break
        if len(batch) < chunk:  # the end of the queue
            return JobPage(rows, None if consumed_all else cursor, scanned)
    return JobPage(rows, cursor, scanned)
