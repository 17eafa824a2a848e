"""The `jobqd` command line, run in-process against the real Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from jobqd import Client
from jobqd.cli import main
from jobqd.exitcodes import ExitCode

from .conftest import PG_DSN, wait_status


async def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(main, list(args))
    out, err = capsys.readouterr()
    return code, out, err


async def test_enqueue_status_dlq_roundtrip(start_daemon: Callable[..., Any],
                                            write_config: Callable[..., Path], client: Client,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    await start_daemon()
    cfg = str(write_config())
    code, out, _ = await cli(capsys, "-c", cfg, "enqueue", "record", '{"key": "k", "value": 5}')
    assert code == ExitCode.OK
    job_id = out.strip()
    await wait_status(client, job_id, "succeeded")
    code, out, _ = await cli(capsys, "-c", cfg, "status", job_id, "--json")
    st = json.loads(out)
    assert code == 0 and st["id"] == job_id and st["status"] == "succeeded"
    assert st["attempts"] == 1 and st["result"] == 5

    code, out, _ = await cli(capsys, "-c", cfg, "enqueue", "fail_now", "--idempotency-key", "x")
    dead_id = out.strip()
    code, out2, _ = await cli(capsys, "-c", cfg, "enqueue", "fail_now", "--idempotency-key", "x")
    assert out2.strip() == dead_id
    await wait_status(client, dead_id, "dead")
    code, out, _ = await cli(capsys, "-c", cfg, "dlq", "list", "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["id"] for r in rows] == [dead_id]
    assert {"id", "task", "queue", "reason", "error", "attempts"} <= set(rows[0])
    code, out, _ = await cli(capsys, "-c", cfg, "dlq", "list")
    assert "1 dead-letter entries" in out and "fail_now" in out
    code, out, _ = await cli(capsys, "-c", cfg, "dlq", "show", dead_id, "--json")
    assert json.loads(out)["reason"] == "failed"
    code, out, _ = await cli(capsys, "-c", cfg, "dlq", "replay", dead_id)
    assert code == 0 and dead_id in out
    await wait_status(client, dead_id, "dead")
    code, out, _ = await cli(capsys, "-c", cfg, "dlq", "replay", "--all")
    assert "replayed 1 jobs" in out
    await wait_status(client, dead_id, "dead")
    code, out, _ = await cli(capsys, "-c", cfg, "dlq", "purge", "--all", "--yes")
    assert "purged 1" in out
    code, out, err = await cli(capsys, "-c", cfg, "dlq", "show", dead_id)
    assert code == ExitCode.ERROR and "no job" in err
    code, _, err = await cli(capsys, "-c", cfg, "dlq", "replay")
    assert code == ExitCode.USAGE


async def test_enqueue_errors_have_named_exit_codes(start_daemon: Callable[..., Any],
                                                    write_config: Callable[..., Path],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    await start_daemon(consumers=0, queues={"default": {"weight": 1, "high_watermark": 1}})
    cfg = str(write_config())
    assert (await cli(capsys, "-c", cfg, "enqueue", "noop"))[0] == ExitCode.OK
    code, _, err = await cli(capsys, "-c", cfg, "enqueue", "noop")
    assert code == ExitCode.QUEUE_FULL and "is full" in err
    code, _, err = await cli(capsys, "-c", cfg, "enqueue", "nope")
    assert code == ExitCode.UNKNOWN_TASK and "'nope'" in err
    code, _, err = await cli(capsys, "-c", cfg, "enqueue", "noop", "{bad")
    assert code == ExitCode.USAGE and "not valid JSON" in err
    code, _, err = await cli(capsys, "-c", cfg, "enqueue", "noop", "[1]")
    assert code == ExitCode.USAGE and "JSON object" in err
    code, _, err = await cli(capsys, "-c", cfg, "status", "01HZZZZZZZZZZZZZZZZZZZZZZZ-default")
    assert code == ExitCode.ERROR and "no job" in err
    code, _, err = await cli(capsys, "-c", cfg, "bogus-command")
    assert code == ExitCode.USAGE
    code, _, err = await cli(capsys, "-c", "/nonexistent.yaml", "status", "x")
    assert code == ExitCode.CONFIG and "file not found" in err


async def test_cannot_reach_redis_exit_code(write_config: Callable[..., Path],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(write_config(redis={"url": "redis://127.0.0.1:1/0"}))
    code, _, err = await cli(capsys, "-c", cfg, "enqueue", "noop")
    assert code == ExitCode.UNAVAILABLE and "cannot reach redis" in err


async def test_weights_and_stats(start_daemon: Callable[..., Any],
                                 write_config: Callable[..., Path], client: Client,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    queues = {"a": {"weight": 3}, "b": {"weight": 1}, "default": {"weight": 1}}
    tasks = {"noop": {"handler": "tests.handlers:noop", "queue": "a"}}
    d = await start_daemon(queues=queues, tasks=tasks)
    cfg = str(write_config(queues=queues, tasks=tasks))
    code, out, _ = await cli(capsys, "-c", cfg, "weights", "get")
    assert out.splitlines() == ["a=3", "b=1", "default=1"]
    code, out, _ = await cli(capsys, "-c", cfg, "weights", "set", "b=7")
    assert code == 0 and "b=7" in out
    code, _, _ = await cli(capsys, "-c", cfg, "weights", "set", "b=x")
    assert code == ExitCode.USAGE
    code, _, _ = await cli(capsys, "-c", cfg, "weights", "set", "zzz=1")
    assert code == ExitCode.UNKNOWN_TASK
    jobs = await client.enqueue_many("noop", [{}] * 5)
    await wait_status(client, jobs[-1].id, "succeeded")
    code, out, _ = await cli(capsys, "-c", cfg, "stats", "--interval-s", "0.1")
    assert code == 0 and "ACCEPTING" in out and d.daemon.rt.name in out
    code, out, _ = await cli(capsys, "-c", cfg, "stats", "--json", "--interval-s", "0.1")
    data = json.loads(out)
    assert {q["name"] for q in data["queues"]} == {"a", "b", "default"}
    assert [w["name"] for w in data["workers"]] == [d.daemon.rt.name]


async def test_postgres_commands_need_a_dsn(write_config: Callable[..., Path],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(write_config())
    for cmd in ("migrate", "recover"):
        code, _, err = await cli(capsys, "-c", cfg, cmd)
        assert code == ExitCode.CONFIG and "needs postgres.dsn" in err


async def test_migrate_and_status_from_the_ledger(start_daemon: Callable[..., Any],
                                                  write_config: Callable[..., Path],
                                                  client: Client, pg_schema: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    pg = {"dsn": PG_DSN, "schema": pg_schema, "ledger": True}
    cfg = str(write_config(postgres=pg, results={"ttl_s": 0.5}))
    code, out, _ = await cli(capsys, "-c", cfg, "migrate")
    assert code == 0 and "applied migrations" in out
    code, out, _ = await cli(capsys, "-c", cfg, "migrate")
    assert "up to date" in out
    d = await start_daemon(postgres=pg, results={"ttl_s": 0.5})
    job = await client.enqueue("record", {"key": "k", "value": "kept"})
    await wait_status(client, job.id, "succeeded")
    await d.stop()  # flushes the ledger
    time.sleep(0.6)  # the Redis record expires
    code, out, _ = await cli(capsys, "-c", cfg, "status", job.id, "--json")
    st = json.loads(out)
    assert code == 0 and st["status"] == "succeeded" and st["result"] == "kept"
    code, out, _ = await cli(capsys, "-c", cfg, "recover")
    assert code == 0 and "requeued" in json.loads(out)
