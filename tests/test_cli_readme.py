"""Every `jobqd ...` command line in README.md runs as written against the shipped
etc/jobqd.yaml (on the test Redis, under the test's prefix): none is a usage error (64)
or a crash (70)."""

from __future__ import annotations

import argparse
import io
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from jobqd.cli import build_parser, main
from jobqd.exitcodes import ExitCode

from .conftest import REDIS_URL, ROOT, DaemonProcess

OPERATORS = {"&&", "||", ";", "|", "&"}
REDIRECTS = {">", ">>", "<", "2>", "2>&1", "&>"}


def code_block_lines(text: str) -> Iterator[str]:
    """Shell lines of the fenced sh/bash/plain code blocks (continuations joined)."""
    for m in re.finditer(r"^( *)```(\w*)\n(.*?)^\1```", text, re.M | re.S):
        if m.group(2) not in ("", "sh", "bash", "console", "shell"):
            continue
        yield from m.group(3).replace("\\\n", " ").splitlines()


def weights_examples(text: str) -> Iterator[list[str]]:
    """The queue names of every `jobqd weights set Q=W ...` mentioned anywhere."""
    for span in re.findall(r"jobqd weights set ((?:[\w-]+=\d+ ?)+)", text):
        yield [a.split("=")[0] for a in span.split()]


def commands(line: str) -> Iterator[tuple[list[str], str | None]]:
    """(argv after `jobqd`, stdin text) for each jobqd command in a shell line."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    lex.commenters = "#"
    segments: list[list[str]] = [[]]
    ops: list[str] = []
    for tok in lex:
        if tok in OPERATORS:
            ops.append(tok)
            segments.append([])
        else:
            segments[-1].append(tok)
    for i, seg in enumerate(segments):
        words: list[str] = []
        it = iter(seg)
        for w in it:
            if w in REDIRECTS:
                next(it, None)  # and its target
            else:
                words.append(w)
        at = 0  # the command word: after `sudo` and VAR=value assignments
        while at < len(words) and (words[at] == "sudo" or re.match(r"\w+=", words[at])):
            at += 1
        if at >= len(words) or os.path.basename(words[at]) != "jobqd":
            continue
        stdin = None
        if i > 0 and ops[i - 1] == "|" and segments[i - 1][:1] == ["echo"]:
            stdin = " ".join(segments[i - 1][1:]) + "\n"
        yield words[at + 1:], stdin


def readme_commands() -> list[tuple[list[str], str | None]]:
    text = (ROOT / "README.md").read_text()
    found = []
    for line in code_block_lines(text):
        found += list(commands(line))
    unique: list[tuple[list[str], str | None]] = []
    for c in found:
        if c not in unique:
            unique.append(c)
    return unique


def rewrite(argv: list[str], config: Path, workdir: Path) -> list[str]:
    out: list[str] = []
    it = iter(argv)
    for w in it:
        if w in ("-c", "--config"):
            next(it)
            out += [w, str(config)]
        elif w.startswith("--config="):
            out.append(f"--config={config}")
        else:
            out.append(w)
    if out[:1] == ["init"] and len(out) > 1 and not out[1].startswith("-"):
        out[1] = str(workdir / out[1].lstrip("/"))  # /etc/jobqd -> <tmp>/etc/jobqd
    return out


def test_readme_weights_examples_use_queues_the_shipped_config_declares() -> None:
    declared = set(yaml.safe_load((ROOT / "etc" / "jobqd.yaml").read_text())["queues"])
    examples = list(weights_examples((ROOT / "README.md").read_text()))
    assert examples
    for queues in examples:
        assert set(queues) <= declared, queues


def test_the_readme_has_commands_to_check() -> None:
    cmds = [" ".join(a) for a, _ in readme_commands()]
    for expected in ("run", "check-config", "init ./jobqd-etc", "weights set critical=70 "
                     "default=20", "dlq list --limit 50", "enqueue hello -"):
        assert any(expected in c for c in cmds), (expected, cmds)


def test_every_readme_command_runs_against_the_shipped_config(
        tmp_path: Path, prefix: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    cfg = yaml.safe_load((ROOT / "etc" / "jobqd.yaml").read_text())
    cfg["redis"] = {**cfg["redis"], "url": REDIS_URL, "prefix": prefix}
    cfg["http"] = {**cfg["http"], "listen": "127.0.0.1:0"}
    cfg["state_dir"] = str(tmp_path / "state")
    cfg["heartbeat"] = {**cfg["heartbeat"], "interval_s": 0.5}
    config = tmp_path / "jobqd.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("JOBQD_CONFIG", str(config))
    ran = []
    for argv, stdin in readme_commands():
        args = rewrite(argv, config, work)
        if "run" in args:  # the daemon: it must start and drain cleanly
            d = DaemonProcess(config, tmp_path / "daemon.log")
            d.start()
            try:
                d.wait_ready(prefix)
                d.signal(signal.SIGTERM)
                code = d.wait(30)
            finally:
                d.stop()
            assert code == ExitCode.OK, (args, d.log())
            ran.append(args)
            continue
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin or ""))
        code = main(args)
        _, err = capsys.readouterr()
        assert code not in (ExitCode.USAGE, ExitCode.SOFTWARE), (args, code, err)
        assert "Traceback" not in err, (args, err)
        ran.append(args)
    assert len(ran) >= 12, ran
    # the examples did what they say: the delayed job exists, the weights were set
    p = subprocess.run([sys.executable, "-m", "jobqd", "weights", "get"], cwd=work,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                       text=True, timeout=60, check=True)
    assert "critical=70" in p.stdout.splitlines() and "default=20" in p.stdout.splitlines()


def test_every_help_example_parses() -> None:
    """The examples in `jobqd COMMAND --help` are real command lines."""
    parser = build_parser()
    examples = [ln.strip() for ln in _help_texts(parser)]
    argvs = [argv for line in examples for argv, _ in commands(line)]
    assert len(argvs) >= 18
    for argv in argvs:
        try:
            parser.parse_args(argv)
        except SystemExit as e:
            raise AssertionError(f"jobqd {' '.join(argv)}: exit {e.code}") from None


def _help_texts(parser: argparse.ArgumentParser) -> Iterator[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                text = sub.format_help()
                yield from text.split("\nexample:\n", 1)[1].splitlines()
                yield from _help_texts(sub)
