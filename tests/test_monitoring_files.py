"""Checks of the monitoring files: Grafana dashboard, provisioning, Prometheus rules.

The alert rules are checked and unit-tested with the real ``promtool``; every metric
name the dashboard and the rules read must be one smtpguard actually exports.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any

import pytest
import yaml
from monitoring import (
    ALERTS,
    ALERTS_TEST,
    PROMETHEUS_CONFIG,
    PROVISIONING,
    REPO_ROOT,
    alert_expressions,
    all_promql_expressions,
    dashboard_expressions,
    dashboard_panels,
    exported_families,
    exported_metric_names,
    load_alert_rules,
    load_dashboard,
    metric_names,
)
from prometheus_client import CollectorRegistry

REQUIRED_PANELS = (
    "Syntax violations by reason",
    "Commands normalized by verb",
    "Violation rate by command",
    "Violation rate by state",
    "Local replies by code",
    "Sessions open",
    "Session end reasons",
    "Upstream reply latency p50",
    "Upstream reply latency p99",
    "Upstream connect failures by reason",
    "Upstream replies by class",
    "Message throughput and outcomes",
    "Bytes per second by direction",
    "Message size p50 / p99",
    "HELP handling (local vs forwarded)",
    "Build info",
    "Upstream health (failover)",
    "Worker restarts",
    "TLS handshake failures by reason",
    "Upstream saturation",
    "Client rates and penalty box",
    "Shared store up",
    "Shared store errors by op",
    "Shared store call latency p99 by op",
)
REQUIRED_ALERTS = {
    "SMTPGuardViolationSpike",
    "SMTPGuardUpstreamDown",
    "SMTPGuardHigh421Rate",
    "SMTPGuardUpstreamLatencyP99High",
    "SMTPGuardUpstreamFailover",
    "SMTPGuardWorkerRestarts",
    "SMTPGuardUpstreamSaturated",
    "SMTPGuardStoreDown",
}
#: Series that are not smtpguard's but that alert rules may read.
PROMETHEUS_SERIES = {"up"}
DATASOURCE_UIDS = {"${datasource}", "$datasource"}
INSTANCE_MATCHER = 'instance=~"$instance"'

_SELECTOR = re.compile(r"(?<![\w:.$])(smtpguard_[\w:]*)\s*(\{[^{}]*\})?")
_RATE_ARGUMENT = re.compile(r"\b(?:rate|irate|increase)\s*\(\s*([A-Za-z_:][\w:]*)")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail(
            "promtool is not installed (it comes with Prometheus; Debian: apt-get install "
            "prometheus): the alert rules cannot be checked"
        )
    return subprocess.run(
        [binary, *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (
        f"{' '.join(map(str, result.args))} exited {result.returncode}\n"
        f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    )


# --- Prometheus ---------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", str(ALERTS.relative_to(REPO_ROOT)))
    assert_ok(result)
    assert f"{len(REQUIRED_ALERTS)} rules found" in result.stdout


def test_promtool_test_rules() -> None:
    result = promtool("test", "rules", str(ALERTS_TEST.relative_to(REPO_ROOT)))
    assert_ok(result)
    assert "SUCCESS" in result.stdout


def test_promtool_check_example_config() -> None:
    # Also checks the rule files the configuration loads (alerts.yaml).
    assert_ok(promtool("check", "config", str(PROMETHEUS_CONFIG.relative_to(REPO_ROOT))))
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    assert "alerts.yaml" in config["rule_files"]
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    # SMTPGuardUpstreamDown matches up{job="smtpguard"}.
    assert "smtpguard" in jobs


def test_alert_rules_shape() -> None:
    data = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    assert [group["name"] for group in data["groups"]] == ["smtpguard"]
    rules = load_alert_rules()
    assert {rule["alert"] for rule in rules} == REQUIRED_ALERTS
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]
        assert rule.get("for"), f"{rule['alert']} fires on a single evaluation"


def test_alert_unit_tests_cover_every_alert_firing_and_not_firing() -> None:
    data = yaml.safe_load(ALERTS_TEST.read_text(encoding="utf-8"))
    firing: set[str] = set()
    quiet: set[str] = set()
    for test in data["tests"]:
        for case in test.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert firing == REQUIRED_ALERTS
    assert quiet == REQUIRED_ALERTS


# --- Grafana ------------------------------------------------------------------------


def test_dashboard_identity() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "smtpguard"
    assert dashboard["title"] == "smtpguard"
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard.get("id") is None  # importable into any Grafana


def template_variables() -> dict[str, dict[str, Any]]:
    return {var["name"]: var for var in load_dashboard()["templating"]["list"]}


def test_dashboard_variables() -> None:
    variables = template_variables()
    datasource = variables["datasource"]
    assert datasource["type"] == "datasource"
    assert datasource["query"] == "prometheus"

    instance = variables["instance"]
    assert instance["type"] == "query"
    assert instance["datasource"]["uid"] in DATASOURCE_UIDS
    query = instance["query"]
    query = query["query"] if isinstance(query, dict) else query
    assert query == "label_values(smtpguard_build_info, instance)"
    assert instance["multi"] is True
    assert instance["includeAll"] is True
    # "All" must become a regex that matches every instance.
    assert instance.get("allValue") == ".*"


def test_required_panels_exist() -> None:
    panels = dashboard_panels()
    titles = [panel["title"] for panel in panels]
    assert len(titles) == len(set(titles)), "duplicate panel titles"
    missing = [title for title in REQUIRED_PANELS if title not in titles]
    assert not missing, f"missing panels: {missing}"
    for panel in panels:
        assert panel["type"] in {"timeseries", "stat"}, panel["title"]
        assert panel.get("targets"), f"{panel['title']} has no query"


def test_dashboard_layout_has_unique_ids_and_no_overlapping_panels() -> None:
    """Rows included: Grafana places a panel that overlaps another elsewhere."""
    dashboard = load_dashboard()
    panels = [
        *dashboard["panels"],
        *(p for row in dashboard["panels"] for p in row.get("panels", [])),
    ]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"
    taken: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                other = taken.setdefault((x, y), panel["title"])
                assert other == panel["title"], f"{panel['title']!r} overlaps {other!r}"


def test_shared_store_row_shows_state_errors_and_latency_by_op() -> None:
    top = load_dashboard()["panels"]
    [row] = [panel for panel in top if panel["title"] == "Shared store"]
    assert row["type"] == "row"
    # Grafana puts a panel under the row above it (by position, not by list order).
    under = {
        panel["title"]
        for panel in top
        if panel["gridPos"]["y"] == row["gridPos"]["y"] + row["gridPos"]["h"]
    }
    assert under == {
        "Shared store up",
        "Shared store errors by op",
        "Shared store call latency p99 by op",
    }
    exprs = {
        panel["title"]: [target["expr"] for target in panel["targets"]]
        for panel in dashboard_panels()
    }
    [up] = exprs["Shared store up"]
    assert metric_names(up) == {"smtpguard_store_up"}
    [errors] = exprs["Shared store errors by op"]
    assert metric_names(errors) == {"smtpguard_store_errors_total"}
    assert "sum by (op) (rate(" in errors
    [latency] = exprs["Shared store call latency p99 by op"]
    assert metric_names(latency) == {"smtpguard_store_call_seconds_bucket"}
    assert latency.startswith("histogram_quantile(0.99, sum by (op, le) (rate(")


def test_every_panel_and_target_uses_the_datasource_variable() -> None:
    for panel in dashboard_panels():
        assert panel["datasource"]["uid"] in DATASOURCE_UIDS, panel["title"]
        assert panel["datasource"]["type"] == "prometheus", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] in DATASOURCE_UIDS, panel["title"]
            assert target["datasource"]["type"] == "prometheus", panel["title"]


def test_every_query_is_filtered_by_instance() -> None:
    for expr in dashboard_expressions(substitute=False):
        selectors = _SELECTOR.findall(expr)
        assert selectors, f"no smtpguard metric in {expr!r}"
        for name, matchers in selectors:
            assert INSTANCE_MATCHER in matchers, f"{name} not filtered by $instance in {expr!r}"


def test_rates_use_the_grafana_rate_interval() -> None:
    for expr in dashboard_expressions(substitute=False):
        ranges = re.findall(r"\[([^\]]*)\]", expr)
        assert all(r == "$__rate_interval" for r in ranges), expr


def test_datasource_provisioning() -> None:
    data = yaml.safe_load((PROVISIONING / "datasources.yaml").read_text(encoding="utf-8"))
    assert data["apiVersion"] == 1
    (source,) = data["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"


def test_dashboard_provisioning() -> None:
    data = yaml.safe_load((PROVISIONING / "dashboards.yaml").read_text(encoding="utf-8"))
    assert data["apiVersion"] == 1
    (provider,) = data["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


# --- metric names -------------------------------------------------------------------


@pytest.fixture
def exported() -> dict[str, str]:
    return exported_metric_names(CollectorRegistry())


def test_exported_names_follow_the_exposition(exported: dict[str, str]) -> None:
    # Guard the helper itself: suffixes exist only where the type makes them.
    assert exported["smtpguard_messages_total"] == "counter"
    assert "smtpguard_messages" not in exported
    assert exported["smtpguard_message_size_bytes_bucket"] == "histogram"
    assert exported["smtpguard_upstream_reply_seconds_count"] == "histogram"
    assert "smtpguard_message_size_bytes" not in exported
    assert "smtpguard_messages_bucket" not in exported
    assert "smtpguard_sessions_open_total" not in exported
    assert exported["smtpguard_sessions_open"] == "gauge"


def test_metric_name_extraction() -> None:
    assert metric_names(
        'histogram_quantile(0.99, sum by (instance, le) (rate(x_bucket{le!="1", a=~"b|c"}[5m])))'
    ) == {"x_bucket"}
    assert metric_names("sum(rate(a_total[1m])) by (job) / on (job) group_left b > 1e3") == {
        "a_total",
        "b",
    }
    assert metric_names("up == 0 or absent(c offset 5m) and bool d") == {"up", "c", "d"}
    assert metric_names('smtpguard_bogus_total{instance=~".*"} > inf') == {"smtpguard_bogus_total"}


def assert_known_names(exprs: list[str], known: set[str], where: str) -> None:
    unknown: dict[str, set[str]] = {}
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"no metric name found in {where} expression {expr!r}"
        for name in names - known:
            unknown.setdefault(name, set()).add(expr)
    assert not unknown, f"{where} reads metrics smtpguard does not export: {unknown}"


def test_dashboard_metrics_are_exported(exported: dict[str, str]) -> None:
    assert_known_names(dashboard_expressions(), set(exported), "dashboard")
    for var in load_dashboard()["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            query = query["query"] if isinstance(query, dict) else query
            (name,) = re.findall(r"label_values\(\s*([\w:]+)", query)
            assert name in exported, var["name"]


def test_alert_metrics_are_exported(exported: dict[str, str]) -> None:
    assert_known_names(alert_expressions(), set(exported) | PROMETHEUS_SERIES, "alerts")


def test_rates_are_taken_of_counters_and_buckets_only(exported: dict[str, str]) -> None:
    for expr in all_promql_expressions():
        for name in _RATE_ARGUMENT.findall(expr):
            assert exported.get(name) in {"counter", "histogram"}, f"rate of {name} in {expr!r}"


def test_every_exported_family_is_on_the_dashboard() -> None:
    used = {name for expr in dashboard_expressions() for name in metric_names(expr)}
    for family, kind in exported_families(CollectorRegistry()).items():
        if family.endswith("_created"):
            continue
        names = {family + "_bucket"} if kind == "histogram" else {family}
        assert names & used, f"{family} is exported but on no dashboard panel"


def test_all_promql_expressions() -> None:
    exprs = all_promql_expressions()
    assert len(exprs) == len(dashboard_expressions()) + len(REQUIRED_ALERTS)
    for expr in exprs:
        assert "$" not in expr, f"unsubstituted Grafana variable in {expr!r}"
        assert "__name__" not in expr, expr
    assert any('instance=~".*"' in expr and "[1m]" in expr for expr in exprs)
