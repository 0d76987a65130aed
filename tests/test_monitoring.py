"""The aggregator's alerts and dashboard: promtool checks and unit-tests the rule file, and
every metric an alert or a dashboard panel queries is one the aggregator exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from server.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "fedlora-aggregator"
ALERTS = CHART / "files" / "alerts.yaml"
ALERT_TESTS = ROOT / "monitoring" / "alerts.test.yaml"
DASHBOARD = CHART / "files" / "dashboard.json"
EXPECTED_ALERTS = {
    "FedloraAggregatorDown",
    "FedloraNoLeader",
    "FedloraRoundStalled",
    "FedloraParticipationLow",
    "FedloraRejectionRateHigh",
    "FedloraStateVolumeErrors",
    "FedloraHostileTraffic",
}
# PromQL keywords that look like metric names to a plain regex.
NOT_METRICS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "Inf", "NaN"}


def promtool() -> str:
    binary = shutil.which("promtool") or "/usr/bin/promtool"
    if not Path(binary).exists():
        pytest.fail("promtool is missing: apt-get install prometheus (.ci/run and scripts/test.sh do)")
    return binary


def exported_metric_names() -> set[str]:
    """Every series name the aggregator's /metrics can carry."""
    suffixes = {
        "counter": ["_total"],
        "gauge": [""],
        "histogram": ["_bucket", "_sum", "_count"],
        "info": ["_info"],
        "summary": ["_sum", "_count", ""],
    }
    return {family.name + s for family in Metrics().registry.collect() for s in suffixes[family.type]}


def metrics_in(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords,
    label names (in matchers or by/on lists) or numbers."""
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values
    expr = re.sub(r"\{[^}]*\}", " ", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # range durations
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)  # label lists
    names = set()
    for m in re.finditer(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?", expr):
        if not m.group(2) and m.group(1) not in NOT_METRICS:
            names.add(m.group(1))
    return names


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def test_rule_file_passes_promtool_check():
    out = subprocess.run([promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(EXPECTED_ALERTS)} rules found" in out.stdout


def test_alert_unit_tests_pass():
    out = subprocess.run([promtool(), "test", "rules", str(ALERT_TESTS)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_is_unit_tested_and_has_a_runbook():
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} == EXPECTED_ALERTS
    tested = {
        t["alertname"] for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"] for t in case["alert_rule_test"]
    }
    assert tested == EXPECTED_ALERTS
    operations = (ROOT / "docs" / "operations.md").read_text()
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert f"Runbook: {rule['alert']} in docs/operations.md" in " ".join(rule["annotations"]["description"].split())
        assert re.search(rf"^### {rule['alert']}\b", operations, re.M), (
            f"docs/operations.md has no runbook for {rule['alert']}"
        )


def test_alerts_query_only_exported_metrics():
    exported = exported_metric_names() | {"up"}
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            unknown = metrics_in(rule["expr"]) - exported
            assert not unknown, f"{rule['alert']} queries {unknown}, which the aggregator does not export"


def test_every_dashboard_panel_queries_exported_metrics():
    exported = exported_metric_names()
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    for title, expr in exprs:
        names = metrics_in(expr)
        assert names, f"panel {title!r}: no metric in {expr!r}"
        unknown = names - exported
        assert not unknown, f"panel {title!r} queries {unknown}, which the aggregator does not export"


def test_dashboard_covers_the_issue_metrics_and_uses_the_variables():
    exprs = " ".join(e for _, e in dashboard_exprs())
    for name in (
        "fedlora_rounds_completed_total",
        "fedlora_rounds_failed_total",
        "fedlora_round_duration_seconds_bucket",
        "fedlora_devices_online",
        "fedlora_round_participants",
        "fedlora_updates_total",
        "fedlora_uplink_bytes_total",
        "fedlora_downlink_bytes_total",
        "fedlora_aggregation_seconds_bucket",
        "fedlora_global_eval_loss",
        "fedlora_global_eval_accuracy",
        "fedlora_device_step_seconds_bucket",
        "fedlora_device_peak_rss_bytes_bucket",
        "fedlora_leader",
        "fedlora_build_info",
    ):
        assert name in exprs, f"the dashboard shows nothing of {name}"
    dash = json.loads(DASHBOARD.read_text())
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "namespace", "job"}
    for title, expr in dashboard_exprs():
        assert 'job=~"$job"' in expr and 'namespace=~"$namespace"' in expr, (
            f"panel {title!r} ignores the job/namespace picker"
        )
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_metric_names_follow_prometheus_conventions():
    for family in Metrics().registry.collect():
        assert family.name.startswith("fedlora_")
        if family.type == "histogram":
            assert family.name.endswith(("_seconds", "_bytes")), family.name  # a unit in every histogram
        for sample in family.samples:
            assert not {"device", "device_id", "client"} & set(sample.labels), f"{sample.name} has a per-device label"


def test_metrics_extractor_sees_through_promql():
    assert metrics_in('histogram_quantile(0.95, sum by (le) (rate(a_bucket{job=~"x", kind="raw"}[5m])))') == {
        "a_bucket"
    }
    assert metrics_in("time() - max by (namespace, job) (b_seconds) > on (namespace) c == 1") == {"b_seconds", "c"}
