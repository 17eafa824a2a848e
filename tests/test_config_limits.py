"""Config hardening (#10, #12): bounded YAML parsing, timing keys checked against each
other, a usable token file, handler modules that exit at import, and the schema's
one-edit rule (every key's rules live on its dataclass field)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
import typing
from collections.abc import Mapping
from pathlib import Path

import pytest
import yaml

from jobqd import config
from jobqd.cli import main
from jobqd.errors import ConfigError
from jobqd.exitcodes import ExitCode

ROOT = Path(__file__).resolve().parent.parent
MIN = "redis:\n  url: redis://127.0.0.1:6379/0\n"


def write(tmp_path: Path, text: str, name: str = "jobqd.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def check_config(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["-c", str(path), "check-config"])
    return code, capsys.readouterr().err


# ---------------------------------------------------------------- bounded parsing


def bomb(levels: int) -> str:
    """The billion-laughs alias bomb: 9**levels strings from a few hundred bytes."""
    out = [MIN.rstrip("\n"), 'a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        out.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(out) + "\n"


# `jobqd ARGS` in a child whose address space is capped at 1 GiB: a regression hits
# MemoryError there instead of taking the test runner (or the machine) down.
CAPPED = ("import resource, runpy, sys; lim = 1024 ** 3; "
          "resource.setrlimit(resource.RLIMIT_AS, (lim, lim)); "
          "sys.argv = ['jobqd', *sys.argv[1:]]; runpy.run_module('jobqd', run_name='__main__')")


def run_cli(*args: str, timeout: float = 30) -> tuple[int, str, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", CAPPED, *args], capture_output=True,
                          text=True, env=env, cwd=str(ROOT), timeout=timeout, check=False)
    return proc.returncode, proc.stderr, time.monotonic() - start


@pytest.mark.parametrize("levels", [8, 9])
def test_alias_bomb_is_refused_quickly(tmp_path: Path, levels: int) -> None:
    text = bomb(levels)
    assert len(text) < 700
    p = write(tmp_path, text)
    code, err, took = run_cli("-c", str(p), "check-config")
    assert code == ExitCode.CONFIG, err
    assert str(p) in err and "alias" in err and "100000" in err, err
    assert took < 5, took


def test_a_deep_alias_chain_within_the_limit_still_loads(tmp_path: Path) -> None:
    # aliases are fine: a shared retry_backoff, ~ a hundred nodes
    text = MIN + ("tasks:\n  a:\n    handler: jobqd.examples:noop\n"
                  "    retry_backoff: &b {base_s: 0.5, max_s: 5}\n"
                  "  b:\n    handler: jobqd.examples:noop\n    retry_backoff: *b\n")
    cfg = config.load(write(tmp_path, text))
    assert cfg.tasks["b"].retry_backoff == config.BackoffConfig(base_s=0.5, max_s=5)


def test_file_over_the_size_limit_is_refused(tmp_path: Path) -> None:
    p = write(tmp_path, MIN + "#" * config.MAX_FILE_BYTES + "\n")
    with pytest.raises(ConfigError, match="larger than 1048576 bytes") as ei:
        config.load(p)
    assert str(p) in str(ei.value)


@pytest.mark.parametrize("opener", ["[", "{a: "])
def test_deep_nesting_is_refused(tmp_path: Path, opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    for depth in (100, 5000):
        p = write(tmp_path, MIN + "x: " + opener * depth + "1" + closer * depth + "\n")
        with pytest.raises(ConfigError, match="nested too deeply"):
            config.load(p)


def test_non_string_keys_and_odd_scalars_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="keys must be strings"):
        config.load(write(tmp_path, MIN + "? [a, b]\n: 1\n"))
    with pytest.raises(ConfigError, match="keys must be strings"):
        config.load(write(tmp_path, MIN + "? {[x]: 1}\n: 1\n"))
    with pytest.raises(ConfigError, match="bad value") as ei:
        config.load(write(tmp_path, MIN + "consumers: " + "1" * 5000 + "\n"))
    assert ei.value.key == "consumers" and ei.value.line == 3


# ---------------------------------------------------------------- timing keys


@pytest.mark.parametrize(("snippet", "key", "words"), [
    # the reaper's lock lives 3 x interval_s, in ms: 0.0002 made it 0 ms (refused by Redis)
    ("reaper:\n  interval_s: 0.0002\n", "reaper.interval_s", "must be >= 0.01"),
    ("reaper:\n  interval_s: 0\n", "reaper.interval_s", "must be >= 0.01"),
    ("heartbeat:\n  interval_s: 0.001\n", "heartbeat.interval_s", "must be >= 0.01"),
    ("heartbeat:\n  interval_s: 2\n  timeout_s: 3\n", "heartbeat.timeout_s",
     "twice heartbeat.interval_s (2)"),
    ("heartbeat:\n  interval_s: 2\n  timeout_s: 2\n", "heartbeat.timeout_s",
     "twice heartbeat.interval_s"),
    ("heartbeat:\n  interval_s: 5\n  timeout_s: 20\nreaper:\n  visibility_timeout_s: 5\n",
     "reaper.visibility_timeout_s", "3x heartbeat.interval_s (5)"),
    ("reaper:\n  visibility_timeout_s: 0\n", "reaper.visibility_timeout_s", "must be > 0"),
    ("reaper:\n  max_deliveries: 0\n", "reaper.max_deliveries", "must be > 0"),
    ("weights:\n  refresh_interval_s: 0\n", "weights.refresh_interval_s", "must be >= 0.01"),
    ("shutdown:\n  drain_timeout_s: -1\n", "shutdown.drain_timeout_s", "must be >= 0"),
    ("shutdown:\n  handback_timeout_s: 0\n", "shutdown.handback_timeout_s", "must be > 0"),
    ("results:\n  ttl_s: 0.0001\n", "results.ttl_s", "must be >= 0.001"),
    ("idempotency_ttl_s: 0\n", "idempotency_ttl_s", "must be >= 0.001"),
    ("tasks:\n  t:\n    handler: jobqd.examples:noop\n    timeout_s: 0\n",
     "tasks.t.timeout_s", "must be > 0"),
    ("tasks:\n  t:\n    handler: jobqd.examples:noop\n    timeout_s: .inf\n",
     "tasks.t.timeout_s", "finite"),
    ("tasks:\n  t:\n    handler: jobqd.examples:noop\n    retry_backoff: {base_s: -1}\n",
     "tasks.t.retry_backoff.base_s", "must be >= 0"),
    ("postgres:\n  ledger_retention_days: 0\n", "postgres.ledger_retention_days",
     "must be > 0, got 0"),
    ("log:\n  jobs_per_s: 0\n", "log.jobs_per_s", "must be > 0, got 0"),
    ("log:\n  jobs: some\n", "log.jobs", "must be all, failures or none"),
    ("redis:\n  url: redis://h\n  allow_eviction: maybe\n", "redis.allow_eviction",
     "true or false"),
])
def test_timing_constraints_name_the_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          snippet: str, key: str, words: str) -> None:
    text = snippet if snippet.startswith("redis:") else MIN + snippet
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        config.load(p)
    assert ei.value.key == key, str(ei.value)
    assert words in str(ei.value) and ei.value.line is not None, str(ei.value)
    code, err = check_config(p, capsys)
    assert code == ExitCode.CONFIG
    assert key in err and words in err, err


def test_every_key_with_a_unit_has_a_documented_minimum() -> None:
    """opt() refuses a unit without a minimum; and etc/jobqd.yaml states each minimum."""
    with pytest.raises(TypeError, match="minimum"):
        config.opt(1.0, unit="s")
    text = (ROOT / "etc" / "jobqd.yaml").read_text()
    seen = 0
    for cls in _schema_classes():
        for f in dataclasses.fields(cls):
            if "unit" not in f.metadata:
                continue
            seen += 1
            bound = f.metadata.get("ge", f.metadata.get("gt"))
            assert bound is not None, f"{cls.__name__}.{f.name}"
            assert f"{bound:g})" in text or f"{bound:g};" in text, (
                f"{cls.__name__}.{f.name}: minimum {bound:g} not documented in etc/jobqd.yaml")
    assert seen >= 14


def _schema_classes() -> list[type]:
    out: list[type] = []
    todo: list[type] = [config.Config]
    while todo:
        cls = todo.pop()
        if cls in out:
            continue
        out.append(cls)
        for tp in typing.get_type_hints(cls).values():
            for t in (tp, *typing.get_args(tp)):
                if isinstance(t, type) and dataclasses.is_dataclass(t):
                    todo.append(t)
    return out


# ---------------------------------------------------------------- new keys


def test_new_keys_have_their_documented_defaults(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, MIN))
    assert cfg.log.jobs == "all" and cfg.log.jobs_per_s == 100.0
    assert cfg.redis.allow_eviction is False
    cfg = config.load(write(tmp_path, "redis:\n  url: redis://h\n  allow_eviction: true\n"
                            "log:\n  jobs: failures\n  jobs_per_s: 5\n"))
    assert cfg.log.jobs == "failures" and cfg.log.jobs_per_s == 5.0
    assert cfg.redis.allow_eviction is True
    example = yaml.safe_load((ROOT / "etc" / "jobqd.yaml").read_text())
    assert example["log"]["jobs"] == "all" and example["redis"]["allow_eviction"] is False


def test_schema_walk_matches_the_dataclasses(tmp_path: Path) -> None:
    """Every readable field is read from YAML; the effective config round-trips."""
    cfg = config.load(ROOT / "etc" / "jobqd.yaml")
    again = config.loads(yaml.safe_dump(cfg.to_dict(mask_secrets=False)),
                         path=str(tmp_path / "x.yaml"))
    assert dataclasses.replace(again, path=cfg.path) == cfg


# ---------------------------------------------------------------- http.token_file


@pytest.mark.parametrize("content", ["", "  \n\t\n"])
def test_empty_token_file_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            content: str) -> None:
    token = tmp_path / "token"
    token.write_text(content)
    p = write(tmp_path, MIN + f"http:\n  token_file: {token}\n")
    code, err = check_config(p, capsys)
    assert code == ExitCode.CONFIG
    assert "http.token_file (line 4)" in err and f"{token} is empty" in err, err


def test_token_file_that_is_a_directory_or_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist") as ei:
        config.load(write(tmp_path, MIN + f"http:\n  token_file: {tmp_path}\n"))
    assert ei.value.key == "http.token_file"
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(write(tmp_path, MIN + f"http:\n  token_file: {tmp_path}/nope\n"))
    (tmp_path / "token").write_text("s3cret\n")
    cfg = config.load(write(tmp_path, MIN + f"http:\n  token_file: {tmp_path}/token\n"))
    assert cfg.http.token_file == f"{tmp_path}/token"


# ---------------------------------------------------------------- handlers that exit


EXITING = "import sys\nsys.exit(3)\ndef handle():\n    return 1\n"


@pytest.mark.parametrize(("body", "words"), [
    (EXITING, "SystemExit: 3 (the module called sys.exit() at import)"),
    ("raise GeneratorExit('odd')\n", "GeneratorExit: odd"),
    ("import asyncio\nraise asyncio.CancelledError()\n", "CancelledError"),
])
def test_handler_module_that_exits_at_import_is_a_config_error(
        tmp_path: Path, body: str, words: str) -> None:
    mod = f"exiting_mod_{abs(hash((str(tmp_path), body))) % 10**8}"
    (tmp_path / f"{mod}.py").write_text(body)
    p = write(tmp_path, MIN + f"pythonpath: [{tmp_path}]\n"
              f"tasks:\n  bad:\n    handler: {mod}:handle\n")
    with pytest.raises(ConfigError) as ei:
        config.load(p)
    assert ei.value.key == "tasks.bad.handler" and ei.value.line == 6
    assert f"cannot import {mod!r}" in str(ei.value) and words in str(ei.value), str(ei.value)
    assert mod not in sys.modules


def test_run_with_a_handler_that_exits_at_import_exits_78(tmp_path: Path) -> None:
    (tmp_path / "exit_at_import.py").write_text(EXITING)
    p = write(tmp_path, MIN + f"pythonpath: [{tmp_path}]\n"
              "tasks:\n  bad:\n    handler: exit_at_import:handle\n")
    code, err, _ = run_cli("-c", str(p), "run")
    assert code == ExitCode.CONFIG, err
    assert "config error" in err and "tasks.bad.handler" in err, err
    assert "exit_at_import" in err and "sys.exit()" in err, err


# ---------------------------------------------------------------- one schema, one reader


@dataclasses.dataclass(frozen=True, slots=True)
class _Inner:
    name: str = config.opt(internal=True)
    size: int = config.opt(1, ge=1, le=10)


@dataclasses.dataclass(frozen=True, slots=True)
class _Leaf:
    size: int = config.opt(1, ge=1, le=10)


@dataclasses.dataclass(frozen=True, slots=True)
class _Section:
    """A section written only as fields: the reader needs nothing else."""
    wait_s: float = config.opt(0.5, gt=0, unit="s")
    mode: typing.Literal["a", "b"] = "a"
    limit: int | None = None
    inner: _Leaf = _Leaf()
    things: Mapping[str, _Inner] = config.opt(factory=dict)
    paths: tuple[str, ...] = ()


def _read(text: str) -> _Section:
    data, lines = config._parse_yaml(text, "x.yaml")
    section: _Section = config._Reader("x.yaml", lines).dataclass(_Section, data, "", {})
    return section


def test_a_new_section_is_read_from_its_fields_alone() -> None:
    assert _read("") == _Section()
    got = _read("wait_s: 2\nmode: b\nlimit: 7\ninner: {size: 3}\nthings: {t: {size: 4}}\n"
                "paths: [p]\n")
    assert got.wait_s == 2.0 and got.mode == "b" and got.limit == 7 and got.inner.size == 3
    assert got.things["t"] == _Inner(name="t", size=4) and got.paths == ("p",)
    for text, key, words in [
        ("wait_s: 0\n", "wait_s", "must be > 0, got 0"),
        ("mode: c\n", "mode", "must be a or b, got 'c'"),
        ("limit: x\n", "limit", "must be an integer"),
        ("inner: {size: 11}\n", "inner.size", "must be <= 10, got 11"),
        ("things: {t: {sise: 4}}\n", "things.t.sise", "unknown key"),
        ("paths: [1]\n", "paths[0]", "must be a non-empty string, got 1"),
        ("extra: 1\n", "extra", "unknown key"),
    ]:
        with pytest.raises(ConfigError) as ei:
            _read(text)
        assert ei.value.key == key and words in str(ei.value), (text, str(ei.value))
        assert ei.value.line == 1, (text, ei.value.line)
