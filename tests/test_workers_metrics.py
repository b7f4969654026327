"""`GET /metrics` of `tidegate serve --workers 2` answers for the whole server, whichever
worker is scraped: counters and histograms summed over the workers, gauges by their
rule (`GAUGE_MERGE`), the worker count and restarts once. Then the merge itself, on
small hand-written expositions."""

import os
import signal
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests import test_workers
from tests.conftest import LiveServer
from tests.test_workers import _each_worker, _fresh, _wait_for_workers, _wine_body, _workers
from tidegate.metrics import CONTENT_TYPE, GAUGE_MERGE
from tidegate.metrics_merge import Rule, merge
from tidegate.supervisor import read_status

# test_workers' fixtures, found by pytest here too: a server with 2 workers.
state_dir = test_workers.state_dir
two = test_workers.two

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _samples(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, tuple(sorted(labels.items()))]


def _scrape(server: LiveServer) -> str:
    """/metrics on a connection of its own (the kernel picks the worker)."""
    response = _fresh(server, "GET", "/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == CONTENT_TYPE
    return response.text


def _buckets(samples: Samples, name: str, **labels: str) -> list[float]:
    """The cumulative counts of one histogram series, by bound."""
    series = sorted(
        (float(dict(key)["le"]), value)
        for (sample, key), value in samples.items()
        if sample == f"{name}_bucket" and {k: v for k, v in key if k != "le"} == labels
    )
    return [value for _, value in series]


def test_metrics_answer_for_the_whole_server(two: LiveServer):
    sent = 200
    for i in range(sent):
        answer = _fresh(two, "POST", "/v2/models/wine/infer", json=_wine_body(1, i % 100))
        assert answer.status_code == 200
    # Each worker's own share, over its private socket: both served, none saw all.
    shares = [
        _value(
            _samples(response.json()["exposition"]),
            "tidegate_inference_requests_total",
            model="wine",
            version="1",
            variant="stable",
            outcome="success",
        )
        for response in _each_worker(two, "GET", "/internal/metrics")
    ]
    assert sum(shares) == sent
    assert all(0 < share < sent for share in shares), shares
    assert _fresh(two, "GET", "/internal/metrics").status_code == 404  # not on the port

    stable = {"model": "wine", "version": "1", "variant": "stable"}
    # Each worker scraped itself (over its socket), then whichever the kernel picks.
    scrapes = [response.text for response in _each_worker(two, "GET", "/metrics")]
    scrapes += [_scrape(two) for _ in range(6)]
    for scrape in scrapes:
        samples = _samples(scrape)
        requests = "tidegate_inference_requests_total"
        assert _value(samples, requests, **stable, outcome="success") == sent
        assert _value(samples, requests, **stable, outcome="failure") == 0
        assert _value(samples, "tidegate_request_duration_seconds_count", **stable) == sent
        buckets = _buckets(samples, "tidegate_request_duration_seconds", **stable)
        assert buckets == sorted(buckets)
        assert buckets[-1] == sent
        version = {"model": "wine", "version": "1"}
        assert _value(samples, "tidegate_inference_rows_total", **version) == sent
        batches = _buckets(samples, "tidegate_batch_size_rows", **version)
        assert batches == sorted(batches)
        assert batches[-1] == _value(samples, "tidegate_inference_runs_total", **version)
        # Gauges that are not summed: the same on every worker, or the slowest load.
        kernels = {k: v for k, v in samples.items() if k[0] == "tidegate_drift_kernels_info"}
        assert list(kernels.values()) == [1.0], kernels
        assert 0 < _value(samples, "tidegate_model_load_seconds", **version) < 60
        assert _value(samples, "tidegate_inflight_requests") == 0
        assert _value(samples, "tidegate_workers") == 2
        for slot in ("w0", "w1"):
            assert _value(samples, "tidegate_worker_restarts_total", worker=slot) == 0


def test_a_restart_is_counted_once(two: LiveServer):
    before = _wait_for_workers(two, 2)
    os.kill(before["w1"], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while _workers(two).get("w1") in (None, before["w1"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    after = _wait_for_workers(two, 2)
    assert after["w1"] != before["w1"]
    assert read_status(Path(str(after["run_dir"]))) == (2, {"w0": 0, "w1": 1})
    for _ in range(6):
        samples = _samples(_scrape(two))
        assert _value(samples, "tidegate_worker_restarts_total", worker="w1") == 1
        assert _value(samples, "tidegate_worker_restarts_total", worker="w0") == 0
        assert _value(samples, "tidegate_workers") == 2


def test_a_one_process_server_is_one_worker_never_restarted(models_dir: Path, start_server):
    live: LiveServer = start_server(models_dir)
    response = httpx.get(f"{live.base}/metrics", timeout=60)
    samples = _samples(response.text)
    assert _value(samples, "tidegate_workers") == 1
    assert not [key for key in samples if key[0] == "tidegate_worker_restarts_total"]
    assert httpx.get(f"{live.base}/internal/metrics", timeout=60).status_code == 404
    # Every gauge has its rule for a server with workers (`tidegate_workers` is added
    # after the merge).
    gauges = {
        family.name
        for family in text_string_to_metric_families(response.text)
        if family.type == "gauge"
    }
    assert gauges - {"tidegate_workers"} <= set(GAUGE_MERGE), gauges - set(GAUGE_MERGE)


# -- the merge, on hand-written expositions -------------------------------------------

# One worker's exposition: its request series, then the rest by value.
EXPOSITION = """\
# HELP requests_total Requests.
# TYPE requests_total counter
{requests}
# HELP latency_seconds Latency.
# TYPE latency_seconds histogram
latency_seconds_bucket{{le="0.1",model="wine"}} {fast}
latency_seconds_bucket{{le="1.0",model="wine"}} {count}
latency_seconds_bucket{{le="+Inf",model="wine"}} {count}
latency_seconds_count{{model="wine"}} {count}
latency_seconds_sum{{model="wine"}} {total}
# HELP kernels_info The kernels in use (1).
# TYPE kernels_info gauge
kernels_info{{backend="aot"}} 1.0
# HELP inflight Requests in flight.
# TYPE inflight gauge
inflight {inflight}
# HELP load_seconds Load time.
# TYPE load_seconds gauge
load_seconds{{model="wine"}} {load}
"""
ONLY_HERE = """\
# HELP only_here_total What one worker has.
# TYPE only_here_total counter
only_here_total 7.0
"""
W0 = EXPOSITION.format(
    requests='requests_total{model="wine",outcome="success"} 3.0\n'
    'requests_total{model="wine",outcome="failure"} 1.0',
    fast=2.0,
    count=3.0,
    total=0.5,
    inflight=2.0,
    load=0.25,
)
W1 = EXPOSITION.format(
    requests='requests_total{outcome="success",model="wine"} 4.0\n'
    'requests_total{model="digits",outcome="success"} 5.0',
    fast=1.0,
    count=4.0,
    total=1.5,
    inflight=1.0,
    load=0.75,
)
RULES: dict[str, Rule] = {"kernels_info": "same", "load_seconds": "max", "inflight": "sum"}


def test_merge_adds_counters_and_histograms_and_follows_the_gauge_rules():
    merged = EXPOSITION.format(
        requests='requests_total{model="wine",outcome="success"} 7.0\n'
        'requests_total{model="wine",outcome="failure"} 1.0\n'
        'requests_total{model="digits",outcome="success"} 5.0',
        fast=3.0,
        count=7.0,
        total=2.0,
        inflight=3.0,
        load=0.75,  # the max
    )
    assert merge([W0, W1 + ONLY_HERE], RULES).decode() == merged + ONLY_HERE


def test_merge_of_one_exposition_is_that_exposition():
    assert merge([W0], RULES).decode() == W0


def test_merge_keeps_histogram_buckets_cumulative_when_the_bounds_differ():
    # Batch sizes: each worker's buckets end at its largest batch.
    small = """\
# TYPE rows histogram
rows_bucket{le="1.0"} 2.0
rows_bucket{le="2.0"} 3.0
rows_bucket{le="+Inf"} 3.0
rows_count 3.0
rows_sum 4.0
"""
    large = """\
# TYPE rows histogram
rows_bucket{le="1.0"} 1.0
rows_bucket{le="2.0"} 1.0
rows_bucket{le="4.0"} 2.0
rows_bucket{le="8.0"} 3.0
rows_bucket{le="+Inf"} 3.0
rows_count 3.0
rows_sum 13.0
"""
    samples = _samples(merge([small, large], {}).decode())
    bounds = {dict(k)["le"]: v for (name, k), v in samples.items() if name == "rows_bucket"}
    assert bounds == {"1.0": 3.0, "2.0": 4.0, "4.0": 5.0, "8.0": 6.0, "+Inf": 6.0}
    assert (samples["rows_count", ()], samples["rows_sum", ()]) == (6.0, 17.0)


def test_merge_sums_a_summary_but_leaves_its_quantiles_out():
    summary = '# TYPE s summary\ns{quantile="0.5"} 1.0\ns_count 2.0\ns_sum 3.0\n'
    assert _samples(merge([summary, summary], {}).decode()) == {
        ("s_count", ()): 4.0,
        ("s_sum", ()): 6.0,
    }


def test_drift_gauges_are_the_merged_report_of_every_worker(two: LiveServer):
    for i in range(60):
        answer = _fresh(two, "POST", "/v2/models/wine/infer", json=_wine_body(5, (i * 5) % 100))
        assert answer.status_code == 200
    time.sleep(1.2)  # each worker's drift observer drains every 0.5 s
    report = _fresh(two, "GET", "/v2/models/wine/versions/1/drift").json()
    assert report["summary"]["window_rows"] == 300  # both workers' rows
    for _ in range(4):
        samples = _samples(_scrape(two))
        labels = {"model": "wine", "version": "1"}
        for row in report["inputs"]:
            psi = _value(
                samples, "tidegate_drift_psi", **labels, tensor_kind="input", feature=row["name"]
            )
            assert psi == row["psi"]
        assert _value(samples, "tidegate_drift_max_psi", **labels) == report["summary"]["max_psi"]
