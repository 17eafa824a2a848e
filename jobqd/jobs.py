"""The job envelope and the records jobqd keeps about jobs (sans-I/O).

A job travels as one JSON object in the stream field ``j``, with one-letter
field names and every field at its default left out (a queued job costs Redis
memory for every byte)::

    {"i": "<ulid>", "t": "send_email", "a": {...}}

- ``i`` the id's ULID: the ``-<queue>`` suffix is left out, as the stream (or
  dead-letter stream, or state hash) holding the job names the queue; decoding
  takes the queue and puts it back. ``t`` task, ``a`` args (left out when empty);
- ``n`` attempt: failed attempts (exception retries), left out when 0;
- ``l`` lost: deliveries whose worker died (reclaims), left out when 0; the two
  are separate budgets;
- ``e`` enqueue time (ms since the epoch), left out when it is the id's ULID
  time (which the producer makes from the same clock reading);
- ``k`` idempotency key, ``x`` expiry (ms since the epoch: not to be started
  after it), ``r`` last error (while scheduled for a retry).

Jobs written before this format (``{"id", "task", "args", "attempt", "lost",
"enq"[, "idem"][, "err"][, "exp"]}``) are still read everywhere: `decode_job`
and `view` take both, and a job re-encoded for a retry or hand-back is written
in the compact form. Payloads are JSON, never pickle: a producer cannot run
code in the worker.
"""

from __future__ import annotations

import contextvars
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import orjson

from jobqd.errors import InvalidArgument, InvalidValue, PayloadTooDeep
from jobqd.ids import ULID_LEN, is_ulid, queue_of

Status = Literal["queued", "scheduled", "running", "succeeded", "dead", "cancelled"]
STATUSES: tuple[Status, ...] = ("queued", "scheduled", "running", "succeeded", "dead",
                                "cancelled")
FINAL: frozenset[str] = frozenset({"succeeded", "dead", "cancelled"})


# The longest delay_s accepted anywhere (client, HTTP, CLI, outbox): ten years.
MAX_DELAY_S = 10 * 365 * 86400.0
# How deep a job's args may nest (the args object itself is level 1). orjson reads
# 1,024 levels but writes at most 254, and the daemon re-encodes a job to retry or
# dead-letter it: a deeper job could be accepted but never handled. 64 leaves room
# for the envelope, the dead-letter record and results.
MAX_JSON_DEPTH = 64


def validate_delay_s(x: float) -> float:
    """A delay in seconds: a finite number from 0 to MAX_DELAY_S (ValueError otherwise)."""
    if (isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x)
            or not 0 <= x <= MAX_DELAY_S):
        raise InvalidValue("delay_s", f"delay_s must be a finite number of seconds from 0 to "
                         f"{MAX_DELAY_S:g}, got {x!r}")
    return float(x)


def validate_expires_s(x: float) -> float:
    """How long after it is due a job may still start: a finite number of seconds
    above 0, at most MAX_DELAY_S (ValueError otherwise)."""
    if (isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x)
            or not 0 < x <= MAX_DELAY_S):
        raise InvalidValue("expires_s", "expires_s must be a finite number of seconds above 0 "
                                        "and at most "
                         f"{MAX_DELAY_S:g}, got {x!r}")
    return float(x)


def check_depth(obj: Any, limit: int = MAX_JSON_DEPTH, field: str = "args") -> None:
    """Raise PayloadTooDeep when `obj` nests dicts/lists more than `limit` levels deep.

    Iterative (a recursive walk would itself hit Python's recursion limit on the
    1,024-level documents orjson decodes)."""
    stack: list[tuple[Any, int]] = [(obj, 1)] if isinstance(obj, dict | list | tuple) else []
    while stack:
        o, depth = stack.pop()
        children = o.values() if isinstance(o, dict) else o
        if depth > limit:
            raise PayloadTooDeep(limit, field)
        for c in children:
            if isinstance(c, dict | list | tuple):
                stack.append((c, depth + 1))


class BadJob(ValueError):
    """A stream entry that is not a valid job (garbage fields, bad JSON...)."""


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)


def encode_args(args: Any) -> Any:
    """Validate handler args: a JSON object with string keys (or None)."""
    if args is None:
        return {}
    if not isinstance(args, dict):
        raise InvalidArgument("args", "args must be a dict of keyword arguments, got "
                                      f"{type(args).__name__}")
    for k in args:
        if not isinstance(k, str):
            raise InvalidArgument("args", f"args keys must be strings, got {k!r}")
    check_depth(args)
    return args


# compact field name -> the long name `view` gives it (and old-format jobs used)
_LONG = {"i": "id", "t": "task", "a": "args", "n": "attempt", "l": "lost", "e": "enq",
         "k": "idem", "r": "err", "x": "exp"}
_SHORT = {v: k for k, v in _LONG.items()}
_B32 = bytes.maketrans(b"0123456789ABCDEFGHJKMNPQRSTVWXYZ", b"0123456789abcdefghijklmnopqrstuv")


def _ulid_ms(text: str) -> int:
    """The time (ms) in the first 10 characters of a ULID (ValueError if not base 32)."""
    return int(text[:10].encode().translate(_B32), 32)  # bytes.translate: a table, not a dict


def id_ms(job_id: str) -> int | None:
    """The creation time (ms) in a job id's ULID, or None for something else."""
    try:
        return _ulid_ms(job_id) if len(job_id) > ULID_LEN else None
    except ValueError:
        return None


def _short_id(job_id: Any) -> Any:
    """A job id as the compact envelope stores it: its ULID (the queue is implied)."""
    if isinstance(job_id, str) and len(job_id) > ULID_LEN + 1 and job_id[ULID_LEN] == "-":
        return job_id[:ULID_LEN]
    return job_id


def _full_id(i: Any, queue: str) -> Any:
    return i + "-" + queue if isinstance(i, str) and len(i) == ULID_LEN else i


def _compact(fields: dict[str, Any]) -> dict[str, Any]:
    """The stored form of a job given by its long field names (see the module doc)."""
    env: dict[str, Any] = {"i": _short_id(fields["id"]), "t": fields["task"]}
    for name, value in fields.items():
        if name in ("id", "task") or value is None:
            continue
        if name == "args" and not value:
            continue
        if name in ("attempt", "lost") and value == 0:
            continue
        if name == "enq" and isinstance(value, int | float) and not isinstance(value, bool):
            ms = id_ms(fields["id"]) if isinstance(fields["id"], str) else None
            if ms is not None and value == ms:
                continue
        env[_SHORT.get(name, name)] = value
    return env


def encode_job(job_id: str, task: str, args: dict[str, Any], enq_ms: float | None, *,
               attempt: int = 0, lost: int = 0, idem: str | None = None,
               err: str | None = None, exp_ms: float | None = None) -> bytes:
    """The job as stored. `enq_ms` None: the enqueue time is the id's ULID time (make
    the id with `new_job_id(q, ms)` from the same clock reading); it is left out."""
    env: dict[str, Any] = {"i": _short_id(job_id), "t": task}
    if args:
        env["a"] = args
    if attempt:
        env["n"] = attempt
    if lost:
        env["l"] = lost
    if enq_ms is not None and enq_ms != id_ms(job_id):
        env["e"] = enq_ms
    if idem is not None:
        env["k"] = idem
    if exp_ms is not None:
        env["x"] = exp_ms
    if err is not None:
        env["r"] = err
    try:
        return orjson.dumps(env)
    except TypeError as e:
        raise InvalidArgument("args", f"job args are not JSON-serialisable: {e}") from None


def encode_fields(fields: dict[str, Any]) -> bytes:
    """A job given by its long field names (`view`, `Envelope.fields`), as stored."""
    return orjson.dumps(_compact(fields))


def view(env: dict[str, Any], queue: str) -> dict[str, Any]:
    """A decoded job object (either format) of `queue` under its long field names,
    with the defaults filled in: id, task, args, attempt, lost, enq (+ idem, err, exp
    when set). What status, the DLQ and the dashboard read."""
    if "i" not in env and "id" in env:  # written before the compact format
        out = dict(env)
    else:
        out = {_LONG.get(k, k): v for k, v in env.items()}
        out["id"] = _full_id(out.get("id"), queue)
    out.setdefault("args", {})
    out.setdefault("attempt", 0)
    out.setdefault("lost", 0)
    if "enq" not in out:
        jid = out.get("id")
        out["enq"] = id_ms(jid) if isinstance(jid, str) else None
    return out


@dataclass(slots=True)
class Envelope:
    """A decoded job, as fetched from a stream."""

    id: str
    task: str
    args: dict[str, Any]
    attempt: int
    lost: int
    enq_ms: float
    raw: dict[str, Any] = field(repr=False)  # the JSON object as stored (either format)

    def fields(self) -> dict[str, Any]:
        """The job under its long field names (see `view`)."""
        return view(self.raw, self.queue)

    @property
    def exp_ms(self) -> float | None:
        """Not to be started after this (ms since the epoch), if the producer said so."""
        exp = self.raw.get("x")
        if exp is None:  # the old format's name (a second lookup only for old jobs)
            exp = self.raw.get("exp")
        return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None

    @property
    def queue(self) -> str:
        return queue_of(self.id) or ""

    def next(self, **changes: Any) -> bytes:
        """The envelope re-encoded (compact) with some fields changed (attempt, lost,
        err), by their long names."""
        env = self.fields()
        env.update(changes)
        return orjson.dumps(_compact(env))


_NUMBER = (int, float)


def decode_job(data: bytes | str, queue: str) -> Envelope:
    """A stored job of `queue` (the queue whose stream, delayed set or DLQ held it)."""
    try:
        env = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise BadJob(f"job is not valid JSON: {e}") from None
    if not isinstance(env, dict):
        raise BadJob("job is not a JSON object")
    if "i" in env or "id" not in env:  # the compact format
        job_id, task, args = env.get("i"), env.get("t"), env.get("a", {})
        attempt, lost, enq = env.get("n", 0), env.get("l", 0), env.get("e")
        if type(job_id) is str and is_ulid(job_id):
            # a ULID, the queue implied (no second parse of what we build)
            if enq is None:
                enq = _ulid_ms(job_id)
            job_id = f"{job_id}-{queue}"
            # the hot path: exact types, what orjson makes of a valid job (anything else
            # goes through the checks below, which say what is wrong)
            if (type(task) is str and task and type(args) is dict and type(attempt) is int
                    and type(lost) is int and type(enq) in _NUMBER):
                return Envelope(job_id, task, args, attempt, lost, float(enq), env)
        elif not isinstance(job_id, str) or queue_of(job_id) is None:
            raise BadJob(f"job has no valid id: {job_id!r}")
    else:  # written before the compact format
        job_id, task, args = env.get("id"), env.get("task"), env.get("args", {})
        attempt, lost, enq = env.get("attempt", 0), env.get("lost", 0), env.get("enq", 0)
        if not isinstance(job_id, str) or queue_of(job_id) is None:
            raise BadJob(f"job has no valid id: {job_id!r}")
    if not isinstance(task, str) or not task:
        raise BadJob(f"job has no task name: {task!r}")
    if not isinstance(args, dict):
        raise BadJob(f"job args must be an object, got {type(args).__name__}")
    if enq is None:
        enq = id_ms(job_id)
    if not (isinstance(attempt, int) and isinstance(lost, int) and isinstance(enq, int | float)):
        raise BadJob("job attempt/lost/enq must be numbers")
    return Envelope(id=job_id, task=task, args=args, attempt=attempt, lost=lost,
                    enq_ms=float(enq), raw=env)


@dataclass(frozen=True, slots=True)
class Job:
    """What `enqueue` returns."""

    id: str
    task: str
    queue: str
    created: bool = True  # False: an idempotency key matched an existing job


@dataclass(frozen=True, slots=True)
class JobInfo:
    """What `status` returns. Timestamps are seconds since the epoch."""

    id: str
    status: Status
    task: str | None = None
    queue: str | None = None
    attempts: int = 0  # attempts made so far (failed attempts, plus the running one)
    lost: int = 0  # deliveries lost with their worker
    result: Any = None
    error: str | None = None
    reason: str | None = None  # why it is dead: failed, max_retries, timeout, worker_lost...
    traceback: str | None = None
    enqueued_at: float | None = None
    scheduled_for: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    worker: str | None = None  # the consumer running it (or that ran it)
    args: dict[str, Any] | None = None
    progress: dict[str, Any] | None = None  # {"fraction", "message", "at"} while running
    cancel_requested: bool = False  # running, and asked to stop

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


class Flag:
    """A flag set on the event loop and read by a handler in any thread (a plain
    attribute: cheap to make per job, unlike a threading.Event)."""

    __slots__ = ("is_set",)

    def __init__(self) -> None:
        self.is_set = False


class ProgressSink(Protocol):
    def progress(self, job_id: str, queue: str, fraction: float, message: str | None) -> None:
        ...


@dataclass(frozen=True, slots=True)
class CurrentJob:
    """What a handler sees through `current_job()`."""

    id: str
    task: str
    queue: str
    attempt: int  # 1 on the first try
    enqueued_at: float
    _cancel: Flag = field(default_factory=Flag, repr=False, compare=False)
    _progress: ProgressSink | None = field(default=None, repr=False, compare=False)

    @property
    def cancelled(self) -> bool:
        """True once the job was cancelled while running (poll it in a long plain def)."""
        return self._cancel.is_set

    def check_cancelled(self) -> None:
        """Raise `JobCancelled` if the job was cancelled; the job then ends `cancelled`."""
        if self._cancel.is_set:
            from jobqd.errors import JobCancelled  # noqa: PLC0415 - errors imports nothing

            raise JobCancelled(self.id)

    def progress(self, fraction: float, message: str | None = None) -> None:
        """Report how far the job is (0.0 to 1.0, and a short message). Cheap: writes
        are coalesced to a few a second per job; `status` shows the latest."""
        f = float(fraction)
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"progress fraction must be from 0.0 to 1.0, got {fraction!r}")
        if self._progress is not None:
            self._progress.progress(self.id, self.queue, f,
                                    None if message is None else str(message)[:500])


class CurrentJobSource(Protocol):
    """Makes a job's `CurrentJob` when its handler first asks for it (the pool's run of
    the job: most handlers never ask, so most jobs never pay for one)."""

    def current_job(self) -> CurrentJob: ...


# What `current_job()` returns in this context: a CurrentJob made up front (a worker
# process's job), or the source that makes it on first use.
_current: contextvars.ContextVar[CurrentJob | CurrentJobSource | None] = (
    contextvars.ContextVar("jobqd_current_job", default=None))


def current_job() -> CurrentJob:
    """The job the calling handler is running (id, task, queue, attempt)."""
    job = _current.get()
    if job is None:
        raise LookupError("current_job() called outside a jobqd handler")
    if isinstance(job, CurrentJob):
        return job
    return job.current_job()
