"""`jobqd dlq`, `weights set`, `status` and `enqueue` against a real Redis and daemon:
paging, unknown queues, jobs that are not dead, confirmation, human output."""

from __future__ import annotations

import asyncio
import io
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from jobqd import Client
from jobqd.cli import main
from jobqd.exitcodes import ExitCode

from .conftest import wait_status

ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


async def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(main, list(args))
    out, err = capsys.readouterr()
    return code, out, err


class TtyInput(io.StringIO):
    """stdin as a terminal where the operator types an answer."""

    def isatty(self) -> bool:
        return True


QUEUES = {"default": {"weight": 1}, "other": {"weight": 1}}


async def dead_jobs(client: Client, n: int, task: str = "fail_now") -> list[str]:
    jobs = await client.enqueue_many(task, [{}] * n)
    for j in jobs:
        await wait_status(client, j.id, "dead")
    return [j.id for j in jobs]


async def test_dlq_list_says_showing_n_of_m_and_pages(
        start_daemon: Callable[..., Any], write_config: Callable[..., Path], client: Client,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    await start_daemon()
    cfg = str(write_config())
    ids = await dead_jobs(client, 7)
    code, out, _ = await cli(capsys, "-c", cfg, "dlq", "list", "--limit", "3")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 4
    assert [ln.split()[0] for ln in lines[:3]] == ids[:3]
    assert lines[3].startswith("showing 3 of 7 dead-letter entries")
    assert "--limit N" in lines[3] and "--all" in lines[3]
    assert all(ISO.search(ln) for ln in lines[:3])  # died=<ISO 8601 UTC>
    # --all pages through (the page size made small, so it takes several round trips)
    monkeypatch.setattr("jobqd.cli._PAGE", 2)
    code, out, err = await cli(capsys, "-c", cfg, "dlq", "list", "--all", "--json")
    rows = [json.loads(ln) for ln in out.splitlines()]
    assert code == 0 and [r["id"] for r in rows] == ids and err == ""
    assert isinstance(rows[0]["died_at"], float)  # epoch stays in --json
    code, out, err = await cli(capsys, "-c", cfg, "dlq", "list", "--json", "--limit", "5")
    assert len(out.splitlines()) == 5 and "showing 5 of 7" in err  # stdout stays JSON lines
    code, out, _ = await cli(capsys, "-c", cfg, "dlq", "list")
    assert out.splitlines()[-1] == "7 dead-letter entries"


async def test_unknown_queue_is_an_error(start_daemon: Callable[..., Any],
                                         write_config: Callable[..., Path],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    await start_daemon()
    cfg = str(write_config())
    for argv in (["dlq", "list", "--queue", "nope"], ["dlq", "replay", "--all", "--queue", "nope"],
                 ["dlq", "purge", "--all", "--yes", "--queue", "nope"]):
        code, out, err = await cli(capsys, "-c", cfg, *argv)
        assert code == ExitCode.UNKNOWN_TASK, argv
        assert "unknown queue 'nope'" in err and out == "", argv


async def test_purge_replay_show_of_a_job_that_is_not_dead_says_what_it_is(
        start_daemon: Callable[..., Any], write_config: Callable[..., Path], client: Client,
        capsys: pytest.CaptureFixture[str]) -> None:
    await start_daemon(consumers=0)  # nothing runs: the job stays queued
    cfg = str(write_config(consumers=0))
    job = await client.enqueue("noop")
    for verb in ("purge", "replay", "show"):
        code, _, err = await cli(capsys, "-c", cfg, "dlq", verb, job.id)
        assert code == ExitCode.ERROR
        assert f"job {job.id} is queued, not dead" in err, err
    code, _, err = await cli(capsys, "-c", cfg, "dlq", "purge",
                             "01HZZZZZZZZZZZZZZZZZZZZZZZ-default")
    assert code == ExitCode.ERROR and "no job" in err
    assert (await client.status(job.id)).status == "queued"


async def test_purge_all_asks_on_a_terminal(
        start_daemon: Callable[..., Any], write_config: Callable[..., Path], client: Client,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    await start_daemon(queues=QUEUES)
    cfg = str(write_config(queues=QUEUES))
    await dead_jobs(client, 2)
    other = await client.enqueue("fail_now", queue="other")
    await wait_status(client, other.id, "dead")
    monkeypatch.setattr(sys, "stdin", TtyInput("n\n"))
    code, out, err = await cli(capsys, "-c", cfg, "dlq", "purge", "--all")
    assert code == ExitCode.ERROR and "delete 3 dead-letter entries? [y/N]" in err
    assert "nothing deleted" in err and out == ""
    assert (await client.status(other.id)).status == "dead"
    monkeypatch.setattr(sys, "stdin", TtyInput("y\n"))
    code, out, err = await cli(capsys, "-c", cfg, "dlq", "purge", "--all", "--queue", "other")
    assert code == 0 and "delete 1 dead-letter entries of queue 'other'?" in err
    assert "purged 1" in out
    code, out, _ = await cli(capsys, "-c", cfg, "dlq", "list")
    assert out.splitlines()[-1] == "2 dead-letter entries"
    code, out, _ = await cli(capsys, "-c", cfg, "dlq", "purge", "--all", "--yes")
    assert code == 0 and "purged 2" in out


async def test_human_output_iso_times_and_traceback_lines(
        start_daemon: Callable[..., Any], write_config: Callable[..., Path], client: Client,
        capsys: pytest.CaptureFixture[str]) -> None:
    await start_daemon()
    cfg = str(write_config())
    [dead_id] = await dead_jobs(client, 1, task="always_fail")
    code, out, _ = await cli(capsys, "-c", cfg, "dlq", "show", dead_id)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("id:") and dead_id in lines[0]
    died = next(ln for ln in lines if ln.startswith("died_at:"))
    assert ISO.search(died)
    tb_at = lines.index("traceback:")
    tb = lines[tb_at + 1:]
    assert tb[0].strip().startswith("Traceback (most recent call last)")
    assert tb[-1].strip() == "ValueError: boom"
    assert "\\n" not in out
    code, out, _ = await cli(capsys, "-c", cfg, "status", dead_id)
    assert code == 0 and "status:" in out and "dead" in out
    assert ISO.search(next(ln for ln in out.splitlines() if ln.startswith("enqueued_at:")))
    code, out, _ = await cli(capsys, "-c", cfg, "status", dead_id, "--json")
    assert isinstance(json.loads(out)["enqueued_at"], float)


async def test_weights_set_accepts_a_queue_the_config_declares(
        write_config: Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    """No daemon has published yet: the config file given with -c makes its queues known."""
    cfg = str(write_config(queues=QUEUES))
    code, out, err = await cli(capsys, "weights", "set", "other=7", "-c", cfg)
    assert code == 0, err
    assert out.splitlines() == ["other=7"]
    code, _, err = await cli(capsys, "weights", "set", "undeclared=7", "-c", cfg)
    assert code == ExitCode.UNKNOWN_TASK and "'undeclared'" in err


async def test_enqueue_args_from_a_file_and_from_stdin(
        start_daemon: Callable[..., Any], write_config: Callable[..., Path], client: Client,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    await start_daemon()
    cfg = str(write_config())
    args_file = tmp_path / "args.json"
    args_file.write_text('{"key": "k1", "value": "from file"}\n')
    code, out, _ = await cli(capsys, "enqueue", "record", f"@{args_file}", "-c", cfg)
    assert code == 0
    assert (await wait_status(client, out.strip(), "succeeded")).result == "from file"
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"key": "k2", "value": "from stdin"}'))
    code, out, _ = await cli(capsys, "enqueue", "record", "-", "-c", cfg)
    assert code == 0
    assert (await wait_status(client, out.strip(), "succeeded")).result == "from stdin"
    code, _, err = await cli(capsys, "enqueue", "record", f"@{tmp_path / 'missing.json'}",
                             "-c", cfg)
    assert code == ExitCode.USAGE and "cannot read ARGS_JSON" in err
    code, out, _ = await cli(capsys, "enqueue", "record", '{"key": "k3"}', "--delay-s", "0.1",
                             "-c", cfg)
    assert code == 0 and out.strip()
