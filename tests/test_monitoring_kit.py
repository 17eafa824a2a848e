"""Checks of the monitoring kit: Prometheus alert rules and the Grafana dashboard.

* every metric name used by a rule or a dashboard query is one jobqd (or
  prometheus-client / Prometheus itself) actually exports -- a renamed metric
  otherwise means an alert that can never fire and a panel that stays empty;
* ``promtool check rules`` and ``promtool test rules`` pass, and the dashboard
  queries parse as PromQL (skipped when promtool is absent; Debian package:
  prometheus);
* the dashboard is valid JSON with the expected variables and panels.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "etc" / "prometheus" / "jobqd-alerts.yml"
RULES_TEST = ROOT / "etc" / "prometheus" / "jobqd-alerts.test.yml"
DASHBOARD = ROOT / "etc" / "grafana" / "jobqd-dashboard.json"

# The metrics jobqd exports (name -> label names); see jobqd/metrics.py.
JOBQD_METRICS: dict[str, frozenset[str]] = {
    "jobqd_jobs_enqueued_total": frozenset({"queue", "task"}),
    "jobqd_jobs_accepted_total": frozenset({"queue", "task"}),
    "jobqd_jobs_completed_total": frozenset({"queue", "task", "outcome"}),
    "jobqd_queue_depth": frozenset({"queue"}),
    "jobqd_queue_lag_seconds": frozenset({"queue"}),
    "jobqd_dlq_depth": frozenset({"queue"}),
    "jobqd_queue_accepting": frozenset({"queue"}),
    "jobqd_queue_weight": frozenset({"queue"}),
    "jobqd_jobs_reclaimed_total": frozenset({"reason"}),
    "jobqd_consumers": frozenset({"state"}),
    "jobqd_config_reloads_total": frozenset({"result"}),
    "jobqd_schedule_runs_total": frozenset({"schedule"}),
    "jobqd_schedule_last_run_timestamp_seconds": frozenset({"schedule"}),
    "jobqd_schedule_due_timestamp_seconds": frozenset({"schedule"}),
    "jobqd_build_info": frozenset({"version", "python"}),  # a prometheus-client Info
}
# Classic histograms: only the _bucket/_sum/_count series exist, so a query on
# the bare name returns nothing and is rejected below.
JOBQD_HISTOGRAMS = ("jobqd_job_duration_seconds", "jobqd_job_wait_seconds")
HISTOGRAM_LABELS: dict[str, frozenset[str]] = {
    "jobqd_job_duration_seconds": frozenset({"queue", "task"}),
    "jobqd_job_wait_seconds": frozenset({"queue"}),
}
# Labels per series name, histogram series included (their "le" is generic).
SERIES_LABELS: dict[str, frozenset[str]] = {
    **JOBQD_METRICS,
    **{
        f"{h}{sfx}": labels
        for h, labels in HISTOGRAM_LABELS.items()
        for sfx in ("_bucket", "_sum", "_count")
    },
}
OTHER_METRICS = {
    "up",  # Prometheus, per scrape target
    "process_start_time_seconds",  # prometheus-client's process collector
}
KNOWN_METRICS: frozenset[str] = frozenset(
    set(JOBQD_METRICS)
    | {f"{h}{suffix}" for h in JOBQD_HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
    | OTHER_METRICS
)

# PromQL functions and aggregation operators (Prometheus 2.x).
PROMQL_FUNCTIONS = frozenset(
    [
        "abs",
        "absent",
        "absent_over_time",
        "acos",
        "acosh",
        "asin",
        "asinh",
        "atan",
        "atanh",
        "avg_over_time",
        "ceil",
        "changes",
        "clamp",
        "clamp_max",
        "clamp_min",
        "cos",
        "cosh",
        "count_over_time",
        "day_of_month",
        "day_of_week",
        "day_of_year",
        "days_in_month",
        "deg",
        "delta",
        "deriv",
        "exp",
        "floor",
        "histogram_count",
        "histogram_fraction",
        "histogram_quantile",
        "histogram_sum",
        "histogram_stddev",
        "histogram_stdvar",
        "holt_winters",
        "hour",
        "idelta",
        "increase",
        "irate",
        "label_join",
        "label_replace",
        "last_over_time",
        "ln",
        "log10",
        "log2",
        "mad_over_time",
        "max_over_time",
        "min_over_time",
        "minute",
        "month",
        "pi",
        "predict_linear",
        "present_over_time",
        "quantile_over_time",
        "rad",
        "rate",
        "resets",
        "round",
        "scalar",
        "sgn",
        "sin",
        "sinh",
        "sort",
        "sort_desc",
        "sqrt",
        "stddev_over_time",
        "stdvar_over_time",
        "sum_over_time",
        "tan",
        "tanh",
        "time",
        "timestamp",
        "vector",
        "year",
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ]
)
PROMQL_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"})

_STRING = re.compile(r'"(?:\\.|[^"\\])*"' + r"|'(?:\\.|[^'\\])*'|`[^`]*`")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)(\s*\()?")
_GRAFANA_VARS = re.compile(r"\$__\w+|\$\{[^}]*\}|\$\w+|\[\[\w+\]\]")


def grafana_to_promql(expr: str) -> str:
    """Substitute Grafana's variables so the query is plain PromQL."""

    def sub(m: re.Match[str]) -> str:
        var = m.group(0)
        if var.startswith("$__"):  # $__rate_interval, $__interval, $__range
            return "5m"
        return ".*"  # template variables only ever appear inside =~ "..." here

    return _GRAFANA_VARS.sub(sub, expr)


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (a tokenizer, not a full parser)."""
    assert "__name__" not in expr, f"use plain metric names, not __name__ matchers: {expr}"
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGES.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names: set[str] = set()
    for m in _IDENT.finditer(text):
        ident, call = m.group(1), m.group(2)
        if call:
            assert ident in PROMQL_FUNCTIONS, f"unknown PromQL function {ident!r} in {expr}"
        elif ident.lower() not in PROMQL_KEYWORDS:
            names.add(ident)
    return names


def selectors(expr: str) -> Iterator[tuple[str, str]]:
    """(metric name, label matcher text) for each selector in the expression."""
    # Keep strings (matchers need them) but blank out grouping clauses.
    text = _GROUPING.sub(" ", expr)
    for m in re.finditer(r"(?<![\w:])([A-Za-z_:][\w:]*)\s*(\{[^{}]*\})?", text):
        yield m.group(1), m.group(2) or ""


# --- the tokenizer itself ---------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ('up{job="jobqd"} == 0', {"up"}),
        (
            "changes(process_start_time_seconds[15m]) > 2 and on (job, instance) jobqd_build_info",
            {"process_start_time_seconds", "jobqd_build_info"},
        ),
        (
            "histogram_quantile(0.99, sum by (le) "
            '(rate(foo_bucket{queue=~"$queue", x="a{b}"}[$__rate_interval])))',
            {"foo_bucket"},
        ),
        ("sum(x) without (instance) / ignoring(a) group_left(b) y offset 15m", {"x", "y"}),
        ('a unless b{c="sum(d)"} or vector(0) > bool 1e3', {"a", "b"}),
    ],
)
def test_metric_name_tokenizer(expr: str, expected: set[str]) -> None:
    assert metric_names(grafana_to_promql(expr)) == expected


def test_tokenizer_rejects_unknown_function() -> None:
    with pytest.raises(AssertionError, match="unknown PromQL function"):
        metric_names("rates(jobqd_queue_depth[5m])")


def _check_known(exprs: dict[str, str]) -> None:
    bad = {where: sorted(metric_names(e) - KNOWN_METRICS) for where, e in exprs.items()}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"unknown metric names: {bad}"


def test_known_metric_check_can_fail() -> None:
    with pytest.raises(AssertionError, match="jobqd_queue_len"):
        _check_known({"typo": "max(jobqd_queue_len)"})
    with pytest.raises(AssertionError, match="jobqd_job_wait_seconds"):
        _check_known({"bare histogram": "rate(jobqd_job_wait_seconds[5m])"})


# --- Prometheus rules -------------------------------------------------------


def _load_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _label_check(exprs: dict[str, str]) -> None:
    """jobqd metrics are only filtered/grouped by labels they actually have."""
    generic = {"job", "instance", "le"}
    for where, expr in exprs.items():
        available = set(generic)
        for name, matchers in selectors(expr):
            if name not in SERIES_LABELS:
                continue
            available |= SERIES_LABELS[name]
            used = set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", _STRING.sub('""', matchers)))
            unknown = used - SERIES_LABELS[name] - generic
            assert not unknown, f"{where}: {name} has no label(s) {sorted(unknown)}"
        for clause in _GROUPING.finditer(_STRING.sub('""', expr)):
            labels = set(re.findall(r"\w+", clause.group(0))) - {clause.group(1)}
            unknown = labels - available
            assert not unknown, f"{where}: no metric in the query has label(s) {sorted(unknown)}"


def test_label_check_can_fail() -> None:
    with pytest.raises(AssertionError, match="has no label"):
        _label_check({"m": 'jobqd_consumers{queue="a"}'})
    with pytest.raises(AssertionError, match="outcomes"):
        _label_check({"g": "sum by (outcomes) (rate(jobqd_jobs_completed_total[5m]))"})
    with pytest.raises(AssertionError, match="task"):
        _label_check({"h": "sum by (le, task) (rate(jobqd_job_wait_seconds_bucket[5m]))"})
    _label_check({"ok": "sum by (le, task) (rate(jobqd_job_duration_seconds_bucket[5m]))"})


def test_rules_use_only_known_metrics() -> None:
    exprs = {rule["alert"]: rule["expr"] for rule in _load_rules()}
    assert exprs
    _check_known(exprs)
    _label_check(exprs)


def test_rules_cover_the_required_alerts() -> None:
    rules = _load_rules()
    names = {r["alert"] for r in rules}
    assert {
        "JobqdDown",
        "JobqdRestarting",
        "JobqdDeadLetterGrowing",
        "JobqdQueueLagHigh",
        "JobqdNoLiveConsumers",
        "JobqdBackpressureEngaged",
        "JobqdConfigReloadFailed",
    } <= names
    by_name = {r["alert"]: r for r in rules}
    assert "up" in metric_names(by_name["JobqdDown"]["expr"])
    assert "changes(process_start_time_seconds[15m]) > 2" in by_name["JobqdRestarting"]["expr"]
    assert by_name["JobqdBackpressureEngaged"]["for"] == "5m"
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"].get("summary"), rule["alert"]
        assert rule["annotations"].get("description"), rule["alert"]


def test_every_alert_is_unit_tested_both_ways() -> None:
    doc = yaml.safe_load(RULES_TEST.read_text())
    fires: set[str] = set()
    quiet: set[str] = set()
    for test in doc["tests"]:
        for case in test.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {r["alert"] for r in _load_rules()}
    assert names <= fires, f"never shown to fire: {sorted(names - fires)}"
    assert names <= quiet, f"never shown to stay quiet: {sorted(names - quiet)}"


PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian: apt-get install prometheus)"
)


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=120, check=False
    )


@needs_promtool
def test_promtool_check_rules() -> None:
    proc = _promtool("check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


@needs_promtool
def test_promtool_test_rules() -> None:
    proc = _promtool("test", "rules", str(RULES_TEST))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


@needs_promtool
def test_promtool_test_rules_can_fail(tmp_path: Path) -> None:
    # Same tests against a subtly wrong rule file: the unit tests must notice.
    broken = RULES.read_text().replace(
        "jobqd_queue_lag_seconds) > 300", "jobqd_queue_lag_seconds) > 3000"
    )
    assert broken != RULES.read_text()
    (tmp_path / RULES.name).write_text(broken)
    (tmp_path / RULES_TEST.name).write_text(RULES_TEST.read_text())
    proc = _promtool("test", "rules", str(tmp_path / RULES_TEST.name))
    assert proc.returncode != 0
    assert "JobqdQueueLagHigh" in proc.stdout + proc.stderr


# --- Grafana dashboard ------------------------------------------------------


def _dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def _panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows
    return out


def _dashboard_exprs(dash: dict[str, Any]) -> dict[str, str]:
    exprs: dict[str, str] = {}
    for p in _panels(dash):
        for t in p.get("targets", []):
            exprs[f"panel {p['id']} {p['title']!r} {t['refId']}"] = t["expr"]
    for a in dash.get("annotations", {}).get("list", []):
        if a.get("expr"):
            exprs[f"annotation {a['name']!r}"] = a["expr"]
    return exprs


def _variable_query(var: dict[str, Any]) -> str:
    q = var.get("query", "")
    return str(q["query"] if isinstance(q, dict) else q)


def test_dashboard_structure() -> None:
    dash = _dashboard()
    assert 36 <= dash["schemaVersion"] <= 41
    assert dash["uid"] and dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables["DS_PROMETHEUS"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    queue = variables["queue"]
    assert queue["type"] == "query" and queue["multi"] and queue["includeAll"]
    assert queue["allValue"] == ".*"
    m = re.fullmatch(r"label_values\((\w+),\s*queue\)", _variable_query(queue))
    assert m and m.group(1) in JOBQD_METRICS and "queue" in JOBQD_METRICS[m.group(1)]

    panels = _panels(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for p in [*panels, queue]:
        assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p.get("title")
        for t in p.get("targets", []):
            assert t.get("datasource", p["datasource"]) == p["datasource"]


def test_dashboard_layout_does_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for p in _panels(_dashboard()):
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]


def test_dashboard_has_required_panels() -> None:
    panels = _panels(_dashboard())
    text = {p["title"].lower(): " ".join(t["expr"] for t in p.get("targets", [])) for p in panels}

    def panel(word: str) -> str:
        hits = [exprs for title, exprs in text.items() if title.startswith(word)]
        assert len(hits) == 1, f"expected one panel titled {word}*, got {len(hits)}"
        return hits[0]

    assert "jobqd_jobs_completed_total" in panel("throughput")
    assert "by (outcome)" in panel("throughput")
    assert "jobqd_queue_depth" in panel("queue depth")
    assert "jobqd_queue_lag_seconds" in panel("queue lag")
    assert "jobqd_dlq_depth" in panel("dead-letter")
    assert "jobqd_queue_accepting" in panel("accepting")
    assert "jobqd_queue_weight" in panel("queue weight")
    for title, metric in (
        ("job duration", "jobqd_job_duration_seconds"),
        ("wait time", "jobqd_job_wait_seconds"),
    ):
        exprs = panel(title)
        for q in ("0.5", "0.99"):
            assert f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket" in exprs, title
    assert "by (state)" in panel("consumers")
    assert "jobqd_jobs_reclaimed_total" in panel("reclaims")
    assert "jobqd_config_reloads_total" in panel("config reloads")


def test_dashboard_uses_only_known_metrics_and_labels() -> None:
    dash = _dashboard()
    exprs = {k: grafana_to_promql(v) for k, v in _dashboard_exprs(dash).items()}
    assert len(exprs) >= 15
    _check_known(exprs)
    _label_check(exprs)


def test_dashboard_queue_filter_applied() -> None:
    # Every panel on a per-queue metric honours the $queue variable.
    for where, expr in _dashboard_exprs(_dashboard()).items():
        for name, matchers in selectors(expr):
            if "queue" in JOBQD_METRICS.get(name, ()) or name.startswith(JOBQD_HISTOGRAMS):
                if where.startswith("annotation"):
                    continue
                assert 'queue=~"$queue"' in matchers, f"{where}: {name} ignores $queue"


@needs_promtool
def test_dashboard_queries_parse(tmp_path: Path) -> None:
    # promtool has no "check expression": wrap each query in a recording rule.
    exprs = _dashboard_exprs(_dashboard())
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard_query_{i}", "expr": grafana_to_promql(e)}
                    for i, e in enumerate(exprs.values())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    proc = _promtool("check", "rules", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in proc.stdout
