"""Logging: JSON lines when not on a TTY (or `log.format: json`), text on a TTY.

One line per job failure carries job_id, task, queue and attempt; job
payloads are not logged unless `log.payloads: true`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

import orjson

_STD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "logger": record.name,
            "msg": record.getMessage()}
        for k, v in record.__dict__.items():
            if k not in _STD and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        try:
            return orjson.dumps(out, default=str).decode()
        except TypeError:  # text that is not valid UTF-8 (a file name, say): never lose
            return json.dumps(out, default=str)  # the line; json escapes lone surrogates


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extra = {k: v for k, v in record.__dict__.items() if k not in _STD
                 and not k.startswith("_")}
        if extra:
            base += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        return base


def setup(level: str = "INFO", fmt: str = "auto") -> None:
    root = logging.getLogger()
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    for h in list(root.handlers):
        if getattr(h, "_jobqd", False):
            root.removeHandler(h)
    handler._jobqd = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("jobqd").setLevel(level)


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level)
    logging.getLogger("jobqd").setLevel(level)
