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
