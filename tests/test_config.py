"""Config loading: every bad input names the file, the dotted key and the line."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from jobqd import config
from jobqd.cli import main
from jobqd.errors import ConfigError
from jobqd.exitcodes import ExitCode

ROOT = Path(__file__).resolve().parent.parent
MIN = "redis:\n  url: redis://127.0.0.1:6379/0\n"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "jobqd.yaml"
    p.write_text(text)
    return p


def load_err(tmp_path: Path, text: str) -> ConfigError:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        config.load(p)
    assert str(p) in str(ei.value)
    return ei.value


def test_minimal_config_gets_documented_defaults(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, MIN))
    assert cfg.redis.prefix == "jobqd"
    assert cfg.http.listen == "127.0.0.1:8765"
    assert cfg.max_payload_bytes == 1024 * 1024
    assert list(cfg.queues) == ["default"]
    assert cfg.heartbeat.timeout_s == 10
    assert cfg.reaper.max_deliveries == 3


def test_unknown_key_names_file_key_and_line(tmp_path: Path) -> None:
    e = load_err(tmp_path, MIN + "tasks:\n  send:\n    handler: jobqd.examples:noop\n"
                 "    timeout: 5\n")
    assert e.key == "tasks.send.timeout"
    assert e.line == 6
    assert "unknown key" in str(e)


def test_unknown_top_level_key(tmp_path: Path) -> None:
    e = load_err(tmp_path, MIN + "consumer: 4\n")
    assert e.key == "consumer" and e.line == 3


def test_wrong_type_names_the_key(tmp_path: Path) -> None:
    e = load_err(tmp_path, MIN + "tasks:\n  send_email:\n    handler: jobqd.examples:noop\n"
                 "    timeout_s: soon\n")
    assert e.key == "tasks.send_email.timeout_s"
    assert e.line == 6
    assert "must be a number" in str(e)


@pytest.mark.parametrize(("snippet", "key", "words"), [
    ("consumers: -1\n", "consumers", "must be >="),
    ("consumers: 2.5\n", "consumers", "integer"),
    ("consumers: true\n", "consumers", "integer"),
    ("max_payload_bytes: 0\n", "max_payload_bytes", "must be >"),
    ("http:\n  listen: nonsense\n", "http.listen", "host:port"),
    ("queues:\n  q:\n    weight: 1\n    high_watermark: 10\n    low_watermark: 10\n",
     "queues.q.low_watermark", "below high_watermark"),
    ("queues:\n  q:\n    low_watermark: 10\n", "queues.q.low_watermark", "needs high"),
    ("queues:\n  'bad name':\n    weight: 1\n", "queues.bad name", "must match"),
    ("heartbeat:\n  interval_s: 5\n  timeout_s: 6\n", "heartbeat.timeout_s", "twice"),
    ("log:\n  level: LOUD\n", "log.level", "DEBUG"),
    ("tasks:\n  t:\n    handler: jobqd.examples:noop\n    queue: nowhere\n", "tasks.t.queue",
     "not declared"),
    ("tasks:\n  t:\n    handler: jobqd.examples:noop\n    rate_limit: fast\n",
     "tasks.t.rate_limit", "100/s"),
    ("tasks:\n  t:\n    handler: jobqd.examples:noop\n    retry_backoff: {base_s: 5, max_s: 1}\n",
     "tasks.t.retry_backoff.max_s", ">= base_s"),
    ("tasks:\n  t:\n    queue: default\n", "tasks.t.handler", "required"),
    ("postgres:\n  ledger: true\n", "postgres.ledger", "needs postgres.dsn"),
    ("  socket_timeout_s: 2\n", "redis.socket_timeout_s", "must be >="),  # < 2 s fetch
])
def test_bad_values(tmp_path: Path, snippet: str, key: str, words: str) -> None:
    e = load_err(tmp_path, MIN + snippet)
    assert e.key == key, str(e)
    assert words in str(e)
    assert e.line is not None


def test_bad_redis_url_scheme(tmp_path: Path) -> None:
    e = load_err(tmp_path, "redis:\n  url: http://localhost\n")
    assert e.key == "redis.url" and e.line == 2


def test_missing_redis_url(tmp_path: Path) -> None:
    e = load_err(tmp_path, "consumers: 1\n")
    assert e.key == "redis.url"


def test_malformed_yaml_gives_line(tmp_path: Path) -> None:
    e = load_err(tmp_path, MIN + "tasks:\n  a: [1, 2\n  b: 3\n")
    assert "YAML syntax error" in str(e)
    assert e.line is not None and e.line >= 4


def test_duplicate_key_is_an_error(tmp_path: Path) -> None:
    e = load_err(tmp_path, MIN + "consumers: 1\nconsumers: 2\n")
    assert e.key == "consumers" and e.line == 4 and "duplicate" in str(e)


def test_not_a_mapping(tmp_path: Path) -> None:
    e = load_err(tmp_path, "- just\n- a list\n")
    assert "mapping" in str(e)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="file not found"):
        config.load("/nonexistent/jobqd.yaml")


def test_handler_import_error_is_a_config_error(tmp_path: Path) -> None:
    e = load_err(tmp_path, MIN + "tasks:\n  t:\n    handler: no_such_module_xyz:fn\n")
    assert e.key == "tasks.t.handler" and e.line == 5
    assert "cannot import 'no_such_module_xyz'" in str(e)
    e = load_err(tmp_path, MIN + "tasks:\n  t:\n    handler: jobqd.examples:nope\n")
    assert "has no attribute 'nope'" in str(e)
    e = load_err(tmp_path, MIN + "tasks:\n  t:\n    handler: jobqd.examples\n")
    assert "module:function" in str(e)
    e = load_err(tmp_path, MIN + "tasks:\n  t:\n    handler: jobqd.errors:__doc__\n")
    assert "not callable" in str(e)


def test_handler_async_detection(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, MIN + "tasks:\n  a:\n    handler: jobqd.examples:hello\n"
                            "  s:\n    handler: jobqd.examples:checksum\n"))
    assert cfg.tasks["a"].is_async is True
    assert cfg.tasks["s"].is_async is False


def test_pythonpath_relative_to_config(tmp_path: Path) -> None:
    (tmp_path / "mycode").mkdir()
    (tmp_path / "mycode" / "my_handlers_mod.py").write_text("def f():\n    return 1\n")
    cfg = config.load(write(tmp_path, MIN + "pythonpath: [mycode]\n"
                            "tasks:\n  t:\n    handler: my_handlers_mod:f\n"))
    assert cfg.tasks["t"].fn() == 1


def test_env_interpolation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JQ_TEST_PREFIX", "fromenv")
    monkeypatch.delenv("JQ_TEST_UNSET", raising=False)
    cfg = config.load(write(tmp_path, "redis:\n  url: redis://h:6379\n  prefix: ${JQ_TEST_PREFIX}\n"
                            "state_dir: ${JQ_TEST_UNSET:-/tmp/x}/$$y\n"))
    assert cfg.redis.prefix == "fromenv"
    assert cfg.state_dir == "/tmp/x/$y"
    e = load_err(tmp_path, "redis:\n  url: ${JQ_TEST_UNSET}\n")
    assert e.key == "redis.url" and "JQ_TEST_UNSET is not set" in str(e)


def test_url_file_and_masking(tmp_path: Path) -> None:
    secret = tmp_path / "redis-url"
    secret.write_text("redis://:s3cret@127.0.0.1:6379/0\n")
    cfg = config.load(write(tmp_path, f"redis:\n  url_file: {secret}\n"
                            "postgres:\n  dsn: postgresql://u:pw@db/x\n"))
    assert cfg.redis.url == "redis://:s3cret@127.0.0.1:6379/0"
    plain = cfg.to_dict()
    assert "s3cret" not in str(plain) and "pw@" not in str(plain)
    assert plain["redis"]["url"] == "redis://:****@127.0.0.1:6379/0"
    e = load_err(tmp_path, f"redis:\n  url: redis://x\n  url_file: {secret}\n")
    assert "not both" in str(e)
    e = load_err(tmp_path, "redis:\n  url_file: /nonexistent/secret\n")
    assert e.key == "redis.url_file"


def test_example_config_passes_check_config(capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBQD_STATE_DIR", "/tmp/jobqd-test-state")
    assert main(["-c", str(ROOT / "etc" / "jobqd.yaml"), "check-config"]) == ExitCode.OK
    out = capsys.readouterr().out
    assert "OK" in out and "hello" in out


def test_check_config_bad_file_exit_code(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    p = write(tmp_path, MIN + "bogus: 1\n")
    assert main(["-c", str(p), "check-config"]) == ExitCode.CONFIG
    err = capsys.readouterr().err
    assert "bogus" in err and "line 3" in err and str(p) in err


def test_example_documents_every_key_with_its_default() -> None:
    """etc/jobqd.yaml shows every key; where it shows a default, it is the real one."""
    example = yaml.safe_load((ROOT / "etc" / "jobqd.yaml").read_text())
    text = (ROOT / "etc" / "jobqd.yaml").read_text()
    sections = {"redis": config.RedisConfig, "postgres": config.PostgresConfig,
                "http": config.HttpConfig, "reaper": config.ReaperConfig,
                "heartbeat": config.HeartbeatConfig, "shutdown": config.ShutdownConfig,
                "results": config.ResultsConfig, "weights": config.WeightsConfig,
                "log": config.LogConfig, "process_pool": config.ProcessPoolConfig}
    for name, cls in sections.items():
        for f in dataclasses.fields(cls):
            assert f.name in example[name], f"{name}.{f.name} missing from etc/jobqd.yaml"
            if f.default is not dataclasses.MISSING and name != "redis":
                assert example[name][f.name] == f.default, f"{name}.{f.name}"
    for f in dataclasses.fields(config.Config):
        if f.name in ("path", "queues", "tasks") or f.name in sections:
            continue
        assert re.search(rf"^{f.name}:", text, re.M), f"{f.name} missing from etc/jobqd.yaml"
        if f.default is not dataclasses.MISSING and f.name != "state_dir":
            assert example[f.name] == (list(f.default) if isinstance(f.default, tuple)
                                       else f.default), f.name
    task = example["tasks"]["hello"]
    for f in dataclasses.fields(config.TaskConfig):
        if f.name in ("name", "fn", "is_async"):
            continue
        assert f.name in task, f"tasks.<name>.{f.name} missing from etc/jobqd.yaml"
