"""The OpenAPI 3.0 document of the HTTP port, served at ``/v1/openapi.json``.

It is built from code, next to the handlers in `jobqd.http`, and a test runs
schemathesis against a live server with it, so the two cannot drift apart
unnoticed. ``build(auth=True)`` declares the bearer scheme (and the 401 answer)
on every ``/v1`` operation; ``/healthz``, ``/readyz`` and ``/metrics`` are
always open.
"""

from __future__ import annotations

import copy
from typing import Any

from jobqd import __version__
from jobqd.config import QUEUE_RE
from jobqd.jobs import MAX_DELAY_S, MAX_JSON_DEPTH

MAX_IDEMPOTENCY_KEY_CHARS = 1024
DLQ_DEFAULT_LIMIT = 100
DLQ_MAX_LIMIT = 1000
MAX_WAIT_S = 60.0  # the longest long-poll of GET /v1/jobs/{id}?wait_s=

_JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "nullable": True}


def _json(description: str, schema: dict[str, Any],
          headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": {_JSON: {"schema": schema}}}
    if headers:
        out["headers"] = headers
    return out


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    return _json(description, _ref("Error"), headers)


_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying (>= 1)",
                                "schema": {"type": "integer", "minimum": 1}}}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "description": "Every error body. `field` names the offending request field, when one is "
                       "to blame. Some errors add details (a full queue adds queue, depth, high "
                       "and low).",
        "required": ["error"],
        "properties": {
            "error": {"type": "string"},
            "field": {"type": "string"},
        },
    },
    "EnqueueRequest": {
        "type": "object",
        "required": ["task", "args"],
        "additionalProperties": False,
        "properties": {
            "task": {"type": "string", "minLength": 1,
                     "description": "A task name some daemon routes (tasks: in its config)"},
            "args": {"type": "object", "additionalProperties": True,
                     "description": "The handler's keyword arguments (nested at most "
                                    f"{MAX_JSON_DEPTH} levels deep, this object included)"},
            "queue": _nullable({"type": "string", "pattern": QUEUE_RE.pattern,
                                "description": "Override the task's queue"}),
            "delay_s": _nullable({"type": "number", "minimum": 0, "maximum": MAX_DELAY_S,
                                  "description": "Run no earlier than this many seconds from "
                                                 "now"}),
            "idempotency_key": _nullable({
                "type": "string", "minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY_CHARS,
                "description": "While this key is remembered (idempotency_ttl_s) a second "
                               "enqueue with it returns the first job (created: false)"}),
            "expires_s": _nullable({"type": "number", "exclusiveMinimum": True, "minimum": 0,
                                    "maximum": MAX_DELAY_S,
                                    "description": "Not started this many seconds after it "
                                                   "is due: never run, dead as expired"}),
        },
    },
    "Enqueued": {
        "type": "object",
        "required": ["id", "queue", "created"],
        "properties": {
            "id": {"type": "string"},
            "queue": {"type": "string"},
            "created": {"type": "boolean",
                        "description": "false: the idempotency key matched an existing job"},
        },
    },
    "JobStatus": {
        "type": "object",
        "required": ["id", "status"],
        "properties": {
            "id": {"type": "string"},
            "status": {"type": "string",
                       "enum": ["queued", "scheduled", "running", "succeeded", "dead",
                                "cancelled"]},
            "task": _nullable({"type": "string"}),
            "queue": _nullable({"type": "string"}),
            "attempts": {"type": "integer"},
            "lost": {"type": "integer"},
            "result": {"description": "The handler's return value (succeeded jobs)"},
            "error": _nullable({"type": "string"}),
            "reason": _nullable({"type": "string"}),
            "traceback": _nullable({"type": "string",
                                    "description": "The handler's traceback (dead jobs)"}),
            "enqueued_at": _nullable({"type": "number"}),
            "scheduled_for": _nullable({"type": "number"}),
            "started_at": _nullable({"type": "number"}),
            "finished_at": _nullable({"type": "number"}),
            "worker": _nullable({"type": "string"}),
            "args": _nullable({"type": "object"}),
            "progress": _nullable({"type": "object",
                                   "description": "fraction, message, at (running jobs)"}),
            "cancel_requested": {"type": "boolean"},
        },
    },
    "CancelResult": {
        "type": "object",
        "required": ["id", "outcome", "status"],
        "properties": {
            "id": {"type": "string"},
            "outcome": {"type": "string", "enum": ["cancelled", "cancelling"]},
            "status": {"type": "string",
                       "description": "queued or scheduled (removed), running (being stopped)"},
        },
    },
    "Paused": {
        "type": "object",
        "required": ["queue", "paused"],
        "properties": {"queue": {"type": "string"}, "paused": {"type": "boolean"}},
    },
    "QueueStats": {
        "type": "object",
        "required": ["name", "depth", "waiting", "in_flight", "scheduled", "dead", "lag_s",
                     "accepting", "weight", "high_watermark", "low_watermark"],
        "properties": {
            "name": {"type": "string"},
            "depth": {"type": "integer", "description": "waiting + in flight + scheduled"},
            "waiting": {"type": "integer"},
            "in_flight": {"type": "integer"},
            "scheduled": {"type": "integer"},
            "dead": {"type": "integer"},
            "done": {"type": "integer"},
            "lag_s": {"type": "number"},
            "accepting": {"type": "boolean"},
            "weight": _nullable({"type": "integer"}),
            "high_watermark": _nullable({"type": "integer"}),
            "low_watermark": _nullable({"type": "integer"}),
            "paused": {"type": "boolean"},
        },
    },
    "Queues": {
        "type": "object",
        "required": ["queues"],
        "properties": {"queues": {"type": "array", "items": _ref("QueueStats")}},
    },
    "Schedules": {
        "type": "object",
        "required": ["schedules"],
        "properties": {"schedules": {"type": "array", "items": _ref("Schedule")}},
    },
    "Schedule": {
        "type": "object",
        "required": ["name", "task", "queue", "expression", "timezone", "enabled"],
        "properties": {
            "name": {"type": "string"},
            "task": {"type": "string"},
            "queue": {"type": "string"},
            "cron": _nullable({"type": "string"}),
            "every_s": _nullable({"type": "number"}),
            "expression": {"type": "string", "description": "cron, or every <N>s"},
            "timezone": {"type": "string"},
            "misfire": {"type": "string", "enum": ["skip", "once"]},
            "jitter_s": {"type": "number"},
            "enabled": {"type": "boolean"},
            "next_run": _nullable({"type": "number", "description": "seconds since the "
                                                                    "epoch; null if disabled"}),
            "last_run": _nullable({"type": "number", "description": "the tick time of the "
                                                                    "last job made"}),
            "last_job_id": _nullable({"type": "string"}),
            "last_job_status": _nullable({"type": "string", "description": "expired: its "
                                          "record outlived results.ttl_s"}),
        },
    },
    "DeadJob": {
        "type": "object",
        "required": ["id", "queue", "entry_id"],
        "properties": {
            "id": {"type": "string",
                   "description": "The job id, or <queue>/<entry id> for an entry that was "
                                  "never a valid job"},
            "task": _nullable({"type": "string"}),
            "queue": {"type": "string"},
            "reason": _nullable({"type": "string"}),
            "error": _nullable({"type": "string"}),
            "attempts": {"type": "integer"},
            "lost": {"type": "integer"},
            "enqueued_at": _nullable({"type": "number"}),
            "died_at": _nullable({"type": "number"}),
            "traceback": _nullable({"type": "string"}),
            "args": _nullable({"type": "object"}),
            "entry_id": {"type": "string"},
            "raw": {"type": "string"},
        },
    },
    "DeadJobs": {
        "type": "object",
        "required": ["entries"],
        "properties": {"entries": {"type": "array", "items": _ref("DeadJob")}},
    },
    "Replayed": {
        "type": "object",
        "required": ["id"],
        "properties": {"id": {"type": "string"}},
    },
    "Health": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string", "enum": ["ok"]}},
    },
    "Readiness": {
        "type": "object",
        "required": ["ready", "problems", "redis", "postgres", "consumers_running", "draining",
                     "last_reload_error", "crashed"],
        "properties": {
            "ready": {"type": "boolean"},
            "problems": {"type": "array", "items": {
                "type": "string",
                "enum": ["redis", "redis_eviction", "redis_oom", "postgres", "consumers",
                         "draining", "reload", "crashed"]}},
            "error": {"type": "string", "description": "Present when not ready"},
            "redis": {"type": "object", "required": ["ok"], "properties": {
                "ok": {"type": "boolean"}, "error": {"type": "string"},
                "maxmemory_policy": _nullable({"type": "string",
                                               "description": "As last read from Redis"}),
                "eviction_ok": {"type": "boolean",
                                "description": "noeviction, or redis.allow_eviction: true"},
                "oom": {"type": "boolean",
                        "description": "This daemon's last write was refused: Redis is "
                                       "out of memory"},
                "data_losses": {"type": "integer",
                                "description": "Times this daemon found Redis had lost its "
                                               "data (and republished its routing)"},
                "memory_full": {"type": "boolean",
                                "description": "Redis's used memory is over "
                                               "redis.max_memory_fraction of maxmemory: "
                                               "enqueues are refused (not a readiness "
                                               "problem)"}}},
            "postgres": {"type": "object", "required": ["configured", "ok"], "properties": {
                "configured": {"type": "boolean"}, "ok": _nullable({"type": "boolean"})}},
            "consumers_running": {"type": "boolean"},
            "draining": {"type": "boolean"},
            "last_reload_error": _nullable({"type": "string"}),
            "crashed": _nullable({"type": "string"}),
        },
    },
}


def build(*, auth: bool = False) -> dict[str, Any]:
    """The OpenAPI document; `auth`: /v1 needs a bearer token (http.token_file is set)."""
    v1_errors: dict[str, Any] = {
        "500": _error("Unexpected server error (logged; never a stack trace)"),
        "503": _error("Redis is unavailable", _RETRY_AFTER),
        "507": _error("Redis is out of memory (maxmemory reached, noeviction): the write "
                      "was refused", _RETRY_AFTER),
    }
    security: list[dict[str, list[str]]] = []
    if auth:
        v1_errors["401"] = _error("Missing or wrong bearer token")
        security = [{"bearerAuth": []}]

    def v1(op: dict[str, Any], *, errors: dict[str, Any] | None = None) -> dict[str, Any]:
        responses = {**op.pop("responses"), **v1_errors, **(errors or {})}
        return {**op, "responses": responses, "security": security}

    job_id = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
    doc: dict[str, Any] = {
        "openapi": "3.0.3",
        "info": {
            "title": "jobqd",
            "version": __version__,
            "description": (
                "Health, readiness, metrics and the job API of one jobqd daemon. "
                "With http.token_file set, every /v1 request (this document included) needs "
                "`Authorization: Bearer <token>`; /healthz, /readyz and /metrics stay open. "
                "Errors are JSON objects {error, field?}. A name in a request body that no "
                "daemon knows (task, queue) is 422; an id or queue in the URL that is not "
                "known is 404. Request bodies larger than max_payload_bytes plus 64 KiB "
                "are refused with 413 before they are parsed."),
        },
        "paths": {
            "/healthz": {"get": {
                "operationId": "healthz", "summary": "Liveness: the event loop answers",
                "security": [],
                "responses": {"200": _json("Alive", _ref("Health")),
                              "500": _error("Unexpected server error")}}},
            "/readyz": {"get": {
                "operationId": "readyz",
                "summary": "Readiness: Redis (and PostgreSQL) answer, consumers run, not draining",
                "security": [],
                "responses": {"200": _json("Ready", _ref("Readiness")),
                              "503": _json("Not ready; `problems` names what is wrong",
                                           _ref("Readiness")),
                              "500": _error("Unexpected server error")}}},
            "/metrics": {"get": {
                "operationId": "metrics", "summary": "Prometheus text exposition",
                "security": [],
                "responses": {"200": {"description": "Metrics", "content": {
                    "text/plain": {"schema": {"type": "string"}}}},
                    "500": _error("Unexpected server error")}}},
            "/v1/openapi.json": {"get": v1({
                "operationId": "openapi", "summary": "This document",
                "responses": {"200": _json("The OpenAPI document", {"type": "object"})}})},
            "/v1/jobs": {"post": v1({
                "operationId": "enqueue", "summary": "Enqueue one job",
                "requestBody": {"required": True, "content": {
                    _JSON: {"schema": _ref("EnqueueRequest")}}},
                "responses": {
                    "202": _json("Accepted (or an idempotent hit)", _ref("Enqueued")),
                    "400": _error("Malformed JSON or a wrong field (`field` names it)"),
                    "413": _error("Body or encoded job over max_payload_bytes"),
                    "422": _error("Unknown task or queue (`field` names which)"),
                }}, errors={"503": _error(
                    "The queue is over its high watermark, or Redis memory over "
                    "redis.max_memory_fraction (body adds queue, reason: watermark | memory, "
                    "depth, high, low), fewer replicas than redis.wait_replicas acknowledged "
                    "the job in time (body adds id: the job the master accepted, acked, "
                    "wanted; retry with the idempotency key), or Redis is unavailable",
                    _RETRY_AFTER)})},
            "/v1/jobs/{id}": {"get": v1({
                "operationId": "status", "summary": "A job's status (optionally long-polled)",
                "parameters": [job_id, {
                    "name": "wait_s", "in": "query", "required": False,
                    "description": "Wait up to this long for the job to end (pushed, not "
                                   "polled), then answer with its status",
                    "schema": {"type": "number", "minimum": 0, "maximum": MAX_WAIT_S}}],
                "responses": {"200": _json("The job's status", _ref("JobStatus")),
                              "400": _error("A bad wait_s"),
                              "404": _error("No such job (or its record expired)")}}),
                "delete": v1({
                    "operationId": "cancel", "summary": "Cancel a job",
                    "parameters": [job_id],
                    "responses": {
                        "200": _json("Cancelled: it was queued or scheduled and never runs",
                                     _ref("CancelResult")),
                        "202": _json("Cancelling: it runs now and is being stopped; it ends "
                                     "cancelled", _ref("CancelResult")),
                        "404": _error("No such job"),
                        "409": _error("The job had already finished")}})},
            "/v1/queues/{queue}/pause": {"post": v1({
                "operationId": "pause", "summary": "Stop starting the queue's jobs (enqueues "
                                                   "are still accepted)",
                "parameters": [{"name": "queue", "in": "path", "required": True,
                                "schema": {"type": "string"}}],
                "responses": {"200": _json("Paused", _ref("Paused")),
                              "404": _error("Unknown queue")}})},
            "/v1/queues/{queue}/resume": {"post": v1({
                "operationId": "resume", "summary": "Start the queue's jobs again",
                "parameters": [{"name": "queue", "in": "path", "required": True,
                                "schema": {"type": "string"}}],
                "responses": {"200": _json("Resumed", _ref("Paused")),
                              "404": _error("Unknown queue")}})},
            "/v1/queues": {"get": v1({
                "operationId": "queues", "summary": "Every queue's depth, weight and state",
                "responses": {"200": _json("Queue statistics", _ref("Queues"))}})},
            "/v1/schedules": {"get": v1({
                "operationId": "schedules",
                "summary": "Every configured schedule with its next run and last job",
                "responses": {"200": _json("Schedules", _ref("Schedules"))}})},
            "/v1/dlq": {"get": v1({
                "operationId": "dlq_list", "summary": "Dead-letter entries",
                "parameters": [
                    {"name": "queue", "in": "query", "required": False,
                     "description": "Only this queue (default: every queue)",
                     "schema": {"type": "string", "pattern": QUEUE_RE.pattern}},
                    {"name": "limit", "in": "query", "required": False,
                     "description": "At most this many entries per queue",
                     "schema": {"type": "integer", "minimum": 1, "maximum": DLQ_MAX_LIMIT,
                                "default": DLQ_DEFAULT_LIMIT}},
                ],
                "responses": {"200": _json("Dead-letter entries, oldest first",
                                           _ref("DeadJobs")),
                              "400": _error("A bad query parameter (`field` names it)"),
                              "404": _error("Unknown queue")}})},
            "/v1/dlq/{id}/replay": {"post": v1({
                "operationId": "dlq_replay",
                "summary": "Put a dead job back on its queue (attempts reset)",
                "parameters": [{**job_id, "description": "A job id, or <queue>/<entry id> "
                                                         "(URL-encoded)"}],
                "responses": {"202": _json("Replayed", _ref("Replayed")),
                              "404": _error("No such dead-letter entry"),
                              "422": _error("The entry was never a valid job")}})},
        },
        "components": {"schemas": copy.deepcopy(_SCHEMAS)},
    }
    if auth:
        doc["components"]["securitySchemes"] = {
            "bearerAuth": {"type": "http", "scheme": "bearer",
                           "description": "The contents of http.token_file"}}
    return doc
