"""A `jobqd run` subprocess for the single-system benches (`process_executor.py`,
`waiting.py`): its own random key prefix on the given Redis, ready when its
heartbeat is in Redis, stopped with SIGTERM (then killed) and its keys deleted."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from jobqd.connect import connect_sync

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def daemon(redis_url: str, cfg: dict[str, Any], env: dict[str, str] | None = None
           ) -> Iterator[str]:
    """Run a daemon on `cfg` (url and prefix of its redis section are filled in; any
    redis URL form); yields its prefix. `env`: extra environment for the daemon."""
    prefix = "bench" + uuid.uuid4().hex[:10]
    cfg = {**cfg, "redis": {**cfg.get("redis", {}), "url": redis_url, "prefix": prefix},
           "http": {"listen": "127.0.0.1:0"}}
    r = connect_sync(redis_url)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "jobqd.yaml"
        path.write_text(yaml.safe_dump(cfg))
        penv = {**os.environ, "PYTHONPATH": str(ROOT), "JOBQD_TEST_REDIS_URL": redis_url,
                **(env or {})}
        penv.pop("NOTIFY_SOCKET", None)
        proc = subprocess.Popen([sys.executable, "-m", "jobqd", "-c", str(path), "run"],
                                env=penv, cwd=str(ROOT), stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while not r.zcard(f"{prefix}:hb"):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("the daemon did not start")
                time.sleep(0.05)
            yield prefix
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            keys = list(r.scan_iter(match=f"*{prefix}*", count=1000))
            for i in range(0, len(keys), 500):
                r.delete(*keys[i:i + 500])
            r.close()
