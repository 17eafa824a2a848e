"""Fast checks of the benchmark harness's own logic: no Redis, no
subprocesses, no timing assertions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench import run
from bench.drivers import common


def test_percentile_nearest_rank() -> None:
    vals = sorted(float(x) for x in range(1, 101))
    assert run._pct(vals, 50) == 50.0
    assert run._pct(vals, 99) == 99.0
    assert run._pct(vals, 100) == 100.0
    assert run._pct([7.0], 99) == 7.0


def test_ratio_is_oriented_so_above_one_is_better() -> None:
    assert run.ratio(200.0, 100.0, True) == 2.0  # throughput: twice the best peer
    assert run.ratio(5.0, 10.0, False) == 2.0  # latency: half the best peer's
    assert run.ratio(None, 10.0, True) is None
    assert run.ratio(1.0, None, True) is None


def _results() -> dict[str, Any]:
    def sysres(**medians: float | None) -> dict[str, Any]:
        return {
            "status": "ok",
            "notes": [],
            "info": {"version": "1", "default_concurrency": 10, "max_concurrency": None},
            "metrics": {k: {"runs": [v], "extra": [{}], "median": v} for k, v in medians.items()},
        }

    return {
        "jobqd": sysres(enqueue_single=9000.0, lat_p50=1.0),
        "arq": sysres(enqueue_single=3000.0, lat_p50=300.0),
        "saq": sysres(enqueue_single=6000.0, lat_p50=0.5),
        "rq": {"status": "driver failed to load: x", "metrics": {}, "notes": [], "info": {}},
    }


def test_best_peer_excludes_jobqd_and_skipped() -> None:
    res = _results()
    assert run.best_peer(res, "enqueue_single") == ("saq", 6000.0)
    assert run.best_peer(res, "lat_p50") == ("saq", 0.5)
    assert run.best_peer(res, "io_100") == (None, None)


def test_summarize_takes_median_and_ignores_missing() -> None:
    res: dict[str, Any] = {"x": {"status": "ok", "metrics": {"m": {"runs": [3.0, None, 1.0, 2.0]}}}}
    run.summarize(res)
    assert res["x"]["metrics"]["m"]["median"] == 2.0


def test_markdown_report(tmp_path: Path) -> None:
    data = {
        "meta": {
            "started": "now",
            "duration_s": 60.0,
            "mode": "quick",
            "command": "python bench/run.py",
            "args": {
                "repeats": 1,
                "n": 200,
                "latency_n": 200,
                "latency_rate": 500.0,
                "recovery_hold": 2.0,
            },
            "machine": {
                "nproc": 2,
                "cpu_model": "cpu",
                "mem_gib": 24.0,
                "platform": "linux",
                "python": "3.11",
                "redis_version": "7.0",
                "loadavg_start": "0",
                "loadavg_end": "0",
            },
            "redis": "own",
        },
        "order": ["jobqd", "arq", "saq", "rq"],
        "systems": _results(),
    }
    out = tmp_path / "results.md"
    run.write_markdown(out, data)
    text = out.read_text()
    assert (
        "| Enqueue, one by one (jobs/s) ↑ | 9,000 (1.50×) | 3,000 (0.50×) | 6,000 (1.00×) "
        "| skipped | saq (6,000) | 1.50× |" in text
    )
    assert "skipped: driver failed to load" in text
    json.dumps(data)  # results stay JSON-serialisable


def test_requirements_sections_cover_every_peer() -> None:
    sections = run.parse_requirements()
    for peer in run.PEERS:
        env = run.env_name(peer, sections)
        assert sections[env], peer
        assert all("==" in line for line in sections[env]), env
    assert run.env_name("rq_simple", sections) == "rq"


def test_driver_files_exist_for_every_peer() -> None:
    for peer in run.PEERS:
        assert (run.DRIVERS / f"{peer}_driver.py").exists(), peer


def test_job_kwargs() -> None:
    assert common.job_kwargs("noop", 3, 2.0) == {}
    assert common.job_kwargs("hold", 3, 2.0) == {"i": 3, "hold": 2.0}
    assert set(common.job_kwargs("latency", 0, 0)) == {"ts"}


def test_driver_cli_contract() -> None:
    p = common.build_parser()
    a = p.parse_args(
        [
            "enqueue",
            "--redis-url",
            "redis://127.0.0.1:1/0",
            "--mode",
            "batch",
            "--n",
            "5",
            "--workload",
            "noop",
        ]
    )
    assert (a.mode, a.n, a.batch_size, a.rate) == ("batch", 5, 1000, 0.0)
    w = p.parse_args(["worker", "--redis-url", "u", "--concurrency", "100", "--workload", "sleep"])
    assert (w.concurrency, w.workload) == (100, "sleep")


def _proc(jq: list[float], ref: list[float], r5: list[float]) -> dict[str, Any]:
    def sysres(runs: list[float], **info: Any) -> dict[str, Any]:
        return {"status": "ok", "notes": [], "info": info, "metrics": {
            k: {"runs": runs, "extra": [{"concurrency": c}] * len(runs),
                "median": sorted(runs)[len(runs) // 2]}
            for k, c in (("proc_default", 16), ("proc_100", 100))}}

    return {"jobqd": sysres(jq, redis_py="8.1.0"), "reference": sysres(ref),
            "jobqd_redis5": sysres(r5, redis_py="5.3.1"), "saq": sysres([10.0])}


def test_reference_and_redis5_are_not_peers() -> None:
    res = _proc([50.0], [100.0], [25.0])
    assert run.best_peer(res, "proc_100") == ("saq", 10.0)


def test_reference_table_medians_and_paired_ratios() -> None:
    lines = run.reference_lines(_proc([60.0, 80.0, 70.0], [100.0, 100.0, 80.0], [30.0] * 3))
    row = next(x for x in lines if x.startswith("| Processing, no-op, concurrency 100"))
    # medians 70 / 100 = 70 %; per repeat 60 %, 80 %, 88 %; goal 90 %; 30 / 70 = 0.43x
    assert row == ("| Processing, no-op, concurrency 100 (consumers 100) | 70 | 100 | 70% | "
                   "60%, 80%, 88% | ≥ 90% | 30 | 0.43× |")
    assert any("redis-py 5.3.1 / 8.1.0" in x for x in lines)
    assert run.reference_lines({"jobqd": _proc([1.0], [1.0], [1.0])["jobqd"]}) == []


def test_requirements_root_placeholder(tmp_path: Path) -> None:
    sections = run.parse_requirements()
    assert "-e {ROOT}" in sections["jobqd_redis5"]
    assert "redis==5.3.1" in sections["jobqd_redis5"]


def test_pythonpath_for_another_jobqd(tmp_path: Path) -> None:
    assert run.pythonpath("jobqd", None) == str(run.ROOT)
    assert run.pythonpath("streaq", str(tmp_path)) == str(run.ROOT)
    (tmp_path / "jobqd").mkdir()
    d = Path(run.pythonpath("jobqd_redis5", str(tmp_path)))
    assert (d / "bench").resolve() == run.BENCH
    assert (d / "jobqd").resolve() == (tmp_path / "jobqd").resolve()


def test_pyspy_raw_aggregation() -> None:
    from bench import profile_daemon

    raw = ("main (a.py:1);run (b.py:2);work (c.py:3) 6\n"
           "main (a.py:1);run (b.py:9);work (c.py:4) 2\n"
           "main (a.py:1);idle (d.py:1) 2\n")
    total, own, incl = profile_daemon.aggregate(raw)
    assert total == 10
    assert own == {"work (c.py)": 8, "idle (d.py)": 2}
    assert incl["main (a.py)"] == 10
    assert incl["run (b.py)"] == 8


def test_capacity_arithmetic() -> None:
    from bench import daemons

    cap = daemons.capacity(redis_us=20.0, daemon_us=100.0)
    assert cap["redis_core_jobs_per_s"] == 50_000
    assert cap["daemon_core_jobs_per_s"] == 10_000
    assert cap["daemons_to_saturate"] == 5.0
    assert cap["daemons_whole"] == 5
    assert cap["fits_on_host"]


def test_instructions_without_idle_scales_the_timers_by_the_info_rate() -> None:
    from bench.instructions import without_idle

    # idle: 8M instructions and 5 INFO a second; loaded for 10 s over 1,000 jobs
    idle = (8e6, 5.0)
    # timers fired at a quarter of the idle rate: a quarter of 80M is theirs
    assert without_idle(400e6, 1000, 10.0, idle=idle, info_per_s=1.25) == (0.25, 380e3)
    # never more than the idle rate, whatever the counts say
    assert without_idle(400e6, 1000, 10.0, idle=idle, info_per_s=9.0) == (1.0, 320e3)
    # no INFO at all (the reference): the whole idle rate
    assert without_idle(400e6, 1000, 10.0, idle=(1e6, 0.0), info_per_s=0.0) == (1.0, 390e3)
