"""The monitoring files (Grafana dashboard, Prometheus alert rules) as data, for tests.

``all_promql_expressions()`` gives every PromQL expression they hold, ready to send to
a real Prometheus: Grafana variables are substituted (``$instance`` -> ``.*``,
``$__rate_interval`` -> ``1m``). ``metric_names()`` finds the metric names an
expression reads, and ``exported_metric_names()`` the sample names smtpguard exposes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry

from smtpguard.metrics import Metrics

REPO_ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = REPO_ROOT / "grafana" / "smtpguard-dashboard.json"
PROVISIONING = REPO_ROOT / "grafana" / "provisioning"
PROMETHEUS_DIR = REPO_ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yaml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yaml"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"

#: Grafana variables and what they become outside Grafana (longest names first).
GRAFANA_SUBSTITUTIONS = (
    ("${__rate_interval}", "1m"),
    ("$__rate_interval", "1m"),
    ("${__interval}", "1m"),
    ("$__interval", "1m"),
    ("${instance}", ".*"),
    ("$instance", ".*"),
)


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def dashboard_panels(dashboard: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every panel but rows, including those nested in collapsed rows."""
    dashboard = dashboard if dashboard is not None else load_dashboard()
    found: list[dict[str, Any]] = []
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def dashboard_expressions(*, substitute: bool = True) -> list[str]:
    """The ``expr`` of every target of every panel, in dashboard order."""
    exprs = [
        str(target["expr"])
        for panel in dashboard_panels()
        for target in panel.get("targets", [])
        if target.get("expr")
    ]
    return [substitute_grafana_variables(e) for e in exprs] if substitute else exprs


def substitute_grafana_variables(expr: str) -> str:
    for variable, value in GRAFANA_SUBSTITUTIONS:
        expr = expr.replace(variable, value)
    return expr


def load_alert_rules() -> list[dict[str, Any]]:
    """Every rule of every group of alerts.yaml."""
    data = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in data["groups"] for rule in group["rules"]]


def alert_expressions() -> list[str]:
    return [str(rule["expr"]).strip() for rule in load_alert_rules()]


def all_promql_expressions() -> list[str]:
    """Every PromQL expression of the dashboard (variables substituted) and the alerts."""
    return dashboard_expressions() + alert_expressions()


# --- metric names ------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE
)
_IDENTIFIER = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(\s*\()?")
#: PromQL words that are not metric names: operators and modifiers, number literals,
#: grouping keywords, and aggregators (when written before their ``by`` clause).
_OPERATORS = ("and", "or", "unless", "bool", "offset", "inf", "nan")
_GROUPING_WORDS = ("by", "without", "on", "ignoring", "group_left", "group_right")
_AGGREGATORS = ("sum", "min", "max", "avg", "group", "stddev", "stdvar", "count")
_PARAMETRIC = ("count_values", "bottomk", "topk", "quantile", "limitk", "limit_ratio")
_KEYWORDS = frozenset(_OPERATORS + _GROUPING_WORDS + _AGGREGATORS + _PARAMETRIC)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (as written, suffixes included)."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _RANGES.sub("", text)
    text = _GROUPING.sub("", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name, call = match.group(1), match.group(2)
        if call is None and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


def exported_families(registry: CollectorRegistry | None = None) -> dict[str, str]:
    """``{family name: type}`` from the ``# TYPE`` lines of ``Metrics().exposition()``."""
    metrics = Metrics(registry if registry is not None else CollectorRegistry())
    families: dict[str, str] = {}
    for line in metrics.exposition().decode("utf-8").splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            families[name] = kind
    return families


def exported_metric_names(registry: CollectorRegistry | None = None) -> dict[str, str]:
    """Every sample name smtpguard can expose, mapped to its family's type.

    Counters are typed under their ``_total`` name already (text format 0.0.4);
    histograms and summaries expose ``_bucket``/``_sum``/``_count`` samples, never
    the bare family name (so ``x_bucket`` is valid only if ``x`` is a histogram).
    Families whose labelled children do not exist yet (no samples at start) count
    too: their names come from the ``# TYPE`` lines.
    """
    names: dict[str, str] = {}
    for family, kind in exported_families(registry).items():
        if kind == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                names[family + suffix] = kind
        elif kind == "summary":
            names[family] = kind
            for suffix in ("_sum", "_count"):
                names[family + suffix] = kind
        else:
            names[family] = kind
    return names
