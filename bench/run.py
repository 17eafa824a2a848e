#!/usr/bin/env python3
"""Side-by-side benchmark: jobqd vs arq, SAQ, RQ, Dramatiq, Celery, taskiq.

One command, one Redis, the same workloads for every system:

    python bench/run.py                 # full run (long: see bench/README.md)
    python bench/run.py --quick         # smoke run, tiny N, ~1 minute
    python bench/run.py --systems arq,saq --repeats 3 --n 20000

Every system is driven through bench/drivers/<system>_driver.py (contract in
bench/drivers/README.md); its workers and producers are subprocesses.  The
peers are installed from the package index into bench/.venv-peers/<system>/
(pins in bench/requirements-peers.txt); jobqd runs from the project venv.

This orchestrator uses only the standard library, plus matplotlib for the
chart (skipped with a warning if matplotlib is missing).  It starts its own
redis-server on 127.0.0.1 (no persistence) unless --redis-url is given.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
DRIVERS = BENCH / "drivers"
REQS = BENCH / "requirements-peers.txt"

PEERS = ["arq", "saq", "rq", "rq_simple", "dramatiq", "celery", "taskiq", "streaq", "pgqueuer"]
# Not peers (never a "best peer"), measured in the processing phases only, right after
# jobqd in every repeat: jobqd's daemon on redis-py 5.3.1, and the reference Streams
# worker (bench/drivers/reference_driver.py), the yardstick of issue #17.
REFERENCE = "reference"
PROC_ONLY = ["jobqd_redis5", REFERENCE, "pgqueuer"]  # pgqueuer: a PostgreSQL queue
ALL_SYSTEMS = ["jobqd", "jobqd_redis5", REFERENCE, *PEERS]
NOT_PEERS = {"jobqd", "jobqd_redis5", REFERENCE}
HIGH = 100  # the "concurrency 100" setting

KEY_DONE = "bench:done"
KEY_LAT = "bench:lat"
KEY_STARTED = "bench:started"
KEY_DONE_SET = "bench:done_set"

# (key, label, unit, higher_is_better)
METRICS: list[tuple[str, str, str, bool]] = [
    ("enqueue_single", "Enqueue, one by one", "jobs/s", True),
    ("enqueue_batch", "Enqueue, batch API", "jobs/s", True),
    ("proc_default", "Processing, no-op, default concurrency", "jobs/s", True),
    ("proc_100", "Processing, no-op, concurrency 100", "jobs/s", True),
    ("io_100", "I/O-bound (sleep 1 ms), concurrency 100", "jobs/s", True),
    ("lat_p50", "Latency p50 @ steady rate", "ms", False),
    ("lat_p99", "Latency p99 @ steady rate", "ms", False),
    ("lat_max", "Latency max @ steady rate", "ms", False),
    ("rss_idle", "Worker memory, idle", "MiB", False),
    ("rss_backlog", "Worker memory, big backlog", "MiB", False),
    ("redis_bytes_per_job", "Redis bytes per queued job", "B", False),
    ("proc_backlog_1k", "Processing with 1k queued", "jobs/s", True),
    ("proc_backlog_big", "Processing with big backlog queued", "jobs/s", True),
    ("recovery_s", "Recovery after kill -9", "s", False),
]
METRIC_INFO = {k: (label, unit, hib) for k, label, unit, hib in METRICS}

LIVE: set[Any] = set()  # live subprocess wrappers, killed on exit


class PhaseError(Exception):
    pass


def log(msg: str) -> None:
    ts = time.strftime("%H:%M:%S")
    print(f"[{ts}] {msg}", flush=True)


# ====================================================================== Redis
class RedisError(Exception):
    pass


class MiniRedis:
    """A tiny RESP2 client (the orchestrator is stdlib only)."""

    def __init__(self, host: str, port: int, db: int = 0, timeout: float = 120.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.f = self.sock.makefile("rb")
        if db:
            self.cmd("SELECT", db)

    def cmd(self, *args: Any) -> Any:
        parts = [b"*%d\r\n" % len(args)]
        for a in args:
            b = a if isinstance(a, bytes) else str(a).encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
        self.sock.sendall(b"".join(parts))
        return self._read()

    def _read(self) -> Any:
        line = self.f.readline()
        if not line:
            raise ConnectionError("redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RedisError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            return self.f.read(n + 2)[:-2]
        if kind == b"*":
            n = int(rest)
            if n < 0:
                return None
            return [self._read() for _ in range(n)]
        raise RedisError(f"unexpected reply {line!r}")

    def get_int(self, key: str) -> int:
        v = self.cmd("GET", key)
        return int(v) if v is not None else 0

    def info(self, section: str) -> dict[str, str]:
        raw = self.cmd("INFO", section).decode()
        out = {}
        for line in raw.splitlines():
            if ":" in line and not line.startswith("#"):
                k, v = line.split(":", 1)
                out[k] = v
        return out

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class RedisServer:
    """Our own redis-server on loopback, or an external loopback URL."""

    def __init__(self, url: str | None, port: int) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.tmpdir: str | None = None
        if url:
            u = urlparse(url)
            if u.hostname not in ("127.0.0.1", "localhost", "::1") and not (
                u.hostname or ""
            ).startswith("127."):
                raise SystemExit("--redis-url must point at a loopback address")
            db = (u.path or "/").strip("/")
            if not db:
                raise SystemExit("--redis-url needs an explicit db (e.g. /15): it is FLUSHDB'd")
            self.host, self.port, self.db = u.hostname or "127.0.0.1", u.port or 6379, int(db)
            self.own = False
        else:
            self.host, self.db, self.own = "127.0.0.1", 0, True
            self.port = port if _port_free(port) else _free_port()
            self._start()
        self.url = f"redis://{self.host}:{self.port}/{self.db}"
        self.r = MiniRedis(self.host, self.port, self.db)

    def _start(self) -> None:
        exe = shutil.which("redis-server")
        if not exe:
            raise SystemExit(
                "redis-server not found (apt-get install redis-server) or pass --redis-url"
            )
        self.tmpdir = tempfile.mkdtemp(prefix="bench-redis-")
        cmd = [
            exe,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self.tmpdir,
            "--daemonize",
            "no",
            "--logfile",
            os.path.join(self.tmpdir, "redis.log"),
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        LIVE.add(self)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                MiniRedis(self.host, self.port, timeout=1).cmd("PING")
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise SystemExit(f"redis-server exited with {self.proc.returncode}") from None
                time.sleep(0.05)
        raise SystemExit("redis-server did not answer PING within 10 s")

    def flush(self) -> None:
        self.r.cmd("FLUSHALL" if self.own else "FLUSHDB")

    def used_memory(self) -> int:
        return int(self.r.info("memory")["used_memory"])

    def version(self) -> str:
        return self.r.info("server").get("redis_version", "?")

    def kill(self) -> None:
        LIVE.discard(self)
        if hasattr(self, "r"):
            self.r.close()
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as redis does
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ================================================================ processes
def _killpg(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


class Cmd:
    """A driver subprocess in its own session (process group)."""

    def __init__(self, system: System, args: list[str], log_path: Path) -> None:
        self.system = system
        self.log_path = log_path
        self.logf = open(log_path, "ab")  # noqa: SIM115 - closed in _close()
        self.logf.write(f"\n=== {time.strftime('%H:%M:%S')} {' '.join(args)}\n".encode())
        self.logf.flush()
        cmd = [system.python, "-m", f"bench.drivers.{system.name}_driver", *args]
        self.p = subprocess.Popen(
            cmd,
            cwd=system.env["PYTHONPATH"],  # `-m` puts the cwd first on sys.path
            env=system.env,
            stdout=subprocess.PIPE,
            stderr=self.logf,
            start_new_session=True,
        )
        LIVE.add(self)
        self.lines: deque[str] = deque(maxlen=200)
        self.ready = threading.Event()
        self.eof = threading.Event()
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self) -> None:
        assert self.p.stdout is not None
        for raw in self.p.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            if '"event": "ready"' in line:
                self.ready.set()
        self.eof.set()

    def alive(self) -> bool:
        return self.p.poll() is None

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.05):
            if not self.alive():
                raise PhaseError(
                    f"worker exited ({self.p.returncode}) before ready; see {self.log_path}"
                )
            if time.monotonic() > deadline:
                raise PhaseError(f"worker not ready within {timeout:.0f} s; see {self.log_path}")

    def result(self, timeout: float) -> dict[str, Any]:
        """Wait for exit and return the last JSON line printed."""
        try:
            self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise PhaseError(
                f"driver timed out after {timeout:.0f} s; see {self.log_path}"
            ) from None
        self.eof.wait(5)
        self.kill()
        for line in reversed(self.lines):
            if line.startswith("{"):
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if isinstance(obj, dict):
                    return obj
        raise PhaseError(
            f"driver exited {self.p.returncode} without a JSON line; see {self.log_path}"
        )

    def kill(self, extra: list[int] | None = None) -> None:
        """SIGKILL the whole process tree: the process group and every
        descendant (some children leave the group, e.g. RQ's work horse calls
        setsid), collected before the parent dies."""
        pids = descendants(self.p.pid) + list(extra or [])
        _killpg(self.p.pid, signal.SIGKILL)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.p.wait(10)
        self._close()

    def stop(self, grace: float = 1.0) -> None:
        tree = descendants(self.p.pid)
        _killpg(self.p.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.p.wait(grace)
        self.kill(extra=tree)  # also reaps leftover children

    def _close(self) -> None:
        LIVE.discard(self)
        with contextlib.suppress(OSError):
            self.logf.close()


def cleanup() -> None:
    for obj in list(LIVE):
        if isinstance(obj, Cmd):
            obj.kill()
    for obj in list(LIVE):
        if isinstance(obj, RedisServer):
            obj.kill()


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d))
    return children


def descendants(pid: int) -> list[int]:
    children = _children_map()
    out: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def proc_tree_memory(pid: int) -> dict[str, float]:
    """RSS and PSS (MiB) summed over a process and its descendants."""
    rss = pss = 0
    n = 0
    for p in [pid, *descendants(pid)]:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1])
            n += 1
        except OSError:
            continue
    return {"rss_mib": rss / 1024, "pss_mib": pss / 1024, "processes": n}


# ================================================================== venvs
def parse_requirements() -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current = None
    for raw in REQS.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections[current] = []
        elif current is None:
            raise SystemExit(f"{REQS}: requirement outside a [section]: {line}")
        else:
            sections[current].append(line)
    return sections


def env_name(system: str, sections: dict[str, list[str]]) -> str:
    lines = sections.get(system, [])
    if len(lines) == 1 and lines[0].startswith("@"):
        return lines[0][1:]
    return system


def ensure_venv(name: str, lines: list[str], root: Path, install: bool) -> Path:
    venv = root / name
    py = venv / "bin" / "python"
    stamp = venv / ".bench-requirements.txt"
    want = "\n".join(line.replace("{ROOT}", str(ROOT)) for line in lines) + "\n"
    if py.exists() and stamp.exists() and stamp.read_text() == want:
        return py
    if not install:
        raise PhaseError(f"{venv} missing or out of date and --no-install given")
    log(f"installing {name} into {venv} from the package index: {' '.join(lines)}")
    if venv.exists():
        shutil.rmtree(venv)
    root.mkdir(parents=True, exist_ok=True)
    base = getattr(sys, "_base_executable", None) or sys.executable
    subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=300)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as tf:
        tf.write(want)
    try:
        r = subprocess.run(
            [str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q", "-r", tf.name],
            check=False,
            timeout=900,
            capture_output=True,
            text=True,
        )
    finally:
        os.unlink(tf.name)
    if r.returncode != 0:
        raise PhaseError(f"pip install for {name} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    stamp.write_text(want)
    return py


def pip_freeze(py: str) -> list[str]:
    try:
        r = subprocess.run(
            [py, "-m", "pip", "freeze", "--disable-pip-version-check"],
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
        )
        return [x for x in r.stdout.splitlines() if x and not x.startswith("-e")]
    except (OSError, subprocess.TimeoutExpired):
        return []


# ================================================================= systems
class System:
    def __init__(
        self, name: str, python: str, redis_url: str, logdir: Path, pythonpath: str = str(ROOT)
    ) -> None:
        self.name = name
        self.python = python
        self.logdir = logdir
        self.env = dict(os.environ)
        self.env.update(
            PYTHONPATH=pythonpath,
            PYTHONUNBUFFERED="1",
            PYTHONDONTWRITEBYTECODE="1",
            BENCH_REDIS_URL=redis_url,
        )
        self.env.pop("VIRTUAL_ENV", None)
        self.info: dict[str, Any] = {}

    def log_path(self, tag: str) -> Path:
        return self.logdir / f"{self.name}-{tag}.log"

    def cmd(self, tag: str, *args: str) -> Cmd:
        return Cmd(self, list(args), self.log_path(tag))

    def load_info(self) -> None:
        self.info = self.cmd("info", "info").result(timeout=120)
        if self.info.get("event") != "info":
            raise PhaseError(f"unexpected info reply {self.info}")

    @property
    def default_c(self) -> int:
        return int(self.info["default_concurrency"])

    @property
    def high_c(self) -> int | None:
        cap = self.info.get("max_concurrency")
        if cap is not None and int(cap) < HIGH:
            return None
        return HIGH


class Bench:
    def __init__(self, a: argparse.Namespace, redis: RedisServer) -> None:
        self.a = a
        self.redis = redis
        self.r = redis.r
        self.results: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------ helpers
    def rec(self, s: System, key: str, value: float | None, **extra: Any) -> None:
        m = self.results[s.name]["metrics"].setdefault(key, {"runs": [], "extra": []})
        m["runs"].append(value)
        # the machine is shared: when and under which load each number was taken
        extra.setdefault("at", time.strftime("%H:%M:%S", time.gmtime()))
        extra.setdefault("loadavg", " ".join(f"{x:.2f}" for x in os.getloadavg()))
        m["extra"].append(extra)

    def note(self, s: System, msg: str) -> None:
        self.results[s.name]["notes"].append(msg)
        log(f"  {s.name}: {msg}")

    def enqueue(
        self, s: System, tag: str, mode: str, n: int, workload: str, **kw: Any
    ) -> dict[str, Any]:
        args = [
            "enqueue",
            "--redis-url",
            self.redis.url,
            "--mode",
            mode,
            "--n",
            str(n),
            "--workload",
            workload,
        ]
        max_s = kw.pop("max_seconds", self.a.fill_timeout)
        args += ["--max-seconds", str(max_s)]
        for k, v in kw.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        res = s.cmd(tag, *args).result(timeout=max_s + 120)
        if res.get("event") != "enqueued":
            raise PhaseError(f"unexpected enqueue reply {res}")
        return res

    def worker(self, s: System, tag: str, concurrency: int, workload: str) -> Cmd:
        return s.cmd(
            tag,
            "worker",
            "--redis-url",
            self.redis.url,
            "--concurrency",
            str(concurrency),
            "--workload",
            workload,
        )

    def drain(self, w: Cmd, target: int, timeout: float, key: str = KEY_DONE) -> dict[str, Any]:
        """Poll the done counter until it reaches target (or timeout / worker
        death).  Throughput is measured from the first observed completion."""
        start = time.monotonic()
        first_t = None
        first_c = 0
        c = 0
        now = start
        while True:
            c = self.r.get_int(key) if key == KEY_DONE else int(self.r.cmd("SCARD", key))
            now = time.monotonic()
            if first_t is None and c > 0:
                first_t, first_c = now, c
            if c >= target or now - start > timeout or not w.alive():
                break
            time.sleep(0.01)
        res: dict[str, Any] = {
            "done": c,
            "target": target,
            "complete": c >= target,
            "startup_to_first_s": (first_t - start) if first_t else None,
            "elapsed_s": now - start,
        }
        if not w.alive() and c < target:
            res["worker_died"] = True
        if first_t is not None and now > first_t and c > first_c:
            res["rate"] = (c - first_c) / (now - first_t)
            res["seconds"] = now - first_t
        else:
            res["rate"] = None
        return res

    # ------------------------------------------------------------- phases
    def phase(self, s: System, name: str, fn: Any, *args: Any) -> None:
        t0 = time.monotonic()
        try:
            fn(s, *args)
        except PhaseError as e:
            self.note(s, f"{name}: ERROR {e}")
        except Exception as e:
            self.note(s, f"{name}: ERROR {type(e).__name__}: {e}")
        finally:
            log(f"  {s.name}: {name} done in {time.monotonic() - t0:.1f} s")

    def _process(  # noqa: PLR0917
        self, s: System, key: str, tag: str, n: int, c: int, workload: str
    ) -> None:
        w = self.worker(s, tag, c, workload)
        try:
            d = self.drain(w, n, self.a.phase_timeout)
        finally:
            w.stop()
        extra = {k: v for k, v in d.items() if k != "rate"}
        self.rec(s, key, d["rate"], concurrency=c, **extra)
        flag = (
            ""
            if d["complete"]
            else f" (PARTIAL: {d['done']}/{n} within {self.a.phase_timeout:.0f} s)"
        )
        if d["done"] > n:
            flag += f" (counter {d['done']} > {n} jobs: duplicate executions)"
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        log(f"  {s.name}: {key} c={c}: {_fmt(d['rate'])} jobs/s{flag} (load {load})")

    def p_single_then_default(self, s: System) -> None:
        """Enqueue N no-op jobs one by one, then drain them at default concurrency."""
        self.redis.flush()
        e = self.enqueue(s, "enqueue", "single", self.a.n, "noop", max_seconds=self.a.phase_timeout)
        self.rec(s, "enqueue_single", e["jobs_per_s"], n=e["n"], seconds=e["seconds"])
        log(f"  {s.name}: enqueue single: {_fmt(e['jobs_per_s'])} jobs/s ({e['n']} jobs)")
        self._process(s, "proc_default", "worker-default", e["n"], s.default_c, "noop")

    def p_batch_then_high(self, s: System) -> None:
        """Enqueue N with the batch API (or fill), then drain at concurrency 100."""
        self.redis.flush()
        if s.info.get("batch"):
            e = self.enqueue(
                s, "enqueue", "batch", self.a.n, "noop", max_seconds=self.a.phase_timeout
            )
            self.rec(s, "enqueue_batch", e["jobs_per_s"], n=e["n"], seconds=e["seconds"])
            log(f"  {s.name}: enqueue batch: {_fmt(e['jobs_per_s'])} jobs/s")
        else:
            if s.high_c is None:
                return
            e = self.enqueue(s, "enqueue", "fill", self.a.n, "noop")
        if s.high_c is not None:
            self._process(s, "proc_100", "worker-100", e["n"], s.high_c, "noop")

    def p_processing_only(self, s: System) -> None:
        """The two no-op processing rows only (queue filled with the batch API)."""
        for key, c in (("proc_default", s.default_c), ("proc_100", s.high_c)):
            if c is None:
                continue
            self.redis.flush()
            e = self.enqueue(s, "enqueue", "fill", self.a.n, "noop")
            self._process(s, key, f"worker-{key}", e["n"], c, "noop")

    def p_io(self, s: System) -> None:
        if s.high_c is None:
            return
        self.redis.flush()
        e = self.enqueue(s, "enqueue", "fill", self.a.n, "sleep")
        self._process(s, "io_100", "worker-io", e["n"], s.high_c, "sleep")

    def p_latency(self, s: System) -> None:
        self.redis.flush()
        w = self.worker(s, "worker-latency", s.default_c, "latency")
        try:
            w.wait_ready(self.a.ready_timeout)
            # warm-up: a few jobs through the whole path, then reset counters
            self.enqueue(s, "enqueue", "single", 20, "latency", rate=self.a.latency_rate)
            self.drain(w, 20, 30)
            self.r.cmd("DEL", KEY_DONE, KEY_LAT)
            n = self.a.latency_n
            e = self.enqueue(
                s,
                "enqueue",
                "single",
                n,
                "latency",
                rate=self.a.latency_rate,
                max_seconds=n / self.a.latency_rate * 3 + 30,
            )
            d = self.drain(w, e["n"], self.a.latency_drain_timeout)
        finally:
            w.stop()
        raw = self.r.cmd("LRANGE", KEY_LAT, 0, -1) or []
        lat = sorted(float(x) for x in raw)
        extra = {
            "n": e["n"],
            "completed": len(lat),
            "achieved_rate": e["jobs_per_s"],
            "target_rate": self.a.latency_rate,
            "drain_after_producer_s": d["elapsed_s"],
        }
        if d["complete"] and d["elapsed_s"] > 1.0:
            self.note(
                s,
                f"latency: did not keep up with {self.a.latency_rate:.0f} jobs/s at default "
                f"concurrency ({s.default_c}): the last job started {d['elapsed_s']:.1f} s after "
                "the producer stopped, so latency is mostly queueing time",
            )
        if not lat:
            self.note(s, "latency: no job completed")
            return
        if len(lat) < e["n"]:
            extra["partial"] = True
            self.note(
                s,
                f"latency: only {len(lat)}/{e['n']} jobs started within the drain window "
                f"(cannot sustain {self.a.latency_rate:.0f} jobs/s); "
                "percentiles are over started jobs only",
            )
        self.rec(s, "lat_p50", _pct(lat, 50), **extra)
        self.rec(s, "lat_p99", _pct(lat, 99), **extra)
        self.rec(s, "lat_max", lat[-1], **extra)
        log(
            f"  {s.name}: latency p50 {_pct(lat, 50):.2f} ms, p99 {_pct(lat, 99):.2f} ms, "
            f"max {lat[-1]:.2f} ms ({len(lat)}/{e['n']} jobs, {e['jobs_per_s']:.0f} jobs/s offered)"
        )

    def p_memory(self, s: System) -> None:
        # idle worker
        self.redis.flush()
        w = self.worker(s, "worker-mem", s.default_c, "noop")
        try:
            w.wait_ready(self.a.ready_timeout)
            time.sleep(1.0)
            m = proc_tree_memory(w.p.pid)
        finally:
            w.stop()
        self.rec(s, "rss_idle", m["pss_mib"], **m)
        # 1k backlog
        self.redis.flush()
        e = self.enqueue(s, "enqueue", "fill", 1000, "noop")
        w = self.worker(s, "worker-mem", s.default_c, "noop")
        try:
            d = self.drain(w, e["n"], self.a.phase_timeout)
        finally:
            w.stop()
        self.rec(s, "proc_backlog_1k", d["rate"], **{k: v for k, v in d.items() if k != "rate"})
        # big backlog
        self.redis.flush()
        m0 = self.redis.used_memory()
        e = self.enqueue(s, "enqueue-fill", "fill", self.a.mem_n, "noop")
        m1 = self.redis.used_memory()
        nq = e["n"]
        if nq < self.a.mem_n:
            self.note(
                s,
                f"memory: only {nq}/{self.a.mem_n} jobs queued within "
                f"--fill-timeout {self.a.fill_timeout:.0f} s",
            )
        self.rec(
            s,
            "redis_bytes_per_job",
            (m1 - m0) / nq if nq else None,
            queued=nq,
            used_memory_before=m0,
            used_memory_after=m1,
            fill_seconds=e["seconds"],
        )
        log(
            f"  {s.name}: {nq} jobs queued in {e['seconds']:.1f} s, "
            f"{(m1 - m0) / max(nq, 1):.0f} Redis bytes/job"
        )
        window_jobs = min(nq, self.a.n)
        w = self.worker(s, "worker-mem", s.default_c, "noop")
        peak: dict[str, float] = {"pss_mib": 0.0, "rss_mib": 0.0}
        stop = threading.Event()

        def sampler() -> None:
            while not stop.wait(0.25):
                if not w.alive():
                    return
                mm = proc_tree_memory(w.p.pid)
                if mm["pss_mib"] > peak["pss_mib"]:
                    peak.update(mm)

        th = threading.Thread(target=sampler, daemon=True)
        th.start()
        try:
            d = self.drain(w, window_jobs, self.a.phase_timeout)
            peak_now = proc_tree_memory(w.p.pid)
            if peak_now["pss_mib"] > peak["pss_mib"]:
                peak.update(peak_now)
        finally:
            stop.set()
            th.join(5)
            w.stop()
        self.rec(
            s,
            "proc_backlog_big",
            d["rate"],
            queued=nq,
            **{k: v for k, v in d.items() if k != "rate"},
        )
        self.rec(s, "rss_backlog", peak["pss_mib"] or None, queued=nq, **peak)
        log(
            f"  {s.name}: backlog {nq}: {_fmt(d['rate'])} jobs/s, worker PSS peak "
            f"{peak['pss_mib']:.1f} MiB (idle {m['pss_mib']:.1f} MiB)"
        )
        self.redis.flush()

    def p_recovery(self, s: System) -> None:
        c = s.high_c or s.default_c
        inflight = min(HIGH, c)
        self.redis.flush()
        w = self.worker(s, "worker-recovery", c, "hold")
        w2 = None
        try:
            w.wait_ready(self.a.ready_timeout)
            self.enqueue(s, "enqueue", "fill", inflight, "hold", hold=self.a.recovery_hold)
            deadline = time.monotonic() + 30
            while self.r.get_int(KEY_STARTED) < inflight and time.monotonic() < deadline:
                time.sleep(0.01)
            started = self.r.get_int(KEY_STARTED)
            if started < inflight:
                self.note(s, f"recovery: only {started}/{inflight} jobs in flight after 30 s")
            t_kill = time.monotonic()
            w.kill()  # kill -9 of the whole worker process group
            w2 = self.worker(s, "worker-recovery", c, "hold")  # supervisor restart
            done = 0
            while time.monotonic() - t_kill < self.a.recovery_timeout:
                done = int(self.r.cmd("SCARD", KEY_DONE_SET))
                if done >= inflight or not w2.alive():
                    break
                time.sleep(0.02)
            elapsed = time.monotonic() - t_kill
            runs = self.r.get_int(KEY_STARTED)
        finally:
            w.kill()
            if w2:
                w2.stop()
        ok = done >= inflight
        self.rec(
            s,
            "recovery_s",
            elapsed if ok else None,
            in_flight=inflight,
            killed_in_flight=started,
            recovered=done,
            executions=runs,
            hold_s=self.a.recovery_hold,
            timeout_s=self.a.recovery_timeout,
        )
        if ok:
            log(f"  {s.name}: recovery: all {inflight} done {elapsed:.1f} s after kill -9")
        else:
            log(f"  {s.name}: recovery: {done}/{inflight} done after {elapsed:.0f} s (gave up)")


def _pct(sorted_vals: list[float], p: float) -> float:
    """Nearest-rank percentile of a sorted list."""
    if not sorted_vals:
        return float("nan")
    k = max(0, min(len(sorted_vals) - 1, int(-(-p * len(sorted_vals) // 100)) - 1))
    return sorted_vals[k]


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:,.0f}"


# ================================================================ reporting
def summarize(results: dict[str, dict[str, Any]]) -> None:
    for sysres in results.values():
        for m in sysres["metrics"].values():
            vals = [v for v in m["runs"] if v is not None]
            m["median"] = statistics.median(vals) if vals else None


def best_peer(results: dict[str, dict[str, Any]], key: str) -> tuple[str | None, float | None]:
    hib = METRIC_INFO[key][2]
    best: tuple[str | None, float | None] = (None, None)
    for name, r in results.items():
        if name in NOT_PEERS or r.get("status") != "ok":
            continue
        v = r["metrics"].get(key, {}).get("median")
        if v is None:
            continue
        if best[1] is None or (v > best[1] if hib else v < best[1]):
            best = (name, v)
    return best


def ratio(v: float | None, best: float | None, hib: bool) -> float | None:
    """>1 means better than the best peer."""
    if v is None or best is None or v == 0 or best == 0:
        return None
    return v / best if hib else best / v


def fmt_value(v: float | None, unit: str) -> str:
    if v is None:
        return "—"
    if unit == "jobs/s":
        return f"{v:,.0f}"
    if unit == "ms":
        return f"{v:.3g}" if v < 100 else f"{v:,.0f}"
    if unit == "B":
        return f"{v:,.0f}"
    if unit == "MiB":
        return f"{v:.1f}"
    if unit == "s":
        return f"{v:.1f}"
    return f"{v:g}"


def cell(results: dict[str, Any], name: str, key: str) -> str:
    _label, unit, hib = METRIC_INFO[key]
    r = results[name]
    if r.get("status") != "ok":
        return "skipped"
    m = r["metrics"].get(key)
    if not m:
        return "—" if name in PROC_ONLY else "n/a"
    v = m.get("median")
    if v is None:
        if key == "recovery_s" and m["extra"]:
            x = m["extra"][-1]
            return f"> {x['timeout_s']:.0f} ({x['recovered']}/{x['in_flight']} done)"
        return "—"
    _, bv = best_peer(results, key)
    rr = ratio(v, bv, hib)
    flags = ""
    extras = m.get("extra", [])
    if any(e.get("partial") or e.get("complete") is False for e in extras):
        flags += " †"
    if key == "recovery_s" and extras:
        x = extras[-1]
        if x.get("in_flight") != HIGH:
            flags += f" ({x['in_flight']} in flight)"
    s = fmt_value(v, unit) + flags
    if rr is not None:
        s += f" ({_fmt_ratio(rr)})"
    return s


def _fmt_ratio(rr: float) -> str:
    return f"{rr:.2f}×" if rr >= 0.1 else f"{rr:.2g}×"


GOALS = {"proc_default": 0.75, "proc_100": 0.90}  # issue #17: jobqd / reference


def _runs(results: dict[str, Any], name: str, key: str) -> list[float | None]:
    r = results.get(name, {})
    if r.get("status") != "ok":
        return []
    return list(r.get("metrics", {}).get(key, {}).get("runs", []))


def _paired(a: list[float | None], b: list[float | None]) -> list[float]:
    """Per-repeat ratios a/b (the two ran minutes apart in the same repeat)."""
    return [x / y for x, y in zip(a, b, strict=False) if x and y]


def reference_lines(results: dict[str, Any]) -> list[str]:
    """jobqd as a fraction of the reference Streams worker, and jobqd on redis-py 5.3.1."""
    rows = []
    for key in ("proc_default", "proc_100"):
        jq, ref, r5 = (_runs(results, n, key) for n in ("jobqd", REFERENCE, "jobqd_redis5"))
        if not jq or not (ref or r5):
            continue
        jm = _median(jq)
        conc = results["jobqd"]["metrics"][key]["extra"][0].get("concurrency")
        row = [f"{METRIC_INFO[key][0]} (consumers {conc})", fmt_value(jm, "jobs/s")]
        if ref:
            rm = _median(ref)
            pr = _paired(jq, ref)
            row += [fmt_value(rm, "jobs/s"),
                    f"{jm / rm:.0%}" if jm and rm else "—",
                    ", ".join(f"{x:.0%}" for x in pr) or "—",
                    f"≥ {GOALS[key]:.0%}"]
        else:
            row += ["—"] * 4
        if r5:
            r5m = _median(r5)
            row += [fmt_value(r5m, "jobs/s"), f"{r5m / jm:.2f}×" if r5m and jm else "—"]
        else:
            row += ["—", "—"]
        rows.append("| " + " | ".join(row) + " |")
    if not rows:
        return []
    ver = results.get("jobqd", {}).get("info", {}).get("redis_py", "?")
    ver5 = results.get("jobqd_redis5", {}).get("info", {}).get("redis_py", "5.3.1")
    return [
        "",
        "## jobqd vs the reference Streams worker, and on both redis-py versions",
        "",
        "The reference (`bench/drivers/reference_driver.py`) is the least a Python worker "
        "does per job for this job body: XREADGROUP COUNT C, the C jobs concurrently, XACK "
        "pipelined with the next fetch; it ran right after jobqd in every repeat, at the "
        "same concurrency. Per-repeat ratios pair the runs of the same repeat.",
        "",
        f"| row | jobqd (redis-py {ver}) | reference | jobqd / reference (medians) | "
        f"per repeat | goal (#17) | jobqd on redis-py {ver5} | redis-py {ver5} / {ver} |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]


def _median(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def write_markdown(path: Path, data: dict[str, Any]) -> None:
    results = data["systems"]
    meta = data["meta"]
    names = [n for n in data["order"] if n in results]
    lines = ["# jobqd vs peers: benchmark results", ""]
    lines.append(
        f"Run {meta['started']} ({meta['duration_s'] / 60:.1f} min), mode **{meta['mode']}**, "
        f"{meta['args']['repeats']} repeat(s) of the throughput/latency phases (medians shown), "
        f"N = {meta['args']['n']:,} jobs, latency: {meta['args']['latency_n']:,} jobs at "
        f"{meta['args']['latency_rate']:.0f} jobs/s."
    )
    mch = meta["machine"]
    lines.append(
        f"Machine: {mch['nproc']} CPUs ({mch['cpu_model']}), {mch['mem_gib']:.0f} GiB RAM, "
        f"{mch['platform']}; Python {mch['python']}; Redis {mch['redis_version']} "
        f"({meta['redis']}); load average at start {mch['loadavg_start']}, "
        f"at end {mch.get('loadavg_end')}."
    )
    lines += [
        "",
        "The number in parentheses is the ratio to the **best peer** in this run for that row, "
        "oriented so that above 1.00× is better than the best peer (for lower-is-better rows it is "
        "best ÷ value).  ↑ higher is better, ↓ lower is better.  † = not all jobs finished within "
        "the phase time limit (see notes).  — = not applicable or not measured.",
        "",
    ]
    header = ["metric", *names, "best peer", "jobqd vs best peer"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for key, label, unit, hib in METRICS:
        if not any(results[n].get("metrics", {}).get(key) for n in names):
            continue
        bn, bv = best_peer(results, key)
        row = [f"{label} ({unit}) {'↑' if hib else '↓'}"]
        row += [cell(results, n, key) for n in names]
        row.append(f"{bn} ({fmt_value(bv, unit)})" if bn else "—")
        jq = results.get("jobqd", {})
        jv = jq.get("metrics", {}).get(key, {}).get("median") if jq.get("status") == "ok" else None
        rr = ratio(jv, bv, hib)
        row.append(_fmt_ratio(rr) if rr is not None else "—")
        lines.append("| " + " | ".join(row) + " |")
    lines += reference_lines(results)
    lines += ["", "## Settings per system", ""]
    lines.append(
        "| system | version | default concurrency | concurrency 100 | batch API | I/O job | notes |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    for n in names:
        r = results[n]
        inf = r.get("info", {})
        if r.get("status") != "ok":
            lines.append(f"| {n} | — | — | — | — | — | skipped: {r.get('status')} |")
            continue
        cap = inf.get("max_concurrency")
        high = f"n/a (max {cap})" if cap is not None and int(cap) < HIGH else str(HIGH)
        lines.append(
            f"| {n} | {inf.get('version')} | {inf.get('default_concurrency')} | {high} | "
            f"{inf.get('batch_api') or '—'} | {inf.get('sleep_impl')} | {inf.get('notes')} |"
        )
    lines += ["", "## Method", ""]
    lines += [
        "- One Redis server for all systems, flushed before every phase; systems run one at a "
        "time, each worker as its own process (process group), the producer as another process.",
        "- Enqueue: one producer process, N no-op jobs, one call per job (`single`) or the "
        "library's batch API in chunks of 1,000 (`batch`); time of the enqueue loop only.",
        "- Processing: queue pre-filled with N no-op jobs (each INCRs a counter), then one worker "
        "is started; rate = jobs finished / time, from the first finished job to the last "
        "(worker start-up excluded), counter polled every 10 ms.",
        "- I/O-bound: N jobs that each sleep 1 ms (asyncio where the library runs coroutines, "
        "time.sleep in a pool thread otherwise) then INCR; concurrency 100.",
        "- Latency: worker at default concurrency, warmed up with 20 jobs; then jobs enqueued at a "
        "steady rate; each handler records time.time() at handler start minus time.time() taken "
        "just before the enqueue call.",
        "- Memory: worker memory is PSS summed over the worker's process tree (RSS double-counts "
        "forked children); idle = 1 s after ready on an empty queue; big backlog = peak while "
        "working through the first N jobs of the big backlog.  Redis bytes per job = "
        "`used_memory` growth ÷ jobs queued.",
        "- Recovery: worker at concurrency 100 (or its maximum) runs `hold` jobs of "
        f"{meta['args']['recovery_hold']} s; when all are in flight the worker's whole process "
        "tree gets SIGKILL and a new worker is started at once (as a supervisor would); "
        "time from the kill until every job has finished, each library with its default "
        "redelivery settings.",
        "- All library logging at WARNING.",
    ]
    notes = [(n, x) for n in names for x in results[n].get("notes", [])]
    if notes:
        lines += ["", "## Notes from this run", ""]
        lines += [f"- **{n}**: {x}" for n, x in notes]
    lines += ["", "Reproduce: `" + meta["command"] + "`", "", "![chart](chart.png)", ""]
    path.write_text("\n".join(lines))


def write_chart(path: Path, data: dict[str, Any]) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: chart skipped (pip install matplotlib)"
    results = data["systems"]
    names = [n for n in data["order"] if results.get(n, {}).get("status") == "ok"]
    if not names:
        return "no system measured: chart skipped"
    panels = [
        (
            "Enqueue (jobs/s, higher is better)",
            ["enqueue_single", "enqueue_batch"],
            ["one by one", "batch API"],
            False,
        ),
        (
            "Processing (jobs/s, higher is better)",
            ["proc_default", "proc_100", "io_100"],
            ["no-op, default conc.", "no-op, conc. 100", "sleep 1 ms, conc. 100"],
            False,
        ),
        (
            "Latency at steady rate (ms, lower is better)",
            ["lat_p50", "lat_p99", "lat_max"],
            ["p50", "p99", "max"],
            True,
        ),
        (
            "Backlog (jobs/s, higher is better)",
            ["proc_backlog_1k", "proc_backlog_big"],
            ["1k queued", "big backlog"],
            False,
        ),
        (
            "Memory (lower is better)",
            ["rss_idle", "rss_backlog"],
            ["worker MiB idle", "worker MiB backlog"],
            False,
        ),
        (
            "Redis bytes per queued job (lower is better)",
            ["redis_bytes_per_job"],
            ["bytes/job"],
            False,
        ),
        ("Recovery after kill -9 (s, lower is better)", ["recovery_s"], ["seconds"], False),
    ]
    panels = [
        p
        for p in panels
        if any(results[n]["metrics"].get(k, {}).get("median") for n in names for k in p[1])
    ]
    if not panels:
        return "nothing to chart"
    cols = 2
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 3.6 * rows), squeeze=False)
    import numpy as np  # matplotlib depends on numpy

    x = np.arange(len(names))
    for ax, (title, keys, labels, logy) in zip(axes.flat, panels, strict=False):
        width = 0.8 / len(keys)
        for i, (k, lab) in enumerate(zip(keys, labels, strict=False)):
            vals = [results[n]["metrics"].get(k, {}).get("median") for n in names]
            # a recovery that gave up is drawn at its time limit, hatched: "> limit",
            # never as an empty bar that would read as the best result
            gave_up = [k == "recovery_s" and v is None and bool(
                results[n]["metrics"].get(k, {}).get("extra")) for n, v in zip(names, vals,
                                                                                 strict=False)]
            limits = [results[n]["metrics"][k]["extra"][-1]["timeout_s"] if g else None
                      for n, g in zip(names, gave_up, strict=False)]
            ys = [v if v is not None else (lim or 0) for v, lim in zip(vals, limits, strict=False)]
            bars = ax.bar(x + (i - (len(keys) - 1) / 2) * width, ys, width, label=lab)
            for b, g, lim in zip(bars, gave_up, limits, strict=False):
                if g:
                    b.set_hatch("//")
                    b.set_alpha(0.5)
                    ax.annotate(f"> {lim:.0f} s\nnot recovered",
                                (b.get_x() + b.get_width() / 2, b.get_height()),
                                ha="center", va="bottom", fontsize=7)
            if any(gave_up):
                ax.set_ylim(0, max(ys) * 1.3)  # room for the "> limit" labels
            for b, v, g in zip(bars, vals, gave_up, strict=False):
                if v is None and not g:
                    ax.annotate(
                        "n/a",
                        (b.get_x() + b.get_width() / 2, 0),
                        ha="center",
                        va="bottom",
                        fontsize=7,
                    )
        if logy:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=20, fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    meta = data["meta"]
    fig.suptitle(
        f"jobqd vs peers — {meta['mode']} run, N={meta['args']['n']:,}, medians of "
        f"{meta['args']['repeats']} run(s), {meta['machine']['nproc']} CPUs, "
        f"Redis {meta['machine']['redis_version']}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def machine_info() -> dict[str, Any]:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = 0.0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return {
        "nproc": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "mem_gib": mem,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "orchestrator_python": sys.executable,
        "loadavg_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


# ===================================================================== main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: N=200, 1 repeat, latency 200 jobs, no memory/recovery phases",
    )
    p.add_argument(
        "--systems", default=",".join(ALL_SYSTEMS), help="comma-separated (default: all)"
    )
    p.add_argument(
        "--repeats", type=int, help="repeats of the throughput/latency phases (default 3; quick 1)"
    )
    p.add_argument("--n", type=int, help="jobs per throughput phase (default 20000; quick 200)")
    p.add_argument(
        "--latency-n", type=int, help="jobs in the latency phase (default 5000; quick 200)"
    )
    p.add_argument(
        "--latency-rate", type=float, default=500.0, help="jobs/s offered in the latency phase"
    )
    p.add_argument("--mem-n", type=int, default=1_000_000, help="jobs queued for the memory phase")
    p.add_argument(
        "--phases",
        default="core,memory,recovery",
        help="which phase groups to run (core = enqueue/processing/I-O/latency)",
    )
    p.add_argument(
        "--skip-memory", action="store_true", help="same as leaving memory out of --phases"
    )
    p.add_argument(
        "--skip-recovery", action="store_true", help="same as leaving recovery out of --phases"
    )
    p.add_argument(
        "--recovery-hold", type=float, default=2.0, help="seconds each recovery job runs"
    )
    p.add_argument(
        "--recovery-timeout", type=float, default=120.0, help="give up recovery after this"
    )
    p.add_argument(
        "--phase-timeout", type=float, help="max seconds to drain a queue (default 120; quick 30)"
    )
    p.add_argument(
        "--latency-drain-timeout",
        type=float,
        help="max seconds after the latency producer (default 30; quick 10)",
    )
    p.add_argument(
        "--fill-timeout", type=float, default=600.0, help="max seconds to pre-fill a queue"
    )
    p.add_argument("--ready-timeout", type=float, default=60.0)
    p.add_argument(
        "--redis-url", help="use this loopback Redis DB (it is FLUSHDB'd) instead of starting one"
    )
    p.add_argument(
        "--redis-port", type=int, default=6390, help="port for our own redis-server (if free)"
    )
    p.add_argument("--out", help="results dir (default bench/results, quick: bench/results/quick)")
    p.add_argument(
        "--peers-venv", default=str(BENCH / ".venv-peers"), help="root of the peer venvs"
    )
    p.add_argument(
        "--jobqd-python",
        help="python with jobqd installed (default: ./.venv/bin/python or this one)",
    )
    p.add_argument(
        "--jobqd-src",
        help="import jobqd from this checkout instead of this one (the harness stays this "
        "one; bench/compare_revisions.py uses it)",
    )
    p.add_argument("--no-install", action="store_true", help="do not create/update peer venvs")
    p.add_argument(
        "--render",
        metavar="RESULTS_JSON",
        help="only rewrite results.md and chart.png next to this results.json (no measuring)",
    )
    a = p.parse_args(argv)
    q = a.quick
    a.repeats = a.repeats or (1 if q else 3)
    a.n = a.n or (200 if q else 20_000)
    a.latency_n = a.latency_n or (200 if q else 5_000)
    a.phase_timeout = a.phase_timeout or (30.0 if q else 120.0)
    a.latency_drain_timeout = a.latency_drain_timeout or (10.0 if q else 30.0)
    a.phases = {x.strip() for x in a.phases.split(",") if x.strip()}
    if a.phases - {"core", "memory", "recovery"}:
        p.error(f"unknown phase(s) {sorted(a.phases - {'core', 'memory', 'recovery'})}")
    if q or a.skip_memory:
        a.phases.discard("memory")
    if q or a.skip_recovery:
        a.phases.discard("recovery")
    a.out = Path(a.out) if a.out else (BENCH / "results" / ("quick" if q else ""))
    a.systems = [x.strip() for x in a.systems.split(",") if x.strip()]
    for x in a.systems:
        if x not in ALL_SYSTEMS and not (DRIVERS / f"{x}_driver.py").exists():
            p.error(f"unknown system {x!r} (no bench/drivers/{x}_driver.py)")
    return a


_SRC_DIRS: list[str] = []


def pythonpath(system: str, jobqd_src: str | None) -> str:
    """PYTHONPATH of a driver: this checkout, or for jobqd's own drivers with
    --jobqd-src a directory where `bench` is this checkout's and `jobqd` the other's,
    so two revisions of jobqd run under exactly the same harness and drivers."""
    if not jobqd_src or not system.startswith("jobqd"):
        return str(ROOT)
    if not _SRC_DIRS:
        d = tempfile.mkdtemp(prefix="bench-jobqd-src-")
        os.symlink(BENCH, os.path.join(d, "bench"))
        os.symlink(Path(jobqd_src).resolve() / "jobqd", os.path.join(d, "jobqd"))
        atexit.register(shutil.rmtree, d, True)
        _SRC_DIRS.append(d)
    return _SRC_DIRS[0]


def render(results_json: Path) -> int:
    data = json.loads(results_json.read_text())
    out = results_json.parent
    write_markdown(out / "results.md", data)
    warn = write_chart(out / "chart.png", data)
    if warn:
        log(f"WARNING: {warn}")
    log(f"rewrote {out / 'results.md'}" + ("" if warn else f" and {out / 'chart.png'}"))
    return 0


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.render:
        return render(Path(a.render))
    started = time.time()
    started_iso = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    a.out.mkdir(parents=True, exist_ok=True)
    logdir = BENCH / ".logs"
    logdir.mkdir(exist_ok=True)
    for old in logdir.glob("*.log"):
        old.unlink()

    atexit.register(cleanup)

    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)

    machine = machine_info()
    results: dict[str, dict[str, Any]] = {}
    order = list(a.systems)
    redis: RedisServer | None = None
    interrupted = None
    try:
        redis = RedisServer(a.redis_url, a.redis_port)
        machine["redis_version"] = redis.version()
        log(
            f"Redis {machine['redis_version']} at {redis.url} "
            f"({'own server' if redis.own else 'external'})"
        )
        sections = parse_requirements()
        systems: list[System] = []
        for name in a.systems:
            results[name] = {"status": "ok", "metrics": {}, "notes": [], "info": {}}
            driver = DRIVERS / f"{name}_driver.py"
            if not driver.exists():
                results[name]["status"] = f"no driver (bench/drivers/{name}_driver.py missing)"
                log(f"SKIP {name}: {results[name]['status']}")
                continue
            try:
                if name in sections:
                    envn = env_name(name, sections)
                    py = str(
                        ensure_venv(envn, sections[envn], Path(a.peers_venv), not a.no_install)
                    )
                else:
                    py = a.jobqd_python or (
                        str(ROOT / ".venv" / "bin" / "python")
                        if (ROOT / ".venv" / "bin" / "python").exists()
                        else sys.executable
                    )
                s = System(name, py, redis.url, logdir, pythonpath(name, a.jobqd_src))
                s.load_info()
            except (PhaseError, subprocess.SubprocessError, OSError) as e:
                msg = str(e).strip().splitlines()
                tail = ""
                lp = logdir / f"{name}-info.log"
                if lp.exists():
                    tail = " | ".join(lp.read_text().strip().splitlines()[-3:])
                results[name]["status"] = (
                    f"driver failed to load: {msg[0] if msg else e} {tail}".strip()
                )
                log(f"SKIP {name}: {results[name]['status']}")
                continue
            results[name]["info"] = s.info
            results[name]["python"] = py
            results[name]["freeze"] = pip_freeze(py)
            log(f"{name} {s.info.get('version')} ready (python {py})")
            systems.append(s)

        b = Bench(a, redis)
        b.results = results
        for rep in range(a.repeats if "core" in a.phases else 0):
            for s in systems:
                log(f"--- repeat {rep + 1}/{a.repeats}: {s.name}")
                if s.name in PROC_ONLY:
                    b.phase(s, "processing default + 100", b.p_processing_only)
                    continue
                b.phase(s, "enqueue single + processing default", b.p_single_then_default)
                b.phase(s, "enqueue batch + processing 100", b.p_batch_then_high)
                b.phase(s, "I/O-bound 100", b.p_io)
                b.phase(s, "latency", b.p_latency)
        if "memory" in a.phases:
            for s in (s for s in systems if s.name not in PROC_ONLY):
                log(f"--- memory: {s.name} ({a.mem_n:,} jobs)")
                b.phase(s, "memory", b.p_memory)
        if "recovery" in a.phases:
            for s in (s for s in systems if s.name not in PROC_ONLY):
                log(f"--- recovery: {s.name}")
                b.phase(s, "recovery", b.p_recovery)
    except KeyboardInterrupt as e:
        interrupted = str(e) or "interrupted"
        log(f"interrupted ({interrupted}); writing partial results")
    finally:
        cleanup()
        if redis:
            redis.kill()

    summarize(results)
    machine["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    data = {
        "meta": {
            "started": started_iso,
            "duration_s": time.time() - started,
            "mode": "quick" if a.quick else "full",
            "command": "python bench/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "args": {
                k: (str(v) if isinstance(v, Path) else sorted(v) if isinstance(v, set) else v)
                for k, v in vars(a).items()
            },
            "machine": machine,
            "redis": "own redis-server on 127.0.0.1, no persistence"
            if not a.redis_url
            else a.redis_url,
            "interrupted": interrupted,
            "requirements_sha256": hashlib.sha256(REQS.read_bytes()).hexdigest(),
        },
        "order": order,
        "metrics": {
            k: {"label": lab, "unit": u, "higher_is_better": h} for k, lab, u, h in METRICS
        },
        "systems": results,
    }
    (a.out / "results.json").write_text(json.dumps(data, indent=1, default=str))
    write_markdown(a.out / "results.md", data)
    warn = write_chart(a.out / "chart.png", data)
    if warn:
        log(f"WARNING: {warn}")
    log(
        f"wrote {a.out / 'results.md'}, {a.out / 'results.json'}"
        + ("" if warn else f", {a.out / 'chart.png'}")
    )
    skipped = [n for n, r in results.items() if r["status"] != "ok"]
    if skipped:
        log("skipped: " + "; ".join(f"{n}: {results[n]['status']}" for n in skipped))
    print((a.out / "results.md").read_text())
    measured = [n for n, r in results.items() if r["status"] == "ok"]
    return 130 if interrupted else (0 if measured else 1)


if __name__ == "__main__":
    sys.exit(main())
