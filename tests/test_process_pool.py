"""executor: process — handlers in worker processes owned by the daemon.

Daemons run as real subprocesses against the real Redis: children are killed by
timeouts, by the drain and from outside, and exit on their own; every job must
still end as the contract says, and only the job whose child died is affected.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from jobqd import SyncClient, config
from jobqd.errors import ConfigError, UnknownTask
from jobqd.jobs import JobInfo

from .conftest import REDIS_URL, DaemonProcess, base_config, wait_until

FAST = {"heartbeat": {"interval_s": 0.5, "timeout_s": 2},
        "reaper": {"interval_s": 0.5, "visibility_timeout_s": 30, "max_deliveries": 3}}
BACKOFF = {"base_s": 0.01, "max_s": 0.05}


def proc_tasks(**extra: Any) -> dict[str, Any]:
    h = "tests.handlers:"
    tasks: dict[str, Any] = {
        "proc_info": {"handler": h + "proc_info", "executor": "process"},
        "cpu_burn": {"handler": h + "cpu_burn", "executor": "process", "max_retries": 0},
        "proc_exit": {"handler": h + "proc_exit", "executor": "process"},
        "proc_wait": {"handler": h + "proc_wait", "executor": "process"},
        "proc_fail": {"handler": h + "proc_fail", "executor": "process", "max_retries": 1,
                      "retry_backoff": BACKOFF},
        "proc_fail_now": {"handler": h + "proc_fail_now", "executor": "process"},
        "proc_retry": {"handler": h + "proc_retry", "executor": "process"},
        "proc_unserialisable": {"handler": h + "proc_unserialisable", "executor": "process"},
        "alloc_mb": {"handler": h + "alloc_mb", "executor": "process"},
        "proc_ignore_term": {"handler": h + "proc_ignore_term", "executor": "process",
                             "max_retries": 0},
    }
    for name, over in extra.items():
        tasks[name] = {**tasks[name], **over}
    return tasks




def status(c: SyncClient, job_id: str, want: str, timeout: float = 20.0) -> JobInfo:
    info: list[JobInfo] = []

    def check() -> bool:
        info[:] = [c.status(job_id)]
        return info[0].status == want

    try:
        wait_until(check, timeout, f"{job_id} {want}")
    except AssertionError:
        raise AssertionError(f"{info} is not {want}") from None
    return info[0]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def pids(r: redis.Redis, key: str) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in r.hgetall(key + ":pids").items()}


def run_one(c: SyncClient, task: str, args: dict[str, Any], want: str = "succeeded",
            timeout: float = 20.0) -> JobInfo:
    return status(c, c.enqueue(task, args).id, want, timeout)


def start(spawn: Callable[[Path], DaemonProcess], write_config: Callable[..., Path],
          prefix: str, **over: Any) -> DaemonProcess:
    over.setdefault("tasks", proc_tasks())
    d = spawn(write_config(**{**FAST, **over}))
    d.wait_ready(prefix)
    return d


# ------------------------------------------------------------------ config


def _cfg(tmp_path: Path, prefix: str, **over: Any) -> Path:
    import yaml

    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(base_config(prefix, **over)))
    return p


@pytest.mark.parametrize(("handler", "executor", "words"), [
    ("tests.handlers:record", "process", "async def"),
    ("tests.handlers:record", "thread", "async def"),
    ("tests.handlers:proc_info", "async", "plain def"),
    ("tests.handlers:proc_info", "fork", "async, thread or process"),
])
def test_executor_must_fit_the_handler(tmp_path: Path, handler: str, executor: str,
                                       words: str) -> None:
    p = _cfg(tmp_path, "x", tasks={"t": {"handler": handler, "executor": executor}})
    with pytest.raises(ConfigError) as e:
        config.load(p)
    assert e.value.key == "tasks.t.executor" and words in str(e.value)


def test_executor_defaults_and_process_pool_settings(tmp_path: Path) -> None:
    p = _cfg(tmp_path, "x", tasks={"a": {"handler": "tests.handlers:record"},
                                   "t": {"handler": "tests.handlers:proc_info"},
                                   "p": {"handler": "tests.handlers:proc_info",
                                         "executor": "process"}},
             process_pool={"size": 2, "max_tasks_per_child": 10, "kill_grace_s": 0.5})
    cfg = config.load(p)
    assert [cfg.tasks[n].kind for n in "atp"] == ["async", "thread", "process"]
    assert cfg.process_pool == config.ProcessPoolConfig(size=2, max_tasks_per_child=10,
                                                        kill_grace_s=0.5)
    with pytest.raises(ConfigError) as e:
        config.load(_cfg(tmp_path, "x", process_pool={"size": 0}))
    assert e.value.key == "process_pool.size"
    with pytest.raises(ConfigError) as e:
        config.load(_cfg(tmp_path, "x", process_pool={"max_memory_mb": "lots"}))
    assert e.value.key == "process_pool.max_memory_mb"


# ------------------------------------------------------------------ pure parts


def test_replies_become_results_or_the_exceptions_they_stand_for() -> None:
    from jobqd.errors import Fail, Retry
    from jobqd.process_pool import HandlerError, _outcome

    assert _outcome({"ok": None}) is None
    assert _outcome({"ok": {"a": [1]}}) == {"a": [1]}
    with pytest.raises(Retry) as r:
        _outcome({"retry": "2.5", "reason": "later"})
    assert (r.value.delay_s, r.value.reason) == (2.5, "later")
    with pytest.raises(Retry) as r:
        _outcome({"retry": "inf", "reason": "x"})  # validated by execute, as for async
    assert r.value.delay_s == float("inf")
    with pytest.raises(Retry) as r:
        _outcome({"retry": None, "reason": "x"})
    assert r.value.delay_s is None
    with pytest.raises(Fail, match="nope"):
        _outcome({"fail": "nope"})
    for reply, dead in (({"bad_result": "not JSON"}, "bad_result"),
                        ({"error": "TypeError: x", "tb": "tb", "bad_args": "missing 'a'"},
                         "bad_args"),
                        ({"error": "ValueError: boom", "tb": "Traceback...", "bad_args": None},
                         None)):
        with pytest.raises(HandlerError) as e:
            _outcome(reply)
        assert e.value.dead == dead
    assert e.value.error == "ValueError: boom" and e.value.tb == "Traceback..."


def test_exit_text_and_rss() -> None:
    from jobqd.process_pool import exit_text, rss_mb

    assert exit_text(-9) == "killed by SIGKILL"
    assert exit_text(1) == "exited with code 1"
    assert exit_text(None) == "did not exit"
    mine = rss_mb(os.getpid())
    assert mine is not None and mine > 1
    assert rss_mb(2 ** 22 + 12345) is None  # above pid_max: no such process


# ------------------------------------------------------------------ results and errors


def test_results_errors_and_current_job_come_back_from_the_child(
        write_config: Callable[..., Path], spawn: Callable[[Path], DaemonProcess],
        prefix: str) -> None:
    d = start(spawn, write_config, prefix, process_pool={"size": 2})
    with SyncClient(REDIS_URL, prefix) as c:
        job = c.enqueue("proc_info", {})
        info = status(c, job.id, "succeeded")
        assert info.result["pid"] not in (d.pid, os.getpid())
        assert info.result["id"] == job.id
        assert (info.result["task"], info.result["queue"], info.result["attempt"]) == \
            ("proc_info", "default", 1)

        failed = run_one(c, "proc_fail", {"reason": "proc boom"}, "dead")
        assert (failed.reason, failed.attempts) == ("max_retries", 2)
        assert failed.error == "ValueError: proc boom"
        assert failed.traceback is not None and "in proc_fail" in failed.traceback \
            and "raise ValueError(reason)" in failed.traceback

        assert run_one(c, "proc_fail_now", {"reason": "nope"}, "dead").reason == "failed"
        assert run_one(c, "proc_retry", {"delay_s": 0.05}).result == 2
        bad = run_one(c, "proc_info", {"nope": 1}, "dead")
        assert bad.reason == "bad_args" and "'nope'" in (bad.error or "")
        assert run_one(c, "proc_unserialisable", {}, "dead").reason == "bad_result"
    assert d.proc is not None and d.proc.poll() is None


# ------------------------------------------------------------------ hard timeout


def test_timeout_kills_the_child_and_fails_the_job(
        write_config: Callable[..., Path], spawn: Callable[[Path], DaemonProcess],
        prefix: str, sync_r: redis.Redis) -> None:
    key = f"{prefix}:burn"
    start(spawn, write_config, prefix, process_pool={"size": 1, "kill_grace_s": 0.5},
          tasks=proc_tasks(cpu_burn={"timeout_s": 1, "max_retries": 1,
                                     "retry_backoff": BACKOFF}))
    with SyncClient(REDIS_URL, prefix) as c:
        info = run_one(c, "cpu_burn", {"seconds": 60, "key": key}, "dead", timeout=30)
        assert (info.reason, info.attempts) == ("timeout", 2)
        assert sync_r.hget(key, info.id) == b"2"  # retried once, per policy
        pid = pids(sync_r, key)[info.id]  # the child of the last attempt
        wait_until(lambda: not pid_alive(pid), 10, f"the timed-out child {pid} gone")
        # the child was replaced: the pool still runs jobs
        assert run_one(c, "proc_info", {}).result["pid"] != pid


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace(
        write_config: Callable[..., Path], spawn: Callable[[Path], DaemonProcess],
        prefix: str, sync_r: redis.Redis) -> None:
    key = f"{prefix}:k"
    start(spawn, write_config, prefix, process_pool={"size": 1, "kill_grace_s": 0.5},
          tasks=proc_tasks(proc_ignore_term={"timeout_s": 1}))
    with SyncClient(REDIS_URL, prefix) as c:
        info = run_one(c, "proc_ignore_term", {"key": key}, "dead")
        assert info.reason == "timeout"
        pid = pids(sync_r, key)[info.id]
        wait_until(lambda: not pid_alive(pid), 10, f"child {pid} gone")
        assert run_one(c, "proc_info", {}).status == "succeeded"


def test_drain_during_a_timeout_kill_still_kills_and_hands_back(
        write_config: Callable[..., Path], spawn: Callable[[Path], DaemonProcess],
        prefix: str, sync_r: redis.Redis) -> None:
    """The drain's cancellation cuts the timeout's SIGTERM grace short: SIGKILL at once,
    and the pool's books stay right (the daemon exits 0)."""
    key = f"{prefix}:k"
    d = start(spawn, write_config, prefix, process_pool={"size": 1, "kill_grace_s": 30},
              tasks=proc_tasks(proc_ignore_term={"timeout_s": 1}),
              shutdown={"drain_timeout_s": 0.2, "handback_timeout_s": 5})
    with SyncClient(REDIS_URL, prefix) as c:
        job = c.enqueue("proc_ignore_term", {"key": key})
        wait_until(lambda: job.id in pids(sync_r, key), 20, "the job started")
        pid = pids(sync_r, key)[job.id]
        time.sleep(1.5)  # past its timeout: SIGTERM sent (ignored), 30 s grace running
        assert pid_alive(pid)
        d.signal(signal.SIGTERM)
        assert d.wait(20) == 0, d.log()
        assert not pid_alive(pid)
        assert c.status(job.id).status in ("queued", "scheduled")


# ------------------------------------------------------------------ children that die


def test_dying_children_fail_only_their_own_job(
        write_config: Callable[..., Path], spawn: Callable[[Path], DaemonProcess],
        prefix: str, sync_r: redis.Redis) -> None:
    key = f"{prefix}:k"
    d = start(spawn, write_config, prefix, process_pool={"size": 2},
              reaper={**FAST["reaper"], "max_deliveries": 2})
    with SyncClient(REDIS_URL, prefix) as c:
        # os._exit(1) in the child, every time: lost twice -> dead worker_lost
        exiting = c.enqueue("proc_exit", {"code": 1, "key": key})
        # SIGKILL from outside while the job runs: lost once, then it succeeds
        waiting = c.enqueue("proc_wait", {"key": key})
        others = [c.enqueue("proc_info", {}) for _ in range(10)]
        wait_until(lambda: waiting.id in pids(sync_r, key), 20, "proc_wait started")
        victim = pids(sync_r, key)[waiting.id]
        os.kill(victim, signal.SIGKILL)

        dead = status(c, exiting.id, "dead")
        assert (dead.reason, dead.lost) == ("worker_lost", 2)
        assert "exited with code 1" in (dead.error or "")
        assert sync_r.hget(key, exiting.id) == b"2"
        ok = status(c, waiting.id, "succeeded")
        assert ok.lost == 1 and ok.attempts == 1  # a lost delivery is no failed attempt
        assert ok.result != victim and sync_r.hget(key, waiting.id) == b"2"
        for j in others:
            assert status(c, j.id, "succeeded").result["pid"] != victim
        assert run_one(c, "proc_info", {}).status == "succeeded"
    assert d.proc is not None and d.proc.poll() is None and not pid_alive(victim)


# ------------------------------------------------------------------ recycling


def test_max_tasks_per_child_recycles(
        write_config: Callable[..., Path], spawn: Callable[[Path], DaemonProcess],
        prefix: str) -> None:
    start(spawn, write_config, prefix, process_pool={"size": 1, "max_tasks_per_child": 2})
    with SyncClient(REDIS_URL, prefix) as c:
        seen = [run_one(c, "proc_info", {}).result["pid"] for _ in range(5)]
    assert seen[0] == seen[1] != seen[2] == seen[3] != seen[4], seen
    assert not pid_alive(seen[0])


def test_max_memory_mb_recycles(
        write_config: Callable[..., Path], spawn: Callable[[Path], DaemonProcess],
        prefix: str) -> None:
    start(spawn, write_config, prefix, process_pool={"size": 1, "max_memory_mb": 150})
    with SyncClient(REDIS_URL, prefix) as c:
        a = run_one(c, "proc_info", {}).result["pid"]
        b = run_one(c, "proc_info", {}).result["pid"]
        assert a == b  # small: the child is kept
        assert run_one(c, "alloc_mb", {"mb": 200}).result == a  # leaks 200 MiB in a
        after = run_one(c, "proc_info", {}).result["pid"]
    assert after != a
    wait_until(lambda: not pid_alive(a), 10, "the bloated child gone")


# ------------------------------------------------------------------ a busy CPU


def test_heartbeats_and_leases_keep_going_while_every_child_burns_cpu(
        write_config: Callable[..., Path], spawn: Callable[[Path], DaemonProcess],
        prefix: str, sync_r: redis.Redis) -> None:
    """Each job runs 3x the visibility timeout at 100 % CPU: it must run exactly once."""
    key = f"{prefix}:burn"
    start(spawn, write_config, prefix, process_pool={"size": 2},
          heartbeat={"interval_s": 0.5, "timeout_s": 2},
          reaper={"interval_s": 0.5, "visibility_timeout_s": 2, "max_deliveries": 3},
          tasks=proc_tasks(cpu_burn={"timeout_s": 60}))
    with SyncClient(REDIS_URL, prefix) as c:
        jobs = [c.enqueue("cpu_burn", {"seconds": 6, "key": key}) for _ in range(2)]
        for j in jobs:
            info = status(c, j.id, "succeeded", timeout=40)
            assert info.lost == 0 and info.attempts == 1
    assert {k: int(v) for k, v in sync_r.hgetall(key).items()} == \
        {j.id.encode(): 1 for j in jobs}
    assert len(set(pids(sync_r, key).values())) == 2  # both children busy at once


# ------------------------------------------------------------------ drain


def test_drain_kills_running_process_jobs_and_hands_them_back(
        write_config: Callable[..., Path], spawn: Callable[[Path], DaemonProcess],
        prefix: str, sync_r: redis.Redis) -> None:
    key = f"{prefix}:burn"
    cfg = write_config(**FAST, tasks=proc_tasks(cpu_burn={"timeout_s": 60}),
                       process_pool={"size": 1, "kill_grace_s": 0.5},
                       shutdown={"drain_timeout_s": 0.5, "handback_timeout_s": 3})
    a = spawn(cfg)
    a.wait_ready(prefix)
    with SyncClient(REDIS_URL, prefix) as c:
        job = c.enqueue("cpu_burn", {"seconds": 4, "key": key})
        wait_until(lambda: job.id in pids(sync_r, key), 20, "the job started")
        child = pids(sync_r, key)[job.id]
        a.signal(signal.SIGTERM)
        assert a.wait(20) == 0, a.log()
        assert not pid_alive(child)
        info = c.status(job.id)
        assert (info.status, info.attempts, info.lost) == ("queued", 0, 0), info
        b = spawn(cfg)
        b.wait_ready(prefix)
        done = status(c, job.id, "succeeded", timeout=30)
        assert done.attempts == 1 and done.lost == 0
        assert done.result != child and sync_r.hget(key, job.id) == b"2"


# ------------------------------------------------------------------ lifecycle


def children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out |= {int(p) for p in (task / "children").read_text().split()}
    return out


def test_process_pool_starts_only_with_a_process_task_and_lazily_on_reload(
        write_config: Callable[..., Path], spawn: Callable[[Path], DaemonProcess],
        prefix: str) -> None:
    import yaml

    path = write_config(**FAST)
    d = spawn(path)
    d.wait_ready(prefix)
    with SyncClient(REDIS_URL, prefix) as c:
        run_one(c, "noop", {})
        assert children(d.pid) == set()  # no process task: no worker processes
        cfg = yaml.safe_load(path.read_text())
        cfg["tasks"]["proc_info"] = proc_tasks()["proc_info"]
        path.write_text(yaml.safe_dump(cfg))
        d.signal(signal.SIGHUP)

        def routed() -> bool:
            try:
                c.enqueue("proc_info", {})
            except UnknownTask:
                return False
            return True

        wait_until(routed, 20, "the reloaded config routes proc_info")
        pid = run_one(c, "proc_info", {}).result["pid"]
        assert pid in children(d.pid)
    d.signal(signal.SIGTERM)
    assert d.wait(20) == 0, d.log()
    assert not pid_alive(pid)  # closed after the drain


async def test_in_process_daemon_runs_process_jobs_and_closes_its_children_cleanly(
        start_daemon: Callable[..., Any], client: Any) -> None:
    """The same on the default asyncio loop (not uvloop), as tests run daemons: no
    unclosed pipe or transport is left behind (warnings are errors here)."""
    from .conftest import wait_status

    d = await start_daemon(**FAST, tasks=proc_tasks(),
                           process_pool={"size": 1, "max_tasks_per_child": 2})
    seen = []
    for _ in range(3):
        job = await client.enqueue("proc_info", {})
        seen.append((await wait_status(client, job.id, "succeeded")).result["pid"])
    assert seen[0] == seen[1] != seen[2] != os.getpid()
    procs = d.daemon.pool.procs
    assert procs.pids() == [seen[2]]
    assert d.daemon.rt is not None
    text = d.daemon.rt.metrics.exposition().decode()
    assert 'jobqd_process_workers_replaced_total{reason="max_tasks"} 1.0' in text
    assert 'jobqd_process_workers{state="idle"} 1.0' in text
    assert 'jobqd_process_workers{state="busy"} 0.0' in text
    info = await client.status(job.id)
    assert await d.stop() == 0
    assert procs.pids() == [] and procs.live == 0
    assert not pid_alive(info.result["pid"])


def test_a_child_killed_while_idle_costs_no_job_a_delivery(
        write_config: Callable[..., Path], spawn: Callable[[Path], DaemonProcess],
        prefix: str) -> None:
    d = start(spawn, write_config, prefix, process_pool={"size": 1})
    with SyncClient(REDIS_URL, prefix) as c:
        a = run_one(c, "proc_info", {}).result["pid"]
        os.kill(a, signal.SIGKILL)
        wait_until(lambda: a not in children(d.pid), 10, "the killed child reaped")
        info = run_one(c, "proc_info", {})
        assert info.result["pid"] != a and info.lost == 0 and info.attempts == 1


def test_cancel_kills_a_running_process_job(
        write_config: Callable[..., Path], spawn: Callable[[Path], DaemonProcess],
        prefix: str, sync_r: redis.Redis) -> None:
    """Cancel (the job-control issue) stops a process job the same way a timeout does:
    its child is killed and replaced; the job ends cancelled and is never retried."""
    key = f"{prefix}:burn"
    start(spawn, write_config, prefix, process_pool={"size": 1, "kill_grace_s": 0.5},
          tasks=proc_tasks(cpu_burn={"max_retries": 3}))
    with SyncClient(REDIS_URL, prefix) as c:
        job = c.enqueue("cpu_burn", {"seconds": 60, "key": key})
        status(c, job.id, "running")
        wait_until(lambda: job.id in pids(sync_r, key), 10, "the child took the job")
        pid = pids(sync_r, key)[job.id]
        t0 = time.monotonic()
        assert c.cancel(job.id).outcome == "cancelling"
        info = status(c, job.id, "cancelled", timeout=10)
        assert time.monotonic() - t0 < 2.0  # within 1 s plus the kill's grace
        assert info.attempts == 1 and sync_r.hget(key, job.id) == b"1"  # never retried
        wait_until(lambda: not pid_alive(pid), 10, f"the cancelled job's child {pid} gone")
        assert run_one(c, "proc_info", {}).result["pid"] != pid


def test_progress_from_a_worker_process_is_seen_by_status(
        write_config: Callable[..., Path], spawn: Callable[[Path], DaemonProcess],
        prefix: str, sync_r: redis.Redis) -> None:
    tasks = proc_tasks()
    tasks["proc_progress"] = {"handler": "tests.handlers:proc_progress", "executor": "process"}
    start(spawn, write_config, prefix, process_pool={"size": 1}, tasks=tasks)
    with SyncClient(REDIS_URL, prefix) as c:
        job = c.enqueue("proc_progress", {"key": f"{prefix}:go"})
        wait_until(lambda: c.status(job.id).progress is not None, 10, "progress")
        progress = c.status(job.id).progress
        assert progress is not None and progress["fraction"] == 0.25
        assert progress["message"] == "a quarter"
        sync_r.set(f"{prefix}:go", 1)
        assert status(c, job.id, "succeeded").result == "done"
