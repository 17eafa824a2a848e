"""`jobqd cancel`, `pause`, `resume`, `wait` and `enqueue --expires-s`, run as a user
runs them, against the real Redis and an in-process daemon."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from jobqd import Client
from jobqd.cli import main
from jobqd.exitcodes import ExitCode
from tests.conftest import wait_status


async def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(main, list(args))
    out, err = capsys.readouterr()
    return code, out, err


async def test_cancel_by_id_finished_unknown_and_by_queue(
        start_daemon: Callable[..., Any], write_config: Callable[..., Path], client: Client,
        capsys: pytest.CaptureFixture[str]) -> None:
    d = await start_daemon(consumers=0)
    cfg = str(write_config())
    a = await client.enqueue("noop")
    b = await client.enqueue("noop", delay_s=60)
    code, out, _ = await cli(capsys, "cancel", "-c", cfg, a.id, b.id)
    assert code == ExitCode.OK
    assert f"{a.id}: cancelled (it was queued" in out and f"{b.id}: cancelled (it was sch" in out
    code, _, err = await cli(capsys, "cancel", "-c", cfg, a.id)
    assert code == ExitCode.ERROR and "already finished (cancelled)" in err
    code, _, err = await cli(capsys, "cancel", "-c", cfg, "01HZZZZZZZZZZZZZZZZZZZZZZZ-default")
    assert code == ExitCode.ERROR and "no job" in err
    more = await client.enqueue_many("noop", [{}] * 3)
    code, out, _ = await cli(capsys, "cancel", "-c", cfg, "--queue", "default", "--json")
    assert code == ExitCode.OK and '"cancelled":3' in out.replace(" ", "")
    for j in more:
        assert (await client.status(j.id)).status == "cancelled"
    code, _, err = await cli(capsys, "cancel", "-c", cfg, a.id, "--queue", "default")
    assert code == ExitCode.USAGE and "not both" in err
    code, _, err = await cli(capsys, "cancel", "-c", cfg, "--queue", "nope")
    assert code == ExitCode.UNKNOWN_TASK
    await d.stop()


async def test_pause_resume_and_stats(start_daemon: Callable[..., Any],
                                      write_config: Callable[..., Path], client: Client,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    await start_daemon()
    cfg = str(write_config())
    code, out, _ = await cli(capsys, "pause", "default", "-c", cfg)
    assert code == ExitCode.OK and "paused default" in out
    await asyncio.sleep(0.5)
    job = await client.enqueue("noop")
    await asyncio.sleep(0.5)
    assert (await client.status(job.id)).status == "queued"
    code, out, _ = await cli(capsys, "stats", "-c", cfg, "--interval-s", "0.1")
    assert "PAUSED" in out
    code, out, _ = await cli(capsys, "resume", "default", "-c", cfg)
    assert code == ExitCode.OK
    await wait_status(client, job.id, "succeeded")


async def test_wait_prints_the_result_and_fails_for_dead_jobs(
        start_daemon: Callable[..., Any], write_config: Callable[..., Path], client: Client,
        capsys: pytest.CaptureFixture[str]) -> None:
    await start_daemon(shutdown={"drain_timeout_s": 0})  # the 5-s job: handed back at the end
    cfg = str(write_config())
    ok = await client.enqueue("record", {"key": "k", "value": {"a": 1}})
    code, out, _ = await cli(capsys, "wait", ok.id, "-c", cfg, "--timeout-s", "10")
    assert code == ExitCode.OK and json.loads(out) == {"a": 1}
    bad = await client.enqueue("fail_now")
    code, _, err = await cli(capsys, "wait", bad.id, "-c", cfg, "--timeout-s", "10")
    assert code == ExitCode.ERROR and "dead (failed)" in err
    slow = await client.enqueue("sleep", {"seconds": 5})
    code, _, err = await cli(capsys, "wait", slow.id, "-c", cfg, "--timeout-s", "0.3")
    assert code == 124 and "did not finish" in err


async def test_enqueue_expires_s(start_daemon: Callable[..., Any],
                                 write_config: Callable[..., Path], client: Client,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    d = await start_daemon(consumers=0)
    cfg = str(write_config())
    code, out, _ = await cli(capsys, "enqueue", "noop", "-c", cfg, "--expires-s", "0.1")
    assert code == ExitCode.OK
    await asyncio.sleep(0.3)
    await d.stop()
    await start_daemon()
    info = await wait_status(client, out.strip(), "dead")
    assert info.reason == "expired"
    code, _, err = await cli(capsys, "enqueue", "noop", "-c", cfg, "--expires-s", "0")
    assert code == ExitCode.USAGE and "--expires-s" in err
