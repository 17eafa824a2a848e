"""`jobqd_jobs_enqueued_total` counts every enqueue, whoever the producer is (the
Python client, the CLI, HTTP), because enqueue.lua counts them in Redis; and the
Grafana panel that compares enqueued with completed queries series that exist."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from jobqd import Client
from tests.conftest import REDIS_URL, ROOT

DASHBOARD = ROOT / "etc" / "grafana" / "jobqd-dashboard.json"
SAMPLE_RE = re.compile(r"^(\w+)\{([^}]*)\} (\S+)$", re.M)


def _samples(text: str, name: str) -> dict[frozenset[tuple[str, str]], float]:
    out = {}
    for metric, labels, value in SAMPLE_RE.findall(text):
        if metric == name:
            out[frozenset(re.findall(r'(\w+)="([^"]*)"', labels))] = float(value)
    return out


async def _wait_metric(url: str, name: str, labels: dict[str, str], want: float) -> str:
    key = frozenset(labels.items())
    deadline = time.monotonic() + 15  # the gauge loop reads Redis every 2 s
    async with aiohttp.ClientSession() as s:
        while True:
            async with s.get(url + "/metrics") as resp:
                text = await resp.text()
            got = _samples(text, name).get(key)
            if got == want:
                return text
            assert time.monotonic() < deadline, (got, want, text)
            await asyncio.sleep(0.2)


def _cli_enqueue(config_path: Path, task: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "jobqd", "-c", str(config_path), "enqueue",
                           task], capture_output=True, text=True, env=env, timeout=30,
                          check=False)
    assert proc.returncode == 0, proc.stderr


async def test_every_producer_is_counted(start_daemon: Callable[..., Any],
                                         write_config: Callable[..., Path],
                                         prefix: str) -> None:
    d = await start_daemon(consumers=0)
    host, port = d.daemon.http_address
    url = f"http://{host}:{port}"
    async with Client(REDIS_URL, prefix) as c:  # the Python client: 2 + a batch of 3
        await c.enqueue("noop")
        await c.enqueue("noop", idempotency_key="once")
        await c.enqueue("noop", idempotency_key="once")  # the same job: not counted again
        await c.enqueue_many("noop", [{}, {}, {}])
    await asyncio.to_thread(_cli_enqueue, write_config(), "noop")  # the CLI: 1
    async with (aiohttp.ClientSession() as s,  # HTTP: 1
                s.post(url + "/v1/jobs", json={"task": "noop", "args": {}}) as resp):
        assert resp.status == 202, await resp.text()
    await _wait_metric(url, "jobqd_jobs_enqueued_total", {"queue": "default", "task": "noop"},
                       7.0)


async def test_dashboard_throughput_panel_queries_existing_series(
        start_daemon: Callable[..., Any], prefix: str) -> None:
    d = await start_daemon()
    host, port = d.daemon.http_address
    url = f"http://{host}:{port}"
    async with Client(REDIS_URL, prefix) as c:
        job = await c.enqueue("noop")
        deadline = time.monotonic() + 15
        while (await c.status(job.id)).status != "succeeded":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    text = await _wait_metric(url, "jobqd_jobs_enqueued_total",
                              {"queue": "default", "task": "noop"}, 1.0)
    panels = json.loads(DASHBOARD.read_text())["panels"]
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])
             if "jobqd_jobs_enqueued_total" in t.get("expr", "")]
    assert exprs, "no dashboard panel shows jobqd_jobs_enqueued_total"
    (panel,) = [p for p in panels
                if any("jobqd_jobs_enqueued_total" in t.get("expr", "")
                       for t in p.get("targets", []))]
    for target in panel["targets"]:
        for name in set(re.findall(r"\b(jobqd_\w+)\b", target["expr"])):
            series = _samples(text, name)
            assert series, f"{name} (panel {panel['title']!r}) is not in /metrics:\n{text}"
            # the $queue filter selects on a label every series carries
            if "queue=~" in target["expr"]:
                assert all(dict(k).get("queue") == "default" for k in series), series
    # every daemon exports the same Redis-side counter: summing daemons would multiply it
    (enq,) = exprs
    assert "sum(rate(jobqd_jobs_enqueued_total" not in enq.replace(" ", ""), enq
    assert "max by (queue, task) (rate(jobqd_jobs_enqueued_total" in enq, enq
