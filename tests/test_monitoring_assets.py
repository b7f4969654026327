"""The Grafana dashboard (deploy/grafana/tidegate.json) and the Prometheus alert rules
(deploy/prometheus/alerts.yml) name only what tidegate exports: a live server with two
workers is driven until every metric family they use exists (inference, a failure, a
shadow rollout that rolls back, drifted traffic, a failed load, the request log), and
each selector of each query is checked against its scrape: the metric name, and the
labels and values it matches on. Then promtool checks the rules and runs their unit
tests (deploy/prometheus/alerts_test.yml), a broken threshold makes those tests fail,
and the dashboard's JSON has the structure Grafana imports.

The PromQL is read by a small tokenizer, not a parser: enough to tell metric names
from functions, keywords, label names, durations and Grafana's `$variables`."""

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import MODELS, SHIPPED_ONLY, LiveServer
from tests.shipped import ShippedVersion, json_request, reference_rows
from tests.test_rollout import FAST, Traffic, _wine_bodies
from tests.test_workers import _wait_for_workers

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "tidegate.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Labels Prometheus adds to every series it scrapes: in no exposition, valid everywhere.
TARGET_LABELS = {"instance", "job"}
BREAST_CANCER = ShippedVersion("breast_cancer", 1)

# -- reading PromQL ---------------------------------------------------------------------

TOKEN = re.compile(
    r"""
    (?P<space>\s+|\#[^\n]*)
  | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<variable>\$\{\w+(?::\w+)?\}|\$\w+|\[\[\w+\]\])
  | (?P<number>(?:0x[0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)(?:ms|[smhdwy])?
               (?:\d+(?:ms|[smhdwy]))*)
  | (?P<name>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=,(){}\[\]@])
    """,
    re.VERBOSE,
)
KEYWORDS = {"and", "or", "unless", "bool", "offset", "start", "end", "inf", "nan"}
# Aggregation operators: followed by `(`, or by `by (...)`/`without (...)` first.
AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count"}
AGGREGATIONS |= {"count_values", "bottomk", "topk", "quantile", "limitk", "limit_ratio"}
# Keywords followed by a parenthesised list of label names.
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}


@dataclass
class Selector:
    """One vector selector: `name{label op "value", ...}`."""

    name: str
    matchers: list[tuple[str, str, str]] = field(default_factory=list)


@dataclass
class Query:
    selectors: list[Selector]
    grouping: list[str]  # label names in by/without/on/ignoring/group_left/group_right


def _tokens(expr: str) -> list[tuple[str, str]]:
    tokens, position = [], 0
    while position < len(expr):
        match = TOKEN.match(expr, position)
        assert match is not None, f"cannot read {expr[position:]!r} in {expr!r}"
        assert match.lastgroup is not None
        if match.lastgroup != "space":
            tokens.append((match.lastgroup, match.group()))
        position = match.end()
    return tokens


def parse(expr: str) -> Query:
    """The selectors and grouping labels of a PromQL expression (with Grafana variables)."""
    tokens = _tokens(expr)
    query = Query([], [])
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if text == "[":  # a range or subquery: durations and variables only
            i = next(j for j in range(i, len(tokens)) if tokens[j][1] == "]") + 1
            continue
        if kind == "name" and text.lower() in GROUPING:
            i += 1
            if following == "(":
                end = next(j for j in range(i, len(tokens)) if tokens[j][1] == ")")
                query.grouping += [t for k, t in tokens[i + 1 : end] if k == "name"]
                i = end + 1
            continue
        if (kind == "name" and following == "(") or text.lower() in KEYWORDS | AGGREGATIONS:
            i += 1  # a function or aggregation, or a keyword
            continue
        if kind == "name" or text == "{":
            selector = Selector(text if kind == "name" else "")
            i += 1 if kind == "name" else 0
            if i < len(tokens) and tokens[i][1] == "{":
                end = next(j for j in range(i, len(tokens)) if tokens[j][1] == "}")
                inside = [t for t in tokens[i + 1 : end] if t[1] != ","]
                for label, op, value in zip(inside[::3], inside[1::3], inside[2::3], strict=True):
                    selector.matchers.append((label[1], op[1], value[1][1:-1]))
                i = end + 1
            query.selectors.append(selector)
            continue
        i += 1
    return query


# -- what a scrape exposes --------------------------------------------------------------

Exposed = dict[str, list[dict[str, str]]]  # sample name -> the label sets it has


def exposed(text: str) -> Exposed:
    """Each sample name of a scrape (histograms' `_bucket`, `_count`, `_sum`, counters'
    `_total`: the names Prometheus stores) with the label sets it comes with."""
    found: Exposed = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append(dict(sample.labels))
    return found


def problems(expr: str, scrape: Exposed) -> list[str]:
    """What `expr` names that the scrape lacks: metric names, labels it matches or
    groups on, and label values it matches exactly (or by a regular expression)."""
    query = parse(expr)
    found = []
    labels = set(TARGET_LABELS)
    for selector in query.selectors:
        if selector.name not in scrape:
            found.append(f"{selector.name or '{...}'}: no such metric")
            continue
        series = scrape[selector.name]
        names = {label for labelset in series for label in labelset}
        labels |= names
        for label, op, value in selector.matchers:
            if label in TARGET_LABELS:
                continue
            if label not in names:
                found.append(f"{selector.name}: no label {label!r}")
            elif "$" in value or op in ("!=", "!~"):
                continue  # a Grafana variable, or a negative match
            elif not any(_matches(op, value, labelset.get(label, "")) for labelset in series):
                found.append(f"{selector.name}: no series with {label}{op}{value!r}")
    found += [f"no label {label!r} to group by" for label in query.grouping if label not in labels]
    return found


def _matches(op: str, value: str, actual: str) -> bool:
    return actual == value if op == "=" else re.fullmatch(value, actual) is not None


VARIABLE_QUERY = re.compile(r"^\s*label_values\((?P<selector>.+),\s*(?P<label>\w+)\s*\)\s*$")


def variable_problems(definition: str, scrape: Exposed) -> list[str]:
    """`label_values(selector, label)`: the selector's problems, and the label on it."""
    match = VARIABLE_QUERY.match(definition)
    assert match is not None, f"not a label_values() query: {definition}"
    found = problems(match["selector"], scrape)
    (selector,) = parse(match["selector"]).selectors
    labels = {label for labelset in scrape.get(selector.name, []) for label in labelset}
    if match["label"] not in labels | TARGET_LABELS:
        found.append(f"{selector.name}: no label {match['label']!r}")
    return found


# -- the assets -------------------------------------------------------------------------


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _rules() -> list[dict]:
    (group,) = yaml.safe_load(ALERTS.read_text())["groups"]
    rules: list[dict] = group["rules"]
    return rules


def _panel_queries() -> Iterator[tuple[str, str]]:
    """(panel title, expression) of every target of every panel."""
    for panel in _dashboard()["panels"]:
        for target in panel["targets"]:
            yield panel["title"], target["expr"]


def _variable_queries() -> Iterator[tuple[str, str]]:
    for variable in _dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            yield variable["name"], variable["query"]


# -- a live server that has shown every family ------------------------------------------


def _send_drifted(live: LiveServer) -> None:
    """breast_cancer 1 gets its reference rows with the first feature shifted by two
    standard deviations; returns once the drift observer has counted them."""
    reference = reference_rows(BREAST_CANCER, 426)["input"]
    shifted = np.concatenate([reference, reference]).copy()
    shifted[:, 0] += 2 * reference[:, 0].std()
    for start in range(0, len(shifted), 100):
        body = json_request("input", "FP32", shifted[start : start + 100])
        response = live.client.post("/v2/models/breast_cancer/versions/1/infer", json=body)
        assert response.status_code == 200, response.text
    deadline = time.monotonic() + 30
    while True:
        report = live.client.get("/v2/models/breast_cancer/versions/1/drift").json()
        if report.get("state") == "ready" and report["summary"]["window_rows"] >= len(shifted):
            return
        assert time.monotonic() < deadline, report
        time.sleep(0.1)


def _roll_back_a_shadow_rollout(live: LiveServer) -> None:
    """A shadow rollout of wine's bad version 3, which the judge rolls back on disagreement."""
    traffic = Traffic(live, "wine", _wine_bodies())
    try:
        options = {**FAST, "mode": "shadow", "min_rows": 10_000}
        started = live.client.post("/v2/models/wine/rollout", json={"version": "3", **options})
        assert started.status_code == 200, started.text
        deadline = time.monotonic() + 60
        while (status := live.client.get("/v2/models/wine/rollout").json())["status"] not in (
            "promoted",
            "rolled_back",
        ):
            assert time.monotonic() < deadline, status
            time.sleep(0.05)
    finally:
        traffic.close()
    assert status["status"] == "rolled_back", status


@pytest.fixture(scope="module")
def metrics(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """/metrics of a two-worker server with a request log, after traffic that makes
    every family appear."""
    root = tmp_path_factory.mktemp("monitoring")
    shutil.copytree(MODELS, root / "models", ignore=SHIPPED_ONLY)
    live = LiveServer(
        root / "models",
        "--workers",
        "2",
        "--state-dir",
        str(root / "state"),
        "--request-log",
        str(root / "requests"),
        log_path=root / "server.log",
    )
    try:
        _wait_for_workers(live, 2)
        _roll_back_a_shadow_rollout(live)
        _send_drifted(live)
        bad = live.client.post("/v2/models/wine/infer", json={"inputs": []})
        assert bad.status_code == 400
        (root / "models" / "digits" / "1" / "model.onnx").write_bytes(b"not onnx")
        assert live.client.post("/v2/repository/models/digits/load").status_code == 400
        response = httpx.get(f"{live.base}/metrics", timeout=60)
        assert response.status_code == 200
        yield response.text
    finally:
        live.stop()


@pytest.fixture(scope="module")
def scrape(metrics: str) -> Exposed:
    return exposed(metrics)


def test_the_traffic_made_the_states_the_alerts_watch(metrics: str):
    """The drifted version meets the drift alert's condition, wine's rollout is rolled
    back, a failure and a failed load are counted, the shadow copied requests: the
    rules' matchers meet real values, not only real names."""
    values = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return values[name, tuple(sorted(labels.items()))]

    drifted = {"model": "breast_cancer", "version": "1"}
    assert value("tidegate_drift_verdict", **drifted) == 1
    assert value("tidegate_drift_max_psi", **drifted) >= 0.25  # the alert's level
    assert value("tidegate_rollout_status", model="wine", status="rolled_back") == 1
    wine = {"model": "wine", "version": "1", "variant": "stable"}
    assert value("tidegate_inference_requests_total", **wine, outcome="failure") == 1
    assert value("tidegate_inference_requests_total", **wine, outcome="success") > 0
    assert value("tidegate_model_load_failures_total", model="digits") == 1
    assert value("tidegate_shadow_mirrored_requests_total", model="wine") > 0
    assert value("tidegate_workers") == 2
    assert value("tidegate_worker_restarts_total", worker="w1") == 0
    assert value("tidegate_request_log_written_total") > 0


def _every_name_read(expr: str) -> None:
    """The tokenizer found a selector for each `tidegate_` name in the text: a name it
    took for something else would escape the check."""
    names = [selector.name for selector in parse(expr).selectors]
    assert names == re.findall(r"\btidegate_\w+", expr), expr


def test_every_alert_names_only_exported_metrics(scrape: Exposed):
    for rule in _rules():
        _every_name_read(rule["expr"])
    found = {rule["alert"]: problems(rule["expr"], scrape) for rule in _rules()}
    assert found == {name: [] for name in found}


def test_every_dashboard_query_names_only_exported_metrics(scrape: Exposed):
    for _, expr in _panel_queries():
        _every_name_read(expr)
    for _, definition in _variable_queries():
        match = VARIABLE_QUERY.match(definition)
        assert match is not None, definition
        _every_name_read(match["selector"])
    found = [(title, expr, problems(expr, scrape)) for title, expr in _panel_queries()]
    assert [row for row in found if row[2]] == []
    found = [(name, q, variable_problems(q, scrape)) for name, q in _variable_queries()]
    assert [row for row in found if row[2]] == []


def test_every_dashboard_selector_follows_the_variables(scrape: Exposed):
    """Every selector filters on the `instance` variable, and on `model` where the
    metric has a model label: the variables at the top change every panel."""
    for title, expr in _panel_queries():
        for selector in parse(expr).selectors:
            matchers = {(label, op, value) for label, op, value in selector.matchers}
            assert ("instance", "=~", "$instance") in matchers, (title, selector)
            if any("model" in labels for labels in scrape[selector.name]):
                assert ("model", "=~", "$model") in matchers, (title, selector)


def test_the_name_check_can_fail(scrape: Exposed):
    """Made-up names, a histogram named without a sample suffix, a counter without
    `_total`, a label or value that is not there: each is reported."""
    cases = {
        "rate(tidegate_made_up_total[5m])": ["tidegate_made_up_total: no such metric"],
        "histogram_quantile(0.99, rate(tidegate_request_duration_seconds[5m]))": [
            "tidegate_request_duration_seconds: no such metric"
        ],
        "tidegate_queue_depth_count": ["tidegate_queue_depth_count: no such metric"],
        "rate(tidegate_inference_requests[1m])": ["tidegate_inference_requests: no such metric"],
        'tidegate_inference_requests_total{outcome="failed"}': [
            "tidegate_inference_requests_total: no series with outcome='failed'"
        ],
        'tidegate_rollout_status{state="rolled_back"}': [
            "tidegate_rollout_status: no label 'state'"
        ],
        "sum by (modle) (tidegate_queue_depth)": ["no label 'modle' to group by"],
    }
    assert {expr: problems(expr, scrape) for expr in cases} == cases
    assert variable_problems("label_values(tidegate_workers, model)", scrape) == [
        "tidegate_workers: no label 'model'"
    ]
    # And what a query is full of is not a metric name.
    clean = (
        "histogram_quantile(0.99, sum by (model, version, le) (rate(tidegate_request_duration_"
        'seconds_bucket{model=~"$model", instance=~"${instance}"}[$__rate_interval]))) > 0.25 '
        "and on (model, version) sum without (variant) (rate(tidegate_request_duration_seconds"
        "_count[1h30m] offset 5m)) >= 1e-1 unless tidegate_queue_depth > bool 0"
    )
    assert problems(clean, scrape) == []


# -- promtool -------------------------------------------------------------------------


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_promtool_checks_the_rules():
    checked = _promtool("check", "rules", str(ALERTS))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in checked.stdout


def test_promtool_runs_the_unit_tests():
    tested = _promtool("test", "rules", str(ALERTS_TEST))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_each_alert_is_tested_firing_and_quiet():
    cases: dict[str, set[bool]] = {}
    for group in yaml.safe_load(ALERTS_TEST.read_text())["tests"]:
        for case in group["alert_rule_test"]:
            cases.setdefault(case["alertname"], set()).add(bool(case.get("exp_alerts")))
    assert cases == {rule["alert"]: {True, False} for rule in _rules()}


# A change to each rule's threshold (or window) that its unit tests must catch.
MUTATIONS = {
    "TidegateDriftDetected": ("tidegate_drift_max_psi >= 0.25", "tidegate_drift_max_psi >= 0.5"),
    "TidegateDriftDetected without the verdict": ("and tidegate_drift_verdict == 1", ""),
    "TidegateRolloutRolledBack": ("offset 30m", "offset 2m"),
    "TidegateErrorRateHigh": (") > 0.05", ") > 0.2"),
    "TidegateErrorRateHigh without the traffic floor": (
        ">= 0.1\n        for: 5m",
        ">= 0\n        for: 5m",
    ),
    "TidegateLatencyP99High": ("> 0.25\n", "> 0.5\n"),
    "TidegateQueueFull": (">= 900", ">= 1100"),
    "TidegateRequestLogDropping": ("dropped_total[10m]) > 0", "dropped_total[10m]) > 100"),
    "TidegateWorkerRestarted": ("restarts_total[15m]) > 0", "restarts_total[15m]) > 1"),
    "TidegateModelLoadFailed": ("failures_total[15m]) > 0", "failures_total[15m]) > 1"),
}


@pytest.mark.parametrize(("old", "new"), MUTATIONS.values(), ids=MUTATIONS.keys())
def test_the_unit_tests_catch_a_changed_threshold(tmp_path: Path, old: str, new: str):
    rules = ALERTS.read_text()
    assert rules.count(old) == 1, old
    (tmp_path / "alerts.yml").write_text(rules.replace(old, new))
    shutil.copy(ALERTS_TEST, tmp_path / "alerts_test.yml")
    assert _promtool("check", "rules", str(tmp_path / "alerts.yml")).returncode == 0
    tested = _promtool("test", "rules", str(tmp_path / "alerts_test.yml"))
    assert tested.returncode != 0, tested.stdout
    assert "FAILED" in tested.stdout + tested.stderr


def test_each_rule_says_how_long_how_bad_and_where():
    for rule in _rules():
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), name
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert set(rule["annotations"]) == {"summary", "description"}, name
        text = rule["annotations"]["summary"] + rule["annotations"]["description"]
        # Per-version rules name the model and version; the server's own, the instance.
        per_model = "model" in rule["expr"] and "tidegate_request_log" not in rule["expr"]
        wanted = ["$labels.model"] if per_model else ["$labels.instance"]
        if "version" in rule["expr"] or "tidegate_drift" in rule["expr"]:
            wanted.append("$labels.version")
        assert all(label in text for label in wanted), (name, wanted)


# -- the dashboard's structure ----------------------------------------------------------


def test_the_dashboard_is_an_importable_grafana_dashboard():
    dashboard = _dashboard()
    assert dashboard["schemaVersion"] >= 41  # what Grafana 11.6 and 12 write
    assert dashboard["uid"] == "tidegate"
    assert dashboard["title"]
    assert dashboard["id"] is None  # Grafana assigns one on import
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("model", "instance"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"] == DATASOURCE
        assert variables[name]["query"].startswith("label_values(")
        assert variables[name]["query"].endswith(f", {name})")
        assert variables[name]["includeAll"]
        assert variables[name]["multi"]


def test_every_panel_has_a_place_an_id_and_queries_on_the_variable_datasource():
    panels = _dashboard()["panels"]
    assert len(panels) >= 15
    ids = [panel["id"] for panel in panels]
    assert len(set(ids)) == len(ids), ids
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        title = panel["title"]
        assert title, panel
        assert panel["type"], title
        assert panel["description"], title
        assert panel["datasource"] == DATASOURCE, title
        grid = panel["gridPos"]
        assert {k: type(v) for k, v in grid.items()} == dict.fromkeys("hwxy", int), title
        assert grid["h"] > 0, title
        assert 0 <= grid["x"] < grid["x"] + grid["w"] <= 24, title
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{title} overlaps {cells[x, y]}"
                cells[x, y] = title
        targets = panel["targets"]
        assert targets, title
        assert len({t["refId"] for t in targets}) == len(targets), title
        for target in targets:
            assert target["datasource"] == DATASOURCE, title
            assert target["expr"].strip(), title
            assert target["legendFormat"], title


def test_the_dashboard_covers_what_operators_watch():
    """One panel at least on each of: requests, errors, latency, batching, queues,
    traffic shares, rollouts, judge verdicts, drift, request log, workers."""
    queries = " ".join(expr for _, expr in _panel_queries())
    for metric in (
        "tidegate_inference_requests_total",
        "tidegate_request_duration_seconds_bucket",
        "tidegate_batch_size_rows_bucket",
        "tidegate_queue_depth",
        "tidegate_rollout_step",
        "tidegate_rollout_weight_percent",
        "tidegate_rollout_status",
        "tidegate_rollout_check",
        "tidegate_drift_psi",
        "tidegate_drift_verdict",
        "tidegate_request_log_dropped_total",
        "tidegate_worker_restarts_total",
    ):
        assert metric in queries, metric
    assert 'outcome="failure"' in queries
    assert "histogram_quantile(0.99," in queries
    assert "histogram_quantile(0.5," in queries
