"""The HTTP port: health, readiness, Prometheus metrics and the job API.

=====================================  =====================================================
``GET /healthz``                       200 while the event loop answers (liveness)
``GET /readyz``                        200 when Redis (and PostgreSQL, if configured) answer,
                                       the consumers run and the daemon is not draining;
                                       else 503, and ``problems`` names what is wrong
                                       (``redis_eviction``: an evicting maxmemory-policy;
                                       ``redis_oom``: the last write was refused, OOM)
``GET /metrics``                       Prometheus text exposition (queue and dead-letter
                                       gauges are refreshed from Redis on a timer by
                                       `jobqd.gauges`, never per scrape)
``POST /v1/jobs``                      ``{task, args, queue?, delay_s?, idempotency_key?}``
                                       -> 202 ``{id, queue, created}``
``GET /v1/jobs/{id}``                  the job's status
``GET /v1/queues``                     every queue's depth, weight, accepting, in flight...
``GET /v1/dlq?queue=&limit=``          dead-letter entries
``POST /v1/dlq/{id}/replay``           put a dead job back on its queue -> 202 ``{id}``
``GET /v1/openapi.json``               the OpenAPI document (`jobqd.openapi`)
``/ui/...``                            the web dashboard (`jobqd.ui`: HTML, its own
                                       login cookie or the bearer token; ``http.ui``)
=====================================  =====================================================

Security: the port binds ``127.0.0.1`` unless ``http.listen`` says otherwise.
With ``http.token_file`` set (read once, at start; whitespace stripped), every
request except ``/healthz``, ``/readyz`` and ``/metrics`` needs
``Authorization: Bearer <token>`` (compared in constant time) or gets 401;
those three stay open so probes and scrapers need no secret, and they reveal
no job data.

Errors are JSON ``{"error": "...", "field": "..."?}``. Status codes:
400 malformed JSON or a wrong field (``field`` names it); 401 no or wrong
token; 404 an id or queue in the URL that is not known; 413 a body over
``max_payload_bytes`` + 64 KiB (judged on the declared Content-Length before
``100 Continue`` is sent, like a missing token's 401), or an encoded job over
``max_payload_bytes``;
422 a task or queue named in a request body that no daemon routes (the
endpoint exists, the body does not make sense, hence not 404); 503 a queue
over its high watermark (with ``Retry-After`` and queue, depth, high, low) or
Redis unreachable (``Retry-After: 1``); 507 Redis out of memory (at
``maxmemory`` with ``noeviction``: nothing was written; ``Retry-After: 1``,
``reason: redis_oom``). Anything unexpected is logged and
answered 500 ``{"error": "internal error"}``: never a stack trace. (The
``traceback`` field of a dead job's status is the job's own recorded
traceback: job data, behind the token.)
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import logging
import math
import re
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import HttpVersion11, web
from prometheus_client import CONTENT_TYPE_LATEST

from jobqd import openapi, ops, schedules, ui
from jobqd.config import QUEUE_RE, Config
from jobqd.deps import is_redis_unreachable
from jobqd.errors import (
    ConfigError,
    FieldError,
    JobNotFound,
    NotReplicated,
    PayloadTooDeep,
    PayloadTooLarge,
    QueueFull,
    RedisOutOfMemory,
    UnknownTask,
)
from jobqd.ids import queue_of
from jobqd.jobs import BadJob, Job, check_depth, validate_delay_s, validate_expires_s
from jobqd.runtime import Runtime
from jobqd.waiting import Waiter

log = logging.getLogger("jobqd.http")

BODY_SLACK_BYTES = 64 * 1024  # JSON framing around the job's args, on top of max_payload_bytes
PING_TIMEOUT_S = 0.5  # /readyz's live PING
SHUTDOWN_TIMEOUT_S = 2.0  # how long in-flight requests get when the port closes
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_ENQUEUE_FIELDS = frozenset({"task", "args", "queue", "delay_s", "idempotency_key", "expires_s"})
_ENTRY_ID_RE = re.compile(r"(\d{1,20})-(\d{1,20})")
_JSON = "application/json"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def body_limit(cfg: Config) -> int:
    """The largest request body accepted (the encoded job is checked again, exactly)."""
    return cfg.max_payload_bytes + BODY_SLACK_BYTES


class ApiError(Exception):
    """An error answer: status, message, optional field, extra body keys and headers."""

    def __init__(self, status: int, message: str, *, field: str | None = None,
                 headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = headers or {}
        self.extra = extra

    def response(self) -> web.Response:
        body: dict[str, Any] = {"error": self.message}
        if self.field is not None:
            body["field"] = self.field
        body.update(self.extra)
        return json_response(body, status=self.status, headers=self.headers)


def json_response(body: Any, *, status: int = 200,
                  headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type=_JSON,
                        headers=headers)


@dataclass
class _State:
    token: bytes | None
    runtime: Runtime
    openapi_doc: bytes
    routings: dict[str, ops.Routing] = field(default_factory=dict)
    _waiter: Waiter | None = None

    def __post_init__(self) -> None:
        self.runner = ops.AsyncRunner(self.runtime.redis)

    def routing(self, prefix: str) -> ops.Routing:
        r = self.routings.get(prefix)
        if r is None:
            r = self.routings[prefix] = ops.Routing(prefix)
        return r

    async def run(self, op: ops.Op[ops.T]) -> ops.T:
        return await self.runner.run(op)

    def waiter(self) -> Waiter:
        """The long-poll waiter (one pub/sub connection), made on first use."""
        if self._waiter is None:
            self._waiter = Waiter(self.runtime.redis, self.runtime.config.redis.prefix)
        return self._waiter


STATE = web.AppKey("jobqd_http_state", _State)


def _state(request: web.Request) -> _State:
    return request.app[STATE]


def read_token(cfg: Config) -> bytes | None:
    """The bearer token from http.token_file (stripped), or None when none is configured."""
    path = cfg.http.token_file
    if path is None:
        return None
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read: {e}", path=cfg.path, key="http.token_file") from None
    if not token:
        raise ConfigError(f"{path} is empty", path=cfg.path, key="http.token_file")
    return token.encode()


# ---------------------------------------------------------------- middlewares


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error becomes JSON; an unexpected exception is logged, answered 500."""
    try:
        return await handler(request)
    except ApiError as e:
        return e.response()
    except web.HTTPException as e:
        if e.status < 400:
            raise
        headers = {k: v for k, v in e.headers.items()
                   if k.lower() not in ("content-type", "content-length")}
        return ApiError(e.status, e.reason.lower(), headers=headers).response()
    except Exception as e:
        oom = ops.translate(e)
        if isinstance(oom, RedisOutOfMemory):
            return _oom_error(request, oom).response()
        if is_redis_unreachable(e):
            log.warning("%s %s: redis unavailable: %s", request.method, request.path, e)
            return ApiError(503, "redis unavailable", headers={"Retry-After": "1"}).response()
        log.exception("unexpected error answering %s %s", request.method, request.path)
        return ApiError(500, "internal error").response()


def _oom_error(request: web.Request, e: RedisOutOfMemory) -> ApiError:
    """507: Redis refused the write for lack of memory (noeviction). /readyz says
    ``redis_oom`` until a write of this daemon goes through again."""
    _state(request).runtime.health.redis_oom = True
    log.warning("%s %s: %s", request.method, request.path, e)
    return ApiError(507, "redis is out of memory (maxmemory reached, maxmemory-policy "
                         "noeviction): nothing was written; retry once consumers have "
                         "drained jobs, or give redis more memory", reason="redis_oom",
                    headers={"Retry-After": "1"})


def _authorized(header: str | None, token: bytes) -> bool:
    if not header:
        return False
    scheme, _, credentials = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    given = credentials.strip().encode("utf-8", "surrogatepass")
    return hmac.compare_digest(given, token)


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = _state(request).token
    if (token is not None and request.path not in OPEN_PATHS and not ui.owns(request.path)
            and not _authorized(request.headers.get("Authorization"), token)):
        raise ApiError(401, "missing or wrong bearer token",
                       headers={"WWW-Authenticate": 'Bearer realm="jobqd"'})
    return await handler(request)


# ---------------------------------------------------------------- health, readiness, metrics


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


def _describe(e: BaseException) -> str:
    if isinstance(e, TimeoutError) and not str(e):
        return f"no answer to PING within {PING_TIMEOUT_S:g}s"
    return f"{type(e).__name__}: {e}"[:300]


async def readyz(request: web.Request) -> web.Response:
    rt = _state(request).runtime
    h = rt.health
    problems: list[str] = []
    redis_state: dict[str, Any] = {"ok": True}
    try:
        await asyncio.wait_for(rt.redis.ping(), PING_TIMEOUT_S)
    except Exception as e:  # any failure to answer is "redis is not ready"
        redis_state = {"ok": False, "error": _describe(e)}
    else:
        if not h.redis_ok:
            redis_state = {"ok": False, "error": "the consumer pool is reconnecting to redis"}
    if not redis_state["ok"]:
        problems.append("redis")
    redis_state.update(maxmemory_policy=h.redis_policy, eviction_ok=h.redis_eviction_ok,
                       oom=h.redis_oom, data_losses=h.redis_data_losses,
                       memory_full=h.redis_memory_full)
    if not h.redis_eviction_ok:
        problems.append("redis_eviction")
        redis_state.setdefault(
            "error", f"redis maxmemory-policy is {h.redis_policy}: it may evict accepted "
                     "jobs; consuming is paused until it is noeviction (or "
                     "redis.allow_eviction: true)")
    if h.redis_oom:
        problems.append("redis_oom")
        redis_state.setdefault("error", "redis is out of memory: the last write was refused")
    # configured: a dsn in the running config, or a component that reports on PostgreSQL;
    # not yet confirmed (None) counts as not ready
    pg_configured = bool(rt.config.postgres.dsn) or h.postgres_ok is not None
    if pg_configured and h.postgres_ok is not True:
        problems.append("postgres")
    if not h.consumers_running:
        problems.append("consumers")
    draining = h.draining or rt.stop_event.is_set()
    if draining:
        problems.append("draining")
    if h.last_reload_error is not None:
        problems.append("reload")
    if h.crashed is not None:
        problems.append("crashed")
    body: dict[str, Any] = {
        "ready": not problems, "problems": problems, "redis": redis_state,
        "postgres": {"configured": pg_configured, "ok": h.postgres_ok},
        "consumers_running": h.consumers_running, "draining": draining,
        "last_reload_error": h.last_reload_error, "crashed": h.crashed,
    }
    if problems:
        body["error"] = "not ready: " + ", ".join(problems)
    return json_response(body, status=503 if problems else 200)


async def metrics(request: web.Request) -> web.Response:
    rt = _state(request).runtime
    return web.Response(body=rt.metrics.exposition(),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(body=_state(request).openapi_doc, content_type=_JSON)


# ---------------------------------------------------------------- the job API


def _too_big(limit: int) -> str:
    return f"request body is over the limit of {limit} bytes (max_payload_bytes + slack)"


async def _expect(request: web.Request) -> web.StreamResponse | None:
    """``Expect: 100-continue``: refuse on the headers alone (413 over the declared
    Content-Length, 401 without the token) before inviting the client to send the body."""
    expect = request.headers.get("Expect", "")
    if request.version != HttpVersion11:
        return None
    if expect.lower() != "100-continue":
        return ApiError(417, f"unsupported Expect: {expect[:100]}").response()
    st = _state(request)
    if (st.token is not None and request.path not in OPEN_PATHS
            and not _authorized(request.headers.get("Authorization"), st.token)):
        return ApiError(401, "missing or wrong bearer token",
                        headers={"WWW-Authenticate": 'Bearer realm="jobqd"'}).response()
    limit = body_limit(st.runtime.config)
    if request.content_length is not None and request.content_length > limit:
        return ApiError(413, _too_big(limit)).response()
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # the response proper has not started
    return None


async def _read_body(request: web.Request, limit: int) -> bytes:
    too_big = _too_big(limit)
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, too_big)
    buf = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        buf += chunk
        if len(buf) > limit:
            raise ApiError(413, too_big)
    return bytes(buf)


def _type_name(v: Any) -> str:
    return "null" if v is None else {dict: "object", list: "array", str: "string",
                                     bool: "boolean", int: "integer",
                                     float: "number"}.get(type(v), type(v).__name__)


@dataclass(frozen=True, slots=True)
class EnqueueRequest:
    task: str
    args: dict[str, Any]
    queue: str | None
    delay_s: float | None
    idempotency_key: str | None
    expires_s: float | None = None


def parse_enqueue(data: Any) -> EnqueueRequest:
    """Validate a decoded POST /v1/jobs body; ApiError(400) names the bad field."""
    if not isinstance(data, dict):
        raise ApiError(400, f"the body must be a JSON object, got {_type_name(data)}",
                       field="body")
    for name in data:
        if name not in _ENQUEUE_FIELDS:
            raise ApiError(400, f"unknown field {name!r} (expected: task, args, queue, "
                                "delay_s, idempotency_key, expires_s)", field=name)
    task = data.get("task")
    if not isinstance(task, str) or not task:
        raise ApiError(400, f"task must be a non-empty string, got {_type_name(task)}",
                       field="task")
    if "args" not in data:
        raise ApiError(400, "args is required (a JSON object of keyword arguments)",
                       field="args")
    args = data["args"]
    if not isinstance(args, dict):
        raise ApiError(400, f"args must be a JSON object, got {_type_name(args)}", field="args")
    try:
        check_depth(args)
    except PayloadTooDeep as e:
        raise ApiError(400, str(e), field="args", limit=e.limit) from None
    queue = data.get("queue")
    if queue is not None and (not isinstance(queue, str) or not QUEUE_RE.fullmatch(queue)):
        got = repr(queue) if isinstance(queue, str) else _type_name(queue)
        raise ApiError(400, f"queue must be a queue name matching {QUEUE_RE.pattern}, got "
                            f"{got}", field="queue")
    delay = data.get("delay_s")
    if delay is not None:
        if isinstance(delay, bool) or not isinstance(delay, int | float):
            raise ApiError(400, f"delay_s must be a number, got {_type_name(delay)}",
                           field="delay_s")
        try:
            delay = validate_delay_s(delay)
        except ValueError as e:
            raise ApiError(400, str(e), field="delay_s") from None
    idem = data.get("idempotency_key")
    if idem is not None:
        if not isinstance(idem, str):
            got = _type_name(idem)
        elif not idem:
            got = "an empty string"
        elif len(idem) > openapi.MAX_IDEMPOTENCY_KEY_CHARS:
            got = f"{len(idem)} characters"
        else:
            got = ""
        if got:
            raise ApiError(400, "idempotency_key must be a non-empty string of at most "
                                f"{openapi.MAX_IDEMPOTENCY_KEY_CHARS} characters, got {got}",
                           field="idempotency_key")
    expires = data.get("expires_s")
    if expires is not None:
        try:
            expires = validate_expires_s(expires)
        except ValueError as e:
            raise ApiError(400, str(e), field="expires_s") from None
    return EnqueueRequest(task=task, args=args, queue=queue, delay_s=delay,
                          idempotency_key=idem, expires_s=expires)


def _field_of(e: Exception) -> str:
    """The request field a validation error from `jobqd.ops`/`jobqd.jobs` is about."""
    return e.field if isinstance(e, FieldError) else "args"


async def enqueue(request: web.Request) -> web.Response:
    st = _state(request)
    rt = st.runtime
    cfg = rt.config  # a reload swaps it: read once per request
    body = await _read_body(request, body_limit(cfg))
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise ApiError(400, f"malformed JSON: {e}", field="body") from None
    req = parse_enqueue(data)
    prefix = cfg.redis.prefix
    op = ops.enqueue(prefix, st.routing(prefix), req.task, [req.args], queue=req.queue,
                     delay_s=req.delay_s,
                     idempotency_keys=None if req.idempotency_key is None
                     else [req.idempotency_key],
                     idem_ttl_ms=int(cfg.idempotency_ttl_s * 1000), expires_s=req.expires_s,
                     wait_replicas=cfg.redis.wait_replicas,
                     wait_timeout_ms=round(cfg.redis.wait_timeout_s * 1000))
    try:
        jobs: list[Job] = await st.run(op)
    except ops.UnknownQueue as e:
        raise ApiError(422, str(e), field="queue") from None
    except UnknownTask as e:
        raise ApiError(422, str(e), field="task") from None
    except QueueFull as e:
        raise ApiError(503, str(e), queue=e.queue, reason=e.reason, depth=e.depth,
                       high=e.high_watermark,
                       low=e.low_watermark,
                       headers={"Retry-After": str(max(1, math.ceil(e.retry_after_s)))}
                       ) from None
    except PayloadTooLarge as e:
        raise ApiError(413, str(e), field="args", size=e.size, limit=e.limit) from None
    except RedisOutOfMemory as e:
        raise _oom_error(request, e) from None
    except NotReplicated as e:  # on the master, not yet on enough replicas
        rt.metrics.not_replicated.labels("enqueue").inc()
        ids = [j.id for j in e.accepted]
        raise ApiError(503, str(e), id=ids[0] if ids else None, acked=e.acked,
                       wanted=e.wanted, headers={"Retry-After": "1"}) from None
    except PayloadTooDeep as e:
        raise ApiError(400, str(e), field=e.field, limit=e.limit) from None
    except (TypeError, ValueError) as e:
        raise ApiError(400, str(e), field=_field_of(e)) from None
    rt.health.redis_oom = False  # a write went through
    job = jobs[0]
    if job.created:
        rt.metrics.enqueued.labels(job.queue, req.task).inc()
    return json_response({"id": job.id, "queue": job.queue, "created": job.created},
                         status=202)


def _valid_job_id(job_id: str) -> bool:
    q = queue_of(job_id)
    return q is not None and QUEUE_RE.fullmatch(q) is not None


def _wait_s(request: web.Request) -> float | None:
    raw = request.query.get("wait_s")
    if raw is None:
        return None
    try:
        v = float(raw)
    except ValueError:
        v = -1.0
    if not 0 <= v <= openapi.MAX_WAIT_S:  # also refuses nan
        raise ApiError(400, f"wait_s must be a number of seconds from 0 to "
                            f"{openapi.MAX_WAIT_S:g}", field="wait_s")
    return v


async def job_status(request: web.Request) -> web.Response:
    """The job's status; with ``?wait_s=N`` it long-polls (pushed, not polled) until
    the job ends or N seconds pass, then answers with whatever the status is."""
    st = _state(request)
    job_id = request.match_info["id"]
    if not _valid_job_id(job_id):
        raise ApiError(404, f"no job {job_id!r}")
    wait_s = _wait_s(request)
    if wait_s:
        with contextlib.suppress(TimeoutError, JobNotFound):
            await st.waiter().wait(job_id, wait_s)
    try:
        info = await st.run(ops.status(st.runtime.config.redis.prefix, job_id))
    except JobNotFound:
        # the Redis record expired (results.ttl_s): the ledger remembers longer
        found = await st.runtime.events.lookup(job_id)
        if found is None:
            raise ApiError(404, f"no job {job_id!r}") from None
        info = found
    return json_response(info.to_dict())


async def job_cancel(request: web.Request) -> web.Response:
    """Cancel a job: 200 cancelled (it never runs), 202 cancelling (it runs now and is
    being stopped), 409 when it had already finished, 404 when unknown."""
    st = _state(request)
    job_id = request.match_info["id"]
    if not _valid_job_id(job_id):
        raise ApiError(404, f"no job {job_id!r}")
    cfg = st.runtime.config
    try:
        [res] = await st.run(ops.cancel(cfg.redis.prefix, [job_id],
                                        int(cfg.results.ttl_s * 1000)))
    except JobNotFound:
        raise ApiError(404, f"no job {job_id!r}") from None
    if res.outcome == "finished":
        raise ApiError(409, f"job {job_id} had already finished: {res.status}")
    return json_response(res.to_dict(), status=200 if res.outcome == "cancelled" else 202)


async def queue_pause(request: web.Request) -> web.Response:
    return await _set_paused(request, True)


async def queue_resume(request: web.Request) -> web.Response:
    return await _set_paused(request, False)


async def _set_paused(request: web.Request, paused: bool) -> web.Response:
    st = _state(request)
    queue = request.match_info["queue"]
    if not QUEUE_RE.fullmatch(queue):
        raise ApiError(404, f"unknown queue {queue!r}")
    try:
        await st.run(ops.set_paused(st.runtime.config.redis.prefix, queue, paused))
    except ops.UnknownQueue:
        raise ApiError(404, f"unknown queue {queue!r}") from None
    return json_response({"queue": queue, "paused": paused})


async def queues(request: web.Request) -> web.Response:
    st = _state(request)
    stats: list[ops.QueueStats] = await st.run(
        ops.queue_stats(st.runtime.config.redis.prefix))
    return json_response({"queues": [s.to_dict() for s in stats]})


async def schedules_list(request: web.Request) -> web.Response:
    rt = _state(request).runtime
    return json_response({"schedules": await schedules.describe(rt.redis, rt.config)})


async def dlq_list(request: web.Request) -> web.Response:
    st = _state(request)
    prefix = st.runtime.config.redis.prefix
    queue = request.query.get("queue") or None
    if queue is not None and not QUEUE_RE.fullmatch(queue):
        raise ApiError(400, f"queue must match {QUEUE_RE.pattern}", field="queue")
    raw_limit = request.query.get("limit")
    limit = openapi.DLQ_DEFAULT_LIMIT
    if raw_limit is not None:
        try:
            limit = int(raw_limit)
        except ValueError:
            limit = 0
        if not 1 <= limit <= openapi.DLQ_MAX_LIMIT:
            raise ApiError(400, f"limit must be an integer from 1 to {openapi.DLQ_MAX_LIMIT}",
                           field="limit")
    if queue is not None and queue not in (await st.run(ops.known_queues(prefix))):
        raise ApiError(404, f"unknown queue {queue!r}", field="queue")
    dead: list[ops.DeadJob] = await st.run(ops.dlq_list(prefix, queue, limit))
    return json_response({"entries": [d.to_dict() for d in dead]})


def _valid_ref(ref: str) -> bool:
    """A job id, or ``<queue>/<stream entry id>`` Redis would accept as an id."""
    if "/" not in ref:
        return _valid_job_id(ref)
    q, _, eid = ref.partition("/")
    m = _ENTRY_ID_RE.fullmatch(eid)
    return (QUEUE_RE.fullmatch(q) is not None and m is not None
            and all(int(part) < 2**64 for part in m.groups()))


async def dlq_replay(request: web.Request) -> web.Response:
    st = _state(request)
    ref = request.match_info["id"]
    not_found = ApiError(404, f"no dead-letter entry {ref!r}")
    if not _valid_ref(ref):
        raise not_found
    try:
        job_id = await st.run(ops.dlq_replay(st.runtime.config.redis.prefix, ref))
    except JobNotFound:
        raise not_found from None
    except BadJob as e:
        raise ApiError(422, str(e)) from None
    return json_response({"id": job_id}, status=202)


# ---------------------------------------------------------------- app and server


def make_app(rt: Runtime) -> web.Application:
    """The aiohttp application (reads http.token_file now; ConfigError if unusable)."""
    token = read_token(rt.config)
    app = web.Application(middlewares=[_errors, _auth],
                          client_max_size=body_limit(rt.config))
    app[STATE] = _State(token=token, runtime=rt,
                        openapi_doc=orjson.dumps(openapi.build(auth=token is not None)))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/openapi.json", openapi_json)
    app.router.add_post("/v1/jobs", enqueue, expect_handler=_expect)
    app.router.add_get("/v1/jobs/{id}", job_status)
    app.router.add_delete("/v1/jobs/{id}", job_cancel)
    app.router.add_post("/v1/queues/{queue}/pause", queue_pause)
    app.router.add_post("/v1/queues/{queue}/resume", queue_resume)
    app.router.add_get("/v1/queues", queues)
    app.router.add_get("/v1/schedules", schedules_list)
    app.router.add_get("/v1/dlq", dlq_list)
    app.router.add_post("/v1/dlq/{id}/replay", dlq_replay, expect_handler=_expect)
    ui.setup(app, rt, token)  # the dashboard at /ui (jobqd.ui: its own cookie/bearer auth)
    return app


class BindError(RuntimeError):
    """``http.listen`` cannot be bound (in use, not an address of this host...): the
    environment's fault, not a bug. The message is one line naming the address."""


def bind(listen: str, host: str, port: int) -> list[socket.socket]:
    """Bind and listen on ``http.listen`` now, so that a port already in use stops the
    daemon before it starts anything else. One socket per address `host` resolves to."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise BindError(f"cannot listen on {listen} (http.listen): {e.strerror}") from None
    socks: list[socket.socket] = []
    seen: set[tuple[int, Any]] = set()
    try:
        for family, kind, proto, _, sockaddr in infos:
            if (family, sockaddr) in seen:
                continue
            seen.add((family, sockaddr))
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)
            sock.listen(128)
            sock.setblocking(False)
    except OSError as e:
        for sock in socks:
            sock.close()
        if e.errno == errno.EADDRINUSE:
            reason = "address already in use (another jobqd, or another program, listens there)"
        else:
            reason = e.strerror or str(e)
        raise BindError(f"cannot listen on {listen} (http.listen): {reason}") from None
    return socks


async def run(rt: Runtime, stop: asyncio.Event, *,
              on_bound: Callable[[str, int], None] | None = None,
              shutdown_timeout_s: float = SHUTDOWN_TIMEOUT_S,
              socks: Sequence[socket.socket] | None = None) -> None:
    """Serve on http.listen until `stop` is set, then close (in-flight requests get
    `shutdown_timeout_s`). `on_bound(host, port)` reports the bound address (port 0).
    `socks`: listening sockets from `bind` (else they are bound here: `BindError`)."""
    app = make_app(rt)
    if socks is None:
        http_cfg = rt.config.http
        socks = bind(http_cfg.listen, http_cfg.host, http_cfg.port)
    runner = web.AppRunner(app, handle_signals=False, access_log=None,
                           shutdown_timeout=shutdown_timeout_s)
    await runner.setup()
    try:
        for sock in socks:
            await web.SockSite(runner, sock).start()
        host, port = runner.addresses[0][:2]
        log.info("http: listening on %s:%d%s", host, port,
                 " (token required for /v1)" if app[STATE].token else "")
        if on_bound is not None:
            on_bound(str(host), int(port))
        await stop.wait()
    finally:
        try:
            await runner.cleanup()
        except Exception:
            log.exception("http: error while closing the port")
        else:
            log.info("http: closed")
