"""Every PromQL expression in the Grafana dashboard and the alert rules refers
only to metrics that bon_gateway/metrics.py defines, and a fresh gateway, before
any traffic, already exposes a series for every selector they use.

Names are a public API: renaming a metric must fail here rather than leave a
dashboard panel empty or an alert that can never fire. A series that only
appears with its first event makes rate()/increase() miss that event.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bon_gateway.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "bon-gateway.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"

# Series that Prometheus itself writes for every target (not ours to define).
PROMETHEUS_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})

# Sample names each metric type exposes (the `_created` series are left out on
# purpose: dashboards have no business with them).
_SUFFIXES: dict[str, tuple[str, ...]] = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
    "stateset": ("",),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "unknown": ("",),
}

PROMQL_FUNCTIONS = frozenset(
    """
    abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes clamp
    clamp_max clamp_min cos cosh count_over_time day_of_month day_of_week day_of_year days_in_month
    deg delta deriv exp floor histogram_avg histogram_count histogram_fraction histogram_quantile
    histogram_stddev histogram_stdvar histogram_sum holt_winters double_exponential_smoothing hour
    idelta increase irate label_join label_replace last_over_time ln log10 log2 mad_over_time
    max_over_time min_over_time minute month pi predict_linear present_over_time quantile_over_time
    rad rate resets round scalar sgn sin sinh sort sort_desc sort_by_label sort_by_label_desc sqrt
    stddev_over_time stdvar_over_time sum_over_time tan tanh time timestamp vector year
    sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk limit_ratio
    """.split()
)
# Keywords and binary operators spelled as words.
PROMQL_KEYWORDS = frozenset(
    "by without on ignoring group_left group_right bool offset and or unless atan2 inf nan start end".split()
)
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GRAFANA_VAR = re.compile(r"\$(?:\{[^}]*\}|\w+)")
_IDENT = re.compile(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?")
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(?P<expr>.+),\s*)?(?P<label>\w+)\s*\)\s*$", re.S)


def exposed_names(metrics: Metrics) -> set[str]:
    """Every sample name the registry can expose, from the families' types."""
    names: set[str] = set()
    for family in metrics.registry.collect():
        for suffix in _SUFFIXES[family.type]:
            names.add(family.name + suffix)
    return names


def metric_names_in(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana label_values query) reads."""
    match = _LABEL_VALUES.match(expr)
    if match:
        expr = match.group("expr") or ""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)  # label matchers: label names, not metrics
    text = re.sub(r"\[[^\[\]]*\]", " ", text)  # ranges, subqueries, $__rate_interval
    text = _LABEL_LIST.sub(" ", text)  # by (...), on (...), group_left (...)
    text = _GRAFANA_VAR.sub(" ", text)
    text = re.sub(r"\b\d[\w.]*", " ", text)  # numbers, durations after offset, 1e3
    found: set[str] = set()
    for name, call in _IDENT.findall(text):
        if call:
            if name not in PROMQL_FUNCTIONS:
                raise ValueError(f"unknown PromQL function {name!r} in {expr!r}")
            continue
        if name.lower() in PROMQL_KEYWORDS:
            continue
        found.add(name)
    return found


# Labels Prometheus attaches to every series of a target at scrape time.
TARGET_LABELS = frozenset({"job", "instance"})
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Selector:
    """One vector selector: a metric name and its label matchers (label, op, value)."""

    name: str
    matchers: tuple[tuple[str, str, str], ...]

    def matches(self, sample_name: str, labels: dict[str, str]) -> bool:
        if sample_name != self.name:
            return False
        for label, op, value in self.matchers:
            have = labels.get(label, "")
            if op == "=" and have != value:
                return False
            if op == "!=" and have == value:
                return False
            if op in ("=~", "!~") and (re.fullmatch(value, have) is not None) != (op == "=~"):
                return False
        return True

    def __str__(self) -> str:
        return self.name + "{" + ", ".join(f'{k}{op}"{v}"' for k, op, v in self.matchers) + "}"


def selectors_in(expr: str) -> list[Selector]:
    """The vector selectors of an expression: each metric `metric_names_in` finds, with the
    matchers written after it. Matchers on target labels are dropped (the scrape has none)
    and Grafana variables match anything."""
    match = _LABEL_VALUES.match(expr)
    if match:
        expr = match.group("expr") or ""
    # Same offsets, strings blanked: a metric name is never looked for inside a string.
    masked = _STRING.sub(lambda m: '"' + " " * (len(m.group(0)) - 2) + '"', expr)
    found: list[Selector] = []
    for name in sorted(metric_names_in(expr)):
        for at in re.finditer(rf"(?<![\w:]){re.escape(name)}(?![\w:])", masked):
            rest = expr[at.end() :]
            braces = re.match(r"\s*\{((?:[^{}\"]|\"(?:[^\"\\]|\\.)*\")*)\}", rest)
            matchers = []
            for label, op, value in _MATCHER.findall(braces.group(1) if braces else ""):
                if label in TARGET_LABELS:
                    continue
                matchers.append((label, op, _GRAFANA_VAR.sub(".*", value)))
            found.append(Selector(name, tuple(matchers)))
    return found


def _dashboard_exprs(node: Any, where: str = "dashboard") -> Iterator[tuple[str, str]]:
    """(where, expr) for every query in the dashboard: panel targets and variables."""
    if isinstance(node, dict):
        title = node.get("title") or node.get("name") or ""
        here = f"{where}/{title}" if title else where
        expr = node.get("expr")
        if isinstance(expr, str) and expr.strip():
            yield here, expr
        if node.get("type") == "query":  # a templating variable
            query = node.get("query")
            text = query.get("query") if isinstance(query, dict) else query
            if isinstance(text, str) and text.strip():
                yield here, text
        for value in node.values():
            yield from _dashboard_exprs(value, here)
    elif isinstance(node, list):
        for item in node:
            yield from _dashboard_exprs(item, where)


def _alert_exprs() -> Iterator[tuple[str, str]]:
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule.get("record")
            yield f"{group['name']}/{name}", rule["expr"]


def _all_exprs() -> list[tuple[str, str]]:
    return [*_dashboard_exprs(json.loads(DASHBOARD.read_text())), *_alert_exprs()]


@pytest.fixture(scope="module")
def known() -> set[str]:
    return exposed_names(Metrics()) | PROMETHEUS_SERIES


def test_exposed_names_cover_every_type() -> None:
    names = exposed_names(Metrics())
    for expected in (
        "bon_requests_total",
        "bon_request_duration_seconds_bucket",
        "bon_request_duration_seconds_count",
        "bon_requests_in_flight",
        "bon_build_info",
    ):
        assert expected in names
    assert "bon_requests" not in names  # a counter is only exposed with _total


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up == 0", {"up"}),
        (
            "sum by (api, le) "
            '(rate(bon_request_duration_seconds_bucket{job=~"$job", api!="x"}[$__rate_interval]))',
            {"bon_request_duration_seconds_bucket"},
        ),
        (
            "sum(rate(a_total[5m])) / on (job) group_left (model) b_info offset 1h > bool 0.5",
            {"a_total", "b_info"},
        ),
        ('label_values(bon_workers_up{job=~"$job"}, model)', {"bon_workers_up"}),
        ("label_values(job)", set()),
        ("max by (model) (x / (y > 0)) > 1e3 and z unless w", {"x", "y", "z", "w"}),
        ('bon_candidates_total{outcome=~"dropped_.*|sum(by)"}', {"bon_candidates_total"}),
    ],
)
def test_metric_names_in(expr: str, names: set[str]) -> None:
    assert metric_names_in(expr) == names


def test_unknown_function_is_reported() -> None:
    with pytest.raises(ValueError, match="rates"):
        metric_names_in("rates(bon_requests_total[5m])")


def test_dashboard_and_rules_have_expressions() -> None:
    exprs = _all_exprs()
    assert sum(1 for where, _ in exprs if where.startswith("dashboard")) >= 30
    assert sum(1 for where, _ in exprs if not where.startswith("dashboard")) >= 8


def test_every_expression_uses_existing_metrics(known: set[str]) -> None:
    problems = []
    for where, expr in _all_exprs():
        names = metric_names_in(expr)
        if not names and "label_values" not in expr:
            problems.append(f"{where}: no metric found in {expr!r}")
        problems += [f"{where}: unknown metric {n!r}" for n in sorted(names - known)]
    assert not problems, "\n".join(problems)


def test_a_bogus_metric_name_is_caught(known: set[str]) -> None:
    """The check above can fail: a renamed metric is reported."""
    expr = 'sum by (api) (rate(bon_request_total{job=~"$job"}[$__rate_interval]))'
    assert metric_names_in(expr) - known == {"bon_request_total"}
    # ...and so is a histogram read without its _bucket suffix.
    assert metric_names_in("histogram_quantile(0.9, rate(bon_reward[5m]))") - known == {"bon_reward"}


def test_dashboard_covers_the_operator_metrics() -> None:
    """The panels the operators asked for (issue 6) are on the dashboard."""
    used: set[str] = set()
    for _, expr in _dashboard_exprs(json.loads(DASHBOARD.read_text())):
        used |= metric_names_in(expr)
    required = {
        "bon_requests_total",
        "bon_request_duration_seconds_bucket",
        "bon_phase_duration_seconds_bucket",
        "bon_candidates_total",
        "bon_upstream_requests_total",
        "bon_upstream_call_duration_seconds_bucket",
        "bon_upstream_errors_total",
        "bon_score_queue_depth",
        "bon_score_batch_size_bucket",
        "bon_score_batch_tokens_bucket",
        "bon_score_padding_ratio_sum",
        "bon_scored_tokens_total",
        "bon_reused_prompt_tokens_total",
        "bon_reward_bucket",
        "bon_workers_up",
        "bon_worker_restarts_total",
        "bon_requests_in_flight",
        "bon_build_info",
    }
    assert not required - used, f"missing from the dashboard: {sorted(required - used)}"


def test_dashboard_shape() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "bon-gateway"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert "$job" in target["expr"], f"{panel['title']}: not filtered by $job"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "job", "model"} <= variables


@pytest.mark.parametrize(
    ("expr", "selectors"),
    [
        ("up == 0", ["up{}"]),
        (
            'sum(rate(bon_candidates_total{job=~"$job", outcome=~"dropped_.*"}[5m])) / '
            'sum(rate(bon_candidates_total{outcome="generated"}[5m]))',
            ['bon_candidates_total{outcome=~"dropped_.*"}', 'bon_candidates_total{outcome="generated"}'],
        ),
        (
            'bon_workers_up{model=~"$model"} < bon_workers_configured',
            ["bon_workers_configured{}", 'bon_workers_up{model=~".*"}'],
        ),
        ('label_values(bon_workers_up{job=~"$job"}, model)', ["bon_workers_up{}"]),
        ('rate(x_total{status!="200", kind="a,b"}[5m])', ['x_total{status!="200", kind="a,b"}']),
    ],
)
def test_selectors_in(expr: str, selectors: list[str]) -> None:
    assert sorted(str(s) for s in selectors_in(expr)) == sorted(selectors)


def test_selector_matching() -> None:
    (dropped,) = selectors_in('bon_candidates_total{outcome=~"dropped_.*", api!="x"}')
    assert dropped.matches("bon_candidates_total", {"outcome": "dropped_timeout"})
    assert not dropped.matches("bon_candidates_total", {"outcome": "generated"})
    assert not dropped.matches("bon_candidates_total", {"outcome": "dropped_timeout", "api": "x"})
    assert not dropped.matches("bon_candidates", {"outcome": "dropped_timeout"})


def _scrape_fresh_gateway() -> list[tuple[str, dict[str, str]]]:
    """(sample name, labels) of /metrics on a gateway that has served nothing yet."""
    from tests.fakes import FakeScorer, ServedGateway, gateway_config

    config = gateway_config(
        "http://127.0.0.1:9/v1", reward_models=[{"name": "fake-rm", "path": "/nonexistent"}]
    )
    with ServedGateway(config, FakeScorer(models=["fake-rm"])) as gateway:
        text = httpx.get(f"{gateway.http_url}/metrics", timeout=10).text
    return [
        (s.name, dict(s.labels)) for family in text_string_to_metric_families(text) for s in family.samples
    ]


@pytest.mark.integration
def test_fresh_gateway_has_a_series_for_every_selector() -> None:
    samples = _scrape_fresh_gateway()
    missing = set()
    for where, expr in _all_exprs():
        for selector in selectors_in(expr):
            if selector.name in PROMETHEUS_SERIES:
                continue
            if not any(selector.matches(name, labels) for name, labels in samples):
                missing.add(f"{where}: {selector}")
    assert not missing, "no series before the first event:\n" + "\n".join(sorted(missing))
