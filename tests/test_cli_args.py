"""The `jobqd` command line's arguments: -c anywhere, help, usage errors, closed pipes,
completion, and the message when there is no config at all."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from jobqd.cli import build_parser, main
from jobqd.exitcodes import ExitCode
from jobqd.jobs import validate_delay_s

from .conftest import ROOT


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def jobqd_proc(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
               **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "jobqd", *args], text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                            cwd=cwd or ROOT, **kw)


def subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
                ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from subcommands(sub, (*path, name))


def test_config_option_before_and_after_every_subcommand() -> None:
    p = build_parser()
    cases = [
        ["-c", "A", "run"], ["run", "-c", "A"], ["run", "--config", "A"],
        ["check-config", "-c", "A"], ["-c", "A", "check-config"],
        ["enqueue", "-c", "A", "hello", "{}"], ["enqueue", "hello", "-c", "A"],
        ["dlq", "list", "-c", "A"], ["dlq", "-c", "A", "list"], ["-c", "A", "dlq", "list"],
        ["weights", "set", "x=1", "-c", "A"], ["stats", "--config=A"],
    ]
    for argv in cases:
        assert p.parse_args(argv).config == "A", argv
    # given at both levels, the one nearer the subcommand wins; given nowhere, None
    assert p.parse_args(["-c", "A", "run", "-c", "B"]).config == "B"
    assert p.parse_args(["dlq", "list"]).config is None


def test_every_subcommand_help_shows_config_a_description_and_an_example(
        capsys: pytest.CaptureFixture[str]) -> None:
    found = list(subcommands(build_parser()))
    assert len(found) == 23  # 17 commands, 4 dlq and 2 weights subcommands
    for path, sub in found:
        text = sub.format_help()
        # Python 3.13's argparse names the metavar once: "-c, --config FILE"
        assert "-c FILE, --config FILE" in text or "-c, --config FILE" in text, path
        assert sub.description, path
        assert "\nexample:\n  jobqd " in text, path
        code, out, _ = run_cli(capsys, *path, "--help")
        assert code == 0 and "--config" in out, path


@pytest.mark.parametrize("group", ["dlq", "weights"])
def test_group_without_subcommand_prints_its_help(capsys: pytest.CaptureFixture[str],
                                                  group: str) -> None:
    code, out, err = run_cli(capsys, "-c", "/nonexistent.yaml", group)
    assert code == ExitCode.USAGE and out == ""
    assert f"usage: jobqd {group}" in err and "commands:" in err
    assert "_cmd" not in err  # no internal dest names
    assert ("list" in err and "purge" in err) if group == "dlq" else ("get" in err
                                                                       and "set" in err)
    code, _, err = run_cli(capsys)
    assert code == ExitCode.USAGE and "usage: jobqd" in err


ID = "01HZZZZZZZZZZZZZZZZZZZZZZZ-default"
DELAY_MSG = "delay_s must be a finite number of seconds from 0 to"


@pytest.mark.parametrize(("argv", "says"), [
    (["dlq", "replay", ID, "--all"], "not both"),
    (["dlq", "replay"], "needs an ID or --all"),
    (["dlq", "replay", ID, "--queue", "default"], "--queue goes with --all"),
    (["dlq", "purge"], "needs an ID, or --all"),
    (["dlq", "purge", "--queue", "default"], "needs an ID, or --all"),
    (["dlq", "purge", ID, "--all"], "not both"),
    (["dlq", "list", "--limit", "0"], "argument --limit: expected a whole number >= 1"),
    (["dlq", "list", "--limit", "-3"], "argument --limit: expected a whole number >= 1"),
    (["dlq", "list", "--limit", "2", "--all"], "not allowed with argument"),
    (["enqueue", "noop", "--delay-s", "inf"], DELAY_MSG),
    (["enqueue", "noop", "--delay-s", "nan"], DELAY_MSG),
    (["enqueue", "noop", "--delay-s", "-1"], DELAY_MSG),
    (["enqueue", "noop", "--delay-s", "1e12"], DELAY_MSG),
    (["enqueue", "noop", "--delay-s", "soon"], "delay_s must be a number"),
    (["stats", "--watch", "0"], "argument --watch"),
    (["weights", "set", "default=x"], "expected QUEUE=WEIGHT"),
])
def test_usage_errors_exit_64_without_a_traceback(capsys: pytest.CaptureFixture[str],
                                                  write_config: Callable[..., Path],
                                                  argv: list[str], says: str) -> None:
    # a real config (unreachable Redis): a usage error must be found before any I/O
    cfg = str(write_config(redis={"url": "redis://127.0.0.1:1/0"}))
    code, _, err = run_cli(capsys, "-c", cfg, *argv)
    assert code == ExitCode.USAGE, (argv, err)
    assert "usage: jobqd" in err and says in err, err
    assert "Traceback" not in err


def test_delay_s_message_names_the_range(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "enqueue", "noop", "--delay-s", "inf")
    assert code == ExitCode.USAGE
    assert "delay_s must be a finite number of seconds from 0 to 3.1536e+08, got inf" in err


def test_purge_all_without_yes_and_no_terminal_is_refused(
        capsys: pytest.CaptureFixture[str], write_config: Callable[..., Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False)
    cfg = str(write_config(redis={"url": "redis://127.0.0.1:1/0"}))
    code, _, err = run_cli(capsys, "-c", cfg, "dlq", "purge", "--all")
    assert code == ExitCode.USAGE and "--yes" in err


def test_no_config_anywhere_says_how_to_get_one(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "JOBQD_CONFIG"}
    if Path("/etc/jobqd.yaml").exists():
        pytest.skip("this machine has /etc/jobqd.yaml")
    for command in ("run", "check-config"):
        p = subprocess.run([sys.executable, "-m", "jobqd", command], env={
            **env, "PYTHONPATH": str(ROOT)}, cwd=tmp_path, capture_output=True, text=True,
            timeout=60, check=False)
        assert p.returncode == ExitCode.CONFIG, p.stderr
        assert "jobqd init /etc/jobqd" in p.stderr and f"jobqd -c FILE {command}" in p.stderr
        assert "Traceback" not in p.stderr


def test_closed_stdout_exits_quietly(tmp_path: Path, write_config: Callable[..., Path]) -> None:
    """`jobqd check-config | head -1`: a closed pipe is not a Redis failure (69)."""
    cfg = str(write_config())
    p = subprocess.run(f"'{sys.executable}' -m jobqd check-config -c '{cfg}' | head -1; "
                       "echo \"rc=${PIPESTATUS[0]}\" >&2", shell=True, executable="/bin/bash",
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path,
                       capture_output=True, text=True, timeout=60, check=False)
    assert p.stdout.startswith("# ") and p.stdout.count("\n") == 1
    assert f"rc={int(ExitCode.BROKEN_PIPE)}" in p.stderr, p.stderr
    assert "jobqd:" not in p.stderr and "Exception" not in p.stderr
    assert "Traceback" not in p.stderr


def test_closed_stdout_before_the_first_write(write_config: Callable[..., Path]) -> None:
    cfg = str(write_config())
    proc = jobqd_proc("check-config", "-c", cfg, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.close()  # the reader is gone before jobqd writes anything
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == ExitCode.BROKEN_PIPE, err
    assert err == ""


def test_bash_completion_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "completion", "bash")
    assert code == 0 and "complete" in out
    for word in ("check-config", "dlq", "replay", "--delay-s", "--config"):
        assert word in out, word
    script = tmp_path / "jobqd.bash"
    script.write_text(out)
    bash = shutil.which("bash")
    assert bash is not None
    check = subprocess.run([bash, "-n", str(script)], capture_output=True, text=True,
                           timeout=30, check=False)
    assert check.returncode == 0, check.stderr
    # and it loads: the completion function is defined
    load = subprocess.run([bash, "-c", f"source '{script}' && complete -p jobqd"],
                          capture_output=True, text=True, timeout=30, check=False)
    assert load.returncode == 0 and "jobqd" in load.stdout, load.stderr
    for shell in ("zsh", "tcsh"):
        code, out, _ = run_cli(capsys, "completion", shell)
        assert code == 0 and "jobqd" in out
    assert run_cli(capsys, "completion", "fish")[0] == ExitCode.USAGE


def test_stats_watch_redraws_until_ctrl_c(write_config: Callable[..., Path]) -> None:
    cfg = str(write_config())
    proc = jobqd_proc("stats", "--watch", "0.2", "-c", cfg, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        frames = 0
        deadline = time.monotonic() + 30
        while frames < 2 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            frames += line.startswith("jobqd stats  ")
        assert frames == 2
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "Traceback" not in err and "KeyboardInterrupt" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)  # closes the pipes


def test_stats_watch_ends_on_a_ctrl_c_swallowed_inside_asyncio_run(
        write_config: Callable[..., Path], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A Ctrl-C that lands inside a frame's asyncio.run becomes a cancellation there; a
    library that swallows it must not make --watch run on for ever (seen in CI under
    load: frames kept coming after SIGINT)."""
    import asyncio

    from jobqd import cli

    frames = 0

    def workers(_cfg: Any) -> list[dict[str, Any]]:
        nonlocal frames
        frames += 1
        assert frames < 5, "the Ctrl-C was lost: --watch kept drawing"

        async def swallowing() -> list[dict[str, Any]]:
            try:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while reading the workers
                await asyncio.sleep(1)
            except asyncio.CancelledError:
                pass  # what a careless library does
            return []

        return asyncio.run(swallowing())

    monkeypatch.setattr(cli, "_workers", workers)
    # as in a shell (an earlier test in this process may have left another handler)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        rc = cli.main(["stats", "--watch", "0.01", "-c", str(write_config())])
        assert rc == 0 and frames == 1
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    finally:
        signal.signal(signal.SIGINT, before)
    capsys.readouterr()


def test_the_shipped_units_exec_start_parses() -> None:
    """systemd/jobqd.service runs `jobqd run -c /etc/jobqd.yaml`: -c after the command
    (the unit test that executes the line belongs to tests/test_systemd_unit.py)."""
    unit = (ROOT / "systemd" / "jobqd.service").read_text()
    [line] = [ln for ln in unit.splitlines() if ln.startswith("ExecStart=")]
    argv = shlex.split(line.removeprefix("ExecStart="))
    assert Path(argv[0]).name == "jobqd"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "run" and args.config == "/etc/jobqd.yaml"


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan"), -0.5, 1e12, True,
                                 "5"])
def test_validate_delay_s_refuses(bad: Any) -> None:
    with pytest.raises(ValueError, match="delay_s must be"):
        validate_delay_s(bad)


def test_validate_delay_s_accepts() -> None:
    assert validate_delay_s(0) == 0.0 and validate_delay_s(60) == 60.0
    assert validate_delay_s(10 * 365 * 86400) == 10 * 365 * 86400.0
